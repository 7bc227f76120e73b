//! Several routes on one listener, chosen by path prefix, and the Genesys Cloud preset that uses
//! them: each request reaches the provider its longest matching prefix names, with the prefix
//! removed where the route says so, and each route keeps its own cache.
use crate::support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::process::Running;
use support::sidecar::{Sidecar, config_toml};
use support::{FakeProvider, client, post_form, send};

const FORM: &str = "grant_type=client_credentials&client_id=app&client_secret=s";

fn get(url: String) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).unwrap()
}

/// `path` and `query` as the provider's `/echo` saw them.
async fn echoed(url: String) -> (String, Option<String>) {
    let reply = send(&client(), get(url)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.header("x-echo").as_deref(),
        Some("1"),
        "reached a provider's /echo"
    );
    let json = reply.json();
    (
        json["path"].as_str().unwrap().to_owned(),
        json["query"].as_str().map(str::to_owned),
    )
}

#[tokio::test]
async fn the_longest_prefix_on_a_segment_boundary_picks_the_route_and_strip_removes_it() {
    let root = FakeProvider::start().await;
    let login = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config_toml(&format!(
        r#"
        [[routes]]
        name = "root"
        listen = "127.0.0.1:0"
        upstream = "{}"
        [[routes]]
        name = "login"
        listen = "127.0.0.1:0"
        path_prefix = "/login"
        strip_prefix = true
        upstream = "{}"
        "#,
        root.url(),
        login.url()
    )))
    .await;
    assert_eq!(sidecar.urls.len(), 1, "two routes, one listener");
    let base = sidecar.url();

    // Token path after stripping: cached per route.
    for _ in 0..3 {
        let reply = post_form(&client(), &format!("{base}/login/oauth/token"), FORM, None).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        login.token_calls(),
        1,
        "three requests, one call, to the /login route's provider"
    );
    assert_eq!(root.token_calls(), 0);
    assert_eq!(
        login.recorded()[0].path_and_query,
        "/oauth/token",
        "the prefix is removed"
    );
    let reply = post_form(&client(), &format!("{base}/oauth/token"), FORM, None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(root.token_calls(), 1, "the / route has its own cache");

    // Forwarding sends the stripped path, query kept.
    assert_eq!(
        echoed(format!("{base}/login/echo/x?y=1")).await,
        ("/echo/x".to_owned(), Some("y=1".to_owned()))
    );
    assert_eq!(
        root.requests(),
        1,
        "nothing under /login reached the / route"
    );
    // Segment boundaries: /loginx is not under /login.
    assert_eq!(
        echoed(format!("{base}/echo/loginx")).await.0,
        "/echo/loginx"
    );
    let loginx = send(&client(), get(format!("{base}/loginx/echo"))).await;
    assert_eq!(
        root.requests(),
        3,
        "/loginx went to the / route: {}",
        loginx.status
    );
    sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn a_path_no_route_serves_is_a_404_json_error() {
    let api = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config_toml(&format!(
        "[[routes]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\npath_prefix = \"/api\"\nstrip_prefix = true\nupstream = \"{}\"\n",
        api.url()
    )))
    .await;
    let reply = send(&client(), get(format!("{}/elsewhere", sidecar.url()))).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"], "invalid_request");
    assert_eq!(api.requests(), 0);
    assert_eq!(
        echoed(format!("{}/api/echo", sidecar.url())).await.0,
        "/echo"
    );
    sidecar.stop().await.unwrap();
}

/// The preset's four routes, with the login and API hosts replaced by loopback fakes: what an SDK
/// pointed at the sidecar as its host sends, and what it sends through a gateway with the path
/// params `login` and `api`.
#[tokio::test]
async fn the_genesys_preset_routes_login_and_api_calls_in_both_sdk_setups() {
    let login = FakeProvider::start().await;
    let api = FakeProvider::start().await;
    let sidecar = Sidecar::start_with(config_toml(&format!(
        "genesys_region = \"us-east-1\"\ngenesys_login_upstream = \"{}\"\ngenesys_api_upstream = \"{}\"\n",
        login.url(),
        api.url()
    )))
    .await;
    let base = sidecar.url();
    for path in ["/oauth/token", "/login/oauth/token"] {
        for _ in 0..5 {
            let reply = post_form(&client(), &format!("{base}{path}"), FORM, None).await;
            assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        }
    }
    assert_eq!(
        login.token_calls(),
        2,
        "one call per set-up's route, then cached"
    );
    assert!(
        login
            .recorded()
            .iter()
            .all(|r| r.path_and_query == "/oauth/token")
    );

    // API calls: the plain set-up keeps /api/v2, the gateway's /api/api/v2 loses one /api.
    let plain = send(&client(), get(format!("{base}/api/v2/users/me"))).await;
    let gateway = send(&client(), get(format!("{base}/api/api/v2/users/me"))).await;
    let paths: Vec<String> = api
        .recorded()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(
        paths,
        ["/api/v2/users/me", "/api/v2/users/me"],
        "{} {}",
        plain.status,
        gateway.status
    );
    assert!(
        login
            .recorded()
            .iter()
            .all(|r| !r.path_and_query.starts_with("/api")),
        "no API call reaches the login host"
    );
    // Other login-host paths in the gateway set-up keep going to the login host.
    let revoke = send(&client(), get(format!("{base}/login/echo/revoke"))).await;
    assert_eq!(revoke.json()["path"], "/echo/revoke");
    assert_eq!(api.requests(), 2);
    sidecar.stop().await.unwrap();
}

