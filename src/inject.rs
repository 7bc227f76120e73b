//! Credential injection (`[routes.inject]`): the route holds a client's credentials and adds
//! `Authorization: Bearer` to the requests it forwards, so the apps behind it never call the
//! token endpoint. The token comes from the token path of the route that serves the token URL
//! (or of a route made for it), through [`TokenRoute::internal`]: the same key as an app sending
//! those credentials there, and so the same cache, single flight, refresh ahead, holds and fleet
//! tier. An upstream 401 (or a 403 saying `invalid_token`) drops that token if it is still the
//! cached one and retries the request once with a new one, when the request can be sent again.
//! Without a token to be had, the caller gets 429 or 503 with `Retry-After`, and nothing is
//! forwarded. The route's own bearer is kept for up to [`MEMO`] (never past half the token's
//! remaining life) so that a busy route asks its token path once a second, not once a call.

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;

use crate::body::{Body, boxed, full};
use crate::config::{AuthMethod, InjectConfig};
use crate::error::oauth_json;
use crate::forward::Forwarder;
use crate::token::TokenRoute;

/// One route's injection.
#[derive(Debug)]
pub(crate) struct Injector {
    route: String,
    /// The token path the bearer comes from.
    tokens: Arc<TokenRoute>,
    /// The token request, as an app would send it: its head...
    head: TokenHead,
    /// ...and its form.
    form: Bytes,
    overwrite: bool,
    /// Swap a caller's own Basic client credentials for that client's bearer.
    from_basic: bool,
    /// The token request's form without credentials, for a caller's Basic ones.
    bare_form: Bytes,
    /// The client's digest, for the Genesys channel count.
    client: [u8; 4],
    retry_body_limit: usize,
    /// How long a body kept for a retry may take to arrive (`limits.body_read_timeout`).
    body_read_timeout: std::time::Duration,
    /// The route's bearer as the token path last gave it, while it may be used without asking.
    memo: BearerMemo,
}

/// Longest a bearer is used without asking the token path again: a token the cache dropped (a
/// 401 elsewhere, a new one from the fleet) stops being sent within this.
const MEMO: Duration = Duration::from_secs(1);

/// The route's last bearer and until when it may be used without asking the token path, and the
/// last bearer an API rejected, which is never kept again (a caller that fetched it just before
/// the cache dropped it would otherwise keep it for another second).
#[derive(Debug, Default)]
struct BearerMemo(Mutex<Memo>);

#[derive(Debug, Default)]
struct Memo {
    kept: Option<(Bearer, Instant)>,
    rejected: Option<Arc<str>>,
}

impl BearerMemo {
    /// The bearer, if it may still be used at `now`.
    fn get(&self, now: Instant) -> Option<Bearer> {
        let memo = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        memo.kept
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(bearer, _)| bearer.clone())
    }

    /// Keeps `bearer` from `now` for [`MEMO`], or half the token's remaining life
    /// (`expires_in`, seconds) if that is shorter; not at all without one, nor if an API
    /// rejected it.
    fn put(&self, bearer: &Bearer, expires_in: Option<u64>, now: Instant) {
        let life = expires_in.map_or(Duration::ZERO, |s| Duration::from_secs(s) / 2);
        let mut memo = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if memo.rejected.as_ref() == Some(&bearer.token) {
            return;
        }
        memo.kept = Some((bearer.clone(), now + life.min(MEMO)));
    }

    /// Forgets `rejected` (an API refused it) and never keeps it again.
    fn forget(&self, rejected: &Bearer) {
        let mut memo = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if memo
            .kept
            .as_ref()
            .is_some_and(|(bearer, _)| bearer.token == rejected.token)
        {
            memo.kept = None;
        }
        memo.rejected = Some(rejected.token.clone());
    }
}

/// A token and its `Authorization` value.
#[derive(Debug, Clone)]
struct Bearer {
    token: Arc<str>,
    header: HeaderValue,
}

impl Bearer {
    fn new(token: &str) -> Option<Bearer> {
        let mut header = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        header.set_sensitive(true);
        Some(Bearer {
            token: Arc::from(token),
            header,
        })
    }
}

/// What the token request's head is made of (a `Parts` is not `Clone`).
#[derive(Debug)]
struct TokenHead {
    uri: http::Uri,
    headers: HeaderMap,
}

impl TokenHead {
    fn parts(&self) -> Parts {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request.into_parts().0
    }
}

