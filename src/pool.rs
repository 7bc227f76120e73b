//! Keep-alive HTTP/1.1 connections to one provider. A request takes the connection that went idle
//! last (the one most likely still open), or opens one; the connection goes back to the pool when
//! its response body has been read to the end, and is closed when the body is dropped before that,
//! when it answered `101` (an upgrade owns it from then on), or when it has been idle for the
//! pool's idle timeout. A request that a reused connection closed under before writing it is sent
//! once more, on a new connection (hyper-util's pooled client retries such requests too).
//!
//! hyper's own connection API and a mutex-guarded last-in first-out list: per request, no hash of
//! the host, no spawned task to watch for the connection's return, no boxed connect future (what
//! hyper-util's legacy client spends on every call; bench/floor.rs shows the difference).

use bytes::Bytes;
use http::uri::Uri;
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Instant;
use tower::Service;

use crate::body::{Body, BoxError};

/// A connection that waits for its next request.
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    /// The provider's scheme and authority: what the connector dials.
    target: Uri,
    idle: Mutex<Vec<Idle>>,
    idle_timeout: Duration,
    /// Most bytes read ahead from the provider per connection.
    read_buffer: usize,
    /// Whether the task that closes connections idle too long runs.
    reaping: std::sync::atomic::AtomicBool,
}

/// The connections to one provider.
#[derive(Clone)]
pub(crate) struct Pool(Arc<Inner>);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.0.target)
            .field("idle_timeout", &self.0.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// Why a request got no response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// Connecting (TCP or TLS) failed.
    Connect(BoxError),
    /// The exchange on an open connection failed.
    Exchange(hyper::Error),
}

impl SendError {
    /// The error as a chain, for [`crate::upstream`]'s one-line description.
    pub(crate) fn source_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            SendError::Connect(e) => e.as_ref(),
            SendError::Exchange(e) => e,
        }
    }
}

