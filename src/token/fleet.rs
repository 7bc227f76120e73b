//! The token path's side of the fleet tier ([`crate::fleet`]): which keys a fleet shares, their
//! Redis names and value keys, and one flight round's question to the fleet ([`FleetKeys::consult`])
//! and its answer back ([`FleetKeys::commit`]).
//!
//! Only a flight's leader gets here, so a pod asks Redis once per key per miss, refresh or
//! cool-down decision; hits never do. Names and value keys are HMACs of the request's one
//! canonical form ([`Canonical`], the same the local cache key is made of), under keys derived
//! from the fleet secret and the provider: the name under one, the value key under another, so
//! the value key depends on the client secret too and nothing in Redis opens without it. The
//! cool-down name is an HMAC of the form's client part (route and client id, no secret) under a
//! third, and its value a deadline under a MAC with a fourth.
//!
//! Redis is not trusted with time: a token is served only until the serve-until sealed with it,
//! whatever its TTL, and a cool-down is obeyed only if its MAC checks, for at most
//! `retry_after_max`.

use http::HeaderValue;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use super::entry::FlightResult;
use super::lifetime::Token;
use super::request::{Canonical, Grant, Keyer};
use crate::config::{FleetSecret, TokenConfig};
use crate::fleet::keys::{self, Entry};
use crate::fleet::{Claim, Fleet, Hold, Lease, Names, Passing};

/// One route's keys into the fleet.
#[derive(Debug)]
pub(crate) struct FleetKeys {
    fleet: Arc<Fleet>,
    /// The route's provider, part of every derived key.
    upstream: String,
    /// The keys of the current secret and of the previous one, and the secrets' generation they
    /// were derived from.
    sets: std::sync::RwLock<Sets>,
    /// The longest fleet cool-down obeyed (`token.retry_after_max`, as for a local one).
    max_hold: Duration,
    /// How long a key stays proven in the fleet after its last token (`token.idle_timeout`).
    proven_for: Duration,
}

/// A generation of key sets: the current secret's and the previous one's.
type Sets = (u64, Arc<KeySet>, Option<Arc<KeySet>>);

/// The keys one fleet secret gives a route.
#[derive(Debug)]
struct KeySet {
    /// Keys the Redis names.
    names: Keyer,
    /// Keys the value keys: the whole key material, secret included.
    values: Keyer,
    /// Keys the per-client cool-down names.
    clients: Keyer,
    /// Keys the MACs of cool-down deadlines.
    holds: [u8; 32],
}

impl KeySet {
    fn derive(secret: &FleetSecret, upstream: &str) -> KeySet {
        let derive = |purpose: &str| secret.derive(&format!("{purpose} {upstream}"));
        KeySet {
            names: Keyer::new(&derive("redis key names")),
            values: Keyer::new(&derive("redis value keys")),
            clients: Keyer::new(&derive("redis client names")),
            holds: derive("redis hold macs"),
        }
    }

    /// A key's names and value key under this set.
    fn place(&self, canonical: &Canonical) -> (Names, [u8; 32]) {
        let names = Names::new(
            &canonical.digest(&self.names),
            &canonical.client_digest(&self.clients),
        );
        (names, canonical.digest(&self.values))
    }
}

/// One key's place in the fleet: its names and value key under the current secret, and where a
/// token sealed under the previous one would be.
#[derive(Debug)]
pub(crate) struct FleetKey {
    names: Names,
    seal: [u8; 32],
    set: Arc<KeySet>,
    previous: Option<(Names, [u8; 32])>,
}

/// What the fleet said for one round of a flight.
#[derive(Debug)]
pub(crate) enum Step {
    /// Another pod's token, ready to land.
    Token(Arc<Token>),
    /// The client is on a fleet cool-down this long: hold locally too.
    Hold(Duration),
    /// This pod leads the fleet's flight: call the provider, then commit.
    Lead(Lease),
    /// No fleet answer (Redis skipped, failed, or a follower's wait ran out): go on alone, and
    /// commit to the lease if the failed claim may have taken one.
    Alone(Option<Lease>),
}

impl FleetKeys {
    /// The keys of a route whose provider is `upstream`: the provider is part of every key, so
    /// two fleets' routes of one name towards two providers (staging and production, say)
    /// never share a token or a cool-down.
    pub(crate) fn new(fleet: Arc<Fleet>, upstream: &str, config: &TokenConfig) -> FleetKeys {
        FleetKeys {
            sets: std::sync::RwLock::new(Self::derive(&fleet, upstream)),
            upstream: upstream.to_owned(),
            max_hold: config.retry_after_max,
            proven_for: config.idle_timeout,
            fleet,
        }
    }

    fn derive(fleet: &Fleet, upstream: &str) -> Sets {
        let secrets = fleet.secrets();
        let previous = secrets.previous.as_ref();
        (
            secrets.generation,
            Arc::new(KeySet::derive(&secrets.current, upstream)),
            previous.map(|secret| Arc::new(KeySet::derive(secret, upstream))),
        )
    }

