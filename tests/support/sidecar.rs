//! Starts the real sidecar in-process through `App::build` and `App::run`, on listeners bound to
//! 127.0.0.1:0, exactly as `main` does but with a shutdown trigger the test holds.

use std::net::SocketAddr;
use std::time::Duration;

use token_sidecar::config::{Config, Overrides};
use token_sidecar::{App, Listeners};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running sidecar.
pub struct Sidecar {
    /// Base URL of each listener (one per distinct route address), in config order.
    pub urls: Vec<String>,
    /// Base URL of the admin listener.
    pub admin_url: String,
    /// Address of the first route's listener.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

/// A one-route configuration for `upstream`, with any TOML (top-level keys and tables such as
/// `[token]`) applied on top. Listeners are replaced by port 0 when started.
pub fn config(upstream: &str, toml: &str) -> Config {
    config_toml(&format!("upstream = {upstream:?}\n{toml}"))
}

/// A configuration from a whole TOML file (for several routes).
pub fn config_toml(toml: &str) -> Config {
    let text = toml.to_owned();
    Config::load(
        Overrides {
            config: Some("test.toml".into()),
            ..Default::default()
        },
        |_| None,
        |_| Ok(text.clone()),
    )
    .unwrap_or_else(|e| panic!("test config is invalid: {e}"))
}

impl Sidecar {
    /// Starts a one-route sidecar in front of `upstream` with default settings.
    pub async fn start(upstream: &str) -> Sidecar {
        Sidecar::start_with(config(upstream, "")).await
    }

    /// Starts a sidecar with `config`, every listener on 127.0.0.1:0.
    pub async fn start_with(config: Config) -> Sidecar {
        let mut routes = Vec::new();
        for _ in config.listeners() {
            routes.push(TcpListener::bind("127.0.0.1:0").await.expect("bind route"));
        }
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let urls: Vec<String> = routes
            .iter()
            .map(|l| format!("http://{}", l.local_addr().unwrap()))
            .collect();
        let addr = routes[0].local_addr().unwrap();
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let app = App::build(&config).unwrap_or_else(|e| panic!("sidecar does not build: {e}"));
        let task = tokio::spawn(async move {
            app.run(Listeners { routes, admin }, async move {
                let _ = stopped.await;
            })
            .await;
            Ok(())
        });
        let sidecar = Sidecar {
            urls,
            admin_url,
            addr,
            stop: Some(stop),
            task: Some(task),
        };
        sidecar.wait_ready().await;
        sidecar
    }

    /// The first route's base URL.
    pub fn url(&self) -> &str {
        &self.urls[0]
    }

    /// The first route's default token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.urls[0])
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let request = http::Request::get(format!("{}/metrics", self.admin_url))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        super::send(&super::client(), request).await.text()
    }

    async fn wait_ready(&self) {
        let client = super::client();
        for _ in 0..200 {
            let req = http::Request::get(format!("{}/readyz", self.admin_url))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(1), client.request(req)).await
                && resp.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("sidecar did not become ready");
    }

    /// Signals shutdown and waits (bounded) for `run` to return.
    pub async fn stop(mut self) -> Result<(), String> {
        self.signal_stop();
        let task = self.task.take().expect("not stopped yet");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("run() did not return within 30 s of shutdown")
            .expect("run() panicked")
    }

    /// Sends the shutdown signal without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
