//! The one place requests are dispatched. A listener serves one or more routes, chosen by the
//! longest `path_prefix` that matches on a segment boundary (`/api` matches `/api` and `/api/x`,
//! not `/apix`), with the prefix removed first when the route says `strip_prefix`. Within a route,
//! its token paths go to its token cache and every other request is forwarded. The tower stack
//! around it turns a panic into a 500 instead of a dropped connection.

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::ServiceBuilder;
use tower_http::catch_panic::{CatchPanic, CatchPanicLayer};

use crate::body::{Body, boxed};
use crate::channels::ChannelWatch;
use crate::error::Error;
use crate::forward::Forwarder;
use crate::inject::Injector;
use crate::token::TokenRoute;

/// One route's running parts, as the dispatcher sees them.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The `path_prefix` as configured, for logs.
    pub(crate) prefix: String,
    /// Its match key (see [`crate::path::match_key`]) and segment count, made once.
    prefix_key: String,
    prefix_segments: usize,
    strip: bool,
    pub(crate) token: Arc<TokenRoute>,
    forwarder: Arc<Forwarder>,
    /// The bearer the route adds to what it forwards, with `[routes.inject]`.
    inject: Option<Arc<Injector>>,
    /// The Genesys notification channels created through the route (the preset's API routes).
    channels: Option<Arc<ChannelWatch>>,
}

impl Route {
    pub(crate) fn new(
        prefix: &str,
        strip: bool,
        token: Arc<TokenRoute>,
        forwarder: Arc<Forwarder>,
    ) -> Route {
        Route {
            prefix: prefix.to_owned(),
            prefix_key: crate::path::match_key(prefix).into_owned(),
            prefix_segments: crate::path::segments(prefix),
            strip,
            token,
            forwarder,
            inject: None,
            channels: None,
        }
    }

    /// The route, counting the Genesys notification channels created through it.
    pub(crate) fn watching_channels(mut self, watch: ChannelWatch) -> Route {
        self.channels = Some(Arc::new(watch));
        self
    }

    /// The route, injecting with `injector` into what it forwards.
    pub(crate) fn injecting(mut self, injector: Injector) -> Route {
        self.inject = Some(Arc::new(injector));
        self
    }
}

/// Sends a request to the route its path selects, then to that route's token path or forwarder.
#[derive(Debug, Clone)]
pub(crate) struct Dispatch(Arc<[Route]>);

/// The request's URI with `path` for its path; the query stays.
fn with_path(uri: &Uri, path: &str) -> Uri {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(path_and_query).ok();
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// HTTP/2 callers name the host in `:authority`, not `Host`; as an HTTP/1.1 hop must (RFC 9113
/// §8.3.1), it becomes the `Host` header, so `preserve_host` and the key see h2 and HTTP/1.1
/// callers alike.
fn host_from_authority<B>(request: &mut Request<B>) {
    if request.headers().contains_key(header::HOST) {
        return;
    }
    let host = request
        .uri()
        .authority()
        .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok());
    if let Some(host) = host {
        request.headers_mut().insert(header::HOST, host);
    }
}

impl tower::Service<Request<Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        host_from_authority(&mut request);
        let routes = self.0.clone();
        let target = match Target::of(&routes, request.uri().path()) {
            Ok(target) => target,
            Err(error) => return Box::pin(async move { Ok(error.into_response()) }),
        };
        if let Some(path) = target.rewrite {
            *request.uri_mut() = with_path(request.uri(), &path);
        }
        let route = &routes[target.route];
        // Two boxes sized for their own path: a token hit does not carry the state of a forward.
        if target.token {
            Box::pin(async move { Ok(routes[target.route].token.handle(request).await) })
        } else if let Some(watch) = route.channels.clone()
            && crate::channels::creates_channel(request.method(), request.uri().path())
        {
            let route = route.clone();
            Box::pin(async move { Ok(route.create_channel(&watch, request).await) })
        } else if let Some(injector) = route.inject.clone() {
            let forwarder = route.forwarder.clone();
            Box::pin(async move { Ok(injector.forward(&forwarder, request).await) })
        } else {
            let forwarder = route.forwarder.clone();
            Box::pin(async move { Ok(forwarder.forward(request.map(boxed)).await) })
        }
    }
}

