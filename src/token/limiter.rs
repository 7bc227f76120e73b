//! Outbound limits of one route's token calls: a cap on calls in progress, and an optional token
//! bucket so that even many distinct keys never exceed the provider's documented rate. A call the
//! limiter would hold back longer than callers are willing to wait is refused up front with an
//! honest `Retry-After` instead of queueing past every caller's deadline. And [`Probes`]: the
//! pacing of keys that have never had a token (one call in progress per client id, and one per
//! `probe_interval` after the provider rejected one), so that callers guessing secrets cannot
//! spend a client's budget at the provider.
//!
//! Queues are bounded by their callers: only flights wait here, and a route has at most
//! `max_entries` of them (see the cache).

use dashmap::DashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::cooldown::ClientKey;

/// A token bucket that lends into the future: each reservation takes one token, and when the
/// bucket is empty the reservation is given the instant at which its token will exist.
#[derive(Debug)]
struct Bucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens the bucket holds (the burst).
    burst: f64,
    /// (tokens, at): the level at an instant; negative levels are reservations not yet due.
    level: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// Reserves one call. `Ok(delay)` when the call may go after `delay`; `Err(delay)` when that
    /// would be later than `max_wait`, in which case nothing is reserved.
    fn reserve(&self, now: Instant, max_wait: Duration) -> Result<Duration, Duration> {
        let mut level = self.level.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = *level;
        let refilled =
            (tokens + now.saturating_duration_since(at).as_secs_f64() * self.rate).min(self.burst);
        let after = refilled - 1.0;
        let delay = if after >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-after / self.rate)
        };
        if delay > max_wait {
            *level = (refilled, now);
            return Err(delay);
        }
        *level = (after, now);
        Ok(delay)
    }
}

/// The limits of one route.
#[derive(Debug)]
pub(crate) struct Limiter {
    calls: Arc<Semaphore>,
    /// The semaphore's size, for `/status`.
    max_concurrent: usize,
    bucket: Option<Bucket>,
}

/// Why a call was not allowed to go.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HeldBack {
    /// When a retry could succeed.
    pub retry_after: Duration,
}

impl Limiter {
    /// At most `max_concurrent` calls in progress, and, if `rate` is positive, at most `rate`
    /// calls per second with bursts of `burst`.
    pub(crate) fn new(max_concurrent: usize, rate: f64, burst: u32) -> Limiter {
        let bucket = (rate > 0.0).then(|| Bucket {
            rate,
            burst: f64::from(burst.max(1)),
            level: Mutex::new((f64::from(burst.max(1)), Instant::now())),
        });
        Limiter {
            calls: Arc::new(Semaphore::new(max_concurrent.max(1))),
            max_concurrent: max_concurrent.max(1),
            bucket,
        }
    }

    /// Calls in progress, the most allowed, and the calls the per-second bucket holds at `now`
    /// (`None` without a rate limit; negative: reservations waiting).
    pub(crate) fn state(&self, now: Instant) -> (usize, usize, Option<f64>) {
        let in_progress = self.max_concurrent - self.calls.available_permits();
        let budget = self.bucket.as_ref().map(|bucket| {
            let (tokens, at) = *bucket.level.lock().unwrap_or_else(|e| e.into_inner());
            (tokens + now.saturating_duration_since(at).as_secs_f64() * bucket.rate)
                .min(bucket.burst)
        });
        (in_progress, self.max_concurrent, budget)
    }

    /// Waits for the right to make one call, up to `max_wait`. The permit is held for the
    /// duration of the call.
    pub(crate) async fn admit(&self, max_wait: Duration) -> Result<OwnedSemaphorePermit, HeldBack> {
        let started = Instant::now();
        if let Some(bucket) = &self.bucket {
            let delay = bucket
                .reserve(started, max_wait)
                .map_err(|retry_after| HeldBack { retry_after })?;
            tokio::time::sleep(delay).await;
        }
        let left = max_wait.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, self.calls.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Out of time, or (never: nothing closes it) the semaphore closed.
            Ok(Err(_)) | Err(_) => Err(HeldBack {
                retry_after: Duration::from_secs(1),
            }),
        }
    }
}

/// One client id's pacing of unproven calls.
#[derive(Debug, Clone, Copy)]
struct Probe {
    /// An unproven call for this client is in progress.
    busy: bool,
    /// No unproven call before this instant.
    next: Instant,
}

/// How often a busy probe slot is looked at again by a flight waiting for it.
pub(crate) const PROBE_POLL: Duration = Duration::from_millis(50);

/// The pacing of unproven calls of one route, by client id, for at most `cap` client ids.
#[derive(Debug)]
pub(crate) struct Probes {
    slots: DashMap<ClientKey, Probe>,
    interval: Duration,
    cap: usize,
}

/// The right to make one unproven call for a client; frees the slot when dropped.
#[derive(Debug)]
pub(crate) struct ProbeSlot<'a> {
    probes: &'a Probes,
    client: ClientKey,
    rejected: bool,
}

