//! The loopback ceiling of the benchmark: the least an HTTP server built on the sidecar's own stack
//! (hyper 1, hyper-util's auto builder, a multi-thread tokio runtime) can do per token request. It
//! reads each request body to the end and answers `200` with the same token JSON bytes every time,
//! so `bench/run.sh` can put the sidecar's cache-hit path side by side with it in one run.
//!
//! Usage: `ceiling [ADDR] [BODY_FILE] [WORKERS]`. ADDR defaults to `127.0.0.1:0`; BODY_FILE holds
//! the token JSON to serve (a small built-in token otherwise); WORKERS sizes the runtime like the
//! sidecar's `--workers` (0, the default: one per CPU). The bound address is printed on stdout as
//! `listening on ADDR`, so a harness can bind port 0 and read the port back.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:0").parse()?;
    let body = match args.next() {
        Some(path) => Bytes::from(std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?),
        None => Bytes::from_static(DEFAULT_BODY.as_bytes()),
    };
    let workers: usize = args.next().as_deref().unwrap_or("0").parse()?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        runtime.worker_threads(workers);
    }
    runtime.enable_all().build()?.block_on(serve(addr, body))
}

async fn serve(addr: SocketAddr, body: Bytes) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;

    let builder = auto::Builder::new(TokioExecutor::new());
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
        let builder = builder.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let body = body.clone();
                async move {
                    // Read the form like the sidecar has to, then throw it away.
                    let _ = request.into_body().collect().await;
                    let mut response = Response::new(Full::new(body));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
