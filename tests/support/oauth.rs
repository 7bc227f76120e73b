//! What the sidecar's token-endpoint answers must look like: an access token (RFC 6749 §5.1),
//! an error in the §5.2 JSON shape, a local cool-down with its `Retry-After`, and the
//! `Cache-Status` that says where an answer came from.

use std::time::Duration;

use super::Reply;

/// The `Cache-Status` header, or a panic naming the response.
pub fn cache_status(reply: &Reply) -> String {
    reply
        .header("cache-status")
        .unwrap_or_else(|| panic!("no Cache-Status: {} {:?}", reply.status, reply.headers))
}

/// The access token of a 200 answer, or a panic naming the response.
pub fn access_token(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "expected a token, got {}", reply.text());
    reply.json()["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {}", reply.text()))
        .to_owned()
}

/// `expires_in` as an integer, or a panic naming the response.
pub fn expires_in(reply: &Reply) -> u64 {
    reply.json()["expires_in"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer expires_in in {}", reply.text()))
}

/// Asserts an RFC 6749 §5.2 error response with this status and `error` code.
pub fn assert_oauth_error(reply: &Reply, status: u16, error: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json"),
        "{:?}",
        reply.headers
    );
    assert_eq!(reply.json()["error"], error, "{}", reply.text());
}

/// `Retry-After` as whole seconds.
pub fn retry_after(reply: &Reply) -> u64 {
    let value = reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {} {:?}", reply.status, reply.headers));
    value
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {value:?} is not delay-seconds"))
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Asserts a local cool-down answer: 429, OAuth JSON, and `1 <= Retry-After <= ceil(at_most)`.
pub fn assert_cooling_down(reply: &Reply, at_most: Duration) {
    assert_oauth_error(reply, 429, "temporarily_unavailable");
    let seconds = retry_after(reply);
    assert!(
        seconds >= 1 && seconds <= ceil_secs(at_most),
        "Retry-After {seconds} outside 1..={} s",
        ceil_secs(at_most)
    );
}
