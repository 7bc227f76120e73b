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
use crate::error::Error;
use crate::forward::Forwarder;
use crate::token::TokenRoute;

/// One route's running parts, as the dispatcher sees them.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) prefix: String,
    pub(crate) strip: bool,
    pub(crate) token: Arc<TokenRoute>,
    pub(crate) forwarder: Arc<Forwarder>,
}

/// Sends a request to the route its path selects, then to that route's token path or forwarder.
#[derive(Debug, Clone)]
pub(crate) struct Dispatch(Arc<[Route]>);

/// Whether `prefix` covers `path`, on a segment boundary.
fn covers(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `path` without `prefix`, always starting with `/`.
fn strip<'a>(prefix: &str, path: &'a str) -> &'a str {
    match path.get(prefix.len()..) {
        Some(rest) if prefix != "/" && !rest.is_empty() => rest,
        Some(_) if prefix != "/" => "/",
        _ => path,
    }
}

/// The request's URI with `prefix` removed from its path; the query stays.
fn stripped_uri(uri: &Uri, prefix: &str) -> Uri {
    let path = strip(prefix, uri.path());
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
        let path = request.uri().path();
        // Sorted longest prefix first, so the first that covers the path is the longest.
        let Some(index) = routes.iter().position(|route| covers(&route.prefix, path)) else {
            return Box::pin(async { Ok(Error::NoRoute.into_response()) });
        };
        if routes[index].strip {
            *request.uri_mut() = stripped_uri(request.uri(), &routes[index].prefix);
        }
        // Two boxes sized for their own path: a token hit does not carry the state of a forward.
        if routes[index].token.is_token_path(request.uri().path()) {
            Box::pin(async move { Ok(routes[index].token.handle(request).await) })
        } else {
            Box::pin(async move { Ok(routes[index].forwarder.forward(request.map(boxed)).await) })
        }
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
    routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
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
            stripped_uri(&uri, "/api").to_string(),
            "/api/v2/users/me?expand=x"
        );
        let absolute: Uri = "http://sidecar:8080/login/oauth/token".parse().unwrap();
        assert_eq!(
            stripped_uri(&absolute, "/login").to_string(),
            "http://sidecar:8080/oauth/token"
        );
    }
}
