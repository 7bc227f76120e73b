//! A fake OAuth 2.0 identity provider and small hyper client helpers shared by the integration
//! tests.
//!
//! [`FakeProvider`] serves plain HTTP or HTTPS on `127.0.0.1:0`. Token calls (POSTs to any path
//! ending in `/token`) are answered according to scripted [`Behavior`]s; refresh-token grants get
//! single-use rotation; a handful of utility endpoints (`/echo`, `/bytes/<N>`, `/upload`, `/ws`,
//! `/status/<code>`) exercise the generic proxy paths. One API endpoint stands in for a resource
//! server: a `GET` on any path ending in `/api/v2/users/me` answers a fake user to a bearer token
//! the provider issued (or one issued by a provider whose tokens it accepts, see
//! [`FakeProvider::accept_tokens_of`]) and 401 otherwise. Dropping the provider stops its accept
//! loop and every connection it is serving.
//!
//! [`Fixture`] is the setup most tests start with: a provider, a sidecar in front of it and a
//! client. [`oauth`] holds assertions on token-endpoint answers, [`tls`] the HTTPS side.
//!
//! Every integration test binary compiles this module on its own and uses a different part of
//! it, so the parts some binaries leave unused carry a `dead_code` allowance of their own.

#[allow(dead_code, reason = "for the binaries that test the token path")]
pub mod oauth;
#[allow(
    dead_code,
    reason = "for the binaries that run the sidecar as a process"
)]
pub mod process;
#[allow(dead_code, reason = "for the binaries that test the fleet tier")]
pub mod redis;
#[allow(
    dead_code,
    reason = "each test binary drives a different part; support_selftest none"
)]
pub mod sidecar;
#[allow(dead_code, reason = "for the binaries that test HTTPS")]
pub mod tls;

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use sidecar::Sidecar;

/// Response body type of the fake provider.
type Body = BoxBody<Bytes, Infallible>;

/// Upper bound on accepted connections per provider (keeps the accept loop bounded).
const MAX_ACCEPTS: usize = 10_000_000;
/// Bound on one TLS handshake with the provider.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on frames handled by one WebSocket echo session.
const MAX_WS_FRAMES: usize = 1_000_000;
/// Upper bound on body frames consumed by `/upload`.
const MAX_UPLOAD_FRAMES: usize = 100_000_000;
/// Chunk size for `/bytes/<N>`.
const CHUNK: usize = 64 * 1024;
/// How long [`Behavior::Hang`] waits before giving up.
const HANG: Duration = Duration::from_secs(60);
/// Bound on every helper client call.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Process-wide counter for `tok-<n>` access tokens, so every token ever issued is distinct.
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
/// Process-wide counter for `rt-<m>` refresh tokens.
static NEXT_REFRESH: AtomicU64 = AtomicU64::new(1);

/// What the provider does with the next token call (anything but `grant_type=refresh_token`).
#[allow(dead_code, reason = "each test binary scripts different behaviours")]
#[derive(Clone, Debug)]
pub enum Behavior {
    /// 200 `{"access_token":"tok-<n>","token_type":"bearer","expires_in":<expires_in>}` plus
    /// `"scope"` when the request carried one; `n` is a process-wide counter. Sent after `delay`.
    Token { expires_in: i64, delay: Duration },
    /// 200 with exactly this JSON body.
    Json(String),
    /// This status, an optional `Retry-After` value (verbatim) and this JSON body, after `delay`.
    Status {
        status: u16,
        retry_after: Option<String>,
        body: String,
        delay: Duration,
    },
    /// 200 with `content-type: application/json` and a body that is not JSON.
    Garbage,
    /// Read the request, then close the connection without any response.
    Drop,
    /// Never answer (sleeps 60 s, then closes the connection without a response).
    Hang,
}

impl Behavior {
    /// A token that expires in `expires_in` seconds, answered immediately.
    pub fn token(expires_in: i64) -> Self {
        Behavior::Token {
            expires_in,
            delay: Duration::ZERO,
        }
    }

    /// A token that expires in `expires_in` seconds, answered after `delay`.
    #[allow(dead_code, reason = "each test binary scripts different behaviours")]
    pub fn slow_token(expires_in: i64, delay: Duration) -> Self {
        Behavior::Token { expires_in, delay }
    }

