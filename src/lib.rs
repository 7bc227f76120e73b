//! token-sidecar: a sidecar proxy for OAuth 2.0 token endpoints. It caches client-credentials
//! tokens per credential set, coalesces concurrent requests into one upstream call, refreshes
//! ahead of expiry, honours `Retry-After`, and forwards everything else unchanged.
//!
//! Map of the crate:
//! - [`config`]: typed configuration, layering and validation;
//! - [`server`]: accept loops, connection limits, graceful drain;
//! - [`router`]: dispatch between the token path and forwarding;
//! - [`token`]: the token path (parsing and keys, cache, single flight, cool-downs);
//! - [`forward`]: pass-through proxying, upgrades included;
//! - [`upstream`]: the HTTP client towards the provider (TLS, timeouts, pooling);
//! - [`admin`]: liveness, readiness and metrics endpoints;
//! - [`metrics`], [`telemetry`]: observability, free of secrets;
//! - [`error`], [`body`]: the error type and its responses, the one body type.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod error;
pub mod forward;
pub mod metrics;
pub mod router;
pub mod server;
pub mod telemetry;
pub mod token;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use admin::AdminState;
use config::Config;
use forward::Forwarder;
use metrics::Metrics;
use token::TokenRoute;

/// The bound sockets `run` serves: one per route, in `config.routes` order, and the admin one.
#[derive(Debug)]
pub struct Listeners {
    pub routes: Vec<TcpListener>,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds every listener the configuration names; an error names the address.
    pub async fn bind(config: &Config) -> Result<Listeners, String> {
        let mut routes = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            routes.push(listen(route.listen)?);
        }
        Ok(Listeners {
            routes,
            admin: listen(config.admin)?,
        })
    }
}

/// Binds one listener with a backlog deep enough for a burst of new connections (the default of
/// 128 makes a thundering herd of clients wait a second or more for SYN retries).
pub fn listen(addr: std::net::SocketAddr) -> Result<TcpListener, String> {
    let describe = |e: std::io::Error| format!("cannot listen on {addr}: {e}");
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(describe)?;
    socket.set_reuseaddr(true).map_err(describe)?;
    socket.bind(addr).map_err(describe)?;
    socket.listen(4096).map_err(describe)
}

/// Runs the sidecar on already-bound listeners until `shutdown` completes, then drains: readiness
/// turns 503, listeners stop accepting, and in-flight requests and upstream calls get up to the
/// grace period to finish.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    if listeners.routes.len() != config.routes.len() {
        return Err(format!(
            "{} route listeners for {} routes",
            listeners.routes.len(),
            config.routes.len()
        ));
    }
    let mut metrics = Metrics::new();
    let flights = TaskTracker::new();
    let mut routes = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        let route_metrics = metrics.route(&route.name);
        let forwarder = Arc::new(Forwarder::new(route, route_metrics.clone())?);
        let token = Arc::new(TokenRoute::new(
            route,
            &config.limits,
            forwarder.clone(),
            route_metrics,
            flights.clone(),
        ));
        routes.push((token, forwarder));
    }
    metrics.register_routes(&routes.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>());
    let admin_state = Arc::new(AdminState {
        ready: AtomicBool::new(false),
        metrics: Arc::new(metrics),
    });

    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for (((token, forwarder), listener), route_config) in
        routes.iter().zip(listeners.routes).zip(&config.routes)
    {
        info!(
            route = token.name(),
            listen = %listener.local_addr().map_err(|e| e.to_string())?,
            upstream = %forwarder.upstream_url(),
            "route listening"
        );
        let service = router::route_service(token.clone(), forwarder.clone());
        accept_loops.push(tokio::spawn(server::serve(
            listener,
            service,
            config.limits.clone(),
            connections.clone(),
            stop.clone(),
        )));
        let every = (route_config.token.idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::spawn(sweep(token.clone(), every, stop.clone()));
    }

    let admin_stop = CancellationToken::new();
    info!(admin = %listeners.admin.local_addr().map_err(|e| e.to_string())?, "admin listening");
    let admin_service = {
        let state = admin_state.clone();
        tower::service_fn(move |request| admin::handle(state.clone(), request))
    };
    let admin_loop = tokio::spawn(server::serve(
        listeners.admin,
        admin_service,
        config.limits.clone(),
        TaskTracker::new(),
        admin_stop.clone(),
    ));
    admin_state.ready.store(true, Ordering::Release);

    shutdown.await;
    admin_state.ready.store(false, Ordering::Release);
    info!(
        grace_s = config.shutdown_grace.as_secs_f64(),
        "shutdown: draining"
    );
    stop.cancel();
    for accept_loop in accept_loops {
        let _ = accept_loop.await;
    }
    // The accept loops have ended: no connection starts from here on. Requests still running on
    // draining connections may start flights, so the connections are awaited before the flights.
    connections.close();
    flights.close();
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        connections.wait().await;
        flights.wait().await;
    })
    .await;
    match drained {
        Ok(()) => info!("shutdown: drained"),
        Err(_) => warn!("shutdown: grace period over with requests still in flight"),
    }
    admin_stop.cancel();
    let _ = admin_loop.await;
    Ok(())
}

/// Evicts idle and dead entries of one route every few seconds (more often for short idle
/// timeouts) until `stop`.
async fn sweep(route: Arc<TokenRoute>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => route.sweep(),
            () = stop.cancelled() => return,
        }
    }
}
