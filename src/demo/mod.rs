//! `token-sidecar demo`: the sidecar's job shown without an identity provider of one's own. A
//! built-in throttling provider ([`provider`]) runs on loopback; the story sends a herd of
//! clients (100 by default) fetching tokens at it for a few seconds, first directly, then
//! through a sidecar started in this process, and prints what each way cost: requests, 200s,
//! 429s, provider calls and latency. `demo --serve` keeps the provider and the sidecar up and
//! prints what to try with curl.
//!
//! Everything stays on 127.0.0.1 and is bounded in time: the default story takes about 10 s.

pub mod provider;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use crate::config::{Config, DEFAULT_ADMIN, DEFAULT_LISTEN, Overrides};
use crate::{App, Listeners};
use provider::{Behaviour, CLIENT_ID, CLIENT_SECRET, Provider};

/// What the demo does, from the subcommand's flags.
#[derive(Debug, Clone)]
struct Options {
    /// Keep the provider and the sidecar running instead of telling the story.
    pub serve: bool,
    /// Concurrent clients.
    pub clients: usize,
    /// How long each way of the story runs.
    pub phase: Duration,
    /// The provider's token calls per second.
    pub calls_per_second: u64,
    /// The provider's token lifetime.
    pub lifetime: Duration,
    /// Where the sidecar listens in `--serve` (the story uses a free port).
    pub listen: SocketAddr,
    /// Its admin listener in `--serve`.
    pub admin: SocketAddr,
}

/// How one way of the story went.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    ok: u64,
    throttled: u64,
    other: u64,
    provider_calls: u64,
    /// Every request's latency, for percentiles.
    latencies: Vec<Duration>,
}

impl Tally {
    /// Adds another client's tally (provider calls are counted for the whole herd).
    fn add(&mut self, other: Tally) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.throttled += other.throttled;
        self.other += other.other;
        self.latencies.extend(other.latencies);
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
        sorted.get(at).copied().unwrap_or_default()
    }
}

impl Options {
    fn of(args: &DemoArgs) -> Options {
        let lifetime =
            args.lifetime
                .unwrap_or(Duration::from_secs(if args.serve { 60 } else { 4 }));
        let default = |text: &str| text.parse().expect("a valid default address");
        Options {
            serve: args.serve,
            clients: usize::from(args.clients),
            phase: args.seconds,
            calls_per_second: args.rate,
            lifetime,
            listen: args.listen.unwrap_or_else(|| default(DEFAULT_LISTEN)),
            admin: args.admin.unwrap_or_else(|| default(DEFAULT_ADMIN)),
        }
    }
}

/// Runs the demo on its own runtime; `Err` says what went wrong, or that the story did not come
/// out as it should (a 429 through the sidecar, say), so the demo doubles as a smoke test.
pub fn run(args: &DemoArgs) -> Result<(), String> {
    let options = &Options::of(args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        if options.serve {
            serve(options).await
        } else {
            story(options).await
        }
    })
}

/// A sidecar in this process in front of `upstream`, until `stop`; returns its token and admin
/// addresses.
async fn sidecar(
    upstream: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    stop: CancellationToken,
) -> Result<(SocketAddr, SocketAddr), String> {
    let flags = Overrides {
        upstream: Some(upstream.to_owned()),
        listen: Some(listen),
        admin: Some(admin),
        ..Overrides::default()
    };
    let config = Config::load(
        flags,
        |_| None,
        |_| Err(std::io::ErrorKind::NotFound.into()),
    )
    .map_err(|e| e.to_string())?;
    let app = App::build(&config).map_err(|e| e.to_string())?;
    let listeners = Listeners::bind(&config).map_err(|e| e.to_string())?;
    let bound = |l: &tokio::net::TcpListener| l.local_addr().map_err(|e| e.to_string());
    let addresses = (bound(&listeners.routes[0])?, bound(&listeners.admin)?);
    tokio::spawn(async move { app.run(listeners, stop.cancelled_owned()).await });
    Ok(addresses)
}

