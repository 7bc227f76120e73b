//! Self-test of `tests/support`: every scripted behaviour and utility endpoint of the fake
//! identity provider, exercised directly with a hyper client, without the sidecar; then the
//! network and Redis the fleet tier's tests stand on: the TCP proxy's latency, stall, byte loss
//! and cut against a real `redis-server`, a Redis Cluster, and a Sentinel failover.

use crate::support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Method, Request};
use http_body_util::Full;
use support::latency::TcpProxy;
use support::redis::{RedisCluster, RedisSentinel, RedisServer};
use support::tls::{test_pki, tls_client};
use support::{Answer, FakeProvider, client, form_encode, post_form, send};
use tokio_tungstenite::tungstenite::Message;

const CC: &str = "grant_type=client_credentials";

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn default_token_is_issued_and_counted() {
    let idp = FakeProvider::start().await;
    let c = client();
    let url = format!("{}/oauth2/token", idp.url());

    let form = format!("{CC}&scope={}", form_encode("read write"));
    let a = post_form(&c, &url, &form, None).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("application/json")
    );
    let a = a.json();
    assert!(a["access_token"].as_str().unwrap().starts_with("tok-"));
    assert_eq!(a["token_type"], "bearer");
    assert_eq!(a["expires_in"], 3600);
    assert_eq!(a["scope"], "read write");

    let b = post_form(&c, &url, CC, None).await.json();
    assert_ne!(
        a["access_token"], b["access_token"],
        "each call issues a new token"
    );
    assert!(b.get("scope").is_none(), "no scope requested, none echoed");

    assert_eq!(idp.token_calls(), 2);
    assert_eq!(idp.requests(), 2);
    assert_eq!(idp.max_concurrent_token_calls(), 1);
    let rec = idp.recorded();
    assert_eq!(rec.len(), 2);
    assert_eq!(rec[0].method, Method::POST);
    assert_eq!(rec[0].path_and_query, "/oauth2/token");
    assert_eq!(rec[0].body, Bytes::from(form));
    assert_eq!(
        rec[0].headers["content-type"],
        "application/x-www-form-urlencoded"
    );

    // A GET to a token path is not a token call.
    assert_eq!(send(&c, get(&url)).await.status, 404);
    assert_eq!(idp.token_calls(), 2);
    assert_eq!(idp.requests(), 3);
}

#[tokio::test]
async fn concurrent_token_calls_are_measured() {
    let idp = FakeProvider::start().await;
    idp.set_default(Answer::slow_token(60, Duration::from_millis(300)));
    let c = client();
    let url = format!("{}/token", idp.url());
    let calls = (0..5).map(|_| post_form(&c, &url, CC, None));
    let replies = futures_util::future::join_all(calls).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && r.json()["expires_in"] == 60)
    );
    assert_eq!(idp.token_calls(), 5);
    assert_eq!(idp.max_concurrent_token_calls(), 5);
}

