//! Faults, floods and absurd values: for each, what callers see (a served token while valid, a
//! clear error otherwise, never a hang), how many upstream calls the backoff allows, and
//! recovery on the first request after the provider is healthy again.
mod support;

use std::time::{Duration, Instant};
use support::sidecar::{Sidecar, config};
use support::{Behavior, FakeProvider, Reply, client, post_form};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FORM: &str = "grant_type=client_credentials&client_id=app&client_secret=s";
/// Short backoff so recovery happens within a test's time.
const FAST_BACKOFF: &str = "[token]\nbackoff_base = \"200ms\"\nbackoff_max = \"1s\"\n";

async fn token(sidecar: &Sidecar) -> Reply {
    let started = Instant::now();
    let reply = post_form(&client(), &sidecar.token_url(), FORM, None).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no caller hangs"
    );
    reply
}

/// Requests every 20 ms for `period`, returning the statuses seen.
async fn hammer(sidecar: &Sidecar, period: Duration) -> Vec<u16> {
    let until = Instant::now() + period;
    let mut statuses = Vec::new();
    for _ in 0..1000 {
        if Instant::now() >= until {
            break;
        }
        statuses.push(token(sidecar).await.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    statuses
}

/// Polls (bounded) until a request succeeds, returning it.
async fn until_ok(sidecar: &Sidecar) -> Reply {
    for _ in 0..100 {
        let reply = token(sidecar).await;
        if reply.status == 200 {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the sidecar never recovered");
}

#[tokio::test]
async fn provider_down_at_start_then_up_recovers_on_the_first_request_after_the_hold() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sidecar =
        Sidecar::start_with(config(&format!("http://127.0.0.1:{port}"), FAST_BACKOFF)).await;
    let first = token(&sidecar).await;
    assert_eq!(first.status, 502, "{}", first.text());
    assert_eq!(first.json()["error"], "temporarily_unavailable");
    let during: Vec<u16> = hammer(&sidecar, Duration::from_millis(300)).await;
    assert!(during.iter().all(|s| [429, 502].contains(s)), "{during:?}");

    let idp = FakeProvider::start_on(port).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // longer than any hold so far
    let recovered = token(&sidecar).await;
    assert_eq!(
        recovered.status,
        200,
        "first request after the hold: {}",
        recovered.text()
    );
    assert_eq!(idp.token_calls(), 1);
}

#[tokio::test]
async fn connection_resets_are_backed_off_then_recovered_from() {
    let idp = FakeProvider::start().await;
    idp.set_default(Behavior::Drop);
    let sidecar = Sidecar::start_with(config(&idp.url(), FAST_BACKOFF)).await;
    let statuses = hammer(&sidecar, Duration::from_secs(1)).await;
    assert!(
        statuses.iter().all(|s| [429, 502].contains(s)),
        "{statuses:?}"
    );
    let calls = idp.token_calls();
    assert!(
        (1..=15).contains(&calls),
        "{calls} upstream calls in 1 s of requests every 20 ms: backoff bounds them"
    );
    assert!(
        statuses.len() > 2 * calls,
        "most callers were answered from the hold: {calls} calls, {} requests",
        statuses.len()
    );
    idp.set_default(Behavior::token(3600));
    until_ok(&sidecar).await;
}

#[tokio::test]
async fn a_provider_slower_than_the_timeout_gives_504_then_recovers() {
    let idp = FakeProvider::start().await;
    idp.push(Behavior::Hang);
    let sidecar = Sidecar::start_with(config(
        &idp.url(),
        &format!("{FAST_BACKOFF}[client]\nrequest_timeout = \"300ms\"\n"),
    ))
    .await;
    let started = Instant::now();
    let slow = token(&sidecar).await;
    assert_eq!(slow.status, 504, "{}", slow.text());
    assert!(started.elapsed() < Duration::from_secs(2));
    let ok = until_ok(&sidecar).await;
    assert_eq!(
        ok.json()["expires_in"].as_u64().map(|e| e > 3500),
        Some(true)
    );
    assert_eq!(idp.token_calls(), 2);
}

#[tokio::test]
async fn garbage_is_a_502_and_never_cached() {
    let idp = FakeProvider::start().await;
    idp.push(Behavior::Garbage);
    idp.push(Behavior::Json(
        r#"{"token_type":"bearer","expires_in":3600}"#.into(),
    ));
    let sidecar = Sidecar::start_with(config(&idp.url(), FAST_BACKOFF)).await;
    let garbage = token(&sidecar).await;
    assert_eq!(garbage.status, 502);
    assert_eq!(garbage.json()["error"], "server_error");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let no_token = token(&sidecar).await;
    assert_eq!(
        no_token.status, 502,
        "a 200 without access_token is unusable too"
    );
    let ok = until_ok(&sidecar).await;
    assert!(
        ok.json()["access_token"]
            .as_str()
            .unwrap()
            .starts_with("tok-")
    );
    assert_eq!(idp.token_calls(), 3);
}

#[tokio::test]
async fn flapping_between_429_and_200_makes_no_call_inside_each_window() {
    let idp = FakeProvider::start().await;
    idp.push(Behavior::status(429, Some("1")));
    let sidecar = Sidecar::start(&idp.url()).await;
    let statuses = hammer(&sidecar, Duration::from_millis(800)).await;
    assert_eq!(statuses[0], 429);
    assert!(statuses.iter().all(|&s| s == 429), "{statuses:?}");
    assert_eq!(
        idp.token_calls(),
        1,
        "no call during the Retry-After window"
    );
    let ok = until_ok(&sidecar).await;
    assert_eq!(ok.status, 200);
    // Once healthy, the cached token serves everyone.
    idp.push(Behavior::status(429, Some("1")));
    let statuses = hammer(&sidecar, Duration::from_millis(300)).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(idp.token_calls(), 2);
}

#[tokio::test]
async fn a_503_with_an_http_date_is_honoured() {
    let idp = FakeProvider::start().await;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3));
    idp.push(Behavior::status(503, Some(&date)));
    let sidecar = Sidecar::start(&idp.url()).await;
    assert_eq!(token(&sidecar).await.status, 503);
    let held = token(&sidecar).await;
    assert_eq!(held.status, 429);
    let retry_after: u64 = held.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry_after), "{retry_after}");
    assert_eq!(idp.token_calls(), 1);
}