    /// The current key sets, derived again once after the fleet read its key files again.
    fn sets(&self) -> (Arc<KeySet>, Option<Arc<KeySet>>) {
        let generation = self.fleet.generation();
        {
            let sets = self.sets.read().unwrap_or_else(|e| e.into_inner());
            if sets.0 == generation {
                return (sets.1.clone(), sets.2.clone());
            }
        }
        let derived = Self::derive(&self.fleet, &self.upstream);
        let sets = (derived.1.clone(), derived.2.clone());
        *self.sets.write().unwrap_or_else(|e| e.into_inner()) = derived;
        sets
    }

    /// The fleet key of a token request from its canonical form, or `None` for what the fleet
    /// does not share (refresh grants: their answers are per refresh token and kept only
    /// briefly).
    pub(crate) fn key(&self, grant: Grant, canonical: &Canonical) -> Option<FleetKey> {
        if grant != Grant::ClientCredentials {
            return None;
        }
        let (current, previous) = self.sets();
        let (names, seal) = current.place(canonical);
        Some(FleetKey {
            names,
            seal,
            set: current,
            previous: previous.map(|set| set.place(canonical)),
        })
    }

    /// Asks the fleet about `key` (`proven` if this pod has had a token for it) until it says
    /// something other than "another pod is calling", waiting for that pod's notice (or
    /// polling) no later than `until`. A leader that dies stops renewing its lock, which then
    /// expires: the next poll takes it.
    pub(crate) async fn consult(&self, key: &FleetKey, proven: bool, until: Instant) -> Step {
        let (mut passing, mut passes) = (Passing::default(), 0);
        // Bounded by `until` (each busy round waits for a notice or a poll) and, whatever Redis
        // holds, by the number of values passed over.
        while passes <= MAX_PASSES {
            // Subscribed before the claim, so a notice sent between the two is not missed.
            let mut notices = self.fleet.notices();
            let claim = match self.fleet.claim(&key.names, proven, &passing).await {
                Err(orphan) => return Step::Alone(orphan),
                Ok(claim) => claim,
            };
            match claim {
                Claim::Token {
                    sealed,
                    serve_left,
                    fresh_left,
                    hold,
                } => {
                    // A cool-down on the client postpones the refresh (a forged one a little).
                    let postponed =
                        hold.map(|hold| self.checked(key, &hold).unwrap_or(FORGED_FRESH));
                    let refresh = match postponed {
                        Some(left) => Refresh::Postponed(left),
                        None => Refresh::Fresh(fresh_left),
                    };
                    let opened =
                        self.open(&key.seal, key.names.token(), &sealed, serve_left, refresh);
                    match opened {
                        Some(token) => return Step::Token(Arc::new(token)),
                        // Claim again passing over it: this flight leads and overwrites it.
                        None => (passing.token, passes) = (true, passes + 1),
                    }
                }
                Claim::Cooldown(hold) => match self.checked(key, &hold) {
                    Some(left) => return Step::Hold(left),
                    // Forged or stale: claim again passing over the cool-downs; the hold this
                    // flight may start then overwrites it.
                    None => (passing.holds, passes) = (Some(hold.value), passes + 1),
                },
                Claim::Lead(lease) => return self.lead(key, lease).await,
                Claim::Busy => {
                    wait_for_notice(&mut notices, key, self.fleet.poll_interval(), until).await;
                    // The leader may have stored a token or a hold since: look at them again.
                    passing = Passing::default();
                }
            }
            if Instant::now() >= until {
                return Step::Alone(None);
            }
        }
        Step::Alone(None)
    }

    /// How long a fleet cool-down found for `key` holds it: until the deadline its MAC vouches
    /// for, no longer than Redis keeps it nor `retry_after_max`; `None` if the MAC does not check
    /// or the deadline has passed (a value replayed with a new TTL holds nobody).
    fn checked(&self, key: &FleetKey, hold: &Hold) -> Option<Duration> {
        let name = key.names.cool(hold.proven);
        let Some(deadline) = keys::hold_deadline(&key.set.holds, name, &hold.value) else {
            self.fleet.unreadable();
            return None;
        };
        let left = Duration::from_millis(deadline.saturating_sub(unix_ms(SystemTime::now())));
        let left = left.min(hold.ttl).min(self.max_hold);
        (!left.is_zero()).then_some(left)
    }

    /// This pod took the lead for `key`. During a rotation a token sealed under the previous
    /// secret may be stored under the previous names: it is served and stored again under the
    /// current ones (which frees the lock), instead of a provider call.
    async fn lead(&self, key: &FleetKey, lease: Lease) -> Step {
        let Some((names, seal)) = &key.previous else {
            return Step::Lead(lease);
        };
        let Some(sealed) = self.fleet.peek(names.token()).await else {
            return Step::Lead(lease);
        };
        let Some(token) = self.open(seal, names.token(), &sealed, Duration::MAX, Refresh::Sealed)
        else {
            return Step::Lead(lease);
        };
        let token = Arc::new(token);
        self.commit(key, &lease, &FlightResult::Token(token.clone()), None)
            .await;
        Step::Token(token)
    }

