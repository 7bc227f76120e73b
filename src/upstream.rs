//! The HTTP client towards one identity provider: a keep-alive connection pool, connect and
//! request timeouts, and rustls for `https://` upstreams (system roots, or the bundled webpki
//! roots where the system has none, plus an optional private CA and client certificate).

use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::body::Body;
use crate::config::{ClientConfig, RouteConfig, UpstreamUrl};
use crate::error::Error;

/// Why an upstream exchange failed before a response head arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Connecting, the TLS handshake, or the exchange itself failed; the text says why.
    Unavailable(String),
    /// No response head within the request timeout.
    Timeout,
}

impl Failure {
    /// A metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Failure::Unavailable(_) => "unavailable",
            Failure::Timeout => "timeout",
        }
    }

    /// Why, for logs: the connection error chain, or "timeout".
    pub fn reason(&self) -> &str {
        match self {
            Failure::Unavailable(why) => why,
            Failure::Timeout => "timeout",
        }
    }

    /// The caller-facing error: 502 for an unreachable provider, 504 for a silent one.
    pub fn to_error(&self) -> Error {
        match self {
            Failure::Unavailable(_) => Error::UpstreamUnavailable,
            Failure::Timeout => Error::UpstreamTimeout,
        }
    }
}

/// One provider and the pooled client that reaches it.
#[derive(Debug)]
pub struct Upstream {
    /// The provider's base URL.
    pub url: UpstreamUrl,
    /// The `Host` value the provider expects.
    pub host: HeaderValue,
    /// Time limit for a response head (and, on the token path, the whole body).
    pub request_timeout: Duration,
    client: Client<HttpsConnector<HttpConnector>, Body>,
}

impl Upstream {
    /// Builds the client for a route. Errors name the file or setting at fault.
    pub fn new(route: &RouteConfig) -> Result<Upstream, String> {
        let tls = tls_config(
            &route.client,
            route.upstream.scheme == http::uri::Scheme::HTTPS,
        )
        .map_err(|e| format!("route {}: {e}", route.name))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(route.client.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        // HTTP/1.1 only: token calls are few, and upgrades (WebSocket) need HTTP/1.1 end to end.
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(route.client.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Upstream {
            host: HeaderValue::from_str(route.upstream.authority.as_str()).map_err(|_| {
                format!("route {}: upstream host is not a valid header", route.name)
            })?,
            url: route.upstream.clone(),
            request_timeout: route.client.request_timeout,
            client,
        })
    }

    /// The upstream URI for a local request's path and query.
    pub fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        Uri::builder()
            .scheme(self.url.scheme.clone())
            .authority(self.url.authority.clone())
            .path_and_query(path_and_query.map_or("/", PathAndQuery::as_str))
            .build()
            .expect("scheme, authority and path were each valid")
    }

    /// Sends a request and waits up to the request timeout for the response head.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, Failure> {
        match tokio::time::timeout(self.request_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(Failure::Unavailable(describe(&e))),
            Err(_) => Err(Failure::Timeout),
        }
    }
}

/// The error chain in one line: the innermost causes say what really happened (refused, reset,
/// unknown CA...). Client errors describe the connection, never the request.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The system's roots, loaded once per process; the bundled webpki roots when there are none.
fn base_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots
    })
}

/// The TLS settings of a route. The system store is read only for `https://` upstreams; a plain
/// `http://` one never handshakes, so it does not pay for loading it.
fn tls_config(client: &ClientConfig, https: bool) -> Result<rustls::ClientConfig, String> {
    let mut roots = if https {
        base_roots().clone()
    } else {
        RootCertStore::empty()
    };
    if let Some(path) = &client.ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect)
            .map_err(|e| format!("client.ca_file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "client.ca_file {}: no certificates found",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("client.ca_file {}: {e}", path.display()))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots);
    match (&client.client_cert_file, &client.client_key_file) {
        (Some(cert_path), Some(key_path)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
                .and_then(Iterator::collect)
                .map_err(|e| format!("client.client_cert_file {}: {e}", cert_path.display()))?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| format!("client.client_key_file {}: {e}", key_path.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client.client_cert_file: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}