async fn story(options: &Options) -> Result<(), String> {
    let stop = CancellationToken::new();
    let _stop_all = stop.clone().drop_guard();
    let behaviour = Behaviour {
        calls_per_second: options.calls_per_second,
        lifetime: options.lifetime,
        latency: Duration::from_millis(20),
    };
    println!(
        "token-sidecar demo: {} clients, each asking for a token before every 50 ms of work and asking again at once after a 429 (as naive clients do), for {:.0} s against a provider that allows {} token calls a second (tokens of {} s): first directly, then through the sidecar.\n",
        options.clients,
        options.phase.as_secs_f64(),
        options.calls_per_second,
        options.lifetime.as_secs()
    );
    let direct_idp = Provider::start(behaviour, stop.clone())
        .await
        .map_err(|e| e.to_string())?;
    let direct = herd("directly", &direct_idp, &direct_idp.url(), options).await;

    let idp = Provider::start(behaviour, stop.clone())
        .await
        .map_err(|e| e.to_string())?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let (listen, _) = sidecar(&idp.url(), loopback, loopback, stop.clone()).await?;
    let through = herd(
        "through the sidecar",
        &idp,
        &format!("http://{listen}"),
        options,
    )
    .await;

    println!("\n{}", report(&direct, &through));
    if through.throttled + through.other > 0 {
        return Err(format!(
            "the sidecar passed on {} 429s and {} other errors",
            through.throttled, through.other
        ));
    }
    println!(
        "Through the sidecar every client got its token, and the provider saw {} calls instead of {}.",
        group(through.provider_calls),
        group(direct.provider_calls)
    );
    println!(
        "Next: `{} demo --serve` keeps both running for you to try with curl.",
        this_binary()
    );
    Ok(())
}

/// `options.clients` clients fetching tokens from `url` for `options.phase`, each as a naive
/// app does: a token for every piece of work, asked again at once after a 429.
async fn herd(name: &str, idp: &Provider, url: &str, options: &Options) -> Tally {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(options.clients)
        .build_http();
    let token_url: Arc<str> = format!("{url}/oauth/token").into();
    let before = idp.counts.read().0;
    let started = Instant::now();
    let until = started + options.phase;
    let sent = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..options.clients)
        .map(|_| {
            let app = NaiveApp {
                client: client.clone(),
                token_url: token_url.clone(),
                sent: sent.clone(),
            };
            tokio::spawn(app.run(until))
        })
        .collect();
    let progress = tokio::spawn(progress(name.to_owned(), started, options.phase, sent));
    let mut total = Tally::default();
    for task in tasks {
        if let Ok(tally) = task.await {
            total.add(tally);
        }
    }
    progress.abort();
    let _ = progress.await;
    total.provider_calls = idp.counts.read().0 - before;
    let line = format!(
        "  {name}: {} requests, {} answered 200 with a token, {} answered 429, {} provider calls",
        group(total.requests),
        group(total.ok),
        group(total.throttled),
        group(total.provider_calls)
    );
    if std::io::stderr().is_terminal() {
        eprintln!("\r\x1b[2K{line}");
    } else {
        eprintln!("{line}");
    }
    total
}

/// One client of the herd, written as apps that fetch too often are.
struct NaiveApp {
    client: Client<HttpConnector, Full<Bytes>>,
    token_url: Arc<str>,
    /// Requests sent by the whole herd, for the progress line.
    sent: Arc<AtomicU64>,
}

impl NaiveApp {
    /// Asks for a token, does 50 ms of work with it, and asks again, until `until`; after a 429
    /// it asks again at once.
    async fn run(self, until: Instant) -> Tally {
        let form = format!(
            "grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"
        );
        let mut tally = Tally::default();
        // Bounded in count as well as time.
        for _ in 0..1_000_000 {
            if Instant::now() >= until {
                break;
            }
            let asked = Instant::now();
            let status = self.ask(&form).await;
            tally.latencies.push(asked.elapsed());
            tally.requests += 1;
            self.sent.fetch_add(1, Ordering::Relaxed);
            match status {
                Some(200) => {
                    tally.ok += 1;
                    // The work the token was for.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(429) => tally.throttled += 1,
                _ => tally.other += 1,
            }
        }
        tally
    }

    /// One token request; its status, or `None` when it failed or took over 10 s.
    async fn ask(&self, form: &str) -> Option<u16> {
        let request = http::Request::post(&*self.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form.to_owned())))
            .ok()?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .ok()?
            .ok()?;
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        Some(status)
    }
}

/// This binary as a command to paste: its own path (`cargo run` leaves it under target/, where
/// no PATH finds it), quoted when it has a space; `token-sidecar` if the path cannot be read.
fn this_binary() -> String {
    match std::env::current_exe() {
        Ok(path) if path.to_string_lossy().contains(char::is_whitespace) => {
            format!("'{}'", path.display())
        }
        Ok(path) => path.display().to_string(),
        Err(_) => "token-sidecar".to_owned(),
    }
}

