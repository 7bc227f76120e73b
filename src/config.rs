//! Typed configuration: defaults, the TOML file, `TOKEN_SIDECAR_*` environment variables and
//! command-line flags, layered in that order (flag beats env beats file beats default), then
//! validated. Every error names the key or flag at fault.
//!
//! The environment is read through an injected lookup so tests never touch the process's own.

use http::Uri;
use http::uri::{Authority, Scheme};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::fleet::{FleetSecret, SharedConfig};

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The admin listener (health, readiness, metrics).
    pub admin: SocketAddr,
    /// How long in-flight requests and upstream calls may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Worker threads serving requests: 1 (the default) runs everything on one thread, as a
    /// sidecar sharing its pod's CPUs should; 0 means one per CPU available to the process (its
    /// cgroup CPU quota included).
    pub workers: usize,
    /// Log format and filter.
    pub log: LogConfig,
    /// Connection limits shared by every listener.
    pub limits: Limits,
    /// One entry per listener and upstream.
    pub routes: Vec<RouteConfig>,
    /// The fleet tier (`[shared]`), off unless a Redis URL is given.
    pub shared: Option<SharedConfig>,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; the `RUST_LOG` variable wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Limits that keep a hostile or broken client from exhausting the sidecar.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest token request body accepted; larger ones get 413.
    pub max_request_body: usize,
    /// Largest token response read from the provider; larger ones are a 502 and never cached.
    pub max_token_response: usize,
    /// Most request headers per request.
    pub max_headers: usize,
    /// Largest request head (request line plus headers), in bytes.
    pub max_header_bytes: usize,
    /// A connection that has not sent a complete request head within this time is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A token request whose whole body has not arrived within this time gets 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Most open client connections per listener, upgraded tunnels included. At the cap, a new
    /// connection closes the one idle the longest; with none idle it waits in the accept backlog.
    pub max_connections: usize,
    /// A connection with no request in progress for this long is closed (HTTP/1.1 keep-alive,
    /// HTTP/2 after GOAWAY); one that never sends a request goes after `header_read_timeout`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub tunnel_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_body: 16 * 1024,
            max_token_response: 256 * 1024,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            idle_timeout: Duration::from_secs(60),
            max_streams: 32,
            tunnel_idle_timeout: Duration::from_secs(300),
        }
    }
}

impl Limits {
    /// The admin listener's own limits: probes and scrapes need little, and a flood of the
    /// route listeners (or of the admin one) must not make `/healthz` hang.
    pub fn admin() -> Limits {
        Limits {
            max_request_body: 1024,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            max_connections: 64,
            idle_timeout: Duration::from_secs(30),
            max_streams: 8,
            ..Limits::default()
        }
    }
}

/// One route: a listener, the provider behind it, and how its tokens are cached.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// A short name for logs and metric labels.
    pub name: String,
    /// Where local apps connect. Routes with the same address share one listener and are chosen
    /// by `path_prefix`.
    pub listen: SocketAddr,
    /// The requests this route serves on its listener: a path equal to it or below it (segment
    /// boundaries: `/api` matches `/api` and `/api/x`, not `/apix`); the longest prefix wins.
    pub path_prefix: String,
    /// Remove `path_prefix` before the route sees the path (token paths match the rest, and
    /// forwarding sends the rest).
    pub strip_prefix: bool,
    /// The provider's base URL.
    pub upstream: UpstreamUrl,
    /// Paths that are token endpoints; everything else is forwarded.
    pub token_paths: Vec<String>,
    /// Send the caller's `Host` upstream instead of the upstream's own.
    pub preserve_host: bool,
    /// Token cache tuning.
    pub token: TokenConfig,
    /// HTTP client settings towards the provider.
    pub client: ClientConfig,
}

/// A validated upstream base URL: scheme and authority, no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and optional port.
    pub authority: Authority,
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

impl UpstreamUrl {
    /// Parses `scheme://host[:port]`, allowing a trailing `/`. Errors never repeat the value: a
    /// mistyped URL may carry a credential in its path or query.
    pub fn parse(text: &str) -> Result<UpstreamUrl, String> {
        if text.contains('@') {
            // Never echo it: the part before the @ would be credentials.
            return Err(
                "credentials in the URL are not supported; give scheme://host[:port]".into(),
            );
        }
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("not a URL ({e}); give scheme://host[:port]"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| "no scheme; use http:// or https://".to_owned())?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err("the scheme must be http or https".into());
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| "no host; give scheme://host[:port]".to_owned())?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported".into());
        }
        if authority.host().is_empty() {
            return Err("no host; give scheme://host[:port]".into());
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(
                "give only scheme://host[:port]; request paths are forwarded as they come".into(),
            );
        }
        Ok(UpstreamUrl { scheme, authority })
    }
}

/// Token cache tuning for one route. Durations are written like `"30s"` or `"5m"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Upper bound of the safety margin: a token is not served in its last `min(this, ratio × L)`.
    #[serde(with = "humantime_serde")]
    pub safety_margin_max: Duration,
    /// The safety margin as a share of the lifetime L.
    pub safety_margin_ratio: f64,
    /// Share of the lifetime after which the next request starts a background refresh.
    pub refresh_at: f64,
    /// Up to this share of L is taken off `refresh_at` at random per token, to spread refreshes.
    pub refresh_jitter: f64,
    /// Longest cool-down a `Retry-After` can impose.
    #[serde(with = "humantime_serde")]
    pub retry_after_max: Duration,
    /// First backoff ceiling after a failure without `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long a 400/401/403 answer is remembered for its exact key.
    #[serde(with = "humantime_serde")]
    pub error_ttl: Duration,
    /// How long a refresh-token answer is kept for late duplicates of the same request.
    #[serde(with = "humantime_serde")]
    pub refresh_token_ttl: Duration,
    /// Longest lifetime believed from `expires_in`.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Longest a caller waits for a shared upstream call before getting 504.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Longest the sidecar keeps callers waiting through holds (a `Retry-After`, a backoff) and
    /// calls again, instead of passing the provider's 429 on; `0s` passes every one on. Never
    /// past the callers' `wait_timeout`.
    #[serde(with = "humantime_serde")]
    pub absorb_hold: Duration,
    /// Distinct tokens kept per key and handed out in turn (the provider limits API calls per
    /// token); each costs one upstream call per lifetime.
    pub pool_size: usize,
    /// After the provider rejects a call for a key that never had a token (wrong secret,
    /// throttling), the client's next such call waits this long; such keys make one call at a
    /// time per client id. Keys that have had a token are never paced.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Most cached keys, calls in progress included; past it the least recently used are evicted.
    pub max_entries: usize,
    /// A key nobody asked for within this time is dropped (and so never refreshed again).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most token calls in progress towards the provider at once, all keys together.
    pub max_concurrent_calls: usize,
    /// Most token calls per second towards the provider, all keys together; 0 means no limit.
    pub calls_per_second: f64,
    /// Calls allowed in a burst above `calls_per_second`.
    pub calls_burst: u32,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            safety_margin_max: Duration::from_secs(30),
            safety_margin_ratio: 0.1,
            refresh_at: 0.8,
            refresh_jitter: 0.05,
            retry_after_max: Duration::from_secs(600),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            error_ttl: Duration::from_secs(5),
            refresh_token_ttl: Duration::from_secs(30),
            max_lifetime: Duration::from_secs(24 * 3600),
            wait_timeout: Duration::from_secs(30),
            absorb_hold: Duration::from_secs(5),
            pool_size: 1,
            probe_interval: Duration::from_secs(1),
            max_entries: 100_000,
            idle_timeout: Duration::from_secs(3600),
            max_concurrent_calls: 64,
            calls_per_second: 0.0,
            calls_burst: 10,
        }
    }
}

