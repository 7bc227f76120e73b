//! The circuit breaker in front of Redis: after a failed call the fleet tier is skipped (every
//! pod works alone, as without it) until a backoff passes; then one call tries Redis again. Its
//! success closes the breaker, its failure opens it for longer (full jitter, capped).

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// The breaker's state, also its metric value.
/// How long a half-open trial may take before another is allowed (longer than any call's
/// `shared.timeout`).
const TRIAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Redis is used.
    Closed = 0,
    /// Redis failed: skipped until the backoff ends.
    Open = 1,
    /// One trial call is out.
    HalfOpen = 2,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Consecutive failed trials, for the backoff's exponent.
    failures: u32,
    /// Until when an open breaker skips Redis.
    until: Instant,
}

/// One process's breaker for its Redis.
#[derive(Debug)]
pub(crate) struct Breaker {
    inner: Mutex<Inner>,
    base: Duration,
    cap: Duration,
}

impl Breaker {
    /// A closed breaker whose backoff starts at `base` and never passes `cap`.
    pub(crate) fn new(base: Duration, cap: Duration) -> Breaker {
        Breaker {
            inner: Mutex::new(Inner {
                state: State::Closed,
                failures: 0,
                until: Instant::now(),
            }),
            base,
            cap,
        }
    }

    /// The state; a panic elsewhere while it was held leaves plain data behind, so a poisoned
    /// lock is recovered as in the token cache.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state now, for metrics.
    pub(crate) fn state(&self) -> State {
        self.lock().state
    }

    /// Whether a call may go to Redis at `now`. An open breaker whose backoff is over lets
    /// exactly one trial through.
    pub(crate) fn allow(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        match inner.state {
            State::Closed => true,
            // A trial whose outcome never came (its task ended without a word) is replaced.
            State::HalfOpen if now >= inner.until => {
                inner.until = now + TRIAL;
                true
            }
            State::HalfOpen => false,
            State::Open if now >= inner.until => {
                inner.state = State::HalfOpen;
                inner.until = now + TRIAL;
                true
            }
            State::Open => false,
        }
    }

    /// A call answered: Redis is back.
    pub(crate) fn success(&self) {
        let mut inner = self.lock();
        inner.state = State::Closed;
        inner.failures = 0;
    }

    /// A call failed at `now`; `unit` in `[0, 1)` is the jitter. Returns whether this opened a
    /// closed breaker (worth one warning).
    pub(crate) fn failure(&self, now: Instant, unit: f64) -> bool {
        let mut inner = self.lock();
        let opened = inner.state == State::Closed;
        if inner.state == State::Open {
            // A call that was already out when the breaker opened: the backoff grows only on a
            // failed trial, not once per call in flight.
            return false;
        }
        let ceiling = self
            .base
            .saturating_mul(1u32 << inner.failures.min(16))
            .min(self.cap);
        // Half to all of the ceiling: never a retry at once, never all pods in step.
        inner.until = now + ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0));
        inner.failures = inner.failures.saturating_add(1);
        inner.state = State::Open;
        opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_failure_lets_one_trial_through_after_the_backoff_and_grows() {
        let breaker = Breaker::new(Duration::from_secs(1), Duration::from_secs(4));
        let t0 = Instant::now();
        assert!(breaker.allow(t0));
        assert!(breaker.failure(t0, 0.0), "a closed breaker opens");
        assert_eq!(breaker.state(), State::Open);
        assert!(!breaker.allow(t0 + Duration::from_millis(400)));
        assert!(breaker.allow(t0 + Duration::from_millis(500)), "the trial");
        assert!(!breaker.allow(t0 + Duration::from_millis(501)), "one only");
        assert_eq!(breaker.state(), State::HalfOpen);
        let t1 = t0 + Duration::from_millis(600);
        assert!(
            !breaker.failure(t1, 0.999),
            "already open: no second warning"
        );
        assert!(!breaker.allow(t1 + Duration::from_millis(1900)), "grown");
        assert!(breaker.allow(t1 + Duration::from_millis(2000)));
        breaker.success();
        assert_eq!(breaker.state(), State::Closed);
        assert!(breaker.allow(t1));
        // Failed trials grow the backoff to its cap.
        let mut t = t1;
        for _ in 0..40 {
            assert!(breaker.allow(t));
            breaker.failure(t, 0.999);
            t += Duration::from_secs(4);
        }
        assert!(breaker.allow(t), "capped at 4 s");
    }

    #[test]
    fn calls_in_flight_when_it_opens_do_not_grow_the_backoff_and_a_lost_trial_is_replaced() {
        let breaker = Breaker::new(Duration::from_secs(1), Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(breaker.failure(t0, 0.999));
        for _ in 0..10 {
            assert!(!breaker.failure(t0, 0.999), "already open");
        }
        assert!(breaker.allow(t0 + Duration::from_millis(1000)), "still 1 s");
        // The trial's outcome never comes: another trial after TRIAL.
        assert!(!breaker.allow(t0 + Duration::from_secs(5)));
        assert!(breaker.allow(t0 + Duration::from_millis(1000) + TRIAL));
    }
}
