//! The token path of one route: validate a local token request, answer cacheable ones from the
//! cache, coalesce misses into one upstream call per key (single flight), refresh ahead of expiry,
//! honour cool-downs, and forward everything it does not key.
//!
//! - [`request`]: parsing and the cache key;
//! - [`lifetime`]: a cached token's clock and rendering;
//! - [`cache`]: entries, single flight state, eviction;
//! - [`cooldown`]: `Retry-After` and backoff holds per client id;
//! - [`limiter`]: the route's cap on concurrent and per-second upstream calls.

pub mod cache;
pub mod cooldown;
pub mod lifetime;
pub mod limiter;
pub mod request;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::body::{Body, full};
use crate::config::{Limits, RouteConfig, TokenConfig};
use crate::error::Error;
use crate::forward::{self, Forwarder};
use crate::metrics::RouteMetrics;
use crate::telemetry::client_hash;
use crate::upstream::Failure;
use cache::{Cache, Decision, Entry, FlightRx, FlightTx, Reply, Shared};
use cooldown::{Cause, Cooldowns};
use lifetime::{Hit, Token, Validated};
use limiter::Limiter;
use request::{Grant, Keyer, Parsed};

/// What happened to one token-path request: a log field, a metric label and the `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the cache.
    Hit,
    /// Fetched from the provider: nothing was cached.
    Miss,
    /// Fetched from the provider: the cached token was past its safety margin.
    Stale,
    /// Waited for another request's upstream call.
    Coalesced,
    /// Refused without an upstream call: the client id is cooling down.
    Cooldown,
    /// A remembered answer was replayed (a recent client error, or a refresh-token answer).
    Remembered,
    /// Not cacheable: forwarded unchanged.
    Bypass,
    /// The local request was malformed.
    Invalid,
    /// The sidecar answered with its own error (upstream unreachable, unusable, wait timeout).
    Error,
}

impl Outcome {
    /// Every outcome, in discriminant order (metrics index by `as usize`).
    pub const ALL: [Outcome; 9] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Stale,
        Outcome::Coalesced,
        Outcome::Cooldown,
        Outcome::Remembered,
        Outcome::Bypass,
        Outcome::Invalid,
        Outcome::Error,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Coalesced => "coalesced",
            Outcome::Cooldown => "cooldown",
            Outcome::Remembered => "remembered",
            Outcome::Bypass => "bypass",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

/// One of a route's token paths, found by [`TokenRoute::token_path`].
#[derive(Debug, Clone, Copy)]
pub struct TokenPath(usize);

/// A token-path answer that has to wait for the network: a forward, or a flight's outcome.
type Later<'a> = Pin<Box<dyn Future<Output = Response<Body>> + Send + 'a>>;

/// One route's token path.
#[derive(Debug)]
pub struct TokenRoute {
    name: String,
    config: TokenConfig,
    limits: Limits,
    /// Each token path with its key scope (route name and path), computed once.
    token_paths: Vec<(String, String)>,
    /// The caller's Host goes upstream (and so into the key) instead of the upstream's.
    preserve_host: bool,
    keyer: Keyer,
    cache: Cache,
    cooldowns: Cooldowns,
    limiter: Limiter,
    forwarder: Arc<Forwarder>,
    metrics: RouteMetrics,
    /// Upstream flights run here so shutdown can wait for them.
    flights: TaskTracker,
}

impl TokenRoute {
    /// Builds the token path of a route.
    pub fn new(
        route: &RouteConfig,
        limits: &Limits,
        forwarder: Arc<Forwarder>,
        metrics: RouteMetrics,
        flights: TaskTracker,
    ) -> TokenRoute {
        TokenRoute {
            name: route.name.clone(),
            config: route.token.clone(),
            limits: limits.clone(),
            token_paths: route
                .token_paths
                .iter()
                .map(|path| (path.clone(), format!("{}\n{path}", route.name)))
                .collect(),
            preserve_host: route.preserve_host,
            keyer: Keyer::new(&rand::random()),
            cache: Cache::new(route.token.max_entries),
            cooldowns: Cooldowns::new(&route.name),
            limiter: Limiter::new(
                route.token.max_concurrent_calls,
                route.token.calls_per_second,
                route.token.calls_burst,
            ),
            forwarder,
            metrics,
            flights,
        }
    }