/// The HTTP client towards one provider.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// TCP (and TLS) connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time for the provider to answer a token call, body included; for forwarded requests, time
    /// to the response head (bodies stream for as long as they need).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long an idle pooled connection is kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Extra CA certificates (PEM) trusted besides the system roots, for private PKI.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mTLS to the provider.
    pub client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    pub client_key_file: Option<PathBuf>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            pool_idle_timeout: Duration::from_secs(90),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

/// The file as written: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    admin: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    workers: Option<usize>,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    limits: Limits,
    // The Genesys Cloud preset, instead of the one-route shortcut.
    genesys_region: Option<String>,
    genesys_login_upstream: Option<String>,
    genesys_api_upstream: Option<String>,
    // The one-route shortcut, mirrored by the flags.
    upstream: Option<String>,
    listen: Option<SocketAddr>,
    token_paths: Option<Vec<String>>,
    preserve_host: Option<bool>,
    token: Option<TokenConfig>,
    client: Option<ClientConfig>,
    #[serde(default)]
    routes: Vec<FileRoute>,
    shared: Option<FileShared>,
}

/// The `[shared]` table: the fleet tier.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShared {
    redis: Option<String>,
    key_file: Option<PathBuf>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
}

/// A `[[routes]]` table; `token` and `client` fall back to the top-level tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    name: Option<String>,
    listen: SocketAddr,
    path_prefix: Option<String>,
    strip_prefix: Option<bool>,
    upstream: String,
    token_paths: Option<Vec<String>>,
    preserve_host: Option<bool>,
    token: Option<TokenConfig>,
    client: Option<ClientConfig>,
}

/// Values given on the command line; `None` where a flag was not given.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub upstream: Option<String>,
    pub genesys_region: Option<String>,
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub config: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub workers: Option<usize>,
    pub shared_redis: Option<String>,
    pub shared_key_file: Option<PathBuf>,
}

/// Default listener of the one-route shortcut.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default admin listener.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
/// Most worker threads accepted: far past any core count, low enough to catch a typo.
pub const MAX_WORKERS: usize = 1024;
/// Most tokens kept per key: each is one upstream call per lifetime.
pub const MAX_POOL_SIZE: usize = 64;
/// Default token path.
pub const DEFAULT_TOKEN_PATH: &str = "/oauth/token";

/// A configuration problem, worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

impl Config {
    /// Builds the configuration from flags, an environment lookup, and the file the flags or the
    /// environment name (read with `read_file`).
    ///
    /// A value the file gave that fails validation is reported with the file and its line.
    pub fn load(
        flags: Overrides,
        env: impl Fn(&str) -> Option<String>,
        read_file: impl Fn(&std::path::Path) -> std::io::Result<String>,
    ) -> Result<Config, ConfigError> {
        let env = non_empty(env);
        let (file, source) = read_config_file(&flags, &env, &read_file)?;
        Config::assemble(flags, &env, file).map_err(|e| match &source {
            Some((path, text)) => with_line(e, path, text),
            None => e,
        })
    }