/// A progress line on stderr: redrawn in place on a terminal, once a second elsewhere.
async fn progress(name: String, started: Instant, phase: Duration, sent: Arc<AtomicU64>) {
    let terminal = std::io::stderr().is_terminal();
    let tick = if terminal {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    loop {
        tokio::time::sleep(tick).await;
        let done = started.elapsed().min(phase);
        let share = done.as_secs_f64() / phase.as_secs_f64().max(f64::EPSILON);
        let filled = (share * 20.0).round() as usize;
        let line = format!(
            "  {name} [{}{}] {:.1}/{:.0} s, {} requests",
            "#".repeat(filled),
            " ".repeat(20 - filled.min(20)),
            done.as_secs_f64(),
            phase.as_secs_f64(),
            group(sent.load(Ordering::Relaxed))
        );
        if terminal {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }
}

/// The comparison table.
fn report(direct: &Tally, through: &Tally) -> String {
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let rows = [
        ("requests", group(direct.requests), group(through.requests)),
        ("200 OK (a token)", group(direct.ok), group(through.ok)),
        (
            "429 Too Many Requests",
            group(direct.throttled),
            group(through.throttled),
        ),
        ("other errors", group(direct.other), group(through.other)),
        (
            "calls the provider saw",
            group(direct.provider_calls),
            group(through.provider_calls),
        ),
        (
            "p50 latency",
            ms(direct.percentile(0.50)),
            ms(through.percentile(0.50)),
        ),
        (
            "p99 latency",
            ms(direct.percentile(0.99)),
            ms(through.percentile(0.99)),
        ),
    ];
    let mut out = format!(
        "{:<24} {:>14} {:>20}\n",
        "", "directly", "through the sidecar"
    );
    for (label, a, b) in rows {
        let _ = writeln!(out, "{label:<24} {a:>14} {b:>20}");
    }
    out
}

/// `12345` as `12,345`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

async fn serve(options: &Options) -> Result<(), String> {
    // The sidecar's log lines (each upstream call, the drain) show what it does.
    crate::telemetry::init(&crate::config::LogConfig::default(), |k| {
        std::env::var(k).ok()
    })?;
    let stop = CancellationToken::new();
    let behaviour = Behaviour {
        calls_per_second: options.calls_per_second,
        lifetime: options.lifetime,
        latency: Duration::from_millis(20),
    };
    let idp = Provider::start(behaviour, stop.clone())
        .await
        .map_err(|e| e.to_string())?;
    let (listen, admin) = sidecar(&idp.url(), options.listen, options.admin, stop.clone()).await?;
    let sidecar = format!("http://{listen}");
    println!(
        "demo provider: {} (client {CLIENT_ID} / {CLIENT_SECRET}; {} token calls a second, then 429 with Retry-After; tokens of {} s)",
        idp.url(),
        options.calls_per_second,
        options.lifetime.as_secs()
    );
    println!("sidecar:       {sidecar} (admin http://{admin})\n");
    println!("Try:");
    println!(
        "  curl -si -u {CLIENT_ID}:{CLIENT_SECRET} -d grant_type=client_credentials {sidecar}/oauth/token"
    );
    println!("      (again: Cache-Status says hit, and expires_in counts down)");
    println!(
        "  TOKEN=$(curl -s -u {CLIENT_ID}:{CLIENT_SECRET} -d grant_type=client_credentials {sidecar}/oauth/token | sed 's/.*\"access_token\":\"\\([^\"]*\\)\".*/\\1/')"
    );
    println!(
        "  curl -s -H \"Authorization: Bearer $TOKEN\" {sidecar}/api/v2/users/me      (forwarded untouched)"
    );
    println!("  curl -s http://{admin}/metrics | grep '^token_sidecar_'");
    println!(
        "  curl -s http://{admin}/status      (or: {} status --admin {admin})",
        this_binary()
    );
    println!("\nCtrl-C to stop.");
    let _ = std::io::stdout().flush();
    crate::app::shutdown_signal().await;
    stop.cancel();
    // Let the sidecar drain its connections.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_and_percentiles_are_nearest_rank() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
        let tally = Tally {
            latencies: (1..=100).map(Duration::from_millis).collect(),
            ..Tally::default()
        };
        assert_eq!(tally.percentile(0.50), Duration::from_millis(50));
        assert_eq!(tally.percentile(0.99), Duration::from_millis(99));
        assert_eq!(Tally::default().percentile(0.99), Duration::ZERO);
    }
}