    /// The route's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which of this route's token paths `path` is, if any.
    pub fn token_path(&self, path: &str) -> Option<TokenPath> {
        self.token_paths
            .iter()
            .position(|(p, _)| p == path)
            .map(TokenPath)
    }

    /// Cached keys.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Active cool-downs by client hash, for the metrics.
    pub fn active_cooldowns(&self) -> Vec<(String, Duration)> {
        self.cooldowns
            .active(Instant::now())
            .into_iter()
            .map(|(client, left)| (client_hash(&client), left))
            .collect()
    }

    /// Evicts idle and dead entries and forgets old cool-downs; called periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        let swept = self.cache.sweep(now, self.config.idle_timeout);
        self.metrics.evicted("idle", swept.idle);
        self.metrics.evicted("expired", swept.expired);
        self.cooldowns.sweep(now, self.config.backoff_max * 2);
        if swept.idle + swept.expired > 0 {
            debug!(route = %self.name, idle = swept.idle, expired = swept.expired, "cache swept");
        }
    }

    /// Answers a request to one of the token paths, as found by [`Self::token_path`].
    ///
    /// A hit is answered without leaving this future, which holds little more than the request
    /// head while the body is read; the slower paths (forwarding, waiting for a flight) are boxed
    /// futures of their own, so their state is not carried by every hit.
    pub async fn handle(
        self: &Arc<Self>,
        path: TokenPath,
        request: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let (parts, body) = request.into_parts();
        if parts.method != Method::POST {
            return self.reject(Error::MethodNotAllowed);
        }
        let media_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map_or("", |v| v.split(';').next().unwrap_or("").trim());
        if media_type.eq_ignore_ascii_case("application/json") {
            // Some providers accept JSON token requests; the sidecar cannot key them, so they go
            // through untouched and streamed.
            let request = Request::from_parts(parts, crate::body::boxed(body));
            return Box::pin(self.bypass(request)).await;
        }
        if !media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return self.reject(Error::UnsupportedMediaType);
        }
        let limit = self.limits.max_request_body;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return self.reject(Error::PayloadTooLarge { limit });
        }
        let body = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return self.reject(Error::PayloadTooLarge { limit });
            }
            Err(_) => {
                return self.reject(Error::InvalidRequest("the request body could not be read"));
            }
        };
        // The part of the cache key that names where a token is valid: route and token path.
        let scope = self.token_paths[path.0].1.as_str();
        match self.answer(scope, parts, body) {
            Ok(response) => response,
            Err(later) => later.await,
        }
    }

    /// Everything after the body is read, without waiting: the answer, or the boxed future that
    /// produces it (a forward, or a wait on a flight).
    fn answer(
        self: &Arc<Self>,
        scope: &str,
        parts: Parts,
        body: Bytes,
    ) -> Result<Response<Body>, Later<'_>> {
        // Everything else the provider sees that could change the token is part of the key: a
        // query (tenant or policy selectors) and, when it is passed on, the caller's Host.
        let query = parts.uri.query();
        let host = match self
            .preserve_host
            .then(|| parts.headers.get(header::HOST))
            .flatten()
        {
            Some(value) => match value.to_str() {
                Ok(host) => Some(host),
                Err(_) => return Ok(self.reject(Error::InvalidRequest("malformed Host header"))),
            },
            None => None,
        };
        let scope = if query.is_none() && host.is_none() {
            Cow::Borrowed(scope)
        } else {
            let mut owned = String::from(scope);
            if let Some(query) = query {
                owned.push_str("\n?");
                owned.push_str(query);
            }
            if let Some(host) = host {
                owned.push_str("\nhost:");
                owned.push_str(host);
            }
            Cow::Owned(owned)
        };
        let parsed = request::parse(
            &self.keyer,
            &scope,
            parts
                .headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
            &body,
        );
        let (key, grant, client_id) = match parsed {
            Err(error) => return Ok(self.reject(error)),
            Ok(Parsed::PassThrough) => {
                let request = Request::from_parts(parts, full(body));
                return Err(Box::pin(self.bypass(request)));
            }
            Ok(Parsed::Keyed {
                key,
                grant,
                client_id,
            }) => (key, grant, client_id),
        };

        let now = Instant::now();
        let (decision, entry, evicted) = self
            .cache
            .decide(key, now, || self.cooldowns.remaining(&client_id, now));
        self.metrics.evicted("capacity", evicted);
        match decision {
            Decision::Hit { hit, refresh } => {
                if let Some(tx) = refresh {
                    debug!(route = %self.name, client = %client_hash(&client_id), "refresh ahead");
                    let entry = entry.expect("a flight comes with its entry");
                    let client_id = client_id.into_owned();
                    self.launch(grant, entry, tx, client_id, parts, body);
                }
                self.record(Outcome::Hit);
                Ok(render_hit(hit))
            }
            Decision::Remembered(reply) => {
                self.record(Outcome::Remembered);
                Ok(with_status(
                    render_reply(&reply),
                    "token-sidecar; hit; detail=remembered",
                ))
            }
            Decision::Cooldown(left) => {
                self.record(Outcome::Cooldown);
                let retry_after_secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                Ok(with_status(
                    Error::CoolingDown { retry_after_secs }.into_response(),
                    "token-sidecar; detail=cooldown",
                ))
            }
            Decision::Join(rx) => Err(Box::pin(self.wait(rx, Outcome::Coalesced))),
            Decision::Lead { tx, rx, stale } => {
                let entry = entry.expect("a flight comes with its entry");
                let client_id = client_id.into_owned();
                self.launch(grant, entry, tx, client_id, parts, body);
                let role = if stale { Outcome::Stale } else { Outcome::Miss };
                Err(Box::pin(self.wait(rx, role)))
            }
        }
    }

    /// Forwards a request the sidecar does not key, unchanged.
    async fn bypass(&self, request: Request<Body>) -> Response<Body> {
        self.record(Outcome::Bypass);
        with_status(
            self.forwarder.forward(request).await,
            "token-sidecar; fwd=bypass",
        )
    }

    /// Counts a request's outcome and writes its debug-level request line.
    fn record(&self, outcome: Outcome) {
        self.metrics.outcome(outcome);
        debug!(route = %self.name, outcome = outcome.as_str(), "token request");
    }

    fn reject(&self, error: Error) -> Response<Body> {
        let outcome = if error.fault() == "caller" {
            Outcome::Invalid
        } else {
            Outcome::Error
        };
        self.record(outcome);
        debug!(route = %self.name, error = %error, "token request refused");
        let detail = match outcome {
            Outcome::Invalid => "token-sidecar; detail=invalid-request",
            _ => "token-sidecar; detail=error",
        };
        with_status(error.into_response(), detail)
    }

    /// Waits, bounded by the wait timeout, for a flight's outcome and renders it.
    async fn wait(&self, mut rx: FlightRx, role: Outcome) -> Response<Body> {
        let shared = match tokio::time::timeout(
            self.config.wait_timeout,
            rx.wait_for(Option::is_some),
        )
        .await
        {
            Ok(Ok(shared)) => shared.clone().expect("waited for Some"),
            // The flight task died without publishing (a bug): its guard cleared the slot.
            Ok(Err(_)) => Shared::Failed(Error::Internal),
            Err(_) => Shared::Failed(Error::WaitTimeout),
        };
        let fwd = if role == Outcome::Stale {
            "stale"
        } else {
            "miss"
        };
        let collapsed = if role == Outcome::Coalesced {
            "; collapsed"
        } else {
            ""
        };
        match shared {
            Shared::Token(token) => {
                self.record(role);
                let stored = if collapsed.is_empty() { "; stored" } else { "" };
                let status = format!("token-sidecar; fwd={fwd}; fwd-status=200{stored}{collapsed}");
                let response = render_token(
                    full(token.render(Instant::now())),
                    token.content_type.clone(),
                );
                dynamic_status(response, status)
            }
            Shared::Reply(reply) => {
                self.record(role);
                let status = format!(
                    "token-sidecar; fwd={fwd}; fwd-status={}{collapsed}",
                    reply.status.as_u16()
                );
                dynamic_status(render_reply(&reply), status)
            }
            Shared::Failed(error) => {
                self.record(Outcome::Error);
                let status = format!(
                    "token-sidecar; fwd={fwd}; detail={}{collapsed}",
                    error.code()
                );
                dynamic_status(error.into_response(), status)
            }
        }
    }

    /// Starts the upstream call in its own task, so a caller that hangs up cannot cancel it for
    /// the others, and tracked, so shutdown waits for it.
    fn launch(
        self: &Arc<Self>,
        grant: Grant,
        entry: Arc<Entry>,
        tx: FlightTx,
        client_id: String,
        parts: Parts,
        body: Bytes,
    ) {
        let route = self.clone();
        // Armed before the task exists, so even a task dropped before its first poll (runtime
        // shutdown) clears the slot.
        let guard = FlightGuard { entry, armed: true };
        self.flights.spawn(async move {
            route.fly(grant, guard, tx, &client_id, parts, body).await;
        });
    }

    /// One upstream call: send, classify, update the entry and cool-down, publish.
    async fn fly(
        &self,
        grant: Grant,
        mut guard: FlightGuard,
        tx: FlightTx,
        client_id: &str,
        parts: Parts,
        body: Bytes,
    ) {
        // Queue behind the route's limits only as long as the call could still finish before
        // the callers' deadline; past that, tell them honestly when to come back.
        let max_queue = self
            .config
            .wait_timeout
            .saturating_sub(self.forwarder.request_timeout());
        // `call` is what to count and log: the status label, the Retry-After, the latency. A
        // call the limiter held back never reached the provider and has none.
        let (shared, call) = match self.limiter.admit(max_queue).await {
            Err(held) => {
                let retry_after_secs = held.retry_after.as_secs_f64().ceil().max(1.0) as u64;
                warn!(route = %self.name, retry_after_s = retry_after_secs, "upstream token call held back by the route's limits");
                (
                    Shared::Failed(Error::CoolingDown { retry_after_secs }),
                    None,
                )
            }
            Ok(_permit) => {
                self.metrics.upstream_in_flight.inc();
                let sent = Instant::now();
                let answer = self
                    .forwarder
                    .exchange(parts, body, self.limits.max_token_response)
                    .await;
                let latency = sent.elapsed();
                self.metrics.upstream_in_flight.dec();
                let (shared, label, retry_after) =
                    self.classify(grant, answer, client_id, Instant::now());
                (shared, Some((label, retry_after, latency)))
            }
        };
        let now = Instant::now();
        {
            let mut state = guard.entry.lock();
            match &shared {
                Shared::Token(token) => {
                    let same = state
                        .token
                        .as_ref()
                        .is_some_and(|old| old.fingerprint == token.fingerprint);
                    if same {
                        // The provider handed back the token already cached: keep it, but do not
                        // ask again until a growing backoff has passed.
                        state.same_token_streak += 1;
                        let delay = cooldown::backoff(
                            state.same_token_streak,
                            self.config.backoff_base,
                            self.config.backoff_max,
                            0.5 + rand::random::<f64>() / 2.0,
                        );
                        state.refresh_not_before = Some(now + delay);
                    } else {
                        state.same_token_streak = 0;
                        state.refresh_not_before = None;
                    }
                    state.set_token(Some(token.clone()));
                    state.remembered = None;
                }
                Shared::Reply(reply) if is_client_error(reply.status) => {
                    // The provider rejected these credentials: stop serving what they got before.
                    state.set_token(None);
                    state.remembered = Some((now + self.config.error_ttl, reply.clone()));
                }
                Shared::Reply(reply)
                    if grant == Grant::RefreshToken && reply.status.is_success() =>
                {
                    state.remembered = Some((now + self.config.refresh_token_ttl, reply.clone()));
                }
                _ => {}
            }
            state.flight = None;
        }
        guard.armed = false;
        let waiters = tx.receiver_count();
        tx.send_replace(Some(shared));
        let Some((label, retry_after, latency)) = call else {
            return;
        };
        self.metrics
            .upstream_call(&label, latency.as_secs_f64(), waiters);
        info!(
            route = %self.name,
            client = %client_hash(client_id),
            status = %label,
            latency_ms = latency.as_millis() as u64,
            retry_after_s = retry_after.map(|d| d.as_secs()),
            waiters,
            "upstream token call"
        );
    }

    /// Turns an upstream answer into what waiters receive, starting or clearing the client's
    /// cool-down before the flight slot is released (so no request slips in between).
    fn classify(
        &self,
        grant: Grant,
        answer: Result<(Reply, bool), Failure>,
        client_id: &str,
        now: Instant,
    ) -> (Shared, String, Option<Duration>) {
        let hold = |cause, retry_after| {
            self.cooldowns.hold(
                client_id,
                cause,
                retry_after,
                &self.config,
                now,
                rand::random(),
            )
        };
        let (reply, truncated) = match answer {
            Ok(answer) => answer,
            Err(failure) => {
                warn!(route = %self.name, upstream = %self.forwarder.upstream_url(), reason = %failure.reason(), "upstream token call failed");
                let left = hold(Cause::Failed, None);
                return (
                    Shared::Failed(failure.to_error()),
                    failure.as_str().to_owned(),
                    Some(left),
                );
            }
        };
        let label = reply.status.as_u16().to_string();
        if truncated {
            warn!(route = %self.name, status = %label, "upstream token response over the size limit");
            let left = hold(Cause::Failed, None);
            return (
                Shared::Failed(Error::UpstreamInvalid("response too large")),
                label,
                Some(left),
            );
        }
        if reply.status.is_success() {
            let content_type = reply
                .headers
                .get(header::CONTENT_TYPE)
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("application/json"));
            return match Token::from_upstream(
                &reply.body,
                content_type,
                now,
                &self.config,
                rand::random(),
            ) {
                Ok(Validated::Token(mut token)) => {
                    self.cooldowns.clear(client_id);
                    if grant == Grant::RefreshToken {
                        token.refresh_at = None;
                        token.serve_until =
                            token.serve_until.min(now + self.config.refresh_token_ttl);
                    }
                    (Shared::Token(Arc::new(token)), label, None)
                }
                Ok(Validated::Uncacheable) => {
                    self.cooldowns.clear(client_id);
                    (Shared::Reply(Arc::new(reply)), label, None)
                }
                Err(why) => {
                    warn!(route = %self.name, why, "upstream token response unusable");
                    let left = hold(Cause::Failed, None);
                    (
                        Shared::Failed(Error::UpstreamInvalid(why)),
                        label,
                        Some(left),
                    )
                }
            };
        }
        let retry_after = match reply.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                let given = reply
                    .headers
                    .get(header::RETRY_AFTER)
                    .and_then(|v| cooldown::parse_retry_after(v, SystemTime::now()));
                Some(hold(Cause::Throttled, given))
            }
            status if status.is_server_error() => Some(hold(Cause::Failed, None)),
            _ => None,
        };
        (Shared::Reply(Arc::new(reply)), label, retry_after)
    }
}