    /// An error status with an OAuth error body chosen from the status: 429/503 ->
    /// `temporarily_unavailable`, 401 -> `invalid_client`, 400 -> `invalid_request`, else
    /// `server_error`.
    #[allow(dead_code, reason = "each test binary scripts different behaviours")]
    pub fn status(status: u16, retry_after: Option<&str>) -> Self {
        let error = match status {
            429 | 503 => "temporarily_unavailable",
            401 => "invalid_client",
            400 => "invalid_request",
            _ => "server_error",
        };
        Behavior::Status {
            status,
            retry_after: retry_after.map(str::to_owned),
            body: serde_json::json!({ "error": error }).to_string(),
            delay: Duration::ZERO,
        }
    }
}

/// One request as the provider saw it.
#[allow(dead_code, reason = "each test binary reads different fields")]
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    /// The request body; empty for `/upload` (streamed, never held) and `/ws`.
    pub body: Bytes,
}

struct Inner {
    recorded: Vec<Recorded>,
    default: Behavior,
    queue: VecDeque<Behavior>,
    clients: Vec<(String, String)>,
    /// Registered refresh tokens; `true` once used.
    refresh_tokens: HashMap<String, bool>,
    refresh_delay: Duration,
    /// Token calls allowed per whole second of the provider's clock (every call counts, rejected
    /// ones too, as at a real provider); past it, 429 with `Retry-After: 1`. `None`: no limit.
    rate_limit: Option<usize>,
    /// The second the count is for, and the count.
    rate_window: (u64, usize),
    /// Calls answered 429 by the rate limit.
    throttled: usize,
    /// Access tokens the API endpoint accepts: every one this provider issued, in a set that
    /// [`FakeProvider::accept_tokens_of`] can share with another provider. One entry per token
    /// issued, so bounded by the calls a test makes.
    issued: Arc<Mutex<HashSet<String>>>,
}

struct State {
    requests: AtomicUsize,
    token_calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    inner: Mutex<Inner>,
    shutdown: watch::Receiver<bool>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not wedge every other assertion.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts a token call as in progress until dropped (also on cancellation).
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(state: &'a State) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A fake identity provider listening on `127.0.0.1:<ephemeral>`. Dropping it stops the server.
pub struct FakeProvider {
    addr: SocketAddr,
    tls: bool,
    state: Arc<State>,
    shutdown: watch::Sender<bool>,
    accept_task: AbortHandle,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.accept_task.abort();
    }
}

impl FakeProvider {
    /// Starts a plain-HTTP provider on `127.0.0.1:0`.
    pub async fn start() -> FakeProvider {
        Self::spawn_on(None, 0).await
    }

    async fn spawn_on(tls: Option<Arc<rustls::ServerConfig>>, port: u16) -> FakeProvider {
        let socket = TcpSocket::new_v4().expect("fake provider: socket");
        socket
            .set_reuseaddr(true)
            .expect("fake provider: reuseaddr");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .expect("fake provider: bind 127.0.0.1");
        let listener = socket.listen(4096).expect("fake provider: listen");
        let addr = listener.local_addr().expect("fake provider: local_addr");
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = Arc::new(State {
            requests: AtomicUsize::new(0),
            token_calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                recorded: Vec::new(),
                default: Behavior::token(3600),
                queue: VecDeque::new(),
                clients: Vec::new(),
                refresh_tokens: HashMap::new(),
                refresh_delay: Duration::ZERO,
                rate_limit: None,
                rate_window: (0, 0),
                throttled: 0,
                issued: Arc::default(),
            }),
            shutdown: shutdown_rx,
        });
        let is_tls = tls.is_some();
        let accept_task = tokio::spawn(accept_loop(listener, state.clone(), tls)).abort_handle();
        FakeProvider {
            addr,
            tls: is_tls,
            state,
            shutdown,
            accept_task,
        }
    }

    /// `http://127.0.0.1:PORT` (or `https://` for a TLS provider), without a trailing slash.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

/// Scripting and inspection: each test binary uses the few it needs.
#[allow(dead_code, reason = "each test binary uses a different part")]
impl FakeProvider {
    /// Starts a plain-HTTP provider on a given loopback port (for "down, then up" tests).
    pub async fn start_on(port: u16) -> FakeProvider {
        Self::spawn_on(None, port).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// POSTs received on any path ending in `/token` (including rejected and refresh calls).
    pub fn token_calls(&self) -> usize {
        self.state.token_calls.load(Ordering::SeqCst)
    }

    /// Every request received (counted when its head arrives).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Every request received, in arrival order (appended once its body has been read).
    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.lock().recorded.clone()
    }

