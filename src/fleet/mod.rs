//! The fleet tier: sidecars of one fleet share tokens, single flights and cool-downs through a
//! Redis (or Valkey) server, so a fleet of N pods makes one provider call per token lifetime,
//! not N, and a `Retry-After` seen by one pod holds them all.
//!
//! This module owns the Redis side and knows nothing of tokens: [`Fleet`] runs the three scripts
//! (claim, commit a token, commit a hold) each in one bounded round trip, listens for "landed"
//! notices, and keeps a [`breaker::Breaker`] so that a slow or lost Redis costs one short timeout,
//! then nothing: every pod goes on alone, as without the tier, and tries Redis again after a
//! backoff. [`keys`] derives the key names and seals the values. The token path's use of it is
//! `token::fleet`.
//!
//! Redis holds, per key (the names are HMACs: see [`Names`]): the sealed token (`t`, TTL = its
//! serve-until), a marker that it is still fresh (`f`, TTL = until the fleet refreshes it), the
//! flight lock (`l`, a random owner, TTL = the request timeout, so a dead owner's lock expires),
//! and per client the cool-down (`c`, TTL = the hold, never shortened).

pub(crate) mod breaker;
pub mod keys;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{FleetSecret, SharedConfig, redacted};
use crate::metrics::FleetMetrics;
use breaker::Breaker;
pub use keys::Entry;

/// The channel every commit publishes the key's id on.
const LANDED: &str = "token-sidecar:landed";

/// One key's Redis names, from two HMACs the token path makes of the request's canonical form
/// (`token::request::Canonical`): `id` (of the whole form) and `client` (of its client part, the
/// route and client id, for the cool-down). Only these digests reach Redis.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// Hex of the key's HMAC: the notice payload and the suffix of every name.
    pub id: String,
    token: String,
    fresh: String,
    lock: String,
    cool: String,
}

impl Names {
    pub(crate) fn new(id: &[u8; 32], client: &[u8; 32]) -> Names {
        let id = hex(id);
        Names {
            token: format!("tsc:t:{id}"),
            fresh: format!("tsc:f:{id}"),
            lock: format!("tsc:l:{id}"),
            cool: format!("tsc:c:{}", hex(client)),
            id,
        }
    }

    /// The name the sealed token is stored under, its associated data.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a claim found.
#[derive(Debug)]
pub(crate) enum Claim {
    /// A sealed token, with how long it may still be served and how long until the fleet
    /// refreshes it (zero: due now).
    Token {
        sealed: Vec<u8>,
        serve_left: Duration,
        fresh_left: Duration,
    },
    /// The client is on a fleet cool-down for this long, and no token is stored.
    Cooldown(Duration),
    /// This pod took the flight lock: it calls the provider and commits.
    Lead(Lease),
    /// Another pod holds the lock: wait for its notice.
    Busy,
}

/// A held flight lock: its random owner, for the compare-and-delete.
#[derive(Debug)]
pub(crate) struct Lease {
    owner: String,
}

/// A stored token, its fresh marker and the client's cool-down decide; else the lock is taken.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v and redis.call('EXISTS', KEYS[2]) == 1 then
  return {1, v, redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2])}
end
local cd = redis.call('PTTL', KEYS[3])
if cd > 0 then
  if v then return {1, v, redis.call('PTTL', KEYS[1]), cd} end
  return {2, cd}
end
if redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {3}
end
return {4}
";

/// Stores the sealed token (TTL = serve-until) and its fresh marker, frees the lock if still
/// ours, and tells the fleet.
const COMMIT_TOKEN: &str = r"
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
else
  redis.call('DEL', KEYS[2])
end
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
";