    /// The layering and validation of [`Config::load`], once the file is parsed.
    fn assemble(
        flags: Overrides,
        env: &impl Fn(&str) -> Option<String>,
        file: FileConfig,
    ) -> Result<Config, ConfigError> {
        let env_addr = |name: &str| env_addr(env, name);

        let upstream = flags
            .upstream
            .clone()
            .or_else(|| env("TOKEN_SIDECAR_UPSTREAM"))
            .map(|v| {
                (
                    v,
                    if flags.upstream.is_some() {
                        "--upstream"
                    } else {
                        "TOKEN_SIDECAR_UPSTREAM"
                    },
                )
            });
        let listen = match flags.listen {
            Some(addr) => Some(addr),
            None => env_addr("TOKEN_SIDECAR_LISTEN")?,
        };
        let admin = match flags.admin {
            Some(addr) => addr,
            None => env_addr("TOKEN_SIDECAR_ADMIN")?
                .or(file.admin)
                .unwrap_or_else(default_admin),
        };
        let workers = match (flags.workers, env("TOKEN_SIDECAR_WORKERS")) {
            (Some(n), _) => n,
            (None, Some(text)) => text.trim().parse().map_err(|_| {
                err(format!(
                    "TOKEN_SIDECAR_WORKERS={text:?}: give a whole number (0 = one per CPU)"
                ))
            })?,
            (None, None) => file.workers.unwrap_or(1),
        };
        let mut log = file.log.clone();
        if let Some(format) = env("TOKEN_SIDECAR_LOG_FORMAT") {
            log.format = <LogFormat as clap::ValueEnum>::from_str(&format, true).map_err(|_| {
                err(format!(
                    "TOKEN_SIDECAR_LOG_FORMAT={format:?}: use text or json"
                ))
            })?;
        }
        if let Some(format) = flags.log_format {
            log.format = format;
        }

        let top_token = file.token.clone().unwrap_or_default();
        let top_client = file.client.clone().unwrap_or_default();
        let listen_one = listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let mut routes = Vec::new();
        let preset = genesys_preset(&flags, &env, &file, listen_one, &top_token, &top_client)?;
        if let Some(preset) = &preset {
            if upstream.is_some() || file.upstream.is_some() {
                return Err(err(
                    "genesys_region (or --genesys-region, TOKEN_SIDECAR_GENESYS_REGION) and upstream both name the provider: give one",
                ));
            }
            // A file that restates the one-route defaults (as the shipped ones once did) starts
            // with a region too; any other value would be silently ignored, so it is refused.
            let restates_default = file
                .token_paths
                .as_ref()
                .is_none_or(|paths| paths == &[DEFAULT_TOKEN_PATH])
                && file.preserve_host != Some(true);
            if !restates_default {
                return Err(err(
                    "config file: top-level token_paths/preserve_host do not apply to the genesys_region preset (it serves /oauth/token and sends each host its own name); remove them",
                ));
            }
            routes.extend(preset.routes());
        } else if file.routes.is_empty() {
            let (upstream, source) = match (upstream.clone(), &file.upstream) {
                (Some(u), _) => u,
                (None, Some(u)) => (u.clone(), "upstream"),
                (None, None) => {
                    return Err(err(
                        "no upstream: give --upstream URL, TOKEN_SIDECAR_UPSTREAM, `upstream` in the config file, or a Genesys Cloud region (--genesys-region)",
                    ));
                }
            };
            routes.push(RouteConfig {
                name: "default".into(),
                listen: listen_one,
                path_prefix: "/".into(),
                strip_prefix: false,
                upstream: UpstreamUrl::parse(&upstream)
                    .map_err(|e| err(format!("{source}: {e}")))?,
                token_paths: file
                    .token_paths
                    .clone()
                    .unwrap_or_else(|| vec![DEFAULT_TOKEN_PATH.into()]),
                preserve_host: file.preserve_host.unwrap_or(false),
                token: top_token.clone(),
                client: top_client.clone(),
            });
        }
        if !file.routes.is_empty() {
            // With the preset, the top-level listen is the preset's listener.
            let listen_set = preset.is_none() && file.listen.is_some();
            if file.upstream.is_some()
                || listen_set
                || file.token_paths.is_some()
                || file.preserve_host.is_some()
            {
                return Err(err(
                    "config file: top-level upstream/listen/token_paths/preserve_host cannot be combined with [[routes]]; move them into each route",
                ));
            }
            let single = preset.is_none() && file.routes.len() == 1;
            if !single && (upstream.is_some() || (preset.is_none() && listen.is_some())) {
                return Err(err(
                    "--upstream/--listen (or their TOKEN_SIDECAR_* variables) set a single route, but the config file defines several routes",
                ));
            }
            let overrides = (upstream, if preset.is_none() { listen } else { None });
            routes.extend(file_routes(
                file.routes,
                overrides,
                &top_token,
                &top_client,
            )?);
        }

        let shared = shared_config(&flags, env, file.shared.clone().unwrap_or_default())?;
        let config = Config {
            admin,
            shutdown_grace: file.shutdown_grace.unwrap_or(Duration::from_secs(10)),
            workers,
            log,
            limits: file.limits,
            routes,
            shared,
        };
        config.validate()?;
        Ok(config)
    }

    /// The distinct listen addresses of the routes, in the order they first appear: one listener
    /// each.
    pub fn listeners(&self) -> Vec<SocketAddr> {
        let mut addresses: Vec<SocketAddr> = Vec::new();
        for route in &self.routes {
            if !addresses.contains(&route.listen) {
                addresses.push(route.listen);
            }
        }
        addresses
    }

    /// Checks values serde cannot: ranges, uniqueness, paths.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers > MAX_WORKERS {
            return Err(err(format!(
                "workers = {}: at most {MAX_WORKERS} (0 = one per CPU)",
                self.workers
            )));
        }
        let mut addresses = vec![("admin", self.admin)];
        let mut names = Vec::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = |key: &str| format!("routes[{i}] ({}).{key}", route.name);
            if route.name.is_empty()
                || !route
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(err(format!("{}: use letters, digits, - and _", at("name"))));
            }
            if names.contains(&&route.name) {
                return Err(err(format!(
                    "{}: {:?} is used twice",
                    at("name"),
                    route.name
                )));
            }
            names.push(&route.name);
            let prefix = &route.path_prefix;
            if !prefix.starts_with('/')
                || (prefix.len() > 1 && prefix.ends_with('/'))
                || prefix.contains(['?', '#'])
            {
                return Err(err(format!(
                    "{}: {prefix:?} must be a path starting with / and not ending with one (\"/\" for everything)",
                    at("path_prefix")
                )));
            }
            if let Some(other) = self.routes[..i]
                .iter()
                .find(|o| o.listen == route.listen && o.path_prefix == route.path_prefix)
            {
                return Err(err(format!(
                    "{}: routes {:?} and {:?} both serve path_prefix {prefix:?} on {}",
                    at("path_prefix"),
                    other.name,
                    route.name,
                    route.listen
                )));
            }
            for path in &route.token_paths {
                if !path.starts_with('/') || path.contains('?') || path.contains('#') {
                    return Err(err(format!(
                        "{}: {path:?} must be a path starting with /",
                        at("token_paths")
                    )));
                }
            }
            route.token.validate(&at("token"))?;
            route.client.validate(&at("client"))?;
        }
        for listen in self.listeners() {
            addresses.push(("listen", listen));
        }
        for (i, (what, addr)) in addresses.iter().enumerate() {
            if let Some((other, _)) = addresses[..i]
                .iter()
                .find(|(_, a)| a == addr && addr.port() != 0)
            {
                return Err(err(format!("{what} {addr} is also used by {other}")));
            }
        }
        let limits = &self.limits;
        for (key, value) in [
            ("limits.max_request_body", limits.max_request_body),
            ("limits.max_token_response", limits.max_token_response),
            ("limits.max_headers", limits.max_headers),
            ("limits.max_header_bytes", limits.max_header_bytes),
            ("limits.max_connections", limits.max_connections),
        ] {
            if value == 0 {
                return Err(err(format!("{key} must be greater than 0")));
            }
        }
        if limits.max_header_bytes < 8192 {
            return Err(err("limits.max_header_bytes must be at least 8192"));
        }
        if limits.header_read_timeout.is_zero() {
            return Err(err("limits.header_read_timeout must be greater than 0"));
        }
        if limits.body_read_timeout.is_zero() {
            return Err(err("limits.body_read_timeout must be greater than 0"));
        }
        if limits.idle_timeout.is_zero() || limits.tunnel_idle_timeout.is_zero() {
            return Err(err(
                "limits.idle_timeout and limits.tunnel_idle_timeout must be greater than 0",
            ));
        }
        if limits.max_streams == 0 {
            return Err(err("limits.max_streams must be greater than 0"));
        }
        Ok(())
    }
}

