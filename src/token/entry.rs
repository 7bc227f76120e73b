//! One cache key's whole state machine: the cached tokens, a remembered answer, and the
//! in-flight upstream call (single flight), kept apart from the cached value.
//! [`EntryState::decide`] says how a request is answered; [`EntryState::land`] is how a flight's
//! outcome ([`FlightResult`]) changes the entry; [`Landing`] is a flight's right to land, which
//! clears the flight slot even if the flight dies without landing. The map of entries, its
//! bound and its sweeps are [`super::cache`].
//!
//! Locking: each entry has a std mutex, held for a few field reads and writes, never across
//! `.await`; the map holds its shard guard around [`Entry::decide`] (see [`super::cache`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use http::StatusCode;
use smallvec::SmallVec;
use tokio::sync::watch;
use tokio::time::Instant;

use super::cooldown::{self, Cooling};
use super::lifetime::Token;
use super::request::Grant;
use crate::config::TokenConfig;
use crate::error::Error;
use crate::upstream::Reply;

/// What one upstream call produced, shared by every caller that waited for it.
#[derive(Debug, Clone)]
pub(crate) enum FlightResult {
    /// A token, now cached.
    Token(Arc<Token>),
    /// An answer passed through as it came (errors, throttling, uncacheable successes).
    Reply(Arc<Reply>),
    /// No usable answer: the sidecar's own error response.
    Failed(Error),
}

/// How often a first call checks whether its callers have all left (see [`Landing::deserted`]).
const DESERTED_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// The channel on which a flight publishes its outcome; `None` until it lands.
pub(crate) type FlightRx = watch::Receiver<Option<FlightResult>>;
type FlightTx = watch::Sender<Option<FlightResult>>;

/// One key's state. Every field is valid on its own, so a panic under the lock cannot leave it
/// half-written in a way that matters.
#[derive(Debug, Default)]
struct EntryState {
    /// The cached tokens (servable or not: their timings decide): one, or up to `pool_size`,
    /// handed out in turn. Bounded by `pool_size` when a token lands.
    tokens: SmallVec<[Arc<Token>; 1]>,
    /// Which servable token the next hit gets.
    turn: usize,
    /// A client error (or a refresh-token answer) replayed until the instant given.
    remembered: Option<(Instant, Arc<Reply>)>,
    /// The upstream call in progress for this key, if any.
    flight: Option<FlightRx>,
    /// No background refresh before this instant (set when the provider returns the same token).
    refresh_not_before: Option<Instant>,
    /// How many refreshes in a row returned the token already cached.
    same_token_streak: u32,
    /// A token has landed for this key and its credentials were not rejected since: the key has
    /// shown it holds valid credentials. Unproven keys' calls are paced per client id, and their
    /// holds do not stop proven keys (see `docs/SECURITY.md`).
    proven: bool,
    /// The first bytes of the client id's SHA-256, set by the first flight: the key's name on
    /// `/status`, never the id.
    client: Option<[u8; 4]>,
}

/// One cache entry.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    state: Mutex<EntryState>,
    /// Milliseconds since the cache's epoch at the last request, for idle and LRU eviction.
    last_used_ms: AtomicU64,
}

impl Entry {
    fn lock(&self) -> MutexGuard<'_, EntryState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the entry used at `stamp` (the map's milliseconds) and decides under its lock how to
    /// answer a request at `now` (see [`EntryState::decide`]); a flight it starts lands here.
    pub(super) fn decide(
        self: &Arc<Self>,
        stamp: u64,
        now: Instant,
        pool: usize,
        cooling: impl Fn(bool) -> Option<Cooling>,
    ) -> Decision {
        self.last_used_ms.store(stamp, Ordering::Relaxed);
        let decision = self.lock().decide(now, pool, cooling);
        decision.map_flight(|tx| Landing {
            entry: self.clone(),
            tx: Some(tx),
        })
    }

    /// Drops the cached token with `fingerprint`, if there; true if it was.
    pub(super) fn revoke(&self, fingerprint: &[u8; 32]) -> bool {
        let mut state = self.lock();
        let before = state.tokens.len();
        state
            .tokens
            .retain(|token| token.fingerprint != *fingerprint);
        state.tokens.len() < before
    }

    /// When the entry was last used, in the map's milliseconds.
    pub(super) fn last_used(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    /// What the map needs to know of the entry at `now`, read under one lock.
    pub(super) fn glance(&self, now: Instant) -> Glance {
        self.lock().glance(now)
    }
}