#[tokio::test]
async fn absurd_lifetimes_are_bounded() {
    let idp = FakeProvider::start().await;
    idp.set_default(Behavior::token(10_000_000_000));
    let sidecar = Sidecar::start(&idp.url()).await;
    let reply = token(&sidecar).await;
    assert!(
        reply.json()["expires_in"].as_u64().unwrap() <= 24 * 3600,
        "capped at max_lifetime"
    );

    let zero = FakeProvider::start().await;
    zero.set_default(Behavior::token(0));
    let sidecar = Sidecar::start(&zero.url()).await;
    assert_eq!(token(&sidecar).await.status, 200);
    assert_eq!(token(&sidecar).await.status, 200);
    assert_eq!(
        zero.token_calls(),
        2,
        "a token with no life left is passed on, never cached"
    );

    let negative = FakeProvider::start().await;
    negative.set_default(Behavior::token(-5));
    let sidecar = Sidecar::start(&negative.url()).await;
    assert_eq!(token(&sidecar).await.status, 502);
}

#[tokio::test]
async fn a_token_response_of_megabytes_is_refused_and_not_cached() {
    let idp = FakeProvider::start().await;
    let huge = format!(
        r#"{{"access_token":"{}","expires_in":3600}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    idp.push(Behavior::Json(huge));
    let sidecar = Sidecar::start_with(config(&idp.url(), FAST_BACKOFF)).await;
    let reply = token(&sidecar).await;
    assert_eq!(reply.status, 502);
    assert!(reply.body.len() < 1024);
    let ok = until_ok(&sidecar).await;
    assert!(ok.body.len() < 1024);
    assert_eq!(idp.token_calls(), 2);
}

/// One token request for each of `n` distinct client ids, all at once.
async fn distinct_clients_at_once(sidecar: &Sidecar, n: usize) -> Vec<Reply> {
    let (c, url) = (client(), sidecar.token_url());
    futures_util::future::join_all((0..n).map(|i| {
        let form = format!("grant_type=client_credentials&client_id=app{i}&client_secret=s");
        let (c, url) = (c.clone(), url.clone());
        async move { post_form(&c, &url, &form, None).await }
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_rate_limit_spaces_calls_across_distinct_keys() {
    let idp = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config(
        &idp.url(),
        "[token]\ncalls_per_second = 10.0\ncalls_burst = 1\n",
    ))
    .await;
    let started = Instant::now();
    let replies = distinct_clients_at_once(&sidecar, 8).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(idp.token_calls(), 8);
    assert!(
        started.elapsed() >= Duration::from_millis(650),
        "8 calls at 10/s with a burst of 1 take at least 0.7 s: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_limiter_cannot_fit_before_the_deadline_get_an_honest_429() {
    let idp = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config(
        &idp.url(),
        "[token]\ncalls_per_second = 1.0\ncalls_burst = 1\nwait_timeout = \"1s\"\n[client]\nrequest_timeout = \"500ms\"\n",
    ))
    .await;
    let replies = distinct_clients_at_once(&sidecar, 4).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let held: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok, 1, "one call fits the burst");
    assert_eq!(held.len(), 3);
    for reply in held {
        let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=4).contains(&retry_after), "{retry_after}");
        assert_eq!(reply.json()["error"], "temporarily_unavailable");
    }
    assert_eq!(idp.token_calls(), 1);
}

#[tokio::test]
async fn idle_keys_are_evicted_and_not_refreshed() {
    let idp = FakeProvider::start().await;
    let sidecar =
        Sidecar::start_with(config(&idp.url(), "[token]\nidle_timeout = \"500ms\"\n")).await;
    assert_eq!(token(&sidecar).await.status, 200);
    assert_eq!(token(&sidecar).await.status, 200);
    assert_eq!(idp.token_calls(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains(r#"token_sidecar_cache_entries{route="default"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"token_sidecar_cache_evictions_total{route="default",reason="idle"} 1"#),
        "{metrics}"
    );
    assert_eq!(idp.token_calls(), 1, "an idle key is not refreshed");
    assert_eq!(token(&sidecar).await.status, 200);
    assert_eq!(idp.token_calls(), 2);
}

#[tokio::test]
async fn the_cache_never_grows_past_max_entries() {
    let idp = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config(&idp.url(), "[token]\nmax_entries = 16\n")).await;
    let c = client();
    for i in 0..40 {
        let form = format!("grant_type=client_credentials&client_id=app{i}&client_secret=s");
        assert_eq!(
            post_form(&c, &sidecar.token_url(), &form, None)
                .await
                .status,
            200
        );
    }
    let metrics = sidecar.metrics().await;
    let entries: usize = metrics
        .lines()
        .find(|l| l.starts_with("token_sidecar_cache_entries{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(entries <= 16, "{entries} entries");
    assert!(
        metrics.contains(r#"cache_evictions_total{route="default",reason="capacity"}"#),
        "{metrics}"
    );
}

/// Sends raw bytes on a fresh connection and returns what comes back before close (bounded).
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_or_too_many_headers_are_refused() {
    let idp = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config(
        &idp.url(),
        "[limits]\nmax_headers = 20\nmax_header_bytes = 8192\n",
    ))
    .await;
    let big = format!(
        "GET /echo HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let answer = raw_exchange(sidecar.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let many: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
    let answer = raw_exchange(
        sidecar.addr,
        format!("GET /echo HTTP/1.1\r\nhost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(idp.requests(), 0);
}

#[tokio::test]
async fn a_slow_loris_connection_is_closed_after_the_header_timeout() {
    let idp = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config(
        &idp.url(),
        "[limits]\nheader_read_timeout = \"300ms\"\n",
    ))
    .await;
    let mut stream = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(idp.requests(), 0);
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let idp = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config(&idp.url(), "[limits]\nmax_connections = 2\n")).await;
    let hold_a = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    let hold_b = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = tokio::spawn({
        let addr = sidecar.addr;
        async move {
            raw_exchange(
                addr,
                b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection is not served while two are open"
    );
    drop(hold_a);
    let answer = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(hold_b);
}