    /// Behaviour for token calls from now on, once the one-shot queue is empty.
    pub fn set_default(&self, b: Behavior) {
        self.state.lock().default = b;
    }

    /// Queues a one-shot behaviour; queued behaviours are consumed FIFO before the default.
    pub fn push(&self, b: Behavior) {
        self.state.lock().queue.push_back(b);
    }

    /// If non-empty, token calls must authenticate as one of these `(client_id, client_secret)`
    /// pairs (HTTP Basic per RFC 6749 2.3.1, or `client_id`/`client_secret` in the form body);
    /// anything else answers 401 `{"error":"invalid_client"}`. An empty slice disables the check.
    pub fn set_clients(&self, clients: &[(&str, &str)]) {
        self.state.lock().clients = clients
            .iter()
            .map(|(id, secret)| ((*id).to_owned(), (*secret).to_owned()))
            .collect();
    }

    /// Highest number of token calls (including refresh calls) in progress at once.
    pub fn max_concurrent_token_calls(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Registers and returns a fresh, valid, unused refresh token `rt-<m>`.
    pub fn issue_refresh_token(&self) -> String {
        let token = format!("rt-{}", NEXT_REFRESH.fetch_add(1, Ordering::SeqCst));
        self.state
            .lock()
            .refresh_tokens
            .insert(token.clone(), false);
        token
    }

    /// Delay applied to every refresh-token call before the token is checked.
    /// Allows at most `calls` token calls per second, like a throttling provider.
    #[allow(dead_code, reason = "each test binary scripts different behaviours")]
    pub fn set_rate_limit(&self, calls: usize) {
        self.state.lock().rate_limit = Some(calls);
    }

    /// Token calls the rate limit answered with 429.
    #[allow(dead_code, reason = "each test binary scripts different behaviours")]
    pub fn throttled(&self) -> usize {
        self.state.lock().throttled
    }

    pub fn set_refresh_delay(&self, delay: Duration) {
        self.state.lock().refresh_delay = delay;
    }

    /// Makes this provider's API endpoint accept the access tokens `issuer` issues, as an API
    /// host accepts the login host's tokens: from now on both use `issuer`'s issued-token set
    /// (tokens this provider issued before are forgotten).
    pub fn accept_tokens_of(&self, issuer: &FakeProvider) {
        let issued = issuer.state.lock().issued.clone();
        self.state.lock().issued = issued;
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let mut connections = JoinSet::new();
    let mut accepted = 0usize;
    while accepted < MAX_ACCEPTS {
        tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            res = listener.accept() => {
                let Ok((tcp, _)) = res else {
                    // Transient accept errors (e.g. EMFILE): back off briefly.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                accepted += 1;
                let _ = tcp.set_nodelay(true);
                connections.spawn(serve_tcp(tcp, state.clone(), tls.clone()));
            }
        }
    }
}

async fn serve_tcp(tcp: TcpStream, state: Arc<State>, tls: Option<Arc<rustls::ServerConfig>>) {
    match tls {
        None => serve_io(TokioIo::new(tcp), state).await,
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            // A failed or stalled handshake (an untrusted or missing client certificate) just
            // ends the connection; rustls has sent its alert.
            if let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                serve_io(TokioIo::new(stream), state).await;
            }
        }
    }
}

async fn serve_io<I>(io: TokioIo<I>, state: Arc<State>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(state.clone(), req));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let _ = builder.serve_connection_with_upgrades(io, service).await;
}

/// The error returned by the service to make hyper close the connection without a response.
fn drop_connection() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "fake provider: dropping connection",
    )
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let method = req.method().clone();

    if path.starts_with("/echo") {
        let (parts, body) = req.into_parts();
        let body = collect(body).await?;
        record(&state, &parts, body.clone());
        return Ok(echo(&parts, &body));
    }
    if path.ends_with("/token") && method == Method::POST {
        return handle_token(&state, req).await;
    }
    if method == Method::GET && path.ends_with("/api/v2/users/me") {
        let (parts, body) = req.into_parts();
        let body = collect(body).await?;
        record(&state, &parts, body);
        return Ok(users_me(&state, &parts.headers));
    }
    if let (&Method::GET, Some(n)) = (&method, path.strip_prefix("/bytes/")) {
        let (parts, _) = req.into_parts();
        record(&state, &parts, Bytes::new());
        return Ok(match n.parse::<u64>() {
            Ok(n) => Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(BoxBody::new(PatternBody {
                    remaining: n,
                    sent: 0,
                }))
                .expect("valid response"),
            Err(_) => empty(StatusCode::BAD_REQUEST),
        });
    }
    if method == Method::POST && path == "/upload" {
        return upload(&state, req).await;
    }
    if method == Method::GET && path == "/ws" {
        return Ok(websocket(&state, req));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let (parts, body) = req.into_parts();
        let body = collect(body).await?;
        record(&state, &parts, body);
        return Ok(
            match code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Some(status) => empty(status),
                None => empty(StatusCode::BAD_REQUEST),
            },
        );
    }
    let (parts, body) = req.into_parts();
    let body = collect(body).await?;
    record(&state, &parts, body);
    Ok(empty(StatusCode::NOT_FOUND))
}

