//! The token path of one route: validate a local token request, answer cacheable ones from the
//! cache, coalesce misses into one upstream call per key (single flight), refresh ahead of expiry,
//! honour cool-downs, and forward everything it does not key. By phase:
//!
//! - [`request`]: parsing, once, into the canonical form every key derives from;
//! - [`cache`]: the route's bounded map of entries: eviction, sweep, the `/status` snapshot;
//! - [`entry`]: one key's state machine (decide, land) and a flight's [`entry::FlightResult`];
//! - [`flight`]: one upstream call from launch to landing;
//! - [`respond`]: rendering answers and their `Cache-Status`;
//! - [`lifetime`]: a cached token's clock;
//! - [`cooldown`]: `Retry-After` and backoff holds per client id;
//! - [`limiter`]: the route's cap on concurrent and per-second upstream calls;
//! - [`fleet`]: what a flight asks and tells the fleet tier, when it is on;
//! - [`Outcome`]: what happened to each request, counted and logged.
//!
//! This file ties them together: [`TokenRoute::handle`] reads the request, decides, and answers
//! at once or waits for a flight.

pub(crate) mod cache;
pub mod cooldown;
pub(crate) mod entry;
pub(crate) mod fleet;
pub(crate) mod flight;
pub mod lifetime;
pub(crate) mod limiter;
mod outcome;
pub mod request;
pub(crate) mod respond;

pub(crate) use outcome::Outcome;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::body::{Body, boxed, full};
use crate::config::{Limits, RouteConfig, TokenConfig};
use crate::error::{Error, Fault};
use crate::fleet::Fleet;
use crate::forward::Forwarder;
use crate::metrics::{RouteMetrics, RouteState};
use crate::status::{CooldownStatus, KeyStatus, LimiterStatus, RouteStatus};
use crate::upstream::{Upstream, strip_hop_by_hop};
use cache::{Cache, Full};
use entry::{Decision, FlightResult, FlightRx, Landing};
use flight::{Flight, Flights, ceil_secs};
use outcome::OutcomeCounters;
use request::{KeyContext, Keyer, MediaType, Parsed};
use respond::{CacheStatus, Fetch};

/// A token-path answer: ready, or a boxed future for the paths that wait on the network (a
/// forward, or a flight), so their state is not carried by every hit.
enum Answer<'a> {
    Ready(Response<Body>),
    Pending(Pin<Box<dyn Future<Output = Response<Body>> + Send + 'a>>),
}

/// The proof-of-possession header of RFC 9449.
const DPOP: http::HeaderName = http::HeaderName::from_static("dpop");

/// What a route's token path shares with the rest of the process.
#[derive(Debug, Clone)]
pub(crate) struct Process {
    /// Flights run here so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Fires when the shutdown grace is over.
    pub(crate) closed: CancellationToken,
    /// The fleet tier, when it is on.
    pub(crate) fleet: Option<Arc<Fleet>>,
}

/// One route's token path.
#[derive(Debug)]
pub(crate) struct TokenRoute {
    name: String,
    config: TokenConfig,
    /// The largest token request body accepted.
    max_request_body: usize,
    /// How long the whole body may take to arrive.
    body_read_timeout: Duration,
    /// The route's token paths as configured (the path a token call is sent to), each with its
    /// match key (see [`crate::path::match_key`]), made once.
    token_paths: Vec<(String, String)>,
    /// The caller's Host goes upstream (and so into the key) instead of the upstream's.
    preserve_host: bool,
    keyer: Keyer,
    cache: Cache,
    flights: Arc<Flights>,
    forwarder: Arc<Forwarder>,
    metrics: RouteMetrics,
    outcomes: OutcomeCounters,
    /// Fires when the shutdown grace is over: waiting callers get 503 instead of a reset.
    closed: CancellationToken,
}

