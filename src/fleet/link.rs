//! The fleet tier's connection to Redis, whatever serves it: one server, a Cluster (seed nodes;
//! slots, MOVED/ASK and resharding followed by the `redis` crate's cluster client) or a primary
//! named by Sentinels (asked again on every reconnect, so a failover is followed without a
//! restart). TLS with a custom CA and a client certificate applies to all three.
//!
//! A call never connects: it takes the current connection ([`Link::get`]) or, with none, goes
//! alone at once while a background task connects ([`Link::reconnect`]), bounded by the connect
//! timeout. A connection that timed out or failed is dropped ([`Link::reset`]) rather than
//! reused: after lost bytes its replies would never line up again.

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, Cmd, IntoConnectionInfo, RedisFuture, Value};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::{RedisMode, SharedConfig, redacted};

/// A connection to the fleet's Redis, cheap to clone (multiplexed).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where connections come from.
enum Target {
    Single(Client),
    /// The cluster client, and one client per seed for the "landed" subscription (classic
    /// pub/sub reaches every node of a cluster, so any one will do).
    Cluster(ClusterClient, Vec<Client>),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// One process's link to its fleet's Redis.
pub(crate) struct Link {
    target: Target,
    /// Each call's answer timeout, and the connect timeout, for new connections.
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    /// The connection and its number, so that a late failure of an older connection does not
    /// drop a newer one.
    current: Mutex<Option<(u64, Conn)>>,
    opened: std::sync::atomic::AtomicU64,
    connecting: AtomicBool,
}

impl Link {
    /// A link for `config`, not connected yet. Errors name what is wrong with a URL or a file.
    pub(crate) fn new(config: &SharedConfig) -> Result<Link, String> {
        let certs = certificates(config)?;
        let target = match &config.mode {
            RedisMode::Single => Target::Single(client(config, config.urls()[0], &certs)?),
            RedisMode::Cluster => {
                let seeds = config
                    .urls()
                    .iter()
                    .map(|url| client(config, url, &certs))
                    .collect::<Result<Vec<_>, _>>()?;
                Target::Cluster(cluster(config, &certs)?, seeds)
            }
            RedisMode::Sentinel(master) => {
                Target::Sentinel(tokio::sync::Mutex::new(sentinel(config, master, &certs)?))
            }
        };
        Ok(Link {
            target,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(config.timeout)),
            connect_timeout: config.connect_timeout,
            current: Mutex::new(None),
            opened: std::sync::atomic::AtomicU64::new(0),
            connecting: AtomicBool::new(false),
        })
    }

    /// The current connection and its number, if there is one.
    pub(crate) fn get(&self) -> Option<(u64, Conn)> {
        self.lock().clone()
    }

    /// Whether a connection is open now.
    pub(crate) fn is_connected(&self) -> bool {
        self.lock().is_some()
    }

    /// Drops connection number `which` if it is still the current one: the next call finds none
    /// and a reconnect begins.
    pub(crate) fn reset(&self, which: u64) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|(number, _)| *number == which) {
            current.take();
        }
    }

    /// Connects (once, bounded by the connect timeout) and keeps the connection; `Ok` at once if
    /// there is one.
    pub(crate) async fn connect(&self) -> Result<(u64, Conn), String> {
        if let Some(current) = self.get() {
            return Ok(current);
        }
        let conn = tokio::time::timeout(self.connect_timeout, self.open())
            .await
            .map_err(|_| {
                format!(
                    "no connection within {} ms",
                    self.connect_timeout.as_millis()
                )
            })?
            .map_err(|e| describe(&e))?;
        let number = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        *self.lock() = Some((number, conn.clone()));
        Ok((number, conn))
    }

    /// Whether a reconnect may start now: false while one is running. The caller runs
    /// [`Link::connect`] and then [`Link::reconnected`].
    pub(crate) fn reconnect(&self) -> bool {
        !self.connecting.swap(true, Ordering::AcqRel)
    }

    /// The reconnect [`Link::reconnect`] allowed is over.
    pub(crate) fn reconnected(&self) {
        self.connecting.store(false, Ordering::Release);
    }

    async fn open(&self) -> redis::RedisResult<Conn> {
        match &self.target {
            Target::Single(client) => client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map(Conn::Single),
            Target::Cluster(client, _) => client.get_async_connection().await.map(Conn::Cluster),
            Target::Sentinel(sentinel) => {
                // Asked every time: after a failover the Sentinels name the new primary.
                let client = sentinel.lock().await.async_get_client().await?;
                client
                    .get_multiplexed_async_connection_with_config(&self.config)
                    .await
                    .map(Conn::Single)
            }
        }
    }

    /// A subscription connection for the "landed" notices: the server, a cluster seed (the
    /// `attempt`-th, round robin), or the current primary.
    pub(crate) async fn pubsub(&self, attempt: u32) -> redis::RedisResult<redis::aio::PubSub> {
        match &self.target {
            Target::Single(client) => client.get_async_pubsub().await,
            Target::Cluster(_, seeds) => {
                let seed = &seeds[attempt as usize % seeds.len()];
                seed.get_async_pubsub().await
            }
            Target::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                client.get_async_pubsub().await
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, Conn)>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What went wrong, for a log line and `/status`: the error's category and detail, never a
/// credential (the `redis` crate's messages name addresses, not passwords).
pub(crate) fn describe(e: &redis::RedisError) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.category()),
        None => e.to_string(),
    }
}

