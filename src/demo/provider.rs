//! The project's identity provider: an OAuth 2.0 token endpoint and one API endpoint on loopback,
//! scripted and counted. It is the provider `token-sidecar demo` runs and the one the integration
//! tests serve (`tests/support` wraps it), so the demo and the tests cannot drift apart.
//!
//! A token call (a `POST` on any path ending in `/token`) goes through the steps a real provider
//! takes: the call's latency, a rate limit per second answered `429` with `Retry-After` (after
//! the latency, or before it when it stands for a gateway's),
//! the client's credentials (HTTP Basic per RFC 6749 §2.3.1, or in the form), then a single-use
//! refresh-token rotation for `grant_type=refresh_token` and the next scripted [`Answer`] for any
//! other grant (one-shot answers first, then a default). A `GET` on a path ending in
//! `/api/v2/users/me` stands in for a resource server: it accepts the bearer tokens this provider
//! issued, or those of a provider whose tokens it accepts. Everything is counted ([`Counts`]) and,
//! up to a bound, recorded ([`Recorded`]); token calls can also be logged with their times, client
//! id, status and token ([`Call`], in [`calls`]).
//!
//! The demo's throttling provider is one configuration of it ([`Behaviour`]). The tests' utility
//! endpoints (echo, downloads, uploads, WebSocket) and HTTPS need dev-only crates, so they live in
//! `tests/support`, which serves them around [`Provider::answer`]. The benchmark's provider
//! (`bench/provider.rs`) is another configuration: real-sized tokens, a call log, and a seeded
//! mix of faults ([`mix`]).

mod api;
mod assertion;
mod calls;
mod form;
mod limit;
mod mix;

pub use calls::Call;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header, request};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use form::{form_get, parse_form, presented};

/// The demo client's credentials.
pub const CLIENT_ID: &str = "demo-app";
/// The demo client's secret (a demo: printed on purpose).
pub const CLIENT_SECRET: &str = "demo-secret";

/// Most access tokens remembered for the API endpoint; past it the set starts again.
const MAX_ISSUED: usize = 10_000;
/// Requests kept for [`Provider::recorded`] until [`Provider::set_record_limit`] says otherwise.
const DEFAULT_RECORD_LIMIT: usize = 100_000;
/// Most connections one provider accepts (keeps the accept loop bounded).
const MAX_ACCEPTS: usize = 10_000_000;
/// Largest request body read; a bigger one closes the connection without an answer.
const MAX_BODY: usize = 1 << 20;
/// How long [`Answer::Hang`] holds a call before closing the connection without an answer.
const HANG: Duration = Duration::from_secs(60);
/// The `expires_in` of a rotated refresh grant's access token.
const REFRESHED_LIFETIME: i64 = 3600;

/// `tok-<n>` for access tokens: process-wide, so that no two providers of a process (a test's
/// login and API hosts) ever issue the same token.
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
/// `rt-<m>` for refresh tokens, process-wide for the same reason.
static NEXT_REFRESH: AtomicU64 = AtomicU64::new(1);

/// How the demo's provider behaves: one configuration of [`Provider`] (see [`Behaviour::apply`]).
#[derive(Debug, Clone, Copy)]
pub struct Behaviour {
    /// Token calls answered per whole second; the rest get 429.
    pub calls_per_second: u64,
    /// `expires_in` of every token.
    pub lifetime: Duration,
    /// Time taken per token call.
    pub latency: Duration,
}

impl Behaviour {
    /// Configures `provider` as the demo's: this latency and rate limit, tokens of this lifetime,
    /// only the demo client, and nothing recorded (a herd makes tens of thousands of calls).
    pub fn apply(&self, provider: &Provider) {
        provider.set_latency(self.latency);
        provider.set_rate_limit(self.calls_per_second);
        let lifetime = i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX);
        provider.set_default(Answer::token(lifetime));
        provider.set_clients(&[(CLIENT_ID, CLIENT_SECRET)]);
        provider.set_record_limit(0);
    }
}

/// What the provider answers a token call (any grant but `refresh_token`).
#[derive(Clone, Debug)]
pub enum Answer {
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

impl Answer {
    /// A token that expires in `expires_in` seconds, answered immediately.
    pub fn token(expires_in: i64) -> Answer {
        Answer::Token {
            expires_in,
            delay: Duration::ZERO,
        }
    }

    /// A token that expires in `expires_in` seconds, answered after `delay`.
    pub fn slow_token(expires_in: i64, delay: Duration) -> Answer {
        Answer::Token { expires_in, delay }
    }