impl TokenConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let share = |key: &str, value: f64, lo: f64, hi: f64| {
            if value.is_finite() && value >= lo && value <= hi {
                Ok(())
            } else {
                Err(err(format!(
                    "{at}.{key} = {value}: must be between {lo} and {hi}"
                )))
            }
        };
        share("safety_margin_ratio", self.safety_margin_ratio, 0.0, 0.5)?;
        share("refresh_at", self.refresh_at, 0.1, 1.0)?;
        share(
            "refresh_jitter",
            self.refresh_jitter,
            0.0,
            self.refresh_at - 0.05,
        )?;
        if self.refresh_at > 1.0 - self.safety_margin_ratio + f64::EPSILON {
            return Err(err(format!(
                "{at}.refresh_at = {}: must not be later than the safety margin (1 - safety_margin_ratio = {})",
                self.refresh_at,
                1.0 - self.safety_margin_ratio
            )));
        }
        for (key, value) in [
            ("retry_after_max", self.retry_after_max),
            ("backoff_base", self.backoff_base),
            ("backoff_max", self.backoff_max),
            ("max_lifetime", self.max_lifetime),
            ("wait_timeout", self.wait_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(err(format!("{at}.{key} must be greater than 0")));
            }
        }
        if self.max_lifetime < Duration::from_secs(3) {
            return Err(err(format!(
                "{at}.max_lifetime must be at least 3s: a token is counted a second short and served while a whole second is left"
            )));
        }
        if self.backoff_base > self.backoff_max {
            return Err(err(format!(
                "{at}.backoff_base must not exceed backoff_max"
            )));
        }
        if !(1..=MAX_POOL_SIZE).contains(&self.pool_size) {
            return Err(err(format!(
                "{at}.pool_size = {}: between 1 and {MAX_POOL_SIZE}",
                self.pool_size
            )));
        }
        if self.max_entries == 0 {
            return Err(err(format!("{at}.max_entries must be greater than 0")));
        }
        if self.max_concurrent_calls == 0 {
            return Err(err(format!(
                "{at}.max_concurrent_calls must be greater than 0"
            )));
        }
        if !self.calls_per_second.is_finite() || self.calls_per_second < 0.0 {
            return Err(err(format!(
                "{at}.calls_per_second must be 0 (no limit) or positive"
            )));
        }
        if self.calls_per_second > 0.0 && self.calls_burst == 0 {
            return Err(err(format!(
                "{at}.calls_burst must be at least 1 when calls_per_second is set"
            )));
        }
        Ok(())
    }
}

impl ClientConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(err(format!(
                "{at}: connect_timeout and request_timeout must be greater than 0"
            )));
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(err(format!(
                "{at}: client_cert_file and client_key_file go together"
            )));
        }
        Ok(())
    }
}

/// The `[[routes]]` tables as routes; `overrides` are the flags' upstream and listen, which apply
/// when the file has a single route.
fn file_routes(
    file_routes: Vec<FileRoute>,
    overrides: (Option<(String, &str)>, Option<SocketAddr>),
    top_token: &TokenConfig,
    top_client: &ClientConfig,
) -> Result<Vec<RouteConfig>, ConfigError> {
    let (upstream, listen) = overrides;
    let mut routes = Vec::with_capacity(file_routes.len());
    for (i, route) in file_routes.into_iter().enumerate() {
        let name = route.name.unwrap_or_else(|| format!("route{i}"));
        let (url, source) = match &upstream {
            Some((u, source)) => (u.clone(), source.to_string()),
            None => (route.upstream, format!("routes[{i}].upstream")),
        };
        routes.push(RouteConfig {
            listen: listen.unwrap_or(route.listen),
            path_prefix: route.path_prefix.unwrap_or_else(|| "/".into()),
            strip_prefix: route.strip_prefix.unwrap_or(false),
            upstream: UpstreamUrl::parse(&url).map_err(|e| err(format!("{source}: {e}")))?,
            token_paths: route
                .token_paths
                .unwrap_or_else(|| vec![DEFAULT_TOKEN_PATH.into()]),
            preserve_host: route.preserve_host.unwrap_or(false),
            token: route.token.unwrap_or_else(|| top_token.clone()),
            client: route.client.unwrap_or_else(|| top_client.clone()),
            name,
        });
    }
    Ok(routes)
}

/// The Genesys Cloud preset, if a region is given (flag beats env beats file). Its login and API
/// upstreams default to the region's hosts; `genesys_login_upstream` and `genesys_api_upstream`
/// (or their `TOKEN_SIDECAR_*` twins) replace them, for private proxies and tests.
fn genesys_preset(
    flags: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
    file: &FileConfig,
    listen: SocketAddr,
    token: &TokenConfig,
    client: &ClientConfig,
) -> Result<Option<crate::genesys::Preset>, ConfigError> {
    use crate::genesys::{Preset, Region};
    let given = match (&flags.genesys_region, env("TOKEN_SIDECAR_GENESYS_REGION")) {
        (Some(region), _) => Some((region.clone(), "--genesys-region")),
        (None, Some(region)) => Some((region, "TOKEN_SIDECAR_GENESYS_REGION")),
        (None, None) => file.genesys_region.clone().map(|r| (r, "genesys_region")),
    };
    let Some((text, source)) = given else {
        if file.genesys_login_upstream.is_some()
            || file.genesys_api_upstream.is_some()
            || env("TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM").is_some()
            || env("TOKEN_SIDECAR_GENESYS_API_UPSTREAM").is_some()
        {
            return Err(err(
                "genesys_login_upstream/genesys_api_upstream (or their TOKEN_SIDECAR_* twins) need genesys_region",
            ));
        }
        return Ok(None);
    };
    let region = Region::find(&text).ok_or_else(|| {
        err(format!(
            "{source}={text:?}: not a Genesys Cloud region; use one of {} (or its domain, e.g. mypurecloud.com)",
            Region::names()
        ))
    })?;
    let upstream =
        |key: &str, var: &str, default: UpstreamUrl, value: &Option<String>| match env(var)
            .map(|v| (v, var))
            .or_else(|| value.clone().map(|v| (v, key)))
        {
            Some((url, source)) => {
                UpstreamUrl::parse(&url).map_err(|e| err(format!("{source}: {e}")))
            }
            None => Ok(default),
        };
    Ok(Some(Preset {
        listen,
        login: upstream(
            "genesys_login_upstream",
            "TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM",
            region.login(),
            &file.genesys_login_upstream,
        )?,
        api: upstream(
            "genesys_api_upstream",
            "TOKEN_SIDECAR_GENESYS_API_UPSTREAM",
            region.api(),
            &file.genesys_api_upstream,
        )?,
        token: token.clone(),
        client: client.clone(),
    }))
}