async fn collect(body: Incoming) -> Result<Bytes, io::Error> {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(io::Error::other)
}

fn record(state: &State, parts: &http::request::Parts, body: Bytes) {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| parts.uri.path().to_owned());
    state.lock().recorded.push(Recorded {
        method: parts.method.clone(),
        path_and_query,
        headers: parts.headers.clone(),
        body,
    });
}

fn full(bytes: impl Into<Bytes>) -> Body {
    BoxBody::new(Full::new(bytes.into()))
}

fn empty(status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(full(Bytes::new()))
        .expect("valid response")
}

/// Like a provider behind a CDN: a token answer is gzipped when the request accepts gzip.
fn maybe_gzip(request: &HeaderMap, plain: Response<Body>, text: String) -> Response<Body> {
    let accepts_gzip = request
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("gzip"));
    if !accepts_gzip {
        return plain;
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(text.as_bytes())
        .expect("gzip into memory");
    let (mut parts, _) = plain.into_parts();
    parts
        .headers
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    Response::from_parts(parts, full(encoder.finish().expect("gzip into memory")))
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("valid response")
}

fn oauth_error(status: StatusCode, error: &str) -> Response<Body> {
    json_response(status, serde_json::json!({ "error": error }).to_string())
}

async fn handle_token(state: &State, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    state.token_calls.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight::enter(state);
    let (parts, body) = req.into_parts();
    let body = collect(body).await?;
    record(state, &parts, body.clone());
    let form = parse_form(&body);

    if over_rate_limit(state) {
        let mut resp = oauth_error(StatusCode::TOO_MANY_REQUESTS, "temporarily_unavailable");
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(resp);
    }
    if !client_ok(state, &parts.headers, &form) {
        let mut resp = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"fake-provider\""),
        );
        return Ok(resp);
    }

    if form_get(&form, "grant_type") == Some("refresh_token") {
        return Ok(refresh(state, &form).await);
    }

    let behavior = {
        let mut inner = state.lock();
        match inner.queue.pop_front() {
            Some(b) => b,
            None => inner.default.clone(),
        }
    };
    match behavior {
        Behavior::Token { expires_in, delay } => {
            tokio::time::sleep(delay).await;
            let mut body = serde_json::json!({
                "access_token": issue_access_token(state),
                "token_type": "bearer",
                "expires_in": expires_in,
            });
            if let Some(scope) = form_get(&form, "scope") {
                body["scope"] = serde_json::Value::from(scope);
            }
            Ok(maybe_gzip(
                &parts.headers,
                json_response(StatusCode::OK, body.to_string()),
                body.to_string(),
            ))
        }
        Behavior::Json(body) => Ok(json_response(StatusCode::OK, body)),
        Behavior::Status {
            status,
            retry_after,
            body,
            delay,
        } => {
            tokio::time::sleep(delay).await;
            let status = StatusCode::from_u16(status).expect("Behavior::Status: invalid status");
            let mut resp = json_response(status, body);
            if let Some(value) = retry_after {
                resp.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_str(&value).expect("Behavior::Status: invalid Retry-After"),
                );
            }
            Ok(resp)
        }
        Behavior::Garbage => Ok(json_response(
            StatusCode::OK,
            "<html>this is not json {\"access_token\":",
        )),
        Behavior::Drop => Err(drop_connection()),
        Behavior::Hang => {
            tokio::time::sleep(HANG).await;
            Err(drop_connection())
        }
    }
}

