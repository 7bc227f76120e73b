//! One route's upstream token calls, from launch to landing: admit (the route's outbound limits),
//! exchange (the call itself, through [`Upstream::exchange`]), classify (what the answer means for
//! the callers and the client's cool-down), land (into the entry, see [`Landing`]), publish (to
//! every waiter) and log.
//!
//! A flight runs in its own task, so a caller that hangs up cannot cancel it for the others, and
//! on a tracker, so shutdown waits for it; its callers [`wait`] for it, bounded in time. The [`Flight`] value owns everything the call needs,
//! its [`Landing`] included: whatever happens to the task, the flight slot is freed.

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderValue};
use http::request::Parts;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::cache::{FlightRx, Landing, Shared};
use super::cooldown::{self, Cooldowns};
use super::lifetime::{Token, Validated};
use super::limiter::Limiter;
use super::request::Grant;
use crate::config::TokenConfig;
use crate::error::{Error, HeldBy};
use crate::metrics::RouteMetrics;
use crate::telemetry::client_hash;
use crate::upstream::{Reply, Upstream};

/// One upstream call to make: the request as the caller sent it and where its outcome lands.
#[derive(Debug)]
pub(crate) struct Flight {
    pub landing: Landing,
    pub grant: Grant,
    pub client_id: String,
    pub parts: Parts,
    pub body: Bytes,
}

/// What a flight that reached the provider reports: the metric label, the hold it started, and
/// how long the call took.
struct Call {
    label: String,
    hold: Option<Duration>,
    latency: Duration,
}

/// Rounds of one flight at most, each a call or a hold waited out (each hold is at least 1 ms
/// and all of them together at most `absorb_hold`; this bounds the loop whatever others do).
const MAX_ATTEMPTS: usize = 16;