/// Every spelling that servers behind the sidecar treat as the token path: repeated slashes,
/// dot segments, percent-encoded letters, a trailing slash, `;params`, case.
const TOKEN_PATH_SPELLINGS: [&str; 9] = [
    "/oauth/token",
    "//oauth/token",
    "/oauth//token",
    "/oauth/./token",
    "/oauth/%74oken",
    "/oauth/token/",
    "/OAUTH/TOKEN",
    "/oauth/token;x",
    "/x/../oauth/token",
];

/// Issue: these spellings were forwarded as pass-through, uncached and unpaced, so guessed
/// secrets sent to `//oauth/token` reached the provider 391 times in 20 s. Every one is served by
/// the token path now (the real binary), and the provider sees one call, to `/oauth/token`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_token_path_is_served_by_the_token_path() {
    let idp = FakeProvider::start().await;
    idp.set_clients(&[("app", "s")]);
    let sidecar = Running::start(&idp.url(), &[]);
    sidecar.wait_ready().await;
    let http = client();
    for path in TOKEN_PATH_SPELLINGS {
        let reply = post_form(&http, &format!("{}{path}", sidecar.url()), FORM, None).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        let status = reply.header("cache-status").unwrap_or_default();
        assert!(
            status.contains("token-sidecar") && !status.contains("bypass"),
            "{path}: {status}"
        );
    }
    assert_eq!(
        idp.token_calls(),
        1,
        "one key, one call, whatever the spelling"
    );
    // Wrong secrets on another spelling are paced like any unproven key: one call at a time per
    // client id and a pause after each rejection, so 30 guesses in a row make a handful of calls.
    let guess = "grant_type=client_credentials&client_id=app&client_secret=guess";
    for n in 0..30 {
        let path = TOKEN_PATH_SPELLINGS[1 + n % 8];
        let reply = post_form(&http, &format!("{}{path}", sidecar.url()), guess, None).await;
        assert!(
            [401, 429].contains(&reply.status),
            "{path}: {}",
            reply.status
        );
    }
    assert!(idp.token_calls() <= 4, "{} calls", idp.token_calls());
    let owner = post_form(
        &http,
        &format!("{}//oauth/token", sidecar.url()),
        FORM,
        None,
    )
    .await;
    assert_eq!(owner.status, 200, "the owner is still served");
    assert!(
        idp.recorded()
            .iter()
            .all(|r| r.path_and_query == "/oauth/token"),
        "token calls go to the route's own token path"
    );
    sidecar.terminate();
    assert_eq!(sidecar.wait().0, 0);
}

/// Issue: the Genesys preset routed on the raw path, so `//api/v2/users/me` took the caller's API
/// bearer to the login host. Routes match the normal form; a path that has none is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preset_routes_every_spelling_of_an_api_path_to_the_api_host() {
    let login = FakeProvider::start().await;
    let api = FakeProvider::start().await;
    let sidecar = Running::start_bare(
        &[],
        &[
            ("TOKEN_SIDECAR_GENESYS_REGION", "us-east-1"),
            ("TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM", &login.url()),
            ("TOKEN_SIDECAR_GENESYS_API_UPSTREAM", &api.url()),
        ],
    );
    sidecar.wait_ready().await;
    let spellings = [
        "//api/v2/users/me",
        "/./api/v2/users/me",
        "/API/v2/users/me",
        "/api;x/v2/users/me",
        "/login/../api/v2/users/me",
    ];
    for (n, path) in spellings.iter().enumerate() {
        let reply = send(&client(), get(format!("{}{path}", sidecar.url()))).await;
        // The API fake answers 401 without a token (404 to a spelling it does not know itself).
        assert!(
            [401, 404].contains(&reply.status),
            "{path}: {}",
            reply.status
        );
        assert_eq!(api.requests(), n + 1, "{path} reached the API host");
    }
    let h2c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let reply = send(&h2c, get(format!("{}//api/v2/users/me", sidecar.url()))).await;
    assert_eq!(reply.status, 401, "h2c");
    assert_eq!(
        api.requests(),
        spellings.len() + 1,
        "every spelling reached the API host"
    );
    assert_eq!(login.requests(), 0, "none reached the login host");

    for path in [
        "/api%2fv2/users/me",
        "/api/%2F../oauth/token",
        "/../api/v2/users/me",
        // A bare `%`: decoding the `%32%66` after it would hand the API host a `%2f`.
        "/api/%%32%66v2/users/me",
    ] {
        let reply = send(&client(), get(format!("{}{path}", sidecar.url()))).await;
        assert_eq!(reply.status, 400, "{path}");
        assert!(
            reply.text().contains("invalid_request"),
            "{path}: {}",
            reply.text()
        );
    }
    assert_eq!(api.requests() + login.requests(), spellings.len() + 1);
    sidecar.terminate();
    assert_eq!(sidecar.wait().0, 0);
}