    /// An error status with an OAuth error body chosen from the status: 429/503 ->
    /// `temporarily_unavailable`, 401 -> `invalid_client`, 400 -> `invalid_request`, else
    /// `server_error`.
    pub fn status(status: u16, retry_after: Option<&str>) -> Answer {
        let error = match status {
            429 | 503 => "temporarily_unavailable",
            401 => "invalid_client",
            400 => "invalid_request",
            _ => "server_error",
        };
        Answer::Status {
            status,
            retry_after: retry_after.map(str::to_owned),
            body: serde_json::json!({ "error": error }).to_string(),
            delay: Duration::ZERO,
        }
    }
}

/// Set on the response of an [`Answer::Token`], for a layer that treats issued tokens apart (the
/// tests gzip them when the request accepts it, as a provider behind a CDN does).
#[derive(Clone, Copy, Debug)]
pub struct Issued;

/// One request as the provider saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    /// The request body; empty where a layer streams it (the tests' `/upload`, `/ws`).
    pub body: Bytes,
}

/// What the provider answered, so far.
#[derive(Debug, Default)]
pub struct Counts {
    /// Token calls, answered or throttled (refresh grants and rejected calls included).
    pub calls: AtomicU64,
    /// Access tokens issued.
    pub issued: AtomicU64,
    /// Token calls the rate limit answered 429.
    pub throttled: AtomicU64,
    /// Every request, counted when its head arrives.
    pub requests: AtomicU64,
    /// Token calls in progress now.
    pub in_progress: AtomicU64,
    /// The most token calls in progress at once.
    pub most_in_progress: AtomicU64,
}

impl Counts {
    /// (calls, issued, throttled) now.
    pub fn read(&self) -> (u64, u64, u64) {
        (
            self.calls.load(Ordering::SeqCst),
            self.issued.load(Ordering::SeqCst),
            self.throttled.load(Ordering::SeqCst),
        )
    }
}

/// Counts a token call as in progress until dropped (also when the call is cancelled).
struct InProgress<'a>(&'a Counts);

