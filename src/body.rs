//! The one HTTP body type used across the sidecar: a boxed body, so cached token bytes, streamed
//! upstream bodies and error JSON all travel through the same service signature.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// Errors inside a body stream, boxed because they come from hyper, timeouts or limits.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the sidecar handles.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body made of bytes already in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose errors can be boxed.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}
