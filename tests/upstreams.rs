//! Refresh-token safety, several routes side by side, and HTTPS upstreams with a private CA.
use crate::support;

use std::time::Duration;
use support::sidecar::{Sidecar, config, config_toml};
use support::tls::test_pki;
use support::{Answer, FakeProvider, Fixture, client, post_form};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_refreshes_make_one_call_and_all_succeed() {
    let fx = Fixture::start("").await;
    fx.idp.set_refresh_delay(Duration::from_millis(300));
    let refresh_token = fx.idp.issue_refresh_token();
    let form = format!(
        "grant_type=refresh_token&refresh_token={refresh_token}&client_id=app&client_secret=s"
    );
    let replies = futures_util::future::join_all((0..50).map(|_| fx.post_token(&form))).await;
    let first = replies[0].json();
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            reply.json()["refresh_token"],
            first["refresh_token"],
            "every caller gets the same new pair"
        );
        assert_eq!(reply.json()["access_token"], first["access_token"]);
    }
    assert_eq!(
        fx.idp.token_calls(),
        1,
        "a single-use refresh token is spent once"
    );

    // A late duplicate within the window gets the same answer instead of invalid_grant.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = fx.post_token(&form).await;
    assert_eq!(late.status, 200, "{}", late.text());
    assert_eq!(late.json()["refresh_token"], first["refresh_token"]);
    assert_eq!(fx.idp.token_calls(), 1);
}

#[tokio::test]
async fn a_refresh_answer_is_never_shared_with_other_credentials_or_tokens() {
    let fx = Fixture::start("").await;
    let rt = fx.idp.issue_refresh_token();
    let ok = fx
        .post_token(&format!(
            "grant_type=refresh_token&refresh_token={rt}&client_id=app&client_secret=s"
        ))
        .await;
    assert_eq!(ok.status, 200);
    // Same refresh token, other secret: not served from memory; the provider decides (and the
    // token is spent, so it says invalid_grant).
    let other = fx
        .post_token(&format!(
            "grant_type=refresh_token&refresh_token={rt}&client_id=app&client_secret=x"
        ))
        .await;
    assert_eq!(other.status, 400, "{}", other.text());
    assert_eq!(other.json()["error"], "invalid_grant");
    assert_eq!(fx.idp.token_calls(), 2);
}

#[tokio::test]
async fn a_refresh_answer_is_kept_only_for_the_configured_window() {
    let fx = Fixture::start("[token]\nrefresh_token_ttl = \"300ms\"").await;
    let rt = fx.idp.issue_refresh_token();
    let form = format!("grant_type=refresh_token&refresh_token={rt}&client_id=app&client_secret=s");
    assert_eq!(fx.post_token(&form).await.status, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = fx.post_token(&form).await;
    assert_eq!(
        after.status,
        400,
        "after the window the provider sees the reuse: {}",
        after.text()
    );
    assert_eq!(fx.idp.token_calls(), 2);
}

#[tokio::test]
async fn two_routes_serve_two_providers_with_separate_caches() {
    let eu = FakeProvider::start().await;
    let us = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config_toml(&format!(
        r#"
        [[routes]]
        name = "eu"
        listen = "127.0.0.1:0"
        upstream = "{}"
        [[routes]]
        name = "us"
        # Another address, so another listener (the test binds each on 127.0.0.1:0).
        listen = "127.0.0.2:0"
        upstream = "{}"
        token_paths = ["/v1/token"]
        "#,
        eu.url(),
        us.url()
    )))
    .await;
    let c = client();
    let form = "grant_type=client_credentials&client_id=app&client_secret=s";
    let a = post_form(&c, &format!("{}/oauth/token", sidecar.urls[0]), form, None).await;
    let b = post_form(&c, &format!("{}/v1/token", sidecar.urls[1]), form, None).await;
    assert_eq!((a.status, b.status), (200, 200));
    assert_ne!(
        a.json()["access_token"],
        b.json()["access_token"],
        "one credential set, two providers, two tokens"
    );
    for _ in 0..3 {
        post_form(&c, &format!("{}/oauth/token", sidecar.urls[0]), form, None).await;
        post_form(&c, &format!("{}/v1/token", sidecar.urls[1]), form, None).await;
    }
    assert_eq!((eu.token_calls(), us.token_calls()), (1, 1));
    // /oauth/token is not a token path on the second route: forwarded each time.
    post_form(&c, &format!("{}/oauth/token", sidecar.urls[1]), form, None).await;
    post_form(&c, &format!("{}/oauth/token", sidecar.urls[1]), form, None).await;
    assert_eq!(us.token_calls(), 3);
}

