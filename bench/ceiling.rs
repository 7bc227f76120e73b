//! The loopback ceiling of the benchmark: the least an HTTP server built on the sidecar's own stack
//! (hyper 1 on tokio) can do per request. It reads each request body to the end and answers `200`
//! with the same bytes every time, so `bench/run.sh` can put the sidecar's cache-hit path side by
//! side with it in one run; the pass-through scenario uses it as the upstream.
//!
//! Usage: `ceiling [ADDR] [BODY_FILE] [WORKERS] [PROTOCOL]`. ADDR defaults to `127.0.0.1:0`;
//! BODY_FILE holds the bytes to serve (a small built-in token JSON otherwise, or when it is `-`);
//! WORKERS sizes the runtime like the sidecar's `--workers`: 1 is a current-thread runtime, N a
//! multi-thread one with N workers, 0 (the default) one worker per CPU. PROTOCOL is `http1` (the
//! default: hyper's plain HTTP/1.1 connection, the physical limit of the stack) or `auto`
//! (hyper-util's auto builder, sniffing HTTP/1.1 and h2c on each connection, as the sidecar's
//! listeners do). The bound address is printed on stdout as `listening on ADDR`, so a harness can
//! bind port 0 and read the port back.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use tokio::net::TcpListener;

const DEFAULT_BODY: &str =
    r#"{"access_token":"ceiling-token","token_type":"Bearer","expires_in":3600}"#;

/// How each connection is served.
#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    Auto,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:0").parse()?;
    let body = match args.next().filter(|path| path != "-") {
        Some(path) => Bytes::from(std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?),
        None => Bytes::from_static(DEFAULT_BODY.as_bytes()),
    };
    let workers: usize = args.next().as_deref().unwrap_or("0").parse()?;
    let protocol = match args.next().as_deref().unwrap_or("http1") {
        "http1" => Protocol::Http1,
        "auto" => Protocol::Auto,
        other => return Err(format!("PROTOCOL is http1 or auto, not {other:?}").into()),
    };
    // The sidecar's own rule (src/main.rs): one worker runs on a current-thread runtime.
    let mut runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        runtime.worker_threads(workers);
    }
    runtime
        .enable_all()
        .build()?
        .block_on(serve(addr, body, protocol))
}

async fn serve(
    addr: SocketAddr,
    body: Bytes,
    protocol: Protocol,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;

    let auto = auto::Builder::new(TokioExecutor::new());
    let http1 = http1::Builder::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors under a storm: pause instead of spinning, then keep serving.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        // The sidecar sets TCP_NODELAY on every client connection; so does the ceiling.
        let _ = stream.set_nodelay(true);
        let (auto, http1) = (auto.clone(), http1.clone());
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let body = body.clone();
                async move {
                    // Read the body like the sidecar has to, then throw it away.
                    let _ = request.into_body().collect().await;
                    let mut response = Response::new(Full::new(body));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(response)
                }
            });
            let io = TokioIo::new(stream);
            match protocol {
                Protocol::Http1 => drop(http1.serve_connection(io, service).await),
                Protocol::Auto => drop(auto.serve_connection(io, service).await),
            }
        });
    }
}
