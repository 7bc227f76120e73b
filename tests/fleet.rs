//! The fleet tier against a real `redis-server` and four sidecar processes on loopback: one
//! provider call for a fleet's cold herd, about one per token lifetime under steady load, a
//! `Retry-After` seen by one pod obeyed by all, no client error when Redis dies (and sharing
//! back when it returns), no token for another fleet or secret, and nothing readable in Redis.
//! Callers tag their requests with `x-pod`, which the flight's call carries to the provider, so
//! the provider's record says which pod called.
use crate::support;

use futures_util::StreamExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::process::{Running, run_to_end};
use support::redis::RedisServer;
use support::{Answer, FakeProvider, Reply, client, send};

pub(crate) const FORM: &str =
    "grant_type=client_credentials&client_id=fleet-app&client_secret=fleet-secret";

/// A file removed when dropped.
pub(crate) struct TempFile(pub(crate) PathBuf);

impl TempFile {
    pub(crate) fn new(name: &str, contents: &[u8]) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "token-sidecar-fleet-{}-{name}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    pub(crate) fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A TLS redis-server's files from `pki` (certificate, key, CA), and its arguments, asking
/// clients for a certificate when `client_certs`.
pub(crate) fn tls_server(
    pki: &support::tls::Pki,
    client_certs: bool,
) -> ([TempFile; 3], Vec<String>) {
    let files = [
        TempFile::new("redis.crt", pki.server_cert.as_bytes()),
        TempFile::new("redis.key", pki.server_key.as_bytes()),
        TempFile::new("ca.crt", pki.ca.as_bytes()),
    ];
    let args = [
        "--tls-cert-file",
        files[0].path(),
        "--tls-key-file",
        files[1].path(),
        "--tls-ca-cert-file",
        files[2].path(),
        "--tls-auth-clients",
        if client_certs { "yes" } else { "no" },
    ]
    .map(str::to_owned)
    .to_vec();
    (files, args)
}

/// A fresh fleet secret of 48 random bytes.
pub(crate) fn fleet_key() -> TempFile {
    TempFile::new("key", &rand::random::<[u8; 48]>())
}

/// `n` sidecars in front of `idp`, sharing `redis` under `key`, with `toml` as their config
/// file; each is ready when this returns.
///
/// Unless `toml` has a `[shared]` table of its own, the pods wait up to a second for Redis: the
/// tests that count provider calls are about sharing, and the default 75 ms budget is missed on a
/// CI machine running four pods, Redis and the rest of the suite on two cores, after which a pod
/// rightly goes alone (one call more). The tests of a slow or lost Redis set their own.
pub(crate) async fn fleet(
    idp: &FakeProvider,
    redis: &str,
    key: &TempFile,
    toml: &str,
    n: usize,
) -> (Vec<Running>, TempFile) {
    let toml = if toml.contains("[shared]") {
        toml.to_owned()
    } else {
        format!("{toml}\n[shared]\ntimeout = \"1s\"\n")
    };
    let config = TempFile::new("config.toml", toml.as_bytes());
    let mut pods = Vec::new();
    for _ in 0..n {
        let args = [
            "--shared-redis",
            redis,
            "--shared-key-file",
            key.path(),
            "--config",
            config.path(),
        ];
        pods.push(Running::start_args(&idp.url(), &args, &[]));
    }
    for pod in &pods {
        pod.wait_ready().await;
    }
    (pods, config)
}

/// One token request to `pod`, tagged with its index.
pub(crate) async fn token(
    http: &support::Client,
    pod: &Running,
    index: usize,
    form: &str,
) -> Reply {
    let request = http::Request::post(format!("{}/oauth/token", pod.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-pod", index.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from(
            form.to_owned(),
        )))
        .unwrap();
    send(http, request).await
}