impl<'a> InProgress<'a> {
    fn enter(counts: &'a Counts) -> InProgress<'a> {
        let now = counts.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
        counts.most_in_progress.fetch_max(now, Ordering::SeqCst);
        InProgress(counts)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the provider has been told to do, and what it remembers.
#[derive(Debug)]
struct Script {
    /// Time every token call takes before anything is decided (but by a gateway's rate limit).
    latency: Duration,
    /// Token calls allowed per second; past it, 429 with `Retry-After: 1`. `None`: no limit.
    rate_limit: Option<limit::RateLimit>,
    /// The `(client_id, client_secret)` pairs a token call must present; empty: anyone.
    clients: Vec<(String, String)>,
    /// The answer to other credentials; `None`: 401 `invalid_client`.
    rejection: Option<Answer>,
    /// Checks signed client assertions, when set.
    assertions: Option<assertion::AssertionCheck>,
    /// One-shot answers, consumed first in, first out before `default`; bounded by the script.
    queue: VecDeque<Answer>,
    default: Answer,
    /// Registered refresh tokens, `true` once used; one entry per token registered or rotated.
    refresh_tokens: HashMap<String, bool>,
    /// Time a refresh grant takes before its token is checked.
    refresh_delay: Duration,
    /// Requests in arrival order, at most `record_limit` of them.
    recorded: Vec<Recorded>,
    record_limit: usize,
    /// Access tokens the API endpoint accepts, bounded by [`MAX_ISSUED`]; a set that
    /// [`Provider::accept_tokens_of`] can share with another provider.
    issued: Arc<Mutex<HashSet<String>>>,
    /// Smallest access token issued: `tok-<n>` is padded with `x` up to it (0: no padding).
    token_bytes: usize,
    /// Answers drawn at random before `default`, once the one-shot queue is empty.
    mix: Option<mix::Mix>,
    /// Token calls as answered, up to the log's bound (none by default).
    calls: calls::CallLog,
}

#[derive(Debug)]
struct State {
    script: Mutex<Script>,
    /// The start of the provider's clock, for the rate limit's seconds.
    epoch: Instant,
}

/// A provider on a loopback address: scripted, counted, and served until its stop token fires.
/// Cheap to clone; every clone is the same provider.
#[derive(Clone, Debug)]
pub struct Provider {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    state: Arc<State>,
}

/// Locks one of the provider's mutexes; a panicking test thread must not wedge the others.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Provider {
    /// Starts the demo's provider on a free loopback port; it runs until `stop`.
    pub async fn start(behaviour: Behaviour, stop: CancellationToken) -> io::Result<Provider> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let provider = Provider::new(listener.local_addr()?);
        behaviour.apply(&provider);
        provider.accept(listener, stop, |provider, tcp| {
            provider.serve_connection(tcp)
        });
        Ok(provider)
    }

    /// A provider for a listener bound at `addr`, not serving yet (see [`Provider::accept`]). It
    /// starts as the tests expect: no latency, no rate limit, anyone may call, tokens of an hour,
    /// and the first 100,000 requests recorded.
    pub fn new(addr: SocketAddr) -> Provider {
        let script = Script {
            latency: Duration::ZERO,
            rate_limit: None,
            clients: Vec::new(),
            rejection: None,
            assertions: None,
            queue: VecDeque::new(),
            default: Answer::token(3600),
            refresh_tokens: HashMap::new(),
            refresh_delay: Duration::ZERO,
            recorded: Vec::new(),
            record_limit: DEFAULT_RECORD_LIMIT,
            issued: Arc::default(),
            token_bytes: 0,
            mix: None,
            calls: calls::CallLog::default(),
        };
        Provider {
            addr,
            counts: Arc::default(),
            state: Arc::new(State {
                script: Mutex::new(script),
                epoch: Instant::now(),
            }),
        }
    }

    /// Accepts connections on `listener` until `stop`, each served by `serve` (which may wrap the
    /// connection, in TLS say, and answer some paths itself). `stop` also ends every connection.
    pub fn accept<S, F>(&self, listener: TcpListener, stop: CancellationToken, serve: S)
    where
        S: Fn(Provider, TcpStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let provider = self.clone();
        tokio::spawn(async move {
            // Dropped on return, which aborts every connection still open.
            let mut connections = JoinSet::new();
            let mut accepted = 0usize;
            while accepted < MAX_ACCEPTS {
                tokio::select! {
                    () = stop.cancelled() => return,
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    result = listener.accept() => match result {
                        Ok((tcp, _)) => {
                            accepted += 1;
                            let _ = tcp.set_nodelay(true);
                            connections.spawn(serve(provider.clone(), tcp));
                        }
                        // Transient accept errors (EMFILE, say): back off briefly.
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    },
                }
            }
        });
    }

    /// Serves one accepted connection (HTTP/1.1 or h2) with [`Provider::answer`].
    pub async fn serve_connection<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |request| {
            let provider = self.clone();
            async move { provider.answer(request).await }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), service)
            .await;
    }

    /// The provider's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Scripting: what the provider does from now on.
impl Provider {
    /// The answer to token calls once the one-shot queue is empty.
    pub fn set_default(&self, answer: Answer) {
        self.script().default = answer;
    }

    /// Queues a one-shot answer; queued answers are consumed first in, first out.
    pub fn push(&self, answer: Answer) {
        self.script().queue.push_back(answer);
    }

    /// If non-empty, token calls must authenticate as one of these `(client_id, client_secret)`
    /// pairs (HTTP Basic per RFC 6749 §2.3.1, or `client_id`/`client_secret` in the form body);
    /// anything else answers 401 `{"error":"invalid_client"}`. An empty slice lets anyone in.
    pub fn set_clients(&self, clients: &[(&str, &str)]) {
        self.script().clients = clients
            .iter()
            .map(|(id, secret)| ((*id).to_owned(), (*secret).to_owned()))
            .collect();
    }

    /// Accepts signed client assertions (`private_key_jwt`) verified with the PEM public key
    /// `pem` (RSA or EC) for `audience`, each `jti` once, for the ids of
    /// [`Provider::set_clients`]; a bad assertion is rejected like a wrong secret.
    pub fn set_assertion_key(&self, pem: &[u8], audience: &str) {
        self.script().assertions = assertion::AssertionCheck::new(pem, audience);
        assert!(
            self.script().assertions.is_some(),
            "not a PEM RSA or EC public key"
        );
    }

    /// Answers token calls with credentials other than [`Provider::set_clients`]'s with `answer`
    /// (a 429 with a long `Retry-After`, say, as some providers throttle guessers) instead of
    /// 401 `invalid_client`.
    pub fn set_rejection(&self, answer: Answer) {
        self.script().rejection = Some(answer);
    }

