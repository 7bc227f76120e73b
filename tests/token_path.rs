//! Behaviour of the token path against the real server on 127.0.0.1:0 and the fake identity
//! provider: single flight, credential isolation, lifetimes and refresh ahead, Retry-After
//! holds, shared errors, caller disconnects, local validation, pass-through, and what is part of
//! the key. Provider faults (garbage, dropped connections, timeouts, 5xx) are in faults.rs.
//!
//! Every test starts its own provider and sidecar, so tests run in parallel without sharing
//! state. Assertions are on the provider's call count and on response headers; wall-clock bounds
//! are generous, and real sleeps are short because the sidecar runs on the real clock.

use crate::support;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use support::oauth::{
    access_token, assert_cooling_down, assert_oauth_error, cache_status, expires_in,
};
use support::{Answer, Client, FakeProvider, Fixture, form_encode, post_form, send};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};

const CC: &str = "grant_type=client_credentials";
/// The first hold after a failure without Retry-After lasts at most a second (full jitter).
const BACKOFF: &str = "[token]\nbackoff_base = \"1s\"\n";

/// A client-credentials form with the secret in the body.
fn cc(id: &str, secret: &str) -> String {
    format!(
        "{CC}&client_id={}&client_secret={}",
        form_encode(id),
        form_encode(secret)
    )
}

/// Runs `n` requests at once, each in its own task, and returns their results in completion order.
async fn concurrently<T, F, Fut>(n: usize, request: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for i in 0..n {
        tasks.spawn(request(i));
    }
    let mut replies = Vec::with_capacity(n);
    while let Some(reply) = tasks.join_next().await {
        replies.push(reply.expect("request task panicked"));
    }
    replies
}

/// Opens `n` keep-alive connections to the sidecar (GETs on the token path are refused locally,
/// so the provider sees nothing), so that a burst that follows does not wait on TCP handshakes.
async fn warm_up(c: &Client, url: &str, n: usize) {
    let replies = concurrently(n, |_| {
        let c = c.clone();
        let url = url.to_owned();
        async move { send(&c, get(&url)).await }
    })
    .await;
    assert!(replies.iter().all(|r| r.status == 405));
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).unwrap()
}

/// A POST to `url` with this content type, optional `Authorization`, and body.
fn post(
    url: &str,
    content_type: &str,
    authorization: Option<&str>,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, content_type);
    if let Some(value) = authorization {
        builder = builder.header(header::AUTHORIZATION, value);
    }
    builder.body(Full::new(body.into())).unwrap()
}

/// Waits (bounded) until the provider has received at least `n` token calls.
async fn wait_for_calls(idp: &FakeProvider, n: usize) {
    for _ in 0..300 {
        if idp.token_calls() >= n {
            return;
        }
        sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the provider saw {} token calls, expected {n}",
        idp.token_calls()
    );
}

/// Sends `request` over a fresh TCP connection and reads what comes back until the peer closes
/// (bounded in time and size): for requests the hyper client cannot make, such as a chunked body.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to sidecar");
        // The sidecar may answer and close before reading everything; a failed write is fine.
        let _ = stream.write_all(request).await;
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&received).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("raw exchange did not finish within 10 s")
}