#[tokio::test]
async fn pushed_behaviours_are_consumed_in_order_then_default() {
    let idp = FakeProvider::start().await;
    let c = client();
    let url = format!("{}/token", idp.url());
    idp.push(Answer::status(503, None));
    idp.push(Answer::Json(
        r#"{"access_token":"fixed","expires_in":5}"#.into(),
    ));
    idp.push(Answer::Garbage);
    idp.push(Answer::status(400, None));
    idp.set_default(Answer::token(120));

    let r = post_form(&c, &url, CC, None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "temporarily_unavailable");
    assert_eq!(r.header("retry-after"), None);

    let r = post_form(&c, &url, CC, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, r#"{"access_token":"fixed","expires_in":5}"#);

    let r = post_form(&c, &url, CC, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert!(serde_json::from_slice::<serde_json::Value>(&r.body).is_err());

    let r = post_form(&c, &url, CC, None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_request");

    for _ in 0..2 {
        let r = post_form(&c, &url, CC, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["expires_in"], 120);
    }
    assert_eq!(idp.token_calls(), 6);
}

#[tokio::test]
async fn status_retry_after_is_verbatim() {
    let idp = FakeProvider::start().await;
    let c = client();
    let url = format!("{}/token", idp.url());
    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    idp.push(Answer::status(429, Some(date)));
    idp.push(Answer::Status {
        status: 500,
        retry_after: Some("2".into()),
        body: r#"{"error":"boom"}"#.into(),
        delay: Duration::from_millis(50),
    });

    let r = post_form(&c, &url, CC, None).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after").as_deref(), Some(date));
    assert_eq!(r.json()["error"], "temporarily_unavailable");

    let started = Instant::now();
    let r = post_form(&c, &url, CC, None).await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(r.status, 500);
    assert_eq!(r.header("retry-after").as_deref(), Some("2"));
    assert_eq!(r.body, r#"{"error":"boom"}"#);
}

#[tokio::test]
async fn the_call_log_names_each_calls_client_status_and_token_and_tokens_are_padded() {
    let idp = FakeProvider::start().await;
    let c = client();
    let url = format!("{}/token", idp.url());
    idp.set_call_log_limit(3);
    idp.set_token_bytes(64);
    idp.push(Answer::status(429, Some("7")));

    let throttled = post_form(&c, &url, &format!("{CC}&client_id=a&client_secret=s"), None).await;
    assert_eq!(throttled.status, 429);
    let ok = post_form(&c, &url, CC, Some(("b", "s"))).await;
    let token = ok.json()["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("tok-") && token.ends_with('x') && token.len() == 64);
    post_form(&c, &url, CC, None).await;
    post_form(&c, &url, CC, None).await; // past the log's bound

    let calls = idp.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0].client_id.as_deref(), Some("a"));
    assert_eq!(calls[0].status.map(|s| s.as_u16()), Some(429));
    assert_eq!(calls[0].retry_after.as_deref(), Some("7"));
    assert_eq!(calls[0].access_token, None);
    assert_eq!(calls[1].client_id.as_deref(), Some("b"));
    assert_eq!(calls[1].access_token.as_deref(), Some(token.as_str()));
    assert_eq!(calls[2].client_id, None);
    assert!(
        calls
            .iter()
            .all(|c| c.arrived <= c.answered && c.answered <= idp.clock())
    );
}

#[tokio::test]
async fn a_mix_draws_faults_at_their_rates_after_the_queue() {
    let idp = FakeProvider::start().await;
    let c = client();
    let url = format!("{}/token", idp.url());
    idp.set_mix(&[(1.0, Answer::status(503, None))], 1);
    idp.push(Answer::token(60));
    assert_eq!(post_form(&c, &url, CC, None).await.status, 200);
    assert_eq!(post_form(&c, &url, CC, None).await.status, 503);
    idp.set_mix(&[(0.0, Answer::status(503, None))], 1);
    assert_eq!(post_form(&c, &url, CC, None).await.status, 200);
}

#[tokio::test]
async fn client_credentials_are_checked() {
    let idp = FakeProvider::start().await;
    let c = client();
    let url = format!("{}/token", idp.url());
    // Characters that RFC 6749 2.3.1 form-encoding must protect (':' '+' '%' ' ').
    let (id, secret) = ("svc:a", "s3 cr+t%");
    idp.set_clients(&[(id, secret), ("other", "x")]);

    let r = post_form(&c, &url, CC, Some((id, "wrong"))).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid_client");

    let r = post_form(&c, &url, CC, None).await;
    assert_eq!(r.status, 401, "no credentials at all");

    let r = post_form(&c, &url, CC, Some((id, secret))).await;
    assert_eq!(r.status, 200, "Basic: {}", r.text());

    let form = format!(
        "{CC}&client_id={}&client_secret={}",
        form_encode(id),
        form_encode(secret)
    );
    let r = post_form(&c, &url, &form, None).await;
    assert_eq!(r.status, 200, "form: {}", r.text());

    let form = format!("{CC}&client_id=other&client_secret=y");
    assert_eq!(post_form(&c, &url, &form, None).await.status, 401);

    // Rejected calls still count as token calls.
    assert_eq!(idp.token_calls(), 5);

    idp.set_clients(&[]);
    assert_eq!(post_form(&c, &url, CC, None).await.status, 200);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_are_single_use() {
    let idp = FakeProvider::start().await;
    let c = client();
    let url = format!("{}/token", idp.url());
    let refresh = |rt: &str| format!("grant_type=refresh_token&refresh_token={}", form_encode(rt));

    let rt1 = idp.issue_refresh_token();
    let r = post_form(&c, &url, &refresh(&rt1), None).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert!(body["access_token"].as_str().unwrap().starts_with("tok-"));
    assert_eq!(body["expires_in"], 3600);
    let rt2 = body["refresh_token"].as_str().unwrap().to_owned();
    assert!(rt2.starts_with("rt-") && rt2 != rt1);

    let r = post_form(&c, &url, &refresh(&rt1), None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_grant");

    let r = post_form(&c, &url, &refresh("rt-unknown"), None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_grant");

    // Two overlapping uses of the same token: exactly one wins.
    idp.set_refresh_delay(Duration::from_millis(200));
    let form = refresh(&rt2);
    let (a, b) = tokio::join!(
        post_form(&c, &url, &form, None),
        post_form(&c, &url, &form, None),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 400]);
    assert_eq!(idp.max_concurrent_token_calls(), 2);
    assert_eq!(idp.token_calls(), 5);
}

#[tokio::test]
async fn users_me_answers_only_bearer_tokens_its_issuer_gave_out() {
    let login = FakeProvider::start().await;
    let api = FakeProvider::start().await;
    api.accept_tokens_of(&login);
    let c = client();
    let users_me = |base: &str, auth: Option<&str>| {
        let mut req = Request::get(format!("{base}/api/v2/users/me"));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        req.body(Full::new(Bytes::new())).unwrap()
    };

    let token = post_form(&c, &format!("{}/oauth/token", login.url()), CC, None)
        .await
        .json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bearer = format!("Bearer {token}");
    let me = send(&c, users_me(&api.url(), Some(&bearer))).await;
    assert_eq!(me.status, 200, "{}", me.text());
    assert_eq!(me.json()["id"], "fake-user");
    // The issuer accepts its own tokens too; the scheme is case-insensitive.
    let me = send(&c, users_me(&login.url(), Some(&format!("bearer {token}")))).await;
    assert_eq!(me.status, 200, "{}", me.text());

    for auth in [None, Some("Bearer tok-never-issued"), Some("Basic dTpw")] {
        let me = send(&c, users_me(&api.url(), auth)).await;
        assert_eq!(me.status, 401, "{auth:?}");
        assert_eq!(me.json()["code"], "bad.credentials");
    }
    // A provider that accepts nobody else's tokens rejects this one.
    let stranger = FakeProvider::start().await;
    assert_eq!(
        send(&c, users_me(&stranger.url(), Some(&bearer)))
            .await
            .status,
        401
    );

    let rec = api.recorded();
    assert_eq!(rec.len(), 4, "API calls are recorded");
    assert_eq!(rec[0].path_and_query, "/api/v2/users/me");
    assert_eq!(rec[0].headers["authorization"], bearer.as_str());
    assert_eq!(api.token_calls(), 0);
    assert_eq!(login.token_calls(), 1);
}

#[tokio::test]
async fn echo_reports_the_request() {
    let idp = FakeProvider::start().await;
    let c = client();
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("{}/echo/some/path?a=1&b=two", idp.url()))
        .header("x-test", "hello")
        .body(Full::new(Bytes::from_static(b"12345")))
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo").as_deref(), Some("1"));
    let body = r.json();
    assert_eq!(body["method"], "PUT");
    assert_eq!(body["path"], "/echo/some/path");
    assert_eq!(body["query"], "a=1&b=two");
    assert_eq!(body["headers"]["x-test"], "hello");
    assert_eq!(body["body_len"], 5);

    let body = send(&c, get(&format!("{}/echo", idp.url()))).await.json();
    assert_eq!(body["method"], "GET");
    assert!(body["query"].is_null());
    assert_eq!(idp.token_calls(), 0);
    assert_eq!(idp.recorded()[0].body, Bytes::from_static(b"12345"));
}

#[tokio::test]
async fn bytes_upload_status_and_not_found() {
    let idp = FakeProvider::start().await;
    let c = client();
    let n = 3 * 64 * 1024 + 17;
    let r = send(&c, get(&format!("{}/bytes/{n}", idp.url()))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), n);
    assert_eq!(&r.body[..3], b"abc");
    assert_eq!(r.body[26], b'a');
    assert_eq!(
        send(&c, get(&format!("{}/bytes/0", idp.url())))
            .await
            .body
            .len(),
        0
    );

    let upload = Request::post(format!("{}/upload", idp.url()))
        .body(Full::new(Bytes::from(vec![7u8; 1_000_003])))
        .unwrap();
    let r = send(&c, upload).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "1000003");

    let r = send(&c, get(&format!("{}/status/418", idp.url()))).await;
    assert_eq!(r.status, 418);
    assert!(r.body.is_empty());
    let r = send(&c, get(&format!("{}/status/503", idp.url()))).await;
    assert_eq!(r.status, 503);

    assert_eq!(
        send(&c, get(&format!("{}/nope", idp.url()))).await.status,
        404
    );
    assert_eq!(idp.requests(), 6);
    assert_eq!(idp.recorded().len(), 6);
}

#[tokio::test]
async fn drop_closes_the_connection_without_a_response() {
    let idp = FakeProvider::start().await;
    let c = client();
    let url = format!("{}/token", idp.url());
    idp.push(Answer::Drop);
    let req = Request::post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(CC.as_bytes())))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .expect("Drop must close the connection promptly");
    assert!(res.is_err(), "expected a transport error, got {res:?}");
    assert_eq!(
        idp.recorded()[0].body,
        CC.as_bytes(),
        "the request was read"
    );
    // The one-shot is consumed; the next call gets the default.
    assert_eq!(post_form(&c, &url, CC, None).await.status, 200);
    assert_eq!(idp.token_calls(), 2);
}

