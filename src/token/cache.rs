//! The token cache of one route: an entry per key holding the cached token, a remembered error,
//! and the in-flight upstream call (single flight) kept separate from the cached value.
//!
//! Locking: a request holds the map's shard guard (a read guard, or the write guard when it creates
//! the entry) while it decides under the entry's std mutex, so an entry cannot be evicted between
//! lookup and decision; both are held for a few field reads and writes, never across `.await`. Lock order is always map shard, then entry
//! state, then cool-down shard.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;

use super::lifetime::{Hit, Rendered, Token};
use super::request::CacheKey;
use crate::error::Error;

/// An upstream answer passed to callers as it came: status, headers (hop-by-hop removed), body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What one upstream call produced, shared by every caller that waited for it.
#[derive(Debug, Clone)]
pub enum Shared {
    /// A token, now cached.
    Token(Arc<Token>),
    /// An answer passed through as it came (errors, throttling, uncacheable successes).
    Reply(Arc<Reply>),
    /// No usable answer: the sidecar's own error response.
    Failed(Error),
}

/// The channel on which a flight publishes its outcome; `None` until it lands.
pub type FlightRx = watch::Receiver<Option<Shared>>;
/// The sending half, owned by the flight task.
pub type FlightTx = watch::Sender<Option<Shared>>;

/// One key's state.
#[derive(Debug, Default)]
pub struct EntryState {
    /// The cached token, if any (servable or not: its timings decide).
    pub token: Option<Arc<Token>>,
    /// A client error (or a refresh-token answer) replayed until the instant given.
    pub remembered: Option<(Instant, Arc<Reply>)>,
    /// The upstream call in progress for this key, if any.
    pub flight: Option<FlightRx>,
    /// No background refresh before this instant (set when the provider returns the same token).
    pub refresh_not_before: Option<Instant>,
    /// How many refreshes in a row returned the token already cached.
    pub same_token_streak: u32,
    /// The cached token rendered for the current second, shared by every hit in that second.
    rendered: Option<Rendered>,
}

/// One cache entry.
#[derive(Debug, Default)]
pub struct Entry {
    state: Mutex<EntryState>,
    /// Milliseconds since the cache's epoch at the last request, for idle and LRU eviction.
    last_used_ms: AtomicU64,
}

impl Entry {
    /// Locks the state. A panic while the lock was held cannot leave it half-written in a way
    /// that matters (every field is valid on its own), so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, EntryState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What a request should do, decided under the entry's lock.
pub enum Decision {
    /// Serve the cached token as rendered for this second; if `refresh` is set, the caller starts
    /// that background flight.
    Hit { hit: Hit, refresh: Option<FlightTx> },
    /// Replay a remembered answer.
    Remembered(Arc<Reply>),
    /// The client id is on hold for this long and there is no token to serve.
    Cooldown(Duration),
    /// Wait for the flight already in progress.
    Join(FlightRx),
    /// Start the flight (`tx`) and wait on it (`rx`); `stale` if an expired token was there.
    Lead {
        tx: FlightTx,
        rx: FlightRx,
        stale: bool,
    },
}

impl EntryState {
    /// Decides how to answer a request at `now`. `hold` tells the time left on the client's
    /// cool-down; it is consulted only when an upstream call is being considered.
    pub fn decide(&mut self, now: Instant, hold: impl Fn() -> Option<Duration>) -> Decision {
        if let Some(token) = &self.token
            && token.servable(now)
        {
            let hit = match &self.rendered {
                Some(rendered) if rendered.is_current(token, now) => rendered.hit(),
                _ => self.rendered.insert(Rendered::new(token, now)).hit(),
            };
            let refresh = (token.refresh_due(now)
                && self.flight.is_none()
                && self.refresh_not_before.is_none_or(|t| now >= t)
                && hold().is_none())
            .then(|| self.start_flight().0);
            return Decision::Hit { hit, refresh };
        }
        if let Some((until, reply)) = &self.remembered {
            if *until > now {
                return Decision::Remembered(reply.clone());
            }
            self.remembered = None;
        }
        if let Some(rx) = &self.flight {
            return Decision::Join(rx.clone());
        }
        if let Some(left) = hold() {
            return Decision::Cooldown(left);
        }
        let stale = self.token.is_some();
        let (tx, rx) = self.start_flight();
        Decision::Lead { tx, rx, stale }
    }