/// One look at an entry, for the map: how to rank it for eviction, whether a sweep may drop it,
/// and what `/status` shows of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Glance {
    /// An upstream call is in progress for the key.
    pub(super) calling: bool,
    /// Servable tokens.
    pub(super) tokens: usize,
    /// Whole seconds the longest-serving token has left; `None` with nothing to serve.
    pub(super) ttl_secs: Option<u64>,
    /// The client's hash prefix, once a flight named it.
    pub(super) client: Option<[u8; 4]>,
    /// Nothing worth keeping (see [`EntryState::is_dead`]).
    pub(super) dead: bool,
}

/// What a request should do, decided under the entry's lock. `F` is the flight a decision starts:
/// a [`Landing`] outside this file, the bare sender inside it.
#[derive(Debug)]
pub(crate) enum Decision<F = Landing> {
    /// Serve the cached token; if `refresh` is set, the caller starts that background flight.
    Hit {
        token: Arc<Token>,
        refresh: Option<F>,
    },
    /// Replay a remembered answer.
    Remembered(Arc<Reply>),
    /// The client id is cooling down and there is no token to serve.
    Cooldown(Cooling),
    /// Wait for the flight already in progress.
    Join(FlightRx),
    /// Start the flight and wait on `rx`; `stale` if an expired token was there; `proven` if a
    /// token ever landed for this key (see [`EntryState::proven`]).
    Lead {
        flight: F,
        rx: FlightRx,
        stale: bool,
        proven: bool,
    },
}

impl<F> Decision<F> {
    fn map_flight<G>(self, f: impl FnOnce(F) -> G) -> Decision<G> {
        match self {
            Decision::Hit { token, refresh } => Decision::Hit {
                token,
                refresh: refresh.map(f),
            },
            Decision::Remembered(reply) => Decision::Remembered(reply),
            Decision::Cooldown(cooling) => Decision::Cooldown(cooling),
            Decision::Join(rx) => Decision::Join(rx),
            Decision::Lead {
                flight,
                rx,
                stale,
                proven,
            } => Decision::Lead {
                flight: f(flight),
                rx,
                stale,
                proven,
            },
        }
    }
}

/// The provider rejected these credentials: what they got before must not be served again.
pub(crate) fn rejects_credentials(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 401 | 403)
}