#[tokio::test]
async fn hang_never_answers_and_drop_stops_the_server() {
    let idp = FakeProvider::start().await;
    let addr = idp.addr();
    let c = client();
    let url = format!("{}/token", idp.url());
    idp.set_default(Answer::Hang);
    let req = Request::post(&url).body(Full::new(Bytes::from_static(CC.as_bytes())));
    let pending = tokio::spawn(c.request(req.unwrap()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "Hang must not answer");
    assert_eq!(idp.max_concurrent_token_calls(), 1);

    // Dropping the provider kills the hanging connection and the listener.
    drop(idp);
    let res = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("dropping the provider must end in-flight connections")
        .unwrap();
    assert!(res.is_err());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn websocket_echoes_frames() {
    let idp = FakeProvider::start().await;
    let url = format!("ws://{}/ws", idp.addr());
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .unwrap()
    .expect("websocket handshake");
    assert_eq!(resp.status(), 101);

    ws.send(Message::text("hello ws")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert_eq!(got.unwrap().unwrap(), Message::text("hello ws"));

    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert_eq!(got.unwrap().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));

    ws.close(None).await.unwrap();
    assert_eq!(idp.recorded()[0].path_and_query, "/ws");
}

#[tokio::test]
async fn tls_provider_answers_a_client_trusting_the_test_ca() {
    let pki = test_pki();
    let idp = FakeProvider::start_tls(&pki).await;
    assert!(idp.url().starts_with("https://127.0.0.1:"));
    let c = tls_client(&pki.ca);

    let r = post_form(&c, &format!("{}/token", idp.url()), CC, None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.json()["access_token"]
            .as_str()
            .unwrap()
            .starts_with("tok-")
    );

    // By DNS name too, on the same (kept-alive or new) connections.
    let localhost = format!("https://localhost:{}", idp.addr().port());
    let n = 1_000_000;
    let r = send(&c, get(&format!("{localhost}/bytes/{n}"))).await;
    assert_eq!(r.body.len(), n);
    let upload = Request::post(format!("{localhost}/upload"))
        .body(Full::new(Bytes::from(vec![1u8; n])))
        .unwrap();
    assert_eq!(send(&c, upload).await.text(), n.to_string());
    assert_eq!(idp.token_calls(), 1);
    assert_eq!(idp.requests(), 3);

    // A client that does not trust the CA is refused.
    let untrusting = tls_client(&test_pki().ca);
    let res = untrusting
        .request(get(&format!("{}/echo", idp.url())))
        .await;
    assert!(res.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_token_calls() {
    let idp = FakeProvider::start().await;
    idp.set_default(Answer::slow_token(60, Duration::from_secs(1)));
    let c = client();
    let url = format!("{}/token", idp.url());
    let calls = (0..1000).map(|_| post_form(&c, &url, CC, None));
    let replies = futures_util::future::join_all(calls).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(idp.token_calls(), 1000);
    assert_eq!(idp.max_concurrent_token_calls(), 1000);
}

// ---------------------------------------------------------------------------------------------
// The network and Redis of the fleet tier's tests
// ---------------------------------------------------------------------------------------------

const PONG: &[u8] = b"+PONG\r\n";

/// A real `redis-server` and a proxy in front of it.
async fn proxied_redis() -> (RedisServer, TcpProxy) {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], redis.port))).await;
    (redis, proxy)
}

