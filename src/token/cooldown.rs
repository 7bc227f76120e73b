//! Cool-downs: when the provider says to wait (`429`/`503` with `Retry-After`) or fails (5xx,
//! connection errors, timeouts, unusable answers), the client id is put on hold and no upstream
//! call is made for it until the hold ends. Without a usable `Retry-After` the hold grows
//! exponentially with full jitter; a success clears it.

use dashmap::DashMap;
use http::HeaderValue;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::TokenConfig;
use crate::error::HeldBy;

/// The per-client tables are keyed by the client's digest, made once per request from its
/// canonical form (see [`super::request::Canonical::client_key`]).
pub(crate) use super::request::ClientKey;

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

/// The provider's clock when it answered: its `Date` header if it has a usable one, else ours. A
/// `Retry-After` date is read against it, so a skewed clock on either side does not stretch or
/// cut the hold (RFC 9110 §10.2.3 counts from the response's own date).
pub(crate) fn provider_clock(headers: &http::HeaderMap) -> SystemTime {
    headers
        .get(http::header::DATE)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| httpdate::parse_http_date(text).ok())
        .unwrap_or_else(SystemTime::now)
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

/// The holds of one route, by client id, at most `cap` of them.
#[derive(Debug)]
pub(crate) struct Cooldowns {
    /// The route's name and which table this is, for logs.
    route: String,
    holds: DashMap<ClientKey, Hold>,
    /// Most client ids held; a new one past it takes the place of the hold that ends first.
    cap: usize,
}

impl Cooldowns {
    /// No holds yet; at most `cap` client ids at once.
    pub(crate) fn new(route: &str, cap: usize) -> Cooldowns {
        Cooldowns {
            route: route.to_owned(),
            holds: DashMap::new(),
            cap: cap.max(1),
        }
    }

    /// `client`'s hold at `now`, if one is active.
    pub(crate) fn remaining(&self, client: &ClientKey, now: Instant) -> Option<Cooling> {
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
        client: &ClientKey,
        by: HeldBy,
        retry_after: Option<Duration>,
        config: &TokenConfig,
        now: Instant,
        unit: f64,
    ) -> Duration {
        if !self.holds.contains_key(client) && self.holds.len() >= self.cap {
            self.make_room(now);
        }
        let mut hold = self.holds.entry(*client).or_insert(Hold {
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
            client = %client.label(),
            cause = ?by,
            retry_after_s = left.as_secs_f64(),
            failures = hold.failures,
            "cool-down started"
        );
        left
    }

    /// Clears `client`'s hold after a success.
    pub(crate) fn clear(&self, client: &ClientKey) {
        if let Some((_, hold)) = self.holds.remove(client) {
            info!(route = %self.route, client = %client.label(), failures = hold.failures, "cool-down ended");
        }
    }

    /// A full table: forget the holds that have ended, and if every hold is active, the one that
    /// ends first (its client's next failure starts a fresh backoff).
    fn make_room(&self, now: Instant) {
        self.holds.retain(|_, hold| hold.until > now);
        if self.holds.len() < self.cap {
            return;
        }
        let first = self.holds.iter().min_by_key(|h| h.until).map(|h| *h.key());
        if let Some(first) = first {
            self.holds.remove(&first);
            warn!(route = %self.route, cap = self.cap, "cool-down table full: the hold ending first was dropped");
        }
    }

    /// Number of client ids in the table, active or not.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.holds.len()
    }

    /// Drops holds that ended long enough ago that their failure count no longer matters, so the
    /// map stays bounded by the clients that failed recently.
    pub(crate) fn sweep(&self, now: Instant, forget_after: Duration) {
        self.holds.retain(|_, hold| hold.until + forget_after > now);
    }

