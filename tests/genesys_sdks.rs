//! The real Genesys Cloud SDKs through the sidecar's Genesys preset: the Python SDK
//! (`PureCloudPlatformClientV2` 269) and the JavaScript SDK (`purecloud-platform-client-v2` 262),
//! each in both set-ups users have: (a) the SDK's host pointed at the sidecar without path params
//! and (b) the SDK's gateway with `path_params_login = "login"` and `path_params_api = "api"`.
//!
//! The preset's two hosts are overridden to loopback fakes: a login fake that knows one client
//! and an API fake that accepts the tokens the login fake issues. The SDKs are driven by
//! `tests/genesys/python_sdk.py` and `tests/genesys/js_sdk.js` (whose headers say which URLs each
//! set-up requests), installed by `.ci/genesys-sdks.sh` once per test binary. An SDK that cannot
//! be installed fails these tests; nothing here skips.

use crate::support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Deserialize;
use support::FakeProvider;
use support::sidecar::{Sidecar, config_toml};
use token_sidecar::config::genesys::REGIONS;

/// The one client the login fake knows.
const CLIENT_ID: &str = "sdk-client";
const CLIENT_SECRET: &str = "sdk-secret";
/// SDK logins per run in the coalescing test, all started at once.
const LOGINS: usize = 20;
/// Bound on one installer run (a cold pip + npm install takes well under a minute).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on one SDK script run (the Python SDK alone takes ~4 s to import).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug)]
enum Sdk {
    Python,
    Js,
}

/// Where the SDK is pointed: (a) its host, or (b) its gateway with login/api path params.
#[derive(Clone, Copy, Debug)]
enum Setup {
    Host,
    Gateway,
}

impl Setup {
    fn as_str(self) -> &'static str {
        match self {
            Setup::Host => "host",
            Setup::Gateway => "gateway",
        }
    }
}

const EVERY_SDK_AND_SETUP: [(Sdk, Setup); 4] = [
    (Sdk::Python, Setup::Host),
    (Sdk::Python, Setup::Gateway),
    (Sdk::Js, Setup::Host),
    (Sdk::Js, Setup::Gateway),
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn sdk_dir() -> PathBuf {
    repo().join("target/genesys-sdk")
}

/// Runs `.ci/genesys-sdks.sh` once per test binary; every test that needs an SDK calls this
/// first and fails, with the installer's output, if it did.
fn ensure_sdks() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join(".ci/genesys-sdks.sh"));
        let out = run_bounded(cmd, INSTALL_TIMEOUT, "installing the Genesys SDKs")?;
        if out.success {
            Ok(())
        } else {
            Err(format!(
                ".ci/genesys-sdks.sh failed ({}):\n{}{}",
                out.status, out.stdout, out.stderr
            ))
        }
    });
    if let Err(e) = result {
        panic!("the Genesys Cloud SDKs are not installed, so these tests cannot run: {e}");
    }
}

