//! What the integration tests share: the project's identity provider served on `127.0.0.1:0`,
//! the sidecar in-process or as a process, Redis, HTTPS, and small hyper client helpers. One test
//! binary (`tests/integration.rs`) compiles it once for every test module.
//!
//! [`FakeProvider`] is `token_sidecar::demo::provider::Provider`, the provider `token-sidecar
//! demo` runs (scripted [`Answer`]s for token calls, counts, recorded requests, refresh-token
//! rotation, a rate limit, the API endpoint), served with what needs dev-only crates: the utility
//! endpoints of [`utility`] (`/echo`, `/bytes/<N>`, `/upload`, `/ws`, `/status/<code>`) for the
//! generic proxy paths, gzip of issued tokens, and HTTPS and mutual TLS ([`tls`]). Dropping it
//! stops its accept loop and every connection and WebSocket session it is serving.
//!
//! [`Fixture`] is the setup most tests start with: a provider, a sidecar in front of it and a
//! client. [`oauth`] holds assertions on token-endpoint answers, [`sidecar`] and [`process`] run
//! the sidecar, [`redis`] Redis for the fleet tier (a server, a cluster, a Sentinel group), and
//! [`latency`] a TCP proxy that makes the network in front of it slow, stalled, lossy or cut.

pub mod latency;
pub mod oauth;
pub mod process;
pub mod redis;
pub mod sidecar;
pub mod tls;
pub mod utility;

use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use token_sidecar::demo::provider::Provider;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};

pub use token_sidecar::demo::provider::Answer;

use sidecar::Sidecar;

/// Response body type of the fake provider.
type Body = BoxBody<Bytes, std::convert::Infallible>;

/// Bound on one TLS handshake with the provider.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on every helper client call.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The project's provider on `127.0.0.1:<ephemeral>`, with the tests' utility endpoints and
/// optional TLS. Script and inspect it through [`Provider`]'s methods (`push`, `set_default`,
/// `token_calls`, `recorded`, ...). Dropping it stops the server.
pub struct FakeProvider {
    provider: Provider,
    tls: bool,
    /// Cancels the accept loop, its connections and the WebSocket sessions when dropped.
    _stop: DropGuard,
}

impl Deref for FakeProvider {
    type Target = Provider;

    fn deref(&self) -> &Provider {
        &self.provider
    }
}

impl FakeProvider {
    /// Starts a plain-HTTP provider on `127.0.0.1:0`.
    pub async fn start() -> FakeProvider {
        Self::spawn_on(None, 0).await
    }

    /// Starts a plain-HTTP provider on a given loopback port (for "down, then up" tests).
    pub async fn start_on(port: u16) -> FakeProvider {
        Self::spawn_on(None, port).await
    }

    async fn spawn_on(tls: Option<Arc<rustls::ServerConfig>>, port: u16) -> FakeProvider {
        let socket = TcpSocket::new_v4().expect("fake provider: socket");
        socket
            .set_reuseaddr(true)
            .expect("fake provider: reuseaddr");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .expect("fake provider: bind 127.0.0.1");
        let listener = socket.listen(4096).expect("fake provider: listen");
        let provider = Provider::new(listener.local_addr().expect("fake provider: local_addr"));
        let stop = CancellationToken::new();
        let is_tls = tls.is_some();
        let sessions = stop.clone();
        provider.accept(listener, stop.clone(), move |provider, tcp| {
            serve_tcp(provider, tcp, tls.clone(), sessions.clone())
        });
        FakeProvider {
            provider,
            tls: is_tls,
            _stop: stop.drop_guard(),
        }
    }

    /// `http://127.0.0.1:PORT` (or `https://` for a TLS provider), without a trailing slash.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.provider.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.provider.addr
    }
}

async fn serve_tcp(
    provider: Provider,
    tcp: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) {
    match tls {
        None => serve_io(TokioIo::new(tcp), provider, stop).await,
        Some(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            // A failed or stalled handshake (an untrusted or missing client certificate) just
            // ends the connection; rustls has sent its alert.
            if let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                serve_io(TokioIo::new(stream), provider, stop).await;
            }
        }
    }
}

