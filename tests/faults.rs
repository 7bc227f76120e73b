//! Faults, floods and absurd values: for each, what callers see (a served token while valid, a
//! clear error otherwise, never a hang), how many upstream calls the backoff allows, and
//! recovery on the first request after the provider is healthy again.
//!
//! The ways a provider can fail a token call are one table, [`faults`]; each behaviour is one
//! test that walks it.
use crate::support;

use std::ops::Range;
use std::time::{Duration, Instant};
use support::oauth::{
    access_token, assert_cooling_down, assert_oauth_error, cache_status, expires_in, retry_after,
};
use support::sidecar::{Sidecar, config};
use support::{Answer, FakeProvider, Fixture, Reply, client, post_form};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FORM: &str = "grant_type=client_credentials&client_id=app&client_secret=s";
/// Short backoff so recovery happens within a test's time, passed on to callers (not absorbed) so
/// the test sees each hold.
const FAST_BACKOFF: &str =
    "[token]\nbackoff_base = \"200ms\"\nbackoff_max = \"1s\"\nabsorb_hold = \"0s\"\n";
/// For the fault table: the first hold after a failure lasts at most `backoff_base` (full
/// jitter) and later ones double up to the default `backoff_max` of 60 s; the provider gets 1 s.
/// Holds are passed on (`absorb_hold = "0s"`), so what callers see during one is what is tested;
/// tests/token_path.rs tests absorbing them.
const FAULT_CONFIG: &str =
    "[token]\nbackoff_base = \"1s\"\nabsorb_hold = \"0s\"\n[client]\nrequest_timeout = \"1s\"\n";
/// Passes holds on instead of absorbing them.
const PASS_HOLDS: &str = "[token]\nabsorb_hold = \"0s\"\n";
/// The Cache-Status of an answer from a local hold.
const COOLDOWN: &str = "token-sidecar; detail=cooldown";

/// Asks for a token on a fresh connection, asserting that no caller hangs.
async fn token(sidecar: &Sidecar) -> Reply {
    let started = Instant::now();
    let reply = post_form(&client(), &sidecar.token_url(), FORM, None).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no caller hangs"
    );
    reply
}

