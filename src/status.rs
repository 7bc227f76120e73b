//! The `/status` document: its types, in one place. The token path fills a [`RouteStatus`] per
//! route, the admin listener serves the whole [`Status`] as JSON, and the `status` subcommand
//! ([`crate::cli::status`]) reads it back into the same types. Clients appear only as short
//! hashes; nothing here can carry a secret, a token or a client id.

use serde::{Deserialize, Serialize};

/// The whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// True once every listener is bound, false while starting or draining.
    pub ready: bool,
    /// The fleet tier, `null` when it is off (the config table is `[shared]`).
    pub shared: Option<FleetStatus>,
    /// One entry per token route.
    pub routes: Vec<RouteStatus>,
}

/// The fleet tier as one pod sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// The Redis address (addresses, for Cluster seeds or Sentinels), without its login.
    pub redis: String,
    /// `single`, `cluster`, or `sentinel <master>`.
    #[serde(default)]
    pub mode: String,
    /// `closed`, `open` (each pod alone) or `half-open`.
    pub breaker: String,
    /// A connection to Redis is open now.
    #[serde(default)]
    pub connected: bool,
    /// Redis has answered at least once since the start (`shared.required` waits for it).
    #[serde(default)]
    pub answered: bool,
    /// Why Redis does not answer now (a TLS failure, a refused login, a timeout...), if it does
    /// not.
    #[serde(default)]
    pub cause: Option<String>,
}

/// One route's keys, calls in progress, cool-downs and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// The route's name, as in the `route` metric label.
    pub name: String,
    /// Every cached key, calls in progress included.
    pub keys_total: usize,
    /// How many of them `keys` lists (a bounded page).
    pub keys_listed: usize,
    /// The listed keys.
    pub keys: Vec<KeyStatus>,
    /// Listed keys with a call in progress (derived from `keys`: a reader need not send it).
    #[serde(default)]
    pub flights_listed: usize,
    /// Token calls in progress towards the provider (the limiter's figure again, kept for
    /// readers of the older document).
    #[serde(default)]
    pub upstream_calls_in_progress: usize,
    /// Every client held back now.
    pub cooldowns_total: usize,
    /// The listed holds, longest first.
    pub cooldowns: Vec<CooldownStatus>,
    /// The outbound limiter.
    pub limiter: LimiterStatus,
    /// Whether the route shares its tokens through the fleet tier.
    pub shared: bool,
}

/// One cached key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// 8 hex digits of the key's digest, which this process keys with a secret of its own: it
    /// tells apart one client's keys (each scope, audience, secret) and changes on restart.
    #[serde(default)]
    pub key: String,
    /// The client's 8-hex hash; `null` for a key no client has named yet.
    pub client: Option<String>,
    /// Seconds the served token has left; `null` with nothing to serve.
    pub ttl_s: Option<u64>,
    /// Tokens held (a pool may hold several).
    pub tokens: usize,
    /// Whether a call for this key is in progress.
    pub calling: bool,
}

/// One client held back by a cool-down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CooldownStatus {
    /// The client's 8-hex hash.
    pub client: String,
    /// Whole seconds left, rounded up.
    pub left_s: u64,
}

/// The route's outbound limits towards the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimiterStatus {
    /// Calls holding a slot now.
    pub calls_in_progress: usize,
    /// `token.max_concurrent_calls`.
    pub max_concurrent_calls: usize,
    /// `token.calls_per_second`; 0 = no rate limit.
    pub calls_per_second: f64,
    /// Calls the rate limit would let through now; `null` without a rate limit.
    pub calls_available: Option<f64>,
}
