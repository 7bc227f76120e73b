//! Accept loops and connection settings: HTTP/1.1 and h2c on every listener, header size, count
//! and read-time limits, HTTP/2 stream and keep-alive limits, idle timeouts, a cap on open
//! connections (upgraded tunnels included) that makes room by closing the longest-idle
//! connection, or else the one that has waited longest for a request body the sidecar reads
//! (see [`awaiting_body`]), and graceful draining on shutdown.

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::body::BoxError;
use crate::config::Limits;

/// A connection's place under the listener's cap, carried by each of its requests so that an
/// upgraded tunnel keeps it after the HTTP connection is done (see the forwarder).
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSlot {
    _permit: Arc<OwnedSemaphorePermit>,
    /// How long a tunnel may carry no byte either way.
    pub(crate) tunnel_idle: Duration,
}

/// How long a connection told to close (evicted, or idle) may take to finish before it is
/// dropped.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// While draining, an idle HTTP/1.1 connection stays open this long, so a keep-alive client that
/// is about to send gets its answer (with `Connection: close`) instead of a broken pipe.
const DRAIN_IDLE_DELAY: Duration = Duration::from_secs(1);

/// While draining, a listener keeps accepting (callers told `Connection: close` come back on a
/// new connection) until it has had no open connection for this long, or `closed` fires.
const DRAIN_QUIET: Duration = Duration::from_millis(500);

/// How often a connection waiting for a place under the cap looks again for one to close.
const CAP_RECHECK: Duration = Duration::from_millis(100);

tokio::task_local! {
    /// The current request's place on its connection, for [`awaiting_body`].
    static CONNECTION: InProgress;
}

/// One open connection as the listener sees it.
#[derive(Debug)]
struct Conn {
    /// The listener's epoch, which the millisecond stamps count from.
    epoch: Instant,
    /// Requests in progress (until their response head is ready).
    active: AtomicUsize,
    /// Requests of `active` whose body the sidecar is waiting for (see [`awaiting_body`]).
    awaiting_body: AtomicUsize,
    /// Milliseconds since the epoch when the connection began waiting for a request body.
    body_since_ms: AtomicU64,
    /// Milliseconds since the listener's epoch when the last request ended, or the connection
    /// opened.
    idle_since_ms: AtomicU64,
    /// Requests served so far.
    served: AtomicU64,
    /// The connection speaks HTTP/2.
    h2: std::sync::atomic::AtomicBool,
    /// The listener's drain, as this connection's own child token of it: answers on HTTP/1.1
    /// carry `Connection: close` once it fires.
    drain: CancellationToken,
    /// Asks the connection to close; a child of `drain`, so that the connection waits on one
    /// signal for both.
    close: CancellationToken,
}

