//! The token cache of one route: a bounded map from [`CacheKey`] to [`Entry`], with eviction
//! when it is full ([`Cache::make_room`]), the periodic sweep of idle and dead entries, and the
//! snapshot `/status` shows. What each entry decides and how a flight lands in it is
//! [`super::entry`].
//!
//! Locking: a request holds the map's shard guard (a read guard, or the write guard when it creates
//! the entry) while it decides under the entry's std mutex, so an entry cannot be evicted between
//! lookup and decision. Both are held for a few field reads and writes, never across `.await`.
//! Lock order is always map shard, then entry state, then cool-down shard.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::cooldown::Cooling;
use super::entry::{Decision, Entry, Glance};
use super::request::CacheKey;

/// Counts of entries dropped by one sweep.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Swept {
    pub idle: usize,
    pub expired: usize,
}

/// A new key found the cache full of entries it may not evict: keys whose calls are still in
/// progress and keys holding tokens their callers proved they may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

/// After a scan of a full cache found nothing to evict, new keys are refused for this long
/// without scanning again, so a flood of new keys costs one scan per period, not one per key.
const FULL_MEMO_MS: u64 = 50;

/// One key as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyView {
    /// The first bytes of the key's digest (an HMAC under a key of this process): tells apart
    /// the keys of one client (scopes, audiences) and reveals nothing.
    pub(crate) key: [u8; 4],
    /// The client's hash prefix, once a flight named it.
    pub(crate) client: Option<[u8; 4]>,
    /// Whole seconds the longest-serving token has left; `None` with nothing to serve.
    pub(crate) ttl_secs: Option<u64>,
    /// Servable tokens.
    pub(crate) tokens: usize,
    /// An upstream call is in progress for the key.
    pub(crate) calling: bool,
}

/// All entries of one route.
#[derive(Debug)]
pub(crate) struct Cache {
    /// Bounded by `max_entries`, flights included: a new key is added only when there is room.
    entries: DashMap<CacheKey, Arc<Entry>>,
    epoch: Instant,
    max_entries: usize,
    /// Keys whose first call is in progress may hold this many slots and still push out a
    /// proven key's token; past it, new keys only take slots with nothing to serve.
    probation: usize,
    /// Slots only new keys of proven clients may take (`max_entries / 8`): a flood of strangers'
    /// first calls whose callers keep waiting fills the rest, and a client that has shown valid
    /// credentials still gets a new key (another scope, another audience) in.
    reserve: usize,
    /// Tokens kept per key.
    pool_size: usize,
    /// Milliseconds since `epoch` until which the cache is known to be full (see
    /// [`FULL_MEMO_MS`]).
    full_until_ms: AtomicU64,
}

/// How a full cache ranks an entry for eviction, from a look under its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// Nothing to serve and no call in progress: evicted first.
    Empty,
    /// A servable token, no call in progress: evicted (least recent first) only while few keys
    /// are on probation.
    Serving,
    /// A call in progress for a key with nothing to serve: a key on probation. Never evicted
    /// (its callers wait for it); counted.
    Probation,
    /// A call in progress for a key that serves a token (a refresh): never evicted.
    Refreshing,
}

impl Rank {
    /// The rank of an entry as `glance` saw it.
    fn of(glance: Glance) -> Rank {
        match (glance.calling, glance.tokens > 0) {
            (true, true) => Rank::Refreshing,
            (true, false) => Rank::Probation,
            (false, true) => Rank::Serving,
            (false, false) => Rank::Empty,
        }
    }
}

impl Cache {
    /// An empty cache holding at most `max_entries` keys of up to `pool_size` tokens each.
    pub(crate) fn new(max_entries: usize, pool_size: usize) -> Cache {
        Cache {
            entries: DashMap::new(),
            epoch: Instant::now(),
            max_entries,
            probation: (max_entries / 8).max(1),
            reserve: max_entries / 8,
            pool_size,
            full_until_ms: AtomicU64::new(0),
        }
    }

    /// Decides, under the entry's lock, how to answer a request for `key` at `now` (see
    /// [`Entry::decide`]), creating the entry if there is room and marking it used. Returns
    /// the decision and how many entries were evicted to make room, or [`Full`].
    ///
    /// The map's guard is held while the entry is locked, so an entry cannot leave the map between
    /// the lookup and the decision (a flight started in an evicted entry would be lost to the next
    /// request).
    ///
    /// A new key of a client that is not `proven_client()` (asked only when the cache is nearly
    /// full) finds room only outside the last [`Self::reserve`] slots.
    pub(crate) fn decide(
        &self,
        key: CacheKey,
        now: Instant,
        proven_client: impl FnOnce() -> bool,
        cooling: impl Fn(bool) -> Option<Cooling>,
    ) -> Result<(Decision, usize), Full> {
        let stamp = self.stamp(now);
        if let Some(entry) = self.entries.get(&key) {
            return Ok((entry.decide(stamp, now, self.pool_size, cooling), 0));
        }
        let len = self.entries.len();
        let strangers = self.max_entries - self.reserve;
        let room = if len >= strangers && len < self.max_entries && proven_client() {
            self.max_entries
        } else {
            strangers.max(1)
        };
        let evicted = if len >= room {
            self.make_room(stamp, now)?
        } else {
            0
        };
        let entry = self.entries.entry(key).or_default();
        Ok((entry.decide(stamp, now, self.pool_size, cooling), evicted))
    }

