//! Operating the sidecar: the real binary's exit codes and signals, admin endpoints, metrics,
//! graceful shutdown, and logs that never carry a secret or a token.
use crate::support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::time::{Duration, Instant};
use support::process::{Running, free_port, run_to_end};
use support::redis::RedisServer;
use support::{Answer, FakeProvider, Fixture, client, post_form, send};

async fn get(url: &str) -> support::Reply {
    send(
        &client(),
        Request::get(url).body(Full::new(Bytes::new())).unwrap(),
    )
    .await
}

#[test]
fn bad_configuration_exits_64_with_one_clear_line() {
    let (code, err) = run_to_end(&[], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("no upstream"), "{err}");

    let (code, err) = run_to_end(&["--upstream", "ftp://x"], &[]);
    assert_eq!((code, err.contains("--upstream")), (64, true), "{err}");

    // docs/GENESYS.md: a replacement Genesys host without a region is an error, not ignored.
    let (code, err) = run_to_end(
        &["--upstream", "http://127.0.0.1:9"],
        &[("TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM", "http://127.0.0.1:9")],
    );
    assert_eq!(
        (code, err.contains("need genesys_region")),
        (64, true),
        "{err}"
    );

    let (code, err) = run_to_end(&["--config", "/nonexistent/token-sidecar.toml"], &[]);
    assert_eq!(
        (code, err.contains("cannot read config file")),
        (64, true),
        "{err}"
    );

    let dir = std::env::temp_dir().join(format!("ts-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "upstream = \"http://127.0.0.1:1\"\n[token]\nrefresh_after = 0.5\n",
    )
    .unwrap();
    let (code, err) = run_to_end(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!((code, err.contains("refresh_after")), (64, true), "{err}");
    std::fs::write(
        &file,
        "upstream = \"http://127.0.0.1:1\"\n[token]\nerror_ttl = 5\n",
    )
    .unwrap();
    let (code, err) = run_to_end(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(
        (code, err.contains("error_ttl") || err.contains("line 3")),
        (64, true),
        "{err}"
    );

    let (code, err) = run_to_end(
        &[],
        &[
            ("TOKEN_SIDECAR_UPSTREAM", "http://127.0.0.1:1"),
            ("TOKEN_SIDECAR_ADMIN", "nope"),
        ],
    );
    assert_eq!(
        (code, err.contains("TOKEN_SIDECAR_ADMIN")),
        (64, true),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts a token request through `sidecar` and returns once the provider has seen it (bounded).
async fn call_in_flight(
    idp: &FakeProvider,
    sidecar: &Running,
) -> tokio::task::JoinHandle<support::Reply> {
    let url = format!("http://127.0.0.1:{}/oauth/token", sidecar.listen);
    let call = tokio::spawn(async move {
        let form = "grant_type=client_credentials&client_id=app&client_secret=s";
        post_form(&client(), &url, form, None).await
    });
    for _ in 0..200 {
        if idp.token_calls() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_zero() {
    let idp = FakeProvider::start().await;
    idp.set_default(Answer::slow_token(3600, Duration::from_millis(1500)));
    let sidecar = Running::start(&idp.url(), &[]);
    sidecar.wait_ready().await;
    let in_flight = call_in_flight(&idp, &sidecar).await;
    sidecar.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let readiness = tokio::time::timeout(Duration::from_secs(2), async {
        let req = Request::get(format!("http://127.0.0.1:{}/readyz", sidecar.admin))
            .body(Full::new(Bytes::new()))
            .unwrap();
        client().request(req).await.map(|r| r.status())
    })
    .await;
    let reply = in_flight.await.unwrap();
    assert_eq!(
        reply.status,
        200,
        "the request in flight still gets its answer: {}",
        reply.text()
    );
    let expires_in = reply.json()["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    let status = readiness
        .expect("admin answers while draining")
        .expect("admin reachable");
    assert_eq!(status, 503, "readiness turns 503 while draining");
    let (code, stderr) = sidecar.wait();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("draining"), "{stderr}");
}

/// Writes `toml` to a fresh file for `--config`; the directory goes with the returned guard.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(name: &str, toml: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("ts-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), toml).unwrap();
        ConfigFile(dir)
    }

    fn path(&self) -> String {
        self.0.join("config.toml").to_string_lossy().into_owned()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_see_no_broken_request_across_a_sigterm() {
    let idp = FakeProvider::start().await;
    let file = ConfigFile::new("drain", "shutdown_grace = \"6s\"\n");
    let sidecar = Running::start_args(&idp.url(), &["--config", &file.path()], &[]);
    sidecar.wait_ready().await;
    let url = format!("http://127.0.0.1:{}/oauth/token", sidecar.listen);
    let form = "grant_type=client_credentials&client_id=app&client_secret=s";
    let signalled = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let (url, signalled) = (url.clone(), signalled.clone());
            tokio::spawn(async move {
                // Each client keeps its own keep-alive connection.
                let client = client();
                let (mut ok, mut after, mut broken) = (0, 0, Vec::new());
                for _ in 0..1_000 {
                    if signalled
                        .get()
                        .is_some_and(|at| at.elapsed() > Duration::from_secs(2))
                    {
                        break;
                    }
                    let request = Request::post(url.as_str())
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(Full::new(Bytes::from(form)))
                        .unwrap();
                    match tokio::time::timeout(Duration::from_secs(5), client.request(request))
                        .await
                    {
                        Ok(Ok(response)) if response.status() == 200 => {
                            ok += 1;
                            after += usize::from(signalled.get().is_some());
                        }
                        Ok(Ok(response)) => broken.push(format!("status {}", response.status())),
                        Ok(Err(e)) => broken.push(format!("{e:?}")),
                        Err(_) => broken.push("no answer in 5 s".to_owned()),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ok, after, broken)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sidecar.terminate();
    let _ = signalled.set(Instant::now());
    let (mut ok, mut after, mut broken) = (0, 0, Vec::new());
    for client in clients {
        let (o, a, b) = client.await.unwrap();
        ok += o;
        after += a;
        broken.extend(b);
    }
    let (code, stderr) = sidecar.wait();
    eprintln!(
        "{ok} answered, {after} after SIGTERM, {} broken",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "{} broken: {:?}",
        broken.len(),
        &broken[..broken.len().min(5)]
    );
    assert!(
        after >= 100,
        "clients kept being served while draining: {after}"
    );
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_still_waiting_when_the_grace_ends_gets_an_answer() {
    let idp = FakeProvider::start().await;
    idp.set_default(Answer::slow_token(3600, Duration::from_secs(4)));
    let file = ConfigFile::new("grace", "shutdown_grace = \"1s\"\n");
    let sidecar = Running::start_args(&idp.url(), &["--config", &file.path()], &[]);
    sidecar.wait_ready().await;
    let waiting = call_in_flight(&idp, &sidecar).await;
    sidecar.terminate();
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.text().contains("shutting down"), "{}", reply.text());
    let (code, stderr) = sidecar.wait();
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_never_carry_secrets_tokens_or_authorization() {
    let idp = FakeProvider::start().await;
    let secret = "s3cret-VALUE-9f2c";
    let refresh = idp.issue_refresh_token();
    let sidecar = Running::start(
        &idp.url(),
        &[("RUST_LOG", "trace"), ("TOKEN_SIDECAR_LOG_FORMAT", "json")],
    );
    sidecar.wait_ready().await;
    let base = format!("http://127.0.0.1:{}", sidecar.listen);
    let c = client();
    let mut seen = Vec::new();
    let form = format!("grant_type=client_credentials&client_id=app&client_secret={secret}");
    for _ in 0..3 {
        let reply = post_form(&c, &format!("{base}/oauth/token"), &form, None).await;
        seen.push(reply.json()["access_token"].as_str().unwrap().to_owned());
    }
    let basic = post_form(
        &c,
        &format!("{base}/oauth/token"),
        "grant_type=client_credentials&scope=x",
        Some(("app", secret)),
    )
    .await;
    seen.push(basic.json()["access_token"].as_str().unwrap().to_owned());
    let rotated = post_form(
        &c,
        &format!("{base}/oauth/token"),
        &format!(
            "grant_type=refresh_token&refresh_token={refresh}&client_id=app&client_secret={secret}"
        ),
        None,
    )
    .await;
    seen.push(rotated.json()["refresh_token"].as_str().unwrap().to_owned());
    let password = post_form(
        &c,
        &format!("{base}/oauth/token"),
        &format!("grant_type=password&username=u&password={secret}"),
        None,
    )
    .await;
    assert_eq!(password.status, 200);
    let req = Request::get(format!("{base}/echo"))
        .header("authorization", "Bearer bearer-XYZ-123")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(&c, req).await;
    idp.set_default(Answer::status(401, None));
    post_form(
        &c,
        &format!("{base}/oauth/token"),
        "grant_type=client_credentials&client_id=app&client_secret=other-SECRET-77",
        None,
    )
    .await;

    sidecar.terminate();
    let (code, logs) = sidecar.wait();
    assert_eq!(code, 0);
    assert!(
        logs.contains("upstream token call"),
        "trace logs were captured: {logs}"
    );
    let basic_header = support::basic_auth("app", secret);
    let basic_b64 = basic_header.trim_start_matches("Basic ");
    for needle in [
        secret,
        "other-SECRET-77",
        &refresh,
        "bearer-XYZ-123",
        basic_b64,
    ]
    .into_iter()
    .chain(seen.iter().map(String::as_str))
    {
        assert!(!logs.contains(needle), "logs contain {needle:?}");
    }
}

#[tokio::test]
async fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let idp = FakeProvider::start().await;
    // stderr is a pipe here, as in a container's log file or `| tee`.
    let sidecar = Running::start(&idp.url(), &[("TOKEN_SIDECAR_LOG_FORMAT", "text")]);
    sidecar.wait_ready().await;
    sidecar.terminate();
    let (code, stderr) = sidecar.wait();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("route listening"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "ANSI escapes in piped logs: {stderr:?}"
    );
}

#[tokio::test]
async fn healthz_readyz_and_metrics_report_the_token_path() {
    let fx = Fixture::start("").await;
    let form = "grant_type=client_credentials&client_id=app&client_secret=hunter2";
    for _ in 0..3 {
        fx.post_token(form).await;
    }
    assert_eq!(
        get(&format!("{}/healthz", fx.sidecar.admin_url))
            .await
            .status,
        200
    );
    assert_eq!(
        get(&format!("{}/readyz", fx.sidecar.admin_url))
            .await
            .status,
        200
    );
    assert_eq!(
        get(&format!("{}/nope", fx.sidecar.admin_url)).await.status,
        404
    );
    let metrics = get(&format!("{}/metrics", fx.sidecar.admin_url))
        .await
        .text();
    for line in [
        r#"token_sidecar_token_requests_total{route="default",outcome="hit"} 2"#,
        r#"token_sidecar_token_requests_total{route="default",outcome="miss"} 1"#,
        r#"token_sidecar_upstream_token_calls_total{route="default",status="200"} 1"#,
        r#"token_sidecar_cache_entries{route="default"} 1"#,
        r#"token_sidecar_upstream_token_call_duration_seconds_count{route="default"} 1"#,
        r#"token_sidecar_upstream_token_calls_in_flight{route="default"} 0"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    assert!(
        !metrics.contains("hunter2") && !metrics.contains("tok-"),
        "no secret or token in metrics"
    );

    fx.idp.set_default(Answer::status(429, Some("60")));
    fx.post_token("grant_type=client_credentials&client_id=other&client_secret=x")
        .await;
    let metrics = get(&format!("{}/metrics", fx.sidecar.admin_url))
        .await
        .text();
    assert!(
        metrics.contains(r#"token_sidecar_cooldowns_active{route="default"} 1"#),
        "{metrics}"
    );
    let hash = token_sidecar::telemetry::client_hash("other");
    assert!(
        metrics.contains(&format!(
            r#"token_sidecar_cooldown_remaining_seconds{{route="default",client="{hash}"}}"#
        )),
        "{metrics}"
    );
    assert!(
        !metrics.contains("\"other\""),
        "client ids appear only hashed"
    );
    fx.sidecar.stop().await.unwrap();
}

/// Thirty client ids on hold: all are counted, but at most 20 get a series of their own, so a
/// caller inventing client ids cannot grow `/metrics` without bound.
#[tokio::test]
async fn per_client_cool_down_series_are_capped() {
    let fx = Fixture::start("").await;
    fx.idp.set_default(Answer::status(429, Some("60")));
    for i in 0..30 {
        let form = format!("grant_type=client_credentials&client_id=c{i}&client_secret=x");
        assert_eq!(fx.post_token(&form).await.status, 429);
    }
    let metrics = get(&format!("{}/metrics", fx.sidecar.admin_url))
        .await
        .text();
    assert!(
        metrics.contains(r#"token_sidecar_cooldowns_active{route="default"} 30"#),
        "{metrics}"
    );
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("token_sidecar_cooldown_remaining_seconds{"))
        .count();
    assert_eq!(series, 20, "{metrics}");
    fx.sidecar.stop().await.unwrap();
}

#[tokio::test]
async fn healthcheck_subcommand_reflects_readiness() {
    let fx = Fixture::start("").await;
    let admin = fx
        .sidecar
        .admin_url
        .trim_start_matches("http://")
        .to_owned();
    let ok =
        tokio::task::spawn_blocking(move || run_to_end(&["healthcheck", "--admin", &admin], &[]))
            .await
            .unwrap();
    assert_eq!(ok.0, 0, "{}", ok.1);
    let dead = format!("127.0.0.1:{}", free_port());
    let down =
        tokio::task::spawn_blocking(move || run_to_end(&["healthcheck", "--admin", &dead], &[]))
            .await
            .unwrap();
    assert_eq!(down.0, 1, "{}", down.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_keys_and_cool_downs_by_client_hash_only() {
    let fx = Fixture::start("").await;
    let secret = "status-SECRET-77";
    let form = format!("grant_type=client_credentials&client_id=status-app&client_secret={secret}");
    let token = fx.post_token(&form).await;
    assert_eq!(token.status, 200);
    let access_token = token.json()["access_token"].as_str().unwrap().to_owned();
    fx.idp.push(Answer::status(429, Some("60")));
    let held = fx
        .post_token("grant_type=client_credentials&client_id=held-app&client_secret=x")
        .await;
    assert_eq!(held.status, 429);

    let status = get(&format!("{}/status", fx.sidecar.admin_url)).await;
    assert_eq!(status.status, 200);
    assert_eq!(
        status.header("content-type").as_deref(),
        Some("application/json")
    );
    let text = status.text();
    for leak in [secret, access_token.as_str(), "status-app", "held-app"] {
        assert!(!text.contains(leak), "{leak:?} on /status: {text}");
    }
    let document = status.json();
    assert_eq!(document["ready"], true);
    assert!(document["shared"].is_null());
    let route = &document["routes"][0];
    assert_eq!(route["name"], "default");
    assert_eq!(route["keys_total"], 2);
    let ours = token_sidecar::telemetry::client_hash("status-app");
    let key = route["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["client"] == ours.as_str())
        .unwrap_or_else(|| panic!("no key for {ours}: {text}"));
    let ttl = key["ttl_s"].as_u64().unwrap();
    assert!(ttl > 3000 && ttl <= 3600, "{ttl}");
    assert_eq!(key["tokens"], 1);
    let theirs = token_sidecar::telemetry::client_hash("held-app");
    let cooldown = &route["cooldowns"][0];
    assert_eq!(cooldown["client"], theirs.as_str());
    let left = cooldown["left_s"].as_u64().unwrap();
    assert!((55..=60).contains(&left), "{left}");
    assert_eq!(route["limiter"]["max_concurrent_calls"], 64);

    // The subcommand prints the same as tables.
    let admin = fx
        .sidecar
        .admin_url
        .trim_start_matches("http://")
        .to_owned();
    let printed = tokio::task::spawn_blocking(move || {
        std::process::Command::new(support::process::BIN)
            .args(["status", "--admin", &admin])
            .env_clear()
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.status.success(), "{table}");
    assert!(
        table.contains("route default: 2 keys, 1 cool-down,"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(&ours) && l.contains("serving")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(&theirs) && l.trim_end().ends_with('s')),
        "{table}"
    );
}

#[test]
fn the_documented_example_config_loads_with_the_defaults_it_claims() {
    use token_sidecar::config::{Config, Limits, Overrides, TokenConfig};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/token-sidecar.toml");
    let config = Config::load(
        Overrides {
            config: Some(path.into()),
            upstream: Some("https://idp.example".into()),
            ..Default::default()
        },
        |_| None,
        |p| std::fs::read_to_string(p),
    )
    .unwrap();
    let route = &config.routes[0];
    assert_eq!(
        route.token,
        TokenConfig::default(),
        "the example's [token] values are the defaults"
    );
    assert_eq!(
        config.limits,
        Limits::default(),
        "the example's [limits] values are the defaults"
    );
    assert_eq!(route.client, Default::default());
    assert_eq!(route.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.admin.to_string(), "127.0.0.1:9901");
    assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    assert_eq!(config.workers, 1);
}

/// `TOKEN_SIDECAR_WORKERS` sizes the runtime: by default (1) everything runs on the main thread
/// (a current-thread runtime, no worker threads); N > 1 runs exactly N worker threads; 0 one per
/// CPU the process may use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_setting_sizes_the_runtime() {
    let idp = FakeProvider::start().await;
    let worker_threads = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|name| name.trim() == "tokio-rt-worker")
            })
            .count()
    };
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    for (workers, threads) in [(None, 0), (Some("1"), 0), (Some("3"), 3), (Some("0"), cpus)] {
        let env: Vec<(&str, &str)> = workers
            .map(|w| ("TOKEN_SIDECAR_WORKERS", w))
            .into_iter()
            .collect();
        let sidecar = Running::start(&idp.url(), &env);
        sidecar.wait_ready().await;
        assert_eq!(
            worker_threads(sidecar.process.child.id()),
            threads,
            "workers {workers:?}"
        );
        sidecar.terminate();
        let (code, stderr) = sidecar.wait();
        assert_eq!(code, 0, "{stderr}");
    }
}

/// A TLS file the upstream client cannot read is a configuration error found before any port is
/// bound: with the listen port already taken, the answer is still 64 naming the file, not 69.
#[test]
fn an_unreadable_tls_file_is_reported_before_binding() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let dir = std::env::temp_dir().join(format!("ts-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tls.toml");
    std::fs::write(&file, "[client]\nca_file = \"/nonexistent/ca.pem\"\n").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let (code, err) = run_to_end(
        &[
            "--upstream",
            "https://127.0.0.1:1",
            "--listen",
            &listen,
            "--admin",
            &admin,
            "--config",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!((code, err.contains("client.ca_file")), (64, true), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The config files users start from as shipped: the one the Dockerfile copies into the image,
/// and the `token-sidecar.toml` of the ConfigMap that `kubectl kustomize` renders from each
/// kustomization under config/kubernetes/ (found by walking the directory, so a new overlay is
/// covered by being added). A file that several render alike is kept once, named after each.
fn shipped_config_files() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copied = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY config/"))
        .find_map(|rest| rest.split_whitespace().next())
        .expect("the Dockerfile copies a config file into the image");
    let mut files = vec![(
        format!("Dockerfile: config/{copied}"),
        std::fs::read_to_string(root.join("config").join(copied)).unwrap(),
    )];
    for dir in kustomizations(&root.join("config/kubernetes")) {
        let name = dir.strip_prefix(root).unwrap().display().to_string();
        let yaml = kustomize(&dir);
        let tomls = configmap_tomls(&yaml);
        assert_eq!(
            tomls.len(),
            1,
            "{name}: want one ConfigMap with token-sidecar.toml in `kubectl kustomize` output:\n{yaml}"
        );
        for toml in tomls {
            match files.iter_mut().skip(1).find(|(_, known)| *known == toml) {
                Some((names, _)) => *names = format!("{names}, {name}"),
                None => files.push((name.clone(), toml)),
            }
        }
    }
    assert!(files.len() >= 2, "no ConfigMap found: {files:?}");
    files
}

/// Every directory under `dir` with a kustomization.yaml that is not a component (a component
/// renders only as part of a kustomization that adds it), sorted.
fn kustomizations(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                if !text.lines().any(|l| l.trim() == "kind: Component") {
                    found.push(dir.clone());
                }
            }
        }
    }
    found.sort();
    assert!(
        !found.is_empty(),
        "no kustomization under {}",
        dir.display()
    );
    found
}

/// What `kubectl kustomize DIR` renders (kubectl is on every machine this project runs on; a
/// machine without it fails here, saying so).
fn kustomize(dir: &std::path::Path) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}): it renders config/kubernetes/"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {stderr}",
        dir.display()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The block scalars keyed `token-sidecar.toml: |` (or `|-`) in a YAML text, de-indented.
fn configmap_tomls(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !["token-sidecar.toml: |", "token-sidecar.toml: |-"].contains(&line.trim()) {
            continue;
        }
        let key_indent = line.len() - line.trim_start().len();
        let body: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent)
            .copied()
            .collect();
        let indent = body
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        let text: Vec<&str> = body.iter().map(|l| l.get(indent..).unwrap_or("")).collect();
        found.push(text.join("\n"));
    }
    found
}

/// Issue: the image and the manifests set `token_paths`, which the Genesys preset refused, so
/// `-e TOKEN_SIDECAR_GENESYS_REGION=…` exited 64. Every shipped config file must start with
/// either way of naming the provider, and serve a token. A config with a `[shared]` table
/// (overlays/fleet) starts against a real redis-server on loopback, with its Redis URL and key
/// file replaced through the environment (which wins over the file), and must put the token in
/// Redis: the table is live, not just accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_config_file_starts_with_an_upstream_or_a_genesys_region() {
    let idp = FakeProvider::start().await;
    let dir = std::env::temp_dir().join(format!("ts-shipped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("fleet.key");
    std::fs::write(
        &key_file,
        "a fleet secret for this test only, 32 bytes or more",
    )
    .unwrap();
    let key_file = key_file.to_str().unwrap().to_owned();
    for (n, (name, toml)) in shipped_config_files().into_iter().enumerate() {
        let shared = toml.lines().any(|l| l.trim() == "[shared]");
        let file = dir.join(format!("{n}.toml"));
        std::fs::write(&file, &toml).unwrap();
        let config = file.to_str().unwrap().to_owned();
        let url = idp.url();
        let ways: [(&str, Vec<(&str, &str)>); 2] = [
            ("upstream", vec![("TOKEN_SIDECAR_UPSTREAM", &url)]),
            (
                "genesys region",
                vec![
                    ("TOKEN_SIDECAR_GENESYS_REGION", "us-east-1"),
                    ("TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM", &url),
                    ("TOKEN_SIDECAR_GENESYS_API_UPSTREAM", &url),
                ],
            ),
        ];
        for (way, mut env) in ways {
            env.push(("TOKEN_SIDECAR_CONFIG", &config));
            // A fresh, empty Redis for each start of a [shared] config.
            let redis = shared.then(RedisServer::start);
            let redis_url = redis.as_ref().map(RedisServer::url).unwrap_or_default();
            if shared {
                env.push(("TOKEN_SIDECAR_SHARED_REDIS", &redis_url));
                env.push(("TOKEN_SIDECAR_SHARED_KEY_FILE", &key_file));
            }
            let mut sidecar = Running::start_bare(&[], &env);
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", sidecar.admin)).is_err() {
                if let Some(status) = sidecar.process.child.try_wait().unwrap() {
                    let (_, stderr) = sidecar.process.wait(Duration::from_secs(1));
                    panic!("{name} with {way}: exited {status}: {stderr}");
                }
                assert!(
                    Instant::now() < deadline,
                    "{name} with {way}: never listened"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sidecar.wait_ready().await;
            let form =
                format!("grant_type=client_credentials&client_id=shipped-{n}&client_secret=s");
            let reply = post_form(
                &client(),
                &format!("{}/oauth/token", sidecar.url()),
                &form,
                None,
            )
            .await;
            assert_eq!(reply.status, 200, "{name} with {way}: {}", reply.text());
            assert!(
                reply.json()["access_token"].is_string(),
                "{name} with {way}"
            );
            if let Some(redis) = &redis {
                let deadline = Instant::now() + Duration::from_secs(5);
                while redis.dump().is_empty() {
                    assert!(
                        Instant::now() < deadline,
                        "{name} with {way}: [shared] is on, but nothing reached Redis"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            sidecar.terminate();
            let (code, stderr) = sidecar.wait();
            assert_eq!(code, 0, "{name} with {way}: {stderr}");
            let fleet = if shared { ", fleet tier on" } else { "" };
            println!("{name}: serves a token with {way}{fleet}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/status` walks and locks every cache entry: a loop of calls must not do that more than once
/// a second. The document is served again while fresh (a key added meanwhile is not in it yet),
/// then rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_built_at_most_once_a_second() {
    let fx = Fixture::start("").await;
    let url = format!("{}/status", fx.sidecar.admin_url);
    let keys = |reply: &support::Reply| reply.json()["routes"][0]["keys_total"].as_u64().unwrap();
    // A key added between two calls within the second is not in the second document. On a
    // machine too busy to make both calls within the second, the round is played again.
    let mut judged = false;
    for n in 0..5 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let started = Instant::now();
        let first = get(&url).await;
        let form = format!("grant_type=client_credentials&client_id=app-{n}&client_secret=s");
        assert_eq!(fx.post_token(&form).await.status, 200);
        let again = get(&url).await;
        if started.elapsed() < Duration::from_millis(900) {
            assert_eq!(keys(&first), n);
            assert_eq!(again.text(), first.text(), "served again within the second");
            judged = true;
            break;
        }
    }
    assert!(judged, "no two calls within a second in 5 rounds");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let keys_now = keys(&get(&url).await);
    assert!(keys_now >= 1, "rebuilt after the second: {keys_now} keys");
}

/// Two keys of one client (two scopes) show as two rows that can be told apart, and no row
/// shows the scope itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_one_clients_keys_apart() {
    let fx = Fixture::start("").await;
    for scope in ["read-secret-scope", "write-secret-scope"] {
        let form =
            format!("grant_type=client_credentials&client_id=app&client_secret=s&scope={scope}");
        assert_eq!(fx.post_token(&form).await.status, 200);
    }
    let reply = get(&format!("{}/status", fx.sidecar.admin_url)).await;
    assert!(!reply.text().contains("secret-scope"), "{}", reply.text());
    let document = reply.json();
    let keys = document["routes"][0]["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["client"], keys[1]["client"]);
    let ids: Vec<&str> = keys.iter().map(|k| k["key"].as_str().unwrap()).collect();
    assert!(ids[0].len() == 8 && ids[0] != ids[1], "{ids:?}");
}