impl Pool {
    /// A pool dialling `target` (scheme and authority) with `connector`.
    pub(crate) fn new(
        connector: HttpsConnector<HttpConnector>,
        target: Uri,
        idle_timeout: Duration,
        read_buffer: usize,
    ) -> Pool {
        Pool(Arc::new(Inner {
            connector,
            target,
            idle: Mutex::new(Vec::new()),
            idle_timeout,
            read_buffer,
            reaping: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Sends `request` and waits for the response head. Its URI is written as it is: origin form
    /// (path and query) is the caller's to make.
    pub(crate) async fn send(
        &self,
        mut request: Request<Body>,
    ) -> Result<Response<PooledBody>, SendError> {
        let mut reuse = true;
        loop {
            let idle = if reuse { self.checkout().await } else { None };
            let (mut sender, reused) = match idle {
                Some(sender) => (sender, true),
                // Boxed: connecting (TLS included) is rare, and its state inline would make
                // every request's future (moved into place on each) kilobytes larger.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.returning(sender, response)),
                Err(mut failed) => match failed.take_message() {
                    // The connection closed before the request was written: a new one gets it.
                    Some(unsent) if reused => (request, reuse) = (unsent, false),
                    _ => return Err(SendError::Exchange(failed.into_error())),
                },
            }
        }
    }

    /// The idle connection used last, ready for a request; `None` when there is none.
    async fn checkout(&self) -> Option<SendRequest<Body>> {
        loop {
            let idle = self
                .0
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()?;
            if idle.since.elapsed() >= self.0.idle_timeout || idle.sender.is_closed() {
                continue;
            }
            let mut sender = idle.sender;
            // Usually ready at once; a connection put back as its body ended may still be
            // finishing that response.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Opens a connection and runs it on a task of its own.
    async fn connect(&self) -> Result<SendRequest<Body>, SendError> {
        self.reap_idle();
        let mut connector = self.0.connector.clone();
        let io = tower::ServiceExt::ready(&mut connector)
            .await
            .map_err(SendError::Connect)?
            .call(self.0.target.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(self.0.read_buffer)
            .handshake(io)
            .await
            .map_err(SendError::Exchange)?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }

    /// The response, its body handing the connection back once read to the end.
    fn returning(
        &self,
        sender: SendRequest<Body>,
        response: Response<Incoming>,
    ) -> Response<PooledBody> {
        // An upgraded connection is the tunnel's.
        let back = (response.status() != StatusCode::SWITCHING_PROTOCOLS)
            .then(|| (sender, Arc::downgrade(&self.0)));
        response.map(|body| PooledBody {
            body,
            back,
            ended: false,
        })
    }

    /// Starts, once, the task that closes connections idle past the timeout (every quarter of
    /// it); the task ends with the pool.
    fn reap_idle(&self) {
        use std::sync::atomic::Ordering;
        if self.0.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(&self.0);
        let every = (self.0.idle_timeout / 4).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let timeout = pool.idle_timeout;
                pool.idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|idle| idle.since.elapsed() < timeout && !idle.sender.is_closed());
            }
        });
    }
}

impl Inner {
    /// Keeps a connection whose answer has been read for the next request. One still busy (an
    /// answer that came before the request body was all sent, which hyper keeps sending) joins
    /// the idle list only once it is ready, so no request waits behind an upload.
    fn put_back(self: Arc<Self>, mut sender: SendRequest<Body>) {
        if sender.is_closed() || self.idle_timeout.is_zero() {
            return;
        }
        if sender.is_ready() {
            self.push(sender);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (pool, timeout) = (Arc::downgrade(&self), self.idle_timeout);
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(timeout, sender.ready()).await
                && let Some(pool) = pool.upgrade()
            {
                pool.push(sender);
            }
        });
    }

    fn push(&self, sender: SendRequest<Body>) {
        let idle = Idle {
            sender,
            since: Instant::now(),
        };
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(idle);
    }
}

/// A provider's response body; its connection goes back to the pool when it has been read to the
/// end (and is closed if it is dropped before).
pub(crate) struct PooledBody {
    body: Incoming,
    back: Option<(SendRequest<Body>, Weak<Inner>)>,
    ended: bool,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    fn end(&mut self) {
        self.ended = true;
        if let Some((sender, pool)) = self.back.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.put_back(sender);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.end(),
            // A chunked body's trailers are its last frame; hyper does not poll for more.
            Some(Ok(frame)) if frame.is_trailers() || self.body.is_end_stream() => self.end(),
            Some(Ok(_)) => {}
            // A broken body: the connection is not reused.
            Some(Err(_)) => self.back = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing in it may never be polled.
        if !self.ended && self.body.is_end_stream() {
            self.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A listener on a free loopback port, and the provider URI that reaches it.
    async fn listen() -> (TcpListener, Uri) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}/", listener.local_addr().unwrap());
        (listener, uri.parse().unwrap())
    }

    /// A provider on loopback answering `hello` to everything and counting the connections it
    /// accepted; with `keep_alive` false it closes each connection after one answer.
    async fn provider(keep_alive: bool) -> (Uri, Arc<AtomicUsize>) {
        let (listener, uri) = listen().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    // Answers at once, and reads the request body on after answering, as a
                    // server that refuses an upload early does.
                    let service = hyper::service::service_fn(|request: Request<Incoming>| {
                        tokio::spawn(request.into_body().collect());
                        async {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"hello"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (uri, accepted)
    }

    fn pool(target: Uri, idle_timeout: Duration) -> Pool {
        let connector =
            crate::upstream::connector(&crate::config::ClientConfig::default(), false).unwrap();
        Pool::new(connector, target, idle_timeout, 64 * 1024)
    }

    fn get(uri: &Uri) -> Request<Body> {
        Request::builder()
            .uri("/x")
            .header(http::header::HOST, uri.authority().unwrap().as_str())
            .body(crate::body::empty())
            .unwrap()
    }

    async fn read(pool: &Pool, uri: &Uri) -> Bytes {
        let response = pool.send(get(uri)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap().to_bytes()
    }

    fn idle(pool: &Pool) -> usize {
        pool.0.idle.lock().unwrap().len()
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_is_used_again() {
        let (uri, accepted) = provider(true).await;
        let pool = pool(uri.clone(), Duration::from_secs(90));
        for _ in 0..20 {
            assert_eq!(read(&pool, &uri).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle(&pool), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_that_all_come_back() {
        let (uri, accepted) = provider(true).await;
        let pool = pool(uri.clone(), Duration::from_secs(90));
        for _ in 0..3 {
            let calls: Vec<_> = (0..10)
                .map(|_| {
                    let (pool, uri) = (pool.clone(), uri.clone());
                    tokio::spawn(async move { read(&pool, &uri).await })
                })
                .collect();
            for call in calls {
                assert_eq!(call.await.unwrap(), "hello");
            }
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=10).contains(&opened),
            "{opened} connections for 10 at a time"
        );
        assert_eq!(idle(&pool), opened, "every connection is back");
    }

    #[tokio::test]
    async fn a_body_dropped_unread_closes_its_connection() {
        let (uri, accepted) = provider(true).await;
        let pool = pool(uri.clone(), Duration::from_secs(90));
        let response = pool.send(get(&uri)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drop(response);
        assert_eq!(idle(&pool), 0);
        assert_eq!(read(&pool, &uri).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_provider_closed_is_not_used() {
        let (uri, accepted) = provider(false).await;
        let pool = pool(uri.clone(), Duration::from_secs(90));
        for _ in 0..5 {
            assert_eq!(read(&pool, &uri).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (uri, accepted) = provider(true).await;
        let pool = pool(uri.clone(), Duration::from_millis(200));
        assert_eq!(read(&pool, &uri).await, "hello");
        assert_eq!(idle(&pool), 1);
        // The reaper runs every 100 ms here: the connection is gone within a few of its rounds.
        let deadline = Instant::now() + Duration::from_secs(5);
        while idle(&pool) > 0 {
            assert!(
                Instant::now() < deadline,
                "the idle connection was never closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(read(&pool, &uri).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_still_sending_its_request_body_waits_before_it_is_reused() {
        let (uri, accepted) = provider(true).await;
        let pool = pool(uri.clone(), Duration::from_secs(90));
        // An upload that never ends, answered before the provider reads it.
        let endless = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, BoxError>,
        >());
        let upload = Request::post("/upload")
            .header(http::header::HOST, uri.authority().unwrap().as_str())
            .body(http_body_util::BodyExt::boxed_unsync(endless))
            .unwrap();
        let early = pool.send(upload).await.unwrap();
        assert_eq!(
            early.into_body().collect().await.unwrap().to_bytes(),
            "hello"
        );
        assert_eq!(idle(&pool), 0, "busy sending: not idle");
        // The next request does not queue behind the upload (it would wait for ever).
        let next = tokio::time::timeout(Duration::from_secs(5), read(&pool, &uri)).await;
        assert_eq!(next.expect("not stuck behind the upload"), "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_chunked_answer_with_trailers_gives_its_connection_back() {
        let (listener, uri) = listen().await;
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|_request: Request<Incoming>| async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-checksum", http::HeaderValue::from_static("1"));
                let frames = futures_util::stream::iter([
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"hi"))),
                    Ok(Frame::trailers(trailers)),
                ]);
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::StreamBody::new(
                    frames,
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        let pool = pool(uri.clone(), Duration::from_secs(90));
        let mut request = get(&uri);
        request
            .headers_mut()
            .insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        let mut body = pool.send(request).await.unwrap().into_body();
        // Read as hyper's server does: up to the trailers, and not once more.
        while let Some(frame) = body.frame().await {
            if frame.unwrap().is_trailers() {
                break;
            }
        }
        drop(body);
        assert_eq!(idle(&pool), 1, "the connection is back");
    }

    #[tokio::test]
    async fn a_provider_that_is_down_is_a_connect_error() {
        let (listener, uri) = listen().await;
        drop(listener);
        let error = pool(uri.clone(), Duration::from_secs(90))
            .send(get(&uri))
            .await
            .unwrap_err();
        assert!(matches!(error, SendError::Connect(_)), "{error:?}");
    }
}