/// Clears the flight slot if the flight task ends without publishing (panic or abort), so the
/// key is not stuck; waiters then see the channel close and answer 500.
struct FlightGuard {
    entry: Arc<Entry>,
    armed: bool,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.armed {
            self.entry.lock().flight = None;
        }
    }
}

fn is_client_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 401 | 403)
}

const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// A token as a response, with the RFC 6749 §5.1 cache headers; the caller adds Cache-Status.
fn render_token(body: Body, content_type: HeaderValue) -> Response<Body> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CACHE_CONTROL, NO_STORE);
    headers.insert(header::PRAGMA, NO_CACHE);
    response
}

/// A hit: the token's bytes and the entry's rendering for this second, shared rather than copied.
fn render_hit(hit: Hit) -> Response<Body> {
    let mut response = render_token(crate::body::pieces(hit.body), hit.content_type);
    response
        .headers_mut()
        .insert(CACHE_STATUS, hit.cache_status);
    response
}

/// An upstream answer as it came.
fn render_reply(reply: &Reply) -> Response<Body> {
    let mut response = Response::new(full(reply.body.clone()));
    *response.status_mut() = reply.status;
    *response.headers_mut() = reply.headers.clone();
    response
}

fn with_status(mut response: Response<Body>, cache_status: &'static str) -> Response<Body> {
    response
        .headers_mut()
        .insert(CACHE_STATUS, HeaderValue::from_static(cache_status));
    response
}

/// A `Cache-Status` built at run time, moved into the header without a second copy.
fn dynamic_status(mut response: Response<Body>, cache_status: String) -> Response<Body> {
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(cache_status)) {
        response.headers_mut().insert(CACHE_STATUS, value);
    }
    response
}

/// Removes what must not be forwarded from a cached upstream answer's headers.
pub(crate) fn reply_from(parts: http::response::Parts, body: Bytes) -> Reply {
    let mut headers = parts.headers;
    forward::strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    Reply {
        status: parts.status,
        headers,
        body,
    }
}
