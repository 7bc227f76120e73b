//! Credential injection (`[routes.inject]`) against the real binary on loopback: API calls that
//! carry no token get the route's bearer from one token call, a token the API stand-in revoked
//! costs one more call however many callers it rejected, a body is sent again intact after a 401,
//! a caller's own `Authorization` is kept unless `overwrite`, a throttled provider gives a clear
//! refusal with nothing forwarded, the secret appears nowhere, and a fleet shares the token.
use crate::fleet::TempFile;
use crate::support;

use futures_util::StreamExt as _;
use std::time::{Duration, Instant};
use support::process::Running;
use support::redis::RedisServer;
use support::{Answer, FakeProvider, Reply, client, send};

const SECRET: &str = "inj-secret-7f3a";

/// The config of one injecting route towards `idp`, with `extra` in its inject table; the
/// secret's file and the config file.
fn config(idp: &FakeProvider, extra: &str) -> (TempFile, TempFile) {
    let secret = TempFile::new("secret", format!("{SECRET}\n").as_bytes());
    let toml = format!(
        "[[routes]]\nname = \"api\"\nlisten = \"127.0.0.1:1\"\nupstream = \"http://x\"\n[routes.inject]\ntoken_url = \"{}/oauth/token\"\nclient_id = \"inj-app\"\nclient_secret_file = {:?}\n{extra}",
        idp.url(),
        secret.path()
    );
    (secret, TempFile::new("inject.toml", toml.as_bytes()))
}

/// A sidecar injecting for `idp` (also the API), ready.
async fn sidecar(idp: &FakeProvider, config: &TempFile, more: &[&str]) -> Running {
    let mut args = vec!["--config", config.path()];
    args.extend_from_slice(more);
    let pod = Running::start_args(&idp.url(), &args, &[("RUST_LOG", "trace")]);
    pod.wait_ready().await;
    pod
}

async fn get(http: &support::Client, url: &str, authorization: Option<&str>) -> Reply {
    let mut request = http::Request::get(url);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    send(http, request).await
}

/// `n` concurrent `GET /api/v2/users/me` through `pod`, their statuses.
async fn users_me(pod: &Running, n: usize) -> Vec<u16> {
    let http = client();
    let url = format!("{}/api/v2/users/me", pod.url());
    futures_util::stream::iter(0..n)
        .map(|_| {
            let (http, url) = (&http, &url);
            async move { get(http, url, None).await.status }
        })
        .buffer_unordered(n)
        .collect()
        .await
}