/// Reads until a line ends (a whole simple RESP reply) or `bound` passes; what came, maybe empty.
async fn read_reply(stream: &mut tokio::net::TcpStream, bound: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let deadline = tokio::time::Instant::now() + bound;
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    while !reply.ends_with(b"\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => reply.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    reply
}

/// Sends an inline `PING` and reads the reply (bounded by 5 s).
async fn ping(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncWriteExt as _;
    stream.write_all(b"PING\r\n").await.unwrap();
    read_reply(stream, Duration::from_secs(5)).await
}

async fn connect(proxy: &TcpProxy) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(proxy.addr()).await.unwrap()
}

/// Whether the peer closed or reset the connection within 2 s.
async fn closed(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
    matches!(read, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn tcp_proxy_delays_both_ways_without_serialising_chunks() {
    use tokio::io::AsyncWriteExt as _;
    let (_redis, proxy) = proxied_redis().await;
    let client = redis::Client::open(proxy.redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let latency = Duration::from_millis(150);
    proxy.set_latency(latency);

    let started = Instant::now();
    let pong: String = redis::cmd("PING").query_async(&mut redis).await.unwrap();
    let round_trip = started.elapsed();
    assert_eq!(pong, "PONG");
    assert!(
        round_trip >= 2 * latency,
        "{round_trip:?}: latency each way"
    );

    // Five pings written 20 ms apart are in the line together: the last reply comes about one
    // round trip after the last ping (~380 ms in all); a proxy that slept the latency per chunk
    // would take at least 5 x 150 ms one way.
    let mut raw = connect(&proxy).await;
    let started = Instant::now();
    for _ in 0..5 {
        raw.write_all(b"PING\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut replies = Vec::new();
    while replies.len() < 5 * PONG.len() {
        let more = read_reply(&mut raw, Duration::from_secs(5)).await;
        assert!(!more.is_empty(), "replies stopped at {replies:?}");
        replies.extend(more);
    }
    let took = started.elapsed();
    assert_eq!(replies, PONG.repeat(5));
    assert!(took >= 2 * latency + Duration::from_millis(80), "{took:?}");
    assert!(
        took < Duration::from_millis(700),
        "{took:?}: chunks were serialised"
    );
}

#[tokio::test]
async fn tcp_proxy_stall_holds_bytes_until_released() {
    use tokio::io::AsyncWriteExt as _;
    let (_redis, proxy) = proxied_redis().await;
    let mut conn = connect(&proxy).await;
    assert_eq!(ping(&mut conn).await, PONG);

    proxy.stall(true);
    conn.write_all(b"PING\r\n").await.unwrap();
    let stalled = read_reply(&mut conn, Duration::from_millis(300)).await;
    assert!(stalled.is_empty(), "a stalled link delivered {stalled:?}");

    proxy.stall(false);
    let started = Instant::now();
    assert_eq!(read_reply(&mut conn, Duration::from_secs(2)).await, PONG);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(ping(&mut conn).await, PONG);
}

#[tokio::test]
async fn tcp_proxy_drop_bytes_corrupts_the_next_reply() {
    let (_redis, proxy) = proxied_redis().await;
    let mut conn = connect(&proxy).await;
    assert_eq!(ping(&mut conn).await, PONG);

    proxy.drop_bytes(3);
    assert_eq!(
        ping(&mut conn).await,
        b"NG\r\n",
        "the reply's first 3 bytes, `+PO`, are lost"
    );
    assert_eq!(ping(&mut conn).await, PONG, "only the next 3 bytes");

    // A client's protocol stream desynchronises: "PONG\r\n" is no RESP reply.
    let client = redis::Client::open(proxy.redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    proxy.drop_bytes(1);
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        redis::cmd("PING").query_async::<String>(&mut redis),
    )
    .await;
    assert!(
        !matches!(reply, Ok(Ok(ref pong)) if pong == "PONG"),
        "{reply:?}"
    );
}

#[tokio::test]
async fn tcp_proxy_cut_closes_every_connection_and_drop_stops_it() {
    let (_redis, proxy) = proxied_redis().await;
    let (mut a, mut b) = (connect(&proxy).await, connect(&proxy).await);
    assert_eq!(ping(&mut a).await, PONG);
    assert_eq!(ping(&mut b).await, PONG);

    proxy.cut();
    assert!(closed(&mut a).await, "cut must close the first connection");
    assert!(closed(&mut b).await, "cut must close the second connection");

    // The link is back for new connections.
    let mut c = connect(&proxy).await;
    assert_eq!(ping(&mut c).await, PONG);

    let (addr, port) = (proxy.addr(), proxy.port());
    assert_eq!(addr.port(), port);
    drop(proxy);
    assert!(
        closed(&mut c).await,
        "dropping the proxy closes its connections"
    );
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "a dropped proxy stops listening");
}

#[tokio::test]
async fn redis_cluster_spreads_keys_over_its_masters() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3))
        .await
        .unwrap();
    assert_eq!(cluster.urls().len(), 3);
    assert_eq!(cluster.seeds(), cluster.urls().join(","));

    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut redis = client.get_async_connection().await.unwrap();
    // Slots 15495, 3300 and 7365: one in each master's third of the slot space.
    let keys = ["a", "b", "c"];
    let mut slots = Vec::new();
    for key in keys {
        let () = redis::cmd("SET")
            .arg(key)
            .arg(format!("value of {key}"))
            .query_async(&mut redis)
            .await
            .unwrap();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        slots.push(slot);
    }
    assert_eq!(slots, [15495, 3300, 7365]);
    for key in keys {
        let value: String = redis::cmd("GET")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(value, format!("value of {key}"));
    }
    for url in cluster.urls() {
        let node = redis::Client::open(url.as_str()).unwrap();
        let mut node = node.get_multiplexed_async_connection().await.unwrap();
        let keys: u64 = redis::cmd("DBSIZE").query_async(&mut node).await.unwrap();
        assert_eq!(keys, 1, "{url} holds one of the three keys");
    }
    assert_eq!(cluster.ports().len(), 3);
}

/// `GET key` on a fresh connection to the server on loopback `port`.
async fn redis_get(port: u16, key: &str) -> Option<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap()
}