/// The TLS files, for `rediss://`.
fn certificates(config: &SharedConfig) -> Result<Option<redis::TlsCertificates>, String> {
    let root = match &config.ca_file {
        Some(path) => Some(
            std::fs::read(path).map_err(|e| format!("shared.ca_file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let client_tls = config
        .client_cert
        .as_ref()
        .map(|cert| redis::ClientTlsConfig {
            client_cert: cert.cert.clone(),
            client_key: cert.key.clone(),
        });
    Ok(
        (root.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
            client_tls,
            root_cert: root,
        }),
    )
}

/// TCP settings of every connection to Redis: `TCP_NODELAY`, so that a claim written while a
/// commit's answer is on its way is not held back for that answer's acknowledgement (Nagle), which
/// cost a cold miss an extra round trip and a delayed ACK.
fn tcp() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// The connection settings of `url`, with the password file's password.
fn info(config: &SharedConfig, url: &str) -> Result<redis::ConnectionInfo, String> {
    let mut info = url.into_connection_info().map_err(|e| {
        format!(
            "shared.redis {}: {}",
            redacted(url),
            e.detail().unwrap_or("not a redis:// or rediss:// URL")
        )
    })?;
    if let Some(password) = &config.password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    Ok(info.set_tcp_settings(tcp()))
}

fn client(
    config: &SharedConfig,
    url: &str,
    certs: &Option<redis::TlsCertificates>,
) -> Result<Client, String> {
    let info = info(config, url)?;
    match certs {
        Some(certs) => Client::build_with_tls(info, certs.clone()),
        None => Client::open(info),
    }
    .map_err(|e| format!("shared.redis {}: {e}", redacted(url)))
}

fn cluster(
    config: &SharedConfig,
    certs: &Option<redis::TlsCertificates>,
) -> Result<ClusterClient, String> {
    let nodes = config
        .urls()
        .iter()
        .map(|url| info(config, url))
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.timeout)
        // A claim has one short timeout: a redirect is followed, a lost node is not waited for.
        .retries(1)
        .tcp_settings(tcp());
    if let Some(certs) = certs {
        builder = builder.certs(certs.clone());
    }
    builder
        .build()
        .map_err(|e| format!("shared.redis {}: {e}", redacted(&config.redis)))
}

fn sentinel(
    config: &SharedConfig,
    master: &str,
    certs: &Option<redis::TlsCertificates>,
) -> Result<SentinelClient, String> {
    let bad = |e: redis::RedisError| format!("shared.redis {}: {e}", redacted(&config.redis));
    let first = info(config, config.urls()[0])?;
    let sentinels = config
        .urls()
        .iter()
        .map(|url| info(config, url).map(|i| i.addr().clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let tls = config.urls()[0].starts_with("rediss://");
    let mut builder = SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)
        .map_err(bad)?
        .set_client_to_redis_db(first.redis_settings().db())
        .set_client_to_redis_tcp_settings(tcp())
        .set_client_to_sentinel_tcp_settings(tcp());
    if let Some(user) = first.redis_settings().username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = first.redis_settings().password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if tls {
        builder = builder
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
        if let Some(certs) = certs {
            builder = builder
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_certificates(certs.clone());
        }
    }
    builder.build().map_err(bad)
}