/// API requests the provider received (not token calls).
fn api_requests(idp: &FakeProvider) -> usize {
    idp.recorded()
        .iter()
        .filter(|r| r.path_and_query.contains("/api/"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_calls_without_a_token_get_the_routes_bearer_from_one_call() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET)]);
    idp.set_default(Answer::slow_token(300, Duration::from_millis(200)));
    let (_secret, file) = config(&idp, "");
    let pod = sidecar(&idp, &file, &[]).await;
    let statuses = users_me(&pod, 200).await;
    println!(
        "200 API calls without a token: {} answered 200, {} token call(s)",
        statuses.iter().filter(|s| **s == 200).count(),
        idp.token_calls()
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(idp.token_calls(), 1, "one token call for them all");
    assert_eq!(api_requests(&idp), 200);
    // An app sending the same credentials to the route's token path gets the same token, no call.
    let http = client();
    let form = format!("grant_type=client_credentials&client_id=inj-app&client_secret={SECRET}");
    let reply = support::post_form(&http, &format!("{}/oauth/token", pod.url()), &form, None).await;
    assert_eq!(reply.status, 200);
    let status = get(
        &http,
        &format!("http://127.0.0.1:{}/status", pod.admin),
        None,
    )
    .await
    .text();
    assert_eq!(
        idp.token_calls(),
        1,
        "the same key as interception: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_costs_one_more_call_for_fifty_rejected_callers() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET)]);
    let (_secret, file) = config(&idp, "");
    let pod = sidecar(&idp, &file, &[]).await;
    assert_eq!(users_me(&pod, 1).await, [200]);
    assert_eq!(idp.token_calls(), 1);
    idp.revoke_issued();
    let statuses = users_me(&pod, 50).await;
    println!(
        "a revoked token, 50 concurrent callers: {} answered 200, {} token calls in all",
        statuses.iter().filter(|s| **s == 200).count(),
        idp.token_calls()
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(idp.token_calls(), 2, "exactly one more token call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_sent_again_intact_after_a_401() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET)]);
    let (_secret, file) = config(&idp, "");
    let pod = sidecar(&idp, &file, &[]).await;
    assert_eq!(users_me(&pod, 1).await, [200]);
    idp.revoke_issued();
    let body: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let request = http::Request::post(format!("{}/api/v2/echo", pod.url()))
        .header("content-type", "application/octet-stream")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
        .unwrap();
    let reply = send(&client(), request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let digest: String = <sha2::Sha256 as sha2::Digest>::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(reply.json()["bytes"], 1024);
    assert_eq!(reply.json()["sha256"], digest.as_str(), "the body, intact");
    assert_eq!(idp.token_calls(), 2);
    assert_eq!(
        api_requests(&idp),
        3,
        "the first GET, the rejected POST, its retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_own_authorization_is_kept_unless_overwrite() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET)]);
    let http = client();
    let (_secret, file) = config(&idp, "");
    let pod = sidecar(&idp, &file, &[]).await;
    let url = format!("{}/api/v2/users/me", pod.url());
    let kept = get(&http, &url, Some("Bearer the-callers-own")).await;
    assert_eq!(kept.status, 401, "forwarded as it was: the API rejects it");
    assert_eq!(idp.token_calls(), 0, "no token fetched for it");

    let (_secret2, file2) = config(&idp, "overwrite = true\n");
    let overwriting = sidecar(&idp, &file2, &[]).await;
    let url = format!("{}/api/v2/users/me", overwriting.url());
    let replaced = get(&http, &url, Some("Bearer the-callers-own")).await;
    assert_eq!(replaced.status, 200, "{}", replaced.text());
    assert_eq!(idp.token_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_provider_gives_a_clear_refusal_and_nothing_is_forwarded() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET)]);
    idp.set_default(Answer::status(429, Some("30")));
    let (_secret, file) = config(&idp, "");
    let pod = sidecar(&idp, &file, &[]).await;
    let started = Instant::now();
    let http = client();
    let reply = get(&http, &format!("{}/api/v2/users/me", pod.url()), None).await;
    let took = started.elapsed();
    println!(
        "throttled provider: {} in {took:?}, Retry-After {:?}: {}",
        reply.status,
        reply.header("retry-after"),
        reply.text()
    );
    assert_eq!(reply.status, 429);
    let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert!(
        reply.text().contains("no token to inject"),
        "{}",
        reply.text()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(api_requests(&idp), 0, "nothing forwarded without a token");

    // A provider that is down: 503, nothing forwarded.
    idp.set_default(Answer::status(500, None));
    let (_secret2, file2) = config(&idp, "");
    let down = sidecar(&idp, &file2, &[]).await;
    let reply = get(&http, &format!("{}/api/v2/users/me", down.url()), None).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.header("retry-after").is_some());
    assert_eq!(api_requests(&idp), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_secret_appears_in_no_log_metric_or_status() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET)]);
    let (_secret, file) = config(&idp, "");
    let pod = sidecar(&idp, &file, &[]).await;
    assert_eq!(users_me(&pod, 3).await, [200, 200, 200]);
    idp.revoke_issued();
    assert_eq!(users_me(&pod, 1).await, [200]);
    let http = client();
    for path in ["/metrics", "/status"] {
        let text = get(
            &http,
            &format!("http://127.0.0.1:{}{path}", pod.admin),
            None,
        )
        .await
        .text();
        assert!(!text.contains(SECRET), "{path}");
    }
    pod.terminate();
    let (_, logs) = pod.wait();
    assert!(
        logs.contains("TRACE") || logs.contains("trace"),
        "logs at trace"
    );
    assert!(!logs.contains(SECRET), "the secret is never logged");
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("inj-app:{SECRET}"),
    );
    assert!(!logs.contains(&basic), "nor its Basic form");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_of_a_fleet_share_one_injected_token() {
    let redis = RedisServer::start();
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET)]);
    idp.set_default(Answer::slow_token(300, Duration::from_millis(300)));
    let (_secret, file) = config(&idp, "");
    let key = TempFile::new("fleet.key", &rand::random::<[u8; 48]>());
    let url = redis.url();
    let args = [
        "--shared-redis",
        url.as_str(),
        "--shared-key-file",
        key.path(),
    ];
    let mut pods = Vec::new();
    for _ in 0..3 {
        pods.push(sidecar(&idp, &file, &args).await);
    }
    let mut all = Vec::new();
    for pod in &pods {
        all.push(users_me(pod, 30));
    }
    let statuses: Vec<u16> = futures_util::future::join_all(all)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    println!("3 pods, 90 API calls: {} token call(s)", idp.token_calls());
    assert_eq!(idp.token_calls(), 1, "one token call for the fleet");
}

