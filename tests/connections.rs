//! Connection-level limits on both listeners: silent connections (HTTP/1 and h2c) cannot lock
//! out other callers, idle connections close, HTTP/2 streams per connection are capped, and
//! upgraded tunnels count against `max_connections` and close when idle.
use crate::support;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::time::{Duration, Instant};
use support::{Answer, Fixture, client, post_form, send};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FORM: &str = "grant_type=client_credentials&client_id=app&client_secret=s";

/// The HTTP/2 connection preface and an empty SETTINGS frame: an h2c client that then says
/// nothing.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

async fn silent(addr: std::net::SocketAddr, count: usize, h2: bool) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
        else {
            // The kernel backlog is full: the cap is reached, which is the point.
            break;
        };
        if h2 {
            let _ = stream.write_all(H2_PREFACE).await;
        }
        held.push(stream);
    }
    held
}

async fn get(url: &str) -> support::Reply {
    send(
        &client(),
        Request::get(url).body(Full::new(Bytes::new())).unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_lock_out_callers_of_either_listener() {
    let fx = Fixture::start("[limits]\nmax_connections = 64\n").await;
    let admin_addr: std::net::SocketAddr = fx
        .sidecar
        .admin_url
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let mut held = silent(fx.sidecar.addr, 100, false).await;
    held.extend(silent(fx.sidecar.addr, 100, true).await);
    held.extend(silent(admin_addr, 100, false).await);
    held.extend(silent(admin_addr, 50, true).await);
    assert!(held.len() >= 200, "{} silent connections", held.len());

    let started = Instant::now();
    let token = post_form(&client(), &fx.sidecar.token_url(), FORM, None).await;
    assert_eq!(token.status, 200, "{}", token.text());
    let health = get(&format!("{}/healthz", fx.sidecar.admin_url)).await;
    assert_eq!(health.status, 200);
    eprintln!(
        "behind {} silent connections: token and /healthz answered in {:?}",
        held.len(),
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after {:?} behind {} silent connections",
        started.elapsed(),
        held.len()
    );
}

/// Reads until the peer closes; the time since `started` it took, or `None` past `limit`.
async fn closed_within(
    stream: &mut TcpStream,
    started: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn idle_connections_are_closed_after_their_timeouts() {
    let fx =
        Fixture::start("[limits]\nidle_timeout = \"1s\"\nheader_read_timeout = \"1s\"\n").await;
    let started = Instant::now();
    let mut never_spoke = TcpStream::connect(fx.sidecar.addr).await.unwrap();
    let mut h2_never_asked = TcpStream::connect(fx.sidecar.addr).await.unwrap();
    h2_never_asked.write_all(H2_PREFACE).await.unwrap();
    let mut kept_alive = TcpStream::connect(fx.sidecar.addr).await.unwrap();
    let request = format!(
        "POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{FORM}",
        FORM.len()
    );
    kept_alive.write_all(request.as_bytes()).await.unwrap();
    for (name, stream) in [
        ("silent", &mut never_spoke),
        ("h2c preface only", &mut h2_never_asked),
        ("idle keep-alive", &mut kept_alive),
    ] {
        let took = closed_within(stream, started, Duration::from_secs(5)).await;
        let took = took.unwrap_or_else(|| panic!("{name}: still open after 5 s"));
        assert!(
            took >= Duration::from_millis(800),
            "{name}: closed after {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_per_connection_are_capped() {
    let fx =
        Fixture::start(
        "[limits]\nmax_streams = 8\n[client]\nrequest_timeout = \"1s\"\n[token]\nabsorb_hold = \"0s\"\n",
    ).await;
    fx.idp.set_default(Answer::Hang);
    let stream = TcpStream::connect(fx.sidecar.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    // One exchange first, so the client has the server's SETTINGS (streams sent before them may
    // be refused, as HTTP/2 allows).
    let mut first = sender.clone();
    let warm = Request::get(format!("http://{}/status/204", fx.sidecar.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(first.send_request(warm).await.unwrap().status(), 204);
    let url = fx.sidecar.token_url();
    let calls: Vec<_> = (0..24)
        .map(|n| {
            let mut sender = sender.clone();
            let request = Request::post(url.as_str())
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(format!(
                    "grant_type=client_credentials&client_id=h2-{n}&client_secret=s"
                ))))
                .unwrap();
            tokio::spawn(async move {
                let response = sender.send_request(request).await;
                let response = response.map_err(|e| format!("{e:?}"))?;
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                Ok::<_, String>(status)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let concurrent = fx.idp.max_concurrent_token_calls();
    assert!(
        (1..=8).contains(&concurrent),
        "{concurrent} streams of one connection reached the provider at once"
    );
    for call in calls {
        let status = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, Ok(504), "each stream gets its answer in turn");
    }
    driver.abort();
}

async fn websocket(addr: std::net::SocketAddr) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (ws, response) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 101);
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_against_the_cap_and_close_when_idle() {
    let fx = Fixture::start("[limits]\nmax_connections = 3\ntunnel_idle_timeout = \"2s\"\n").await;
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(websocket(fx.sidecar.addr).await);
    }
    // Traffic keeps a tunnel open past its idle timeout.
    let mut busy = tunnels.pop().unwrap();
    let started = Instant::now();
    let waiting = tokio::spawn({
        let url = fx.sidecar.token_url();
        async move {
            let reply = post_form(&client(), &url, FORM, None).await;
            (reply.status, Instant::now())
        }
    });
    for i in 0..6 {
        busy.send(tungstenite_text(i)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), busy.next())
            .await
            .unwrap();
        assert!(
            echoed.is_some_and(|m| m.is_ok()),
            "the busy tunnel still carries bytes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, answered) = waiting.await.unwrap();
    assert_eq!(status, 200);
    let waited = answered - started;
    // Three tunnels filled the cap: the request waited until the idle ones closed (2 s).
    assert!(
        waited >= Duration::from_millis(1800),
        "answered after {waited:?}: tunnels did not count against the cap"
    );
    for mut idle in tunnels {
        let next = tokio::time::timeout(Duration::from_secs(5), idle.next())
            .await
            .unwrap();
        assert!(!matches!(
            next,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_)))
        ));
    }
}

fn tungstenite_text(i: usize) -> tokio_tungstenite::tungstenite::Message {
    tokio_tungstenite::tungstenite::Message::text(format!("ping {i}"))
}

#[tokio::test]
async fn http2_callers_keep_their_host_with_preserve_host() {
    let fx = Fixture::start("preserve_host = true\n").await;
    let stream = TcpStream::connect(fx.sidecar.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    for tenant in ["tenant-a.example", "tenant-b.example", "tenant-a.example"] {
        let request = Request::post(format!("http://{tenant}/oauth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(FORM)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let _ = response.into_body().collect().await;
    }
    let hosts: Vec<String> = fx
        .idp
        .recorded()
        .iter()
        .map(|r| r.headers[http::header::HOST].to_str().unwrap().to_owned())
        .collect();
    // Each tenant is its own key, and the provider sees each tenant's host.
    assert_eq!(hosts, ["tenant-a.example", "tenant-b.example"]);
    driver.abort();
}