impl TokenRoute {
    /// Builds the token path of a route; its flights call `upstream` and run on the process's
    /// tracker. With a `signer`, each call carries a fresh client assertion (a token path made
    /// for an injecting route with `private_key_jwt`).
    pub(crate) fn new(
        route: &RouteConfig,
        limits: &Limits,
        upstream: Arc<Upstream>,
        forwarder: Arc<Forwarder>,
        metrics: RouteMetrics,
        process: (Process, Option<crate::assertion::Signer>),
    ) -> TokenRoute {
        let (process, signer) = process;
        let Process {
            tracker,
            closed,
            fleet,
        } = process;
        let flights = Flights::new(
            &route.name,
            &route.token,
            limits.max_token_response,
            upstream,
            fleet_keys(route, fleet),
            metrics.clone(),
            tracker,
        )
        .signing(signer);
        TokenRoute {
            name: route.name.clone(),
            config: route.token.clone(),
            max_request_body: limits.max_request_body,
            body_read_timeout: limits.body_read_timeout,
            token_paths: route
                .token_paths
                .iter()
                .map(|p| (crate::path::match_key(p).into_owned(), p.clone()))
                .collect(),
            preserve_host: route.preserve_host,
            keyer: Keyer::new(&rand::random()),
            cache: Cache::new(route.token.max_entries, route.token.pool_size),
            flights: Arc::new(flights),
            forwarder,
            outcomes: OutcomeCounters::new(&metrics),
            metrics,
            closed,
        }
    }

    /// The route's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The token path whose match key is `key` (see [`crate::path::match_key`]), as the route
    /// spells it: the path a token call is sent to.
    pub(crate) fn token_path(&self, key: &str) -> Option<&str> {
        self.token_paths
            .iter()
            .find(|(path_key, _)| path_key == key)
            .map(|(_, path)| path.as_str())
    }

