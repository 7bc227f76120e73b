//! The fleet tier: sidecars of one fleet share tokens, single flights and cool-downs through a
//! Redis (or Valkey) server, so a fleet of N pods makes one provider call per token lifetime,
//! not N, and a `Retry-After` seen by one pod holds them all.
//!
//! This module owns the Redis side and knows nothing of tokens: [`Fleet`] runs the scripts
//! (`scripts`: claim, commit a token, commit a hold, renew a lease) each in one bounded round
//! trip over the `link` (one server, a Cluster or Sentinels; connected in the background, never
//! inside a call), listens for "landed" notices, keeps a [`breaker::Breaker`] so that a slow or
//! lost Redis costs one short timeout, then nothing (every pod goes on alone, as without the
//! tier, and tries Redis again after a backoff), and reports its `health`. It holds the fleet
//! secrets and reads their files again on SIGHUP. [`keys`] derives the keys and seals the
//! values. The token path's use of it is `token::fleet`.
//!
//! Redis holds, per key (the names are HMACs: see [`Names`]): the sealed token (`t`, TTL = its
//! serve-until, which the sealed payload also carries and which wins), a marker that it is still
//! fresh (`f`, TTL = until the fleet refreshes it), a marker that the key has had a token (`p`,
//! so it is proven on every pod), the flight lock (`l`, a random owner, a lease of 1 s renewed by
//! its leader while the call runs, so a lock whose owner died or never knew it had it expires
//! within a second), and per client two cool-downs (`c` armed by proven keys' calls, `u` by
//! unproven ones'; TTL = the hold, never shortened; the value is its deadline under a MAC that
//! the token path checks).

pub(crate) mod breaker;
mod health;
pub mod keys;
mod link;
mod scripts;

use redis::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{FleetSecret, RedisMode, SharedConfig, redacted};
use crate::metrics::FleetMetrics;
use breaker::Breaker;
use health::Health;
pub use keys::Entry;
use link::{Conn, Link};
use scripts::{Scripts, parse_claim};

/// The channel every commit publishes the key's id on.
const LANDED: &str = "token-sidecar:landed";

/// How long a flight lock lasts unless its leader renews it, at least: followers notice a leader
/// that died (or a claim that timed out here but took the lock on Redis) within the lease and a
/// poll. With a `shared.timeout` over a quarter of it, the lease is four timeouts, so that a slow
/// renewal never lets it lapse; the leader renews it every quarter lease.
const LEASE: Duration = Duration::from_secs(1);

/// One key's Redis names, from two HMACs the token path makes of the request's canonical form
/// (`token::request::Canonical`): `id` (of the whole form) and `client` (of its client part, the
/// route and client id, for the cool-downs). Only these digests reach Redis. Every name of a key
/// carries its client's digest as a hash tag, so each script touches one Cluster slot.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    /// Hex of the key's HMAC: the notice payload.
    pub id: String,
    token: String,
    fresh: String,
    proven: String,
    lock: String,
    cool: String,
    probe_cool: String,
}

impl Names {
    pub(crate) fn new(id: &[u8; 32], client: &[u8; 32]) -> Names {
        let (id, client) = (hex(id), hex(client));
        let name = |kind: &str, of: &str| format!("tsc:{{{client}}}:{kind}:{of}");
        Names {
            token: name("t", &id),
            fresh: name("f", &id),
            proven: name("p", &id),
            lock: name("l", &id),
            cool: name("c", "proven"),
            probe_cool: name("c", "unproven"),
            id,
        }
    }