    /// The stored token, if it opens under `seal` and `name` and its sealed serve-until is still
    /// ahead; served no longer than `ttl` (Redis's) and refreshed as `refresh` says.
    fn open(
        &self,
        seal: &[u8; 32],
        name: &str,
        sealed: &[u8],
        ttl: Duration,
        refresh: Refresh,
    ) -> Option<Token> {
        let now_ms = unix_ms(SystemTime::now());
        let token = keys::open(seal, name, sealed).and_then(|entry| {
            let content_type = HeaderValue::from_str(&entry.content_type).ok()?;
            // The sealed serve-until and expiry win over Redis's TTL: a value written back with
            // a longer one is never served past them.
            let serve_left = Duration::from_millis(entry.serve_ms.checked_sub(now_ms)?).min(ttl);
            let expires_left = Duration::from_millis(entry.expires_ms.saturating_sub(now_ms));
            if serve_left.is_zero() || expires_left < serve_left {
                return None;
            }
            let sealed = Duration::from_millis(entry.refresh_ms.saturating_sub(now_ms));
            let refresh_left = match refresh {
                Refresh::Fresh(fresh) => fresh.min(sealed),
                Refresh::Postponed(hold) => hold,
                Refresh::Sealed => sealed,
            };
            let refresh = (entry.refresh_ms > 0).then_some(refresh_left.min(serve_left));
            Token::from_fleet(
                &entry.body,
                content_type,
                Instant::now(),
                expires_left,
                serve_left,
                refresh,
            )
        });
        if token.is_none() {
            self.fleet.unreadable();
        }
        token
    }

    /// Drops `key`'s stored token (an API rejected it): the next claim leads a new call.
    pub(crate) async fn forget(&self, key: &FleetKey) {
        self.fleet.forget(&key.names).await;
    }

    /// Tells the fleet how the flight `lease` led ended: the token, or the hold it started
    /// (none: just free the lock for the next pod to try).
    pub(crate) async fn commit(
        &self,
        key: &FleetKey,
        lease: &Lease,
        shared: &FlightResult,
        hold: Option<Duration>,
    ) {
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let at = |instant: Instant| {
            u64::try_from((wall + instant.saturating_duration_since(now)).as_millis())
                .unwrap_or(u64::MAX)
        };
        let FlightResult::Token(token) = shared else {
            let hold = hold.unwrap_or_default().min(self.max_hold);
            let value =
                keys::hold_value(&key.set.holds, key.names.cool(lease.proven), at(now + hold));
            return self
                .fleet
                .commit_hold(&key.names, lease, hold, &value)
                .await;
        };
        let entry = Entry {
            content_type: token
                .content_type
                .to_str()
                .unwrap_or("application/json")
                .to_owned(),
            body: token.body(now),
            expires_ms: at(token.expires_at),
            serve_ms: at(token.serve_until),
            refresh_ms: token.refresh_at.map_or(0, at),
        };
        let Some(sealed) = keys::seal(&key.seal, key.names.token(), &entry) else {
            tracing::warn!("fleet tier: the random source failed; this token is not shared");
            return self
                .fleet
                .commit_hold(&key.names, lease, Duration::ZERO, "")
                .await;
        };
        let serve = token.serve_until.saturating_duration_since(now);
        let fresh = token
            .refresh_at
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        self.fleet
            .commit_token(&key.names, lease, sealed, serve, fresh, self.proven_for)
            .await;
    }
}

/// When a token taken from the fleet is refreshed next.
#[derive(Debug, Clone, Copy)]
enum Refresh {
    /// When its fresh marker runs out, or its sealed refresh moment if sooner.
    Fresh(Duration),
    /// After the client's cool-down: not before, whatever the sealed moment says.
    Postponed(Duration),
    /// At its sealed refresh moment.
    Sealed,
}

/// Values (an unreadable token, a forged or stale cool-down) one consultation passes over at
/// most before it goes alone.
const MAX_PASSES: usize = 4;

/// When a stored token's cool-down is forged, the pod asks again this much later (instead of
/// at every hit).
const FORGED_FRESH: Duration = Duration::from_secs(1);

/// Unix milliseconds, saturating.
fn unix_ms(at: SystemTime) -> u64 {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Waits for the notice that `key` landed, at most `poll` and no later than `until`.
async fn wait_for_notice(
    notices: &mut tokio::sync::broadcast::Receiver<Arc<str>>,
    key: &FleetKey,
    poll: Duration,
    until: Instant,
) {
    use tokio::sync::broadcast::error::RecvError;
    let poll = poll.min(until.saturating_duration_since(Instant::now()));
    let _ = tokio::time::timeout(poll, async {
        loop {
            match notices.recv().await {
                Ok(id) if *id == *key.names.id => return,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    })
    .await;
}
