//! Rendering token-path answers: a cached token with the remaining lifetime and the RFC 6749 §5.1
//! cache headers, an upstream answer as it came, or the sidecar's own error; each with a typed
//! RFC 9211 `Cache-Status` saying what happened.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use tokio::time::Instant;

use super::entry::FlightResult;
use super::lifetime::Token;
use crate::body::{Body, full, pieces};
use crate::error::Error;
use crate::upstream::Reply;

const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How a flight's caller got its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fetch {
    /// Nothing was cached.
    Miss,
    /// The cached token was past its safety margin.
    Stale,
}

/// What a flight brought back, as `Cache-Status` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// A token, now stored.
    Token,
    /// Another pod's token from the fleet tier, now stored: no provider call.
    Fleet,
    /// The provider's answer, passed through with its status.
    Reply(StatusCode),
    /// No usable answer: the sidecar's own error, by its RFC 6749 code.
    Failed(&'static str),
}

/// The `Cache-Status` of a token-path response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheStatus {
    /// Served from the cache, with `ttl` whole seconds of serving left.
    Hit { ttl: u64 },
    /// A remembered answer replayed.
    Remembered,
    /// Refused: the client id is cooling down.
    Cooldown,
    /// Not cacheable: forwarded unchanged.
    Bypass,
    /// The request was malformed.
    Invalid,
    /// Refused: the cache had no room for a new key.
    Full,
    /// Answered by an upstream call; `collapsed` when another request led it.
    Fetched {
        fetch: Fetch,
        fetched: Fetched,
        collapsed: bool,
    },
}

impl std::fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("token-sidecar; ")?;
        match *self {
            CacheStatus::Hit { ttl } => write!(f, "hit; ttl={ttl}"),
            CacheStatus::Remembered => f.write_str("hit; detail=remembered"),
            CacheStatus::Cooldown => f.write_str("detail=cooldown"),
            CacheStatus::Bypass => f.write_str("fwd=bypass"),
            CacheStatus::Invalid => f.write_str("detail=invalid-request"),
            CacheStatus::Full => f.write_str("detail=cache-full"),
            CacheStatus::Fetched {
                fetch,
                fetched,
                collapsed,
            } => {
                f.write_str(match fetch {
                    Fetch::Miss => "fwd=miss",
                    Fetch::Stale => "fwd=stale",
                })?;
                match fetched {
                    Fetched::Token if collapsed => f.write_str("; fwd-status=200")?,
                    Fetched::Token => f.write_str("; fwd-status=200; stored")?,
                    Fetched::Fleet if collapsed => f.write_str("; detail=fleet")?,
                    Fetched::Fleet => f.write_str("; detail=fleet; stored")?,
                    Fetched::Reply(status) => write!(f, "; fwd-status={}", status.as_u16())?,
                    Fetched::Failed(code) => write!(f, "; detail={code}")?,
                }
                if collapsed {
                    f.write_str("; collapsed")?;
                }
                Ok(())
            }
        }
    }
}

impl CacheStatus {
    fn header(self) -> HeaderValue {
        let text = match self {
            // The hit path's, on every hit: written without the formatting machinery.
            CacheStatus::Hit { ttl } => {
                const HIT: &str = "token-sidecar; hit; ttl=";
                let mut digits = itoa::Buffer::new();
                let digits = digits.format(ttl);
                let mut text = String::with_capacity(HIT.len() + digits.len());
                text.push_str(HIT);
                text.push_str(digits);
                text
            }
            other => other.to_string(),
        };
        // Every rendering is ASCII (the test below renders each); a bare name if one were not.
        HeaderValue::from_maybe_shared(Bytes::from(text))
            .unwrap_or_else(|_| HeaderValue::from_static("token-sidecar"))
    }
}

/// Adds `status` to a response.
pub(crate) fn with_status(mut response: Response<Body>, status: CacheStatus) -> Response<Body> {
    response.headers_mut().insert(CACHE_STATUS, status.header());
    response
}