/// Reads a child's pipe to its end on a thread of its own, so neither pipe can fill and stall it.
fn read_all(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

struct Finished {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` in its own process group with piped output, killing the group (by its id) if it
/// has not exited within `timeout`. Blocking: SDK runs go through `spawn_blocking`.
fn run_bounded(mut cmd: Command, timeout: Duration, what: &str) -> Result<Finished, String> {
    use std::os::unix::process::CommandExt as _;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{what}: cannot start {cmd:?}: {e}"))?;
    let stdout = read_all(child.stdout.take().expect("piped stdout"));
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                // The group id is the child's pid (process_group(0)): this reaches pip or npm
                // under the installer too.
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what}: no exit within {timeout:?}, killed; stderr so far:\n{}",
                    stderr.join().unwrap_or_default()
                ));
            }
        }
    };
    Ok(Finished {
        success: status.success(),
        status: status.to_string(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// A command for one of the installed SDK runtimes, isolated from this machine's settings: an
/// empty HOME (both SDKs read a config file there that can set a gateway) and no HTTP proxy
/// (axios honours one, and every request here is for 127.0.0.1).
fn sdk_command(sdk: Sdk) -> Command {
    let home = sdk_dir().join("home");
    std::fs::create_dir_all(&home).expect("create the SDKs' HOME");
    let mut cmd = match sdk {
        Sdk::Python => {
            let mut cmd = Command::new(sdk_dir().join("venv/bin/python"));
            cmd.env("PYTHONDONTWRITEBYTECODE", "1");
            cmd
        }
        Sdk::Js => {
            let mut cmd = Command::new("node");
            cmd.env("NODE_PATH", sdk_dir().join("node/node_modules"));
            cmd
        }
    };
    cmd.current_dir(repo()).env("HOME", home);
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    cmd
}

/// What a driver script reports (its last line of stdout).
#[derive(Debug, Deserialize)]
struct Report {
    logins_ok: usize,
    /// An HTTP status per failed login, or the error's text when there was none.
    login_errors: Vec<serde_json::Value>,
    /// The distinct access tokens the successful logins got.
    access_tokens: Vec<String>,
    /// `{"status": 200, "body": {...}}` or `{"status": ..., "error": "..."}`.
    users_me: serde_json::Value,
}

/// Runs the driver script for `sdk` in `setup` against `base`: `logins` client-credentials logins
/// at once, then `GET /api/v2/users/me` with the first login's token.
async fn drive(sdk: Sdk, setup: Setup, base: &str, secret: &str, logins: usize) -> Report {
    let mut cmd = sdk_command(sdk);
    cmd.arg(match sdk {
        Sdk::Python => "tests/genesys/python_sdk.py",
        Sdk::Js => "tests/genesys/js_sdk.js",
    });
    cmd.args([base, setup.as_str(), CLIENT_ID, secret, &logins.to_string()]);
    let what = format!("{sdk:?} SDK, {} set-up", setup.as_str());
    let out = tokio::task::spawn_blocking({
        let what = what.clone();
        move || {
            ensure_sdks();
            run_bounded(cmd, SCRIPT_TIMEOUT, &what)
        }
    })
    .await
    .expect("SDK run panicked")
    .unwrap_or_else(|e| panic!("{e}"));
    let last = out.stdout.lines().rev().find(|l| !l.trim().is_empty());
    match (out.success, last.map(serde_json::from_str::<Report>)) {
        (true, Some(Ok(report))) => report,
        _ => panic!(
            "{what}: the driver script failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status, out.stdout, out.stderr
        ),
    }
}

/// The sidecar with the Genesys preset, its login and API hosts overridden to loopback fakes.
struct Genesys {
    /// Declared first so that it is dropped first: the sidecar stops before its upstreams.
    sidecar: Sidecar,
    /// Stands in for `login.<domain>`: knows `CLIENT_ID`/`CLIENT_SECRET` only.
    login: FakeProvider,
    /// Stands in for `api.<domain>`: accepts the tokens `login` issues.
    api: FakeProvider,
}

impl Genesys {
    async fn start() -> Genesys {
        let login = FakeProvider::start().await;
        login.set_clients(&[(CLIENT_ID, CLIENT_SECRET)]);
        let api = FakeProvider::start().await;
        api.accept_tokens_of(&login);
        let toml = format!(
            "genesys_region = \"us-east-1\"\n\
             genesys_login_upstream = {:?}\n\
             genesys_api_upstream = {:?}\n",
            login.url(),
            api.url()
        );
        let sidecar = Sidecar::start_with(config_toml(&toml)).await;
        Genesys {
            sidecar,
            login,
            api,
        }
    }

    async fn drive(&self, sdk: Sdk, setup: Setup, secret: &str, logins: usize) -> Report {
        drive(sdk, setup, self.sidecar.url(), secret, logins).await
    }

    /// The paths the login fake was asked for.
    fn login_paths(&self) -> Vec<String> {
        self.login
            .recorded()
            .into_iter()
            .map(|r| r.path_and_query)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sdk_logins_make_one_upstream_token_call_and_share_its_token() {
    for (sdk, setup) in EVERY_SDK_AND_SETUP {
        let g = Genesys::start().await;
        let report = g.drive(sdk, setup, CLIENT_SECRET, LOGINS).await;
        let case = format!("{sdk:?} SDK, {} set-up: {report:?}", setup.as_str());
        assert_eq!(report.logins_ok, LOGINS, "{case}");
        assert!(report.login_errors.is_empty(), "{case}");
        assert_eq!(report.access_tokens.len(), 1, "one token for all: {case}");
        assert_eq!(g.login.token_calls(), 1, "{case}");
        // The preset strips `/login` in set-up (b): the login host sees its own token path.
        assert_eq!(g.login_paths(), ["/oauth/token"], "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_me_reaches_the_api_host_with_the_bearer_token_and_never_the_login_host() {
    for (sdk, setup) in EVERY_SDK_AND_SETUP {
        let g = Genesys::start().await;
        let report = g.drive(sdk, setup, CLIENT_SECRET, 2).await;
        let case = format!("{sdk:?} SDK, {} set-up: {report:?}", setup.as_str());
        assert_eq!(report.access_tokens.len(), 1, "{case}");
        let token = &report.access_tokens[0];
        assert_eq!(report.users_me["status"], 200, "{case}");
        assert_eq!(report.users_me["body"]["id"], "fake-user", "{case}");

        let api = g.api.recorded();
        assert_eq!(api.len(), 1, "one API call: {case}");
        assert_eq!(api[0].method, http::Method::GET, "{case}");
        // Set-up (b) sends /api/api/v2/users/me; the preset strips one /api.
        assert_eq!(api[0].path_and_query, "/api/v2/users/me", "{case}");
        assert_eq!(
            api[0].headers["authorization"],
            format!("Bearer {token}").as_str(),
            "{case}"
        );
        assert_eq!(g.api.token_calls(), 0, "{case}");
        let login = g.login_paths();
        assert!(
            login.iter().all(|p| !p.contains("/api/")),
            "the login host saw an API call: {login:?}; {case}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_gets_401_from_the_sdk() {
    for (sdk, setup) in EVERY_SDK_AND_SETUP {
        let g = Genesys::start().await;
        let report = g.drive(sdk, setup, "wrong-secret", 3).await;
        let case = format!("{sdk:?} SDK, {} set-up: {report:?}", setup.as_str());
        assert_eq!(report.logins_ok, 0, "{case}");
        assert_eq!(report.login_errors, [401, 401, 401], "{case}");
        assert!(report.access_tokens.is_empty(), "{case}");
        assert!(
            g.login.token_calls() >= 1,
            "the login host was asked: {case}"
        );
        assert_eq!(g.api.requests(), 0, "{case}");
    }
}

/// A region list printed by an SDK as JSON, `{"us_east_1": "<host or domain>", ...}`, compared
/// with ours: every SDK region must be in `REGIONS` under the same name (with `-` for `_`) and
/// the same domain.
fn assert_regions_match(sdk: Sdk, json: &str, domain_of: impl Fn(&str) -> Option<&str>) {
    let listed: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("{sdk:?} SDK region list is not a JSON object ({e}): {json}"));
    assert!(
        listed.len() >= 10,
        "{sdk:?} SDK lists too few regions: {json}"
    );
    let mut wrong = Vec::new();
    for (name, host) in &listed {
        let name = name.replace('_', "-");
        let host = host.as_str().unwrap_or_default();
        let Some(domain) = domain_of(host) else {
            wrong.push(format!("{name}: SDK host {host:?} is not in a known form"));
            continue;
        };
        match REGIONS.iter().find(|r| r.name == name) {
            None => wrong.push(format!("{name} ({domain}) is missing from REGIONS")),
            Some(r) if r.domain != domain => wrong.push(format!(
                "{name}: REGIONS says {:?}, the SDK says {domain:?}",
                r.domain
            )),
            Some(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "{sdk:?} SDK regions disagree with token_sidecar::config::genesys::REGIONS:\n{}",
        wrong.join("\n")
    );
}

fn sdk_region_list(sdk: Sdk) -> String {
    ensure_sdks();
    let mut cmd = sdk_command(sdk);
    match sdk {
        Sdk::Python => cmd.args([
            "-c",
            "import json; from PureCloudPlatformClientV2 import PureCloudRegionHosts as R; \
             print(json.dumps({r.name: r.value for r in R}))",
        ]),
        Sdk::Js => cmd.args([
            "-e",
            "console.log(JSON.stringify(require('purecloud-platform-client-v2').PureCloudRegionHosts))",
        ]),
    };
    let what = format!("{sdk:?} SDK region list");
    let out = run_bounded(cmd, SCRIPT_TIMEOUT, &what).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success, "{what}: {}\n{}", out.status, out.stderr);
    out.stdout
}

#[test]
fn every_python_sdk_region_is_in_our_table_with_its_domain() {
    let json = sdk_region_list(Sdk::Python);
    // PureCloudRegionHosts.us_east_1.value == "https://api.mypurecloud.com"
    assert_regions_match(Sdk::Python, &json, |host| host.strip_prefix("https://api."));
}

#[test]
fn every_js_sdk_region_is_in_our_table_with_its_domain() {
    let json = sdk_region_list(Sdk::Js);
    // PureCloudRegionHosts.us_east_1 == "mypurecloud.com"
    assert_regions_match(Sdk::Js, &json, |domain| {
        (!domain.is_empty() && !domain.contains('/')).then_some(domain)
    });
}
