//! Connections held open for the memory figures of the pass-through path, both ends in one
//! binary on the sidecar's own stack (hyper 1), so the bench parses no HTTP of its own.
//!
//! - `hold serve ADDR`: an upstream whose every answer is `200` with a body that never ends: 64
//!   bytes at once, then 64 more every second, until the caller goes. Prints `listening on ADDR`.
//! - `hold connect TARGET N PATH`: opens N connections to TARGET, sends `GET PATH` on each, reads
//!   every response head, then keeps reading each body as it comes (a body that ends leaves its
//!   connection open and idle). Prints `held N` once every head has arrived (or `failed K` on
//!   stderr for those that did not, within 30 s), then holds everything until stdin closes.

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::io::Write;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", addr] => runtime.block_on(serve(addr)),
        ["connect", target, n, path] => runtime.block_on(connect(target, n.parse()?, path)),
        _ => Err("usage: hold serve ADDR | hold connect TARGET N PATH".into()),
    }
}

async fn serve(addr: &str) -> Result<(), BoxError> {
    let listener = TcpListener::bind(addr).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request: Request<Incoming>| async {
                let ticks = futures_util::stream::unfold(true, |first| async move {
                    if !first {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    let chunk = Frame::data(Bytes::from_static(&[b'x'; 64]));
                    Some((Ok::<_, Infallible>(chunk), false))
                });
                let mut response = Response::new(StreamBody::new(ticks));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/octet-stream"),
                );
                Ok::<_, Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn connect(target: &str, n: usize, path: &str) -> Result<(), BoxError> {
    let (heads, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..n {
        let (target, path, heads) = (target.to_owned(), path.to_owned(), heads.clone());
        tokio::spawn(async move {
            // An error before the head is a failure; after it, the connection just ends.
            if hold_one(&target, &path, &heads).await.is_err() {
                let _ = heads.send(false);
            }
        });
        // Gathered in steps, so the listener's accept queue never overflows.
        tokio::task::yield_now().await;
    }
    let (mut ok, mut failed) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ok + failed < n {
        match tokio::time::timeout_at(deadline, arrived.recv()).await {
            Ok(Some(true)) => ok += 1,
            Ok(Some(false)) => failed += 1,
            _ => break,
        }
    }
    if ok < n {
        eprintln!("failed {}", n - ok);
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "held {ok}")?;
    stdout.flush()?;
    // Hold until the harness closes stdin.
    let mut sink = Vec::new();
    tokio::io::stdin().read_to_end(&mut sink).await?;
    Ok(())
}

/// One connection, one request; the head reported on `heads`, the body read as it comes.
async fn hold_one(
    target: &str,
    path: &str,
    heads: &tokio::sync::mpsc::UnboundedSender<bool>,
) -> Result<(), BoxError> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, target)
        .body(Empty::new())?;
    let mut response = sender.send_request(request).await?;
    let _ = heads.send(response.status().is_success());
    while let Some(Ok(_)) = response.body_mut().frame().await {}
    // The body ended: the connection stays open and idle, the sender with it.
    std::future::pending::<()>().await;
    drop(sender);
    Ok(())
}
