//! The fake provider's utility endpoints, for the sidecar's generic proxy paths: `/echo` (the
//! request back as JSON), `/bytes/<N>` (a streamed download), `/upload` (a streamed upload,
//! counted), `/ws` (a WebSocket echo) and `/status/<code>`; and gzip of issued tokens. They need
//! dev-only crates (tokio-tungstenite, flate2), so they wrap the library's provider here rather
//! than live in it. Each counts and records its request with the provider.

use std::convert::Infallible;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use token_sidecar::demo::provider::{Issued, Provider};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

use super::Body;

/// Upper bound on frames handled by one WebSocket echo session.
const MAX_WS_FRAMES: usize = 1_000_000;
/// Upper bound on body frames consumed by `/upload`.
const MAX_UPLOAD_FRAMES: usize = 100_000_000;
/// Chunk size for `/bytes/<N>`.
const CHUNK: usize = 64 * 1024;

/// A utility endpoint, from a request's method and path.
pub enum Endpoint {
    Echo,
    Bytes(String),
    Upload,
    WebSocket,
    Status(String),
}

impl Endpoint {
    /// The utility endpoint for this request, or `None` for the provider's own paths.
    pub fn of(method: &Method, path: &str) -> Option<Endpoint> {
        if path.starts_with("/echo") {
            return Some(Endpoint::Echo);
        }
        if let (&Method::GET, Some(n)) = (method, path.strip_prefix("/bytes/")) {
            return Some(Endpoint::Bytes(n.to_owned()));
        }
        if method == Method::POST && path == "/upload" {
            return Some(Endpoint::Upload);
        }
        if method == Method::GET && path == "/ws" {
            return Some(Endpoint::WebSocket);
        }
        let code = path.strip_prefix("/status/")?;
        Some(Endpoint::Status(code.to_owned()))
    }

    /// Answers the request; `stop` ends a WebSocket session when the provider is dropped.
    pub async fn answer(
        self,
        provider: &Provider,
        stop: &CancellationToken,
        request: Request<Incoming>,
    ) -> io::Result<Response<Body>> {
        match self {
            Endpoint::Echo => {
                let (parts, body) = request.into_parts();
                let body = collect(body).await?;
                provider.record(&parts, body.clone());
                Ok(echo(&parts, &body))
            }
            Endpoint::Bytes(n) => {
                let (parts, _) = request.into_parts();
                provider.record(&parts, Bytes::new());
                Ok(match n.parse::<u64>() {
                    Ok(n) => Response::builder()
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .body(BoxBody::new(PatternBody {
                            remaining: n,
                            sent: 0,
                        }))
                        .expect("valid response"),
                    Err(_) => empty(StatusCode::BAD_REQUEST),
                })
            }
            Endpoint::Upload => upload(provider, request).await,
            Endpoint::WebSocket => Ok(websocket(provider, stop.clone(), request)),
            Endpoint::Status(code) => {
                let (parts, body) = request.into_parts();
                let body = collect(body).await?;
                provider.record(&parts, body);
                let status = code
                    .parse::<u16>()
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok());
                Ok(empty(status.unwrap_or(StatusCode::BAD_REQUEST)))
            }
        }
    }
}

/// Like a provider behind a CDN: an issued token is gzipped (the caller checked that the request
/// accepts gzip); any other answer passes as it is.
pub async fn gzip_issued(response: Response<Full<Bytes>>) -> Response<Body> {
    if response.extensions().get::<Issued>().is_none() {
        return response.map(BoxBody::new);
    }
    let (mut parts, body) = response.into_parts();
    let Ok(text) = body.collect().await.map(|c| c.to_bytes());
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&text).expect("gzip into memory");
    parts
        .headers
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    Response::from_parts(parts, full(encoder.finish().expect("gzip into memory")))
}

async fn collect(body: Incoming) -> io::Result<Bytes> {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(io::Error::other)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    BoxBody::new(Full::new(bytes.into()))
}

fn empty(status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(full(Bytes::new()))
        .expect("valid response")
}

fn echo(parts: &http::request::Parts, body: &[u8]) -> Response<Body> {
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_owned(), serde_json::Value::from(joined));
    }
    let body = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": body.len(),
    });
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .expect("valid response");
    resp.headers_mut()
        .insert("x-echo", HeaderValue::from_static("1"));
    resp
}

/// A body of `remaining` bytes cycling `a..=z`, produced in 64 KiB chunks on demand.
struct PatternBody {
    remaining: u64,
    sent: u64,
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = self.remaining.min(CHUNK as u64);
        let start = self.sent;
        let chunk: Vec<u8> = (start..start + len)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        self.remaining -= len;
        self.sent += len;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

async fn upload(provider: &Provider, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let (parts, mut body) = req.into_parts();
    let mut total: u64 = 0;
    for _ in 0..MAX_UPLOAD_FRAMES {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    total += data.len() as u64;
                }
            }
            Some(Err(e)) => return Err(io::Error::other(e)),
        }
    }
    provider.record(&parts, Bytes::new());
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(total.to_string()))
        .expect("valid response"))
}

fn websocket(
    provider: &Provider,
    stop: CancellationToken,
    req: Request<Incoming>,
) -> Response<Body> {
    let headers = req.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if !is_upgrade {
        return empty(StatusCode::BAD_REQUEST);
    }
    let accept = derive_accept_key(key.as_bytes());
    let (parts, body) = req.into_parts();
    provider.record(&parts, Bytes::new());
    // The pending upgrade lives in the extensions, which from_parts keeps.
    let req = Request::from_parts(parts, body);
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let echo = async {
            for _ in 0..MAX_WS_FRAMES {
                let Some(Ok(msg)) = ws.next().await else {
                    break;
                };
                let reply = match msg {
                    Message::Text(_) | Message::Binary(_) => msg,
                    Message::Close(_) => break,
                    // Pings are answered by tungstenite itself.
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            () = echo => {}
            () = stop.cancelled() => {}
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(full(Bytes::new()))
        .expect("valid response")
}