/// What form encoding leaves as it is: letters, digits and `-._~`. Encoding no more than needed
/// keeps the Basic header of plain credentials free of `%`, so the token path keys it like the
/// same credentials sent in a form (it keys a Basic header with escapes on its raw bytes).
const FORM: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How the route's client authenticates its token requests: the headers (a Basic
/// `Authorization`) and the form parameters (`client_id` and `client_secret`) it takes.
fn credentials(config: &InjectConfig) -> (HeaderMap, Vec<String>) {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    let secret = config.client_secret.expose();
    match config.auth_method {
        AuthMethod::Basic => {
            let pair = format!("{}:{}", form_encode(&config.client_id), form_encode(secret));
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                .expect("base64 is a valid header value");
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
            (headers, Vec::new())
        }
        // With private_key_jwt the secret is a stand-in the token path keys by; the flight sends
        // a fresh assertion in its place (see `crate::assertion`).
        AuthMethod::Post | AuthMethod::PrivateKeyJwt => {
            let form = vec![
                format!("client_id={}", form_encode(&config.client_id)),
                format!("client_secret={}", form_encode(secret)),
            ];
            (headers, form)
        }
    }
}

/// RFC 6749 §2.3.1: the id and secret are form-encoded before they are joined for Basic.
fn form_encode(text: &str) -> String {
    utf8_percent_encode(text, FORM).to_string()
}

impl Injector {
    /// The injection of route `route` with `config`, its tokens from `tokens`; a body kept for a
    /// retry must arrive within `body_read_timeout`.
    pub(crate) fn new(
        route: &str,
        config: &InjectConfig,
        tokens: Arc<TokenRoute>,
        body_read_timeout: std::time::Duration,
    ) -> Injector {
        let (headers, credentials) = credentials(config);
        let params: Vec<String> = config
            .params
            .iter()
            .map(|(name, value)| format!("{}={}", form_encode(name), form_encode(value)))
            .collect();
        let grant = "grant_type=client_credentials".to_owned();
        let join = |parts: Vec<&String>| {
            Bytes::from(
                parts
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join("&"),
            )
        };
        let form = join(
            std::iter::once(&grant)
                .chain(&credentials)
                .chain(&params)
                .collect(),
        );
        // For a caller's own Basic credentials (`from_basic`): the same, without the route's.
        let bare_form = join(std::iter::once(&grant).chain(&params).collect());
        Injector {
            route: route.to_owned(),
            from_basic: config.from_basic,
            bare_form,
            tokens,
            head: TokenHead {
                uri: config
                    .token_path
                    .parse()
                    .unwrap_or_else(|_| http::Uri::from_static("/")),
                headers,
            },
            form,
            overwrite: config.overwrite,
            client: crate::channels::digest(config.client_id.as_bytes()),
            retry_body_limit: config.retry_body_limit,
            body_read_timeout,
            memo: BearerMemo::default(),
        }
    }

    /// Whether a request with these headers gets the route's bearer.
    pub(crate) fn injects(&self, headers: &HeaderMap) -> bool {
        self.overwrite || !headers.contains_key(header::AUTHORIZATION)
    }

