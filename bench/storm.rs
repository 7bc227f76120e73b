//! The cold storm's client for the benchmark: N connections opened first (not timed), then one
//! token request for the same key handed to every connection at once, and every answer awaited.
//! It prints one JSON object: the times, connection failures, and one `[latency_ms, status,
//! cache_status]` row per request (`status` null when the request failed); `bench/bench.py`
//! turns them into figures.
//!
//! Why not wrk: wrk writes each connection's request as soon as that connection opens, keeps
//! every connection busy until its duration ends, and its main thread sleeps through the whole
//! duration; the storm needs all connections open before the first request and exactly one
//! request on each. This is the sidecar's own HTTP stack (hyper's HTTP/1 client), so the bench
//! parses no HTTP of its own.
//!
//! Usage: `storm --target HOST:PORT [-n N] [--key K] [--timeout S]`.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{SendRequest, handshake};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

/// Connections opened at once while the storm gathers; more would overflow the accept queue.
const CONNECT_BATCH: usize = 500;

#[derive(Parser, Debug)]
#[command(about = "One cold token request on each of N connections, all at once")]
struct Args {
    /// The server to storm (a loopback address).
    #[arg(long)]
    target: SocketAddr,
    /// Connections, and so requests.
    #[arg(short, default_value_t = 10_000)]
    n: usize,
    /// The credential set asked for: client id `svc-K`.
    #[arg(long, default_value_t = 0)]
    key: u32,
    /// Longest wait for the connections, and then for the answers, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one request came to: (latency from the storm's start, status, `Cache-Status`).
type Row = (Option<f64>, Option<u16>, Option<String>);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(storm(args))
}

async fn storm(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let limit = Duration::from_secs(args.timeout);
    let opened = Instant::now();
    let mut senders = Vec::with_capacity(args.n);
    let mut connect_failures = 0usize;
    for first in (0..args.n).step_by(CONNECT_BATCH) {
        let mut batch = JoinSet::new();
        for _ in first..args.n.min(first + CONNECT_BATCH) {
            batch.spawn(timeout(limit, connect(args.target)));
        }
        while let Some(connected) = batch.join_next().await {
            match connected {
                Ok(Ok(Ok(sender))) => senders.push(sender),
                _ => connect_failures += 1,
            }
        }
    }
    let connect_s = opened.elapsed().as_secs_f64();

    let body = Bytes::from(format!(
        "grant_type=client_credentials&client_id=svc-{0}&client_secret=secret-{0}&scope=read",
        args.key
    ));
    let start = Instant::now();
    let mut requests = JoinSet::new();
    for sender in senders {
        let request = Request::post("/oauth/token")
            .header(header::HOST, args.target.to_string())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(body.clone()))?;
        requests.spawn(timeout(limit, one(sender, request, start)));
    }
    // Every request task was queued before any ran: this is when the last was handed over.
    let mut send_s = 0f64;
    let mut rows: Vec<Row> = Vec::with_capacity(args.n);
    while let Some(done) = requests.join_next().await {
        match done {
            Ok(Ok((handed, row))) => {
                send_s = send_s.max(handed);
                rows.push(row);
            }
            _ => rows.push((None, None, None)),
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    let summary = json!({
        "requests": args.n,
        "connect_s": connect_s,
        "connect_failures": connect_failures,
        "send_s": send_s,
        "wall_s": wall_s,
        "rows": rows,
    });
    println!("{summary}");
    Ok(())
}

/// One HTTP/1.1 connection, its driver spawned.
async fn connect(target: SocketAddr) -> Result<SendRequest<Full<Bytes>>, BoxError> {
    let tcp = TcpStream::connect(target).await?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends `request` and reads its whole answer; (when it was handed over, the row), in seconds
/// from `start`.
async fn one(
    mut sender: SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
    start: Instant,
) -> (f64, Row) {
    let handed = start.elapsed().as_secs_f64();
    let Ok(response) = sender.send_request(request).await else {
        return (handed, (None, None, None));
    };
    let status = response.status().as_u16();
    let cache_status = response
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if response.into_body().collect().await.is_err() {
        return (handed, (None, Some(status), cache_status));
    }
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    (handed, (Some(latency_ms), Some(status), cache_status))
}
