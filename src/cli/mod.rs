//! The command line: the sidecar's flags (each with a `TOKEN_SIDECAR_*` twin read by
//! [`crate::config`]), and the `healthcheck` and `status` subcommands for images without a
//! shell.

pub mod status;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{LogFormat, Overrides};

/// A sidecar proxy for OAuth 2.0 token endpoints.
#[derive(Debug, Parser)]
#[command(name = "token-sidecar", version, about)]
pub struct Cli {
    /// The identity provider's base URL, e.g. https://login.mypurecloud.com [env: TOKEN_SIDECAR_UPSTREAM]
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// A Genesys Cloud region (e.g. us-east-1) or domain (e.g. mypurecloud.com): routes login and
    /// API calls to its hosts, instead of --upstream [env: TOKEN_SIDECAR_GENESYS_REGION]
    #[arg(long, value_name = "REGION")]
    pub genesys_region: Option<String>,
    /// Where local apps connect [env: TOKEN_SIDECAR_LISTEN] [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The admin listener (healthz, readyz, metrics, status) [env: TOKEN_SIDECAR_ADMIN] [default: 127.0.0.1:9901]
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// A TOML config file [env: TOKEN_SIDECAR_CONFIG]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format [env: TOKEN_SIDECAR_LOG_FORMAT] [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Worker threads; 1 = a single-threaded runtime, 0 = one per CPU available (CPU quota
    /// included) [env: TOKEN_SIDECAR_WORKERS] [default: 1]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// The fleet tier's Redis or Valkey, e.g. redis://redis:6379/0 (off without it)
    /// [env: TOKEN_SIDECAR_SHARED_REDIS]
    #[arg(long, value_name = "URL")]
    pub shared_redis: Option<String>,
    /// The fleet secret (at least 32 bytes), needed with --shared-redis
    /// [env: TOKEN_SIDECAR_SHARED_KEY_FILE]
    #[arg(long, value_name = "PATH")]
    pub shared_key_file: Option<PathBuf>,
    /// --shared-redis names Redis Cluster seed nodes, comma-separated
    /// [env: TOKEN_SIDECAR_SHARED_CLUSTER]
    #[arg(long)]
    pub shared_cluster: bool,
    /// The Sentinel master name; --shared-redis then names the Sentinels, comma-separated
    /// [env: TOKEN_SIDECAR_SHARED_SENTINEL_MASTER]
    #[arg(long, value_name = "NAME")]
    pub shared_sentinel_master: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exits 0 if the sidecar's /readyz answers 200, 1 otherwise (a container health check).
    Healthcheck {
        /// The admin address to probe [env: TOKEN_SIDECAR_ADMIN] [default: 127.0.0.1:9901]
        #[arg(long, value_name = "ADDR")]
        admin: Option<SocketAddr>,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Shows what the sidecar does, with a built-in throttling provider on loopback: 100 clients
    /// fetch tokens directly, then through the sidecar, and the two are compared.
    Demo(DemoArgs),
    /// Prints a running sidecar's /status as tables: keys by client hash with their time left,
    /// calls in progress, cool-downs, limits (`--json` for the document itself).
    Status {
        /// The admin address to ask [env: TOKEN_SIDECAR_ADMIN] [default: 127.0.0.1:9901]
        #[arg(long, value_name = "ADDR")]
        admin: Option<SocketAddr>,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print the JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
}

/// The `demo` subcommand's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Keep the demo provider and a sidecar running (on --listen and --admin) to try with curl.
    #[arg(long)]
    pub serve: bool,
    /// Concurrent clients.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub clients: u16,
    /// How long each way of the story runs.
    #[arg(long, default_value = "5s", value_parser = parse_phase)]
    pub seconds: Duration,
    /// Token calls the demo provider answers per second (the rest get 429).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub rate: u64,
    /// Lifetime of the demo provider's tokens [default: 4s for the story, 60s with --serve]
    #[arg(long, value_parser = parse_lifetime)]
    pub lifetime: Option<Duration>,
    /// With --serve: where the sidecar listens [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// With --serve: the sidecar's admin listener [default: 127.0.0.1:9901]
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
}

impl Cli {
    /// The flags as configuration overrides.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            upstream: self.upstream.clone(),
            genesys_region: self.genesys_region.clone(),
            listen: self.listen,
            admin: self.admin,
            config: self.config.clone(),
            log_format: self.log_format,
            workers: self.workers,
            shared_redis: self.shared_redis.clone(),
            shared_key_file: self.shared_key_file.clone(),
            shared_cluster: self.shared_cluster.then_some(true),
            shared_sentinel_master: self.shared_sentinel_master.clone(),
        }
    }
}

/// A story phase: a whole number of seconds from 1 to 60, or a humantime duration in that range.
fn parse_phase(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .or_else(|_| text.parse::<u64>().map(Duration::from_secs))
        .map_err(|_| format!("{text:?}: give seconds, e.g. 5s"))?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(60) {
        return Err(format!("{text:?}: from 1s to 60s"));
    }
    Ok(d)
}

/// A demo token lifetime: at least 3 s (shorter ones are not cached), at most a day.
fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if d < Duration::from_secs(3) || d > Duration::from_secs(86_400) {
        return Err(format!("{text:?}: from 3s to 24h"));
    }
    Ok(Duration::from_secs(d.as_secs()))
}

/// Probes `GET /readyz` on the admin address. A wildcard bind address is probed on loopback.
pub fn healthcheck(admin: SocketAddr, timeout: Duration) -> Result<(), String> {
    status::admin_get(admin, "/readyz", timeout).map(drop)
}
