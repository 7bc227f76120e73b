//! Pass-through proxying to a route's provider: every request the token cache does not answer
//! reaches the provider as if the sidecar were not there. Path and query are kept, hop-by-hop
//! headers (RFC 9110 §7.6.1, including those named in `Connection`) are dropped, `Host` becomes
//! the provider's unless configured otherwise (all three in [`Upstream::outbound`]), bodies stream
//! both ways, and upgrades (WebSocket) are spliced after the `101`.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

use crate::body::{Body, boxed};
use crate::metrics::RouteMetrics;
use crate::server::ConnectionSlot;
use crate::tunnel;
use crate::upstream::{Upstream, strip_hop_by_hop};

/// The tunnel idle timeout of a request that came without a connection slot (tests).
const DEFAULT_TUNNEL_IDLE: Duration = Duration::from_secs(300);

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
pub(crate) struct Forwarder {
    route: String,
    upstream: Arc<Upstream>,
    metrics: RouteMetrics,
}

impl Forwarder {
    /// A forwarder over the route's upstream client.
    pub(crate) fn new(route: &str, upstream: Arc<Upstream>, metrics: RouteMetrics) -> Forwarder {
        Forwarder {
            route: route.to_owned(),
            upstream,
            metrics,
        }
    }

    /// Proxies one request, streaming both bodies. A dead or slow provider gives a 502 or 504
    /// with a short JSON body.
    pub(crate) async fn forward(&self, request: Request<Body>) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        let slot = parts.extensions.remove::<ConnectionSlot>();
        let upgrade = upgrade_protocol(&parts.headers);
        let mut outbound = self.upstream.outbound(parts, body);
        if let Some(protocol) = &upgrade {
            // Hop-by-hop, so stripped above; an upgrade needs them on this hop too.
            let headers = outbound.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol.clone());
        }
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
            return self.splice(response, client_upgrade, slot);
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, boxed(body))
    }

    /// Completes an upgrade: answers the caller's `101` and copies bytes both ways until either
    /// side closes or neither sends a byte for the tunnel idle timeout. The tunnel keeps the
    /// connection's `slot` under the listener's cap while it lasts.
    fn splice(
        &self,
        mut response: Response<crate::pool::PooledBody>,
        client: hyper::upgrade::OnUpgrade,
        slot: Option<ConnectionSlot>,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut response);
        let route = self.route.clone();
        let idle = slot
            .as_ref()
            .map_or(DEFAULT_TUNNEL_IDLE, |slot| slot.tunnel_idle);
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::try_join!(client, upstream) {
                Ok((client, upstream)) => {
                    let client = TokioIo::new(client);
                    let upstream = TokioIo::new(upstream);
                    match tunnel::splice(client, upstream, idle).await {
                        Ok(tunnel::Ended::Closed) => {}
                        Ok(tunnel::Ended::Idle) => {
                            debug!(route, idle_s = idle.as_secs(), "tunnel idle: closed");
                        }
                        Err(e) => {
                            debug!(route, error = %e, "upgraded connection closed with an error");
                        }
                    }
                }
                Err(e) => debug!(route, error = %e, "upgrade did not complete"),
            }
        });
        let (parts, _) = response.into_parts();
        Response::from_parts(parts, crate::body::empty())
    }
}
