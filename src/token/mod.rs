//! The token path of one route: validate a local token request, answer cacheable ones from the
//! cache, coalesce misses into one upstream call per key (single flight), refresh ahead of expiry,
//! honour cool-downs, and forward everything it does not key. By phase:
//!
//! - [`request`]: parsing and the whole cache key;
//! - [`cache`]: entries and their state machine (decide, land), eviction;
//! - [`flight`]: one upstream call from launch to landing;
//! - [`respond`]: rendering answers and their `Cache-Status`;
//! - [`lifetime`]: a cached token's clock;
//! - [`cooldown`]: `Retry-After` and backoff holds per client id;
//! - [`limiter`]: the route's cap on concurrent and per-second upstream calls.
//!
//! This file ties them together: [`TokenRoute::handle`] reads the request, decides, and answers
//! at once or waits for a flight.

pub(crate) mod cache;
pub mod cooldown;
pub(crate) mod flight;
pub mod lifetime;
pub(crate) mod limiter;
pub mod request;
pub(crate) mod respond;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use prometheus_client::metrics::counter::Counter;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::body::{Body, boxed, full};
use crate::config::{Limits, RouteConfig, TokenConfig};
use crate::error::{Error, Fault};
use crate::forward::Forwarder;
use crate::metrics::{RouteMetrics, RouteState};
use crate::telemetry::client_hash;
use crate::upstream::Upstream;
use cache::{Cache, Decision, FlightRx, Shared};
use flight::{Flight, Flights};
use request::{KeyContext, Keyer, Parsed};
use respond::{CacheStatus, Fetch, Fetched};

/// Declares [`Outcome`] with its labels and the list of all of them from one table, so the metric
/// counters (indexed by the list) cannot drift from the enum.
macro_rules! outcomes {
    ($($(#[doc = $doc:literal])* $variant:ident => $label:literal,)*) => {
        /// What happened to one token-path request: a log field and a metric label.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Outcome {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Outcome {
            /// Every outcome, in declaration order, so `outcome as usize` indexes it.
            pub const ALL: &'static [Outcome] = &[$(Outcome::$variant,)*];

            /// The label used in logs and metrics.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Outcome::$variant => $label,)*
                }
            }
        }
    };
}

outcomes! {
    /// Served from the cache.
    Hit => "hit",
    /// Fetched from the provider: nothing was cached.
    Miss => "miss",
    /// Fetched from the provider: the cached token was past its safety margin.
    Stale => "stale",
    /// Waited for another request's upstream call.
    Coalesced => "coalesced",
    /// Refused without an upstream call: the client id is cooling down.
    Cooldown => "cooldown",
    /// A remembered answer was replayed (a recent client error, or a refresh-token answer).
    Remembered => "remembered",
    /// Not cacheable: forwarded unchanged.
    Bypass => "bypass",
    /// The local request was malformed.
    Invalid => "invalid",
    /// The sidecar answered with its own error (upstream unreachable, unusable, wait timeout).
    Error => "error",
}

/// A token-path answer: ready, or a boxed future for the paths that wait on the network (a
/// forward, or a flight), so their state is not carried by every hit.
enum Answer<'a> {
    Ready(Response<Body>),
    Pending(Pin<Box<dyn Future<Output = Response<Body>> + Send + 'a>>),
}

/// One route's token path.
#[derive(Debug)]
pub struct TokenRoute {
    name: String,
    config: TokenConfig,
    /// The largest token request body accepted.
    max_request_body: usize,
    token_paths: Vec<String>,
    /// The caller's Host goes upstream (and so into the key) instead of the upstream's.
    preserve_host: bool,
    keyer: Keyer,
    cache: Cache,
    flights: Arc<Flights>,
    forwarder: Arc<Forwarder>,
    metrics: RouteMetrics,
    /// One counter per [`Outcome`], in [`Outcome::ALL`] order.
    outcomes: Vec<Counter>,
}

impl TokenRoute {
    /// Builds the token path of a route; its flights call `upstream` and run on `tracker`.
    pub fn new(
        route: &RouteConfig,
        limits: &Limits,
        upstream: Arc<Upstream>,
        forwarder: Arc<Forwarder>,
        metrics: RouteMetrics,
        tracker: TaskTracker,
    ) -> TokenRoute {
        let flights = Flights::new(
            &route.name,
            &route.token,
            limits.max_token_response,
            upstream,
            metrics.clone(),
            tracker,
        );
        TokenRoute {
            name: route.name.clone(),
            config: route.token.clone(),
            max_request_body: limits.max_request_body,
            token_paths: route.token_paths.clone(),
            preserve_host: route.preserve_host,
            keyer: Keyer::new(&rand::random()),
            cache: Cache::new(route.token.max_entries),
            flights: Arc::new(flights),
            forwarder,
            outcomes: Outcome::ALL
                .iter()
                .map(|outcome| metrics.token_requests(outcome.as_str()))
                .collect(),
            metrics,
        }
    }

    /// The route's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `path` is one of this route's token paths.
    pub fn is_token_path(&self, path: &str) -> bool {
        self.token_paths.iter().any(|p| p == path)
    }

