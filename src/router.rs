//! The one place requests are dispatched: a route's token paths go to its token cache, every
//! other request is forwarded. The tower stack around it turns a panic into a 500 instead of a
//! dropped connection.
//!
//! The stack is built from named types rather than boxed services, so a request costs no
//! service clone on the heap: the dispatcher is one `Arc`.

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

/// Sends a request to the token path or the forwarder of one route.
#[derive(Debug, Clone)]
pub(crate) struct Dispatch(Arc<Route>);

/// What one route's requests go to. Behind a single `Arc`, because the service is cloned for every
/// request and each reference count it touches is shared by every worker thread.
#[derive(Debug)]
struct Route {
    token: Arc<TokenRoute>,
    forwarder: Arc<Forwarder>,
}

impl tower::Service<Request<Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        // Two boxes sized for their own path: a token hit does not carry the state of a forward.
        let route = self.0.clone();
        if route.token.is_token_path(request.uri().path()) {
            Box::pin(async move { Ok(route.token.handle(request).await) })
        } else {
            Box::pin(async move { Ok(route.forwarder.forward(request.map(boxed)).await) })
        }
    }
}

/// What a panicking request answers: the one 500 of [`Error::Internal`], nothing of the panic.
pub(crate) type PanicHandler = fn(Box<dyn Any + Send + 'static>) -> Response<Body>;

fn internal_error(_: Box<dyn Any + Send + 'static>) -> Response<Body> {
    Error::Internal.into_response()
}

/// The service that answers one route's listener.
pub(crate) type RouteService = CatchPanic<Dispatch, PanicHandler>;

/// Builds the service of one route.
pub(crate) fn route_service(token: Arc<TokenRoute>, forwarder: Arc<Forwarder>) -> RouteService {
    ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(internal_error as PanicHandler))
        .service(Dispatch(Arc::new(Route { token, forwarder })))
}
