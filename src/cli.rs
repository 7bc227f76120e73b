//! The command line: the sidecar's flags (each with a `TOKEN_SIDECAR_*` twin read by
//! [`crate::config`]) and the `healthcheck` subcommand for images without a shell.

use clap::{Parser, Subcommand};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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
    /// The admin listener (healthz, readyz, metrics) [env: TOKEN_SIDECAR_ADMIN] [default: 127.0.0.1:9901]
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
        }
    }
}

/// Probes `GET /readyz` on the admin address. A wildcard bind address is probed on loopback.
pub fn healthcheck(mut admin: SocketAddr, timeout: Duration) -> Result<(), String> {
    if admin.ip().is_unspecified() {
        admin.set_ip(if admin.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut stream =
        TcpStream::connect_timeout(&admin, timeout).map_err(|e| format!("{admin}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(
            format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("{admin}: {e}"))?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(format!("{admin}: {e}")),
        }
    }
    let status_line = String::from_utf8_lossy(&head[..read]);
    if status_line.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "{admin}/readyz: {}",
            status_line.lines().next().unwrap_or("no answer")
        ))
    }
}
