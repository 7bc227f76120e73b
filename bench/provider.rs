//! The benchmark's identity provider: the project's provider (`token_sidecar::demo::provider`,
//! the one the demo and the integration tests serve) as a process on loopback, configured from
//! flags, with two read-outs for the harness. `bench/bench.py` and `bench/soak.sh` start it.
//!
//! Usage: `provider [--listen ADDR] [--port-file FILE] [--latency-ms N] [--lifetime S]
//! [--token-bytes N] [--rate-limit N] [--faults SPEC] [--slow-ms N] [--seed N] [--call-log N]
//! [--max-seconds N]` (`--help` says what each does). It prints `listening on ADDR` on stdout, and
//! writes the port to FILE when given, so a harness can bind port 0 and read the port back; it
//! runs until SIGTERM, SIGINT or `--max-seconds`.
//!
//! Besides the provider's own paths it answers `GET /stats` with its counts and `GET /calls` with
//! its call log, both JSON. Each carries `clock_s`, the provider's clock when it answered, so a
//! reader can line the calls' times up with its own monotonic clock.
//!
//! One thread: on a small machine the provider should not take a core from the sidecar it serves.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use token_sidecar::demo::provider::{Answer, Call, Provider};
use tokio::net::{TcpSocket, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The accept queue: a cold storm connects thousands of clients at once.
const BACKLOG: u32 = 4096;

#[derive(Parser, Debug)]
#[command(about = "The benchmark's fake identity provider, on loopback")]
struct Args {
    /// Address to listen on (loopback; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Also write the bound port to this file (written whole, then renamed into place).
    #[arg(long)]
    port_file: Option<std::path::PathBuf>,
    /// Time every token call takes before it is answered.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// `expires_in` of every token, in seconds.
    #[arg(long, default_value_t = 3600)]
    lifetime: i64,
    /// Pad access tokens to this many bytes (a real token is a long JWT).
    #[arg(long, default_value_t = 1024)]
    token_bytes: usize,
    /// Token calls answered per second; the rest get 429 with `Retry-After: 1` (0: no limit).
    #[arg(long, default_value_t = 0)]
    rate_limit: u64,
    /// How --rate-limit counts: `rolling`, admitted calls in any rolling second (a refused call
    /// takes no place), or `fixed`, every call per whole second of the provider's clock.
    #[arg(long, value_enum, default_value_t = RateWindow::Rolling)]
    rate_window: RateWindow,
    /// Faults drawn per token call, as `KIND=RATE,...` with KIND one of 429 (`Retry-After: 1`),
    /// 503, 500, drop (close without an answer), slow (a token after --slow-ms), garbage (200
    /// with a body that is not JSON); the rates add up to at most 1.
    #[arg(long, default_value = "")]
    faults: String,
    /// How long a `slow` fault takes.
    #[arg(long, default_value_t = 2000)]
    slow_ms: u64,
    /// Seed of the fault generator: the same seed gives the same sequence of faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Token calls kept in the call log (`GET /calls`).
    #[arg(long, default_value_t = 100_000)]
    call_log: usize,
    /// Exit after this long, whatever happens.
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RateWindow {
    Rolling,
    Fixed,
}

/// A fault the provider can be told to inject, as `--faults` names it.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Throttled,
    Unavailable,
    ServerError,
    Drop,
    Slow,
    Garbage,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(kind: &str) -> Result<Fault, String> {
        Ok(match kind {
            "429" => Fault::Throttled,
            "503" => Fault::Unavailable,
            "500" => Fault::ServerError,
            "drop" => Fault::Drop,
            "slow" => Fault::Slow,
            "garbage" => Fault::Garbage,
            _ => {
                return Err(format!(
                    "unknown fault {kind:?}: 429, 503, 500, drop, slow or garbage"
                ));
            }
        })
    }
}

impl Fault {
    fn answer(self, args: &Args) -> Answer {
        match self {
            Fault::Throttled => Answer::status(429, Some("1")),
            Fault::Unavailable => Answer::status(503, None),
            Fault::ServerError => Answer::status(500, None),
            Fault::Drop => Answer::Drop,
            Fault::Slow => Answer::slow_token(args.lifetime, Duration::from_millis(args.slow_ms)),
            Fault::Garbage => Answer::Garbage,
        }
    }
}

/// `--faults` as the provider's mix of answers.
fn faults(args: &Args) -> Result<Vec<(f64, Answer)>, String> {
    let mut mix = Vec::new();
    for part in args.faults.split(',').filter(|p| !p.is_empty()) {
        let (kind, rate) = part
            .split_once('=')
            .ok_or_else(|| format!("--faults: {part:?} is not KIND=RATE"))?;
        let rate: f64 = rate
            .parse()
            .map_err(|_| format!("--faults: {rate:?} is not a rate"))?;
        mix.push((rate, kind.parse::<Fault>()?.answer(args)));
    }
    let total: f64 = mix.iter().map(|(rate, _)| rate).sum();
    if mix.iter().any(|(rate, _)| !(0.0..=1.0).contains(rate)) || total > 1.0 {
        return Err("--faults: rates must be in 0..=1 and add up to at most 1".into());
    }
    Ok(mix)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mix = faults(&args)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, mix))
}

