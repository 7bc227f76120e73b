//! Upgraded connections (WebSocket) spliced byte for byte between caller and provider, closed
//! when either side closes or when neither sends a byte for the idle timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// How a tunnel ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// A side closed, and the other was told.
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
}

const BUFFER: usize = 16 * 1024;

/// Copies `a` to `b` and `b` to `a` until both directions end, or until no byte has moved for
/// `idle`.
pub(crate) async fn splice<A, B>(a: A, b: B, idle: Duration) -> std::io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let both = async {
        tokio::try_join!(
            pump(&mut a_read, &mut b_write, &last, started),
            pump(&mut b_read, &mut a_write, &last, started),
        )
    };
    let watch = async {
        loop {
            let moved = started + Duration::from_millis(last.load(Ordering::Relaxed));
            if moved + idle <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(moved + idle).await;
        }
    };
    tokio::select! {
        done = both => done.map(|_| Ended::Closed),
        () = watch => Ok(Ended::Idle),
    }
}

/// One direction: copies until end of stream, then shuts the writer down.
async fn pump<R, W>(
    read: &mut R,
    write: &mut W,
    last: &AtomicU64,
    started: Instant,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = read.read(&mut buffer).await?;
        if n == 0 {
            return write.shutdown().await;
        }
        write.write_all(&buffer[..n]).await?;
        write.flush().await?;
        last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bytes_flow_both_ways_and_an_idle_tunnel_is_closed() {
        let (caller, near) = tokio::io::duplex(1024);
        let (far, provider) = tokio::io::duplex(1024);
        let tunnel = tokio::spawn(splice(near, far, Duration::from_secs(10)));
        let (mut caller, mut provider) = (caller, provider);
        caller.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        provider.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        provider.write_all(b"pong").await.unwrap();
        caller.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!tunnel.is_finished(), "traffic resets the idle clock");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(tunnel.await.unwrap().unwrap(), Ended::Idle);
    }

    #[tokio::test]
    async fn a_side_that_closes_ends_the_tunnel() {
        let (caller, near) = tokio::io::duplex(1024);
        let (far, provider) = tokio::io::duplex(1024);
        let tunnel = tokio::spawn(splice(near, far, Duration::from_secs(60)));
        drop(caller);
        drop(provider);
        assert_eq!(tunnel.await.unwrap().unwrap(), Ended::Closed);
    }
}
