//! The demo's identity provider: a throttling OAuth 2.0 token endpoint on loopback that behaves
//! like the real ones the sidecar was built for. It issues short-lived tokens to one client,
//! allows a few token calls per second and answers the rest `429` with `Retry-After`, takes a
//! few milliseconds per call, and serves one API endpoint that checks the bearer token. It
//! counts what it answered, so the demo can show what the provider went through.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The demo client's credentials.
pub const CLIENT_ID: &str = "demo-app";
/// The demo client's secret (a demo: printed on purpose).
pub const CLIENT_SECRET: &str = "demo-secret";
/// Most access tokens remembered for the API endpoint; older ones are forgotten.
const MAX_ISSUED: usize = 10_000;

/// How the provider behaves.
#[derive(Debug, Clone, Copy)]
pub struct Behaviour {
    /// Token calls answered per whole second; the rest get 429.
    pub calls_per_second: u64,
    /// `expires_in` of every token.
    pub lifetime: Duration,
    /// Time taken per token call.
    pub latency: Duration,
}

/// What the provider answered, so far.
#[derive(Debug, Default)]
pub struct Counts {
    /// Token calls, answered or throttled.
    pub calls: AtomicU64,
    /// Tokens issued.
    pub issued: AtomicU64,
    /// Token calls answered 429.
    pub throttled: AtomicU64,
}

impl Counts {
    /// (calls, issued, throttled) now.
    pub fn read(&self) -> (u64, u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.issued.load(Ordering::Relaxed),
            self.throttled.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug)]
struct State {
    behaviour: Behaviour,
    counts: Arc<Counts>,
    /// The second the rate window is for, and the calls in it.
    window: Mutex<(u64, u64)>,
    /// Access tokens the API endpoint accepts, bounded by [`MAX_ISSUED`].
    tokens: Mutex<HashSet<String>>,
    epoch: Instant,
}

/// A running demo provider.
#[derive(Debug)]
pub struct Provider {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
}

impl Provider {
    /// Starts the provider on a free loopback port; it runs until `stop`.
    pub async fn start(behaviour: Behaviour, stop: CancellationToken) -> std::io::Result<Provider> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let state = Arc::new(State {
            behaviour,
            counts: counts.clone(),
            window: Mutex::new((0, 0)),
            tokens: Mutex::new(HashSet::new()),
            epoch: Instant::now(),
        });
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, request).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Provider { addr, counts })
    }

    /// The provider's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn answer(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/oauth/token") => token(state, request).await,
        (&Method::GET, "/api/v2/users/me") => me(state, &request),
        _ => json(
            StatusCode::NOT_FOUND,
            r#"{"error":"not_found","message":"try POST /oauth/token or GET /api/v2/users/me"}"#
                .into(),
        ),
    }
}

/// `POST /oauth/token`: throttled first, like a real provider, then the credentials are checked.
async fn token(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let counts = &state.counts;
    counts.calls.fetch_add(1, Ordering::Relaxed);
    let basic = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"invalid_request"}"#.into(),
            );
        }
    };
    tokio::time::sleep(state.behaviour.latency).await;
    let second = state.epoch.elapsed().as_secs();
    let allowed = {
        let mut window = state.window.lock().expect("window lock");
        if window.0 != second {
            *window = (second, 0);
        }
        window.1 += 1;
        window.1 <= state.behaviour.calls_per_second
    };
    if !allowed {
        counts.throttled.fetch_add(1, Ordering::Relaxed);
        let mut response = json(
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"error":"temporarily_unavailable","error_description":"rate limit exceeded"}"#
                .into(),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    }
    if !authenticated(basic.as_deref(), &body) {
        return json(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"invalid_client"}"#.into(),
        );
    }
    let n = counts.issued.fetch_add(1, Ordering::Relaxed) + 1;
    let access_token = format!("demo-token-{n}-{:08x}", rand::random::<u32>());
    {
        let mut tokens = state.tokens.lock().expect("tokens lock");
        if tokens.len() >= MAX_ISSUED {
            tokens.clear();
        }
        tokens.insert(access_token.clone());
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": state.behaviour.lifetime.as_secs(),
        })
        .to_string(),
    )
}

/// The demo client, by HTTP Basic or in the form.
fn authenticated(basic: Option<&str>, body: &[u8]) -> bool {
    use base64::Engine as _;
    let form: Vec<(String, String)> = form_pairs(body);
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if field("grant_type") != Some("client_credentials") {
        return false;
    }
    if let Some(encoded) = basic.and_then(|v| v.strip_prefix("Basic ")) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .unwrap_or_default();
        return decoded == format!("{CLIENT_ID}:{CLIENT_SECRET}").as_bytes();
    }
    field("client_id") == Some(CLIENT_ID) && field("client_secret") == Some(CLIENT_SECRET)
}

fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// `GET /api/v2/users/me`: 200 for a token this provider issued, 401 otherwise.
fn me(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let known = token.is_some_and(|t| state.tokens.lock().expect("tokens lock").contains(t));
    if known {
        json(
            StatusCode::OK,
            r#"{"id":"demo-user","name":"Demo User","via":"the demo provider"}"#.into(),
        )
    } else {
        json(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"invalid_token"}"#.into(),
        )
    }
}