    /// Allows at most `calls` token calls per whole second of the provider's clock, every call
    /// counting (rejected ones too, as at a real provider), like a throttling provider.
    pub fn set_rate_limit(&self, calls: u64) {
        self.script().rate_limit = Some(limit::RateLimit::fixed(calls));
    }

    /// Allows at most `calls` admitted token calls in any rolling second, decided as a call
    /// arrives and refused at once, as a gateway in front of the provider does; a refused call
    /// does not count (see [`limit`]).
    pub fn set_rolling_rate_limit(&self, calls: u64) {
        self.script().rate_limit = Some(limit::RateLimit::rolling(calls));
    }

    /// Time every token call takes before the rate limit and the credentials are looked at (a
    /// rolling rate limit, a gateway's, decides before it).
    pub fn set_latency(&self, latency: Duration) {
        self.script().latency = latency;
    }

    /// Delay applied to every refresh-token call before the token is checked.
    pub fn set_refresh_delay(&self, delay: Duration) {
        self.script().refresh_delay = delay;
    }

    /// Keeps at most `limit` requests for [`Provider::recorded`] (counting goes on regardless).
    pub fn set_record_limit(&self, limit: usize) {
        self.script().record_limit = limit;
    }

    /// Logs the first `limit` token calls for [`Provider::calls`] (none until this is called).
    pub fn set_call_log_limit(&self, limit: usize) {
        self.script().calls.set_limit(limit);
    }

    /// Pads every access token issued from now on to at least `bytes` bytes, as real tokens
    /// (signed JWTs) are long: `tok-<n>` followed by `x`s.
    pub fn set_token_bytes(&self, bytes: usize) {
        self.script().token_bytes = bytes;
    }

    /// Draws each token call's answer (once the one-shot queue is empty) from `answers`: each
    /// `(rate, answer)` with probability `rate`, the default the rest of the time, from a
    /// generator seeded with `seed`. Panics when the rates add up to more than 1.
    pub fn set_mix(&self, answers: &[(f64, Answer)], seed: u64) {
        self.script().mix = Some(mix::Mix::new(answers, seed));
    }

    /// Registers and returns a fresh, valid, unused refresh token `rt-<m>`.
    pub fn issue_refresh_token(&self) -> String {
        let token = next_refresh_token();
        self.script().refresh_tokens.insert(token.clone(), false);
        token
    }

    /// Makes this provider's API endpoint accept the access tokens `issuer` issues, as an API
    /// host accepts the login host's tokens: from now on both use `issuer`'s issued-token set
    /// (tokens this provider issued before are forgotten).
    pub fn accept_tokens_of(&self, issuer: &Provider) {
        let issued = issuer.script().issued.clone();
        self.script().issued = issued;
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        lock(&self.state.script)
    }
}

/// Inspection: what the provider went through.
impl Provider {
    /// POSTs received on any path ending in `/token` (including rejected and refresh calls).
    pub fn token_calls(&self) -> usize {
        count(&self.counts.calls)
    }

    /// Every request received (counted when its head arrives).
    pub fn requests(&self) -> usize {
        count(&self.counts.requests)
    }

    /// Token calls the rate limit answered with 429.
    pub fn throttled(&self) -> usize {
        count(&self.counts.throttled)
    }

    /// Highest number of token calls (including refresh calls) in progress at once.
    pub fn max_concurrent_token_calls(&self) -> usize {
        count(&self.counts.most_in_progress)
    }

    /// The requests received, in arrival order (each appended once its body has been read).
    pub fn recorded(&self) -> Vec<Recorded> {
        self.script().recorded.clone()
    }

    /// The token calls logged so far, in the order they were answered
    /// ([`Provider::set_call_log_limit`]).
    pub fn calls(&self) -> Vec<Call> {
        self.script().calls.rows()
    }

    /// Time since the provider was created: the clock of [`Call`]'s times.
    pub fn clock(&self) -> Duration {
        self.state.epoch.elapsed()
    }
}

fn count(counter: &AtomicU64) -> usize {
    usize::try_from(counter.load(Ordering::SeqCst)).unwrap_or(usize::MAX)
}