    /// Evicts idle and dead entries and forgets old cool-downs; called periodically.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let swept = self.cache.sweep(now, self.config.idle_timeout);
        self.metrics.evicted("idle", swept.idle);
        self.metrics.evicted("expired", swept.expired);
        self.flights.sweep(now);
        if swept.idle + swept.expired > 0 {
            debug!(route = %self.name, idle = swept.idle, expired = swept.expired, "cache swept");
        }
    }

    /// A token request made inside the sidecar (credential injection, [`crate::inject`]),
    /// answered exactly as the same request from an app on this route: the same key, cache,
    /// flight, holds and fleet tier.
    pub(crate) async fn internal(self: &Arc<Self>, parts: Parts, body: Bytes) -> Response<Body> {
        match self.answer(parts, body) {
            Answer::Ready(response) => response,
            Answer::Pending(later) => later.await,
        }
    }

    /// Drops the token `access_token` cached for this request's key, if it is still the one
    /// there (an API answered 401 to it), here and in the fleet tier: the next request makes one
    /// call, however many requests were rejected. True if it was dropped.
    pub(crate) async fn revoke(&self, parts: &Parts, body: &Bytes, access_token: &str) -> bool {
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let Ok(context) = KeyContext::of(&self.name, parts, self.preserve_host) else {
            return false;
        };
        let Ok(Parsed::Keyed {
            key,
            grant,
            canonical,
            ..
        }) = request::parse(&self.keyer, &context, authorization, body)
        else {
            return false;
        };
        let fingerprint: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(access_token).into();
        if !self.cache.revoke(&key, &fingerprint) {
            return false;
        }
        if let Some(keys) = self.flights.fleet()
            && let Some(fleet_key) = keys.key(grant, &canonical)
        {
            keys.forget(&fleet_key).await;
        }
        true
    }

    /// Answers a request to one of the token paths (see [`Self::token_path`]).
    pub(crate) async fn handle(
        self: &Arc<Self>,
        request: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        if parts.method != Method::POST {
            return self.reject(Error::MethodNotAllowed);
        }
        // The key must see what the provider will see: hop-by-hop headers, those the caller
        // names in `Connection` included, go before keying, and one credential header only.
        strip_hop_by_hop(&mut parts.headers);
        for name in [header::AUTHORIZATION, header::HOST] {
            if parts.headers.get_all(&name).iter().nth(1).is_some() {
                return self.reject(Error::InvalidRequest(
                    "a header that must appear once is repeated",
                ));
            }
        }
        // RFC 9449: a DPoP-bound token belongs to the key pair that signed the proof, which the
        // key cannot see, and a nonce challenge must reach the client's retry: never cached.
        if parts.headers.contains_key(DPOP) {
            let request = Request::from_parts(parts, boxed(body));
            return Box::pin(self.bypass(request)).await;
        }
        match request::media_type(&parts) {
            MediaType::Form => {}
            // Some providers accept JSON token requests; the sidecar cannot key them, so they go
            // through untouched and streamed.
            MediaType::Json => {
                let request = Request::from_parts(parts, boxed(body));
                return Box::pin(self.bypass(request)).await;
            }
            MediaType::Other => return self.reject(Error::UnsupportedMediaType),
        }
        let read = request::read_form(&parts, body, self.max_request_body, self.body_read_timeout);
        let body = match crate::server::awaiting_body(read).await {
            Ok(body) => body,
            Err(error) => return self.reject(error),
        };
        match self.answer(parts, body) {
            Answer::Ready(response) => response,
            Answer::Pending(later) => later.await,
        }
    }

    /// Everything after the body is read: key the request, decide under the entry's lock, and
    /// answer (a hit) or return what to wait for.
    fn answer(self: &Arc<Self>, parts: Parts, body: Bytes) -> Answer<'_> {
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let context = match KeyContext::of(&self.name, &parts, self.preserve_host) {
            Ok(context) => context,
            Err(error) => return Answer::Ready(self.reject(error)),
        };
        // Parsed and canonicalised once: every key below is a digest of `canonical`.
        let parsed = request::parse(&self.keyer, &context, authorization, &body);
        let (key, grant, canonical) = match parsed {
            Err(error) => return Answer::Ready(self.reject(error)),
            Ok(Parsed::PassThrough) => {
                let request = Request::from_parts(parts, full(body));
                return Answer::Pending(Box::pin(self.bypass(request)));
            }
            Ok(Parsed::Keyed {
                key,
                grant,
                canonical,
                ..
            }) => (key, grant, canonical),
        };
        let now = Instant::now();
        // The client's digest, made at most once: only a request that considers a call needs it.
        let client = std::cell::OnceCell::new();
        let client = || *client.get_or_init(|| canonical.client_key());
        // A hold short enough to absorb does not stop a flight: the flight waits it out.
        let cooling = |proven| {
            self.flights
                .cooling(&client(), proven, now)
                .filter(|hold| hold.left > self.config.absorb_hold)
        };
        let proven_client = || self.flights.is_proven_client(&client());
        let decision = match self.cache.decide(key, now, proven_client, cooling) {
            Ok((decision, evicted)) => {
                self.metrics.evicted("capacity", evicted);
                decision
            }
            Err(Full) => {
                self.record(Outcome::Full);
                return Answer::Ready(respond::error(Error::CacheFull, CacheStatus::Full));
            }
        };
        // A flight sends the request on as the caller sent it.
        let flight = |landing, proven| {
            let fleet = self
                .flights
                .fleet()
                .and_then(|keys| keys.key(grant, &canonical));
            Flight::new(landing, grant, client(), proven, fleet, &parts, &body)
        };
        self.serve(decision, now, flight)
    }

    /// Carries out a decision made at `now`; `flight` makes the flight it starts, if any.
    fn serve(
        self: &Arc<Self>,
        decision: Decision,
        now: Instant,
        flight: impl FnOnce(Landing, bool) -> Flight,
    ) -> Answer<'_> {
        match decision {
            Decision::Hit { token, refresh } => {
                if let Some(landing) = refresh {
                    debug!(route = %self.name, "refresh ahead");
                    self.flights.launch(flight(landing, true));
                }
                self.record(Outcome::Hit);
                let status = CacheStatus::Hit {
                    ttl: token.ttl_secs(now),
                };
                Answer::Ready(respond::token(&token, now, status))
            }
            Decision::Remembered(reply) => {
                self.record(Outcome::Remembered);
                Answer::Ready(respond::reply(&reply, CacheStatus::Remembered))
            }
            Decision::Cooldown(hold) => {
                self.record(Outcome::Cooldown);
                let error = Error::CoolingDown {
                    retry_after_secs: ceil_secs(hold.left),
                    by: hold.by,
                };
                Answer::Ready(respond::error(error, CacheStatus::Cooldown))
            }
            Decision::Join(rx) => Answer::Pending(Box::pin(self.wait(rx, Outcome::Coalesced))),
            Decision::Lead {
                flight: landing,
                rx,
                stale,
                proven,
            } => {
                self.flights.launch(flight(landing, proven));
                let role = if stale { Outcome::Stale } else { Outcome::Miss };
                Answer::Pending(Box::pin(self.wait(rx, role)))
            }
        }
    }

    /// Forwards a request the sidecar does not key, unchanged.
    async fn bypass(&self, request: Request<Body>) -> Response<Body> {
        self.record(Outcome::Bypass);
        respond::with_status(self.forwarder.forward(request).await, CacheStatus::Bypass)
    }

    /// Counts a request's outcome and writes its debug-level request line.
    fn record(&self, outcome: Outcome) {
        self.outcomes.count(outcome);
        debug!(route = %self.name, outcome = outcome.as_str(), "token request");
    }

    /// Refuses a malformed request.
    fn reject(&self, error: Error) -> Response<Body> {
        debug_assert_eq!(
            error.fault(),
            Fault::Caller,
            "only the caller's faults are refused here"
        );
        self.record(Outcome::Invalid);
        debug!(route = %self.name, error = %error, "token request refused");
        respond::error(error, CacheStatus::Invalid)
    }

    /// Waits, bounded by the wait timeout, for a flight's outcome and renders it.
    async fn wait(&self, rx: FlightRx, role: Outcome) -> Response<Body> {
        let shared = tokio::select! {
            shared = flight::wait(rx, self.config.wait_timeout) => shared,
            () = self.closed.cancelled() => FlightResult::Failed(Error::ShuttingDown),
        };
        let fetch = if role == Outcome::Stale {
            Fetch::Stale
        } else {
            Fetch::Miss
        };
        if let FlightResult::Failed(error) = &shared {
            self.record(Outcome::Error);
            debug!(route = %self.name, fault = error.fault().as_str(), error = %error, "token request answered with an error");
        } else {
            self.record(role);
        }
        respond::landed(shared, fetch, role == Outcome::Coalesced, Instant::now())
    }
}

