//! The one HTTP body type used across the sidecar: a boxed body, so cached token bytes, streamed
//! upstream bodies and error JSON all travel through the same service signature.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// Errors inside a body stream, boxed because they come from hyper, timeouts or limits.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the sidecar handles.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body made of bytes already in memory.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of a few pieces already in memory, sent in order without joining them (hyper writes
/// them with one vectored write).
pub(crate) fn pieces<const N: usize>(pieces: [Bytes; N]) -> Body {
    Pieces {
        remaining: pieces.iter().map(|p| p.len() as u64).sum(),
        pieces: pieces.into_iter(),
    }
    .boxed_unsync()
}

struct Pieces<const N: usize> {
    pieces: std::array::IntoIter<Bytes, N>,
    remaining: u64,
}

impl<const N: usize> http_body::Body for Pieces<N> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let next = self.pieces.find(|piece| !piece.is_empty());
        if let Some(piece) = &next {
            self.remaining -= piece.len() as u64;
        }
        std::task::Poll::Ready(next.map(|piece| Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// An empty body.
pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose errors can be boxed.
pub(crate) fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[tokio::test]
    async fn pieces_arrive_in_order_with_an_exact_length() {
        let body = pieces([
            Bytes::from_static(b"{\"expires_in\":"),
            Bytes::new(),
            Bytes::from_static(b"59}"),
        ]);
        assert_eq!(body.size_hint().exact(), Some(17));
        assert!(!body.is_end_stream());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"{\"expires_in\":59}");
        assert!(pieces([Bytes::new()]).is_end_stream());
    }
}