/// Serving: the answers, for [`Provider::serve_connection`] or a layer of one's own.
impl Provider {
    /// Answers one request: a token call, the API endpoint, or 404. `Err` asks the server to
    /// close the connection without an answer ([`Answer::Drop`], [`Answer::Hang`], a body that
    /// could not be read or was over 1 MiB).
    pub async fn answer(&self, request: Request<Incoming>) -> io::Result<Response<Full<Bytes>>> {
        self.arrived();
        if request.method() == Method::POST && request.uri().path().ends_with("/token") {
            return self.token_call(request).await;
        }
        let (parts, body) = request.into_parts();
        let body = read(body).await?;
        self.record(&parts, body.clone());
        if parts.method == Method::GET && parts.uri.path().ends_with("/api/v2/users/me") {
            return Ok(self.users_me(&parts.headers));
        }
        if parts.method == Method::POST && parts.uri.path().ends_with("/api/v2/echo") {
            return Ok(self.echo(&parts.headers, &body));
        }
        if parts.method == Method::POST
            && parts.uri.path().ends_with("/api/v2/notifications/channels")
        {
            return Ok(self.channel(&parts.headers));
        }
        Ok(json(
            StatusCode::NOT_FOUND,
            r#"{"error":"not_found","message":"try POST /oauth/token or GET /api/v2/users/me"}"#,
        ))
    }

    /// Counts a request whose head has arrived; for a layer that answers some paths itself.
    pub fn arrived(&self) {
        self.counts.requests.fetch_add(1, Ordering::SeqCst);
    }

    /// Records a request, if the record limit allows; for a layer that answers some paths itself.
    pub fn record(&self, parts: &request::Parts, body: Bytes) {
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        let mut script = self.script();
        if script.recorded.len() < script.record_limit {
            script.recorded.push(Recorded {
                method: parts.method.clone(),
                path_and_query,
                headers: parts.headers.clone(),
                body,
            });
        }
    }

    /// A token call: answered step by step ([`Provider::token_answer`]), then logged.
    async fn token_call(&self, request: Request<Incoming>) -> io::Result<Response<Full<Bytes>>> {
        let arrived = self.clock();
        self.counts.calls.fetch_add(1, Ordering::SeqCst);
        let _in_progress = InProgress::enter(&self.counts);
        let (parts, body) = request.into_parts();
        let body = read(body).await?;
        self.record(&parts, body.clone());
        let form = parse_form(&body);
        let asserted = self
            .script()
            .assertions
            .as_mut()
            .and_then(|check| check.verify(&form));
        let presented = match asserted {
            Some(Some(id)) => Some((id, assertion::ASSERTED.to_owned())),
            Some(None) => Some((String::new(), String::new())),
            None => presented(&parts.headers, &form),
        };
        let answer = self.token_answer(presented.as_ref(), &form).await;
        let client_id = presented.map(|(id, _)| id);
        let times = (arrived, self.clock());
        self.script().calls.push(times, client_id, &answer);
        answer
    }