    fn stamp(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// What `/status` shows of the keys at `now`: at most `limit` of them (those with the most
    /// serving time left first), and how many there are.
    pub(crate) fn snapshot(&self, now: Instant, limit: usize) -> (Vec<KeyView>, usize) {
        let mut keys: Vec<KeyView> = self
            .entries
            .iter()
            .map(|entry| {
                let glance = entry.glance(now);
                let digest = entry.key().0;
                KeyView {
                    key: [digest[0], digest[1], digest[2], digest[3]],
                    client: glance.client,
                    ttl_secs: glance.ttl_secs,
                    tokens: glance.tokens,
                    calling: glance.calling,
                }
            })
            .collect();
        let total = keys.len();
        keys.sort_unstable_by_key(|k| {
            (std::cmp::Reverse(k.calling), std::cmp::Reverse(k.ttl_secs))
        });
        keys.truncate(limit);
        (keys, total)
    }

    /// Drops `key`'s cached token whose fingerprint is `fingerprint`, if it is still there (an
    /// API rejected it): compare-and-drop, so many rejections of one token drop it once. True if
    /// it was dropped.
    pub(crate) fn revoke(&self, key: &CacheKey, fingerprint: &[u8; 32]) -> bool {
        self.entries
            .get(key)
            .is_some_and(|entry| entry.revoke(fingerprint))
    }

    /// Number of keys.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops entries unused for `idle_timeout`, and entries with nothing left to serve.
    pub(crate) fn sweep(&self, now: Instant, idle_timeout: Duration) -> Swept {
        let idle_before = now
            .checked_sub(idle_timeout)
            .map(|t| t.saturating_duration_since(self.epoch).as_millis() as u64);
        let mut swept = Swept::default();
        self.entries.retain(|_, entry| {
            let glance = entry.glance(now);
            if glance.calling {
                return true;
            }
            if idle_before.is_some_and(|t| entry.last_used() < t) {
                swept.idle += 1;
                return false;
            }
            if glance.dead {
                swept.expired += 1;
                return false;
            }
            true
        });
        swept
    }

    /// Frees room for a new key in a full cache: the least recently used sixteenth of the
    /// entries with nothing to serve; if there are none, and fewer than `probation` keys wait
    /// for their first call, of the entries serving a token. Never an entry with a call in
    /// progress. [`Full`] if nothing may go.
    fn make_room(&self, stamp: u64, now: Instant) -> Result<usize, Full> {
        if stamp < self.full_until_ms.load(Ordering::Relaxed) {
            return Err(Full);
        }
        let mut ranked: Vec<(Rank, u64, CacheKey)> = self
            .entries
            .iter()
            .map(|e| {
                let rank = Rank::of(e.glance(now));
                (rank, e.last_used(), *e.key())
            })
            .collect();
        let on_probation = ranked.iter().filter(|r| r.0 == Rank::Probation).count();
        let allowed = if ranked.iter().any(|r| r.0 == Rank::Empty) {
            Rank::Empty
        } else if on_probation < self.probation {
            Rank::Serving
        } else {
            self.full_until_ms
                .store(stamp + FULL_MEMO_MS, Ordering::Relaxed);
            return Err(Full);
        };
        ranked.retain(|r| r.0 == allowed);
        let count = (self.entries.len() / 16).clamp(1, ranked.len().max(1));
        let count = count.min(ranked.len());
        if count == 0 {
            return Err(Full);
        }
        ranked.select_nth_unstable_by_key(count - 1, |r| r.1);
        let evicted = ranked[..count]
            .iter()
            .filter(|(_, _, key)| {
                self.entries
                    .remove_if(key, |_, entry| Rank::of(entry.glance(now)) == allowed)
                    .is_some()
            })
            .count();
        if evicted == 0 {
            return Err(Full);
        }
        Ok(evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::entry::FlightResult;
    use crate::token::entry::tests::{config, token};
    use crate::token::request::Grant;

    fn key(n: u8) -> CacheKey {
        let mut k = [0u8; 32];
        k[0] = n;
        k[31] = n;
        CacheKey(k)
    }

    /// Leads a flight for `n` at `at` and lets it die, leaving an entry that may be evicted.
    fn touch(cache: &Cache, n: u8, at: Instant) -> usize {
        let (decision, evicted) = cache.decide(key(n), at, || true, |_| None).unwrap();
        assert!(
            matches!(decision, Decision::Lead { .. }),
            "a cold key leads a flight"
        );
        evicted
    }

    #[test]
    fn capacity_evicts_the_least_recently_used() {
        let cache = Cache::new(32, 1);
        let t0 = Instant::now();
        for n in 0..32u8 {
            touch(&cache, n, t0 + Duration::from_millis(n as u64 * 10));
        }
        assert_eq!(cache.len(), 32);
        let evicted = touch(&cache, 100, t0 + Duration::from_secs(1));
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
        let cache = Arc::new(Cache::new(1_000, 1));
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
                        if let (Decision::Lead { flight, .. }, _) =
                            cache.decide(k, t0, || true, |_| None).unwrap()
                        {
                            leads += 1;
                            let held = cache.entries.get(&k).map(|e| e.clone());
                            assert!(
                                held.is_some_and(|held| Arc::ptr_eq(&held, flight.entry())),
                                "flight started in an evicted entry"
                            );
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
        let cache = Cache::new(100, 1);
        let t0 = Instant::now();
        let (_flight, _) = cache.decide(key(1), t0, || true, |_| None).unwrap();
        touch(&cache, 2, t0);
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

    /// Leads a flight for `n` at `at` and lands a token, leaving a key that serves it.
    fn serve(cache: &Cache, n: u8, at: Instant) {
        let (Decision::Lead { flight, .. }, _) =
            cache.decide(key(n), at, || true, |_| None).unwrap()
        else {
            panic!("a cold key leads a flight")
        };
        flight.land(
            FlightResult::Token(token("t", 3600, at)),
            Grant::ClientCredentials,
            &config(),
            at,
            0.0,
        );
    }

    #[test]
    fn calls_in_progress_never_push_the_cache_past_its_bound() {
        let cache = Cache::new(16, 1);
        let t0 = Instant::now();
        let flights: Vec<_> = (0..16u8)
            .map(|n| cache.decide(key(n), t0, || true, |_| None).unwrap())
            .collect();
        let at = t0 + Duration::from_secs(1);
        assert_eq!(
            cache.decide(key(100), at, || true, |_| None).err(),
            Some(Full)
        );
        assert_eq!(cache.len(), 16);
        // A known key is still answered: it joins its flight.
        assert!(matches!(
            cache.decide(key(3), at, || true, |_| None).unwrap().0,
            Decision::Join(_)
        ));
        // Refused at once for the memo's period, then room made once flights have ended.
        drop(flights);
        assert_eq!(
            cache.decide(key(101), at, || true, |_| None).err(),
            Some(Full)
        );
        let later = at + Duration::from_millis(FULL_MEMO_MS);
        assert_eq!(
            cache.decide(key(102), later, || true, |_| None).unwrap().1,
            1
        );
        assert_eq!(cache.len(), 16);
    }

    #[test]
    fn keys_on_probation_cannot_push_out_proven_tokens() {
        let cache = Cache::new(16, 1);
        let t0 = Instant::now();
        for n in 0..14u8 {
            serve(&cache, n, t0);
        }
        // Fill the rest with first calls in progress, up to the probation share (16 / 8 = 2).
        let _a = cache.decide(key(50), t0, || true, |_| None).unwrap();
        let _b = cache.decide(key(51), t0, || true, |_| None).unwrap();
        let at = t0 + Duration::from_secs(1);
        assert_eq!(
            cache.decide(key(52), at, || true, |_| None).err(),
            Some(Full)
        );
        for n in 0..14u8 {
            assert!(
                matches!(
                    cache.decide(key(n), at, || true, |_| None).unwrap().0,
                    Decision::Hit { .. }
                ),
                "proven key {n} still served"
            );
        }
    }

    #[test]
    fn a_full_cache_of_tokens_still_turns_over_least_recent_first() {
        let cache = Cache::new(16, 1);
        let t0 = Instant::now();
        for n in 0..16u8 {
            serve(&cache, n, t0 + Duration::from_millis(u64::from(n)));
        }
        let at = t0 + Duration::from_secs(1);
        let (decision, evicted) = cache.decide(key(200), at, || true, |_| None).unwrap();
        assert!(matches!(decision, Decision::Lead { proven: false, .. }));
        assert_eq!(evicted, 1);
        assert!(
            cache.entries.get(&key(0)).is_none(),
            "the least recent went"
        );
        assert_eq!(cache.len(), 16);
    }
}