/// The route's keys into the fleet tier, if it is on and the route can use it: a pool of
/// distinct tokens per key (`pool_size` > 1) is per pod, so such a route works alone.
fn fleet_keys(route: &RouteConfig, fleet: Option<Arc<Fleet>>) -> Option<fleet::FleetKeys> {
    let fleet = fleet?;
    if route.token.pool_size > 1 {
        tracing::warn!(route = %route.name, pool_size = route.token.pool_size, "shared tier off for this route: a pool of distinct tokens is kept per pod");
        return None;
    }
    Some(fleet::FleetKeys::new(
        fleet,
        &route.upstream.to_string(),
        &route.token,
    ))
}

/// Most keys `/status` lists per route (they are all counted).
const STATUS_KEYS: usize = 200;

fn hex4(prefix: [u8; 4]) -> String {
    prefix.iter().map(|b| format!("{b:02x}")).collect()
}

impl RouteState for TokenRoute {
    fn name(&self) -> &str {
        &self.name
    }

    fn status(&self) -> RouteStatus {
        let now = Instant::now();
        let (keys, total) = self.cache.snapshot(now, STATUS_KEYS);
        let keys: Vec<KeyStatus> = keys
            .iter()
            .map(|key| KeyStatus {
                key: hex4(key.key),
                client: key.client.map(hex4),
                ttl_s: key.ttl_secs,
                tokens: key.tokens,
                calling: key.calling,
            })
            .collect();
        let mut holds = self.flights.active_holds(now);
        holds.sort_by_key(|(_, left)| std::cmp::Reverse(*left));
        let cooldowns = holds
            .iter()
            .take(STATUS_KEYS)
            .map(|(client, left)| CooldownStatus {
                client: client.label(),
                left_s: ceil_secs(*left),
            })
            .collect();
        let (in_progress, max_concurrent, budget) = self.flights.limiter_state();
        RouteStatus {
            name: self.name.clone(),
            keys_total: total,
            keys_listed: keys.len(),
            flights_listed: keys.iter().filter(|k| k.calling).count(),
            keys,
            upstream_calls_in_progress: in_progress,
            cooldowns_total: holds.len(),
            cooldowns,
            limiter: LimiterStatus {
                calls_in_progress: in_progress,
                max_concurrent_calls: max_concurrent,
                calls_per_second: self.config.calls_per_second,
                calls_available: budget,
            },
            shared: self.flights.fleet().is_some(),
        }
    }

    fn cache_len(&self) -> usize {
        self.cache.len()
    }

    fn active_cooldowns(&self) -> Vec<(String, Duration)> {
        self.flights
            .active_holds(Instant::now())
            .into_iter()
            .map(|(client, left)| (client.label(), left))
            .collect()
    }
}