/// `per` cold callers on each pod at once (caller `n` on pod `n % pods.len()`); their replies.
pub(crate) async fn herd(pods: &[Running], per: usize, form: &str) -> Vec<Reply> {
    let http = client();
    let total = pods.len() * per;
    futures_util::stream::iter((0..total).map(|n| {
        let (http, index) = (&http, n % pods.len());
        async move { token(http, &pods[index], index, form).await }
    }))
    .buffer_unordered(total)
    .collect()
    .await
}

/// How many distinct access tokens `replies` carry; every reply must be a 200.
pub(crate) fn distinct_tokens(replies: &[Reply]) -> usize {
    let tokens: std::collections::HashSet<String> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["access_token"].as_str().unwrap().to_owned()
        })
        .collect();
    tokens.len()
}

/// Provider calls made by pod `index`.
pub(crate) fn calls_by(idp: &FakeProvider, index: usize) -> usize {
    idp.recorded()
        .iter()
        .filter(|r| {
            r.headers
                .get("x-pod")
                .is_some_and(|v| v == index.to_string().as_str())
        })
        .count()
}

/// Steady load: every pod asked every `every` until `until`; returns (answers, non-200s).
async fn steady(pods: &[Running], every: Duration, until: Instant) -> (usize, usize) {
    let answers = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let http = client();
    let mut tasks = Vec::new();
    for (index, pod) in pods.iter().enumerate() {
        let (http, url, answers, failures) =
            (http.clone(), pod.url(), answers.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            // Bounded in count as well as time.
            for _ in 0..100_000 {
                if Instant::now() >= until {
                    break;
                }
                let request = http::Request::post(format!("{url}/oauth/token"))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("x-pod", index.to_string())
                    .body(http_body_util::Full::new(bytes::Bytes::from(FORM)))
                    .unwrap();
                let reply = send(&http, request).await;
                answers.fetch_add(1, Ordering::Relaxed);
                if reply.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("pod {index}: {} {}", reply.status, reply.text());
                }
                tokio::time::sleep(every).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    (
        answers.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_sidecars_with_a_hundred_cold_callers_each_make_one_provider_call() {
    let redis = RedisServer::start();
    let idp = FakeProvider::start().await;
    // A slow answer, so every pod's herd arrives while the first call is out.
    idp.set_default(Answer::slow_token(300, Duration::from_millis(300)));
    let key = fleet_key();
    let (pods, _config) = fleet(&idp, &redis.url(), &key, "", 4).await;
    let replies = herd(&pods, 100, FORM).await;
    println!(
        "fleet herd: 400 callers on 4 pods, {} provider call(s)",
        idp.token_calls()
    );
    assert_eq!(
        idp.token_calls(),
        1,
        "one provider call for the whole fleet"
    );
    assert_eq!(
        distinct_tokens(&replies),
        1,
        "every caller got the same token"
    );
    // The other pods' callers are told their token came from the fleet, not the provider.
    let status = |r: &Reply| r.header("cache-status").unwrap_or_default();
    let from_fleet = replies
        .iter()
        .filter(|r| status(r).contains("detail=fleet"))
        .count();
    let fetched = replies
        .iter()
        .filter(|r| status(r).contains("fwd-status=200; stored"))
        .count();
    assert!(from_fleet >= 3, "{from_fleet} answers say detail=fleet");
    assert_eq!(
        fetched, 1,
        "one answer says the provider's token was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_across_four_sidecars_makes_about_one_call_per_lifetime() {
    let redis = RedisServer::start();
    let idp = FakeProvider::start().await;
    // A 10 s lifetime: each token is served about 8 s, refreshed ahead at 7.5 to 8 s.
    idp.set_default(Answer::token(10));
    let key = fleet_key();
    let (pods, _config) = fleet(&idp, &redis.url(), &key, "", 4).await;
    let run = Duration::from_secs(60);
    let (answers, failures) = steady(&pods, Duration::from_millis(100), Instant::now() + run).await;
    let calls = idp.token_calls();
    let per_pod: Vec<usize> = (0..4).map(|i| calls_by(&idp, i)).collect();
    println!(
        "fleet steady: {answers} answers in {run:?}, {calls} provider calls ({per_pod:?} by pod)"
    );
    assert_eq!(failures, 0);
    // Alone, each pod would call once per ~7.5-8 s: about 30 calls for four.
    assert!(
        (6..=10).contains(&calls),
        "about one call per lifetime for the fleet: {calls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_seen_by_one_sidecar_holds_the_whole_fleet() {
    let redis = RedisServer::start();
    let idp = FakeProvider::start().await;
    idp.push(Answer::status(429, Some("5")));
    idp.set_default(Answer::token(300));
    let key = fleet_key();
    // Holds are passed on, not waited out, so the window shows in every answer.
    let (pods, _config) = fleet(
        &idp,
        &redis.url(),
        &key,
        "[token]\nabsorb_hold = \"0s\"\n",
        4,
    )
    .await;
    let http = client();
    let first = token(&http, &pods[0], 0, FORM).await;
    assert_eq!(first.status, 429, "{}", first.text());
    let window_end = Instant::now() + Duration::from_millis(4_500);
    let mut refused = 0;
    for round in 0..40 {
        if Instant::now() >= window_end {
            break;
        }
        for (index, pod) in pods.iter().enumerate() {
            let reply = token(&http, pod, index, FORM).await;
            assert_eq!(
                reply.status,
                429,
                "round {round}, pod {index}: {}",
                reply.text()
            );
            let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=5).contains(&retry_after), "{retry_after}");
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "fleet cool-down: {refused} requests on 4 pods refused in the window, {} provider call(s)",
        idp.token_calls()
    );
    assert_eq!(
        idp.token_calls(),
        1,
        "no pod called the provider during the window"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let after = token(&http, &pods[3], 3, FORM).await;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(idp.token_calls(), 2, "one call once the window is over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_mid_load_costs_no_client_error_and_sharing_resumes() {
    let mut redis = RedisServer::start();
    let idp = FakeProvider::start().await;
    // A 6 s lifetime: served 4 s, refreshed ahead at 3.5 to 4 s.
    idp.set_default(Answer::token(6));
    let key = fleet_key();
    let (pods, _config) = fleet(&idp, &redis.url(), &key, "", 4).await;
    let every = Duration::from_millis(50);

    let (_, failures) = steady(&pods, every, Instant::now() + Duration::from_secs(8)).await;
    assert_eq!(failures, 0);
    let shared_calls = idp.token_calls();

    redis.stop();
    let before: Vec<usize> = (0..4).map(|i| calls_by(&idp, i)).collect();
    let alone = Duration::from_secs(12);
    let (answers, failures) = steady(&pods, every, Instant::now() + alone).await;
    let during: Vec<usize> = (0..4).map(|i| calls_by(&idp, i) - before[i]).collect();
    println!(
        "redis down for {alone:?}: {answers} answers, {failures} errors, calls by pod {during:?}"
    );
    assert_eq!(failures, 0, "Redis loss costs no client error");
    for (pod, calls) in during.iter().enumerate() {
        // Alone, at most one call per lifetime (4 s of serving) each, plus the one in progress.
        assert!(
            *calls <= 12 / 3 + 1,
            "pod {pod} made {calls} calls in {alone:?}"
        );
    }

    redis.restart();
    // The breakers try again within their backoff (at most a few seconds at this point).
    let (_, failures) = steady(&pods, every, Instant::now() + Duration::from_secs(6)).await;
    assert_eq!(failures, 0);
    let back = idp.token_calls();
    let (_, failures) = steady(&pods, every, Instant::now() + Duration::from_secs(12)).await;
    assert_eq!(failures, 0);
    let resumed = idp.token_calls() - back;
    println!(
        "fleet: {shared_calls} calls in 8 s shared; after Redis came back, {resumed} calls in 12 s"
    );
    assert!(
        resumed <= 12 / 3 + 1,
        "sharing resumed: {resumed} calls in 12 s for four pods"
    );
    let keys = redis.dump();
    assert!(!keys.is_empty(), "the pods write to the new Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_fleet_key_or_another_secret_never_gets_the_token() {
    let redis = RedisServer::start();
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("fleet-app", "fleet-secret")]);
    idp.set_default(Answer::token(300));
    let (ours, theirs) = (fleet_key(), fleet_key());
    let (pods, _config) = fleet(&idp, &redis.url(), &ours, "", 1).await;
    let (others, _other_config) = fleet(&idp, &redis.url(), &theirs, "", 1).await;
    let http = client();
    let first = token(&http, &pods[0], 0, FORM).await;
    assert_eq!(first.status, 200);
    let ours_token = first.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(idp.token_calls(), 1);

    // Another fleet key: the same credentials are a miss (its own call), never our token.
    let other = token(&http, &others[0], 1, FORM).await;
    assert_eq!(other.status, 200);
    assert_ne!(other.json()["access_token"].as_str().unwrap(), ours_token);
    assert_eq!(
        idp.token_calls(),
        2,
        "the other fleet could not use our entry"
    );

    // Another secret for our client id, at a pod of our fleet: the provider decides, 401.
    let wrong = "grant_type=client_credentials&client_id=fleet-app&client_secret=guess";
    let guessed = token(&http, &pods[0], 0, wrong).await;
    assert_eq!(guessed.status, 401, "{}", guessed.text());
    assert!(!guessed.text().contains(&ours_token));
    assert_eq!(idp.token_calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_no_plaintext_token_secret_or_client_id() {
    let redis = RedisServer::start();
    let idp = FakeProvider::start().await;
    idp.push(Answer::status(429, Some("2")));
    idp.set_default(Answer::token(300));
    let key = fleet_key();
    let (pods, _config) = fleet(
        &idp,
        &redis.url(),
        &key,
        "[token]\nabsorb_hold = \"0s\"\n",
        2,
    )
    .await;
    let http = client();
    let held = token(&http, &pods[0], 0, FORM).await;
    assert_eq!(held.status, 429, "a fleet cool-down is stored too");
    let during = redis.dump();
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let reply = token(&http, &pods[1], 1, FORM).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let access_token = reply.json()["access_token"].as_str().unwrap().to_owned();
    let mut seen = redis.dump();
    seen.extend(during);
    assert!(
        seen.len() >= 2,
        "a token and a cool-down were stored: {}",
        seen.len()
    );
    for needle in [access_token.as_str(), "fleet-secret", "fleet-app"] {
        for (name, value) in &seen {
            let hit = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
            assert!(
                !hit(name) && !hit(value),
                "{needle:?} readable in Redis under {}",
                String::from_utf8_lossy(name)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_whose_redis_is_down_is_ready_and_serves_alone() {
    let idp = FakeProvider::start().await;
    idp.set_default(Answer::token(300));
    let key = fleet_key();
    let nowhere = format!("redis://127.0.0.1:{}/0", support::process::free_port());
    let (pods, _config) = fleet(&idp, &nowhere, &key, "", 1).await;
    let http = client();
    for _ in 0..20 {
        let reply = token(&http, &pods[0], 0, FORM).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(idp.token_calls(), 1, "the local cache still works");
    let metrics = send(
        &http,
        http::Request::get(format!("http://127.0.0.1:{}/metrics", pods[0].admin))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await
    .text();
    // No connection: claims are skipped at once (never a wait), and reconnects are counted.
    assert!(
        metrics.contains("token_sidecar_shared_errors_total{op=\"connect\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("token_sidecar_shared_claims_total{outcome=\"skipped\"}"),
        "{metrics}"
    );
    let status = send(
        &http,
        http::Request::get(format!("http://127.0.0.1:{}/status", pods[0].admin))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await
    .json();
    assert_eq!(status["shared"]["connected"], false, "{status}");
    assert_eq!(status["shared"]["answered"], false, "{status}");
    let cause = status["shared"]["cause"].as_str().unwrap_or_default();
    assert!(cause.contains("refused"), "the cause is shown: {status}");
    assert_eq!(status["routes"][0]["shared"], true, "{status}");
}

#[test]
fn the_shared_tier_without_a_key_file_or_with_a_short_one_is_exit_64() {
    let (code, stderr) = run_to_end(
        &[
            "--upstream",
            "http://127.0.0.1:1",
            "--shared-redis",
            "redis://127.0.0.1:1/0",
        ],
        &[],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("shared.key_file"), "{stderr}");
    let short = TempFile::new("short", b"too short\n");
    let (code, stderr) = run_to_end(
        &["--upstream", "http://127.0.0.1:1"],
        &[
            ("TOKEN_SIDECAR_SHARED_REDIS", "redis://127.0.0.1:1/0"),
            ("TOKEN_SIDECAR_SHARED_KEY_FILE", short.path()),
        ],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("at least 32"), "{stderr}");
    assert!(
        !stderr.contains("too short"),
        "the key's bytes are never printed: {stderr}"
    );
}

/// `n` pods of `per` cold callers each, sharing `redis` through `url`, configured by `toml`: one
/// provider call.
async fn cold_herd(redis: &RedisServer, url: &str, toml: &str, pods: usize, per: usize) {
    let idp = FakeProvider::start().await;
    idp.set_default(Answer::slow_token(300, Duration::from_millis(200)));
    let key = fleet_key();
    let (pods, _config) = fleet(&idp, url, &key, toml, pods).await;
    let http = client();
    let (count, pods) = (pods.len(), &pods);
    let total = count * per;
    let replies: Vec<Reply> = futures_util::stream::iter((0..total).map(|n| {
        let (http, pod) = (&http, &pods[n % count]);
        async move { token(http, pod, n % count, FORM).await }
    }))
    .buffer_unordered(total)
    .collect()
    .await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(idp.token_calls(), 1, "one provider call for the fleet");
    assert!(
        redis
            .dump()
            .iter()
            .any(|(name, _)| name.starts_with(b"tsc:{") && name.windows(4).any(|w| w == b"}:t:")),
        "the token is in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_an_acl_user_in_the_url_shares_tokens() {
    let pki = support::tls::test_pki();
    let (files, mut args) = tls_server(&pki, false);
    let acl = [
        // The least an ACL user of the fleet tier needs: its keys, its channel, scripts.
        "--user",
        "default",
        "off",
        "--user",
        "sidecar",
        "on",
        ">s3cret-pw",
        "~tsc:*",
        "&token-sidecar:*",
        "-@all",
        "+get",
        "+set",
        "+del",
        "+exists",
        "+pttl",
        "+pexpire",
        "+publish",
        "+subscribe",
        "+eval",
        "+evalsha",
        "+script|load",
        "+ping",
        "+select",
        // Not for the sidecar: for this test's look at what Redis holds.
        "+scan",
    ];
    args.extend(acl.map(str::to_owned));
    let redis =
        RedisServer::start_with(args, Some(pki.ca.clone()), Some("sidecar:s3cret-pw".into()));
    let toml = format!(
        "[shared]\nca_file = {:?}\ntimeout = \"1s\"\n",
        files[2].path()
    );
    cold_herd(&redis, &redis.url(), &toml, 2, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_logs_in() {
    let redis = RedisServer::start_with(
        vec!["--requirepass".into(), "from-a-file".into()],
        None,
        Some(":from-a-file".into()),
    );
    let password = TempFile::new("password", b"from-a-file\n");
    // The URL the pods get carries no password: the file does.
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let toml = format!(
        "[shared]\npassword_file = {:?}\ntimeout = \"1s\"\n",
        password.path()
    );
    cold_herd(&redis, &url, &toml, 2, 20).await;
}