impl EntryState {
    /// Decides how to answer a request at `now`, keeping up to `pool` tokens. `cooling` tells
    /// the client's cool-down as a key proven or not sees it; it is consulted only when an
    /// upstream call is being considered.
    fn decide(
        &mut self,
        now: Instant,
        pool: usize,
        cooling: impl Fn(bool) -> Option<Cooling>,
    ) -> Decision<FlightTx> {
        let servable = self.tokens.iter().filter(|t| t.servable(now)).count();
        let pick = self.turn.wrapping_add(1) % servable.max(1);
        let picked = self.tokens.iter().filter(|t| t.servable(now)).nth(pick);
        if let Some(token) = picked.cloned() {
            self.turn = self.turn.wrapping_add(1);
            // Refresh when a token is due, or fill the pool; tokens that are never refreshed
            // ahead (refresh-token answers) are never pooled either.
            let due = self.tokens.iter().any(|t| t.refresh_due(now));
            let fill = servable < pool && self.tokens.iter().all(|t| t.refresh_at.is_some());
            let refresh = ((due || fill)
                && self.flight.is_none()
                && self.refresh_not_before.is_none_or(|t| now >= t)
                && cooling(self.proven).is_none())
            .then(|| self.start_flight().0);
            return Decision::Hit { token, refresh };
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
        if let Some(hold) = cooling(self.proven) {
            return Decision::Cooldown(hold);
        }
        let stale = !self.tokens.is_empty();
        let (flight, rx) = self.start_flight();
        Decision::Lead {
            flight,
            rx,
            stale,
            proven: self.proven,
        }
    }

    fn start_flight(&mut self) -> (FlightTx, FlightRx) {
        let (tx, rx) = watch::channel(None);
        self.flight = Some(rx.clone());
        (tx, rx)
    }

    /// Lands a flight's outcome at `now` and frees the flight slot. `jitter` in `[0, 1]` spreads
    /// the backoff after the provider hands back the token already cached.
    fn land(
        &mut self,
        shared: &FlightResult,
        grant: Grant,
        config: &TokenConfig,
        now: Instant,
        jitter: f64,
    ) {
        self.flight = None;
        match shared {
            FlightResult::Token(token) => {
                self.remembered = None;
                self.proven = true;
                let same = self
                    .tokens
                    .iter()
                    .position(|old| old.fingerprint == token.fingerprint);
                if let Some(at) = same {
                    // Keep it (with its new timings), but do not ask again until a growing
                    // backoff has passed.
                    self.same_token_streak += 1;
                    let delay = cooldown::backoff(
                        self.same_token_streak,
                        config.backoff_base,
                        config.backoff_max,
                        0.5 + jitter / 2.0,
                    );
                    self.refresh_not_before = Some(now + delay);
                    self.tokens[at] = token.clone();
                    return;
                }
                self.same_token_streak = 0;
                self.refresh_not_before = None;
                self.tokens.retain(|t| t.servable(now));
                if self.tokens.len() >= config.pool_size {
                    // Full: the new token replaces the one that is most due for a refresh.
                    let most_due =
                        (0..self.tokens.len()).min_by_key(|&i| self.tokens[i].refresh_at);
                    if let Some(most_due) = most_due {
                        self.tokens.remove(most_due);
                    }
                }
                self.tokens.push(token.clone());
            }
            FlightResult::Reply(reply) if rejects_credentials(reply.status) => {
                self.tokens.clear();
                self.proven = false;
                self.remembered = Some((now + config.error_ttl, reply.clone()));
            }
            FlightResult::Reply(reply)
                if grant == Grant::RefreshToken && reply.status.is_success() =>
            {
                self.remembered = Some((now + config.refresh_token_ttl, reply.clone()));
            }
            FlightResult::Reply(_) | FlightResult::Failed(_) => {}
        }
    }

    /// Whether the entry holds nothing worth keeping at `now`. A token past its margin is kept
    /// until it really expires, so the next request is told `stale` and the same-token backoff
    /// is remembered.
    fn is_dead(&self, now: Instant) -> bool {
        self.flight.is_none()
            && self.tokens.iter().all(|t| now >= t.expires_at)
            && self
                .remembered
                .as_ref()
                .is_none_or(|(until, _)| *until <= now)
    }
}

impl EntryState {
    /// What the map reads of this entry at `now` (see [`Glance`]).
    fn glance(&self, now: Instant) -> Glance {
        let servable = || self.tokens.iter().filter(|t| t.servable(now));
        Glance {
            calling: self.flight.is_some(),
            tokens: servable().count(),
            ttl_secs: servable().map(|t| t.ttl_secs(now)).max(),
            client: self.client,
            dead: self.is_dead(now),
        }
    }
}

/// A flight's right to land in its entry. Landing publishes the outcome to every waiter; a
/// `Landing` dropped without landing (the flight panicked or was aborted) clears the slot, so the
/// key is not stuck, and its waiters see the channel close.
#[derive(Debug)]
pub(crate) struct Landing {
    entry: Arc<Entry>,
    tx: Option<FlightTx>,
}

impl Landing {
    /// The entry this flight lands in.
    #[cfg(test)]
    pub(super) fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }

    /// Names the entry's client for `/status` (a hash prefix, never the id).
    pub(crate) fn name_client(&self, client: [u8; 4]) {
        self.entry.lock().client = Some(client);
    }

    /// How many callers are waiting for this flight now.
    pub(crate) fn waiters(&self) -> usize {
        // The entry keeps a receiver of its own, for callers that join later.
        self.tx
            .as_ref()
            .map_or(0, |tx| tx.receiver_count().saturating_sub(1))
    }