    /// The token request for a request with these headers: the caller's own Basic client
    /// credentials (with `from_basic`), the route's (when it injects), or none (forwarded as it
    /// is).
    fn credentials(&self, headers: &HeaderMap) -> Option<TokenCall> {
        let authorization = headers.get(header::AUTHORIZATION);
        let basic = authorization.filter(|value| {
            value
                .as_bytes()
                .get(..6)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"basic "))
        });
        match basic {
            Some(basic) if self.from_basic => {
                let mut headers = self.head.headers.clone();
                headers.insert(header::AUTHORIZATION, basic.clone());
                let head = TokenHead {
                    uri: self.head.uri.clone(),
                    headers,
                };
                Some(TokenCall::Callers(Box::new(head), self.bare_form.clone()))
            }
            _ if self.injects(headers) => Some(TokenCall::Routes),
            _ => None,
        }
    }

    /// The head and form of `call`.
    fn token_request(&self, call: &TokenCall) -> (Parts, Bytes) {
        match call {
            TokenCall::Routes => (self.head.parts(), self.form.clone()),
            TokenCall::Callers(head, form) => (head.parts(), form.clone()),
        }
    }

    /// The injected client's digest (see [`crate::channels::digest`]).
    pub(crate) fn client(&self) -> [u8; 4] {
        self.client
    }

    /// Forwards `request` with the route's bearer (see the module's documentation).
    pub(crate) async fn forward(
        &self,
        forwarder: &Forwarder,
        request: Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        let Some(call) = self.credentials(request.headers()) else {
            return forwarder.forward(request.map(boxed)).await;
        };
        let token = match self.bearer(&call).await {
            Ok(token) => token,
            Err(refusal) => return refusal,
        };
        let (parts, body) = request.into_parts();
        let (parts, body) = match self.replayable(parts, body).await {
            Sending::Again(parts, body) => (parts, body),
            // Sent once, streamed: the first answer is the caller's, 401 or not.
            Sending::Once(parts, body) => {
                return forwarder
                    .forward(with_bearer_and(parts, &token, boxed(body)))
                    .await;
            }
            Sending::Broken(refusal) => return refusal,
        };
        let again = copy_head(&parts);
        let first = forwarder
            .forward(with_bearer_and(parts, &token, full(body.clone())))
            .await;
        if !rejects_token(&first) {
            return first;
        }
        // Compare-and-drop: of many callers rejected with this token, one drops it, and they
        // all share the one call for the next.
        self.memo.forget(&token);
        let (head, form) = self.token_request(&call);
        self.tokens.revoke(&head, &form, &token.token).await;
        let fresh = match self.bearer(&call).await {
            Ok(fresh) if fresh.token != token.token => fresh,
            _ => return first,
        };
        debug!(route = %self.route, "upstream rejected the injected token: retried with a new one");
        forwarder
            .forward(with_bearer_and(again, &fresh, full(body)))
            .await
    }

    /// The bearer token now, or the caller's refusal: 429 when the provider throttles, 401 when
    /// it refuses a caller's own credentials, else 503, with `Retry-After` and a JSON body naming
    /// the cause.
    async fn bearer(&self, call: &TokenCall) -> Result<Bearer, Response<Body>> {
        let memo = matches!(call, TokenCall::Routes);
        if memo && let Some(bearer) = self.memo.get(Instant::now()) {
            return Ok(bearer);
        }
        let (head, form) = self.token_request(call);
        let answer = self.tokens.internal(head, form).await;
        let status = answer.status();
        let retry_after = answer.headers().get(header::RETRY_AFTER).cloned();
        let body = answer
            .into_body()
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        if status == StatusCode::OK
            && let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body)
            && let Some(token) = json.get("access_token").and_then(|t| t.as_str())
            && let Some(bearer) = Bearer::new(token)
        {
            if memo {
                let expires_in = json.get("expires_in").and_then(serde_json::Value::as_u64);
                self.memo.put(&bearer, expires_in, Instant::now());
            }
            return Ok(bearer);
        }
        if matches!(call, TokenCall::Callers(..)) && matches!(status.as_u16(), 400 | 401 | 403) {
            return Err(caller_refused());
        }
        Err(refusal(&self.route, status, retry_after))
    }

    /// The request with its body read whole if it may be sent again after a 401: no upgrade,
    /// and a body that is empty or declares a length within `retry_body_limit`, which arrives
    /// within the body read timeout. Otherwise the body is left unread, to stream once.
    async fn replayable(&self, parts: Parts, body: hyper::body::Incoming) -> Sending {
        use http_body::Body as _;
        if parts.headers.contains_key(header::UPGRADE) {
            return Sending::Once(parts, body);
        }
        if body.is_end_stream() {
            return Sending::Again(parts, Bytes::new());
        }
        let fits = body
            .size_hint()
            .exact()
            .is_some_and(|length| length <= self.retry_body_limit as u64);
        if !fits {
            return Sending::Once(parts, body);
        }
        let read = http_body_util::Limited::new(body, self.retry_body_limit).collect();
        let read = crate::server::awaiting_body(tokio::time::timeout(self.body_read_timeout, read));
        match read.await {
            Ok(Ok(collected)) => Sending::Again(parts, collected.to_bytes()),
            Ok(Err(_)) => Sending::Broken(
                crate::error::Error::InvalidRequest("the request body could not be read")
                    .into_response(),
            ),
            Err(_) => Sending::Broken(crate::error::Error::BodyTimeout.into_response()),
        }
    }
}