#[tokio::test]
async fn an_inject_table_without_its_secret_is_exit_64() {
    let idp = FakeProvider::start().await;
    let missing = TempFile::new(
        "missing.toml",
        format!(
            "[[routes]]\nname = \"api\"\nlisten = \"127.0.0.1:1\"\nupstream = \"http://x\"\n[routes.inject]\ntoken_url = \"{}/oauth/token\"\nclient_id = \"inj-app\"\nclient_secret_file = \"/nonexistent/secret\"\n",
            idp.url()
        )
        .as_bytes(),
    );
    let (code, stderr) =
        support::process::run_to_end(&["--upstream", &idp.url(), "--config", missing.path()], &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("inject.client_secret_file") && stderr.contains("/nonexistent/secret"),
        "{stderr}"
    );
}

/// A sidecar with the Genesys preset, both hosts at `idp`, injecting as `inj-app`; ready. The
/// secret's file lives as long as the second value.
async fn genesys_pod(idp: &FakeProvider) -> (Running, TempFile) {
    let secret = TempFile::new("genesys-secret", format!("{SECRET}\n").as_bytes());
    let url = idp.url();
    let env = [
        ("TOKEN_SIDECAR_GENESYS_REGION", "mypurecloud.com"),
        ("TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM", url.as_str()),
        ("TOKEN_SIDECAR_GENESYS_API_UPSTREAM", url.as_str()),
        ("TOKEN_SIDECAR_GENESYS_CLIENT_ID", "inj-app"),
        ("TOKEN_SIDECAR_GENESYS_CLIENT_SECRET_FILE", secret.path()),
    ];
    let pod = Running::start_bare(&[], &env);
    pod.wait_ready().await;
    (pod, secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_genesys_preset_injects_on_its_api_routes() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET)]);
    let (pod, _secret) = genesys_pod(&idp).await;
    let http = client();
    for path in [
        "/api/v2/users/me",
        "//api/v2/users/me",
        "/api/api/v2/users/me",
    ] {
        let reply = get(&http, &format!("{}{path}", pod.url()), None).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    }
    assert_eq!(idp.token_calls(), 1, "one token for the API routes");
    // An SDK fetching its own token with the same credentials shares it (interception).
    let form = format!("grant_type=client_credentials&client_id=inj-app&client_secret={SECRET}");
    let reply = support::post_form(&http, &format!("{}/oauth/token", pod.url()), &form, None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(idp.token_calls(), 1, "the login route's token");

    // A client id without its secret's file is exit 64, naming both.
    let (code, stderr) = support::process::run_to_end(
        &[],
        &[
            ("TOKEN_SIDECAR_GENESYS_REGION", "mypurecloud.com"),
            ("TOKEN_SIDECAR_GENESYS_CLIENT_ID", "inj-app"),
        ],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("genesys_client_secret_file"), "{stderr}");
}

/// An injecting route with `private_key_jwt` towards `idp`, signing with the PEM key `key`.
fn jwt_config(idp: &FakeProvider, key: &TempFile) -> TempFile {
    let toml = format!(
        "[[routes]]\nname = \"api\"\nlisten = \"127.0.0.1:1\"\nupstream = \"http://x\"\n[routes.inject]\ntoken_url = \"{}/oauth/token\"\nclient_id = \"jwt-app\"\nauth_method = \"private_key_jwt\"\nassertion_key_file = {:?}\nassertion_kid = \"k1\"\n",
        idp.url(),
        key.path()
    );
    TempFile::new("jwt.toml", toml.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_signs_a_fresh_assertion_the_provider_verifies() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("jwt-app", "no-secret-here")]);
    let key = rcgen::KeyPair::generate().unwrap();
    idp.set_assertion_key(
        key.public_key_pem().as_bytes(),
        &format!("{}/oauth/token", idp.url()),
    );
    let key_file = TempFile::new("jwt.pem", key.serialize_pem().as_bytes());
    let file = jwt_config(&idp, &key_file);
    let pod = sidecar(&idp, &file, &[]).await;
    let statuses = users_me(&pod, 50).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        idp.token_calls(),
        1,
        "one signed token call for 50 API calls"
    );
    let call = idp
        .recorded()
        .into_iter()
        .find(|r| r.path_and_query.ends_with("/oauth/token"))
        .unwrap();
    let form = String::from_utf8_lossy(&call.body).into_owned();
    assert!(
        form.contains(
            "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
        ),
        "{form}"
    );
    assert!(
        !form.contains("client_secret"),
        "no secret, no stand-in: {form}"
    );
    // A revoked token: the next call carries a new assertion (the provider refuses a jti twice).
    idp.revoke_issued();
    assert_eq!(users_me(&pod, 1).await, [200]);
    assert_eq!(idp.token_calls(), 2);

    // Signed with a key the provider does not know: a clear 503, nothing forwarded.
    let other = rcgen::KeyPair::generate().unwrap();
    let other_file = TempFile::new("other.pem", other.serialize_pem().as_bytes());
    let other_config = jwt_config(&idp, &other_file);
    let refused_pod = sidecar(&idp, &other_config, &[]).await;
    let before = api_requests(&idp);
    let reply = get(
        &client(),
        &format!("{}/api/v2/users/me", refused_pod.url()),
        None,
    )
    .await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.text().contains("answered 401"), "{}", reply.text());
    assert_eq!(api_requests(&idp), before, "nothing forwarded");

    // A file that is not a private key is exit 64, naming it.
    let junk = TempFile::new("junk.pem", b"-----BEGIN NOTHING-----\n");
    let junk_config = jwt_config(&idp, &junk);
    let (code, stderr) = support::process::run_to_end(
        &["--upstream", &idp.url(), "--config", junk_config.path()],
        &[],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("inject.assertion_key_file"), "{stderr}");
}