    /// The name the sealed token is stored under, its associated data.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The name of the cool-down that calls of a key proven or not arm.
    pub(crate) fn cool(&self, proven: bool) -> &str {
        if proven { &self.cool } else { &self.probe_cool }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a claim found; `L` is what a lead carries (the [`Lease`]; as the script answers, whether
/// the key is proven).
#[derive(Debug)]
pub(crate) enum Claim<L = Lease> {
    /// A sealed token, with how long Redis keeps it and how long until the fleet refreshes it
    /// (zero: due now), and the cool-down that postpones the refresh, if one is on.
    Token {
        sealed: Vec<u8>,
        serve_left: Duration,
        fresh_left: Duration,
        hold: Option<Hold>,
    },
    /// The client is on a fleet cool-down, and no token is stored.
    Cooldown(Hold),
    /// This pod took the flight lock: it calls the provider and commits.
    Lead(L),
    /// Another pod holds the lock: wait for its notice.
    Busy,
}

impl<L> Claim<L> {
    /// The same claim, its lead turned into `f`'s.
    fn map_lead<M>(self, f: impl FnOnce(L) -> M) -> Claim<M> {
        match self {
            Claim::Token {
                sealed,
                serve_left,
                fresh_left,
                hold,
            } => Claim::Token {
                sealed,
                serve_left,
                fresh_left,
                hold,
            },
            Claim::Cooldown(hold) => Claim::Cooldown(hold),
            Claim::Lead(lead) => Claim::Lead(f(lead)),
            Claim::Busy => Claim::Busy,
        }
    }
}

/// What a claim passes over: a stored token that did not open (sealed under another key,
/// altered, or past its sealed serve-until), or the client's cool-downs, one of which (this
/// value) was forged or stale. The flight then leads, and its commit overwrites them (the
/// cool-down only while it still holds that value).
#[derive(Debug, Default, Clone)]
pub(crate) struct Passing {
    pub token: bool,
    pub holds: Option<Vec<u8>>,
}

/// A fleet cool-down as Redis holds it: its value (a deadline and its MAC, for the token path to
/// check: Redis's TTL alone is not trusted), its TTL, and which of the client's two it is
/// (armed by a proven key's call or not).
#[derive(Debug)]
pub(crate) struct Hold {
    pub value: Vec<u8>,
    pub ttl: Duration,
    pub proven: bool,
}

/// A flight lock this pod holds, or may hold (a claim that timed out here may still have taken
/// it on Redis): its random owner, for the compare-and-delete, whether the key is proven in the
/// fleet (which cool-down its call's hold arms), and the forged cool-down the claim passed over
/// (which the hold then overwrites). Renewed while it lives when `renewal` is set.
#[derive(Debug)]
pub(crate) struct Lease {
    owner: String,
    pub proven: bool,
    forged_hold: Option<Vec<u8>>,
    _renewal: Option<tokio_util::sync::DropGuard>,
}

/// One process's connection to its fleet.
pub(crate) struct Fleet {
    link: Arc<Link>,
    /// Where the Redis server is, without credentials, for logs.
    address: String,
    mode: RedisMode,
    secrets: std::sync::RwLock<Secrets>,
    /// Where the secrets are read again on SIGHUP.
    key_files: (std::path::PathBuf, Option<std::path::PathBuf>),
    breaker: Breaker,
    health: Arc<Health>,
    /// Not ready until Redis has answered once.
    required: bool,
    timeout: Duration,
    connect_timeout: Duration,
    poll_interval: Duration,
    /// A flight lock's lease (see [`LEASE`]).
    lease: Duration,
    scripts: Arc<Scripts>,
    /// "Landed" notices from Redis, by key id; followers subscribe before they claim.
    landed: broadcast::Sender<Arc<str>>,
    metrics: FleetMetrics,
}

/// The fleet secret the pod writes with, the previous one it still reads (during a rotation),
/// and how many times they were read again.
#[derive(Clone, Debug)]
pub(crate) struct Secrets {
    pub current: FleetSecret,
    pub previous: Option<FleetSecret>,
    pub generation: u64,
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
    /// A fleet client for `config`, not connected yet (see [`Fleet::warm_up`]). Errors name
    /// what is wrong with a URL or a TLS file.
    pub(crate) fn new(config: &SharedConfig, metrics: FleetMetrics) -> Result<Fleet, String> {
        let address = redacted(&config.redis);
        let link = Link::new(config)?;
        metrics.breaker(breaker::State::Closed as i64);
        Ok(Fleet {
            link: Arc::new(link),
            health: Arc::new(Health::new(address.clone())),
            address,
            mode: config.mode.clone(),
            required: config.required,
            secrets: std::sync::RwLock::new(Secrets {
                current: config.secret.clone(),
                previous: config.previous_secret.clone(),
                generation: 0,
            }),
            key_files: (config.key_file.clone(), config.previous_key_file.clone()),
            breaker: Breaker::new(Duration::from_millis(500), Duration::from_secs(30)),
            timeout: config.timeout,
            lease: LEASE.max(config.timeout * 4),
            connect_timeout: config.connect_timeout,
            poll_interval: config.poll_interval,
            scripts: Arc::new(Scripts::new()),
            landed: broadcast::channel(1024).0,
            metrics,
        })
    }

    /// Opens the connection and loads the scripts, before the sidecar says it is ready: the first
    /// claims of a cold start then find both, instead of going alone while a connection is made.
    /// Bounded by twice `connect_timeout` (connecting, then loading); a Redis that does not
    /// answer by then is logged, and the pod starts without it (reconnecting in the background).
    pub(crate) async fn warm_up(&self) {
        let bound = self.connect_timeout * 2;
        let warm = async {
            let (number, conn) = self.link.connect().await?;
            self.scripts.load(&conn).await.map_err(|e| {
                self.link.reset(number);
                link::describe(&e)
            })
        };
        match tokio::time::timeout(bound, warm).await {
            Ok(Ok(())) => {
                self.health.ok();
                info!(redis = %self.address, "fleet tier: connected, scripts loaded");
            }
            Ok(Err(why)) => self.health.failed("connect", why),
            Err(_) => self.health.failed(
                "connect",
                format!("no connection within {} ms", bound.as_millis()),
            ),
        }
        if !self.health.answered() {
            self.metrics.error("connect");
        }
        if !self.link.is_connected() {
            self.reconnect_later();
        }
    }

    /// Starts a reconnect in the background unless one is running: connects (bounded by the
    /// connect timeout), loads the scripts, and tries again after a pause until it has a
    /// connection. Calls meanwhile go alone at once.
    fn reconnect_later(&self) {
        if !self.link.reconnect() {
            return;
        }
        let (link, scripts, health, metrics) = (
            self.link.clone(),
            self.scripts.clone(),
            self.health.clone(),
            self.metrics.clone(),
        );
        tokio::spawn(async move {
            for attempt in 0u32.. {
                match link.connect().await {
                    Ok((number, conn)) => match scripts.load(&conn).await {
                        Ok(()) => {
                            health.ok();
                            break;
                        }
                        Err(e) => {
                            link.reset(number);
                            health.failed("connect", link::describe(&e));
                        }
                    },
                    Err(why) => health.failed("connect", why),
                }
                metrics.error("connect");
                let pause = Duration::from_millis(100).saturating_mul(1 << attempt.min(5));
                tokio::time::sleep(pause.min(Duration::from_secs(3))).await;
            }
            link.reconnected();
        });
    }

    /// Whether the pod may say it is ready: always, unless `shared.required` and Redis has never
    /// answered.
    pub(crate) fn ready(&self) -> bool {
        !self.required || self.health.answered()
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
            mode: match &self.mode {
                RedisMode::Single => "single".to_owned(),
                RedisMode::Cluster => "cluster".to_owned(),
                RedisMode::Sentinel(master) => format!("sentinel {master}"),
            },
            breaker: breaker.to_owned(),
            connected: self.link.is_connected(),
            answered: self.health.answered(),
            cause: self.health.cause(),
        }
    }

    /// The fleet secrets, for deriving the token path's keys.
    pub(crate) fn secrets(&self) -> Secrets {
        self.secrets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many times the secrets were read again (the token path re-derives its keys when this
    /// changes).
    pub(crate) fn generation(&self) -> u64 {
        self.secrets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    /// Reads the key files again (on SIGHUP): the pod writes with the new current secret and
    /// reads with both. A file that is missing or too short changes nothing; the error names it
    /// and never quotes it.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| FleetSecret::from_file_bytes(&bytes))
                .map_err(|why| format!("{}: {why}", path.display()))
        };
        let current = read(&self.key_files.0)?;
        let previous = self.key_files.1.as_deref().map(read).transpose()?;
        let mut secrets = self.secrets.write().unwrap_or_else(|e| e.into_inner());
        *secrets = Secrets {
            current,
            previous,
            generation: secrets.generation + 1,
        };
        Ok(())
    }

    /// Deletes a key's stored token and its fresh marker (an API rejected the token).
    pub(crate) async fn forget(&self, names: &Names) {
        let delete = |mut conn: Conn| async move {
            redis::cmd("DEL")
                .arg(&names.token)
                .arg(&names.fresh)
                .query_async::<i64>(&mut conn)
                .await
        };
        let _ = self.call("forget", delete).await;
    }

    /// The value under `name` (a token sealed under the previous secret), if Redis answers.
    pub(crate) async fn peek(&self, name: &str) -> Option<Vec<u8>> {
        let get = |mut conn: Conn| async move {
            redis::cmd("GET")
                .arg(name)
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
        };
        match self.call("peek", get).await {
            Outcome::Done(value) => value,
            Outcome::Skipped | Outcome::Failed => None,
        }
    }

    /// How often a follower asks again without a notice.
    pub(crate) fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// Notices of keys that landed, to wait on; subscribe before the claim that says busy.
    pub(crate) fn notices(&self) -> broadcast::Receiver<Arc<str>> {
        self.landed.subscribe()
    }

    /// One claim round trip for a key the pod knows `proven` or not, looking at the stored token
    /// and the client's cool-downs unless `passing` says to pass over them (found unreadable or
    /// forged). `Err` when Redis is skipped or failed (go on alone), with the lease the claim may
    /// have taken on Redis all the same, so that the pod's commit frees it (and offers its
    /// token) if Redis answers by then.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        names: &Names,
        proven: bool,
        passing: &Passing,
    ) -> Result<Claim, Option<Lease>> {
        let flag = |on: bool| if on { "1" } else { "0" };
        let owner = hex(&rand::random::<[u8; 16]>());
        let mut invocation = self.scripts.claim.prepare_invoke();
        invocation
            .key(&names.token)
            .key(&names.fresh)
            .key(&names.proven)
            .key(&names.cool)
            .key(&names.probe_cool)
            .key(&names.lock)
            .arg(&owner)
            .arg(millis(self.lease))
            .arg(flag(proven))
            .arg(flag(passing.holds.is_none()))
            .arg(flag(!passing.token));
        let lease = |proven: bool, renewal| Lease {
            owner: owner.clone(),
            proven,
            forged_hold: passing.holds.clone(),
            _renewal: renewal,
        };
        let claim = |mut conn: Conn| async move { invocation.invoke_async(&mut conn).await };
        let value: Value = match self.call("claim", claim).await {
            Outcome::Done(value) => value,
            Outcome::Skipped => return Err(None),
            Outcome::Failed => return Err(Some(lease(proven, None))),
        };
        let Some(answer) = parse_claim(value) else {
            // Not our script's answer (a value of another type under one of the names): a
            // miss for this key only.
            self.metrics.error("claim");
            return Err(Some(lease(proven, None)));
        };
        let claim = answer.map_lead(|proven| {
            let renewal = self.keep(names.lock.clone(), owner.clone());
            lease(proven, Some(renewal))
        });
        self.metrics.claim(match &claim {
            Claim::Token { .. } => "hit",
            Claim::Cooldown(_) => "cooldown",
            Claim::Lead(_) => "lead",
            Claim::Busy => "busy",
        });
        Ok(claim)
    }

    /// Renews the lock `lock` of `owner` every quarter lease until the guard is dropped (the
    /// flight committed or ended) or the lock is no longer ours.
    fn keep(self: &Arc<Self>, lock: String, owner: String) -> tokio_util::sync::DropGuard {
        let stop = CancellationToken::new();
        let (fleet, done) = (self.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = done.cancelled() => return,
                    () = tokio::time::sleep(fleet.lease / 4) => {}
                }
                let mut invocation = fleet.scripts.renew.prepare_invoke();
                invocation.key(&lock).arg(&owner).arg(millis(fleet.lease));
                let renew =
                    |mut conn: Conn| async move { invocation.invoke_async(&mut conn).await };
                match fleet.call::<i64, _, _>("renew", renew).await {
                    Outcome::Done(1) => {}
                    // Lost (expired while Redis was away, or taken over): the next commit's
                    // compare-and-delete leaves the new owner's lock alone.
                    Outcome::Done(_) => return,
                    Outcome::Skipped | Outcome::Failed => {}
                }
            }
        });
        stop.drop_guard()
    }

    /// Counts a stored token this pod could not open (another secret or fleet key sealed it, or
    /// it was altered) or a cool-down whose MAC does not check: a miss.
    pub(crate) fn unreadable(&self) {
        self.metrics.claim("unreadable");
    }

    /// Stores a sealed token for `serve` (its serve-until) and `fresh` (until its refresh), marks
    /// the key proven for `proven_for`, frees the lock and tells the fleet.
    pub(crate) async fn commit_token(
        &self,
        names: &Names,
        lease: &Lease,
        sealed: Vec<u8>,
        serve: Duration,
        fresh: Duration,
        proven_for: Duration,
    ) {
        let serve = millis(serve);
        if serve == 0 {
            return self.commit_hold(names, lease, Duration::ZERO, "").await;
        }
        let mut invocation = self.scripts.commit_token.prepare_invoke();
        invocation
            .key(&names.token)
            .key(&names.fresh)
            .key(&names.lock)
            .key(&names.proven)
            .arg(&lease.owner)
            .arg(sealed)
            .arg(serve)
            .arg(millis(fresh).min(serve))
            .arg(LANDED)
            .arg(&names.id)
            .arg(millis(proven_for).max(serve));
        self.commit(invocation).await;
    }

    /// Extends the cool-down the lease's key arms (proven or not) to at least `hold` (zero:
    /// none) with `value` (its deadline and MAC), frees the lock and tells the fleet.
    pub(crate) async fn commit_hold(
        &self,
        names: &Names,
        lease: &Lease,
        hold: Duration,
        value: &str,
    ) {
        let mut invocation = self.scripts.commit_hold.prepare_invoke();
        invocation
            .key(names.cool(lease.proven))
            .key(&names.lock)
            .arg(&lease.owner)
            .arg(millis(hold))
            .arg(LANDED)
            .arg(&names.id)
            .arg(value)
            .arg(lease.forged_hold.as_deref().unwrap_or_default());
        self.commit(invocation).await;
    }

    async fn commit(&self, invocation: redis::ScriptInvocation<'_>) {
        let commit = |mut conn: Conn| async move { invocation.invoke_async(&mut conn).await };
        let done = self.call::<Value, _, _>("commit", commit).await;
        if let Outcome::Done(_) = done {
            self.metrics.claim("commit");
        }
    }

    /// Runs `call` on the current connection unless the breaker is open or there is none (then a
    /// reconnect starts), bounded by the timeout. A failure of Redis or of the connection opens
    /// the breaker and drops the connection (after a timeout its replies may never line up
    /// again); an error about one key's values (a wrong type under one of its names) is that
    /// key's failure alone.
    async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Outcome<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        // Looked at before the breaker, whose half-open trial must end in a success or a failure.
        let Some((number, conn)) = self.link.get() else {
            self.reconnect_later();
            self.metrics.claim("skipped");
            return Outcome::Skipped;
        };
        if !self.breaker.allow(Instant::now()) {
            self.metrics.claim("skipped");
            return Outcome::Skipped;
        }
        self.metrics.breaker(self.breaker.state() as i64);
        let why = match tokio::time::timeout(self.timeout, call(conn)).await {
            Ok(Ok(value)) => {
                self.breaker.success();
                self.health.ok();
                self.metrics.breaker(breaker::State::Closed as i64);
                return Outcome::Done(value);
            }
            Ok(Err(e)) if about_one_key(&e) => {
                // Redis answered: the breaker's trial succeeded, and the cause is shown.
                self.breaker.success();
                self.metrics.breaker(breaker::State::Closed as i64);
                self.metrics.error(op);
                self.health.failed(op, link::describe(&e));
                return Outcome::Failed;
            }
            Ok(Err(e)) => link::describe(&e),
            Err(_) => format!("no answer within {} ms", self.timeout.as_millis()),
        };
        self.link.reset(number);
        self.metrics.error(op);
        self.breaker.failure(Instant::now(), rand::random());
        self.health.failed(op, why);
        self.metrics.breaker(self.breaker.state() as i64);
        self.reconnect_later();
        Outcome::Failed
    }

    /// Listens for "landed" notices until `stop`, reconnecting after a backoff when the
    /// connection is lost. Without it followers still poll.
    pub(crate) async fn listen(self: Arc<Self>, stop: CancellationToken) {
        use futures_util::StreamExt;
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            let connected = tokio::time::timeout(self.connect_timeout, async {
                let mut pubsub = self.link.pubsub(failures).await?;
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

/// How one Redis call went.
enum Outcome<T> {
    Done(T),
    /// Not sent: the breaker is open.
    Skipped,
    /// Sent, and no usable answer: it may have run on Redis all the same.
    Failed,
}

/// An error Redis gave about the values under one key's names (a script error such as
/// WRONGTYPE), not about Redis or the connection.
fn about_one_key(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
            | redis::ErrorKind::Extension
            | redis::ErrorKind::UnexpectedReturnType
    )
}

/// Whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reveal_only_digests() {
        let names = Names::new(&[0xab; 32], &[0xcd; 32]);
        let tag = format!("{{{}}}", "cd".repeat(32));
        assert_eq!(names.token(), format!("tsc:{tag}:t:{}", "ab".repeat(32)));
        assert_eq!(names.cool(true), format!("tsc:{tag}:c:proven"));
        assert_eq!(names.cool(false), format!("tsc:{tag}:c:unproven"));
        assert_eq!(names.lock, format!("tsc:{tag}:l:{}", "ab".repeat(32)));
    }
}