    /// Replaces the cached token and forgets the old one's rendering with it, so a replaced token
    /// is not kept in memory by the rendering.
    pub fn set_token(&mut self, token: Option<Arc<Token>>) {
        self.token = token;
        self.rendered = None;
    }

    fn start_flight(&mut self) -> (FlightTx, FlightRx) {
        let (tx, rx) = watch::channel(None);
        self.flight = Some(rx.clone());
        (tx, rx)
    }

    /// Whether the entry holds nothing worth keeping at `now`. A token past its margin is kept
    /// until it really expires, so the next request is told `stale` and the same-token backoff
    /// is remembered.
    fn is_dead(&self, now: Instant) -> bool {
        self.flight.is_none()
            && self.token.as_ref().is_none_or(|t| now >= t.expires_at)
            && self
                .remembered
                .as_ref()
                .is_none_or(|(until, _)| *until <= now)
    }
}

/// Marks `entry` used at `stamp` and decides under its lock; clones the entry only for a flight.
fn decide_in(
    entry: &Arc<Entry>,
    stamp: u64,
    now: Instant,
    hold: impl Fn() -> Option<Duration>,
) -> (Decision, Option<Arc<Entry>>) {
    // Write only when the millisecond changed: a hot key read by every core would otherwise
    // bounce this cache line on each request.
    if entry.last_used_ms.load(Ordering::Relaxed) != stamp {
        entry.last_used_ms.store(stamp, Ordering::Relaxed);
    }
    let decision = entry.lock().decide(now, hold);
    let flies = matches!(
        decision,
        Decision::Lead { .. }
            | Decision::Hit {
                refresh: Some(_),
                ..
            }
    );
    (decision, flies.then(|| entry.clone()))
}

/// The key is already a keyed digest: its first eight bytes are a uniform hash, and an attacker
/// who does not know the per-process HMAC key cannot aim at one bucket.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than `CacheKey` is hashed: FNV-1a keeps it
        // deterministic (equal bytes, equal hash), which is all a Hasher must be.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl std::hash::Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_le_bytes(
            self.0[..8].try_into().expect("eight bytes"),
        ));
    }
}

/// Counts of entries dropped by one sweep.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub idle: usize,
    pub expired: usize,
}

/// All entries of one route.
#[derive(Debug)]
pub struct Cache {
    entries: DashMap<CacheKey, Arc<Entry>, BuildHasherDefault<DigestHasher>>,
    epoch: Instant,
    max_entries: usize,
}

impl Cache {
    /// An empty cache holding at most `max_entries` keys.
    pub fn new(max_entries: usize) -> Cache {
        Cache {
            entries: DashMap::with_hasher(BuildHasherDefault::default()),
            epoch: Instant::now(),
            max_entries,
        }
    }

