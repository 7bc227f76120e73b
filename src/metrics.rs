//! Prometheus metrics: one registry built in `run` and handed down, so parallel tests never share
//! counters. Hot-path counters are resolved per route once, at start, so a cache hit costs one
//! atomic add. Gauges that describe state (cache size, cool-downs) are read at scrape time.
//! Labels never carry a secret; a client label is a short hash of the client id.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// The help of `token_sidecar_token_requests_total`; it names every outcome label (a test in
/// `token::outcome` holds it to the list).
pub(crate) const TOKEN_REQUESTS_HELP: &str = "Token-path requests by outcome (hit, miss, stale, coalesced, cooldown, remembered, bypass, invalid, error, full)";

/// What a route shows at scrape time and on `/status`. Implemented by the token path; the
/// metrics and the admin listener know the labels, not the types behind them.
pub(crate) trait RouteState: Send + Sync + std::fmt::Debug {
    /// The route's state for `/status`: keys, calls in progress, cool-downs and limits, by
    /// client hash only.
    fn status(&self) -> crate::status::RouteStatus;
    /// The route's name, the `route` label.
    fn name(&self) -> &str;
    /// Cached keys.
    fn cache_len(&self) -> usize;
    /// Active cool-downs: client hash and time left.
    fn active_cooldowns(&self) -> Vec<(String, Duration)>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    route: String,
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetOutcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetOp {
    op: &'static str,
}

/// The Genesys notification channel metrics, registered only with the preset.
#[derive(Debug, Clone)]
pub(crate) struct ChannelMetrics {
    created: Family<RouteLabel, Counter>,
    most: Family<RouteLabel, Gauge>,
}

impl ChannelMetrics {
    /// Counts a channel created through `route`, whose creator has now created `count` in the
    /// window.
    pub(crate) fn created(&self, route: &str, most: usize) {
        let label = RouteLabel {
            route: route.to_owned(),
        };
        self.created.get_or_create(&label).inc();
        self.most
            .get_or_create(&label)
            .set(i64::try_from(most).unwrap_or(i64::MAX));
    }
}

/// The fleet tier's metrics, registered only when it is on.
#[derive(Debug, Clone)]
pub(crate) struct FleetMetrics {
    claims: Family<FleetOutcome, Counter>,
    errors: Family<FleetOp, Counter>,
    breaker: Gauge,
}

impl FleetMetrics {
    /// Counts one fleet claim or commit by what it found.
    pub(crate) fn claim(&self, outcome: &'static str) {
        self.claims.get_or_create(&FleetOutcome { outcome }).inc();
    }

    /// Counts one failed Redis call.
    pub(crate) fn error(&self, op: &'static str) {
        self.errors.get_or_create(&FleetOp { op }).inc();
    }