/// Extends the client's cool-down (never shortens it), frees the lock if still ours, and tells
/// the fleet. A hold of 0 only frees the lock.
const COMMIT_HOLD: &str = r"
local ms = tonumber(ARGV[2])
if ms > 0 and redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// One process's connection to its fleet.
pub(crate) struct Fleet {
    client: Client,
    manager: ConnectionManager,
    /// Where the Redis server is, without credentials, for logs.
    address: String,
    secret: FleetSecret,
    breaker: Breaker,
    timeout: Duration,
    connect_timeout: Duration,
    poll_interval: Duration,
    claim: Script,
    commit_token: Script,
    commit_hold: Script,
    /// "Landed" notices from Redis, by key id; followers subscribe before they claim.
    landed: broadcast::Sender<Arc<str>>,
    metrics: FleetMetrics,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("address", &self.address)
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// A fleet client for `config`; connects lazily, so a Redis that is down at start delays
    /// nothing. Errors name what is wrong with the URL or the CA file.
    pub(crate) fn new(config: &SharedConfig, metrics: FleetMetrics) -> Result<Fleet, String> {
        let address = redacted(&config.redis);
        let mut info: redis::ConnectionInfo = redis::IntoConnectionInfo::into_connection_info(
            config.redis.as_str(),
        )
        .map_err(|e| {
            format!(
                "shared.redis {address}: {}",
                e.detail().unwrap_or("not a redis:// or rediss:// URL")
            )
        })?;
        if let Some(password) = &config.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match &config.ca_file {
            Some(path) => {
                let root = std::fs::read(path)
                    .map_err(|e| format!("shared.ca_file {}: {e}", path.display()))?;
                Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root),
                    },
                )
            }
            None => Client::open(info),
        }
        .map_err(|e| format!("shared.redis {address}: {e}"))?;
        let manager = ConnectionManager::new_lazy_with_config(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_response_timeout(Some(config.timeout))
                .set_connection_timeout(Some(config.connect_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2)),
        )
        .map_err(|e| format!("shared.redis {address}: {e}"))?;
        metrics.breaker(breaker::State::Closed as i64);
        Ok(Fleet {
            client,
            manager,
            address,
            secret: config.secret.clone(),
            breaker: Breaker::new(Duration::from_millis(500), Duration::from_secs(30)),
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            poll_interval: config.poll_interval,
            claim: Script::new(CLAIM),
            commit_token: Script::new(COMMIT_TOKEN),
            commit_hold: Script::new(COMMIT_HOLD),
            landed: broadcast::channel(1024).0,
            metrics,
        })
    }

    /// Opens the connection and loads the scripts, before the sidecar says it is ready: the first
    /// claims of a cold start then find both, instead of spending their short timeout on a TCP
    /// and TLS handshake, HELLO/AUTH and a NOSCRIPT round trip (each pod would go alone). Bounded
    /// by `connect_timeout` plus one call's `timeout`; a Redis that does not answer by then is
    /// logged, and the pod starts without it (the claims find out as before).
    pub(crate) async fn warm_up(&self) {
        let mut connection = self.manager.clone();
        let warm = async {
            redis::cmd("PING")
                .query_async::<()>(&mut connection)
                .await?;
            for script in [&self.claim, &self.commit_token, &self.commit_hold] {
                script.load_async(&mut connection).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        let bound = self.connect_timeout + self.timeout;
        match tokio::time::timeout(bound, warm).await {
            Ok(Ok(())) => info!(redis = %self.address, "fleet tier: connected, scripts loaded"),
            Ok(Err(e)) => {
                warn!(redis = %self.address, why = ?e.kind(), "fleet tier: Redis refused the start; each pod goes on alone until it answers")
            }
            Err(_) => {
                warn!(redis = %self.address, bound_ms = bound.as_millis() as u64, "fleet tier: no answer from Redis at start; each pod goes on alone until it answers")
            }
        }
    }

    /// What `/status` shows: the server (without its login) and the breaker.
    pub(crate) fn status(&self) -> crate::status::FleetStatus {
        let breaker = match self.breaker.state() {
            breaker::State::Closed => "closed",
            breaker::State::Open => "open",
            breaker::State::HalfOpen => "half-open",
        };
        crate::status::FleetStatus {
            redis: self.address.clone(),
            breaker: breaker.to_owned(),
        }
    }

    /// The fleet secret, for deriving the token path's keys.
    pub(crate) fn secret(&self) -> &FleetSecret {
        &self.secret
    }

    /// How often a follower asks again without a notice.
    pub(crate) fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// Notices of keys that landed, to wait on; subscribe before the claim that says busy.
    pub(crate) fn notices(&self) -> broadcast::Receiver<Arc<str>> {
        self.landed.subscribe()
    }

    /// One claim round trip; `None` when Redis is skipped or failed (go on alone).
    pub(crate) async fn claim(&self, names: &Names, lock_for: Duration) -> Option<Claim> {
        let owner = hex(&rand::random::<[u8; 16]>());
        let mut invocation = self.claim.prepare_invoke();
        invocation
            .key(&names.token)
            .key(&names.fresh)
            .key(&names.cool)
            .key(&names.lock)
            .arg(&owner)
            .arg(millis(lock_for).max(1));
        let value: Value = self
            .call("claim", invocation.invoke_async(&mut self.manager.clone()))
            .await?;
        let claim = parse_claim(value, owner);
        if claim.is_none() {
            self.metrics.error("claim");
        }
        let outcome = match &claim {
            Some(Claim::Token { .. }) => "hit",
            Some(Claim::Cooldown(_)) => "cooldown",
            Some(Claim::Lead(_)) => "lead",
            Some(Claim::Busy) => "busy",
            None => return None,
        };
        self.metrics.claim(outcome);
        claim
    }

    /// Counts a stored token this pod could not open (another secret or fleet key sealed it, or
    /// it was altered): a miss.
    pub(crate) fn unreadable(&self) {
        self.metrics.claim("unreadable");
    }

    /// Stores a sealed token for `serve` (its serve-until) and `fresh` (until its refresh), frees
    /// the lock and tells the fleet.
    pub(crate) async fn commit_token(
        &self,
        names: &Names,
        lease: &Lease,
        sealed: Vec<u8>,
        serve: Duration,
        fresh: Duration,
    ) {
        let serve = millis(serve);
        if serve == 0 {
            return self.commit_hold(names, lease, Duration::ZERO).await;
        }
        let mut invocation = self.commit_token.prepare_invoke();
        invocation
            .key(&names.token)
            .key(&names.fresh)
            .key(&names.lock)
            .arg(&lease.owner)
            .arg(sealed)
            .arg(serve)
            .arg(millis(fresh).min(serve))
            .arg(LANDED)
            .arg(&names.id);
        self.commit(invocation).await;
    }

    /// Extends the client's fleet cool-down to at least `hold` (zero: none), frees the lock and
    /// tells the fleet.
    pub(crate) async fn commit_hold(&self, names: &Names, lease: &Lease, hold: Duration) {
        let mut invocation = self.commit_hold.prepare_invoke();
        invocation
            .key(&names.cool)
            .key(&names.lock)
            .arg(&lease.owner)
            .arg(millis(hold))
            .arg(LANDED)
            .arg(&names.id);
        self.commit(invocation).await;
    }

    async fn commit(&self, invocation: redis::ScriptInvocation<'_>) {
        let done: Option<Value> = self
            .call("commit", invocation.invoke_async(&mut self.manager.clone()))
            .await;
        if done.is_some() {
            self.metrics.claim("commit");
        }
    }

    /// Runs `call` unless the breaker is open, bounded by the timeout; a failure opens the
    /// breaker.
    async fn call<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        if !self.breaker.allow(Instant::now()) {
            self.metrics.claim("skipped");
            return None;
        }
        self.metrics.breaker(self.breaker.state() as i64);
        let why = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => {
                if self.breaker.state() != breaker::State::Closed {
                    info!(redis = %self.address, "shared tier: Redis answers again");
                }
                self.breaker.success();
                self.metrics.breaker(breaker::State::Closed as i64);
                return Some(value);
            }
            Ok(Err(e)) => format!("{:?}", e.kind()),
            Err(_) => format!("no answer within {} ms", self.timeout.as_millis()),
        };
        self.metrics.error(op);
        if self.breaker.failure(Instant::now(), rand::random()) {
            warn!(redis = %self.address, op, why, "shared tier: Redis failed; each pod goes on alone until it answers again");
        }
        self.metrics.breaker(self.breaker.state() as i64);
        None
    }

    /// Listens for "landed" notices until `stop`, reconnecting after a backoff when the
    /// connection is lost. Without it followers still poll.
    pub(crate) async fn listen(self: Arc<Self>, stop: CancellationToken) {
        use futures_util::StreamExt;
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            let connected = tokio::time::timeout(self.connect_timeout, async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(LANDED).await?;
                redis::RedisResult::Ok(pubsub)
            })
            .await;
            if let Ok(Ok(pubsub)) = connected {
                failures = 0;
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        message = messages.next() => match message {
                            Some(message) => {
                                let id = String::from_utf8_lossy(message.get_payload_bytes());
                                let _ = self.landed.send(Arc::from(id.as_ref()));
                            }
                            None => break,
                        },
                    }
                }
            } else {
                self.metrics.error("subscribe");
            }
            failures = failures.saturating_add(1);
            let pause = Duration::from_millis(250)
                .saturating_mul(1 << failures.min(5))
                .min(Duration::from_secs(5));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A claim script's answer; `None` if it is not one (a Redis that is not ours).
fn parse_claim(value: Value, owner: String) -> Option<Claim> {
    let Value::Array(items) = value else {
        return None;
    };
    let int = |i: usize| match items.get(i) {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    };
    let left = |i: usize| int(i).map(|ms| Duration::from_millis(ms.max(0) as u64));
    match int(0)? {
        1 => {
            let Some(Value::BulkString(sealed)) = items.get(1) else {
                return None;
            };
            Some(Claim::Token {
                sealed: sealed.clone(),
                serve_left: left(2)?,
                fresh_left: left(3)?,
            })
        }
        2 => Some(Claim::Cooldown(left(1)?)),
        3 => Some(Claim::Lead(Lease { owner })),
        4 => Some(Claim::Busy),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reveal_only_digests() {
        let names = Names::new(&[0xab; 32], &[0xcd; 32]);
        assert_eq!(names.token(), format!("tsc:t:{}", "ab".repeat(32)));
        assert_eq!(names.cool, format!("tsc:c:{}", "cd".repeat(32)));
    }
}
