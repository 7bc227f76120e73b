//! The pass-through floor of the benchmark: the least an HTTP/1.1 proxy built on the sidecar's own
//! stack (hyper 1 on tokio) can do per request. Each caller connection gets one upstream connection
//! of its own, opened when the caller connects (no pool, no routing, no header rewriting beyond
//! the request target, no timeouts): what is left is hyper's server and client connections and
//! tokio's scheduling. `bench/run.sh`'s pass-through scenario runs it beside the sidecar and nginx,
//! so the distance between the sidecar and the stack's physical limit is measured in the same run.
//!
//! Usage: `floor ADDR UPSTREAM`: listens on ADDR (`127.0.0.1:0` for any port), forwards to
//! UPSTREAM (`host:port`, plain HTTP/1.1), on a current-thread runtime like the sidecar's default.
//! The bound address is printed on stdout as `listening on ADDR`.

use http::Uri;
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::io::Write;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let upstream = args.next().ok_or("usage: floor ADDR UPSTREAM")?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(addr, upstream))
}

async fn serve(addr: String, upstream: String) -> Result<(), BoxError> {
    let listener = TcpListener::bind(addr).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy(stream, upstream).await {
                eprintln!("floor: {e}");
            }
        });
    }
}

/// Serves one caller connection over an upstream connection of its own.
async fn proxy(stream: TcpStream, upstream: String) -> Result<(), BoxError> {
    let to = TcpStream::connect(upstream).await?;
    to.set_nodelay(true)?;
    let (sender, connection) = client::handshake::<_, Incoming>(TokioIo::new(to)).await?;
    tokio::spawn(connection);
    // HTTP/1.1 requests on a connection come one at a time: the lock is never contended.
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |mut request: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            if let Some(target) = request.uri().path_and_query().cloned() {
                *request.uri_mut() = Uri::from(target);
            }
            let mut sender = sender.lock().await;
            sender.ready().await?;
            let response: Response<Incoming> = sender.send_request(request).await?;
            Ok::<_, hyper::Error>(response)
        }
    });
    server::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await?;
    Ok(())
}
