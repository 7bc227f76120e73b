//! The one place requests are dispatched: a route's token paths go to its token cache, every
//! other request is forwarded. The tower stack around it turns a panic into a 500 instead of a
//! dropped connection.

use http::{Request, Response};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use tower_http::catch_panic::CatchPanicLayer;

use crate::body::boxed;
use crate::forward::Forwarder;
use crate::token::TokenRoute;

/// The body of a route's responses: the catch-panic layer's own boxed body, so a response is
/// boxed once on its way out, not twice.
pub type RouteBody = tower_http::body::UnsyncBoxBody<bytes::Bytes, crate::body::BoxError>;

/// The service that answers one route's listener.
pub type RouteService = BoxCloneSyncService<Request<Incoming>, Response<RouteBody>, Infallible>;

/// Builds the service of one route.
pub fn route_service(token: Arc<TokenRoute>, forwarder: Arc<Forwarder>) -> RouteService {
    let dispatch = tower::service_fn(move |request: Request<Incoming>| {
        let token = token.clone();
        let forwarder = forwarder.clone();
        async move {
            let response = if token.is_token_path(request.uri().path()) {
                token.handle(request).await
            } else {
                forwarder.forward(request.map(boxed)).await
            };
            Ok::<_, Infallible>(response)
        }
    });
    let stack = ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(|_| {
            crate::error::Error::Internal.into_response()
        }))
        .service(dispatch);
    BoxCloneSyncService::new(stack)
}