#[tokio::test]
async fn a_throttled_route_does_not_hold_back_the_other() {
    let eu = FakeProvider::start().await;
    let us = FakeProvider::start().await;
    eu.set_default(Answer::status(429, Some("30")));
    let sidecar = Sidecar::start_with(config_toml(&format!(
        "[[routes]]\nname = \"eu\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n[[routes]]\nname = \"us\"\nlisten = \"127.0.0.2:0\"\nupstream = \"{}\"\n",
        eu.url(),
        us.url()
    )))
    .await;
    let c = client();
    let form = "grant_type=client_credentials&client_id=app&client_secret=s";
    assert_eq!(
        post_form(&c, &format!("{}/oauth/token", sidecar.urls[0]), form, None)
            .await
            .status,
        429
    );
    assert_eq!(
        post_form(&c, &format!("{}/oauth/token", sidecar.urls[0]), form, None)
            .await
            .status,
        429
    );
    assert_eq!(eu.token_calls(), 1, "cooling down");
    assert_eq!(
        post_form(&c, &format!("{}/oauth/token", sidecar.urls[1]), form, None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn an_https_upstream_signed_by_a_private_ca_is_trusted_via_ca_file() {
    let pki = test_pki();
    let idp = FakeProvider::start_tls(&pki).await;
    let dir = std::env::temp_dir().join(format!("token-sidecar-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, &pki.ca).unwrap();
    let upstream = format!("https://localhost:{}", idp.addr().port());
    let sidecar = Sidecar::start_with(config(
        &upstream,
        &format!("[client]\nca_file = {:?}", ca_path.to_str().unwrap()),
    ))
    .await;
    let c = client();
    let form = "grant_type=client_credentials&client_id=app&client_secret=s";
    let first = post_form(&c, &sidecar.token_url(), form, None).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = post_form(&c, &sidecar.token_url(), form, None).await;
    assert_eq!(second.json()["access_token"], first.json()["access_token"]);
    assert_eq!(idp.token_calls(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_untrusted_https_upstream_is_a_clear_502() {
    // The sidecar is not told about this PKI's CA.
    let idp = FakeProvider::start_tls(&test_pki()).await;
    let sidecar = Sidecar::start(&format!("https://localhost:{}", idp.addr().port())).await;
    let reply = post_form(
        &client(),
        &sidecar.token_url(),
        "grant_type=client_credentials&client_id=app&client_secret=s",
        None,
    )
    .await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.json()["error"], "temporarily_unavailable");
    assert_eq!(
        idp.token_calls(),
        0,
        "the handshake fails before any request"
    );
}

#[tokio::test]
async fn mutual_tls_presents_the_configured_client_certificate() {
    let pki = test_pki();
    let idp = FakeProvider::start_mtls(&pki).await;
    let dir = std::env::temp_dir().join(format!("token-sidecar-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, pem) in [
        ("ca.pem", &pki.ca),
        ("client.pem", &pki.client_cert),
        ("client-key.pem", &pki.client_key),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    let upstream = format!("https://localhost:{}", idp.addr().port());
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let form = "grant_type=client_credentials&client_id=app&client_secret=s";

    // Without the client certificate the provider refuses the handshake.
    let without = Sidecar::start_with(config(
        &upstream,
        &format!("[client]\nca_file = {:?}", path("ca.pem")),
    ))
    .await;
    assert_eq!(
        post_form(&client(), &without.token_url(), form, None)
            .await
            .status,
        502
    );
    assert_eq!(idp.token_calls(), 0);

    let with = Sidecar::start_with(config(
        &upstream,
        &format!(
            "[client]\nca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}",
            path("ca.pem"),
            path("client.pem"),
            path("client-key.pem")
        ),
    ))
    .await;
    let reply = post_form(&client(), &with.token_url(), form, None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(idp.token_calls(), 1);
    let _ = std::fs::remove_dir_all(dir);
}
