//! Child processes: the real binary, started with a free loopback port, drained stderr, bounded
//! waits, and stopped by its pid; and this test binary itself, for a test that must run alone.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use super::{client, send};

async fn get(url: &str) -> super::Reply {
    send(
        &client(),
        Request::get(url).body(Full::new(Bytes::new())).unwrap(),
    )
    .await
}

pub const BIN: &str = env!("CARGO_BIN_EXE_token-sidecar");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process whose stderr is drained on a thread from the start, so a chatty child
/// (trace-level logs) can never block on a full pipe.
pub struct Drained {
    pub child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// A test that panics still stops its child, by pid.
impl Drop for Drained {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drained {
    pub fn spawn(mut cmd: Command) -> Drained {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        Drained {
            child,
            stderr: Some(stderr),
        }
    }

    /// Waits (bounded) for exit and returns (exit code, stderr).
    pub fn wait(mut self, limit: Duration) -> (i32, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the binary did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr.take().expect("waited once: wait takes self");
        (status.code().unwrap_or(-1), stderr.join().unwrap())
    }
}

/// Runs the binary to completion (bounded) and returns (exit code, stderr).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear().envs(env.iter().copied());
    Drained::spawn(cmd).wait(Duration::from_secs(20))
}

pub struct Running {
    pub process: Drained,
    pub listen: u16,
    pub admin: u16,
}

impl Running {
    pub fn start(upstream: &str, extra_env: &[(&str, &str)]) -> Running {
        Running::start_args(upstream, &[], extra_env)
    }

    /// Like [`Running::start`], with more command-line arguments.
    pub fn start_args(upstream: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Running {
        let mut all = vec!["--upstream", upstream];
        all.extend_from_slice(args);
        Running::start_bare(&all, extra_env)
    }

    /// The binary with only `args` and `env` (no upstream given), its listeners on free
    /// loopback ports.
    pub fn start_bare(args: &[&str], env: &[(&str, &str)]) -> Running {
        let (listen, admin) = (free_port(), free_port());
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .env_clear()
            .env("TOKEN_SIDECAR_ADMIN", format!("127.0.0.1:{admin}"))
            .envs(env.iter().copied());
        Running {
            process: Drained::spawn(cmd),
            listen,
            admin,
        }
    }

    /// Waits for `/readyz` to answer 200: up to 15 s, which a loaded two-core machine running
    /// the whole suite needs for several pods starting at once (each connects to Redis first).
    pub async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.admin)).is_ok() {
                let reply = get(&format!("http://127.0.0.1:{}/readyz", self.admin)).await;
                if reply.status == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the sidecar did not become ready");
    }

    /// The process's resident memory now, in bytes (from `/proc/<pid>/status`).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.child.id()))
            .expect("the child's /proc status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    /// The base URL of the route listener.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.listen)
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.process.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for exit after SIGTERM and returns (code, stderr).
    pub fn wait(self) -> (i32, String) {
        self.process.wait(Duration::from_secs(30))
    }
}

/// Set in a child of this test binary to the one test it runs (see [`alone`]).
const ALONE: &str = "TOKEN_SIDECAR_TEST_ALONE";

/// For a test that measures this process (its memory) and so must not share it with the tests
/// running beside it in this binary: runs the test named `test` (`module::function`) alone in a
/// fresh child of this test binary. Returns true in that child, where the test goes on; in the
/// calling test it waits (bounded) for the child, fails as it failed, and returns false.
pub async fn alone(test: &str) -> bool {
    if std::env::var_os(ALONE).is_some_and(|running| running == test) {
        return true;
    }
    let binary = std::env::current_exe().expect("the test binary's path");
    let child = tokio::process::Command::new(binary)
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, test)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), child)
        .await
        .unwrap_or_else(|_| panic!("{test} did not finish alone within 180 s"))
        .expect("run the test binary");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{test}, alone:\n{stdout}\n{stderr}"
    );
    false
}
