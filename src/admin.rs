//! The admin listener, kept apart from the token listeners so probes and scrapes never compete
//! with apps and it can stay on loopback: liveness, readiness, Prometheus metrics, and `/status`
//! (each route's keys, calls, cool-downs and limits as JSON, by client hash only).

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

use crate::body::{Body, full};
use crate::fleet::Fleet;
use crate::metrics::{Metrics, RouteState};
use crate::status::Status;

/// What the admin endpoints report.
#[derive(Debug)]
pub(crate) struct AdminState {
    /// True once every listener is bound, false from the moment draining starts.
    pub ready: AtomicBool,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The routes, for `/status`.
    pub routes: Vec<Weak<dyn RouteState>>,
    /// The fleet tier, for `/status`.
    pub fleet: Option<Arc<Fleet>>,
    /// The last `/status` document and when it was built: served again for up to
    /// [`STATUS_FRESH`], so a loop of `/status` calls walks the caches at most once a second.
    pub status: tokio::sync::Mutex<Option<(Instant, Arc<str>)>>,
}

impl AdminState {
    /// Ready: every listener bound, not draining, and, with `shared.required`, Redis has answered
    /// once.
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.fleet.as_ref().is_none_or(|fleet| fleet.ready())
    }
}

/// How long a `/status` document is served again before it is rebuilt.
const STATUS_FRESH: Duration = Duration::from_secs(1);

/// The `/status` document: the cached one while fresh, else built anew on a blocking thread (it
/// walks and locks every cache entry; on the default one-thread runtime, the worker goes on
/// serving tokens meanwhile). Callers that arrive while it is built wait for it.
async fn cached_status(state: &Arc<AdminState>) -> Arc<str> {
    let mut cached = state.status.lock().await;
    if let Some((built, document)) = cached.as_ref()
        && built.elapsed() < STATUS_FRESH
    {
        return document.clone();
    }
    let building = state.clone();
    let document: Arc<str> = match tokio::task::spawn_blocking(move || status(&building)).await {
        Ok(document) => document.into(),
        // The walk panicked (a bug): say so rather than serve an empty document.
        Err(_) => return "{\"error\": \"the status document could not be built\"}\n".into(),
    };
    *cached = Some((Instant::now(), document.clone()));
    document
}

/// The `/status` document, as pretty JSON.
fn status(state: &AdminState) -> String {
    let document = Status {
        ready: state.is_ready(),
        shared: state.fleet.as_ref().map(|fleet| fleet.status()),
        routes: state
            .routes
            .iter()
            .filter_map(Weak::upgrade)
            .map(|route| route.status())
            .collect(),
    };
    // Plain structs of strings and numbers: serialising them cannot fail.
    let mut text = serde_json::to_string_pretty(&document).unwrap_or_default();
    text.push('\n');
    text
}

/// Answers one admin request.
pub(crate) async fn handle(
    state: Arc<AdminState>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => {
            (StatusCode::OK, "text/plain", "ok\n".to_owned())
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if state.is_ready() {
                (StatusCode::OK, "text/plain", "ready\n".to_owned())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining\n".to_owned(),
                )
            }
        }
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        (&Method::GET | &Method::HEAD, "/status") => (
            StatusCode::OK,
            "application/json",
            cached_status(&state).await.to_string(),
        ),
        (_, "/healthz" | "/readyz" | "/metrics" | "/status") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz, /metrics or /status\n".to_owned(),
        ),
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}