async fn serve(args: Args, mix: Vec<(f64, Answer)>) -> Result<(), Box<dyn std::error::Error>> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(args.listen)?;
    let listener = socket.listen(BACKLOG)?;
    let addr = listener.local_addr()?;
    let provider = Provider::new(addr);
    provider.set_latency(Duration::from_millis(args.latency_ms));
    match (args.rate_limit, args.rate_window) {
        (0, _) => {}
        (calls, RateWindow::Rolling) => provider.set_rolling_rate_limit(calls),
        (calls, RateWindow::Fixed) => provider.set_rate_limit(calls),
    }
    provider.set_default(Answer::token(args.lifetime));
    provider.set_token_bytes(args.token_bytes);
    if !mix.is_empty() {
        provider.set_mix(&mix, args.seed);
    }
    provider.set_record_limit(0);
    provider.set_call_log_limit(args.call_log);

    let stop = CancellationToken::new();
    let connections = Arc::new(AtomicU64::new(0));
    provider.accept(listener, stop.clone(), move |provider, tcp| {
        connection(provider, tcp, connections.clone())
    });
    println!("listening on {addr}");
    if let Some(path) = &args.port_file {
        let partial = path.with_extension("partial");
        std::fs::write(&partial, format!("{}\n", addr.port()))?;
        std::fs::rename(&partial, path)?;
    }

    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        () = tokio::time::sleep(Duration::from_secs(args.max_seconds)) => {
            eprintln!("provider: --max-seconds reached, exiting");
        }
    }
    stop.cancel();
    Ok(())
}

/// One connection: the read-outs, and the provider's answers for everything else.
async fn connection(provider: Provider, tcp: TcpStream, connections: Arc<AtomicU64>) {
    connections.fetch_add(1, Ordering::Relaxed);
    let service = service_fn(move |request: Request<Incoming>| {
        let provider = provider.clone();
        let connections = connections.clone();
        async move {
            match (request.method(), request.uri().path()) {
                (&Method::GET, "/stats") => Ok(json_response(stats(&provider, &connections))),
                (&Method::GET, "/calls") => Ok(json_response(calls(&provider))),
                _ => provider.answer(request).await,
            }
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tcp), service)
        .await;
}

fn stats(provider: &Provider, connections: &AtomicU64) -> serde_json::Value {
    let counts = &provider.counts;
    let read = |counter: &AtomicU64| counter.load(Ordering::SeqCst);
    json!({
        "clock_s": provider.clock().as_secs_f64(),
        "counts": {
            "calls": read(&counts.calls),
            "issued": read(&counts.issued),
            "throttled": read(&counts.throttled),
            "requests": read(&counts.requests),
            "most_in_progress": read(&counts.most_in_progress),
            "connections": connections.load(Ordering::Relaxed),
        },
    })
}

fn calls(provider: &Provider) -> serde_json::Value {
    let row = |call: Call| {
        json!({
            "arrived_s": call.arrived.as_secs_f64(),
            "answered_s": call.answered.as_secs_f64(),
            "client_id": call.client_id,
            "status": call.status.map(|s| s.as_u16()),
            "retry_after": call.retry_after,
            "access_token": call.access_token,
        })
    };
    let calls: Vec<_> = provider.calls().into_iter().map(row).collect();
    json!({ "clock_s": provider.clock().as_secs_f64(), "calls": calls })
}

fn json_response(value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