    /// The answer to a token call, step by step as a real provider takes it.
    async fn token_answer(
        &self,
        presented: Option<&(String, String)>,
        form: &[(String, String)],
    ) -> io::Result<Response<Full<Bytes>>> {
        let (latency, at_arrival) = {
            let script = self.script();
            let at_arrival = script.rate_limit.as_ref().is_some_and(|l| l.at_arrival());
            (script.latency, at_arrival)
        };
        if at_arrival && self.over_rate_limit() {
            return Ok(throttled());
        }
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if !at_arrival && self.over_rate_limit() {
            return Ok(throttled());
        }
        if !self.client_ok(presented) {
            let rejection = self.script().rejection.clone();
            if let Some(answer) = rejection {
                return self.scripted(answer, form).await;
            }
            let mut response = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"provider\""),
            );
            return Ok(response);
        }
        if form_get(form, "grant_type") == Some("refresh_token") {
            return Ok(self.refresh(form).await);
        }
        let answer = {
            let mut script = self.script();
            let drawn = script.queue.pop_front();
            let drawn = drawn.or_else(|| script.mix.as_mut().and_then(mix::Mix::draw));
            drawn.unwrap_or_else(|| script.default.clone())
        };
        self.scripted(answer, form).await
    }

    /// Counts a call against the rate limit; true if it is over.
    fn over_rate_limit(&self) -> bool {
        let now = self.clock();
        let over = self
            .script()
            .rate_limit
            .as_mut()
            .is_some_and(|limit| limit.over(now));
        if over {
            self.counts.throttled.fetch_add(1, Ordering::SeqCst);
        }
        over
    }

    /// Whether the credentials presented are a configured client's (always, when none is
    /// configured).
    fn client_ok(&self, presented: Option<&(String, String)>) -> bool {
        let script = self.script();
        let asserted = |p: &(String, String)| {
            p.1 == assertion::ASSERTED && script.clients.iter().any(|(id, _)| *id == p.0)
        };
        script.clients.is_empty()
            || presented.is_some_and(|p| script.clients.contains(p) || asserted(p))
    }

    async fn scripted(
        &self,
        answer: Answer,
        form: &[(String, String)],
    ) -> io::Result<Response<Full<Bytes>>> {
        match answer {
            Answer::Token { expires_in, delay } => {
                tokio::time::sleep(delay).await;
                let access_token = self.issue_access_token();
                let mut body = serde_json::json!({
                    "access_token": access_token,
                    "token_type": "bearer",
                    "expires_in": expires_in,
                });
                if let Some(scope) = form_get(form, "scope") {
                    body["scope"] = serde_json::Value::from(scope);
                }
                let mut response = json(StatusCode::OK, body.to_string());
                response.extensions_mut().insert(Issued);
                response
                    .extensions_mut()
                    .insert(calls::IssuedToken(access_token));
                Ok(response)
            }
            Answer::Json(body) => Ok(json(StatusCode::OK, body)),
            Answer::Status {
                status,
                retry_after,
                body,
                delay,
            } => {
                tokio::time::sleep(delay).await;
                let status = StatusCode::from_u16(status).expect("Answer::Status: invalid status");
                let mut response = json(status, body);
                if let Some(value) = retry_after {
                    let value =
                        HeaderValue::from_str(&value).expect("Answer::Status: invalid Retry-After");
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                Ok(response)
            }
            Answer::Garbage => Ok(json(
                StatusCode::OK,
                "<html>this is not json {\"access_token\":",
            )),
            Answer::Drop => Err(hang_up()),
            Answer::Hang => {
                tokio::time::sleep(HANG).await;
                Err(hang_up())
            }
        }
    }

    /// A refresh grant: a registered, unused refresh token is spent for an access token and a
    /// new refresh token; anything else is `invalid_grant`.
    async fn refresh(&self, form: &[(String, String)]) -> Response<Full<Bytes>> {
        let delay = self.script().refresh_delay;
        tokio::time::sleep(delay).await;
        let presented = form_get(form, "refresh_token").unwrap_or_default();
        let rotated = {
            let mut script = self.script();
            match script.refresh_tokens.get_mut(presented) {
                Some(used) if !*used => {
                    *used = true;
                    let next = next_refresh_token();
                    script.refresh_tokens.insert(next.clone(), false);
                    Some(next)
                }
                _ => None,
            }
        };
        let Some(refresh_token) = rotated else {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
        };
        let access_token = self.issue_access_token();
        let body = serde_json::json!({
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": REFRESHED_LIFETIME,
            "refresh_token": refresh_token,
        });
        let mut response = json(StatusCode::OK, body.to_string());
        response
            .extensions_mut()
            .insert(calls::IssuedToken(access_token));
        response
    }

    /// A fresh `tok-<n>` access token, padded to the script's size, remembered for the API
    /// endpoint.
    fn issue_access_token(&self) -> String {
        let mut token = format!("tok-{}", NEXT_TOKEN.fetch_add(1, Ordering::SeqCst));
        self.counts.issued.fetch_add(1, Ordering::SeqCst);
        // The set's handle first: the two locks are never held together.
        let (issued, bytes) = {
            let script = self.script();
            (script.issued.clone(), script.token_bytes)
        };
        if token.len() < bytes {
            token.extend(std::iter::repeat_n('x', bytes - token.len()));
        }
        let mut issued = lock(&issued);
        if issued.len() >= MAX_ISSUED {
            issued.clear();
        }
        issued.insert(token.clone());
        token
    }
}

fn next_refresh_token() -> String {
    format!("rt-{}", NEXT_REFRESH.fetch_add(1, Ordering::SeqCst))
}

/// A request body, whole, up to [`MAX_BODY`].
async fn read(body: Incoming) -> io::Result<Bytes> {
    Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(io::Error::other)
}

/// The error that makes hyper close the connection without a response.
fn hang_up() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "provider: closing the connection without an answer",
    )
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn oauth_error(status: StatusCode, error: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": error }).to_string())
}

/// The rate limit's answer: 429, `Retry-After: 1`.
fn throttled() -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::TOO_MANY_REQUESTS,
        r#"{"error":"temporarily_unavailable","error_description":"rate limit exceeded"}"#,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}
