//! The HTTP client towards one identity provider, shared by the token path and the forwarder:
//! how a local request is rewritten for the provider (URI, `Host`, hop-by-hop headers), a
//! keep-alive connection pool, connect and request timeouts, and rustls for `https://` upstreams
//! (system roots, or the bundled webpki roots where the system has none, plus an optional private
//! CA and client certificate). [`Upstream::exchange`] is the token call: one request, the whole
//! answer read within the deadline and the size limit. Nothing here knows about tokens.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::body::{Body, full};
use crate::config::{ClientConfig, RouteConfig, UpstreamUrl};
use crate::error::Error;
use crate::pool::{Pool, PooledBody};

/// Why an upstream exchange produced no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Connecting, the TLS handshake, or the exchange itself failed; the text says why.
    Unavailable(String),
    /// No response (on the token path: no whole response) within the request timeout.
    Timeout,
    /// A token answer whose body was over the size limit; it was not read further.
    TooLarge(StatusCode),
}

impl Failure {
    /// The metric label of the call: the failure, or the status of an answer too large to use.
    pub(crate) fn label(&self) -> String {
        match self {
            Failure::Unavailable(_) => "unavailable".into(),
            Failure::Timeout => "timeout".into(),
            Failure::TooLarge(status) => status.as_u16().to_string(),
        }
    }

    /// Why, for logs: the connection error chain, or what went wrong.
    pub(crate) fn reason(&self) -> &str {
        match self {
            Failure::Unavailable(why) => why,
            Failure::Timeout => "timeout",
            Failure::TooLarge(_) => "response over the size limit",
        }
    }

    /// The caller-facing error: 502 for an unreachable provider or an unusable answer, 504 for a
    /// silent one.
    pub(crate) fn to_error(&self) -> Error {
        match self {
            Failure::Unavailable(_) => Error::UpstreamUnavailable,
            Failure::Timeout => Error::UpstreamTimeout,
            Failure::TooLarge(_) => Error::UpstreamInvalid("response too large"),
        }
    }
}

/// A whole upstream answer, as callers get it: status, headers (hop-by-hop and `Content-Length`
/// removed, the body is re-framed), body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, plus the proxy
/// headers that are meant for this hop).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one look at each name says so, where removing each would hash
    // nine names.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// One provider and the pooled client that reaches it.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// The provider's base URL.
    pub url: UpstreamUrl,
    /// The `Host` value the provider expects.
    pub host: HeaderValue,
    /// Time limit for a response head (and, on the token path, the whole body).
    pub request_timeout: Duration,
    /// Send the caller's `Host` instead of [`Self::host`].
    preserve_host: bool,
    pool: Pool,
}

impl Upstream {
    /// Builds the client for a route. Errors name the file or setting at fault.
    pub(crate) fn new(route: &RouteConfig) -> Result<Upstream, String> {
        let connector = connector(
            &route.client,
            route.upstream.scheme == http::uri::Scheme::HTTPS,
        )
        .map_err(|e| format!("route {}: {e}", route.name))?;
        let target = Uri::builder()
            .scheme(route.upstream.scheme.clone())
            .authority(route.upstream.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("route {}: upstream: {e}", route.name))?;
        // What a pass-through stream may buffer from the provider while its caller reads slowly
        // (hyper's default grows to about 400 KiB per connection).
        let pool = Pool::new(
            connector,
            target,
            route.client.pool_idle_timeout,
            UPSTREAM_READ_BUFFER,
        );
        Ok(Upstream {
            host: HeaderValue::from_str(route.upstream.authority.as_str()).map_err(|_| {
                format!("route {}: upstream host is not a valid header", route.name)
            })?,
            url: route.upstream.clone(),
            request_timeout: route.client.request_timeout,
            preserve_host: route.preserve_host,
            pool,
        })
    }

