//! The configuration's model: [`Config`] and its parts (logging, connection limits, routes with
//! their upstream URL, token cache tuning and HTTP client), each with its defaults, and the
//! checks a part can make on its own (`validate`). Checks across routes and listeners live in
//! `validate.rs`; where values come from, in `layer.rs`.

use http::Uri;
use http::uri::{Authority, Scheme};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::error::{ConfigError, KeyPath};
use super::fleet::SharedConfig;

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

/// [`DEFAULT_LISTEN`] as an address.
pub(super) fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("valid default")
}

/// [`DEFAULT_ADMIN`] as an address.
pub(super) fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN.parse().expect("valid default")
}

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

impl Config {
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

    /// Checks what serde cannot: sizes, counts and timeouts above 0, a head large enough for
    /// ordinary requests.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let at = |key: &str, rest: &str| Err(ConfigError::at(KeyPath::top(key), rest));
        for (key, value) in [
            ("limits.max_request_body", self.max_request_body),
            ("limits.max_token_response", self.max_token_response),
            ("limits.max_headers", self.max_headers),
            ("limits.max_header_bytes", self.max_header_bytes),
            ("limits.max_connections", self.max_connections),
        ] {
            if value == 0 {
                return at(key, " must be greater than 0");
            }
        }
        if self.max_header_bytes < 8192 {
            return at("limits.max_header_bytes", " must be at least 8192");
        }
        if self.header_read_timeout.is_zero() {
            return at("limits.header_read_timeout", " must be greater than 0");
        }
        if self.body_read_timeout.is_zero() {
            return at("limits.body_read_timeout", " must be greater than 0");
        }
        if self.idle_timeout.is_zero() || self.tunnel_idle_timeout.is_zero() {
            return at(
                "limits.idle_timeout",
                " and limits.tunnel_idle_timeout must be greater than 0",
            );
        }
        if self.max_streams == 0 {
            return at("limits.max_streams", " must be greater than 0");
        }
        Ok(())
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
    /// The credentials whose bearer the route adds to what it forwards (`[routes.inject]`).
    pub inject: Option<super::InjectConfig>,
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

impl TokenConfig {
    /// Checks the values serde cannot; `at` is the route's `token` key, which errors extend.
    pub(super) fn validate(&self, at: &KeyPath) -> Result<(), ConfigError> {
        self.validate_shares(at)?;
        self.validate_durations(at)?;
        self.validate_counts(at)
    }

    /// The shares of a lifetime: each within its range, and refreshing before the margin.
    fn validate_shares(&self, at: &KeyPath) -> Result<(), ConfigError> {
        let share = |key: &str, value: f64, lo: f64, hi: f64| {
            if value.is_finite() && value >= lo && value <= hi {
                Ok(())
            } else {
                Err(ConfigError::at(
                    at.join(key),
                    format!(" = {value}: must be between {lo} and {hi}"),
                ))
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
            return Err(ConfigError::at(
                at.join("refresh_at"),
                format!(
                    " = {}: must not be later than the safety margin (1 - safety_margin_ratio = {})",
                    self.refresh_at,
                    1.0 - self.safety_margin_ratio
                ),
            ));
        }
        Ok(())
    }

    /// The durations: above 0, a lifetime long enough to serve, backoff bounds in order.
    fn validate_durations(&self, at: &KeyPath) -> Result<(), ConfigError> {
        for (key, value) in [
            ("retry_after_max", self.retry_after_max),
            ("backoff_base", self.backoff_base),
            ("backoff_max", self.backoff_max),
            ("max_lifetime", self.max_lifetime),
            ("wait_timeout", self.wait_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::at(at.join(key), " must be greater than 0"));
            }
        }
        if self.max_lifetime < Duration::from_secs(3) {
            return Err(ConfigError::at(
                at.join("max_lifetime"),
                " must be at least 3s: a token is counted a second short and served while a whole second is left",
            ));
        }
        if self.backoff_base > self.backoff_max {
            return Err(ConfigError::at(
                at.join("backoff_base"),
                " must not exceed backoff_max",
            ));
        }
        Ok(())
    }

    /// The counts and rates: the pool within its bound, the tables and the limiter usable.
    fn validate_counts(&self, at: &KeyPath) -> Result<(), ConfigError> {
        if !(1..=MAX_POOL_SIZE).contains(&self.pool_size) {
            return Err(ConfigError::at(
                at.join("pool_size"),
                format!(" = {}: between 1 and {MAX_POOL_SIZE}", self.pool_size),
            ));
        }
        if self.max_entries == 0 {
            return Err(ConfigError::at(
                at.join("max_entries"),
                " must be greater than 0",
            ));
        }
        if self.max_concurrent_calls == 0 {
            return Err(ConfigError::at(
                at.join("max_concurrent_calls"),
                " must be greater than 0",
            ));
        }
        if !self.calls_per_second.is_finite() || self.calls_per_second < 0.0 {
            return Err(ConfigError::at(
                at.join("calls_per_second"),
                " must be 0 (no limit) or positive",
            ));
        }
        if self.calls_per_second > 0.0 && self.calls_burst == 0 {
            return Err(ConfigError::at(
                at.join("calls_burst"),
                " must be at least 1 when calls_per_second is set",
            ));
        }
        Ok(())
    }
}

impl ClientConfig {
    /// Checks the values serde cannot; `at` is the route's `client` key.
    pub(super) fn validate(&self, at: &KeyPath) -> Result<(), ConfigError> {
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(ConfigError::at(
                at.clone(),
                ": connect_timeout and request_timeout must be greater than 0",
            ));
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(ConfigError::at(
                at.clone(),
                ": client_cert_file and client_key_file go together",
            ));
        }
        Ok(())
    }
}