    /// Active holds and their seconds left, for the metrics.
    pub(crate) fn active(&self, now: Instant) -> Vec<(ClientKey, Duration)> {
        self.holds
            .iter()
            .filter(|h| h.until > now)
            .map(|h| (*h.key(), h.until - now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> ClientKey {
        ClientKey::of(id)
    }

    #[test]
    fn the_table_never_holds_more_than_its_cap() {
        let config = TokenConfig::default();
        let cd = Cooldowns::new("r", 8);
        let now = Instant::now();
        for n in 0..100u64 {
            let wait = Some(Duration::from_secs(10 + n));
            cd.start(
                &key(&format!("id-{n}")),
                HeldBy::Provider,
                wait,
                &config,
                now,
                0.5,
            );
        }
        assert_eq!(cd.len(), 8);
        // The newest holds stay (the ones ending first made room), and each is whole.
        assert!(cd.remaining(&key("id-99"), now).is_some());
        assert!(cd.remaining(&key("id-0"), now).is_none());
        // Holds that have ended make room first.
        let later = now + Duration::from_secs(1000);
        cd.start(&key("new"), HeldBy::Backoff, None, &config, later, 0.5);
        assert_eq!(cd.len(), 1);
    }

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
    fn a_retry_after_date_is_read_against_the_providers_date() {
        // The provider's clock is an hour behind ours: its date says 90 s, not 90 s - 1 h.
        let provider_now = SystemTime::now() - Duration::from_secs(3600);
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::DATE,
            HeaderValue::from_str(&httpdate::fmt_http_date(provider_now)).unwrap(),
        );
        let clock = provider_clock(&headers);
        let date = httpdate::fmt_http_date(provider_now + Duration::from_secs(90));
        let wait = parse_retry_after(&HeaderValue::from_str(&date).unwrap(), clock);
        assert_eq!(wait, Some(Duration::from_secs(90)));
        // No usable Date: our clock.
        headers.insert(http::header::DATE, HeaderValue::from_static("yesterday"));
        let ours = provider_clock(&headers);
        let skew = ours.duration_since(SystemTime::now()).unwrap_or_default();
        assert!(skew < Duration::from_secs(1));
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
        let cd = Cooldowns::new("r", 16);
        let now = Instant::now();
        assert_eq!(cd.remaining(&key("a"), now), None);
        let left = cd.start(
            &key("a"),
            HeldBy::Provider,
            Some(Duration::from_secs(10)),
            &config,
            now,
            0.5,
        );
        assert_eq!(left, Duration::from_secs(10));
        assert_eq!(
            cd.remaining(&key("a"), now + Duration::from_secs(4)),
            Some(Cooling {
                left: Duration::from_secs(6),
                by: HeldBy::Provider
            })
        );
        assert_eq!(cd.remaining(&key("a"), now + Duration::from_secs(10)), None);
        assert_eq!(cd.remaining(&key("b"), now), None);
        let capped = cd.start(
            &key("a"),
            HeldBy::Provider,
            Some(Duration::from_secs(1 << 40)),
            &config,
            now,
            0.5,
        );
        assert_eq!(capped, config.retry_after_max);
        cd.clear(&key("a"));
        assert_eq!(cd.remaining(&key("a"), now), None);
    }

    #[test]
    fn a_retry_after_of_zero_backs_off_instead_of_holding_nothing() {
        let config = TokenConfig::default();
        let cd = Cooldowns::new("r", 16);
        let now = Instant::now();
        let left = cd.start(
            &key("a"),
            HeldBy::Provider,
            Some(Duration::ZERO),
            &config,
            now,
            1.0,
        );
        assert_eq!(left, config.backoff_base);
        assert!(cd.remaining(&key("a"), now).is_some());
    }

    #[test]
    fn consecutive_failures_grow_the_backoff_ceiling() {
        let config = TokenConfig::default();
        let cd = Cooldowns::new("r", 16);
        let now = Instant::now();
        let first = cd.start(&key("a"), HeldBy::Backoff, None, &config, now, 1.0);
        let later = now + first;
        let second = cd.start(&key("a"), HeldBy::Backoff, None, &config, later, 1.0);
        assert_eq!(first, config.backoff_base);
        assert_eq!(second, config.backoff_base * 2);
    }
}