    /// Sets the breaker's state (0 closed, 1 open, 2 half-open).
    pub(crate) fn breaker(&self, state: i64) {
        self.breaker.set(state);
    }
}

/// Every metric family, registered once.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    token_requests: Family<OutcomeLabels, Counter>,
    upstream_calls: Family<StatusLabels, Counter>,
    upstream_latency: Family<RouteLabel, Histogram>,
    upstream_in_flight: Family<RouteLabel, Gauge>,
    flight_waiters: Family<RouteLabel, Histogram>,
    evictions: Family<ReasonLabels, Counter>,
    forwarded: Family<StatusLabels, Counter>,
    holds_absorbed: Family<RouteLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family in a fresh registry.
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("token_sidecar");
        let token_requests = Family::default();
        registry.register(
            "token_requests",
            TOKEN_REQUESTS_HELP,
            token_requests.clone(),
        );
        let upstream_calls = Family::default();
        registry.register(
            "upstream_token_calls",
            "Token calls made to the provider, by HTTP status or transport failure",
            upstream_calls.clone(),
        );
        let upstream_latency = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 13))
        });
        registry.register(
            "upstream_token_call_duration_seconds",
            "Latency of token calls to the provider",
            upstream_latency.clone(),
        );
        let upstream_in_flight = Family::default();
        registry.register(
            "upstream_token_calls_in_flight",
            "Token calls to the provider in progress",
            upstream_in_flight.clone(),
        );
        let flight_waiters = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 4.0, 8))
        });
        registry.register(
            "flight_waiters",
            "Callers that shared one upstream token call",
            flight_waiters.clone(),
        );
        let evictions = Family::default();
        registry.register(
            "cache_evictions",
            "Cache entries dropped, by reason (idle, expired, capacity)",
            evictions.clone(),
        );
        let forwarded = Family::default();
        registry.register(
            "forwarded_requests",
            "Requests forwarded unchanged to the provider, by response status",
            forwarded.clone(),
        );
        let holds_absorbed = Family::default();
        registry.register(
            "holds_absorbed",
            "Holds (Retry-After, backoff) waited out with the callers waiting, instead of answering 429",
            holds_absorbed.clone(),
        );
        Metrics {
            holds_absorbed,
            registry,
            token_requests,
            upstream_calls,
            upstream_latency,
            upstream_in_flight,
            flight_waiters,
            evictions,
            forwarded,
        }
    }

    /// The handles one route uses on its request path.
    pub(crate) fn route(&self, route: &str) -> RouteMetrics {
        let route_label = RouteLabel {
            route: route.to_owned(),
        };
        // The series a healthy route moves first exists from the start at 0, so rate() sees its
        // first increase (a series born at 1 has none to Prometheus).
        let _ = self.upstream_calls.get_or_create(&StatusLabels {
            route: route.to_owned(),
            status: "200".to_owned(),
        });
        RouteMetrics {
            route: route.to_owned(),
            token_requests: self.token_requests.clone(),
            upstream_calls: self.upstream_calls.clone(),
            upstream_latency: self.upstream_latency.get_or_create(&route_label).clone(),
            upstream_in_flight: self.upstream_in_flight.get_or_create(&route_label).clone(),
            flight_waiters: self.flight_waiters.get_or_create(&route_label).clone(),
            evictions: self.evictions.clone(),
            forwarded: self.forwarded.clone(),
            forwarded_by_status: CACHED_STATUSES.map(|_| OnceLock::new()).collect(),
            holds_absorbed: self.holds_absorbed.get_or_create(&route_label).clone(),
        }
    }

    /// Registers the Genesys notification channel families (only with the Genesys preset).
    pub(crate) fn channels(&mut self) -> ChannelMetrics {
        let created = Family::default();
        self.registry.register(
            "genesys_notification_channels_created",
            "Genesys Cloud notification channels created through the route (POST /api/v2/notifications/channels answered 2xx); Genesys keeps 20 per user and app",
            created.clone(),
        );
        let most = Family::default();
        self.registry.register(
            "genesys_notification_channels_max_per_client",
            "The most notification channels one client (an injected client, or one bearer token) created through the route in the last 24 hours; over 20, Genesys closes the oldest",
            most.clone(),
        );
        ChannelMetrics { created, most }
    }

    /// Registers the fleet tier's families (only when it is configured).
    pub(crate) fn fleet(&mut self) -> FleetMetrics {
        let claims = Family::default();
        self.registry.register(
            "shared_claims",
            "Fleet-tier round trips by what they found (hit, lead, busy, cooldown, unreadable, commit; skipped while the breaker is open)",
            claims.clone(),
        );
        let errors = Family::default();
        self.registry.register(
            "shared_errors",
            "Failed or timed-out Redis calls, by operation (claim, commit, subscribe)",
            errors.clone(),
        );
        let breaker = Gauge::default();
        self.registry.register(
            "shared_breaker_state",
            "The Redis circuit breaker: 0 closed (Redis used), 1 open (every pod alone), 2 half-open (one trial)",
            breaker.clone(),
        );
        FleetMetrics {
            claims,
            errors,
            breaker,
        }
    }

    /// Adds the scrape-time view of the routes' caches and cool-downs.
    pub(crate) fn register_routes(&mut self, routes: Vec<Weak<dyn RouteState>>) {
        self.registry
            .register_collector(Box::new(StateCollector { routes }));
    }

    /// The Prometheus text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Per-route metric handles, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct RouteMetrics {
    route: String,
    token_requests: Family<OutcomeLabels, Counter>,
    upstream_calls: Family<StatusLabels, Counter>,
    upstream_latency: Histogram,
    /// Token calls in progress on this route.
    pub upstream_in_flight: Gauge,
    flight_waiters: Histogram,
    evictions: Family<ReasonLabels, Counter>,
    forwarded: Family<StatusLabels, Counter>,
    /// This route's `forwarded` counters by status (100 to 599), each resolved on first use:
    /// counting a forwarded request is then one atomic add, not two allocations and a lookup.
    forwarded_by_status: Arc<[OnceLock<Counter>]>,
    holds_absorbed: Counter,
}