async fn refresh(state: &State, form: &[(String, String)]) -> Response<Body> {
    let delay = state.lock().refresh_delay;
    tokio::time::sleep(delay).await;
    let presented = form_get(form, "refresh_token").unwrap_or_default();
    let new_rt = {
        let mut inner = state.lock();
        match inner.refresh_tokens.get_mut(presented) {
            Some(used) if !*used => {
                *used = true;
                let rt = format!("rt-{}", NEXT_REFRESH.fetch_add(1, Ordering::SeqCst));
                inner.refresh_tokens.insert(rt.clone(), false);
                Some(rt)
            }
            _ => None,
        }
    };
    match new_rt {
        Some(rt) => {
            let body = serde_json::json!({
                "access_token": issue_access_token(state),
                "token_type": "bearer",
                "expires_in": 3600,
                "refresh_token": rt,
            });
            json_response(StatusCode::OK, body.to_string())
        }
        None => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
    }
}

/// A fresh `tok-<n>` access token, remembered for the API endpoint.
fn issue_access_token(state: &State) -> String {
    let token = format!("tok-{}", NEXT_TOKEN.fetch_add(1, Ordering::SeqCst));
    // Clone the set's handle first: the two locks are never held together.
    let issued = state.lock().issued.clone();
    lock_set(&issued).insert(token.clone());
    token
}

fn lock_set(set: &Mutex<HashSet<String>>) -> MutexGuard<'_, HashSet<String>> {
    set.lock().unwrap_or_else(|e| e.into_inner())
}

/// The API endpoint: 200 with a fake user for `Authorization: Bearer <an issued token>`, else a
/// 401 in Genesys Cloud's error shape.
fn users_me(state: &State, headers: &HeaderMap) -> Response<Body> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let issued = state.lock().issued.clone();
    let known = bearer.is_some_and(|token| lock_set(&issued).contains(token));
    if known {
        let body = serde_json::json!({"id": "fake-user", "name": "Fake User", "state": "active"});
        json_response(StatusCode::OK, body.to_string())
    } else {
        let body =
            serde_json::json!({"message": "bad token", "code": "bad.credentials", "status": 401});
        json_response(StatusCode::UNAUTHORIZED, body.to_string())
    }
}

/// Whether the call authenticates as a configured client (always true when none is configured).
/// HTTP Basic wins over form parameters when both are present.
/// Counts a call against the rate limit; true if it is over.
fn over_rate_limit(state: &State) -> bool {
    let mut inner = state.lock();
    let Some(limit) = inner.rate_limit else {
        return false;
    };
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if inner.rate_window.0 != second {
        inner.rate_window = (second, 0);
    }
    inner.rate_window.1 += 1;
    let over = inner.rate_window.1 > limit;
    if over {
        inner.throttled += 1;
    }
    over
}

fn client_ok(state: &State, headers: &HeaderMap, form: &[(String, String)]) -> bool {
    let clients = state.lock().clients.clone();
    if clients.is_empty() {
        return true;
    }
    let presented = match headers.get(header::AUTHORIZATION) {
        Some(value) => parse_basic(value),
        None => form_get(form, "client_id").map(|id| {
            (
                id.to_owned(),
                form_get(form, "client_secret")
                    .unwrap_or_default()
                    .to_owned(),
            )
        }),
    };
    match presented {
        Some((id, secret)) => clients.iter().any(|(i, s)| *i == id && *s == secret),
        None => false,
    }
}

/// Decodes `Basic base64(form_encode(id) ":" form_encode(secret))`.
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = BASE64.decode(rest.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id), form_decode(secret)))
}

/// Parses an `application/x-www-form-urlencoded` body into ordered pairs.
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

fn form_get<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// `application/x-www-form-urlencoded` decoding of one name or value (`+` is a space).
fn form_decode(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Bytes left as-is by `application/x-www-form-urlencoded` (besides alphanumerics).
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b' ');

/// `application/x-www-form-urlencoded` encoding of one name or value (space becomes `+`).
pub fn form_encode(s: &str) -> String {
    utf8_percent_encode(s, FORM).to_string().replace(' ', "+")
}

fn echo(parts: &http::request::Parts, body: &[u8]) -> Response<Body> {
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_owned(), serde_json::Value::from(joined));
    }
    let body = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": body.len(),
    });
    let mut resp = json_response(StatusCode::OK, body.to_string());
    resp.headers_mut()
        .insert("x-echo", HeaderValue::from_static("1"));
    resp
}