impl ProbeSlot<'_> {
    /// The provider rejected the call's credentials: the client's next unproven call waits
    /// `probe_interval`.
    pub(crate) fn rejected(&mut self) {
        self.rejected = true;
    }
}

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        if let Some(mut probe) = self.probes.slots.get_mut(&self.client) {
            probe.busy = false;
            if self.rejected {
                probe.next = now + self.probes.interval;
            }
        }
    }
}

impl Probes {
    /// Pacing at one rejected call per `interval`, for at most `cap` client ids at once.
    pub(crate) fn new(interval: Duration, cap: usize) -> Probes {
        Probes {
            slots: DashMap::new(),
            interval,
            cap: cap.max(1),
        }
    }

    /// Claims the client's slot at `now`, or says how long until it may be free.
    pub(crate) fn claim(
        &self,
        client: &ClientKey,
        now: Instant,
    ) -> Result<ProbeSlot<'_>, Duration> {
        if !self.slots.contains_key(client) && self.slots.len() >= self.cap {
            self.slots.retain(|_, probe| probe.busy || probe.next > now);
            if self.slots.len() >= self.cap {
                return Err(self.interval.max(PROBE_POLL));
            }
        }
        let mut probe = self.slots.entry(*client).or_insert(Probe {
            busy: false,
            next: now,
        });
        if probe.busy {
            return Err(PROBE_POLL);
        }
        if probe.next > now {
            return Err(probe.next - now);
        }
        probe.busy = true;
        Ok(ProbeSlot {
            probes: self,
            client: *client,
            rejected: false,
        })
    }

    /// Forgets the clients whose pacing no longer matters.
    pub(crate) fn sweep(&self, now: Instant) {
        self.slots.retain(|_, probe| probe.busy || probe.next > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_unproven_call_per_client_and_a_pause_after_a_rejection() {
        let probes = Probes::new(Duration::from_secs(1), 4);
        let (a, b) = (ClientKey::of("a"), ClientKey::of("b"));
        let now = Instant::now();
        let slot = probes.claim(&a, now).unwrap();
        assert_eq!(probes.claim(&a, now).unwrap_err(), PROBE_POLL);
        let other = probes.claim(&b, now).unwrap();
        drop(other);
        // Not rejected: the next call may go at once.
        assert!(probes.claim(&b, now).is_ok());
        let mut slot = slot;
        slot.rejected();
        drop(slot);
        let wait = probes.claim(&a, Instant::now()).unwrap_err();
        assert!(wait > Duration::from_millis(900), "{wait:?}");
        assert!(
            probes
                .claim(&a, Instant::now() + Duration::from_secs(1))
                .is_ok()
        );
    }

    #[test]
    fn the_probe_table_is_bounded() {
        let probes = Probes::new(Duration::from_secs(60), 4);
        let now = Instant::now();
        let held: Vec<_> = (0..4)
            .map(|n| probes.claim(&ClientKey::of(&n.to_string()), now).unwrap())
            .collect();
        assert!(probes.claim(&ClientKey::of("new"), now).is_err());
        drop(held);
        // Idle, unrejected slots are forgotten to make room.
        assert!(probes.claim(&ClientKey::of("new"), now).is_ok());
        assert!(probes.slots.len() <= 4);
    }

    #[test]
    fn the_bucket_allows_a_burst_then_spaces_calls_at_the_rate() {
        let bucket = Bucket {
            rate: 10.0,
            burst: 2.0,
            level: Mutex::new((2.0, Instant::now())),
        };
        let now = Instant::now();
        let wait = Duration::from_secs(1);
        assert_eq!(bucket.reserve(now, wait), Ok(Duration::ZERO));
        assert_eq!(bucket.reserve(now, wait), Ok(Duration::ZERO));
        let third = bucket.reserve(now, wait).unwrap();
        assert!((third.as_secs_f64() - 0.1).abs() < 1e-6, "{third:?}");
        let fourth = bucket.reserve(now, wait).unwrap();
        assert!((fourth.as_secs_f64() - 0.2).abs() < 1e-6, "{fourth:?}");
        // Refused when the slot is past the wait, and nothing is reserved by the refusal.
        let refused = bucket.reserve(now, Duration::from_millis(250)).unwrap_err();
        assert!((refused.as_secs_f64() - 0.3).abs() < 1e-6, "{refused:?}");
        let later = bucket.reserve(now, wait).unwrap();
        assert!((later.as_secs_f64() - 0.3).abs() < 1e-6, "{later:?}");
        // Time refills it, but never past the burst.
        let much_later = now + Duration::from_secs(60);
        assert_eq!(bucket.reserve(much_later, wait), Ok(Duration::ZERO));
        assert_eq!(bucket.reserve(much_later, wait), Ok(Duration::ZERO));
        assert!(bucket.reserve(much_later, wait).unwrap() > Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_are_capped() {
        let limiter = Limiter::new(2, 0.0, 0);
        let a = limiter.admit(Duration::from_secs(1)).await.unwrap();
        let _b = limiter.admit(Duration::from_secs(1)).await.unwrap();
        let held = limiter.admit(Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(held.retry_after, Duration::from_secs(1));
        drop(a);
        assert!(limiter.admit(Duration::from_millis(100)).await.is_ok());
    }
}
