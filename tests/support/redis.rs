//! A real `redis-server` (Debian's package; `.ci/run` installs it) on a free loopback port, for
//! the fleet tier's tests: started and waited for with a bound, stopped by its pid, restartable
//! on the same port. A machine without it fails the test with a message, never skips it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::free_port;

/// One `redis-server` child.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// Extra server arguments (TLS, ACL users), kept for restarts.
    args: Vec<String>,
    /// The PEM CA a TLS server's certificate chains to.
    ca: Option<String>,
    /// `user:password@` for the URL, when the server requires it.
    auth: Option<String>,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl RedisServer {
    /// A fresh server on a free loopback port, answering `PING`.
    pub fn start() -> RedisServer {
        RedisServer::start_with(Vec::new(), None, None)
    }

    /// A server with `args`; `ca` for a TLS one (then `args` name its files), `auth` as
    /// `user:password` when it requires a login.
    pub fn start_with(args: Vec<String>, ca: Option<String>, auth: Option<String>) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            args,
            ca,
            auth,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>/0`, or `rediss://` and the login where the server needs them.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        let auth = self
            .auth
            .as_ref()
            .map(|a| format!("{a}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL, by pid) and waits for it: what Redis loss looks like.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port.to_string();
        let listen: [&str; 4] = if self.ca.is_some() {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1"])
            .args(&self.args)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &std::env::temp_dir().display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): run the tests with `bash scripts/test`, which installs it, or `apt-get install redis-server`")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut connection) = self.connection()
                && redis::cmd("PING").query::<String>(&mut connection).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A plain synchronous connection, to look at what the server holds.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = match &self.ca {
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone().into_bytes()),
                },
            )?,
            None => redis::Client::open(self.url())?,
        };
        client.get_connection_with_timeout(Duration::from_secs(1))
    }

    /// Every key and its raw value (strings only; the fleet tier stores nothing else).
    pub fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut connection = self.connection().expect("connect to redis-server");
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut cursor = 0u64;
        // Bounded: a test's Redis holds a handful of keys.
        for _ in 0..1_000 {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1_000)
                .query(&mut connection)
                .expect("SCAN");
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.into_iter()
            .map(|key| {
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query(&mut connection)
                    .expect("GET");
                (key, value.unwrap_or_default())
            })
            .collect()
    }
}