/// A body of `remaining` bytes cycling `a..=z`, produced in 64 KiB chunks on demand.
struct PatternBody {
    remaining: u64,
    sent: u64,
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = self.remaining.min(CHUNK as u64);
        let start = self.sent;
        let chunk: Vec<u8> = (start..start + len)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        self.remaining -= len;
        self.sent += len;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

async fn upload(state: &State, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let (parts, mut body) = req.into_parts();
    let mut total: u64 = 0;
    for _ in 0..MAX_UPLOAD_FRAMES {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    total += data.len() as u64;
                }
            }
            Some(Err(e)) => return Err(io::Error::other(e)),
        }
    }
    record(state, &parts, Bytes::new());
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(total.to_string()))
        .expect("valid response"))
}

fn websocket(state: &State, req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if !is_upgrade {
        return empty(StatusCode::BAD_REQUEST);
    }
    let accept = derive_accept_key(key.as_bytes());
    let (parts, body) = req.into_parts();
    record(state, &parts, Bytes::new());
    // The pending upgrade lives in the extensions, which from_parts keeps.
    let req = Request::from_parts(parts, body);
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let echo = async {
            for _ in 0..MAX_WS_FRAMES {
                let Some(Ok(msg)) = ws.next().await else {
                    break;
                };
                let reply = match msg {
                    Message::Text(_) | Message::Binary(_) => msg,
                    Message::Close(_) => break,
                    // Pings are answered by tungstenite itself.
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            () = echo => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(full(Bytes::new()))
        .expect("valid response")
}

// ---------------------------------------------------------------------------------------------
// Client helpers
// ---------------------------------------------------------------------------------------------

/// The plain-HTTP test client.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// A buffered response.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the status and body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The first value of this header, if present (lossy UTF-8).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1 client whose pool keeps up to 2048 idle connections per host.
pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2048)
        .build_http()
}

/// `Basic` credentials per RFC 6749 2.3.1: form-urlencode id and secret, join with `:`, base64.
pub fn basic_auth(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        BASE64.encode(format!("{}:{}", form_encode(id), form_encode(secret)))
    )
}

/// POSTs `form` (already urlencoded) as `application/x-www-form-urlencoded`, with RFC 6749 2.3.1
/// Basic credentials when `basic` is given. Panics on transport error or after 30 s.
pub async fn post_form<C>(
    client: &hyper_util::client::legacy::Client<C, Full<Bytes>>,
    url: &str,
    form: &str,
    basic: Option<(&str, &str)>,
) -> Reply
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        builder = builder.header(header::AUTHORIZATION, basic_auth(id, secret));
    }
    let req = builder
        .body(Full::new(Bytes::from(form.to_owned())))
        .unwrap_or_else(|e| panic!("post_form: bad request for {url}: {e}"));
    send(client, req).await
}

/// Sends `req` and buffers the response. Panics on transport error or after 30 s.
pub async fn send<C>(
    client: &hyper_util::client::legacy::Client<C, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let what = format!("{} {}", req.method(), req.uri());
    let call = async {
        let resp = client
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: transport error: {e:?}"));
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{what}: error reading response body: {e:?}"))
            .to_bytes();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(CLIENT_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no complete response within {CLIENT_TIMEOUT:?}"))
}

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// The setup most tests start with: a fake provider, a one-route sidecar in front of it, and a
/// keep-alive client. Script `idp` at any time: the sidecar calls it only when asked for a token.
#[allow(dead_code, reason = "support_selftest tests the provider alone")]
pub struct Fixture {
    /// Declared first so that it is dropped first: the sidecar stops before its provider.
    pub sidecar: Sidecar,
    pub idp: FakeProvider,
    pub client: Client,
}

#[allow(dead_code, reason = "support_selftest tests the provider alone")]
impl Fixture {
    /// A provider with default behaviour and a sidecar for it configured by `toml` (see
    /// [`sidecar::config`]; `""` for the defaults).
    pub async fn start(toml: &str) -> Fixture {
        let idp = FakeProvider::start().await;
        let sidecar = Sidecar::start_with(sidecar::config(&idp.url(), toml)).await;
        Fixture {
            sidecar,
            idp,
            client: client(),
        }
    }

    /// POSTs `form` (already urlencoded) to the sidecar's token endpoint, without Basic
    /// credentials. Panics on transport error or after 30 s.
    pub async fn post_token(&self, form: &str) -> Reply {
        post_form(&self.client, &self.sidecar.token_url(), form, None).await
    }
}