    /// Rewrites a local request's head for the provider: hop-by-hop headers dropped, `Host`
    /// set (unless preserved), the URI in origin form (the path and query: the connection is the
    /// provider's), HTTP/1.1.
    pub(crate) fn outbound(&self, mut parts: Parts, body: Body) -> Request<Body> {
        strip_hop_by_hop(&mut parts.headers);
        if !self.preserve_host || !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, self.host.clone());
        }
        parts.uri = origin_form(parts.uri);
        parts.version = Version::HTTP_11;
        Request::from_parts(parts, body)
    }

    /// A token call: sends the caller's request (without `Accept-Encoding`) and reads the whole
    /// answer, within the request timeout and `limit` bytes of body.
    pub(crate) async fn exchange(
        &self,
        parts: Parts,
        body: Bytes,
        limit: usize,
    ) -> Result<Reply, Failure> {
        let length = HeaderValue::from(body.len());
        let mut outbound = self.outbound(parts, full(body));
        let headers = outbound.headers_mut();
        headers.insert(header::CONTENT_LENGTH, length);
        // The answer is read as JSON and cached as bytes: ask for it unencoded, whatever the
        // caller accepts (a gzipped token would otherwise be an unusable answer).
        headers.remove(header::ACCEPT_ENCODING);
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let response = self.send(outbound).await?;
        let (parts, body) = response.into_parts();
        let read = tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await;
        let body = match read {
            Err(_) => return Err(Failure::Timeout),
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Failure::TooLarge(parts.status));
            }
            Ok(Err(e)) => {
                return Err(Failure::Unavailable(format!(
                    "reading the response body: {e}"
                )));
            }
        };
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        // Replies may be kept for minutes (remembered errors): own their bytes instead of
        // pinning the connection's read buffers.
        Ok(Reply {
            status: parts.status,
            headers: compact_headers(&headers),
            body: Bytes::copy_from_slice(&body),
        })
    }

    /// Sends a request and waits up to the request timeout for the response head.
    pub(crate) async fn send(
        &self,
        request: Request<Body>,
    ) -> Result<Response<PooledBody>, Failure> {
        // Pinned in place rather than wrapped by `tokio::time::timeout`, which moves the
        // kilobyte-sized send future twice on every request.
        let sent = std::pin::pin!(self.pool.send(request));
        let deadline = std::pin::pin!(tokio::time::sleep(self.request_timeout));
        tokio::select! {
            biased;
            sent = sent => sent.map_err(|e| Failure::Unavailable(describe(e.source_error()))),
            () = deadline => Err(Failure::Timeout),
        }
    }
}

/// `uri` in origin form: its path and query (`/` when it has none).
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() && uri.path_and_query().is_some() {
        return uri;
    }
    let path_and_query = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path_and_query)
}

/// How a route's connections to its provider are made: TCP (no delay, the connect timeout,
/// keep-alive probes) and TLS for `https://` (`https` true) with the client settings. HTTP/1.1
/// only: token calls are few, and upgrades (WebSocket) need HTTP/1.1 end to end.
pub(crate) fn connector(
    client: &ClientConfig,
    https: bool,
) -> Result<HttpsConnector<HttpConnector>, String> {
    let tls = tls_config(client, https)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(client.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// Most bytes read ahead from the provider per connection (HTTP/1.1) or stream (HTTP/2).
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// A copy of `headers` that owns its bytes. Parsed header values are slices of the connection's
/// read buffer; a copy kept past the request would pin the whole buffer.
pub(crate) fn compact_headers(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        // The bytes of a valid value are valid; were they not, the header would be left out.
        let Ok(mut owned) = HeaderValue::from_bytes(value.as_bytes()) else {
            continue;
        };
        owned.set_sensitive(value.is_sensitive());
        copy.append(name.clone(), owned);
    }
    copy
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        for name in &HOP_BY_HOP {
            headers.insert(name, HeaderValue::from_static("x"));
        }
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-hop, close"));
        headers.insert("x-hop", HeaderValue::from_static("dropped"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain");

        // A message with none is left as it is.
        let mut plain = HeaderMap::new();
        plain.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        plain.insert("x-hop", HeaderValue::from_static("kept"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain, before);
    }
}