/// The statuses whose `forwarded` counters a route keeps at hand: 100 to 599.
const CACHED_STATUSES: std::ops::Range<u16> = 100..600;

impl RouteMetrics {
    /// Counts one hold waited out for waiting callers.
    pub(crate) fn hold_absorbed(&self) {
        self.holds_absorbed.inc();
    }

    /// The counter of this route's token requests with `outcome`, resolved once so that
    /// counting costs one atomic add.
    pub(crate) fn token_requests(&self, outcome: &'static str) -> Counter {
        self.token_requests
            .get_or_create(&OutcomeLabels {
                route: self.route.clone(),
                outcome,
            })
            .clone()
    }

    /// Counts one finished upstream token call.
    pub(crate) fn upstream_call(&self, status: &str, seconds: f64, waiters: usize) {
        self.upstream_calls
            .get_or_create(&StatusLabels {
                route: self.route.clone(),
                status: status.to_owned(),
            })
            .inc();
        self.upstream_latency.observe(seconds);
        self.flight_waiters.observe(waiters as f64);
    }

    /// Counts evicted cache entries.
    pub(crate) fn evicted(&self, reason: &'static str, count: usize) {
        if count > 0 {
            self.evictions
                .get_or_create(&ReasonLabels {
                    route: self.route.clone(),
                    reason,
                })
                .inc_by(count as u64);
        }
    }

    /// Counts one forwarded request.
    pub(crate) fn forwarded(&self, status: u16) {
        let counter = || {
            self.forwarded
                .get_or_create(&StatusLabels {
                    route: self.route.clone(),
                    status: status.to_string(),
                })
                .clone()
        };
        match self
            .forwarded_by_status
            .get(usize::from(status.wrapping_sub(CACHED_STATUSES.start)))
        {
            Some(cached) => cached.get_or_init(counter).inc(),
            None => counter().inc(),
        };
    }
}

/// Most `cooldown_remaining_seconds` series per route: the holds with the most time left.
pub(crate) const MAX_COOLDOWN_SERIES: usize = 20;

/// Reads cache sizes and cool-downs from the live routes at scrape time.
#[derive(Debug)]
struct StateCollector {
    routes: Vec<Weak<dyn RouteState>>,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let entries = Family::<RouteLabel, Gauge>::default();
        let cooldowns = Family::<RouteLabel, Gauge>::default();
        let cooldown_left =
            Family::<ClientLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for route in self.routes.iter().filter_map(Weak::upgrade) {
            let label = RouteLabel {
                route: route.name().to_owned(),
            };
            entries.get_or_create(&label).set(route.cache_len() as i64);
            let mut active = route.active_cooldowns();
            cooldowns.get_or_create(&label).set(active.len() as i64);
            // One series per client, but only for the longest holds: a caller inventing client
            // ids must not be able to grow the exposition without bound.
            active.sort_by_key(|(_, left)| std::cmp::Reverse(*left));
            active.truncate(MAX_COOLDOWN_SERIES);
            for (client, left) in active {
                cooldown_left
                    .get_or_create(&ClientLabels {
                        route: label.route.clone(),
                        client,
                    })
                    .set(left.as_secs_f64());
            }
        }
        let m = encoder.encode_descriptor(
            "cache_entries",
            "Cached token keys",
            None,
            entries.metric_type(),
        )?;
        entries.encode(m)?;
        let m = encoder.encode_descriptor(
            "cooldowns_active",
            "Client ids on hold after the provider said to wait or failed",
            None,
            cooldowns.metric_type(),
        )?;
        cooldowns.encode(m)?;
        let m = encoder.encode_descriptor(
            "cooldown_remaining_seconds",
            "Seconds left on the active holds with the most time left (at most 20 per route), by client hash",
            None,
            cooldown_left.metric_type(),
        )?;
        cooldown_left.encode(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_requests_are_counted_by_route_and_status() {
        let metrics = Metrics::new();
        let (api, other) = (metrics.route("api"), metrics.route("other"));
        for status in [200, 200, 404, 999] {
            api.forwarded(status);
        }
        api.clone().forwarded(200);
        other.forwarded(200);
        let text = metrics.encode();
        for line in [
            r#"token_sidecar_forwarded_requests_total{route="api",status="200"} 3"#,
            r#"token_sidecar_forwarded_requests_total{route="api",status="404"} 1"#,
            r#"token_sidecar_forwarded_requests_total{route="api",status="999"} 1"#,
            r#"token_sidecar_forwarded_requests_total{route="other",status="200"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