#[tokio::test]
async fn redis_sentinel_fails_over_to_the_replica() {
    use redis::sentinel::{SentinelClient, SentinelServerType};
    let group = tokio::task::spawn_blocking(RedisSentinel::start)
        .await
        .unwrap();
    let (first, replica) = (group.primary_port(), group.replica_port());
    let mut sentinel = SentinelClient::build(
        group.sentinel_urls(),
        group.master_name(),
        None,
        SentinelServerType::Master,
    )
    .unwrap();
    let mut primary = sentinel.get_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg("before")
        .arg("1")
        .query_async(&mut primary)
        .await
        .unwrap();
    // The write reaches the replica before the primary dies, so it must survive the failover.
    let mut replicated = false;
    for _ in 0..100 {
        replicated = redis_get(replica, "before").await.as_deref() == Some("1");
        if replicated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(replicated, "the replica has the write within 2 s");

    let started = Instant::now();
    let group = tokio::task::spawn_blocking(move || {
        let mut group = group;
        group.kill_primary();
        group.wait_failover(Duration::from_secs(15));
        group
    })
    .await
    .unwrap();
    eprintln!("failover in {:?}", started.elapsed());
    assert_eq!(
        (group.primary_port(), group.replica_port()),
        (replica, first)
    );

    // Sentinel now leads clients to the promoted replica, which takes writes.
    let mut primary = sentinel.get_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg("after")
        .arg("2")
        .query_async(&mut primary)
        .await
        .unwrap();
    let before: String = redis::cmd("GET")
        .arg("before")
        .query_async(&mut primary)
        .await
        .unwrap();
    assert_eq!(before, "1");
    // On its own port too (Sentinel closed its old clients at the promotion).
    assert_eq!(redis_get(replica, "after").await.as_deref(), Some("2"));
}