    /// Evicts idle and dead entries and forgets old cool-downs; called periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        let swept = self.cache.sweep(now, self.config.idle_timeout);
        self.metrics.evicted("idle", swept.idle);
        self.metrics.evicted("expired", swept.expired);
        self.flights
            .cooldowns()
            .sweep(now, self.config.backoff_max * 2);
        if swept.idle + swept.expired > 0 {
            debug!(route = %self.name, idle = swept.idle, expired = swept.expired, "cache swept");
        }
    }

    /// Answers a request to one of the token paths (see [`Self::is_token_path`]).
    pub async fn handle(
        self: &Arc<Self>,
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
            let request = Request::from_parts(parts, boxed(body));
            return Box::pin(self.bypass(request)).await;
        }
        if !media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return self.reject(Error::UnsupportedMediaType);
        }
        let body = match self.read_body(&parts, body).await {
            Ok(body) => body,
            Err(error) => return self.reject(error),
        };
        match self.answer(parts, body) {
            Answer::Ready(response) => response,
            Answer::Pending(later) => later.await,
        }
    }

    /// Reads the whole form body, refusing one over the limit before and while reading.
    async fn read_body(&self, parts: &Parts, body: hyper::body::Incoming) -> Result<Bytes, Error> {
        let limit = self.max_request_body;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(Error::PayloadTooLarge { limit });
        }
        match Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(Error::PayloadTooLarge { limit })
            }
            Err(_) => Err(Error::InvalidRequest("the request body could not be read")),
        }
    }

    /// Everything after the body is read: key the request, decide under the entry's lock, and
    /// answer (a hit) or return what to wait for.
    fn answer(self: &Arc<Self>, parts: Parts, body: Bytes) -> Answer<'_> {
        let host = match self
            .preserve_host
            .then(|| parts.headers.get(header::HOST))
            .flatten()
        {
            Some(value) => match value.to_str() {
                Ok(host) => Some(host),
                Err(_) => {
                    return Answer::Ready(
                        self.reject(Error::InvalidRequest("malformed Host header")),
                    );
                }
            },
            None => None,
        };
        let context = KeyContext {
            route: &self.name,
            path: parts.uri.path(),
            query: parts.uri.query(),
            host,
        };
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let (key, grant, client_id) =
            match request::parse(&self.keyer, &context, authorization, &body) {
                Err(error) => return Answer::Ready(self.reject(error)),
                Ok(Parsed::PassThrough) => {
                    let request = Request::from_parts(parts, full(body));
                    return Answer::Pending(Box::pin(self.bypass(request)));
                }
                Ok(Parsed::Keyed {
                    key,
                    grant,
                    client_id,
                }) => (key, grant, client_id),
            };
        let now = Instant::now();
        let cooldowns = self.flights.cooldowns();
        let (decision, evicted) = self
            .cache
            .decide(key, now, || cooldowns.remaining(&client_id, now));
        self.metrics.evicted("capacity", evicted);
        // A flight takes the request as the caller sent it, to send it on unchanged. The client id
        // is borrowed from the body until then.
        match decision {
            Decision::Hit { token, refresh } => {
                if let Some(landing) = refresh {
                    debug!(route = %self.name, client = %client_hash(&client_id), "refresh ahead");
                    let client_id = client_id.into_owned();
                    self.flights.launch(Flight {
                        landing,
                        grant,
                        client_id,
                        parts,
                        body,
                    });
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
            Decision::Cooldown(left) => {
                self.record(Outcome::Cooldown);
                let retry_after_secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                let error = Error::CoolingDown { retry_after_secs };
                Answer::Ready(respond::error(error, CacheStatus::Cooldown))
            }
            Decision::Join(rx) => Answer::Pending(Box::pin(self.wait(rx, Outcome::Coalesced))),
            Decision::Lead {
                flight: landing,
                rx,
                stale,
            } => {
                let client_id = client_id.into_owned();
                self.flights.launch(Flight {
                    landing,
                    grant,
                    client_id,
                    parts,
                    body,
                });
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
        self.outcomes[outcome as usize].inc();
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
    async fn wait(&self, mut rx: FlightRx, role: Outcome) -> Response<Body> {
        let shared = match tokio::time::timeout(
            self.config.wait_timeout,
            rx.wait_for(Option::is_some),
        )
        .await
        {
            Ok(Ok(shared)) => shared.clone().expect("waited for Some"),
            // The flight task died without landing (a bug): its landing freed the slot.
            Ok(Err(_)) => Shared::Failed(Error::Internal),
            Err(_) => Shared::Failed(Error::WaitTimeout),
        };
        let fetch = if role == Outcome::Stale {
            Fetch::Stale
        } else {
            Fetch::Miss
        };
        let collapsed = role == Outcome::Coalesced;
        let status = |fetched| CacheStatus::Fetched {
            fetch,
            fetched,
            collapsed,
        };
        match shared {
            Shared::Token(token) => {
                self.record(role);
                respond::token(&token, Instant::now(), status(Fetched::Token))
            }
            Shared::Reply(reply) => {
                self.record(role);
                respond::reply(&reply, status(Fetched::Reply(reply.status)))
            }
            Shared::Failed(error) => {
                self.record(Outcome::Error);
                debug!(route = %self.name, fault = error.fault().as_str(), error = %error, "token request answered with an error");
                respond::error(error.clone(), status(Fetched::Failed(error.code())))
            }
        }
    }
}

impl RouteState for TokenRoute {
    fn name(&self) -> &str {
        &self.name
    }

    fn cache_len(&self) -> usize {
        self.cache.len()
    }

    fn active_cooldowns(&self) -> Vec<(String, Duration)> {
        self.flights
            .cooldowns()
            .active(Instant::now())
            .into_iter()
            .map(|(client, left)| (client_hash(&client), left))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_labels_are_distinct_and_listed_in_order() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i);
        }
        let labels: std::collections::HashSet<_> =
            Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
