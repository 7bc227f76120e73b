//! Pass-through proxying to a route's provider: every request the token cache does not answer
//! reaches the provider as if the sidecar were not there. Path and query are kept, hop-by-hop
//! headers (RFC 9110 §7.6.1, including those named in `Connection`) are dropped, `Host` becomes
//! the provider's unless configured otherwise, bodies stream both ways, and upgrades (WebSocket)
//! are spliced after the `101`.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use crate::body::{Body, boxed, full};
use crate::config::{RouteConfig, UpstreamUrl};
use crate::metrics::RouteMetrics;
use crate::token::cache::Reply;
use crate::upstream::{Failure, Upstream};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1, plus the proxy
/// headers that are meant for this hop).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    headers.remove(header::PROXY_AUTHENTICATE);
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Connection: upgrade` + `Upgrade`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Forwards requests of one route to its provider.
#[derive(Debug)]
pub struct Forwarder {
    route: String,
    upstream: Upstream,
    preserve_host: bool,
    metrics: RouteMetrics,
}

impl Forwarder {
    /// Builds the forwarder and its upstream client.
    pub fn new(route: &RouteConfig, metrics: RouteMetrics) -> Result<Forwarder, String> {
        Ok(Forwarder {
            route: route.name.clone(),
            upstream: Upstream::new(route)?,
            preserve_host: route.preserve_host,
            metrics,
        })
    }

    /// The time limit of one upstream exchange.
    pub fn request_timeout(&self) -> std::time::Duration {
        self.upstream.request_timeout
    }

    /// The provider's base URL, for logs.
    pub fn upstream_url(&self) -> &UpstreamUrl {
        &self.upstream.url
    }

    /// Rewrites a local request for the provider.
    fn outbound(&self, mut parts: Parts, body: Body) -> (Request<Body>, Option<HeaderValue>) {
        let upgrade = upgrade_protocol(&parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        if !self.preserve_host || !parts.headers.contains_key(header::HOST) {
            parts
                .headers
                .insert(header::HOST, self.upstream.host.clone());
        }
        parts.uri = self.upstream.uri(parts.uri.path_and_query());
        parts.version = Version::HTTP_11;
        (Request::from_parts(parts, body), upgrade)
    }

    /// Proxies one request, streaming both bodies. A dead or slow provider gives a 502 or 504
    /// with a short JSON body.
    pub async fn forward(&self, request: Request<Body>) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        let (outbound, upgrade) = self.outbound(parts, body);
        let method = outbound.method().clone();
        let response = match self.upstream.send(outbound).await {
            Ok(response) => response,
            Err(failure) => {
                warn!(route = %self.route, upstream = %self.upstream.url, %method, reason = failure.reason(), "forwarding failed");
                let error = failure.to_error();
                self.metrics.forwarded(error.status().as_u16());
                return error.into_response();
            }
        };
        let status = response.status();
        self.metrics.forwarded(status.as_u16());
        debug!(route = %self.route, %method, status = status.as_u16(), "forwarded");

        if status == StatusCode::SWITCHING_PROTOCOLS
            && let (Some(_), Some(client_upgrade)) = (upgrade, client_upgrade)
        {
            return self.splice(response, client_upgrade);
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, boxed(body))
    }

    /// Completes an upgrade: answers the caller's `101` and copies bytes both ways until either
    /// side closes.
    fn splice(
        &self,
        mut response: Response<hyper::body::Incoming>,
        client: hyper::upgrade::OnUpgrade,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut response);
        let route = self.route.clone();
        tokio::spawn(async move {
            match tokio::try_join!(client, upstream) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        debug!(route, error = %e, "upgraded connection closed with an error");
                    }
                }
                Err(e) => debug!(route, error = %e, "upgrade did not complete"),
            }
        });
        let (parts, _) = response.into_parts();
        Response::from_parts(parts, crate::body::empty())
    }

    /// A token call: sends the caller's request and reads the whole answer, bounded in time and
    /// size. `Ok((reply, true))` means the body was over `limit` and was cut off.
    pub async fn exchange(
        &self,
        parts: Parts,
        body: Bytes,
        limit: usize,
    ) -> Result<(Reply, bool), Failure> {
        let (mut outbound, _) = self.outbound(parts, full(body.clone()));
        outbound
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let deadline = tokio::time::Instant::now() + self.upstream.request_timeout;
        let response = self.upstream.send(outbound).await?;
        let (parts, body) = response.into_parts();
        let read = tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await;
        match read {
            Err(_) => Err(Failure::Timeout),
            Ok(Ok(collected)) => Ok((crate::token::reply_from(parts, collected.to_bytes()), false)),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Ok((crate::token::reply_from(parts, Bytes::new()), true))
            }
            Ok(Err(e)) => Err(Failure::Unavailable(format!(
                "reading the response body: {e}"
            ))),
        }
    }
}
