//! Everything that is not a cacheable token request reaches the provider as if the sidecar were
//! not there: methods, paths, queries, headers (hop-by-hop removed), streamed bodies both ways,
//! WebSocket upgrades; and a dead provider gives a quick 502/504, never a hang.
use crate::support;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::sidecar::Sidecar;
use support::{Answer, Fixture, client, send};
use tokio_tungstenite::tungstenite::Message;

fn request(method: Method, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

#[tokio::test]
async fn methods_paths_queries_and_end_to_end_headers_are_forwarded_unchanged() {
    let fx = Fixture::start("").await;
    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ] {
        let req = request(
            method.clone(),
            &format!("{}/echo/a%20b/c?x=1&y=%2F&x=2", fx.sidecar.url()),
        )
        .header("x-custom", "kept")
        .header("authorization", "Bearer abc")
        .header("connection", "x-hop, keep-alive")
        .header("x-hop", "dropped")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
        let reply = send(&fx.client, req).await;
        assert_eq!(reply.status, 200, "{method}: {}", reply.text());
        assert_eq!(
            reply.header("x-echo").as_deref(),
            Some("1"),
            "response headers come back"
        );
        let echo = reply.json();
        assert_eq!(echo["method"], method.as_str());
        assert_eq!(echo["path"], "/echo/a%20b/c");
        assert_eq!(echo["query"], "x=1&y=%2F&x=2");
        let headers = &echo["headers"];
        assert_eq!(headers["x-custom"], "kept");
        assert_eq!(headers["authorization"], "Bearer abc");
        assert_eq!(
            headers["host"],
            fx.idp.addr().to_string(),
            "Host is the upstream's"
        );
        for hop in ["x-hop", "keep-alive", "proxy-authorization"] {
            assert!(
                headers.get(hop).is_none(),
                "{hop} must not be forwarded: {headers}"
            );
        }
        assert_eq!(echo["body_len"], 7);
    }
}

#[tokio::test]
async fn host_can_be_preserved_by_configuration() {
    let fx = Fixture::start("preserve_host = true").await;
    let req = request(Method::GET, &format!("{}/echo", fx.sidecar.url()))
        .header("host", "app.internal")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let echo = send(&fx.client, req).await.json();
    assert_eq!(echo["headers"]["host"], "app.internal");
}

#[tokio::test]
async fn upstream_statuses_come_back_as_they_came() {
    let fx = Fixture::start("").await;
    for status in [204u16, 302, 404, 418, 500, 503] {
        let req = request(
            Method::GET,
            &format!("{}/status/{status}", fx.sidecar.url()),
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
        assert_eq!(send(&fx.client, req).await.status, status);
    }
}

#[tokio::test]
async fn a_dead_upstream_gives_a_quick_502_with_json() {
    // Bind and drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sidecar = Sidecar::start(&format!("http://127.0.0.1:{port}")).await;
    let started = Instant::now();
    let req = request(Method::GET, &format!("{}/api/v2/users", sidecar.url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"], "temporarily_unavailable");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_silent_upstream_gives_504_after_the_request_timeout() {
    let fx = Fixture::start("[client]\nrequest_timeout = \"500ms\"").await;
    fx.idp.set_default(Answer::Hang);
    let started = Instant::now();
    // A non-cacheable token request (password grant) goes through the forwarder.
    let reply = fx
        .post_token("grant_type=password&username=u&password=p")
        .await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Samples this process's resident memory until stopped, returning the peak growth in bytes.
fn rss_sampler(stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    fn rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }
    tokio::spawn(async move {
        let base = rss();
        let mut peak = base;
        for _ in 0..6000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            peak = peak.max(rss());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        peak.saturating_sub(base)
    })
}

const HUNDRED_MB: u64 = 100 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabyte_download_streams_through_with_bounded_memory() {
    // It measures this process: alone, not beside the other tests of the binary.
    if !support::process::alone(
        "forwarding::a_hundred_megabyte_download_streams_through_with_bounded_memory",
    )
    .await
    {
        return;
    }
    let fx = Fixture::start("").await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = rss_sampler(stop.clone());
    let req = request(
        Method::GET,
        &format!("{}/bytes/{HUNDRED_MB}", fx.sidecar.url()),
    )
    .body(Full::new(Bytes::new()))
    .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(60), fx.client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .unwrap()
    {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let growth = sampler.await.unwrap();
    assert_eq!(received, HUNDRED_MB);
    assert!(
        growth < 40 * 1024 * 1024,
        "memory grew by {growth} bytes while streaming 100 MB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabyte_upload_streams_through_with_bounded_memory() {
    // It measures this process: alone, not beside the other tests of the binary.
    if !support::process::alone(
        "forwarding::a_hundred_megabyte_upload_streams_through_with_bounded_memory",
    )
    .await
    {
        return;
    }
    let fx = Fixture::start("").await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = rss_sampler(stop.clone());
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let chunks = (HUNDRED_MB / chunk.len() as u64) as usize;
    let stream = futures_util::stream::iter((0..chunks).map(move |_| {
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))
    }));
    let streaming = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let req = request(Method::POST, &format!("{}/upload", fx.sidecar.url()))
        .body(StreamBody::new(stream))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(60), streaming.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    stop.store(true, Ordering::Relaxed);
    let growth = sampler.await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&body).trim(),
        HUNDRED_MB.to_string()
    );
    assert_eq!(sent.load(Ordering::Relaxed), HUNDRED_MB);
    assert!(
        growth < 40 * 1024 * 1024,
        "memory grew by {growth} bytes while streaming 100 MB"
    );
}

#[tokio::test]
async fn a_websocket_opens_through_the_sidecar_and_echoes_both_ways() {
    let fx = Fixture::start("").await;
    let stream = tokio::net::TcpStream::connect(fx.sidecar.addr)
        .await
        .unwrap();
    let url = format!("ws://{}/ws", fx.sidecar.addr);
    let (mut ws, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(format!("hello {i}")));
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::binary(vec![1u8, 2, 3]));
    ws.close(None).await.unwrap();
}