/// Whose credentials a request's token is fetched with.
enum TokenCall {
    /// The route's (`[routes.inject]`).
    Routes,
    /// The caller's own Basic ones (`from_basic`): the token request's head and form.
    Callers(Box<TokenHead>, Bytes),
}

/// How a request with an injected token is sent.
enum Sending {
    /// Its body is here whole: it can be sent again after a 401.
    Again(Parts, Bytes),
    /// Streamed, once.
    Once(Parts, hyper::body::Incoming),
    /// Its body did not arrive: the caller's answer.
    Broken(Response<Body>),
}

/// Whether an upstream answer rejects the bearer it was sent: 401, or 403 whose
/// `WWW-Authenticate` says `invalid_token` (RFC 6750 §3.1).
fn rejects_token(response: &Response<Body>) -> bool {
    match response.status() {
        StatusCode::UNAUTHORIZED => true,
        StatusCode::FORBIDDEN => response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("invalid_token"))),
        _ => false,
    }
}

/// The caller's refusal when no token can be had: the provider's 429 stays a 429, anything else
/// is a 503; `Retry-After` is the provider's or the sidecar's hold, else 1 s.
fn refusal(route: &str, status: StatusCode, retry_after: Option<HeaderValue>) -> Response<Body> {
    let throttled = status == StatusCode::TOO_MANY_REQUESTS;
    let code = if throttled {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let description = format!(
        "no token to inject on route {route}: the token endpoint answered {}",
        status.as_u16()
    );
    let mut response = oauth_json(code, "temporarily_unavailable", &description);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        retry_after.unwrap_or(HeaderValue::from_static("1")),
    );
    response
}

/// The answer to a caller whose own client credentials the token endpoint refused (RFC 6749
/// §5.2): 401 `invalid_client`.
fn caller_refused() -> Response<Body> {
    let mut response = oauth_json(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "the token endpoint refused the client credentials of this request's Authorization",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"token-sidecar\""),
    );
    response
}

/// A copy of a request head, to send the request again.
fn copy_head(parts: &Parts) -> Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

/// `parts` with `Authorization: Bearer token` and `body`.
fn with_bearer_and(mut parts: Parts, bearer: &Bearer, body: Body) -> Request<Body> {
    parts
        .headers
        .insert(header::AUTHORIZATION, bearer.header.clone());
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> Bearer {
        Bearer::new(token).unwrap()
    }

    #[test]
    fn a_bearer_is_kept_a_second_at_most_and_half_its_life_at_most() {
        let (memo, now) = (BearerMemo::default(), Instant::now());
        memo.put(&bearer("a"), Some(3600), now);
        assert_eq!(&*memo.get(now).unwrap().token, "a");
        assert!(memo.get(now + Duration::from_millis(999)).is_some());
        assert!(memo.get(now + MEMO).is_none(), "asked again after a second");
        memo.put(&bearer("b"), Some(1), now);
        assert!(memo.get(now + Duration::from_millis(499)).is_some());
        assert!(memo.get(now + Duration::from_millis(500)).is_none());
        for short in [Some(0), None] {
            memo.put(&bearer("c"), short, now);
            assert!(memo.get(now).is_none(), "{short:?}: not kept");
        }
    }

    #[test]
    fn only_the_rejected_bearer_is_forgotten() {
        let (memo, now) = (BearerMemo::default(), Instant::now());
        memo.put(&bearer("new"), Some(3600), now);
        memo.forget(&bearer("old"));
        assert_eq!(&*memo.get(now).unwrap().token, "new", "a newer one stays");
        memo.forget(&bearer("new"));
        assert!(memo.get(now).is_none());
    }

    #[test]
    fn a_rejected_bearer_fetched_again_by_a_racing_caller_is_not_kept() {
        let (memo, now) = (BearerMemo::default(), Instant::now());
        memo.put(&bearer("t"), Some(3600), now);
        memo.forget(&bearer("t"));
        // Another caller got "t" from the cache before it was dropped there.
        memo.put(&bearer("t"), Some(3600), now);
        assert!(memo.get(now).is_none(), "the rejected token is not kept");
        memo.put(&bearer("t2"), Some(3600), now);
        assert_eq!(&*memo.get(now).unwrap().token, "t2");
    }

    #[test]
    fn the_bearer_header_is_sensitive() {
        let header = bearer("t").header;
        assert_eq!(header, "Bearer t");
        assert!(header.is_sensitive());
    }
}
