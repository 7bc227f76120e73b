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
//! third.

use http::HeaderValue;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use super::entry::FlightResult;
use super::lifetime::Token;
use super::request::{Canonical, Grant, Keyer};
use crate::fleet::keys::{self, Entry};
use crate::fleet::{Claim, Fleet, Lease, Names};

/// One route's keys into the fleet.
#[derive(Debug)]
pub(crate) struct FleetKeys {
    fleet: Arc<Fleet>,
    /// Keys the Redis names.
    names: Keyer,
    /// Keys the value keys: the whole key material, secret included.
    values: Keyer,
    /// Keys the per-client cool-down names.
    clients: Keyer,
}

/// One key's place in the fleet.
#[derive(Debug)]
pub(crate) struct FleetKey {
    names: Names,
    seal: [u8; 32],
}

/// What the fleet said for one round of a flight.
#[derive(Debug)]
pub(crate) enum Step {
    /// Another pod's token, ready to land.
    Token(Token),
    /// The client is on a fleet cool-down this long: hold locally too.
    Hold(Duration),
    /// This pod leads the fleet's flight: call the provider, then commit.
    Lead(Lease),
    /// No fleet answer (Redis skipped, failed, or a follower's wait ran out): go on alone.
    Alone,
}

impl FleetKeys {
    /// The keys of a route whose provider is `upstream`: the provider is part of every key, so
    /// two fleets' routes of one name towards two providers (staging and production, say)
    /// never share a token or a cool-down.
    pub(crate) fn new(fleet: Arc<Fleet>, upstream: &str) -> FleetKeys {
        let secret = fleet.secret();
        let derive = |purpose: &str| Keyer::new(&secret.derive(&format!("{purpose} {upstream}")));
        FleetKeys {
            names: derive("redis key names"),
            values: derive("redis value keys"),
            clients: derive("redis client names"),
            fleet,
        }
    }

    /// The fleet key of a token request from its canonical form, or `None` for what the fleet
    /// does not share (refresh grants: their answers are per refresh token and kept only
    /// briefly).
    pub(crate) fn key(&self, grant: Grant, canonical: &Canonical) -> Option<FleetKey> {
        (grant == Grant::ClientCredentials).then(|| FleetKey {
            names: Names::new(
                &canonical.digest(&self.names),
                &canonical.client_digest(&self.clients),
            ),
            seal: canonical.digest(&self.values),
        })
    }

    /// Asks the fleet about `key` until it says something other than "another pod is calling",
    /// waiting for that pod's notice (or polling) no later than `until`. The lock taken lasts
    /// `lock_for`, the longest a call can take.
    pub(crate) async fn consult(&self, key: &FleetKey, lock_for: Duration, until: Instant) -> Step {
        loop {
            // Subscribed before the claim, so a notice sent between the two is not missed.
            let mut notices = self.fleet.notices();
            let claim = match self.fleet.claim(&key.names, lock_for).await {
                None => return Step::Alone,
                Some(claim) => claim,
            };
            match claim {
                Claim::Token {
                    sealed,
                    serve_left,
                    fresh_left,
                } => return self.open(key, &sealed, serve_left, fresh_left),
                Claim::Cooldown(left) => return Step::Hold(left),
                Claim::Lead(lease) => return Step::Lead(lease),
                Claim::Busy => {}
            }
            let now = Instant::now();
            if now >= until {
                return Step::Alone;
            }
            let poll = self.fleet.poll_interval().min(until - now);
            let _ = tokio::time::timeout(poll, async {
                loop {
                    match notices.recv().await {
                        Ok(id) if *id == *key.names.id => return,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            })
            .await;
        }
    }

    fn open(&self, key: &FleetKey, sealed: &[u8], serve_left: Duration, fresh: Duration) -> Step {
        let token = keys::open(&key.seal, key.names.token(), sealed).and_then(|entry| {
            let content_type = HeaderValue::from_str(&entry.content_type).ok()?;
            let expires_left =
                serve_left + Duration::from_millis(entry.expires_ms.saturating_sub(entry.serve_ms));
            let refresh = (entry.refresh_ms > 0).then_some(fresh);
            Token::from_fleet(
                &entry.body,
                content_type,
                Instant::now(),
                expires_left,
                serve_left,
                refresh,
            )
        });
        match token {
            Some(token) => Step::Token(token),
            None => {
                self.fleet.unreadable();
                Step::Alone
            }
        }
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
        let FlightResult::Token(token) = shared else {
            return self
                .fleet
                .commit_hold(&key.names, lease, hold.unwrap_or_default())
                .await;
        };
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let at = |instant: Instant| {
            u64::try_from((wall + instant.saturating_duration_since(now)).as_millis())
                .unwrap_or(u64::MAX)
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
                .commit_hold(&key.names, lease, Duration::ZERO)
                .await;
        };
        let serve = token.serve_until.saturating_duration_since(now);
        let fresh = token
            .refresh_at
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        self.fleet
            .commit_token(&key.names, lease, sealed, serve, fresh)
            .await;
    }
}
