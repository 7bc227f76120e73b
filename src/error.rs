//! The one error type of the request path, classified by where the fault lies (the local caller,
//! the upstream provider, or the sidecar itself), and the one place that turns an error into an
//! HTTP response: RFC 6749 §5.2 JSON, never carrying internals, secrets or tokens.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{Body, full};

/// Where the fault for an error lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The local caller sent something wrong.
    Caller,
    /// The provider was unreachable, silent, throttling or unusable.
    Upstream,
    /// A bug in the sidecar.
    Sidecar,
}

impl Fault {
    /// A log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Caller => "caller",
            Fault::Upstream => "upstream",
            Fault::Sidecar => "sidecar",
        }
    }
}

/// Who is holding a client's token calls back, so a refusal says what really happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldBy {
    /// The provider answered 429 or 503 (with or without `Retry-After`).
    Provider,
    /// The provider failed, could not be reached, or sent an unusable answer: the sidecar backs
    /// off.
    Backoff,
    /// The route's own outbound limits (`max_concurrent_calls`, `calls_per_second`).
    OwnLimit,
}

/// Everything that can go wrong while answering a request.
#[derive(Debug, Clone)]
pub enum Error {
    // The caller's fault.
    /// A method other than POST on a token path.
    MethodNotAllowed,
    /// A token request whose body is not a form.
    UnsupportedMediaType,
    /// A body over the configured limit.
    PayloadTooLarge { limit: usize },
    /// A token request body that did not arrive within the body read timeout.
    BodyTimeout,
    /// A malformed form or Authorization header; the text names the field, never its value.
    InvalidRequest(&'static str),
    /// A parameter given twice (RFC 6749 §3.2).
    DuplicateParameter(String),
    /// No route of the listener serves the request's path.
    NoRoute,
    /// The client's token calls are held back for this long, by `by`.
    CoolingDown { retry_after_secs: u64, by: HeldBy },

    // The upstream's fault.
    /// Could not connect, or the connection broke.
    UpstreamUnavailable,
    /// The upstream did not answer within the configured time.
    UpstreamTimeout,
    /// The upstream's token response is unusable (not JSON, no token, bad `expires_in`, too big).
    UpstreamInvalid(&'static str),
    /// The caller waited longer than the wait timeout for a coalesced upstream call.
    WaitTimeout,

    // Ours.
    /// The route's cache is full of calls in progress and tokens in use: a new key must wait.
    CacheFull,
    /// The shutdown grace ended while the caller was waiting.
    ShuttingDown,
    /// A bug: a task died or an invariant broke.
    Internal,
}

impl Error {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::InvalidRequest(_) | Error::DuplicateParameter(_) => StatusCode::BAD_REQUEST,
            Error::NoRoute => StatusCode::NOT_FOUND,
            Error::CoolingDown { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::UpstreamUnavailable | Error::UpstreamInvalid(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout | Error::WaitTimeout => StatusCode::GATEWAY_TIMEOUT,
            Error::CacheFull | Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The RFC 6749 `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::MethodNotAllowed
            | Error::UnsupportedMediaType
            | Error::PayloadTooLarge { .. }
            | Error::BodyTimeout
            | Error::InvalidRequest(_)
            | Error::DuplicateParameter(_)
            | Error::NoRoute => "invalid_request",
            Error::CoolingDown { .. }
            | Error::UpstreamUnavailable
            | Error::UpstreamTimeout
            | Error::WaitTimeout
            | Error::CacheFull
            | Error::ShuttingDown => "temporarily_unavailable",
            Error::UpstreamInvalid(_) | Error::Internal => "server_error",
        }
    }

    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Error::MethodNotAllowed
            | Error::UnsupportedMediaType
            | Error::PayloadTooLarge { .. }
            | Error::BodyTimeout
            | Error::InvalidRequest(_)
            | Error::DuplicateParameter(_)
            | Error::NoRoute => Fault::Caller,
            Error::CoolingDown { .. }
            | Error::UpstreamUnavailable
            | Error::UpstreamTimeout
            | Error::UpstreamInvalid(_)
            | Error::WaitTimeout => Fault::Upstream,
            Error::CacheFull | Error::ShuttingDown | Error::Internal => Fault::Sidecar,
        }
    }

    /// Renders the error as an OAuth-style JSON response.
    pub fn into_response(self) -> Response<Body> {
        let mut response = oauth_json(self.status(), self.code(), &self.to_string());
        let headers = response.headers_mut();
        match self {
            Error::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            Error::CoolingDown {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            Error::CacheFull => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            _ => {}
        }
        response
    }
}

/// An OAuth-style JSON error (RFC 6749 §5.2): `status`, `{"error": code, "error_description":
/// description}`, never stored by caches.
pub(crate) fn oauth_json(status: StatusCode, code: &str, description: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": code,
        "error_description": description,
    });
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// Token request parameters whose names are safe to repeat back to a caller.
const KNOWN_PARAMETERS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "audience",
    "resource",
    "refresh_token",
    "code",
    "redirect_uri",
    "code_verifier",
    "username",
    "password",
    "client_assertion",
    "client_assertion_type",
    "assertion",
    "device_code",
    "subject_token",
    "subject_token_type",
    "requested_token_type",
];

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::MethodNotAllowed => f.write_str("the token endpoint accepts POST only"),
            Error::UnsupportedMediaType => {
                f.write_str("token requests must be application/x-www-form-urlencoded")
            }
            Error::PayloadTooLarge { limit } => {
                write!(f, "request body is larger than the limit of {limit} bytes")
            }
            Error::InvalidRequest(what) => f.write_str(what),
            Error::BodyTimeout => f.write_str("the request body did not arrive in time"),
            Error::NoRoute => f.write_str("no route of this listener serves this path"),
            Error::DuplicateParameter(name) => {
                // Named only when it is a known OAuth parameter: an unknown "name" may be a
                // fragment of a secret that held an unescaped `&`.
                if KNOWN_PARAMETERS.contains(&name.as_str()) {
                    write!(f, "parameter {name:?} is included more than once")
                } else {
                    f.write_str("a parameter is included more than once")
                }
            }
            Error::CoolingDown {
                retry_after_secs,
                by,
            } => {
                f.write_str(match by {
                    HeldBy::Provider => "the identity provider asked to wait",
                    HeldBy::Backoff => {
                        "the identity provider failed or could not be reached, so the sidecar is backing off"
                    }
                    HeldBy::OwnLimit => "the sidecar's outbound limit for this route is reached",
                })?;
                write!(f, "; retry after {retry_after_secs} s")
            }
            Error::UpstreamUnavailable => f.write_str("the identity provider is unreachable"),
            Error::UpstreamTimeout => f.write_str("the identity provider did not answer in time"),
            Error::UpstreamInvalid(why) => {
                write!(
                    f,
                    "the identity provider sent an unusable token response: {why}"
                )
            }
            Error::WaitTimeout => f.write_str("timed out waiting for the identity provider"),
            Error::CacheFull => f.write_str(
                "the sidecar's token cache is full of calls in progress and tokens in use; retry after 1 s",
            ),
            Error::ShuttingDown => {
                f.write_str("the sidecar is shutting down; retry on a new connection")
            }
            Error::Internal => f.write_str("internal error in token-sidecar"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_oauth_json_with_no_store() {
        for err in [
            Error::MethodNotAllowed,
            Error::PayloadTooLarge { limit: 10 },
            Error::CoolingDown {
                retry_after_secs: 7,
                by: HeldBy::Provider,
            },
            Error::UpstreamInvalid("not JSON"),
            Error::Internal,
        ] {
            let resp = err.clone().into_response();
            assert_eq!(resp.status(), err.status());
            assert_eq!(resp.headers()["cache-control"], "no-store");
            assert_eq!(resp.headers()["content-type"], "application/json");
        }
        let resp = Error::CoolingDown {
            retry_after_secs: 7,
            by: HeldBy::OwnLimit,
        }
        .into_response();
        assert_eq!(resp.headers()["retry-after"], "7");
        assert_eq!(
            Error::MethodNotAllowed.into_response().headers()["allow"],
            "POST"
        );
    }

    #[test]
    fn a_refusal_says_who_holds_the_call_back() {
        let text = |by| {
            Error::CoolingDown {
                retry_after_secs: 3,
                by,
            }
            .to_string()
        };
        assert_eq!(
            text(HeldBy::Provider),
            "the identity provider asked to wait; retry after 3 s"
        );
        assert!(text(HeldBy::Backoff).contains("backing off"));
        assert!(text(HeldBy::OwnLimit).contains("outbound limit"));
        for by in [HeldBy::Backoff, HeldBy::OwnLimit] {
            assert!(!text(by).contains("asked to wait"), "{by:?}");
        }
    }
}
