//! A TCP proxy that delays every byte by a fixed time in each direction, for the fleet's cold
//! path: Redis behind it is as far away as one in another zone. Bytes keep their order and
//! nothing limits the throughput; each direction's chunks are written when their time comes.
//!
//! Usage: `delay LISTEN UPSTREAM MS`: listens on LISTEN (`127.0.0.1:0` for any port), connects
//! each accepted connection to UPSTREAM (`host:port`) and adds MS milliseconds each way. The
//! bound address is printed on stdout as `listening on ADDR`.

use std::io::Write;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), Some(ms)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: delay LISTEN UPSTREAM MS".into());
    };
    let delay = Duration::from_millis(ms.parse()?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(listen, upstream, delay))
}

async fn serve(listen: String, upstream: String, delay: Duration) -> Result<(), BoxError> {
    let listener = TcpListener::bind(listen).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                pump(client_read, server_write, delay),
                pump(server_read, client_write, delay)
            );
        });
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read; closes `to` after `from` ends.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0
                || chunks
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