/// Requests every 20 ms for `period`, returning the answers.
async fn hammer(sidecar: &Sidecar, period: Duration) -> Vec<Reply> {
    let until = Instant::now() + period;
    let mut replies = Vec::new();
    for _ in 0..1000 {
        if Instant::now() >= until {
            break;
        }
        replies.push(token(sidecar).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replies
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
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

// ---------------------------------------------------------------------------------------------
// Provider faults
// ---------------------------------------------------------------------------------------------

/// One way the provider can fail a token call, and what the caller is told about it.
struct Fault {
    /// Names the row in assertion messages.
    name: &'static str,
    provider: Answer,
    status: u16,
    /// The RFC 6749 §5.2 `error` code of the answer.
    error: &'static str,
    /// The whole Cache-Status of the answer that carried the fault.
    cache_status: &'static str,
    /// How long after the request the answer arrives.
    answered: Range<Duration>,
}

/// An answer without waiting on the provider (and no caller hangs).
const PROMPT: Range<Duration> = Duration::ZERO..Duration::from_secs(5);

fn faults() -> Vec<Fault> {
    let huge = format!(
        r#"{{"access_token":"{}","expires_in":3600}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    vec![
        Fault {
            name: "garbage",
            provider: Answer::Garbage,
            status: 502,
            error: "server_error",
            cache_status: "token-sidecar; fwd=miss; detail=server_error",
            answered: PROMPT,
        },
        Fault {
            name: "a 200 without access_token",
            provider: Answer::Json(r#"{"token_type":"bearer","expires_in":3600}"#.into()),
            status: 502,
            error: "server_error",
            cache_status: "token-sidecar; fwd=miss; detail=server_error",
            answered: PROMPT,
        },
        Fault {
            name: "a token response of megabytes",
            provider: Answer::Json(huge),
            status: 502,
            error: "server_error",
            cache_status: "token-sidecar; fwd=miss; detail=server_error",
            answered: PROMPT,
        },
        Fault {
            name: "a dropped connection",
            provider: Answer::Drop,
            status: 502,
            error: "temporarily_unavailable",
            cache_status: "token-sidecar; fwd=miss; detail=temporarily_unavailable",
            answered: PROMPT,
        },
        Fault {
            name: "no answer within the request timeout",
            provider: Answer::Hang,
            status: 504,
            error: "temporarily_unavailable",
            cache_status: "token-sidecar; fwd=miss; detail=temporarily_unavailable",
            // The 1 s request timeout of FAULT_CONFIG.
            answered: Duration::from_millis(900)..Duration::from_millis(2500),
        },
        Fault {
            name: "a 500 without Retry-After",
            provider: Answer::status(500, None),
            status: 500,
            error: "server_error",
            cache_status: "token-sidecar; fwd=miss; fwd-status=500",
            answered: PROMPT,
        },
    ]
}

/// Asserts that `reply` is the answer `fault` gives: its status, error and Cache-Status, and a
/// short body that carries nothing of what the provider sent.
fn assert_fault(fault: &Fault, reply: &Reply) {
    let name = fault.name;
    assert_eq!(reply.status, fault.status, "{name}: {}", reply.text());
    assert_oauth_error(reply, fault.status, fault.error);
    assert_eq!(cache_status(reply), fault.cache_status, "{name}");
    assert!(
        reply.body.len() < 1024,
        "{name}: {} bytes",
        reply.body.len()
    );
    assert!(!reply.text().contains("<html>"), "{name}: {}", reply.text());
}

/// Asserts a hold's answer: a local 429 whose Retry-After is at most `at_most`.
fn assert_held(fault: &Fault, reply: &Reply, at_most: Duration) {
    assert_eq!(cache_status(reply), COOLDOWN, "{}", fault.name);
    assert_cooling_down(reply, at_most);
    let description = reply.json()["error_description"].to_string();
    assert!(
        description.contains("backing off") && !description.contains("asked to wait"),
        "{}: a hold after a failure says so: {description}",
        fault.name
    );
}

/// Runs `check` for every row at once, each against its own provider and sidecar.
async fn for_each_fault<F, Fut>(rows: Vec<Fault>, check: F)
where
    F: Fn(Fault) -> Fut,
    Fut: Future<Output = ()>,
{
    futures_util::future::join_all(rows.into_iter().map(check)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_gives_a_clear_error_is_never_cached_and_the_first_request_past_the_hold_heals() {
    for_each_fault(faults(), |fault| async move {
        let name = fault.name;
        let fx = Fixture::start(FAULT_CONFIG).await;
        fx.idp.push(fault.provider.clone());

        let started = Instant::now();
        let first = token(&fx.sidecar).await;
        let took = started.elapsed();
        assert!(
            fault.answered.contains(&took),
            "{name}: answered after {took:?}"
        );
        assert_fault(&fault, &first);
        assert_eq!(fx.idp.token_calls(), 1, "{name}");

        // Held for at most `backoff_base`, then the next answer comes from a new upstream call.
        let mut healed = None;
        for _ in 0..60 {
            let reply = token(&fx.sidecar).await;
            if reply.status == 200 {
                healed = Some(reply);
                break;
            }
            assert_held(&fault, &reply, Duration::from_secs(1));
            assert_eq!(
                fx.idp.token_calls(),
                1,
                "{name}: no upstream call during the hold"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let healed = healed.unwrap_or_else(|| panic!("{name}: still held after 3 s"));
        assert!(access_token(&healed).starts_with("tok-"), "{name}");
        assert!(expires_in(&healed) > 3500, "{name}");
        assert!(healed.body.len() < 1024, "{name}");
        assert_eq!(fx.idp.token_calls(), 2, "{name}");
        fx.sidecar.stop().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_keeps_failing_is_backed_off_then_recovered_from_after_the_hold() {
    // A row that hangs spends the request timeout on every call, which would measure the
    // timeout rather than the backoff.
    let rows = faults()
        .into_iter()
        .filter(|f| f.answered == PROMPT)
        .collect();
    for_each_fault(rows, |fault| async move {
        let name = fault.name;
        let fx = Fixture::start(FAULT_CONFIG).await;
        fx.idp.set_default(fault.provider.clone());

        let replies = hammer(&fx.sidecar, Duration::from_secs(1)).await;
        assert_fault(&fault, &replies[0]);
        for reply in &replies {
            if reply.status == 429 {
                assert_held(&fault, reply, Duration::from_secs(60));
            } else {
                assert_fault(&fault, reply);
            }
        }
        // Holds of U·1 s, U·2 s, U·4 s...: six calls within a second is a 1-in-1500 event.
        let calls = fx.idp.token_calls();
        assert!(
            (1..=5).contains(&calls),
            "{name}: {calls} upstream calls in 1 s of requests every 20 ms"
        );
        assert!(
            replies.len() > 2 * calls,
            "{name}: most callers were answered from the hold: {calls} calls, {} requests",
            replies.len()
        );

        // The first request after the advertised hold reaches the now healthy provider.
        fx.idp.set_default(Answer::token(3600));
        let mut reply = token(&fx.sidecar).await;
        if reply.status != 200 {
            assert_held(&fault, &reply, Duration::from_secs(60));
            assert_eq!(
                fx.idp.token_calls(),
                calls,
                "{name}: no call during the hold"
            );
            tokio::time::sleep(Duration::from_secs(retry_after(&reply))).await;
            reply = token(&fx.sidecar).await;
        }
        assert!(access_token(&reply).starts_with("tok-"), "{name}");
        assert_eq!(fx.idp.token_calls(), calls + 1, "{name}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// An unreachable provider, throttling and absurd values
// ---------------------------------------------------------------------------------------------

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
    let during = statuses(&hammer(&sidecar, Duration::from_millis(300)).await);
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
async fn flapping_between_429_and_200_makes_no_call_inside_each_window() {
    let fx = Fixture::start(PASS_HOLDS).await;
    fx.idp.push(Answer::status(429, Some("1")));
    let held = statuses(&hammer(&fx.sidecar, Duration::from_millis(800)).await);
    assert_eq!(held[0], 429);
    assert!(held.iter().all(|&s| s == 429), "{held:?}");
    assert_eq!(
        fx.idp.token_calls(),
        1,
        "no call during the Retry-After window"
    );
    let ok = until_ok(&fx.sidecar).await;
    assert_eq!(ok.status, 200);
    // Once healthy, the cached token serves everyone.
    fx.idp.push(Answer::status(429, Some("1")));
    let served = statuses(&hammer(&fx.sidecar, Duration::from_millis(300)).await);
    assert!(served.iter().all(|&s| s == 200), "{served:?}");
    assert_eq!(fx.idp.token_calls(), 2);
}

#[tokio::test]
async fn a_503_with_an_http_date_is_honoured() {
    let fx = Fixture::start(PASS_HOLDS).await;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3));
    fx.idp.push(Answer::status(503, Some(&date)));
    assert_eq!(token(&fx.sidecar).await.status, 503);
    let held = token(&fx.sidecar).await;
    assert_eq!(held.status, 429);
    let retry_after: u64 = held.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry_after), "{retry_after}");
    assert_eq!(fx.idp.token_calls(), 1);
}

#[tokio::test]
async fn absurd_lifetimes_are_bounded() {
    let huge = Fixture::start("").await;
    huge.idp.set_default(Answer::token(10_000_000_000));
    let reply = token(&huge.sidecar).await;
    assert!(
        reply.json()["expires_in"].as_u64().unwrap() <= 24 * 3600,
        "capped at max_lifetime"
    );

    let zero = Fixture::start("").await;
    zero.idp.set_default(Answer::token(0));
    assert_eq!(token(&zero.sidecar).await.status, 200);
    assert_eq!(token(&zero.sidecar).await.status, 200);
    assert_eq!(
        zero.idp.token_calls(),
        2,
        "a token with no life left is passed on, never cached"
    );

    let negative = Fixture::start("").await;
    negative.idp.set_default(Answer::token(-5));
    assert_eq!(token(&negative.sidecar).await.status, 502);
}

// ---------------------------------------------------------------------------------------------
// Floods and bounds
// ---------------------------------------------------------------------------------------------

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
    let fx = Fixture::start("[token]\ncalls_per_second = 10.0\ncalls_burst = 1\n").await;
    let started = Instant::now();
    let replies = distinct_clients_at_once(&fx.sidecar, 8).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(fx.idp.token_calls(), 8);
    assert!(
        started.elapsed() >= Duration::from_millis(650),
        "8 calls at 10/s with a burst of 1 take at least 0.7 s: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_limiter_cannot_fit_before_the_deadline_get_an_honest_429() {
    let fx = Fixture::start(
        "[token]\ncalls_per_second = 1.0\ncalls_burst = 1\nwait_timeout = \"1s\"\n[client]\nrequest_timeout = \"500ms\"\n",
    )
    .await;
    let replies = distinct_clients_at_once(&fx.sidecar, 4).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let held: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok, 1, "one call fits the burst");
    assert_eq!(held.len(), 3);
    for reply in held {
        let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=4).contains(&retry_after), "{retry_after}");
        assert_eq!(reply.json()["error"], "temporarily_unavailable");
        let description = reply.json()["error_description"].to_string();
        assert!(
            description.contains("outbound limit") && !description.contains("identity provider"),
            "the sidecar's own limit says so: {description}"
        );
    }
    assert_eq!(fx.idp.token_calls(), 1);
}

#[tokio::test]
async fn idle_keys_are_evicted_and_not_refreshed() {
    let fx = Fixture::start("[token]\nidle_timeout = \"500ms\"\n").await;
    assert_eq!(token(&fx.sidecar).await.status, 200);
    assert_eq!(token(&fx.sidecar).await.status, 200);
    assert_eq!(fx.idp.token_calls(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let metrics = fx.sidecar.metrics().await;
    assert!(
        metrics.contains(r#"token_sidecar_cache_entries{route="default"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"token_sidecar_cache_evictions_total{route="default",reason="idle"} 1"#),
        "{metrics}"
    );
    assert_eq!(fx.idp.token_calls(), 1, "an idle key is not refreshed");
    assert_eq!(token(&fx.sidecar).await.status, 200);
    assert_eq!(fx.idp.token_calls(), 2);
}

#[tokio::test]
async fn the_cache_never_grows_past_max_entries() {
    let fx = Fixture::start("[token]\nmax_entries = 16\n").await;
    for i in 0..40 {
        let form = format!("grant_type=client_credentials&client_id=app{i}&client_secret=s");
        assert_eq!(fx.post_token(&form).await.status, 200);
    }
    let metrics = fx.sidecar.metrics().await;
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
    let fx = Fixture::start("[limits]\nmax_headers = 20\nmax_header_bytes = 8192\n").await;
    let big = format!(
        "GET /echo HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let answer = raw_exchange(fx.sidecar.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let many: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
    let answer = raw_exchange(
        fx.sidecar.addr,
        format!("GET /echo HTTP/1.1\r\nhost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(fx.idp.requests(), 0);
}

#[tokio::test]
async fn a_slow_loris_connection_is_closed_after_the_header_timeout() {
    let fx = Fixture::start("[limits]\nheader_read_timeout = \"300ms\"\n").await;
    let mut stream = tokio::net::TcpStream::connect(fx.sidecar.addr)
        .await
        .unwrap();
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
    assert_eq!(fx.idp.requests(), 0);
}

#[tokio::test]
async fn connections_past_the_cap_wait_while_every_one_is_busy() {
    // Idle connections make room for new ones (tests/connections.rs); busy ones do not.
    let fx = Fixture::start("[limits]\nmax_connections = 2\n").await;
    fx.idp
        .set_default(Answer::slow_token(3600, Duration::from_millis(1500)));
    let addr = fx.sidecar.addr;
    let busy = |n: usize| {
        let form = format!("grant_type=client_credentials&client_id=busy-{n}&client_secret=s");
        let request = format!(
            "POST /oauth/token HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{form}",
            form.len()
        );
        tokio::spawn(async move { raw_exchange(addr, request.as_bytes()).await })
    };
    let (a, b) = (busy(1), busy(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = tokio::spawn(async move {
        raw_exchange(
            addr,
            b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !third.is_finished(),
        "a third connection is not served while two are busy"
    );
    let answer = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for held in [a, b] {
        assert!(held.await.unwrap().starts_with("HTTP/1.1 200"));
    }
}

/// Issue: twelve cold keys of one client at once (12 scopes), a provider allowing 5 calls a
/// second and answering 429 `Retry-After: 1` past that. The hold was checked before a flight
/// waited for its client's turn and never again, so every queued key called when its turn came:
/// 9 × 429, 6 of them inside the hold. Each flight now checks the hold after its last wait, so a
/// 429 is followed by a second without calls, and the callers wait it out (`absorb_hold`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_reaches_the_provider_while_the_client_is_held() {
    let idp = FakeProvider::start().await;
    idp.set_rate_limit(5);
    let sidecar = support::process::Running::start(&idp.url(), &[]);
    sidecar.wait_ready().await;
    let http = client();
    let url = format!("{}/oauth/token", sidecar.url());
    let forms: Vec<String> = (0..12).map(|n| format!("{FORM}&scope=scope-{n}")).collect();
    let replies =
        futures_util::future::join_all(forms.iter().map(|form| post_form(&http, &url, form, None)))
            .await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Each 429 is followed by a second without calls, so the provider's window opens again
    // before the next: at most one 429 per 5 tokens issued, rounded up.
    assert!(
        idp.throttled() <= 3,
        "{} calls answered 429 (before: 9)",
        idp.throttled()
    );
    assert_eq!(idp.token_calls(), 12 + idp.throttled());
    eprintln!("12 cold keys: {} × 429 from the provider", idp.throttled());
    sidecar.terminate();
    assert_eq!(sidecar.wait().0, 0);
}
