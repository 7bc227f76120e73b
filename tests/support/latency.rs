//! A bad network between a test and a server: [`TcpProxy`] listens on a free loopback port,
//! forwards every connection to one target address, and lets the test change the link while
//! connections are open: add latency, stall it, lose bytes, or cut it. The fleet tier's tests put
//! it between pods and Redis to see what a slow, partitioned or corrupting network does.
//!
//! Each direction of a connection is a delay line: a reader stamps every chunk with the instant it
//! may arrive (read time plus the latency then set) and queues it; a writer delivers the chunks in
//! order once their instant has passed and the link is not stalled. Bytes read at `t` arrive at
//! `t + latency`, however many chunks are in flight, so latency does not throttle throughput.
//! The proxy runs on the test's tokio runtime; dropping it stops its accept loop and resets every
//! connection it holds.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bound on connecting to the target for one accepted connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the chunks in flight in one direction; a full line stops reading (backpressure).
const LINE_CHUNKS: usize = 256;
/// Bound on one chunk: one read from a socket.
const CHUNK_BYTES: usize = 16 * 1024;

/// A TCP proxy on `127.0.0.1:<free port>` in front of one target, with live controls shared by
/// all its connections. Dropping it stops it.
pub struct TcpProxy {
    addr: SocketAddr,
    link: Arc<Link>,
    /// Cancels the accept loop and, through their child tokens, every connection.
    stop: CancellationToken,
}

/// The link's state, read by every connection's delay lines.
struct Link {
    /// Added to each chunk's arrival, in both directions; read when the chunk is read.
    latency: Mutex<Duration>,
    /// While true, nothing is delivered either way; the chunks wait in their lines.
    stalled: watch::Sender<bool>,
    /// Bytes still to discard from the target towards the client.
    to_drop: Mutex<u64>,
    /// The open connections' cut signal (a child of `stop`), replaced by a fresh one at each cut
    /// so that connections opened afterwards are not cut.
    cut: Mutex<CancellationToken>,
}

/// Which way a delay line carries bytes; only the target's replies lose bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    ToTarget,
    ToClient,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TcpProxy {
    /// Starts a proxy to `target` on a free loopback port, accepting at once.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("tcp proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("tcp proxy: local_addr");
        let stop = CancellationToken::new();
        let link = Arc::new(Link {
            latency: Mutex::new(Duration::ZERO),
            stalled: watch::Sender::new(false),
            to_drop: Mutex::new(0),
            cut: Mutex::new(stop.child_token()),
        });
        tokio::spawn(accept(listener, target, link.clone(), stop.clone()));
        TcpProxy { addr, link, stop }
    }

    /// The proxy's address, to give to the client instead of the target's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `redis://127.0.0.1:<port>/0`: a Redis URL through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Delays every chunk read from now on, both ways, by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        *self.link.latency.lock().unwrap() = latency;
    }

    /// Stalls (true) or releases (false) the link: while stalled, bytes are kept, not delivered.
    pub fn stall(&self, stalled: bool) {
        self.link.stalled.send_replace(stalled);
    }

    /// Discards the next `n` bytes from the target to the client (added to any still pending).
    pub fn drop_bytes(&self, n: u64) {
        *self.link.to_drop.lock().unwrap() += n;
    }

    /// Resets every open connection at once, as a partition does; new ones are accepted.
    pub fn cut(&self) {
        let fresh = self.stop.child_token();
        let old = std::mem::replace(&mut *self.link.cut.lock().unwrap(), fresh);
        old.cancel();
    }
}

impl Link {
    fn latency(&self) -> Duration {
        *self.latency.lock().unwrap()
    }

    /// How many of the next `n` bytes from the target to discard.
    fn take_dropped(&self, n: usize) -> usize {
        let mut to_drop = self.to_drop.lock().unwrap();
        let taken = (*to_drop).min(n as u64);
        *to_drop -= taken;
        taken as usize
    }

    /// Waits until a chunk due at `due` may be delivered: due, and the link not stalled.
    async fn pass(&self, due: Instant) {
        let mut stalled = self.stalled.subscribe();
        loop {
            let _ = stalled.wait_for(|stalled| !*stalled).await;
            tokio::time::sleep_until(due).await;
            if !*stalled.borrow() {
                return;
            }
        }
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    link: Arc<Link>,
    stop: CancellationToken,
) {
    loop {
        let client = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
        };
        let cut = link.cut.lock().unwrap().clone();
        tokio::spawn(connection(client, target, link.clone(), cut));
    }
}

/// One client connection: connects to the target and runs both delay lines until both ends are
/// closed, or resets both sockets when cut.
async fn connection(
    client: TcpStream,
    target: SocketAddr,
    link: Arc<Link>,
    cut: CancellationToken,
) {
    let upstream = tokio::select! {
        _ = cut.cancelled() => return,
        upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)) => {
            match upstream {
                Ok(Ok(upstream)) => upstream,
                _ => return,
            }
        }
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut target_read, mut target_write) = upstream.into_split();
    let lines = async {
        tokio::join!(
            delay_line(&mut client_read, &mut target_write, &link, Way::ToTarget),
            delay_line(&mut target_read, &mut client_write, &link, Way::ToClient),
        )
    };
    let was_cut = tokio::select! {
        _ = cut.cancelled() => true,
        _ = lines => false,
    };
    if was_cut {
        // A reset, not a polite FIN: the peers see what a partition looks like.
        for (read, write) in [(client_read, client_write), (target_read, target_write)] {
            if let Ok(stream) = read.reunite(write) {
                let _ = stream.set_zero_linger();
            }
        }
    }
}

/// Carries bytes one way until `from` ends, delivering each chunk at its read time plus the
/// latency (in order, not while stalled), then half-closes `to`.
async fn delay_line(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf, link: &Link, way: Way) {
    let (queue, mut line) = mpsc::channel::<(Instant, Bytes)>(LINE_CHUNKS);
    let read = async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due = Instant::now() + link.latency();
            let skip = if way == Way::ToClient {
                link.take_dropped(n)
            } else {
                0
            };
            if skip < n
                && queue
                    .send((due, Bytes::copy_from_slice(&buf[skip..n])))
                    .await
                    .is_err()
            {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = line.recv().await {
            link.pass(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
