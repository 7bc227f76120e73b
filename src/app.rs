//! Startup and the process's life: [`App::build`] turns a validated configuration into the
//! running parts (each route's upstream client, token path and forwarder, the metrics) before any
//! port is bound; [`Listeners::bind`] binds; [`App::run`] serves until shutdown, then drains.
//! Every way startup can fail is a [`StartupError`], which `main` maps to an exit code in one place.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::assertion::Signer;
use crate::channels::ChannelWatch;
use crate::config::{Config, ConfigError, InjectConfig, RouteConfig};
use crate::fleet::Fleet;
use crate::forward::Forwarder;
use crate::inject::Injector;
use crate::metrics::{Metrics, RouteState};
use crate::router;
use crate::server;
use crate::token::{Process, TokenRoute};
use crate::upstream::Upstream;

/// Why the sidecar could not start.
#[derive(Debug)]
pub enum StartupError {
    /// The configuration (flags, environment, file, log filter) is invalid.
    Config(ConfigError),
    /// A file the upstream clients need (CA bundle, client certificate or key) is unusable.
    Files(String),
    /// A listener could not be bound.
    Bind(String),
    /// The async runtime could not start.
    Runtime(String),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::Config(e) => e.fmt(f),
            StartupError::Files(why) | StartupError::Bind(why) => f.write_str(why),
            StartupError::Runtime(why) => write!(f, "cannot start the runtime: {why}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// The bound sockets `run` serves: one per distinct route address, in [`Config::listeners`]
/// order, and the admin one.
#[derive(Debug)]
pub struct Listeners {
    pub routes: Vec<TcpListener>,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds every listener the configuration names; an error names the address.
    pub fn bind(config: &Config) -> Result<Listeners, StartupError> {
        let routes = config
            .listeners()
            .into_iter()
            .map(listen)
            .collect::<Result<_, _>>()?;
        Ok(Listeners {
            routes,
            admin: listen(config.admin)?,
        })
    }
}

/// Binds one listener with a backlog deep enough for a burst of new connections (the default of
/// 128 makes a thundering herd of clients wait a second or more for SYN retries).
pub fn listen(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    let describe = |e: std::io::Error| StartupError::Bind(format!("cannot listen on {addr}: {e}"));
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

/// The sidecar, built and ready to serve.
#[derive(Debug)]
pub struct App {
    config: Config,
    /// Each configured route's running parts, in config order (`config.routes[i]` built
    /// `routes[i]`).
    routes: Vec<router::Route>,
    metrics: Arc<Metrics>,
    /// Upstream flights run here so shutdown can wait for them.
    flights: TaskTracker,
    /// Fires when the shutdown grace is over: callers still waiting get an answer, then the
    /// listeners close.
    closed: CancellationToken,
    /// The fleet tier, when `[shared]` is configured.
    fleet: Option<Arc<Fleet>>,
    /// The routes as the admin listener's `/status` sees them.
    states: Vec<Weak<dyn RouteState>>,
    /// Token paths made for injecting routes whose token URL no route serves: on no listener.
    token_only: Vec<Arc<TokenRoute>>,
}

/// One route's token path (signing its calls' assertions with `signer`, if given) and forwarder.
fn build_route(
    route: &RouteConfig,
    config: &Config,
    metrics: &mut Metrics,
    process: (&Process, Option<Signer>),
) -> Result<(Arc<TokenRoute>, Arc<Forwarder>), StartupError> {
    let (process, signer) = process;
    let route_metrics = metrics.route(&route.name);
    let upstream = Arc::new(Upstream::new(route).map_err(StartupError::Files)?);
    let forwarder = Arc::new(Forwarder::new(
        &route.name,
        upstream.clone(),
        route_metrics.clone(),
    ));
    let token = TokenRoute::new(
        route,
        &config.limits,
        upstream,
        forwarder.clone(),
        route_metrics,
        (process.clone(), signer),
    );
    Ok((Arc::new(token), forwarder))
}

/// Gives each route with `[routes.inject]` its injector. Its bearer comes from the token path of
/// the route whose upstream and token path are the token URL (so an app sending the same
/// credentials there shares the token), or else from a token path made for it, returned here.
fn inject(
    config: &Config,
    routes: &mut [router::Route],
    metrics: &mut Metrics,
    process: &Process,
) -> Result<Vec<Arc<TokenRoute>>, StartupError> {
    let mut made = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let Some(inject) = &route.inject else {
            continue;
        };
        let wanted = crate::path::match_key(&inject.token_path).into_owned();
        let serving = config.routes.iter().position(|other| {
            other.upstream == inject.token_origin
                && other
                    .token_paths
                    .iter()
                    .any(|path| crate::path::match_key(path) == wanted.as_str())
        });
        // A signing token path is never shared: it rewrites every call's form.
        let signer = signer(inject)?;
        let tokens = match serving.filter(|_| signer.is_none()) {
            Some(j) => routes[j].token.clone(),
            None => {
                let own = token_route_for(route, inject);
                let (token, _) = build_route(&own, config, metrics, (process, signer))?;
                made.push(token.clone());
                token
            }
        };
        let injector = Injector::new(&route.name, inject, tokens, config.limits.body_read_timeout);
        routes[i] = routes[i].clone().injecting(injector);
    }
    Ok(made)
}

/// The assertion signer of an injection with `private_key_jwt`; an unusable key is a bad
/// configuration.
fn signer(inject: &InjectConfig) -> Result<Option<Signer>, StartupError> {
    let Some(key) = &inject.assertion_key else {
        return Ok(None);
    };
    let audience = format!("{}{}", inject.token_origin, inject.token_path);
    Signer::new(&key.pem, key.kid.clone(), &inject.client_id, &audience)
        .map(Some)
        .map_err(|why| {
            StartupError::Config(ConfigError::new(format!(
                "inject.assertion_key_file: {why}"
            )))
        })
}

/// The route a token path made for `route`'s injection is built from: its token URL, its token
/// and client settings, named `<route>-inject`.
fn token_route_for(route: &RouteConfig, inject: &InjectConfig) -> RouteConfig {
    RouteConfig {
        name: format!("{}-inject", route.name),
        listen: route.listen,
        path_prefix: "/".into(),
        strip_prefix: false,
        upstream: inject.token_origin.clone(),
        token_paths: vec![inject.token_path.clone()],
        preserve_host: false,
        token: route.token.clone(),
        client: route.client.clone(),
        inject: None,
    }
}

/// The route listeners while they serve: what a drain stops and waits for.
struct Serving {
    /// Stops the accept loops (and so the sweeps) from taking new connections.
    stop: CancellationToken,
    accept_loops: Vec<JoinHandle<()>>,
    /// Every connection the accept loops started.
    connections: TaskTracker,
}

impl App {
    /// Builds every route's parts, each upstream client once. Needs no runtime and binds nothing,
    /// so a bad file never leaves a listener up for a moment.
    pub fn build(config: &Config) -> Result<App, StartupError> {
        let mut metrics = Metrics::new();
        let flights = TaskTracker::new();
        let closed = CancellationToken::new();
        let fleet = match &config.shared {
            Some(shared) => Some(Arc::new(
                Fleet::new(shared, metrics.fleet())
                    .map_err(|e| StartupError::Config(ConfigError::new(e)))?,
            )),
            None => None,
        };
        let process = Process {
            tracker: flights.clone(),
            closed: closed.clone(),
            fleet: fleet.clone(),
        };
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut channels = None;
        for route in &config.routes {
            let (token, forwarder) = build_route(route, config, &mut metrics, (&process, None))?;
            let mut built =
                router::Route::new(&route.path_prefix, route.strip_prefix, token, forwarder);
            // The Genesys preset's API routes count notification channels.
            if route.name.starts_with("genesys-api") {
                let metrics = channels.get_or_insert_with(|| metrics.channels()).clone();
                built = built.watching_channels(ChannelWatch::new(&route.name, metrics));
            }
            routes.push(built);
        }
        let token_only = inject(config, &mut routes, &mut metrics, &process)?;
        let states: Vec<Weak<dyn RouteState>> = routes
            .iter()
            .map(|route| &route.token)
            .chain(&token_only)
            .map(|token| Arc::downgrade(token) as Weak<dyn RouteState>)
            .collect();
        metrics.register_routes(states.clone());
        Ok(App {
            config: config.clone(),
            routes,
            token_only,
            metrics: Arc::new(metrics),
            flights,
            closed,
            fleet,
            states,
        })
    }

    /// Serves on already-bound listeners until `shutdown` completes, then drains: readiness turns
    /// 503, listeners drain (see [`server::serve`]), and in-flight requests and upstream calls
    /// get up to the grace period to finish. Callers still waiting for a flight then get 503.
    pub async fn run(self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        let admin_state = Arc::new(AdminState {
            ready: AtomicBool::new(false),
            metrics: self.metrics.clone(),
            routes: self.states.clone(),
            fleet: self.fleet.clone(),
            status: Default::default(),
        });
        let serving = self.serve_routes(listeners.routes);
        if let Some(fleet) = &self.fleet {
            info!(redis = ?fleet, "shared tier on");
            fleet.warm_up().await;
            tokio::spawn(fleet.clone().listen(self.closed.clone()));
            tokio::spawn(reload_on_hangup(fleet.clone()));
        }
        let (admin_stop, admin_loop) = serve_admin(listeners.admin, admin_state.clone());
        admin_state.ready.store(true, Ordering::Release);

        shutdown.await;
        admin_state.ready.store(false, Ordering::Release);
        self.drain(serving).await;
        admin_stop.cancel();
        let _ = admin_loop.await;
    }

    /// One accept loop per listener, serving the routes on its address, and one sweep per route.
    fn serve_routes(&self, listeners: Vec<TcpListener>) -> Serving {
        let addresses = self.config.listeners();
        assert_eq!(
            listeners.len(),
            addresses.len(),
            "one listener per route address, in config order"
        );
        let mut serving = Serving {
            stop: CancellationToken::new(),
            accept_loops: Vec::with_capacity(listeners.len()),
            connections: TaskTracker::new(),
        };
        for (address, listener) in addresses.into_iter().zip(listeners) {
            let mut served = Vec::new();
            for (config, route) in self.config.routes.iter().zip(&self.routes) {
                if config.listen != address {
                    continue;
                }
                info!(
                    route = route.token.name(),
                    listen = %local_addr(&listener),
                    path_prefix = %route.prefix,
                    upstream = %config.upstream,
                    "route listening"
                );
                if config.inject.is_some() && !address.ip().is_loopback() {
                    warn!(
                        route = route.token.name(),
                        listen = %address,
                        "this route injects credentials: whoever reaches this address acts as its client (bind it to loopback or a pod-local address)"
                    );
                }
                let every = (config.token.idle_timeout / 4)
                    .clamp(Duration::from_millis(100), Duration::from_secs(5));
                tokio::spawn(sweep(route.token.clone(), every, serving.stop.clone()));
                served.push(route.clone());
            }
            if address == self.config.routes[0].listen {
                for token in &self.token_only {
                    let every = Duration::from_secs(5);
                    tokio::spawn(sweep(token.clone(), every, serving.stop.clone()));
                }
            }
            serving.accept_loops.push(tokio::spawn(server::serve(
                listener,
                router::listener_service(served),
                self.config.limits.clone(),
                serving.connections.clone(),
                serving.stop.clone(),
                self.closed.clone(),
            )));
        }
        serving
    }

    /// Stops accepting and gives requests and upstream calls the grace period to finish; then
    /// callers still waiting are answered and the listeners close.
    async fn drain(&self, mut serving: Serving) {
        let grace = self.config.shutdown_grace;
        info!(grace_s = grace.as_secs_f64(), "shutdown: draining");
        let grace_over = tokio::time::Instant::now() + grace;
        serving.stop.cancel();
        // Listeners keep accepting while they drain, until quiet or the grace is over.
        let drained = tokio::time::timeout_at(grace_over, async {
            for accept_loop in &mut serving.accept_loops {
                let _ = accept_loop.await;
            }
            // No connection starts from here on. Requests still running on draining connections
            // may start flights, so the connections are awaited before the flights.
            serving.connections.close();
            self.flights.close();
            serving.connections.wait().await;
            self.flights.wait().await;
        })
        .await;
        self.closed.cancel();
        if drained.is_err() {
            // Let the callers told "shutting down" get their answer written.
            let _ =
                tokio::time::timeout(Duration::from_millis(200), serving.connections.wait()).await;
        }
        match drained {
            Ok(()) => info!("shutdown: drained"),
            Err(_) => warn!("shutdown: grace period over with requests still in flight"),
        }
    }
}

/// The admin listener's accept loop, with its own limits and its own stop (it serves until the
/// routes have drained, so readiness reads 503 throughout).
fn serve_admin(
    listener: TcpListener,
    state: Arc<AdminState>,
) -> (CancellationToken, JoinHandle<()>) {
    info!(admin = %local_addr(&listener), "admin listening");
    let service = tower::service_fn(move |request| admin::handle(state.clone(), request));
    let stop = CancellationToken::new();
    let accept_loop = tokio::spawn(server::serve(
        listener,
        service,
        crate::config::Limits::admin(),
        TaskTracker::new(),
        stop.clone(),
        stop.clone(),
    ));
    (stop, accept_loop)
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |addr| addr.to_string())
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

/// Reads the fleet's key files again on every SIGHUP (a key rotation without a restart). A bad
/// file keeps the keys in use; the error names the file, never its bytes.
async fn reload_on_hangup(fleet: Arc<Fleet>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("fleet tier: cannot listen for SIGHUP; key files are read at start only");
        return;
    };
    while hangups.recv().await.is_some() {
        match fleet.reload() {
            Ok(()) => {
                info!("fleet tier: SIGHUP: key files read again; writing with the current key")
            }
            Err(why) => tracing::warn!(
                why,
                "fleet tier: SIGHUP: a key file is unusable; the keys in use are kept"
            ),
        }
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
