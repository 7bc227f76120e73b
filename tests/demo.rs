//! `token-sidecar demo`, as a new user runs it: the story ends with every client served through
//! the sidecar and a handful of provider calls, and exits 0; `--serve` keeps a provider and a
//! sidecar up that answer the curl commands it prints, and stops on SIGTERM.
use crate::support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::process::{BIN, free_port};
use support::{client, post_form};

/// The two figures of a report row: (directly, through the sidecar).
fn row(report: &str, label: &str) -> (u64, u64) {
    let line = report
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} row in:\n{report}"));
    let numbers: Vec<u64> = line[label.len()..]
        .split_whitespace()
        .map(|n| n.replace(',', "").parse().unwrap())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn the_demo_tells_the_story_and_exits_zero() {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["demo", "--seconds", "2", "--clients", "50"])
        .env_clear()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the demo did not end within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (report, progress) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "{report}\n{progress}");
    let (direct_throttled, through_throttled) = row(&report, "429 Too Many Requests");
    let (direct_ok, through_ok) = row(&report, "200 OK (a token)");
    let (direct_calls, through_calls) = row(&report, "calls the provider saw");
    assert!(
        direct_throttled > 100,
        "direct clients are throttled:\n{report}"
    );
    assert_eq!(through_throttled, 0, "{report}");
    assert!(through_ok > direct_ok, "{report}");
    assert!(
        through_calls <= 2,
        "4 s tokens over 2 s: one or two calls:\n{report}"
    );
    assert!(direct_calls > 100 * through_calls, "{report}");
    // It says how the clients behave and what it counts: a 429 is asked again at once, and a
    // token is a 200 answer.
    assert!(
        report.contains("asking again at once after a 429"),
        "{report}"
    );
    assert!(progress.contains("answered 200 with a token"), "{progress}");
    assert!(
        progress.contains("through the sidecar ["),
        "a progress line: {progress}"
    );
    assert!(
        !progress.contains('\x1b'),
        "no terminal codes into a pipe: {progress:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serve_answers_the_commands_it_prints_until_sigterm() {
    let (listen, admin) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["demo", "--serve"])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .env_clear()
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        // Bounded: the banner is a dozen lines.
        for line in BufReader::new(stdout).lines().take(50) {
            let line = line.unwrap();
            let done = line.starts_with("Ctrl-C");
            lines.push(line);
            if done {
                break;
            }
        }
        lines.join("\n")
    });
    let printed = tokio::time::timeout(Duration::from_secs(20), printed)
        .await
        .expect("the banner within 20 s")
        .unwrap();
    let url = format!("http://127.0.0.1:{listen}/oauth/token");
    assert!(
        printed.contains(&format!("-d grant_type=client_credentials {url}")),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("http://127.0.0.1:{admin}/metrics")),
        "{printed}"
    );
    let http = client();
    let first = post_form(
        &http,
        &url,
        "grant_type=client_credentials",
        Some(("demo-app", "demo-secret")),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.text());
    let again = post_form(
        &http,
        &url,
        "grant_type=client_credentials",
        Some(("demo-app", "demo-secret")),
    )
    .await;
    assert!(
        again.header("cache-status").unwrap().contains("hit"),
        "{:?}",
        again.headers
    );
    let wrong = post_form(
        &http,
        &url,
        "grant_type=client_credentials",
        Some(("demo-app", "guess")),
    )
    .await;
    assert_eq!(wrong.status, 401);

    // The status command it prints runs as printed: the binary's own path, not a name on PATH.
    let status_command = printed
        .lines()
        .find_map(|l| l.split("(or: ").nth(1))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no status command printed:\n{printed}"));
    let ran = Command::new("sh")
        .args(["-c", status_command])
        .env_clear()
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success() && shown.contains("route default"),
        "{status_command}: {shown}{}",
        String::from_utf8_lossy(&ran.stderr)
    );

    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("demo --serve did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success());
}