impl Route {
    /// Forwards a request that creates a Genesys notification channel (injecting if the route
    /// does), and counts the channel against its client when the API answers 2xx.
    async fn create_channel(
        &self,
        watch: &ChannelWatch,
        request: Request<Incoming>,
    ) -> Response<Body> {
        let client = match &self.inject {
            Some(injector) if injector.injects(request.headers()) => Some(injector.client()),
            _ => request
                .headers()
                .get(header::AUTHORIZATION)
                .map(|value| crate::channels::digest(value.as_bytes())),
        };
        let response = match &self.inject {
            Some(injector) => injector.forward(&self.forwarder, request).await,
            None => self.forwarder.forward(request.map(boxed)).await,
        };
        if let Some(client) = client
            && response.status().is_success()
        {
            watch.created(client, tokio::time::Instant::now());
        }
        response
    }
}

/// Where a request goes: chosen by its path's match key (see [`crate::path`]), never by its
/// spelling.
struct Target {
    /// Index of the route, in the listener's order (longest prefix first).
    route: usize,
    /// Whether the path is one of the route's token paths.
    token: bool,
    /// The path to send instead of the caller's: the route's own spelling of a token path, or
    /// the normal form (without a stripped prefix) where it differs from what the caller sent.
    rewrite: Option<String>,
}

impl Target {
    fn of(routes: &[Route], path: &str) -> Result<Target, Error> {
        let normal = crate::path::normalise(path).map_err(Error::InvalidRequest)?;
        let key = crate::path::match_key(&normal);
        // Sorted longest prefix first, so the first that covers the path is the longest.
        let route = routes
            .iter()
            .position(|route| crate::path::covers(&route.prefix_key, &key))
            .ok_or(Error::NoRoute)?;
        let (rest, rest_key) = match routes[route].strip {
            true => {
                let rest = crate::path::strip_segments(&normal, routes[route].prefix_segments);
                (rest, crate::path::match_key(rest))
            }
            false => (&*normal, key),
        };
        if let Some(token_path) = routes[route].token.token_path(&rest_key) {
            let rewrite = (token_path != path).then(|| token_path.to_owned());
            return Ok(Target {
                route,
                token: true,
                rewrite,
            });
        }
        let rewrite = (rest != path).then(|| rest.to_owned());
        Ok(Target {
            route,
            token: false,
            rewrite,
        })
    }
}

/// What a panicking request answers: the one 500 of [`Error::Internal`], nothing of the panic.
pub(crate) type PanicHandler = fn(Box<dyn Any + Send + 'static>) -> Response<Body>;

fn internal_error(_: Box<dyn Any + Send + 'static>) -> Response<Body> {
    Error::Internal.into_response()
}

/// The service that answers one listener.
pub(crate) type ListenerService = CatchPanic<Dispatch, PanicHandler>;

/// Builds the service of one listener from its routes.
pub(crate) fn listener_service(mut routes: Vec<Route>) -> ListenerService {
    routes.sort_by_key(|route| std::cmp::Reverse(route.prefix_key.len()));
    ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(internal_error as PanicHandler))
        .service(Dispatch(routes.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http2_authority_becomes_the_host_header() {
        let mut h2 = Request::get("http://tenant-a.example/oauth/token")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        host_from_authority(&mut h2);
        assert_eq!(h2.headers()[header::HOST], "tenant-a.example");
        let mut h1 = Request::get("http://ignored/x")
            .header(header::HOST, "given")
            .body(())
            .unwrap();
        host_from_authority(&mut h1);
        assert_eq!(h1.headers()[header::HOST], "given");
    }

    fn covers(prefix: &str, path: &str) -> bool {
        let normal = crate::path::normalise(path).unwrap();
        crate::path::covers(prefix, &crate::path::match_key(&normal))
    }

    fn strip(prefix: &str, path: &str) -> String {
        crate::path::strip_segments(path, crate::path::segments(prefix)).to_owned()
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(covers("/", "/anything"));
        assert!(covers("/api", "/api"));
        assert!(covers("/api", "/api/"));
        assert!(covers("/api", "/api/v2/users"));
        assert!(!covers("/api", "/apix"));
        assert!(!covers("/api", "/ap"));
        assert!(!covers("/api/v2", "/api/api/v2"));
    }

    #[test]
    fn stripping_leaves_a_path_that_starts_with_a_slash_and_keeps_the_query() {
        assert_eq!(strip("/login", "/login/oauth/token"), "/oauth/token");
        assert_eq!(strip("/login", "/login"), "/");
        assert_eq!(strip("/", "/oauth/token"), "/oauth/token");
        let uri: Uri = "/api/api/v2/users/me?expand=x".parse().unwrap();
        assert_eq!(
            with_path(&uri, &strip("/api", uri.path())).to_string(),
            "/api/v2/users/me?expand=x"
        );
        let absolute: Uri = "http://sidecar:8080/login/oauth/token".parse().unwrap();
        assert_eq!(
            with_path(&absolute, &strip("/login", absolute.path())).to_string(),
            "http://sidecar:8080/oauth/token"
        );
    }
}