/// The admin address alone, layered like [`Config::load`] does, for the `healthcheck`
/// subcommand: it must probe where the server listens without needing an upstream.
pub fn admin_address(
    flags: &Overrides,
    env: impl Fn(&str) -> Option<String>,
    read_file: impl Fn(&std::path::Path) -> std::io::Result<String>,
) -> Result<SocketAddr, ConfigError> {
    let env = non_empty(env);
    if let Some(addr) = flags.admin.or(env_addr(&env, "TOKEN_SIDECAR_ADMIN")?) {
        return Ok(addr);
    }
    Ok(read_config_file(flags, &env, &read_file)?
        .0
        .admin
        .unwrap_or_else(default_admin))
}

/// The environment as the sidecar reads it: an empty variable is unset, so
/// `-e TOKEN_SIDECAR_LISTEN=` clears a value an image sets.
fn non_empty(env: impl Fn(&str) -> Option<String>) -> impl Fn(&str) -> Option<String> {
    move |name| env(name).filter(|v| !v.trim().is_empty())
}

/// An address from the environment; the error names the variable.
fn env_addr(
    env: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    env(name)
        .map(|v| {
            v.parse().map_err(|_| {
                err(format!(
                    "{name}={v:?} is not an address like 127.0.0.1:8080"
                ))
            })
        })
        .transpose()
}

/// The fleet tier's settings: the Redis URL and the key file layer like every setting (flag,
/// env, file); the secret and a password file are read here, so a bad one stops the start.
fn shared_config(
    flags: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
    file: FileShared,
) -> Result<Option<SharedConfig>, ConfigError> {
    let redis = flags
        .shared_redis
        .clone()
        .or_else(|| env("TOKEN_SIDECAR_SHARED_REDIS"))
        .or(file.redis);
    let key_file = flags
        .shared_key_file
        .clone()
        .or_else(|| env("TOKEN_SIDECAR_SHARED_KEY_FILE").map(PathBuf::from))
        .or(file.key_file);
    let Some(redis) = redis else {
        return Ok(None);
    };
    let Some(key_file) = key_file else {
        return Err(err(
            "shared.redis is set but shared.key_file is not (or --shared-key-file, TOKEN_SIDECAR_SHARED_KEY_FILE): the fleet tier needs the fleet secret",
        ));
    };
    if !["redis://", "rediss://", "redis+unix://", "unix://"]
        .iter()
        .any(|scheme| redis.starts_with(scheme))
    {
        return Err(err(format!(
            "shared.redis {}: use a redis:// or rediss:// URL",
            crate::fleet::redacted(&redis)
        )));
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| err(format!("shared.{key} {}: {e}", path.display())))
    };
    let secret = FleetSecret::from_file_bytes(&read("key_file", &key_file)?)
        .map_err(|why| err(format!("shared.key_file {}: {why}", key_file.display())))?;
    let password = match &file.password_file {
        Some(path) => {
            let bytes = read("password_file", path)?;
            let text = String::from_utf8(bytes).map_err(|_| {
                err(format!(
                    "shared.password_file {}: not UTF-8",
                    path.display()
                ))
            })?;
            Some(text.trim_end_matches(['\r', '\n']).to_owned())
        }
        None => None,
    };
    let bounded = |key: &str, value: Option<Duration>, default: u64, max: u64| {
        let value = value.unwrap_or(Duration::from_millis(default));
        if value.is_zero() || value > Duration::from_millis(max) {
            return Err(err(format!(
                "shared.{key} = {}: give more than 0 and at most {}",
                humantime::format_duration(value),
                humantime::format_duration(Duration::from_millis(max))
            )));
        }
        Ok(value)
    };
    Ok(Some(SharedConfig {
        redis,
        password,
        secret,
        ca_file: file.ca_file,
        timeout: bounded("timeout", file.timeout, 75, 5_000)?,
        connect_timeout: bounded("connect_timeout", file.connect_timeout, 250, 30_000)?,
        poll_interval: bounded("poll_interval", file.poll_interval, 100, 5_000)?,
    }))
}

fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN.parse().expect("valid default")
}

/// Reads and parses the config file named by `--config` or `TOKEN_SIDECAR_CONFIG`, if any.
fn read_config_file(
    flags: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
    read_file: &impl Fn(&std::path::Path) -> std::io::Result<String>,
) -> Result<(FileConfig, Option<(PathBuf, String)>), ConfigError> {
    let path = flags
        .config
        .clone()
        .or_else(|| env("TOKEN_SIDECAR_CONFIG").map(PathBuf::from));
    let Some(path) = path else {
        return Ok((FileConfig::default(), None));
    };
    let text = read_file(&path)
        .map_err(|e| err(format!("cannot read config file {}: {e}", path.display())))?;
    let file = toml::from_str::<FileConfig>(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| format!(" (at {})", line_col(&text, s.start)))
            .unwrap_or_default();
        err(format!(
            "config file {}: {}{at}",
            path.display(),
            e.message().trim_end()
        ))
    })?;
    Ok((file, Some((path, text))))
}

/// Adds where the file sets the value an error is about: `error` starts with the key's path
/// (`limits.max_streams`, `routes[1] (eu).token.wait_timeout`, `shared.timeout`, `workers`).
fn with_line(error: ConfigError, path: &std::path::Path, text: &str) -> ConfigError {
    // A route's part, `routes[1] (eu)`, has a space of its own.
    let route_part = match error.0.starts_with("routes[") {
        true => error.0.find(").").map_or(0, |at| at + 1),
        false => 0,
    };
    let end = error.0[route_part..]
        .find([' ', ':'])
        .map_or(error.0.len(), |at| route_part + at);
    let key_path = error.0[..end].to_owned();
    match locate(text, &key_path) {
        Some(line) => ConfigError(format!(
            "{} (config file {}, line {line})",
            error.0,
            path.display()
        )),
        None => error,
    }
}

