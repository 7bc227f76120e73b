//! The provider's call log: one row per token call (when it arrived and was answered, the client
//! id it presented, the status, the `Retry-After` and the access token it was given), kept up to
//! a bound. A benchmark lines its clients' clocks up with the provider's calls through it, and
//! checks every token a client was served against the call that issued it.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;

/// One token call as the provider answered it.
#[derive(Clone, Debug)]
pub struct Call {
    /// When the call's head arrived, on the provider's clock ([`super::Provider::clock`]).
    pub arrived: Duration,
    /// When its answer was ready, or the connection given up, on the same clock.
    pub answered: Duration,
    /// The client id the call presented (HTTP Basic or the form), if any.
    pub client_id: Option<String>,
    /// The status answered; `None` when the connection was closed without an answer.
    pub status: Option<StatusCode>,
    /// The answer's `Retry-After`, verbatim.
    pub retry_after: Option<String>,
    /// The access token the answer issued, if it issued one.
    pub access_token: Option<String>,
}

/// Set on an answer that issues an access token, so the log can name the token without reading
/// the body back.
#[derive(Clone, Debug)]
pub(super) struct IssuedToken(pub(super) String);

/// Calls in the order they were answered, at most `limit` of them (0, the default: none kept).
#[derive(Debug, Default)]
pub(super) struct CallLog {
    rows: Vec<Call>,
    limit: usize,
}

impl CallLog {
    pub(super) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Keeps the call of `answer` if the bound allows.
    pub(super) fn push(
        &mut self,
        (arrived, answered): (Duration, Duration),
        client_id: Option<String>,
        answer: &io::Result<Response<Full<Bytes>>>,
    ) {
        if self.rows.len() >= self.limit {
            return;
        }
        let response = answer.as_ref().ok();
        self.rows.push(Call {
            arrived,
            answered,
            client_id,
            status: response.map(Response::status),
            retry_after: response
                .and_then(|r| r.headers().get(header::RETRY_AFTER))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            access_token: response
                .and_then(|r| r.extensions().get::<IssuedToken>())
                .map(|issued| issued.0.clone()),
        });
    }

    pub(super) fn rows(&self) -> Vec<Call> {
        self.rows.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_keeps_status_retry_after_and_token_up_to_the_bound() {
        let mut log = CallLog::default();
        let times = (Duration::from_millis(1), Duration::from_millis(2));
        let mut answer = Response::new(Full::new(Bytes::new()));
        answer.extensions_mut().insert(IssuedToken("tok-1".into()));
        log.push(times, Some("a".into()), &Ok(answer));
        assert!(
            log.rows().is_empty(),
            "nothing is kept before a limit is set"
        );

        log.set_limit(2);
        let mut answer = Response::new(Full::new(Bytes::new()));
        answer.extensions_mut().insert(IssuedToken("tok-1".into()));
        log.push(times, Some("a".into()), &Ok(answer));
        let mut throttled = Response::new(Full::new(Bytes::new()));
        *throttled.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let retry_after = http::HeaderValue::from_static("1");
        throttled
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after);
        log.push(times, None, &Ok(throttled));
        log.push(times, None, &Err(io::Error::other("dropped")));

        let rows = log.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].client_id.as_deref(), Some("a"));
        assert_eq!(rows[0].status, Some(StatusCode::OK));
        assert_eq!(rows[0].access_token.as_deref(), Some("tok-1"));
        assert_eq!(rows[1].status, Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(rows[1].retry_after.as_deref(), Some("1"));
        assert_eq!(rows[1].access_token, None);
    }
}