// ---------------------------------------------------------------------------------------------
// 1. Single flight
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_cold_requests_make_one_upstream_call() {
    let fx = Fixture::start("").await;
    fx.idp
        .set_default(Answer::slow_token(3600, Duration::from_millis(300)));
    let c = fx.client.clone();
    let url = fx.sidecar.token_url();
    warm_up(&c, &url, 500).await;
    assert_eq!(fx.idp.requests(), 0);

    let replies = concurrently(500, |_| {
        let c = c.clone();
        let url = url.clone();
        async move { post_form(&c, &url, &cc("app", "s3cret"), None).await }
    })
    .await;

    assert_eq!(fx.idp.token_calls(), 1, "one upstream call for 500 callers");
    let first = access_token(&replies[0]);
    let mut leaders = 0;
    let mut collapsed = 0;
    for reply in &replies {
        assert_eq!(access_token(reply), first);
        let status = cache_status(reply);
        if status.contains("fwd=miss") && status.contains("stored") {
            leaders += 1;
            assert!(!status.contains("collapsed"), "{status}");
        } else if status.contains("collapsed") {
            assert!(status.contains("fwd=miss"), "{status}");
            collapsed += 1;
        } else {
            // Arrived after the token landed: served from the cache, still no upstream call.
            assert!(status.contains("hit"), "{status}");
        }
    }
    assert_eq!(leaders, 1, "exactly one leader");
    // On a loaded two-core machine a debug build takes longer than the 300 ms flight to send
    // all 500, so late arrivals are hits; many must still have joined the flight.
    assert!(
        collapsed >= 50,
        "callers should have waited for the leader's call, only {collapsed} did"
    );
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_requests_for_twenty_clients_make_twenty_upstream_calls() {
    let fx = Fixture::start("").await;
    fx.idp
        .set_default(Answer::slow_token(3600, Duration::from_millis(300)));
    let c = fx.client.clone();
    let url = fx.sidecar.token_url();

    let replies = concurrently(200, |i| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let k = i % 20;
            let form = cc(&format!("app-{k}"), &format!("s-{k}"));
            (k, post_form(&c, &url, &form, None).await)
        }
    })
    .await;

    let mut tokens: Vec<Option<String>> = vec![None; 20];
    for (k, reply) in replies {
        let token = access_token(&reply);
        match &tokens[k] {
            Some(seen) => assert_eq!(*seen, token, "client {k} got two different tokens"),
            None => tokens[k] = Some(token),
        }
    }
    assert_eq!(
        fx.idp.token_calls(),
        20,
        "one upstream call per credential set"
    );
    let mut distinct: Vec<String> = tokens.into_iter().map(Option::unwrap).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 20, "every client got its own token");
    fx.sidecar.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 2. Credential isolation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_wrong_secret_never_gets_the_cached_token() {
    let fx = Fixture::start("").await;
    fx.idp.set_clients(&[("app", "s3cret")]);

    let good = fx.post_token(&cc("app", "s3cret")).await;
    let token = access_token(&good);

    let wrong = fx.post_token(&cc("app", "wrong")).await;
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    assert_eq!(wrong.json()["error"], "invalid_client");
    assert!(!wrong.text().contains(&token), "{}", wrong.text());
    let wrong_basic = post_form(
        &fx.client,
        &fx.sidecar.token_url(),
        CC,
        Some(("app", "wrong")),
    )
    .await;
    assert_eq!(wrong_basic.status, 401, "{}", wrong_basic.text());
    assert!(!wrong_basic.text().contains(&token));
    assert_eq!(
        fx.idp.token_calls(),
        2,
        "the wrong secret went to the provider"
    );

    // The rejected secret did not disturb the good entry.
    let again = fx.post_token(&cc("app", "s3cret")).await;
    assert_eq!(access_token(&again), token);
    assert!(cache_status(&again).contains("hit"));
    assert_eq!(fx.idp.token_calls(), 2);
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn different_scope_audience_or_resource_get_their_own_upstream_call_and_token() {
    let fx = Fixture::start("").await;
    let base = cc("app", "s3cret");
    let forms = [
        base.clone(),
        format!("{base}&scope=read"),
        format!("{base}&audience=https%3A%2F%2Fapi.example"),
        format!("{base}&resource=https%3A%2F%2Fres.example"),
    ];

    let mut tokens = Vec::new();
    for form in &forms {
        tokens.push(access_token(&fx.post_token(form).await));
    }
    assert_eq!(fx.idp.token_calls(), forms.len());
    let mut distinct = tokens.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), forms.len(), "{tokens:?}");

    // Each variant is now cached under its own key.
    for (form, token) in forms.iter().zip(&tokens) {
        let again = fx.post_token(form).await;
        assert_eq!(access_token(&again), *token, "{form}");
    }
    assert_eq!(fx.idp.token_calls(), forms.len());
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn basic_and_form_authentication_with_the_same_credentials_share_one_entry() {
    let fx = Fixture::start("").await;
    fx.idp.set_clients(&[("app", "s3cret")]);

    let form = fx.post_token(&cc("app", "s3cret")).await;
    let basic = post_form(
        &fx.client,
        &fx.sidecar.token_url(),
        CC,
        Some(("app", "s3cret")),
    )
    .await;
    assert_eq!(access_token(&form), access_token(&basic));
    assert!(
        cache_status(&basic).contains("hit"),
        "{}",
        cache_status(&basic)
    );
    assert_eq!(fx.idp.token_calls(), 1);
    fx.sidecar.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. What a hit looks like
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn served_expires_in_counts_down_and_other_fields_are_kept() {
    let fx = Fixture::start("").await;
    let body = r#"{"access_token":"fixed-abc","token_type":"Bearer","expires_in":3600,"scope":"read write","ext":{"nested":[1,2,{"x":null}]},"n":1.50}"#;
    fx.idp.set_default(Answer::Json(body.to_owned()));
    let form = cc("app", "s3cret");

    let first = fx.post_token(&form).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let first_expiry = expires_in(&first);
    assert!(first_expiry <= 3600, "{first_expiry}");
    sleep(Duration::from_millis(1100)).await;
    let second = fx.post_token(&form).await;
    assert_eq!(second.status, 200, "{}", second.text());
    let second_expiry = expires_in(&second);
    assert!(
        second_expiry < first_expiry,
        "expires_in must count down: {first_expiry} then {second_expiry}"
    );
    assert_eq!(fx.idp.token_calls(), 1);

    let status = cache_status(&second);
    let ttl: u64 = status
        .split("; ttl=")
        .nth(1)
        .unwrap_or_else(|| panic!("no ttl in {status:?}"))
        .split(';')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad ttl in {status:?}"));
    assert!(status.contains("hit; ttl="), "{status}");
    assert!(
        ttl <= second_expiry,
        "ttl {ttl} > expires_in {second_expiry}"
    );

    for reply in [&first, &second] {
        assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
        assert_eq!(reply.header("pragma").as_deref(), Some("no-cache"));
        assert_eq!(
            reply.header("content-type").as_deref(),
            Some("application/json")
        );
        // Every other field is passed through byte for byte; only expires_in changes.
        let expected = body.replace("3600", &expires_in(reply).to_string());
        assert_eq!(reply.text(), expected);
    }
    fx.sidecar.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Expiry
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_past_its_safety_margin_is_fetched_again() {
    let fx = Fixture::start("").await;
    // Lifetime 5 s, counted a second short (4 s): served while a whole second is left, until
    // 3 s (the 0.5 s margin is smaller); refresh ahead would be due later than that, so it is
    // not started.
    fx.idp.set_default(Answer::token(5));
    let form = cc("app", "s3cret");

    let first = fx.post_token(&form).await;
    let t0 = Instant::now();
    let old = access_token(&first);
    assert!(cache_status(&first).contains("fwd=miss"));

    sleep_until(t0 + Duration::from_millis(1000)).await;
    let hit = fx.post_token(&form).await;
    assert_eq!(access_token(&hit), old);
    assert!(cache_status(&hit).contains("hit"));
    assert_eq!(fx.idp.token_calls(), 1);

    sleep_until(t0 + Duration::from_millis(3200)).await;
    let stale = fx.post_token(&form).await;
    let new = access_token(&stale);
    assert_ne!(
        new, old,
        "a token inside its safety margin must not be served"
    );
    let status = cache_status(&stale);
    assert!(status.contains("fwd=stale"), "{status}");
    assert!(expires_in(&stale) <= 4);
    assert_eq!(fx.idp.token_calls(), 2);
    fx.sidecar.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. Refresh ahead
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_ahead_serves_the_old_token_at_once_and_fetches_the_new_one_in_the_background() {
    let fx = Fixture::start("[token]\nrefresh_at = 0.5\n").await;
    let delay = Duration::from_millis(500);
    // Lifetime 6 s, counted from when the first request left (t0) and a second short: refresh
    // due at 2.7..3.0 s, served until 4.0 s.
    fx.idp.set_default(Answer::slow_token(6, delay));
    let form = cc("app", "s3cret");

    let t0 = Instant::now();
    let first = fx.post_token(&form).await;
    let old = access_token(&first);

    sleep_until(t0 + Duration::from_millis(3020)).await;
    let started = Instant::now();
    let trigger = fx.post_token(&form).await;
    let latency = started.elapsed();
    assert_eq!(access_token(&trigger), old, "the hit serves the old token");
    assert!(
        cache_status(&trigger).contains("hit"),
        "{}",
        cache_status(&trigger)
    );
    assert!(
        latency < Duration::from_millis(200),
        "the triggering request waited {latency:?} for a {delay:?} upstream call"
    );
    wait_for_calls(&fx.idp, 2).await;

    // While the refresh is in flight, hits keep serving the old token and start nothing new.
    for _ in 0..3 {
        let reply = fx.post_token(&form).await;
        assert_eq!(access_token(&reply), old);
    }
    assert_eq!(fx.idp.token_calls(), 2);

    sleep(delay + Duration::from_millis(200)).await;
    let started = Instant::now();
    let after = fx.post_token(&form).await;
    let latency = started.elapsed();
    let new = access_token(&after);
    assert_ne!(new, old, "the refreshed token is served");
    assert!(cache_status(&after).contains("hit"));
    assert!(latency < Duration::from_millis(200), "{latency:?}");
    assert_eq!(fx.idp.token_calls(), 2, "exactly one background call");
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn a_provider_returning_the_same_token_causes_no_refresh_loop() {
    let fx = Fixture::start("").await;
    fx.idp.set_default(Answer::Json(
        r#"{"access_token":"same-token","token_type":"bearer","expires_in":4}"#.to_owned(),
    ));
    let form = cc("app", "s3cret");

    let first = fx.post_token(&form).await;
    let t0 = Instant::now();
    assert_eq!(access_token(&first), "same-token");

    // Past the refresh point (3.0..3.2 s), keep asking for two more seconds.
    sleep_until(t0 + Duration::from_millis(3000)).await;
    for _ in 0..40 {
        let reply = fx.post_token(&form).await;
        assert_eq!(access_token(&reply), "same-token");
        sleep(Duration::from_millis(50)).await;
    }
    let calls = fx.idp.token_calls();
    assert!(
        (2..=3).contains(&calls),
        "expected one or two refreshes over ~2 s, the provider saw {calls} calls"
    );
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn early_refreshes_that_return_the_same_token_back_off() {
    // Refresh due 0.4 s into every token's life: without a guard, a steady stream of requests
    // would refresh every 0.4 s although the provider keeps handing back the same token.
    let fx = Fixture::start("[token]\nrefresh_at = 0.1\nrefresh_jitter = 0.0\n").await;
    fx.idp.set_default(Answer::Json(
        r#"{"access_token":"same-token","token_type":"bearer","expires_in":4}"#.to_owned(),
    ));
    let form = cc("app", "s3cret");

    let t0 = Instant::now();
    for _ in 0..100 {
        if t0.elapsed() >= Duration::from_millis(2500) {
            break;
        }
        let reply = fx.post_token(&form).await;
        assert_eq!(access_token(&reply), "same-token");
        sleep(Duration::from_millis(50)).await;
    }
    // The first call, one refresh at 0.4 s, then holds of 1..2 s and 2..4 s: at most three.
    let calls = fx.idp.token_calls();
    assert!(
        (2..=3).contains(&calls),
        "{calls} upstream calls in 2.5 s for a token that never changes"
    );
    fx.sidecar.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 6. Retry-After
// ---------------------------------------------------------------------------------------------

/// Passes holds on to the callers instead of absorbing them, to test what callers see during one.
const PASS_HOLDS: &str = "[token]\nabsorb_hold = \"0s\"\n";

/// Five cold client ids at once, behind a provider whose burst is three: the fourth and fifth
/// calls get 429 with `Retry-After: 1`. The sidecar keeps those callers waiting, calls again
/// when the hold ends, and every caller gets a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_holds_are_absorbed_so_no_caller_sees_a_429() {
    let fx = Fixture::start("").await;
    for _ in 0..3 {
        fx.idp.push(Answer::token(3600));
    }
    for _ in 0..2 {
        fx.idp.push(Answer::status(429, Some("1")));
    }
    let (c, url) = (fx.client.clone(), fx.sidecar.token_url());
    let started = Instant::now();
    let replies = concurrently(5 * 20, |i| {
        let c = c.clone();
        let url = url.clone();
        async move { post_form(&c, &url, &cc(&format!("app{}", i % 5), "s"), None).await }
    })
    .await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(
        fx.idp.token_calls(),
        7,
        "five first calls, two again after the hold"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "the hold was honoured: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let metrics = fx.sidecar.metrics().await;
    assert!(
        metrics.contains("token_sidecar_holds_absorbed_total{route=\"default\"} 2"),
        "{metrics}"
    );
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn a_hold_longer_than_absorb_hold_is_passed_on_at_once() {
    let fx = Fixture::start("[token]\nabsorb_hold = \"2s\"\n").await;
    fx.idp.push(Answer::status(429, Some("3")));
    let started = Instant::now();
    let first = fx.post_token(&cc("app", "s")).await;
    assert_eq!(first.status, 429, "{}", first.text());
    assert_eq!(first.header("retry-after").as_deref(), Some("3"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not held: {:?}",
        started.elapsed()
    );
    let held = fx.post_token(&cc("app", "s")).await;
    assert_cooling_down(&held, Duration::from_secs(3));
    let description = held.json()["error_description"].to_string();
    assert!(description.contains("asked to wait"), "{description}");
    assert_eq!(fx.idp.token_calls(), 1);
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_seconds_hold_every_caller_without_upstream_calls() {
    let fx = Fixture::start(PASS_HOLDS).await;
    fx.idp.push(Answer::status(429, Some("2")));
    let c = fx.client.clone();
    let url = fx.sidecar.token_url();
    let form = cc("app", "s3cret");

    let first = fx.post_token(&form).await;
    // The hold started before this answer reached us, so it ends by `window_end` at the latest.
    let window_end = Instant::now() + Duration::from_secs(2);
    assert_eq!(first.status, 429, "the provider's answer is passed on");
    assert_eq!(first.header("retry-after").as_deref(), Some("2"));
    assert_eq!(first.json()["error"], "temporarily_unavailable");
    assert!(cache_status(&first).contains("fwd-status=429"));

    let held = fx.post_token(&form).await;
    assert_cooling_down(&held, window_end - Instant::now());
    assert!(cache_status(&held).contains("cooldown"));

    let at_most = window_end - Instant::now();
    let burst = concurrently(20, |_| {
        let c = c.clone();
        let url = url.clone();
        let form = form.clone();
        async move { post_form(&c, &url, &form, None).await }
    })
    .await;
    for reply in &burst {
        assert_cooling_down(reply, at_most);
    }

    sleep_until(window_end - Duration::from_millis(800)).await;
    let late = fx.post_token(&form).await;
    assert_cooling_down(&late, window_end - Instant::now());
    assert_eq!(
        fx.idp.token_calls(),
        1,
        "no upstream call during the window"
    );

    sleep_until(window_end + Duration::from_millis(100)).await;
    let after = fx.post_token(&form).await;
    access_token(&after);
    assert_eq!(fx.idp.token_calls(), 2);
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn retry_after_http_date_holds_until_that_date() {
    let fx = Fixture::start(PASS_HOLDS).await;
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    // HTTP-dates have whole seconds: the hold ends at the truncated instant, 2..3 s from now,
    // as read against the provider's own Date (also whole seconds: up to 1 s later in ours).
    let until = httpdate::parse_http_date(&date).unwrap();
    let slack = Duration::from_millis(1050);
    fx.idp.push(Answer::status(429, Some(&date)));
    let form = cc("app", "s3cret");
    let left = || {
        until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    };

    let first = fx.post_token(&form).await;
    assert_eq!(first.status, 429);
    assert_eq!(first.header("retry-after"), Some(date.clone()));

    let held = fx.post_token(&form).await;
    assert_cooling_down(&held, left() + slack);
    sleep(left().saturating_sub(Duration::from_millis(700))).await;
    let late = fx.post_token(&form).await;
    assert_cooling_down(&late, left() + slack);
    assert_eq!(fx.idp.token_calls(), 1);

    sleep(left() + slack + Duration::from_millis(100)).await;
    let after = fx.post_token(&form).await;
    access_token(&after);
    assert_eq!(fx.idp.token_calls(), 2);
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn a_throttled_refresh_keeps_serving_the_cached_token() {
    // Lifetime 6 s, counted a second short: refresh due at 2.7..3.0 s, served until 4.0 s
    // (while a whole second is left): a wide window to observe.
    let fx = Fixture::start("[token]\nrefresh_at = 0.5\n").await;
    fx.idp.set_default(Answer::token(6));
    let form = cc("app", "s3cret");

    let first = fx.post_token(&form).await;
    let t0 = Instant::now();
    let token = access_token(&first);
    fx.idp.set_default(Answer::status(429, Some("30")));

    sleep_until(t0 + Duration::from_millis(3050)).await;
    let trigger = fx.post_token(&form).await;
    assert_eq!(access_token(&trigger), token);
    wait_for_calls(&fx.idp, 2).await;

    let mut served = 0;
    for _ in 0..30 {
        if Instant::now() >= t0 + Duration::from_millis(3800) {
            break;
        }
        let reply = fx.post_token(&form).await;
        assert_eq!(access_token(&reply), token, "no client error while cached");
        assert!(cache_status(&reply).contains("hit"));
        served += 1;
        sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 5, "only {served} requests in the window");
    assert_eq!(
        fx.idp.token_calls(),
        2,
        "no retry during the provider's hold"
    );
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn service_unavailable_with_retry_after_holds_like_too_many_requests() {
    let fx = Fixture::start(&format!("{BACKOFF}absorb_hold = \"0s\"\n")).await;
    fx.idp.push(Answer::status(503, Some("2")));
    let form = cc("app", "s3cret");

    let first = fx.post_token(&form).await;
    let window_end = Instant::now() + Duration::from_secs(2);
    assert_eq!(first.status, 503);
    assert_eq!(first.json()["error"], "temporarily_unavailable");

    let held = fx.post_token(&form).await;
    assert_cooling_down(&held, window_end - Instant::now());
    // Past any backoff of a plain 5xx (at most `backoff_base`), the provider's 2 s still hold.
    sleep_until(window_end - Duration::from_millis(600)).await;
    let late = fx.post_token(&form).await;
    assert_cooling_down(&late, window_end - Instant::now());
    assert_eq!(fx.idp.token_calls(), 1);

    sleep_until(window_end + Duration::from_millis(100)).await;
    access_token(&fx.post_token(&form).await);
    assert_eq!(fx.idp.token_calls(), 2);
    fx.sidecar.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 7. Client errors are shared and remembered
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_share_one_slow_client_error_which_is_then_remembered() {
    let fx = Fixture::start("").await;
    let body = r#"{"error":"invalid_client","error_description":"unknown client"}"#;
    fx.idp.set_default(Answer::Status {
        status: 401,
        retry_after: None,
        body: body.to_owned(),
        delay: Duration::from_millis(500),
    });
    let c = fx.client.clone();
    let url = fx.sidecar.token_url();
    let form = cc("app", "s3cret");

    let replies = concurrently(50, |_| {
        let c = c.clone();
        let url = url.clone();
        let form = form.clone();
        async move { post_form(&c, &url, &form, None).await }
    })
    .await;
    for reply in &replies {
        assert_eq!(reply.status, 401);
        assert_eq!(reply.text(), body);
    }
    assert_eq!(fx.idp.token_calls(), 1);

    let again = fx.post_token(&form).await;
    assert_eq!(again.status, 401);
    assert_eq!(again.text(), body);
    let status = cache_status(&again);
    assert!(status.contains("remembered"), "{status}");
    assert_eq!(fx.idp.token_calls(), 1, "a remembered error is not retried");
    fx.sidecar.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 8. A caller that hangs up
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_that_hangs_up_does_not_cancel_the_call_for_its_followers() {
    let fx = Fixture::start("").await;
    fx.idp
        .set_default(Answer::slow_token(3600, Duration::from_secs(1)));
    let c = fx.client.clone();
    let url = fx.sidecar.token_url();
    let form = cc("app", "s3cret");

    let started = Instant::now();
    let leader = {
        let (c, url, form) = (c.clone(), url.clone(), form.clone());
        tokio::spawn(async move { post_form(&c, &url, &form, None).await })
    };
    wait_for_calls(&fx.idp, 1).await;
    let followers: Vec<_> = (0..10)
        .map(|_| {
            let (c, url, form) = (c.clone(), url.clone(), form.clone());
            tokio::spawn(async move { post_form(&c, &url, &form, None).await })
        })
        .collect();
    sleep_until(started + Duration::from_millis(100)).await;
    leader.abort();
    let aborted = leader.await;
    assert!(
        aborted.as_ref().is_err_and(|e| e.is_cancelled()),
        "the leader finished before it was aborted"
    );

    let mut tokens = Vec::new();
    for follower in followers {
        let reply = follower.await.expect("follower task panicked");
        tokens.push(access_token(&reply));
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(fx.idp.token_calls(), 1);

    // The leader's call was stored for later callers too.
    let later = fx.post_token(&form).await;
    assert_eq!(access_token(&later), tokens[0]);
    assert!(cache_status(&later).contains("hit"));
    assert_eq!(fx.idp.token_calls(), 1);
    fx.sidecar.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 9. Bad input is refused locally
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn get_on_the_token_path_is_405_with_allow_post() {
    let fx = Fixture::start("").await;
    let reply = send(&fx.client, get(&fx.sidecar.token_url())).await;
    assert_oauth_error(&reply, 405, "invalid_request");
    assert_eq!(reply.header("allow").as_deref(), Some("POST"));
    assert_eq!(fx.idp.requests(), 0);
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn a_token_request_that_is_not_a_form_is_415() {
    let fx = Fixture::start("").await;
    let url = fx.sidecar.token_url();
    let form = cc("app", "s3cret");
    let reply = send(&fx.client, post(&url, "text/plain", None, form.clone())).await;
    assert_oauth_error(&reply, 415, "invalid_request");
    let untyped = Request::post(&url)
        .body(Full::new(Bytes::from(form)))
        .unwrap();
    let reply = send(&fx.client, untyped).await;
    assert_oauth_error(&reply, 415, "invalid_request");
    assert_eq!(fx.idp.requests(), 0);
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_over_16_kib_is_413() {
    let fx = Fixture::start("").await;
    let pad = "x".repeat(16 * 1024);
    let form = format!("{}&pad={pad}", cc("app", "s3cret"));

    let reply = fx.post_token(&form).await;
    assert_oauth_error(&reply, 413, "invalid_request");

    // Without a Content-Length the limit is enforced while reading.
    let chunked = format!(
        "POST /oauth/token HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/x-www-form-urlencoded\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{len:x}\r\n{form}\r\n0\r\n\r\n",
        addr = fx.sidecar.addr,
        len = form.len(),
    );
    let raw = raw_exchange(fx.sidecar.addr, chunked.as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw:.200}");
    assert!(raw.contains(r#""error":"invalid_request""#), "{raw:.400}");
    assert_eq!(fx.idp.requests(), 0);
    fx.sidecar.stop().await.unwrap();
}

/// The sidecar's own answers (a cached token, an OAuth error) state their length: an HTTP/1.1
/// caller gets `Content-Length`, not chunked framing, and an HTTP/1.0 caller a body it can read
/// without waiting for the connection to close.
#[tokio::test]
async fn the_sidecars_own_answers_carry_content_length() {
    let fx = Fixture::start("").await;
    let form = cc("app", "s3cret");
    assert_eq!(fx.post_token(&form).await.status, 200);
    let bad = format!("{CC}&client_id=a&client_id=a&client_secret=s");
    for (what, version, body, status) in [
        ("hit", "1.1", &form, 200),
        ("hit", "1.0", &form, 200),
        ("error", "1.1", &bad, 400),
    ] {
        let request = format!(
            "POST /oauth/token HTTP/{version}\r\nhost: {addr}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n{body}",
            addr = fx.sidecar.addr,
            len = body.len(),
        );
        let raw = raw_exchange(fx.sidecar.addr, request.as_bytes()).await;
        let (head, payload) = raw.split_once("\r\n\r\n").expect("a whole response");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains(&format!(" {status} ")),
            "{what} {version}: {head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", payload.len())),
            "{what} over HTTP/{version} must state its length: {head}"
        );
        assert!(
            !head.contains("transfer-encoding"),
            "{what} {version}: {head}"
        );
    }
    assert_eq!(
        fx.idp.requests(),
        1,
        "the answers above were a hit and an error"
    );
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_form_duplicate_parameter_and_bad_basic_header_are_400_invalid_request() {
    let fx = Fixture::start("").await;
    let url = fx.sidecar.token_url();
    let form_type = "application/x-www-form-urlencoded";
    let cases = [
        (
            "bad escape",
            None,
            format!("{CC}&client_id=a%zz&client_secret=s"),
        ),
        (
            "duplicate",
            None,
            format!("{CC}&client_id=a&client_id=a&client_secret=s"),
        ),
        ("not base64", Some("Basic %%%not-base64%%%"), CC.to_owned()),
        (
            "no colon",
            // base64("appsecret")
            Some("Basic YXBwc2VjcmV0"),
            CC.to_owned(),
        ),
    ];
    for (what, authorization, body) in cases {
        let reply = send(&fx.client, post(&url, form_type, authorization, body)).await;
        assert_eq!(reply.status, 400, "{what}: {}", reply.text());
        assert_oauth_error(&reply, 400, "invalid_request");
        assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
    }
    assert_eq!(fx.idp.requests(), 0);
    fx.sidecar.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 10. Pass-through
// ---------------------------------------------------------------------------------------------

/// Sends `form` twice and checks both went to the provider unchanged and were not cached.
async fn assert_passed_through(form: &str) {
    let fx = Fixture::start("").await;

    let a = fx.post_token(form).await;
    let b = fx.post_token(form).await;
    assert_ne!(access_token(&a), access_token(&b), "{form}: served twice");
    for reply in [&a, &b] {
        let status = cache_status(reply);
        assert!(status.contains("fwd=bypass"), "{form}: {status}");
    }
    assert_eq!(fx.idp.token_calls(), 2, "{form}");
    for recorded in fx.idp.recorded() {
        assert_eq!(recorded.path_and_query, "/oauth/token");
        assert_eq!(recorded.body, form.as_bytes(), "{form}");
    }
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn password_and_authorization_code_grants_are_forwarded_unchanged_and_not_cached() {
    assert_passed_through("grant_type=password&username=alice&password=p%40ss+word&client_id=app&client_secret=s3cret").await;
    assert_passed_through(
        "grant_type=authorization_code&code=abc123&redirect_uri=https%3A%2F%2Fapp.example%2Fcb&client_id=app&client_secret=s3cret",
    )
    .await;
}

#[tokio::test]
async fn a_public_client_credentials_request_is_forwarded_unchanged_and_not_cached() {
    assert_passed_through(&format!("{CC}&client_id=public-app&scope=read")).await;
}

// ---------------------------------------------------------------------------------------------
// 11. What else is part of the key
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_query_string_is_part_of_the_key() {
    let fx = Fixture::start("").await;
    let form = cc("app", "s3cret");
    let with_query = |query: &str| format!("{}?{query}", fx.sidecar.token_url());
    let a = post_form(&fx.client, &with_query("p=policy_a"), &form, None).await;
    let b = post_form(&fx.client, &with_query("p=policy_b"), &form, None).await;
    let a_again = post_form(&fx.client, &with_query("p=policy_a"), &form, None).await;
    assert_ne!(
        access_token(&a),
        access_token(&b),
        "another query, another token"
    );
    assert_eq!(access_token(&a), access_token(&a_again));
    assert_eq!(fx.idp.token_calls(), 2);
    let recorded = fx.idp.recorded();
    assert!(
        recorded
            .iter()
            .any(|r| r.path_and_query.ends_with("?p=policy_b")),
        "the query is forwarded"
    );
}

#[tokio::test]
async fn with_preserve_host_the_callers_host_is_part_of_the_key() {
    let fx = Fixture::start("preserve_host = true").await;
    let form = cc("app", "s3cret");
    let with_host = |host: &'static str| {
        Request::post(fx.sidecar.token_url())
            .header("host", host)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form.clone())))
            .unwrap()
    };
    let a = send(&fx.client, with_host("tenant-a.example")).await;
    let b = send(&fx.client, with_host("tenant-b.example")).await;
    let a_again = send(&fx.client, with_host("tenant-a.example")).await;
    assert_ne!(
        access_token(&a),
        access_token(&b),
        "another tenant host, another token"
    );
    assert_eq!(access_token(&a), access_token(&a_again));
    assert_eq!(fx.idp.token_calls(), 2);
}

/// `pool_size = 3`: the first caller waits for one token, the pool fills in the background
/// while callers are served, and then three distinct tokens go out in turn, for three calls.
#[tokio::test]
async fn a_token_pool_hands_out_its_tokens_in_turn_for_one_call_each() {
    let fx = Fixture::start("[token]\npool_size = 3\n").await;
    let form = cc("app", "s3cret");
    let first = fx.post_token(&form).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        fx.idp.token_calls(),
        1,
        "the first caller waits for one token only"
    );
    for _ in 0..20 {
        let reply = fx.post_token(&form).await;
        assert_eq!(reply.status, 200);
        assert!(
            cache_status(&reply).contains("hit"),
            "{}",
            cache_status(&reply)
        );
        if fx.idp.token_calls() == 3 {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    wait_for_calls(&fx.idp, 3).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..9 {
        seen.insert(access_token(&fx.post_token(&form).await));
    }
    assert_eq!(seen.len(), 3, "three tokens in turn: {seen:?}");
    sleep(Duration::from_millis(100)).await;
    assert_eq!(fx.idp.token_calls(), 3, "a full pool makes no more calls");
    fx.sidecar.stop().await.unwrap();
}

/// Python `requests` and `curl --compressed` send `Accept-Encoding: gzip`. The token call must
/// not pass it on: a provider (or CDN) that gzips would make the answer unusable JSON.
#[tokio::test]
async fn token_calls_ask_for_an_unencoded_answer_whatever_the_caller_accepts() {
    let fx = Fixture::start("").await;
    let request = Request::post(fx.sidecar.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept-encoding", "gzip, deflate, br")
        .body(Full::new(Bytes::from(cc("app", "s3cret"))))
        .unwrap();
    let reply = send(&fx.client, request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(access_token(&reply).starts_with("tok-"));
    let recorded = fx.idp.recorded();
    assert_eq!(recorded.len(), 1);
    assert!(
        !recorded[0].headers.contains_key("accept-encoding"),
        "{:?}",
        recorded[0].headers
    );
    fx.sidecar.stop().await.unwrap();
}

/// RFC 9449: a DPoP-bound token belongs to the key pair that signed the `DPoP` proof, and the
/// provider's `use_dpop_nonce` answer must reach the client's retry. Such requests are forwarded
/// as they come and nothing of them is cached or remembered.
#[tokio::test]
async fn dpop_requests_bypass_the_cache_and_nothing_of_them_is_remembered() {
    let fx = Fixture::start("").await;
    fx.idp.push(Answer::status(400, None));
    for proof in ["proof-1", "proof-2", "proof-2"] {
        let request = Request::post(fx.sidecar.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("dpop", proof)
            .body(Full::new(Bytes::from(cc("app", "s3cret"))))
            .unwrap();
        let reply = send(&fx.client, request).await;
        assert_eq!(cache_status(&reply), "token-sidecar; fwd=bypass");
    }
    let recorded = fx.idp.recorded();
    assert_eq!(recorded.len(), 3, "every DPoP request reaches the provider");
    assert_eq!(recorded[1].headers["dpop"], "proof-2");
    // And the 400 a DPoP request got is not replayed to a plain one.
    let plain = fx.post_token(&cc("app", "s3cret")).await;
    assert_eq!(plain.status, 200);
    fx.sidecar.stop().await.unwrap();
}

/// A caller that sends a token request's head and then dribbles (or never sends) its body gets
/// 408 after `limits.body_read_timeout`, instead of holding the request open.
#[tokio::test]
async fn a_token_request_body_that_never_arrives_gets_408_after_the_body_read_timeout() {
    let fx = Fixture::start("[limits]\nbody_read_timeout = \"300ms\"\n").await;
    let started = Instant::now();
    let answer = raw_exchange(
        fx.sidecar.addr,
        b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant_type=",
    )
    .await;
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("invalid_request"), "{answer}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(fx.idp.requests(), 0);
    fx.sidecar.stop().await.unwrap();
}

/// A header the caller names in `Connection` is removed before the request goes upstream, so it
/// must not count in the key either; and a second Authorization or Host header is refused,
/// since the key would see one and the provider both.
#[tokio::test]
async fn the_key_sees_only_what_goes_upstream() {
    let fx = Fixture::start("").await;
    let basic = support::basic_auth("app", "s3cret");
    let request = Request::post(fx.sidecar.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .header("connection", "authorization")
        .header("authorization", &basic)
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials",
        )))
        .unwrap();
    let reply = send(&fx.client, request).await;
    assert_eq!(
        cache_status(&reply),
        "token-sidecar; fwd=bypass",
        "no credentials left to key"
    );
    assert!(!fx.idp.recorded()[0].headers.contains_key("authorization"));

    for name in ["authorization", "host"] {
        let request = Request::post(fx.sidecar.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", &basic)
            .header(name, if name == "host" { "a" } else { "Basic eDp5" })
            .header(name, if name == "host" { "b" } else { "Basic eTp6" })
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials",
            )))
            .unwrap();
        let reply = send(&fx.client, request).await;
        assert_eq!(reply.status, 400, "two {name} headers: {}", reply.text());
        assert_eq!(reply.json()["error"], "invalid_request");
    }
    assert_eq!(fx.idp.requests(), 1);
    fx.sidecar.stop().await.unwrap();
}

/// A token's lifetime counts from when the request left, not from when the answer arrived: a
/// provider that takes 1.5 s to answer a 10 s token has already spent 1.5 s of it.
#[tokio::test]
async fn a_tokens_lifetime_counts_from_the_request_not_the_answer() {
    let fx = Fixture::start("").await;
    fx.idp
        .set_default(Answer::slow_token(10, Duration::from_millis(1500)));
    let reply = fx.post_token(&cc("app", "s3cret")).await;
    assert_eq!(reply.status, 200);
    assert!(
        expires_in(&reply) <= 8,
        "served {} s of a 10 s token 1.5 s old",
        expires_in(&reply)
    );
    fx.sidecar.stop().await.unwrap();
}