/// The line of a TOML file that sets `key_path`, found by reading its table headers: a route's
/// key in its own `[[routes]]` (by name) or in the top-level table it falls back to.
fn locate(text: &str, key_path: &str) -> Option<usize> {
    let (route, rest) = match key_path.strip_prefix("routes[") {
        Some(tail) => {
            let name = tail.split_once("(")?.1.split_once(")")?;
            (Some(name.0), name.1.strip_prefix('.')?)
        }
        None => (None, key_path),
    };
    let (table, key) = rest.rsplit_once('.').unwrap_or(("", rest));
    // (section, which [[routes]] it belongs to, line, key)
    let mut keys: Vec<(String, Option<usize>, usize, String)> = Vec::new();
    let mut names: Vec<Option<String>> = Vec::new();
    let mut section = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix("[[").and_then(|l| l.split_once("]]")) {
            section = header.0.trim().to_owned();
            names.push(None);
        } else if let Some(header) = line.strip_prefix('[').and_then(|l| l.split_once(']')) {
            section = header.0.trim().to_owned();
        } else if let Some((name, value)) = line.split_once('=') {
            let name = name.trim().trim_matches('"').to_owned();
            let in_route = section
                .starts_with("routes")
                .then(|| names.len().saturating_sub(1));
            if section == "routes"
                && name == "name"
                && let Some(last) = names.last_mut()
            {
                *last = Some(value.trim().trim_matches('"').to_owned());
            }
            keys.push((section.clone(), in_route, n + 1, name));
        }
    }
    let find = |wanted_section: &str, route_index: Option<usize>| {
        keys.iter().find_map(|(section, index, line, name)| {
            let full = if section.is_empty() {
                name.clone()
            } else {
                format!("{section}.{name}")
            };
            let wanted = if wanted_section.is_empty() {
                key.to_owned()
            } else {
                format!("{wanted_section}.{key}")
            };
            (*index == route_index && full == wanted).then_some(*line)
        })
    };
    if let Some(name) = route {
        let index = names
            .iter()
            .position(|n| n.as_deref() == Some(name))
            .or_else(|| name.strip_prefix("route").and_then(|i| i.parse().ok()));
        let in_route = if table.is_empty() {
            "routes".to_owned()
        } else {
            format!("routes.{table}")
        };
        if let Some(line) = index.and_then(|i| find(&in_route, Some(i))) {
            return Some(line);
        }
    }
    find(table, None)
}