async fn serve_io<I>(io: TokioIo<I>, provider: Provider, stop: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |request| handle(provider.clone(), stop.clone(), request));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let _ = builder.serve_connection_with_upgrades(io, service).await;
}

/// The utility endpoints here, everything else by the provider (issued tokens gzipped when the
/// request accepts gzip). `Err` closes the connection without an answer.
async fn handle(
    provider: Provider,
    stop: CancellationToken,
    request: Request<Incoming>,
) -> io::Result<http::Response<Body>> {
    if let Some(endpoint) = utility::Endpoint::of(request.method(), request.uri().path()) {
        provider.arrived();
        return endpoint.answer(&provider, &stop, request).await;
    }
    let gzip = accepts_gzip(request.headers());
    let response = provider.answer(request).await?;
    Ok(if gzip {
        utility::gzip_issued(response).await
    } else {
        response.map(BoxBody::new)
    })
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("gzip"))
}

/// Bytes left as-is by `application/x-www-form-urlencoded` (besides alphanumerics).
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b' ');

/// `application/x-www-form-urlencoded` encoding of one name or value (space becomes `+`).
pub fn form_encode(s: &str) -> String {
    utf8_percent_encode(s, FORM).to_string().replace(' ', "+")
}

// ---------------------------------------------------------------------------------------------
// Client helpers
// ---------------------------------------------------------------------------------------------

/// The plain-HTTP test client.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// A buffered response.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the status and body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The first value of this header, if present (lossy UTF-8).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1 client whose pool keeps up to 2048 idle connections per host.
pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2048)
        .build_http()
}

/// `Basic` credentials per RFC 6749 2.3.1: form-urlencode id and secret, join with `:`, base64.
pub fn basic_auth(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        BASE64.encode(format!("{}:{}", form_encode(id), form_encode(secret)))
    )
}

/// POSTs `form` (already urlencoded) as `application/x-www-form-urlencoded`, with RFC 6749 2.3.1
/// Basic credentials when `basic` is given. Panics on transport error or after 30 s.
pub async fn post_form<C>(
    client: &hyper_util::client::legacy::Client<C, Full<Bytes>>,
    url: &str,
    form: &str,
    basic: Option<(&str, &str)>,
) -> Reply
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        builder = builder.header(header::AUTHORIZATION, basic_auth(id, secret));
    }
    let req = builder
        .body(Full::new(Bytes::from(form.to_owned())))
        .unwrap_or_else(|e| panic!("post_form: bad request for {url}: {e}"));
    send(client, req).await
}

/// Sends `req` and buffers the response. Panics on transport error or after 30 s.
pub async fn send<C>(
    client: &hyper_util::client::legacy::Client<C, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let what = format!("{} {}", req.method(), req.uri());
    let call = async {
        let resp = client
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: transport error: {e:?}"));
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{what}: error reading response body: {e:?}"))
            .to_bytes();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(CLIENT_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no complete response within {CLIENT_TIMEOUT:?}"))
}

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// The setup most tests start with: a fake provider, a one-route sidecar in front of it, and a
/// keep-alive client. Script `idp` at any time: the sidecar calls it only when asked for a token.
pub struct Fixture {
    /// Declared first so that it is dropped first: the sidecar stops before its provider.
    pub sidecar: Sidecar,
    pub idp: FakeProvider,
    pub client: Client,
}

impl Fixture {
    /// A provider with default behaviour and a sidecar for it configured by `toml` (see
    /// [`sidecar::config`]; `""` for the defaults).
    pub async fn start(toml: &str) -> Fixture {
        let idp = FakeProvider::start().await;
        let sidecar = Sidecar::start_with(sidecar::config(&idp.url(), toml)).await;
        Fixture {
            sidecar,
            idp,
            client: client(),
        }
    }

    /// POSTs `form` (already urlencoded) to the sidecar's token endpoint, without Basic
    /// credentials. Panics on transport error or after 30 s.
    pub async fn post_token(&self, form: &str) -> Reply {
        post_form(&self.client, &self.sidecar.token_url(), form, None).await
    }
}