/// Issue 23 item 6: Genesys keeps 20 notification channels per user and app and silently closes
/// the oldest. The preset's API routes count the channels each client creates, in metrics, and
/// warn once when a client passes 20 within 24 hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_genesys_preset_counts_notification_channels_and_warns_past_twenty() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET)]);
    let (pod, _secret) = genesys_pod(&idp).await;
    let http = client();
    let create = |authorization: Option<String>| {
        let mut request =
            http::Request::post(format!("{}/api/v2/notifications/channels", pod.url()));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    for _ in 0..22 {
        let reply = send(&http, create(None)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // Another client's own bearer: counted apart.
    let form = format!("grant_type=client_credentials&client_id=inj-app&client_secret={SECRET}");
    let token = support::post_form(&http, &format!("{}/oauth/token", pod.url()), &form, None)
        .await
        .json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..2 {
        let reply = send(&http, create(Some(format!("Bearer {token}")))).await;
        assert_eq!(reply.status, 200);
    }
    let metrics = get(
        &http,
        &format!("http://127.0.0.1:{}/metrics", pod.admin),
        None,
    )
    .await
    .text();
    let value = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("genesys-api\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert_eq!(
        value("token_sidecar_genesys_notification_channels_created_total"),
        24.0
    );
    assert_eq!(
        value("token_sidecar_genesys_notification_channels_max_per_client"),
        22.0
    );
    pod.terminate();
    let (_, logs) = pod.wait();
    let warnings = logs
        .lines()
        .filter(|l| l.contains("notification channels per user and app"))
        .count();
    println!("24 channels by 2 clients: {warnings} warning(s)");
    assert_eq!(warnings, 1, "one warning per client and hour: {logs}");
    assert!(!logs.contains(SECRET) && !logs.contains(&token));
}

/// Issue 23 item 5: with `from_basic`, an app sends its own client credentials as Basic on its
/// API calls and the sidecar swaps them for that client's bearer, keyed and cached like an app's
/// token request; a client the provider refuses gets 401 `invalid_client`, nothing forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_basic_swaps_a_callers_own_credentials_for_its_bearer() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("inj-app", SECRET), ("other-app", "other-secret")]);
    let (_secret, file) = config(&idp, "from_basic = true\n");
    let pod = sidecar(&idp, &file, &[]).await;
    let http = client();
    let url = format!("{}/api/v2/users/me", pod.url());
    let basic = |id: &str, secret: &str| {
        let pair = format!("{id}:{secret}");
        format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pair)
        )
    };
    for _ in 0..3 {
        let reply = get(&http, &url, Some(&basic("other-app", "other-secret"))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let calls: Vec<String> = idp
        .recorded()
        .iter()
        .filter(|r| r.path_and_query.ends_with("/oauth/token"))
        .map(|r| format!("{:?}", r.headers.get("authorization")))
        .collect();
    assert_eq!(
        calls.len(),
        1,
        "one token call for the caller's client: {calls:?}"
    );
    // An app asking the token path with the same credentials shares that token.
    let form = "grant_type=client_credentials";
    let reply = support::post_form(
        &http,
        &format!("{}/oauth/token", pod.url()),
        form,
        Some(("other-app", "other-secret")),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(idp.token_calls(), 1);
    // No Authorization: the route's own client, a call of its own.
    assert_eq!(get(&http, &url, None).await.status, 200);
    assert_eq!(idp.token_calls(), 2);
    // Wrong credentials: 401 invalid_client, and the API never sees the request.
    let before = api_requests(&idp);
    let reply = get(&http, &url, Some(&basic("other-app", "wrong"))).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert!(reply.text().contains("invalid_client"), "{}", reply.text());
    assert_eq!(api_requests(&idp), before, "nothing forwarded");
}