/// `line L, column C` of a byte offset, for error messages.
fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {col}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(
        flags: Overrides,
        env: &[(&str, &str)],
        file: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let file = file.map(str::to_owned);
        Config::load(
            flags,
            |k| env.get(k).cloned(),
            |_| {
                file.clone().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")
                })
            },
        )
    }

    /// The error for a config file with this text.
    fn file_error(text: &str) -> ConfigError {
        load(with_file(), &[], Some(text)).unwrap_err()
    }

    fn with_file() -> Overrides {
        Overrides {
            config: Some("t.toml".into()),
            ..Default::default()
        }
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let file =
            "upstream = \"http://file:1\"\nlisten = \"127.0.0.1:7001\"\nadmin = \"127.0.0.1:7002\"";
        let c = load(with_file(), &[], Some(file)).unwrap();
        assert_eq!(c.routes[0].upstream.to_string(), "http://file:1");
        assert_eq!(c.routes[0].listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(c.admin, "127.0.0.1:7002".parse().unwrap());

        let env = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://env:2"),
            ("TOKEN_SIDECAR_ADMIN", "127.0.0.1:7003"),
        ];
        let c = load(with_file(), &env, Some(file)).unwrap();
        assert_eq!(c.routes[0].upstream.to_string(), "http://env:2");
        assert_eq!(c.admin, "127.0.0.1:7003".parse().unwrap());

        let flags = Overrides {
            upstream: Some("https://flag:3/".into()),
            ..with_file()
        };
        let c = load(flags, &env, Some(file)).unwrap();
        assert_eq!(c.routes[0].upstream.to_string(), "https://flag:3");

        let c = load(
            Overrides {
                upstream: Some("http://x".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap();
        assert_eq!(c.routes[0].listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin.to_string(), DEFAULT_ADMIN);
        assert_eq!(c.routes[0].token_paths, vec![DEFAULT_TOKEN_PATH]);
        assert_eq!(c.routes[0].token, TokenConfig::default());
    }

    #[test]
    fn the_shared_tier_layers_like_every_setting_and_needs_a_long_enough_key() {
        let dir = std::env::temp_dir().join(format!("ts-shared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("fleet.key");
        std::fs::write(&key, [b'k'; 40]).unwrap();
        let short = dir.join("short.key");
        std::fs::write(&short, b"0123456789\n").unwrap();
        let file = format!(
            "upstream = \"http://x\"\n[shared]\nredis = \"redis://file:6379/0\"\nkey_file = {:?}\ntimeout = \"20ms\"\n",
            short.display()
        );
        let off = load(with_file(), &[], Some("upstream = \"http://x\"")).unwrap();
        assert!(off.shared.is_none(), "off by default");

        let e = load(with_file(), &[], Some(&file)).unwrap_err();
        assert!(
            e.0.contains("shared.key_file") && e.0.contains("at least 32"),
            "{e}"
        );
        assert!(!e.0.contains("0123456789"), "the key is never quoted: {e}");

        let key_env = key.display().to_string();
        let env = [
            ("TOKEN_SIDECAR_SHARED_REDIS", "redis://env:6379/1"),
            ("TOKEN_SIDECAR_SHARED_KEY_FILE", key_env.as_str()),
        ];
        let c = load(with_file(), &env, Some(&file)).unwrap();
        let shared = c.shared.unwrap();
        assert_eq!(shared.redis, "redis://env:6379/1");
        assert_eq!(
            shared.timeout,
            Duration::from_millis(20),
            "the file's timeout"
        );
        assert_eq!(
            shared.poll_interval,
            Duration::from_millis(100),
            "a default"
        );

        let flags = Overrides {
            shared_redis: Some("rediss://u:p@flag:6380/0".into()),
            ..with_file()
        };
        let c = load(flags, &env, Some(&file)).unwrap();
        let shared = c.shared.unwrap();
        assert_eq!(shared.redis, "rediss://u:p@flag:6380/0");
        assert!(
            !format!("{shared:?}").contains("u:p"),
            "Debug hides the login"
        );

        let no_key = load(
            Overrides::default(),
            &[
                ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
                ("TOKEN_SIDECAR_SHARED_REDIS", "redis://r:6379"),
            ],
            None,
        )
        .unwrap_err();
        assert!(no_key.0.contains("shared.key_file"), "{no_key}");
        let bad_scheme = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
            ("TOKEN_SIDECAR_SHARED_REDIS", "http://r:6379"),
            ("TOKEN_SIDECAR_SHARED_KEY_FILE", key_env.as_str()),
        ];
        let e = load(Overrides::default(), &bad_scheme, None).unwrap_err();
        assert!(e.0.contains("redis:// or rediss://"), "{e}");
        let slow = format!(
            "upstream = \"http://x\"\n[shared]\nredis = \"redis://r\"\nkey_file = {:?}\ntimeout = \"10s\"\n",
            key.display()
        );
        let e = load(with_file(), &[], Some(&slow)).unwrap_err();
        assert!(e.0.starts_with("shared.timeout = 10s"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn out_of_range_values_from_the_file_name_its_line() {
        let cases = [
            (
                "upstream = \"http://x\"\n\n[token]\nmax_lifetime = \"1s\"\n",
                "routes[0] (default).token.max_lifetime",
                4,
            ),
            (
                "upstream = \"http://x\"\n[limits]\nmax_streams = 0\n",
                "limits.max_streams",
                3,
            ),
            (
                "upstream = \"http://x\"\nworkers = 5000\n",
                "workers = 5000",
                2,
            ),
            (
                "upstream = \"http://x\"\ntoken.pool_size = 99\n",
                "routes[0] (default).token.pool_size",
                2,
            ),
            (
                "[token]\nwait_timeout = \"9s\"\n[[routes]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"http://a\"\n[[routes]]\nname = \"b\"\nlisten = \"127.0.0.1:2\"\nupstream = \"http://b\"\n[routes.token]\nrefresh_at = 2.0\n",
                "routes[1] (b).token.refresh_at",
                12,
            ),
            (
                "[token]\nrefresh_at = 2.0\n[[routes]]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://a\"\n",
                "routes[0] (route0).token.refresh_at",
                2,
            ),
        ];
        for (file, starts, line) in cases {
            let e = load(with_file(), &[], Some(file)).unwrap_err();
            assert!(e.0.starts_with(starts), "{e}");
            assert!(
                e.0.ends_with(&format!("(config file t.toml, line {line})")),
                "{file}: {e}"
            );
        }
        // Values from flags or the environment have no line to name.
        let e = load(
            Overrides {
                workers: Some(5000),
                upstream: Some("http://x".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap_err();
        assert!(!e.0.contains("line"), "{e}");
    }

    #[test]
    fn workers_layer_like_every_setting_and_bad_values_are_named() {
        let file = "upstream = \"http://x\"\nworkers = 3";
        assert_eq!(load(with_file(), &[], Some(file)).unwrap().workers, 3);
        let env = [("TOKEN_SIDECAR_WORKERS", "2")];
        assert_eq!(load(with_file(), &env, Some(file)).unwrap().workers, 2);
        let flags = Overrides {
            workers: Some(1),
            ..with_file()
        };
        assert_eq!(load(flags, &env, Some(file)).unwrap().workers, 1);
        let default = load(
            Overrides::default(),
            &[("TOKEN_SIDECAR_UPSTREAM", "http://x")],
            None,
        );
        assert_eq!(
            default.unwrap().workers,
            1,
            "one thread unless asked for more"
        );

        let bad_env = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
            ("TOKEN_SIDECAR_WORKERS", "two"),
        ];
        let e = load(Overrides::default(), &bad_env, None).unwrap_err();
        assert!(e.0.starts_with("TOKEN_SIDECAR_WORKERS=\"two\""), "{e}");
        let e = file_error("upstream = \"http://x\"\nworkers = 5000");
        assert!(e.0.starts_with("workers = 5000"), "{e}");
        let e = file_error("upstream = \"http://x\"\nworkers = -1");
        assert!(e.0.contains("line 2, column 11"), "{e}");
    }

    #[test]
    fn empty_environment_values_count_as_unset() {
        let env = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
            ("TOKEN_SIDECAR_LISTEN", ""),
            ("TOKEN_SIDECAR_ADMIN", " "),
        ];
        let c = load(Overrides::default(), &env, None).unwrap();
        assert_eq!(c.routes[0].listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin.to_string(), DEFAULT_ADMIN);
    }

    #[test]
    fn the_healthcheck_finds_the_admin_address_like_the_server() {
        let file = Some("admin = \"127.0.0.1:7777\"".to_owned());
        let read = |_: &std::path::Path| file.clone().ok_or_else(|| std::io::Error::other("none"));
        let flags = Overrides {
            config: Some("f.toml".into()),
            ..Default::default()
        };
        assert_eq!(
            admin_address(&flags, |_| None, read).unwrap().to_string(),
            "127.0.0.1:7777"
        );
        let env = |k: &str| (k == "TOKEN_SIDECAR_ADMIN").then(|| "127.0.0.1:7778".to_owned());
        assert_eq!(
            admin_address(&flags, env, read).unwrap().to_string(),
            "127.0.0.1:7778"
        );
        let bad = |k: &str| (k == "TOKEN_SIDECAR_ADMIN").then(|| "nope".to_owned());
        assert!(
            admin_address(&flags, bad, read)
                .unwrap_err()
                .0
                .contains("TOKEN_SIDECAR_ADMIN")
        );
        assert_eq!(
            admin_address(&Overrides::default(), |_| None, read)
                .unwrap()
                .to_string(),
            DEFAULT_ADMIN
        );
    }

    #[test]
    fn config_path_can_come_from_the_environment() {
        let c = load(
            Overrides::default(),
            &[("TOKEN_SIDECAR_CONFIG", "x.toml")],
            Some("upstream = \"http://f\""),
        )
        .unwrap();
        assert_eq!(c.routes[0].upstream.to_string(), "http://f");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = load(Overrides::default(), &[], None).unwrap_err();
        assert!(e.0.contains("no upstream"), "{e}");
        let e = load(
            Overrides {
                upstream: Some("ftp://x".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap_err();
        assert!(e.0.contains("--upstream") && e.0.contains("scheme"), "{e}");
        let e = load(
            Overrides {
                upstream: Some("https://user:hunter2@idp.example".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap_err();
        assert!(
            e.0.contains("credentials") && !e.0.contains("hunter2"),
            "{e}"
        );
        let e = load(
            Overrides {
                upstream: Some("http://x/path".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap_err();
        assert!(e.0.contains("scheme://host"), "{e}");
        for secret_url in [
            "https://idp.example/oauth?key=hunter2",
            "ftp://hunter2",
            "hunter2",
        ] {
            let e = load(
                Overrides {
                    upstream: Some(secret_url.into()),
                    ..Default::default()
                },
                &[],
                None,
            )
            .unwrap_err();
            assert!(
                e.0.contains("--upstream") && !e.0.contains("hunter2"),
                "{e}"
            );
        }
        let e = load(with_file(), &[], None).unwrap_err();
        assert!(e.0.contains("cannot read config file"), "{e}");
        let e = file_error("upstream = \"http://x\"\nbogus = 1");
        assert!(e.0.contains("bogus") && e.0.contains("line 2"), "{e}");
        let e = file_error("upstream = \"http://x\"\n[token]\nrefresh_at = \"high\"");
        assert!(e.0.contains("refresh_at") || e.0.contains("line 3"), "{e}");
        let e = file_error("upstream = \"http://x\"\n[token]\nrefresh_at = 0.95");
        assert!(e.0.contains("token.refresh_at"), "{e}");
        let e = file_error("upstream = \"http://x\"\n[token]\nerror_ttl = \"5 parsecs\"");
        assert!(e.0.contains("error_ttl") || e.0.contains("line 3"), "{e}");
        let e = load(
            Overrides::default(),
            &[
                ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
                ("TOKEN_SIDECAR_LISTEN", "nope"),
            ],
            None,
        )
        .unwrap_err();
        assert!(e.0.contains("TOKEN_SIDECAR_LISTEN"), "{e}");
    }

    #[test]
    fn routes_inherit_top_level_tables_and_need_distinct_listeners() {
        let file = r#"
            [token]
            error_ttl = "7s"
            [[routes]]
            name = "eu"
            listen = "127.0.0.1:7101"
            upstream = "https://eu.example"
            [[routes]]
            name = "us"
            listen = "127.0.0.1:7102"
            upstream = "https://us.example"
            token_paths = ["/oauth/token", "/v1/token"]
            [routes.token]
            error_ttl = "1s"
        "#;
        let c = load(with_file(), &[], Some(file)).unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].token.error_ttl, Duration::from_secs(7));
        assert_eq!(c.routes[1].token.error_ttl, Duration::from_secs(1));
        assert_eq!(c.routes[1].token_paths.len(), 2);
        let e = load(
            Overrides {
                upstream: Some("http://x".into()),
                ..with_file()
            },
            &[],
            Some(file),
        )
        .unwrap_err();
        assert!(e.0.contains("several"), "{e}");
        // One listener may serve both, by prefix; the same prefix twice is an error naming both.
        let shared = file.replace("7102", "7101");
        let e = file_error(&shared);
        assert!(
            e.0.contains("path_prefix") && e.0.contains("\"eu\"") && e.0.contains("\"us\""),
            "{e}"
        );
        let by_prefix = shared.replace(
            "name = \"us\"",
            "name = \"us\"\npath_prefix = \"/us\"\nstrip_prefix = true",
        );
        let c = load(with_file(), &[], Some(&by_prefix)).unwrap();
        assert_eq!(c.listeners().len(), 1);
        assert_eq!(
            (c.routes[1].path_prefix.as_str(), c.routes[1].strip_prefix),
            ("/us", true)
        );
        for bad in ["us", "/us/", "/us?x"] {
            let text = by_prefix.replace("\"/us\"", &format!("{bad:?}"));
            let e = file_error(&text);
            assert!(e.0.contains("routes[1] (us).path_prefix"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_genesys_region_expands_to_login_and_api_routes_on_one_listener() {
        let c = load(
            Overrides {
                genesys_region: Some("apse1.pure.cloud".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap();
        let summary: Vec<(&str, &str, bool, String)> = c
            .routes
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.path_prefix.as_str(),
                    r.strip_prefix,
                    r.upstream.to_string(),
                )
            })
            .collect();
        let (login, api) = (
            "https://login.apse1.pure.cloud",
            "https://api.apse1.pure.cloud",
        );
        assert_eq!(
            summary,
            [
                ("genesys-login", "/", false, login.to_owned()),
                ("genesys-api", "/api/v2", false, api.to_owned()),
                ("genesys-login-gateway", "/login", true, login.to_owned()),
                ("genesys-api-gateway", "/api", true, api.to_owned()),
            ]
        );
        assert_eq!(
            c.listeners(),
            [DEFAULT_LISTEN.parse::<SocketAddr>().unwrap()]
        );
        assert!(
            c.routes[1].token_paths.is_empty(),
            "API routes only forward"
        );

        let env = [
            ("TOKEN_SIDECAR_GENESYS_REGION", "eu-west-1"),
            ("TOKEN_SIDECAR_GENESYS_API_UPSTREAM", "http://127.0.0.1:9"),
        ];
        let c = load(Overrides::default(), &env, None).unwrap();
        assert_eq!(
            c.routes[0].upstream.to_string(),
            "https://login.mypurecloud.ie"
        );
        assert_eq!(c.routes[1].upstream.to_string(), "http://127.0.0.1:9");

        let e = file_error("genesys_region = \"moon-1\"");
        assert!(
            e.0.contains("moon-1") && e.0.contains("us-east-1") && e.0.contains("ap-southeast-1"),
            "{e}"
        );
        let e = file_error("genesys_region = \"us-east-1\"\nupstream = \"http://x\"");
        assert!(e.0.contains("give one"), "{e}");
        let e = file_error("genesys_login_upstream = \"http://x\"\nupstream = \"http://y\"");
        assert!(e.0.contains("need genesys_region"), "{e}");
        let stray = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://y"),
            ("TOKEN_SIDECAR_GENESYS_API_UPSTREAM", "http://x"),
        ];
        let e = load(Overrides::default(), &stray, None).unwrap_err();
        assert!(e.0.contains("need genesys_region"), "{e}");
        let e = file_error("genesys_region = \"us-east-1\"\npreserve_host = true");
        assert!(e.0.contains("preserve_host"), "{e}");
        let e = file_error("genesys_region = \"us-east-1\"\ntoken_paths = [\"/token\"]");
        assert!(e.0.contains("token_paths"), "{e}");
    }

    #[test]
    fn a_region_starts_with_a_file_that_restates_the_one_route_defaults() {
        let file = "token_paths = [\"/oauth/token\"]\npreserve_host = false";
        let env = [("TOKEN_SIDECAR_GENESYS_REGION", "us-east-1")];
        let c = load(with_file(), &env, Some(file)).unwrap();
        assert_eq!(
            c.routes[0].upstream.to_string(),
            "https://login.mypurecloud.com"
        );
        assert_eq!(c.routes.len(), 4);
    }
}