    /// Completes once no caller waits for this flight. Polled every [`DESERTED_POLL`]: the
    /// entry keeps a receiver of its own, so the channel never reports itself closed.
    pub(crate) async fn deserted(&self) {
        while self.waiters() > 0 {
            tokio::time::sleep(DESERTED_POLL).await;
        }
    }

    /// Lands `shared` (see [`EntryState::land`]), then publishes it; returns how many callers
    /// were waiting for it.
    pub(crate) fn land(
        mut self,
        shared: FlightResult,
        grant: Grant,
        config: &TokenConfig,
        now: Instant,
        jitter: f64,
    ) -> usize {
        self.entry.lock().land(&shared, grant, config, now, jitter);
        let Some(tx) = self.tx.take() else {
            unreachable!("only land and drop take the sender, and land takes self")
        };
        let waiters = tx.receiver_count();
        tx.send_replace(Some(shared));
        waiters
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.entry.lock().flight = None;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::token::lifetime::Validated;
    use http::{HeaderMap, HeaderValue};
    use std::time::Duration;

    pub(crate) fn token(name: &str, lifetime_s: u64, now: Instant) -> Arc<Token> {
        let body = format!(r#"{{"access_token":"{name}","expires_in":{lifetime_s}}}"#);
        match Token::from_upstream(
            body.as_bytes(),
            HeaderValue::from_static("application/json"),
            now,
            &TokenConfig::default(),
            0.0,
        ) {
            Ok(Validated::Token(token)) => Arc::new(token),
            other => panic!("expected a token, got {other:?}"),
        }
    }

    fn reply(status: u16) -> FlightResult {
        FlightResult::Reply(Arc::new(Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: bytes::Bytes::from_static(b"{}"),
        }))
    }

    pub(crate) fn config() -> TokenConfig {
        TokenConfig::default()
    }

    fn cooling(secs: u64) -> Option<Cooling> {
        Some(Cooling {
            left: Duration::from_secs(secs),
            by: crate::error::HeldBy::Provider,
        })
    }

    /// Leads a flight at `now` and lands `shared` in it.
    fn fly(state: &mut EntryState, now: Instant, grant: Grant, shared: FlightResult) {
        let Decision::Lead { .. } = state.decide(now, 1, |_| None) else {
            panic!("expected to lead a flight")
        };
        state.land(&shared, grant, &config(), now, 1.0);
    }

    #[test]
    fn one_leader_then_joiners_while_the_flight_is_open_then_the_cool_down() {
        let mut state = EntryState::default();
        let now = Instant::now();
        let Decision::Lead { stale, .. } = state.decide(now, 1, |_| None) else {
            panic!("expected lead")
        };
        assert!(!stale);
        assert!(matches!(state.decide(now, 1, |_| None), Decision::Join(_)));
        assert!(matches!(
            state.decide(now, 1, |_| cooling(5)),
            Decision::Join(_)
        ));
        state.land(
            &FlightResult::Failed(Error::UpstreamTimeout),
            Grant::ClientCredentials,
            &config(),
            now,
            0.0,
        );
        assert!(
            matches!(state.decide(now, 1, |_| cooling(5)), Decision::Cooldown(c) if c.left == Duration::from_secs(5))
        );
        assert!(matches!(
            state.decide(now, 1, |_| None),
            Decision::Lead { .. }
        ));
    }

    #[test]
    fn a_landed_token_is_served_then_refreshed_ahead_then_stale() {
        let mut state = EntryState::default();
        let t0 = Instant::now();
        fly(
            &mut state,
            t0,
            Grant::ClientCredentials,
            FlightResult::Token(token("a", 100, t0)),
        );
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(matches!(
            state.decide(at(10), 1, |_| None),
            Decision::Hit { refresh: None, .. }
        ));
        // Refresh is due at 80 % of the lifetime, once, and not while cooling down.
        assert!(matches!(
            state.decide(at(81), 1, |_| cooling(1)),
            Decision::Hit { refresh: None, .. }
        ));
        assert!(matches!(
            state.decide(at(81), 1, |_| None),
            Decision::Hit {
                refresh: Some(_),
                ..
            }
        ));
        assert!(matches!(
            state.decide(at(82), 1, |_| None),
            Decision::Hit { refresh: None, .. }
        ));
        state.flight = None;
        // Past the margin (10 s of 100 s), the next request leads a flight and says stale.
        assert!(matches!(
            state.decide(at(91), 1, |_| None),
            Decision::Lead { stale: true, .. }
        ));
    }

    #[test]
    fn the_same_token_again_backs_off_the_next_refresh() {
        let mut state = EntryState::default();
        let t0 = Instant::now();
        let first = token("same", 100, t0);
        fly(
            &mut state,
            t0,
            Grant::ClientCredentials,
            FlightResult::Token(first.clone()),
        );
        let at = |s: u64| t0 + Duration::from_secs(s);
        let Decision::Hit {
            refresh: Some(_), ..
        } = state.decide(at(81), 1, |_| None)
        else {
            panic!("expected a refresh")
        };
        state.land(
            &FlightResult::Token(token("same", 100, t0)),
            Grant::ClientCredentials,
            &config(),
            at(81),
            1.0,
        );
        assert_eq!(state.same_token_streak, 1);
        // backoff(1, 1 s, 60 s) with full jitter at 1.0: 2 s.
        assert_eq!(state.refresh_not_before, Some(at(83)));
        assert!(matches!(
            state.decide(at(82), 1, |_| None),
            Decision::Hit { refresh: None, .. }
        ));
        assert!(matches!(
            state.decide(at(83), 1, |_| None),
            Decision::Hit {
                refresh: Some(_),
                ..
            }
        ));
        state.land(
            &FlightResult::Token(token("new", 100, at(83))),
            Grant::ClientCredentials,
            &config(),
            at(83),
            1.0,
        );
        assert_eq!(state.same_token_streak, 0);
        assert_eq!(state.refresh_not_before, None);
    }

    #[test]
    fn a_credentials_rejection_drops_the_token_and_is_remembered_for_the_error_ttl() {
        for status in [400, 401, 403] {
            let mut state = EntryState::default();
            let t0 = Instant::now();
            fly(
                &mut state,
                t0,
                Grant::ClientCredentials,
                FlightResult::Token(token("a", 100, t0)),
            );
            let refresh_at = t0 + Duration::from_secs(81);
            let Decision::Hit {
                refresh: Some(_), ..
            } = state.decide(refresh_at, 1, |_| None)
            else {
                panic!("expected a refresh")
            };
            state.land(
                &reply(status),
                Grant::ClientCredentials,
                &config(),
                refresh_at,
                0.0,
            );
            assert!(
                state.tokens.is_empty(),
                "{status}: the old token is no longer served"
            );
            let later = refresh_at + config().error_ttl - Duration::from_millis(1);
            assert!(
                matches!(state.decide(later, 1, |_| None), Decision::Remembered(r) if r.status == status)
            );
            let past = refresh_at + config().error_ttl;
            assert!(matches!(
                state.decide(past, 1, |_| None),
                Decision::Lead { stale: false, .. }
            ));
        }
    }

    #[test]
    fn other_answers_keep_the_token_and_are_not_remembered() {
        for shared in [
            reply(429),
            reply(500),
            reply(200),
            FlightResult::Failed(Error::UpstreamUnavailable),
        ] {
            let mut state = EntryState::default();
            let t0 = Instant::now();
            fly(
                &mut state,
                t0,
                Grant::ClientCredentials,
                FlightResult::Token(token("a", 100, t0)),
            );
            state.land(&shared, Grant::ClientCredentials, &config(), t0, 0.0);
            assert!(!state.tokens.is_empty());
            assert!(state.remembered.is_none());
        }
    }

    #[test]
    fn a_refresh_token_answer_is_remembered_for_the_refresh_token_ttl() {
        let mut state = EntryState::default();
        let t0 = Instant::now();
        fly(&mut state, t0, Grant::RefreshToken, reply(200));
        let until = t0 + config().refresh_token_ttl;
        assert!(matches!(
            state.decide(until - Duration::from_millis(1), 1, |_| None),
            Decision::Remembered(_)
        ));
        assert!(matches!(
            state.decide(until, 1, |_| None),
            Decision::Lead { .. }
        ));
        let mut throttled = EntryState::default();
        fly(&mut throttled, t0, Grant::RefreshToken, reply(429));
        assert!(
            throttled.remembered.is_none(),
            "only successes are remembered"
        );
    }

    #[test]
    fn a_pool_fills_in_the_background_then_hands_its_tokens_out_in_turn() {
        let pooled = TokenConfig {
            pool_size: 3,
            ..config()
        };
        let mut state = EntryState::default();
        let t0 = Instant::now();
        let Decision::Lead { .. } = state.decide(t0, 3, |_| None) else {
            panic!("a cold key leads")
        };
        state.land(
            &FlightResult::Token(token("a", 100, t0)),
            Grant::ClientCredentials,
            &pooled,
            t0,
            0.0,
        );
        // Each hit is served at once; while the pool is short, one starts the next fill.
        for name in ["b", "c"] {
            let Decision::Hit {
                refresh: Some(_), ..
            } = state.decide(t0, 3, |_| None)
            else {
                panic!("a short pool fills in the background")
            };
            assert!(
                matches!(
                    state.decide(t0, 3, |_| None),
                    Decision::Hit { refresh: None, .. }
                ),
                "one fill at a time"
            );
            state.land(
                &FlightResult::Token(token(name, 100, t0)),
                Grant::ClientCredentials,
                &pooled,
                t0,
                0.0,
            );
        }
        assert_eq!(state.tokens.len(), 3);
        let served: std::collections::HashSet<[u8; 32]> = (0..3)
            .map(|_| match state.decide(t0, 3, |_| None) {
                Decision::Hit {
                    token,
                    refresh: None,
                } => token.fingerprint,
                other => panic!("a full pool serves without calls: {other:?}"),
            })
            .collect();
        assert_eq!(served.len(), 3, "three hits in a row get the three tokens");
        // Refresh ahead replaces the most due token; the pool never grows past its size.
        let at81 = t0 + Duration::from_secs(81);
        let Decision::Hit {
            refresh: Some(_), ..
        } = state.decide(at81, 3, |_| None)
        else {
            panic!("due tokens are refreshed")
        };
        state.land(
            &FlightResult::Token(token("d", 100, at81)),
            Grant::ClientCredentials,
            &pooled,
            at81,
            0.0,
        );
        assert_eq!(state.tokens.len(), 3);
        assert!(
            state
                .tokens
                .iter()
                .any(|t| t.refresh_at == Some(at81 + Duration::from_secs(80)))
        );
    }

    #[test]
    fn a_landing_dropped_without_landing_frees_the_slot_and_closes_the_channel() {
        let entry = Arc::new(Entry::default());
        let now = Instant::now();
        let Decision::Lead { flight, rx, .. } = entry.decide(0, now, 1, |_| None) else {
            panic!("expected lead")
        };
        assert!(matches!(
            entry.decide(0, now, 1, |_| None),
            Decision::Join(_)
        ));
        drop(flight);
        assert!(rx.has_changed().is_err(), "waiters see the channel close");
        assert!(matches!(
            entry.decide(0, now, 1, |_| None),
            Decision::Lead { .. }
        ));
    }

    #[test]
    fn landing_publishes_to_every_waiter() {
        let entry = Arc::new(Entry::default());
        let now = Instant::now();
        let Decision::Lead { flight, rx, .. } = entry.decide(0, now, 1, |_| None) else {
            panic!("expected lead")
        };
        let Decision::Join(joined) = entry.decide(0, now, 1, |_| None) else {
            panic!("expected join")
        };
        let waiters = flight.land(
            FlightResult::Token(token("t", 60, now)),
            Grant::ClientCredentials,
            &config(),
            now,
            0.0,
        );
        assert_eq!(waiters, 2);
        for rx in [rx, joined] {
            assert!(matches!(&*rx.borrow(), Some(FlightResult::Token(_))));
        }
        assert!(matches!(
            entry.decide(0, now, 1, |_| None),
            Decision::Hit { .. }
        ));
    }
}
