//! token-sidecar: a sidecar proxy for OAuth 2.0 token endpoints. It caches client-credentials
//! tokens per credential set, coalesces concurrent requests into one upstream call, refreshes
//! ahead of expiry, honours `Retry-After`, and forwards everything else unchanged.
//!
//! Map of the crate, from the outside in:
//! - [`cli`], [`config`]: the command line, and typed configuration (a folder: file, environment,
//!   layering, validation, the route sources, the Genesys Cloud preset [`config::genesys`], and
//!   the fleet tier's settings); it imports from no other module;
//! - [`demo`]: `token-sidecar demo`, a built-in throttling provider and the story it tells;
//! - [`app`]: building the parts before any port is bound, serving, draining; startup errors;
//! - [`server`]: accept loops, connection limits, graceful drain;
//! - [`router`]: dispatch by path prefix to a route, then between its token path and forwarding,
//!   on the path's normal form ([`path`]);
//! - [`token`]: the token path (parsing and keys, cache, single flight, cool-downs, rendering);
//! - [`fleet`]: the optional fleet tier on Redis/Valkey (shared tokens, flights, cool-downs;
//!   configured by the `[shared]` table);
//! - [`forward`]: streaming pass-through proxying, upgrades included; [`inject`]: a route's
//!   bearer added to what it forwards, from the token path's machinery, refreshed on 401;
//! - [`upstream`]: the HTTP client towards the provider (request rewriting, TLS, timeouts,
//!   the token exchange), shared by the two above, over [`pool`]'s keep-alive connections;
//! - [`admin`]: liveness, readiness, metrics and `/status` endpoints; [`status`]: the `/status`
//!   document's types, which the token path fills and [`cli::status`] prints;
//! - [`metrics`], [`telemetry`]: observability, free of secrets;
//! - [`error`], [`body`]: the request path's error type and its responses, the one body type.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub(crate) mod admin;
pub mod app;
pub(crate) mod assertion;
pub(crate) mod body;
pub(crate) mod channels;
pub mod cli;
pub mod config;
pub mod demo;
pub(crate) mod error;
pub mod fleet;
pub(crate) mod forward;
pub(crate) mod inject;
pub(crate) mod metrics;
pub mod path;
pub(crate) mod pool;
pub(crate) mod router;
pub(crate) mod server;
pub mod status;
pub mod telemetry;
pub mod token;
pub(crate) mod tunnel;
pub(crate) mod upstream;

pub use app::{App, Listeners, StartupError};