    /// Decides, under the entry's lock, how to answer a request for `key` at `now` (see
    /// [`EntryState::decide`]), creating the entry if needed and marking it used.
    ///
    /// Returns the decision; the entry when the decision starts a flight (the flight lands in
    /// it); and how many entries were evicted to make room. The map's guard is held while the
    /// entry is locked, so an entry cannot leave the map between the lookup and the decision (a
    /// flight started in an evicted entry would be lost to the next request). A hit clones no
    /// entry or token `Arc`, only the shared bytes of its rendering.
    pub fn decide(
        &self,
        key: CacheKey,
        now: Instant,
        hold: impl Fn() -> Option<Duration>,
    ) -> (Decision, Option<Arc<Entry>>, usize) {
        let stamp = now.saturating_duration_since(self.epoch).as_millis() as u64;
        if let Some(entry) = self.entries.get(&key) {
            let (decision, flight) = decide_in(&entry, stamp, now, hold);
            return (decision, flight, 0);
        }
        let evicted = if self.entries.len() >= self.max_entries {
            self.evict_least_recent()
        } else {
            0
        };
        let entry = self.entries.entry(key).or_default();
        let (decision, flight) = decide_in(&entry, stamp, now, hold);
        (decision, flight, evicted)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops entries unused for `idle_timeout`, and entries with nothing left to serve.
    pub fn sweep(&self, now: Instant, idle_timeout: Duration) -> Swept {
        let idle_before = now
            .checked_sub(idle_timeout)
            .map(|t| t.saturating_duration_since(self.epoch).as_millis() as u64);
        let mut swept = Swept::default();
        self.entries.retain(|_, entry| {
            let state = entry.lock();
            if state.flight.is_some() {
                return true;
            }
            if idle_before.is_some_and(|t| entry.last_used_ms.load(Ordering::Relaxed) < t) {
                swept.idle += 1;
                return false;
            }
            if state.is_dead(now) {
                swept.expired += 1;
                return false;
            }
            true
        });
        swept
    }

    /// Evicts the least recently used sixteenth of the entries (none with a flight in progress),
    /// so a full cache pays for one scan per sixteenth of its size in new keys.
    fn evict_least_recent(&self) -> usize {
        let mut stamps: Vec<(u64, CacheKey)> = self
            .entries
            .iter()
            .map(|e| (e.last_used_ms.load(Ordering::Relaxed), *e.key()))
            .collect();
        let count = (stamps.len() / 16).max(1).min(stamps.len());
        if count == 0 {
            return 0;
        }
        stamps.select_nth_unstable(count - 1);
        stamps[..count]
            .iter()
            .filter(|(_, key)| {
                self.entries
                    .remove_if(key, |_, entry| entry.lock().flight.is_none())
                    .is_some()
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        let mut k = [0u8; 32];
        k[0] = n;
        k[31] = n;
        CacheKey(k)
    }

    #[test]
    fn one_leader_then_joiners_while_the_flight_is_open() {
        let mut state = EntryState::default();
        let now = Instant::now();
        let Decision::Lead { tx, stale, .. } = state.decide(now, || None) else {
            panic!("expected lead")
        };
        assert!(!stale);
        assert!(matches!(state.decide(now, || None), Decision::Join(_)));
        assert!(matches!(
            state.decide(now, || Some(Duration::from_secs(5))),
            Decision::Join(_)
        ));
        drop(tx);
        state.flight = None;
        assert!(
            matches!(state.decide(now, || Some(Duration::from_secs(5))), Decision::Cooldown(d) if d == Duration::from_secs(5))
        );
    }

    fn hit(state: &mut EntryState, now: Instant) -> Hit {
        match state.decide(now, || None) {
            Decision::Hit { hit, .. } => hit,
            _ => panic!("expected a hit"),
        }
    }

    #[test]
    fn hits_share_one_rendering_per_second_and_per_token() {
        let t0 = Instant::now();
        let token = |name: &str| {
            let body = format!(r#"{{"access_token":"{name}","expires_in":3600}}"#);
            match Token::from_upstream(
                body.as_bytes(),
                http::HeaderValue::from_static("application/json"),
                t0,
                &crate::config::TokenConfig::default(),
                0.0,
            ) {
                Ok(super::super::lifetime::Validated::Token(token)) => Arc::new(token),
                other => panic!("expected a token, got {other:?}"),
            }
        };
        let mut state = EntryState {
            token: Some(token("first")),
            ..EntryState::default()
        };
        let a = hit(&mut state, t0 + Duration::from_millis(100));
        let b = hit(&mut state, t0 + Duration::from_millis(400));
        for (x, y) in a.body.iter().zip(&b.body) {
            assert_eq!(x.as_ptr(), y.as_ptr(), "same second, same bytes");
        }
        let json = |r: &Hit| serde_json::from_slice::<serde_json::Value>(&r.body.concat()).unwrap();
        assert_eq!(json(&a)["expires_in"], 3599);
        let later = hit(&mut state, t0 + Duration::from_millis(1_500));
        assert_eq!(
            json(&later)["expires_in"],
            3598,
            "rounded down, never more than left"
        );
        assert_ne!(
            a.cache_status, later.cache_status,
            "Cache-Status ttl follows"
        );
        state.set_token(Some(token("second")));
        assert!(
            state.rendered.is_none(),
            "the old token's rendering goes with it"
        );
        let replaced = hit(&mut state, t0 + Duration::from_millis(1_600));
        assert_eq!(json(&replaced)["access_token"], "second");
    }

    #[test]
    fn capacity_evicts_the_least_recently_used() {
        let cache = Cache::new(32);
        let t0 = Instant::now();
        // Each request leads a flight; landing it leaves an entry that may be evicted.
        let request = |n: u8, at: Instant| {
            let (_, entry, evicted) = cache.decide(key(n), at, || None);
            entry.expect("a cold key leads a flight").lock().flight = None;
            evicted
        };
        for n in 0..32u8 {
            request(n, t0 + Duration::from_millis(n as u64 * 10));
        }
        assert_eq!(cache.len(), 32);
        let evicted = request(100, t0 + Duration::from_secs(1));
        assert_eq!(evicted, 2);
        assert_eq!(cache.len(), 31);
        assert!(cache.entries.get(&key(0)).is_none());
        assert!(cache.entries.get(&key(1)).is_none());
        assert!(cache.entries.get(&key(2)).is_some());
    }

    /// A sweep racing with requests: whatever a request decides, a flight it starts lands in the
    /// entry the map holds, so the next request finds it instead of calling upstream again.
    #[test]
    fn a_flight_is_never_started_in_an_entry_already_evicted() {
        let cache = Arc::new(Cache::new(1_000));
        let t0 = Instant::now();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeper = {
            let (cache, stop) = (cache.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut sweeps = 0u32;
                // An idle timeout of zero makes every entry without a flight sweepable at once.
                while !stop.load(Ordering::Relaxed) && sweeps < 2_000_000 {
                    cache.sweep(t0 + Duration::from_secs(1), Duration::ZERO);
                    sweeps += 1;
                }
            })
        };
        let workers: Vec<_> = (0..2u8)
            .map(|n| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    let mut leads = 0;
                    for i in 0..20_000u32 {
                        let k = key(n * 8 + (i % 8) as u8);
                        let (decision, entry, _) = cache.decide(k, t0, || None);
                        if let Decision::Lead { .. } = decision {
                            leads += 1;
                            let entry = entry.expect("a flight comes with its entry");
                            let held = cache.entries.get(&k).map(|e| e.clone());
                            assert!(
                                held.is_some_and(|held| Arc::ptr_eq(&held, &entry)),
                                "flight started in an evicted entry"
                            );
                            entry.lock().flight = None;
                        }
                    }
                    leads
                })
            })
            .collect();
        let leads: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        stop.store(true, Ordering::Relaxed);
        sweeper.join().unwrap();
        assert!(leads > 0);
    }

    #[test]
    fn sweep_drops_idle_and_dead_entries_but_not_flights() {
        let cache = Cache::new(100);
        let t0 = Instant::now();
        let (_flight, ..) = cache.decide(key(1), t0, || None);
        let (decision, ..) = cache.decide(key(2), t0, || None);
        drop(decision);
        cache.entries.get(&key(2)).unwrap().lock().flight = None;
        let swept = cache.sweep(t0 + Duration::from_secs(1), Duration::from_secs(3600));
        assert_eq!(
            swept,
            Swept {
                idle: 0,
                expired: 1
            }
        );
        assert_eq!(cache.len(), 1);
        let swept = cache.sweep(t0 + Duration::from_secs(7200), Duration::from_secs(3600));
        assert_eq!(swept, Swept::default());
        assert_eq!(
            cache.len(),
            1,
            "an entry with a flight in progress is never dropped"
        );
    }
}