/// Whole seconds, rounded up: a `Retry-After` is never early.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A copy of a request head for one attempt: what the provider needs, without the extensions
/// the local connection attached.
fn head(parts: &Parts) -> Parts {
    let mut request = http::Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

/// Waits up to `timeout` for a flight to land and returns what it brought back.
pub(crate) async fn wait(mut rx: FlightRx, timeout: Duration) -> Shared {
    match tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await {
        Ok(Ok(shared)) => shared.clone().expect("waited for Some"),
        // The flight task died without landing (a bug): its landing freed the slot.
        Ok(Err(_)) => Shared::Failed(Error::Internal),
        Err(_) => Shared::Failed(Error::WaitTimeout),
    }
}

/// Everything one route's flights share.
#[derive(Debug)]
pub(crate) struct Flights {
    route: String,
    config: TokenConfig,
    /// Largest token answer read from the provider.
    max_response: usize,
    upstream: Arc<Upstream>,
    limiter: Limiter,
    cooldowns: Cooldowns,
    metrics: RouteMetrics,
    /// Flights run here so shutdown can wait for them.
    tracker: TaskTracker,
}

impl Flights {
    /// The flights of route `route`, calling `upstream`.
    pub(crate) fn new(
        route: &str,
        config: &TokenConfig,
        max_response: usize,
        upstream: Arc<Upstream>,
        metrics: RouteMetrics,
        tracker: TaskTracker,
    ) -> Flights {
        Flights {
            route: route.to_owned(),
            config: config.clone(),
            max_response,
            upstream,
            limiter: Limiter::new(
                config.max_concurrent_calls,
                config.calls_per_second,
                config.calls_burst,
            ),
            cooldowns: Cooldowns::new(route),
            metrics,
            tracker,
        }
    }

    /// The route's cool-downs, which flights start and clear.
    pub(crate) fn cooldowns(&self) -> &Cooldowns {
        &self.cooldowns
    }

    /// Starts `flight` in its own tracked task.
    pub(crate) fn launch(self: &Arc<Self>, flight: Flight) {
        let flights = self.clone();
        self.tracker.spawn(async move { flights.fly(flight).await });
    }

    /// One flight: admit, exchange, classify, land, publish, log. A hold that ends before the
    /// callers' deadline and within `absorb_hold` is waited out and the call made again, so the
    /// callers get the token instead of the provider's 429.
    async fn fly(&self, flight: Flight) {
        let Flight {
            landing,
            grant,
            client_id,
            parts,
            body,
        } = flight;
        let deadline = Instant::now() + self.config.wait_timeout;
        let mut absorbed = Duration::ZERO;
        let mut shared = None;
        for _ in 0..MAX_ATTEMPTS {
            if let Some(hold) = self.cooldowns.remaining(&client_id, Instant::now()) {
                if self.absorb(hold.left, &mut absorbed, deadline).await {
                    continue;
                }
                let error = Error::CoolingDown {
                    retry_after_secs: ceil_secs(hold.left),
                    by: hold.by,
                };
                shared = Some(Shared::Failed(error));
                break;
            }
            let (answer, call) = self.attempt(grant, &client_id, &parts, &body).await;
            let hold = call.as_ref().and_then(|call| call.hold);
            if let Some(call) = &call {
                self.log(&client_id, call, landing.waiters());
            }
            shared = Some(answer);
            match hold {
                Some(hold) if self.absorb(hold, &mut absorbed, deadline).await => continue,
                _ => break,
            }
        }
        // Every attempt went to waiting out holds that others kept extending: say so.
        let shared = shared.unwrap_or_else(|| {
            let hold = self.cooldowns.remaining(&client_id, Instant::now());
            Shared::Failed(Error::CoolingDown {
                retry_after_secs: hold.map_or(1, |hold| ceil_secs(hold.left).max(1)),
                by: hold.map_or(HeldBy::Backoff, |hold| hold.by),
            })
        });
        landing.land(shared, grant, &self.config, Instant::now(), rand::random());
    }

    /// Waits out a hold of `left` if it fits in what is left of `absorb_hold` and ends early
    /// enough for a call to finish before `deadline`; false if it does not.
    async fn absorb(&self, left: Duration, absorbed: &mut Duration, deadline: Instant) -> bool {
        let fits = *absorbed + left <= self.config.absorb_hold
            && Instant::now() + left + self.upstream.request_timeout <= deadline;
        if fits {
            self.metrics.hold_absorbed();
            tokio::time::sleep(left).await;
            *absorbed += left;
        }
        fits
    }

    /// One call through the route's limits: what the callers would get, and what to count and log
    /// (`None` when the limits held the call back and the provider never saw it).
    async fn attempt(
        &self,
        grant: Grant,
        client_id: &str,
        parts: &Parts,
        body: &Bytes,
    ) -> (Shared, Option<Call>) {
        // Queue behind the route's limits only as long as the call could still finish before
        // the callers' deadline; past that, tell them honestly when to come back.
        let max_queue = self
            .config
            .wait_timeout
            .saturating_sub(self.upstream.request_timeout);
        match self.limiter.admit(max_queue).await {
            Err(held) => {
                let retry_after_secs = ceil_secs(held.retry_after).max(1);
                warn!(route = %self.route, retry_after_s = retry_after_secs, "upstream token call held back by the route's limits");
                let by = HeldBy::OwnLimit;
                (
                    Shared::Failed(Error::CoolingDown {
                        retry_after_secs,
                        by,
                    }),
                    None,
                )
            }
            Ok(_permit) => {
                let (shared, call) = self.call(grant, client_id, head(parts), body.clone()).await;
                (shared, Some(call))
            }
        }
    }

    /// Makes the call the limiter admitted and classifies its answer.
    async fn call(
        &self,
        grant: Grant,
        client_id: &str,
        parts: Parts,
        body: Bytes,
    ) -> (Shared, Call) {
        self.metrics.upstream_in_flight.inc();
        let sent = Instant::now();
        let answer = self.upstream.exchange(parts, body, self.max_response).await;
        let latency = sent.elapsed();
        self.metrics.upstream_in_flight.dec();
        let now = Instant::now();
        let (shared, label, hold) = match answer {
            Ok(reply) => {
                let label = reply.status.as_u16().to_string();
                let (shared, hold) = self.classify(grant, reply, client_id, sent, now);
                (shared, label, hold)
            }
            Err(failure) => {
                warn!(route = %self.route, upstream = %self.upstream.url, reason = %failure.reason(), "upstream token call failed");
                let hold = self.start_hold(client_id, HeldBy::Backoff, None, now);
                (
                    Shared::Failed(failure.to_error()),
                    failure.label(),
                    Some(hold),
                )
            }
        };
        (
            shared,
            Call {
                label,
                hold,
                latency,
            },
        )
    }

    /// Turns an upstream answer into what waiters receive, starting or clearing the client's
    /// cool-down before the flight lands (so no request slips in between).
    fn classify(
        &self,
        grant: Grant,
        reply: Reply,
        client_id: &str,
        sent: Instant,
        now: Instant,
    ) -> (Shared, Option<Duration>) {
        if reply.status.is_success() {
            return self.classify_success(grant, reply, client_id, sent, now);
        }
        let hold = match reply.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                let given = reply
                    .headers
                    .get(header::RETRY_AFTER)
                    .and_then(|v| cooldown::parse_retry_after(v, SystemTime::now()));
                Some(self.start_hold(client_id, HeldBy::Provider, given, now))
            }
            status if status.is_server_error() => {
                Some(self.start_hold(client_id, HeldBy::Backoff, None, now))
            }
            _ => None,
        };
        (Shared::Reply(Arc::new(reply)), hold)
    }

    /// A 2xx answer: a token to cache (its lifetime counted from `sent`), an answer to pass on,
    /// or an unusable body.
    fn classify_success(
        &self,
        grant: Grant,
        reply: Reply,
        client_id: &str,
        sent: Instant,
        now: Instant,
    ) -> (Shared, Option<Duration>) {
        let content_type = reply
            .headers
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("application/json"));
        // The lifetime counts from when the request left: the provider's clock started no later.
        match Token::from_upstream(
            &reply.body,
            content_type,
            sent,
            &self.config,
            rand::random(),
        ) {
            Ok(Validated::Token(mut token)) => {
                self.cooldowns.clear(client_id);
                if grant == Grant::RefreshToken {
                    token.keep_briefly(now + self.config.refresh_token_ttl);
                }
                (Shared::Token(Arc::new(token)), None)
            }
            Ok(Validated::Uncacheable) => {
                self.cooldowns.clear(client_id);
                (Shared::Reply(Arc::new(reply)), None)
            }
            Err(why) => {
                warn!(route = %self.route, why, "upstream token response unusable");
                let hold = self.start_hold(client_id, HeldBy::Backoff, None, now);
                (Shared::Failed(Error::UpstreamInvalid(why)), Some(hold))
            }
        }
    }

    fn start_hold(
        &self,
        client_id: &str,
        by: HeldBy,
        retry_after: Option<Duration>,
        now: Instant,
    ) -> Duration {
        self.cooldowns.start(
            client_id,
            by,
            retry_after,
            &self.config,
            now,
            rand::random(),
        )
    }

    fn log(&self, client_id: &str, call: &Call, waiters: usize) {
        self.metrics
            .upstream_call(&call.label, call.latency.as_secs_f64(), waiters);
        info!(
            route = %self.route,
            client = %client_hash(client_id),
            status = %call.label,
            latency_ms = call.latency.as_millis() as u64,
            retry_after_s = call.hold.map(|d| d.as_secs()),
            waiters,
            "upstream token call"
        );
    }
}