/// The open connections of one listener, for closing the longest-idle one at the cap.
#[derive(Debug)]
struct Registry {
    epoch: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn add(&self, drain: CancellationToken) -> (u64, Arc<Conn>) {
        let conn = Arc::new(Conn {
            epoch: self.epoch,
            active: AtomicUsize::new(0),
            awaiting_body: AtomicUsize::new(0),
            body_since_ms: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            served: AtomicU64::new(0),
            h2: std::sync::atomic::AtomicBool::new(false),
            close: drain.child_token(),
            drain,
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Once `stop` has fired: returns when the listener has had no open connection for
    /// [`DRAIN_QUIET`].
    async fn quiet(&self, stop: &CancellationToken) {
        stop.cancelled().await;
        let mut quiet_since = None;
        loop {
            let now = Instant::now();
            quiet_since = match (self.is_empty(), quiet_since) {
                (false, _) => None,
                (true, None) => Some(now),
                (true, Some(since)) if now >= since + DRAIN_QUIET => return,
                (true, since) => since,
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the connection idle the longest to close; false if none is idle.
    fn close_longest_idle(&self) -> bool {
        self.close_first(
            |c| c.active.load(Ordering::Relaxed) == 0,
            |c| c.idle_since_ms.load(Ordering::Relaxed),
        )
    }

    /// Asks the `eligible` connection (not already asked) with the lowest `since` to close;
    /// false if there is none.
    fn close_first(&self, eligible: impl Fn(&Conn) -> bool, since: impl Fn(&Conn) -> u64) -> bool {
        let conns = self.lock();
        let first = conns
            .values()
            .filter(|c| eligible(c) && !c.close.is_cancelled())
            .min_by_key(|c| since(c));
        match first {
            Some(conn) => {
                conn.close.cancel();
                true
            }
            None => false,
        }
    }

    /// Asks the connection that has waited longest for a request body (and is doing nothing
    /// else) to close; false if there is none.
    fn close_longest_waiting_for_body(&self) -> bool {
        self.close_first(Conn::only_awaiting_body, |c| {
            c.body_since_ms.load(Ordering::Relaxed)
        })
    }
}

/// Runs `read`, the reading of a request body the sidecar needs whole (a token request's form),
/// with the request's connection marked as waiting for it from the first time it is not there
/// yet: at the connection cap, with nothing idle to close, the connection that has waited
/// longest for its body is closed to make room, so that a slow sender cannot keep legitimate
/// callers out for the whole body read timeout. A body that is already here (the usual case)
/// marks nothing.
pub(crate) async fn awaiting_body<F: Future>(read: F) -> F::Output {
    let mut read = pin!(read);
    let mut mark: Option<BodyWait> = None;
    std::future::poll_fn(|cx| {
        let poll = read.as_mut().poll(cx);
        if poll.is_pending() && mark.is_none() {
            mark = BodyWait::start();
        }
        poll
    })
    .await
}

/// A request's wait for its body, counted on its connection until dropped.
struct BodyWait(Arc<Conn>);

impl BodyWait {
    /// `None` outside a connection's request (a unit test calling the handler directly).
    fn start() -> Option<BodyWait> {
        CONNECTION
            .try_with(|request| {
                let conn = &request.conn;
                if conn.awaiting_body.fetch_add(1, Ordering::Relaxed) == 0 {
                    conn.body_since_ms.store(conn.now_ms(), Ordering::Relaxed);
                }
                BodyWait(conn.clone())
            })
            .ok()
    }
}

impl Drop for BodyWait {
    fn drop(&mut self) {
        self.0.awaiting_body.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as in progress on its connection until dropped.
struct InProgress {
    conn: Arc<Conn>,
}

impl InProgress {
    fn start(conn: &Arc<Conn>) -> InProgress {
        conn.active.fetch_add(1, Ordering::Relaxed);
        conn.served.fetch_add(1, Ordering::Relaxed);
        InProgress { conn: conn.clone() }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.conn
            .idle_since_ms
            .store(self.conn.now_ms(), Ordering::Relaxed);
        self.conn.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(limits.max_streams)
        .max_pending_accept_reset_streams(Some(limits.max_streams as usize))
        // Dead peers are found by ping; live idle ones by the idle timeout.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Serves `listener` with `service`. Connections run on `connections`, so the caller can wait for
/// them to drain. When `stop` fires the listener drains, friendly to keep-alive clients: HTTP/1.1
/// answers carry `Connection: close`, idle HTTP/1.1 connections close after
/// [`DRAIN_IDLE_DELAY`], HTTP/2 ones get GOAWAY, and new connections are still accepted (and
/// drained the same way) until the listener has been quiet for [`DRAIN_QUIET`] or `closed` fires.
pub(crate) async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    connections: TaskTracker,
    stop: CancellationToken,
    closed: CancellationToken,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let builder = Arc::new(builder(&limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let registry = Arc::new(Registry {
        epoch: Instant::now(),
        conns: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
    });
    while let Some((stream, peer)) = accept(&listener, &registry, &stop, &closed).await {
        // Past the cap, the accepted connection waits (and the ones after it in the kernel
        // backlog) until the longest-idle connection has closed or another has ended.
        let Some(permit) = slot(&slots, &registry, &closed).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let slot = ConnectionSlot {
            _permit: Arc::new(permit),
            tunnel_idle: limits.tunnel_idle_timeout,
        };
        // A child token per connection: each polls its own signal, not one shared by every
        // connection of the process.
        let (id, conn) = registry.add(stop.child_token());
        let task = connection(ConnectionTask {
            builder: builder.clone(),
            io: TokioIo::new(stream),
            service: service.clone(),
            slot,
            conn,
            registry: registry.clone(),
            limits: limits.clone(),
        });
        let registry = registry.clone();
        connections.spawn(async move {
            if let Err(e) = task.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            registry.remove(id);
        });
    }
}

/// The next connection; `None` once the listener has drained (quiet after `stop`) or `closed`
/// fires.
async fn accept(
    listener: &TcpListener,
    registry: &Registry,
    stop: &CancellationToken,
    closed: &CancellationToken,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = registry.quiet(stop) => return None,
            () = closed.cancelled() => return None,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(e) => {
                // Out of file descriptors and the like: make room, and back off instead of
                // spinning.
                warn!(error = %e, "accept failed");
                registry.close_longest_idle();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A place under the cap: at once if there is one; otherwise once a connection ends, after
/// closing the longest-idle connection or, with none idle, the one that has waited longest for a
/// request body; looked for again every [`CAP_RECHECK`] while every connection is busy. `None`
/// when `stop` (the listener closing) fires first.
async fn slot(
    slots: &Arc<Semaphore>,
    registry: &Registry,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    let acquire = slots.clone().acquire_owned();
    let mut acquire = pin!(acquire);
    loop {
        if registry.close_longest_idle() {
            debug!("connection cap reached: closing the longest-idle connection");
        } else if registry.close_longest_waiting_for_body() {
            debug!("connection cap reached: closing the connection waiting longest for a body");
        }
        tokio::select! {
            // Nothing closes the semaphore; if something did, the listener would stop as on
            // `stop`.
            permit = acquire.as_mut() => return permit.ok(),
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(CAP_RECHECK) => {}
        }
    }
}

/// Everything one connection's task owns.
struct ConnectionTask<S> {
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: TokioIo<tokio::net::TcpStream>,
    service: S,
    slot: ConnectionSlot,
    conn: Arc<Conn>,
    registry: Arc<Registry>,
    limits: Limits,
}

/// Serves one connection until it ends, closing it when it has been idle too long, when the
/// listener needs its place, or when the listener drains.
async fn connection<S, B>(task: ConnectionTask<S>) -> Result<(), BoxError>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let ConnectionTask {
        builder,
        io,
        service,
        slot,
        conn,
        registry,
        limits,
    } = task;
    let service = tracked(service, slot, &conn);
    let connection = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    let mut connection = pin!(connection);
    let mut closing: Option<Instant> = None;
    loop {
        let check_at = conn.check_at(&registry, &limits, closing);
        tokio::select! {
            biased;
            served = connection.as_mut() => return served,
            // Cancelled by the drain too (a child of it): one signal to wait on.
            () = conn.close.cancelled(), if closing.is_none() => {
                if conn.drain.is_cancelled() {
                    // The app's shutdown grace bounds what follows. A connection accepted while
                    // draining has sent nothing yet either: it gets the same moment.
                    if !conn.h2.load(Ordering::Relaxed) {
                        // Answers now carry `Connection: close`; an idle connection gets a
                        // moment for the request its client may be sending.
                        tokio::select! {
                            served = connection.as_mut() => return served,
                            () = tokio::time::sleep(DRAIN_IDLE_DELAY) => {}
                        }
                    }
                    if conn.never_served() {
                        // Still nothing sent: nothing to finish, and no reason to hold the drain.
                        return Ok(());
                    }
                    connection.as_mut().graceful_shutdown();
                    return connection.await;
                }
                // Nothing to finish: nothing sent yet, or a body that is not coming.
                if conn.never_served() || conn.only_awaiting_body() {
                    return Ok(());
                }
                connection.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            () = tokio::time::sleep_until(check_at) => match conn.on_timer(&registry, &limits, closing) {
                Timer::Drop => return Ok(()),
                Timer::Close => {
                    connection.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                Timer::Wait => {}
            },
        }
    }
}

/// `service` with each request counted on its connection (in progress until its response body
/// is done) and run knowing its connection (for [`awaiting_body`]), HTTP/2 noted, the slot handed to a request that may become a tunnel, and
/// `Connection: close` on HTTP/1.1 answers once the listener drains.
fn tracked<S, B>(
    service: S,
    slot: ConnectionSlot,
    conn: &Arc<Conn>,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<
        impl http_body::Body<Data = bytes::Bytes, Error = B::Error> + Send + 'static,
    >,
    Error = Infallible,
    Future = impl Future + Send + 'static,
> + Clone
+ Send
+ 'static
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
{
    let conn = conn.clone();
    tower::service_fn(move |mut request: Request<Incoming>| {
        let in_progress = InProgress::start(&conn);
        let http1 = request.version() < http::Version::HTTP_2;
        if !http1 {
            conn.h2.store(true, Ordering::Relaxed);
        }
        // Only a request that may become a tunnel needs to carry the slot (an extension costs an
        // allocation per request on the hit path).
        if request.headers().contains_key(http::header::UPGRADE) {
            request.extensions_mut().insert(slot.clone());
        }
        let mut service = service.clone();
        async move {
            let call = tower::Service::call(&mut service, request);
            let mut call = pin!(CONNECTION.scope(in_progress, call));
            let mut response = call.as_mut().await;
            let in_progress = call.as_mut().take_value();
            // Draining: tell a keep-alive client to come back on a new connection.
            if http1
                && in_progress
                    .as_ref()
                    .is_some_and(|p| p.conn.drain.is_cancelled())
                && let Ok(response) = &mut response
            {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            // In progress until the body is done: a streaming answer is not idle. The wrapper
            // must pass on the body's size: without it hyper frames an answer of known length
            // (a hit, an error) as chunked, or as close-delimited to an HTTP/1.0 caller.
            response.map(|response| {
                response.map(|body| {
                    http_body_util::BodyExt::inspect_frame(body, move |_| {
                        let _in_progress = &in_progress;
                    })
                })
            })
        }
    })
}

/// What a connection's timer found.
enum Timer {
    /// Told to close and still not done, or idle without ever sending a request: drop it.
    Drop,
    /// Idle past its limit: close it gracefully.
    Close,
    /// Not due yet.
    Wait,
}

impl Conn {
    /// Milliseconds since the listener's epoch.
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn never_served(&self) -> bool {
        self.served.load(Ordering::Relaxed) == 0
    }

    /// Every request in progress is waiting for its body.
    fn only_awaiting_body(&self) -> bool {
        let waiting = self.awaiting_body.load(Ordering::Relaxed);
        waiting > 0 && waiting == self.active.load(Ordering::Relaxed)
    }

    /// How long the connection may sit without a request: a connection that never sent one
    /// gets the header read timeout, a keep-alive one the idle timeout.
    fn idle_limit(&self, limits: &Limits) -> Duration {
        if self.never_served() {
            limits.header_read_timeout
        } else {
            limits.idle_timeout
        }
    }

    fn idle_since(&self, registry: &Registry) -> Instant {
        registry.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed))
    }

    /// When the timer should next look at the connection.
    fn check_at(&self, registry: &Registry, limits: &Limits, closing: Option<Instant>) -> Instant {
        let idle_limit = self.idle_limit(limits);
        match closing {
            Some(at) => at + CLOSE_BOUND,
            None if self.active.load(Ordering::Relaxed) > 0 => Instant::now() + idle_limit,
            None => self.idle_since(registry) + idle_limit,
        }
    }

    /// What to do when the timer fires.
    fn on_timer(&self, registry: &Registry, limits: &Limits, closing: Option<Instant>) -> Timer {
        if closing.is_some() {
            return Timer::Drop;
        }
        let idle = self.active.load(Ordering::Relaxed) == 0;
        if !idle || self.idle_since(registry) + self.idle_limit(limits) > Instant::now() {
            return Timer::Wait;
        }
        if self.never_served() {
            // Never sent a request: nothing to finish.
            Timer::Drop
        } else {
            Timer::Close
        }
    }
}
