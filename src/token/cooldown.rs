//! Cool-downs: when the provider says to wait (`429`/`503` with `Retry-After`) or fails (5xx,
//! connection errors, timeouts, unusable answers), the client id is put on hold and no upstream
//! call is made for it until the hold ends. Without a usable `Retry-After` the hold grows
//! exponentially with full jitter; a success clears it.

use dashmap::DashMap;
use http::HeaderValue;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::info;

use crate::config::TokenConfig;
use crate::error::HeldBy;
use crate::telemetry::client_hash;

/// Parses `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date. A date in the past, an
/// empty value or garbage is not usable (`None`), so the caller falls back to backoff.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long digit strings saturate; the configured cap bounds them later.
        return Some(Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    date.duration_since(now).ok().filter(|d| !d.is_zero())
}

/// Full-jitter exponential backoff: uniform in `[0, min(cap, base * 2^failures))`, never zero so
/// that a retry is at least a millisecond away.
pub fn backoff(failures: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let ceiling = base
        .checked_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(cap)
        .min(cap);
    ceiling
        .mul_f64(if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        })
        .max(Duration::from_millis(1))
}

/// One client id's hold.
#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    /// Consecutive failures, for the exponent; reset by a success.
    failures: u32,
    /// Why the hold was last started or extended.
    by: HeldBy,
}

/// An active hold as a request sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cooling {
    pub(crate) left: Duration,
    pub(crate) by: HeldBy,
}

/// The holds of one route, by client id.
#[derive(Debug)]
pub(crate) struct Cooldowns {
    /// The route's name, for logs.
    route: String,
    holds: DashMap<Arc<str>, Hold>,
}

impl Cooldowns {
    /// No holds yet.
    pub(crate) fn new(route: &str) -> Cooldowns {
        Cooldowns {
            route: route.to_owned(),
            holds: DashMap::new(),
        }
    }

    /// `client`'s hold at `now`, if one is active.
    pub(crate) fn remaining(&self, client: &str, now: Instant) -> Option<Cooling> {
        let hold = self.holds.get(client)?;
        (hold.until > now).then(|| Cooling {
            left: hold.until - now,
            by: hold.by,
        })
    }

    /// Starts or extends a hold after a failure or throttle, returning its length. An explicit,
    /// non-zero `retry_after` wins (capped by `retry_after_max`); otherwise the backoff schedule
    /// applies.
    pub(crate) fn start(
        &self,
        client: &str,
        by: HeldBy,
        retry_after: Option<Duration>,
        config: &TokenConfig,
        now: Instant,
        unit: f64,
    ) -> Duration {
        let mut hold = self.holds.entry(Arc::from(client)).or_insert(Hold {
            until: now,
            failures: 0,
            by,
        });
        hold.by = by;
        // `Retry-After: 0` would be no hold at all, and an immediate retry herd: back off instead.
        let delay = match retry_after {
            Some(wait) if !wait.is_zero() => wait.min(config.retry_after_max),
            _ => backoff(hold.failures, config.backoff_base, config.backoff_max, unit),
        };
        hold.failures = hold.failures.saturating_add(1);
        // Never shorten a hold another flight of the same client already set.
        hold.until = hold.until.max(now + delay);
        let left = hold.until - now;
        info!(
            route = %self.route,
            client = %client_hash(client),
            cause = ?by,
            retry_after_s = left.as_secs_f64(),
            failures = hold.failures,
            "cool-down started"
        );
        left
    }

    /// Clears `client`'s hold after a success.
    pub(crate) fn clear(&self, client: &str) {
        if let Some((_, hold)) = self.holds.remove(client) {
            info!(route = %self.route, client = %client_hash(client), failures = hold.failures, "cool-down ended");
        }
    }

    /// Drops holds that ended long enough ago that their failure count no longer matters, so the
    /// map stays bounded by the clients that failed recently.
    pub(crate) fn sweep(&self, now: Instant, forget_after: Duration) {
        self.holds.retain(|_, hold| hold.until + forget_after > now);
    }

    /// Active holds and their seconds left, for the metrics.
    pub(crate) fn active(&self, now: Instant) -> Vec<(Arc<str>, Duration)> {
        self.holds
            .iter()
            .filter(|h| h.until > now)
            .map(|h| (h.key().clone(), h.until - now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let parse = |v: &str| parse_retry_after(&HeaderValue::from_str(v).unwrap(), now);
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 7 "), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse(&date), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse(&past), None);
        assert_eq!(parse("soon"), None);
        assert_eq!(parse("-5"), None);
        assert_eq!(parse("1.5"), None);
        assert_eq!(
            parse("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        assert_eq!(backoff(0, base, cap, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(3, base, cap, 0.5), Duration::from_secs(4));
        assert_eq!(backoff(10, base, cap, 1.0), cap);
        assert_eq!(backoff(500, base, cap, 1.0), cap);
        assert_eq!(backoff(2, base, cap, 0.0), Duration::from_millis(1));
    }

    #[test]
    fn holds_honour_retry_after_cap_and_clear_on_success() {
        let config = TokenConfig::default();
        let cd = Cooldowns::new("r");
        let now = Instant::now();
        assert_eq!(cd.remaining("a", now), None);
        let left = cd.start(
            "a",
            HeldBy::Provider,
            Some(Duration::from_secs(10)),
            &config,
            now,
            0.5,
        );
        assert_eq!(left, Duration::from_secs(10));
        assert_eq!(
            cd.remaining("a", now + Duration::from_secs(4)),
            Some(Cooling {
                left: Duration::from_secs(6),
                by: HeldBy::Provider
            })
        );
        assert_eq!(cd.remaining("a", now + Duration::from_secs(10)), None);
        assert_eq!(cd.remaining("b", now), None);
        let capped = cd.start(
            "a",
            HeldBy::Provider,
            Some(Duration::from_secs(1 << 40)),
            &config,
            now,
            0.5,
        );
        assert_eq!(capped, config.retry_after_max);
        cd.clear("a");
        assert_eq!(cd.remaining("a", now), None);
    }

    #[test]
    fn a_retry_after_of_zero_backs_off_instead_of_holding_nothing() {
        let config = TokenConfig::default();
        let cd = Cooldowns::new("r");
        let now = Instant::now();
        let left = cd.start(
            "a",
            HeldBy::Provider,
            Some(Duration::ZERO),
            &config,
            now,
            1.0,
        );
        assert_eq!(left, config.backoff_base);
        assert!(cd.remaining("a", now).is_some());
    }

    #[test]
    fn consecutive_failures_grow_the_backoff_ceiling() {
        let config = TokenConfig::default();
        let cd = Cooldowns::new("r");
        let now = Instant::now();
        let first = cd.start("a", HeldBy::Backoff, None, &config, now, 1.0);
        let later = now + first;
        let second = cd.start("a", HeldBy::Backoff, None, &config, later, 1.0);
        assert_eq!(first, config.backoff_base);
        assert_eq!(second, config.backoff_base * 2);
    }
}