/// A token with its remaining lifetime at `now`, sent as the token's own bytes around the digits.
pub(crate) fn token(token: &Token, now: Instant, status: CacheStatus) -> Response<Body> {
    let mut response = Response::new(pieces(token.pieces(now)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, token.content_type.clone());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    with_status(response, status)
}

/// An upstream answer as it came.
pub(crate) fn reply(reply: &Reply, status: CacheStatus) -> Response<Body> {
    let mut response = Response::new(full(reply.body.clone()));
    *response.status_mut() = reply.status;
    *response.headers_mut() = reply.headers.clone();
    with_status(response, status)
}

/// The sidecar's own error.
pub(crate) fn error(error: Error, status: CacheStatus) -> Response<Body> {
    with_status(error.into_response(), status)
}

/// What a flight's caller gets: the flight's outcome, fetched as `fetch`; `collapsed` when
/// another request led the flight.
pub(crate) fn landed(
    shared: FlightResult,
    fetch: Fetch,
    collapsed: bool,
    now: Instant,
) -> Response<Body> {
    let status = |fetched| CacheStatus::Fetched {
        fetch,
        fetched,
        collapsed,
    };
    match shared {
        FlightResult::Token(t) => {
            let fetched = if t.from_fleet {
                Fetched::Fleet
            } else {
                Fetched::Token
            };
            token(&t, now, status(fetched))
        }
        FlightResult::Reply(r) => reply(&r, status(Fetched::Reply(r.status))),
        FlightResult::Failed(e) => {
            let code = e.code();
            error(e, status(Fetched::Failed(code)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cache_status_renders_as_documented() {
        let fetched = |fetch, fetched, collapsed| CacheStatus::Fetched {
            fetch,
            fetched,
            collapsed,
        };
        for (status, text) in [
            (CacheStatus::Hit { ttl: 42 }, "token-sidecar; hit; ttl=42"),
            (
                CacheStatus::Remembered,
                "token-sidecar; hit; detail=remembered",
            ),
            (CacheStatus::Cooldown, "token-sidecar; detail=cooldown"),
            (CacheStatus::Bypass, "token-sidecar; fwd=bypass"),
            (
                CacheStatus::Invalid,
                "token-sidecar; detail=invalid-request",
            ),
            (
                fetched(Fetch::Miss, Fetched::Token, false),
                "token-sidecar; fwd=miss; fwd-status=200; stored",
            ),
            (
                fetched(Fetch::Stale, Fetched::Token, false),
                "token-sidecar; fwd=stale; fwd-status=200; stored",
            ),
            (
                fetched(Fetch::Miss, Fetched::Token, true),
                "token-sidecar; fwd=miss; fwd-status=200; collapsed",
            ),
            (
                fetched(Fetch::Miss, Fetched::Fleet, false),
                "token-sidecar; fwd=miss; detail=fleet; stored",
            ),
            (
                fetched(Fetch::Stale, Fetched::Fleet, true),
                "token-sidecar; fwd=stale; detail=fleet; collapsed",
            ),
            (
                fetched(
                    Fetch::Miss,
                    Fetched::Reply(StatusCode::TOO_MANY_REQUESTS),
                    false,
                ),
                "token-sidecar; fwd=miss; fwd-status=429",
            ),
            (
                fetched(Fetch::Miss, Fetched::Reply(StatusCode::UNAUTHORIZED), true),
                "token-sidecar; fwd=miss; fwd-status=401; collapsed",
            ),
            (
                fetched(Fetch::Miss, Fetched::Failed("server_error"), false),
                "token-sidecar; fwd=miss; detail=server_error",
            ),
            (
                fetched(
                    Fetch::Stale,
                    Fetched::Failed("temporarily_unavailable"),
                    true,
                ),
                "token-sidecar; fwd=stale; detail=temporarily_unavailable; collapsed",
            ),
        ] {
            assert_eq!(status.to_string(), text);
            assert_eq!(status.header(), text);
        }
    }
}
