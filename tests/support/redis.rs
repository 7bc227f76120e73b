//! Real Redis for the fleet tier's tests (Debian's `redis-server` and `redis-cli`; `.ci/run`
//! installs them), always on free loopback ports, started and waited for with a bound, stopped by
//! pid, and never skipped: a machine without them fails the test with a message.
//!
//! [`RedisServer`] is one server, restartable on its port. [`RedisCluster`] is a Redis Cluster of
//! N masters joined by `redis-cli --cluster create`; [`RedisSentinel`] a primary, its replica and
//! one Sentinel watching them, with a way to kill the primary and wait for the failover. The
//! groups keep their configuration, node tables and logs in a scratch directory removed on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::process::free_port;

/// One `redis-server` child.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// Extra server arguments (TLS, ACL users), kept for restarts.
    args: Vec<String>,
    /// The PEM CA a TLS server's certificate chains to.
    ca: Option<String>,
    /// `user:password@` for the URL, when the server requires it.
    auth: Option<String>,
    /// The PEM client certificate and key this support presents, for a server requiring mTLS.
    client_cert: Option<(String, String)>,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl RedisServer {
    /// A fresh server on a free loopback port, answering `PING`.
    pub fn start() -> RedisServer {
        RedisServer::start_with(Vec::new(), None, None)
    }

    /// A server with `args`; `ca` for a TLS one (then `args` name its files), `auth` as
    /// `user:password` when it requires a login.
    pub fn start_with(args: Vec<String>, ca: Option<String>, auth: Option<String>) -> RedisServer {
        RedisServer::start_tls(args, ca, auth, None)
    }

    /// [`RedisServer::start_with`], presenting `client_cert` (PEM certificate and key) to a
    /// server started with `--tls-auth-clients yes`.
    pub fn start_tls(
        args: Vec<String>,
        ca: Option<String>,
        auth: Option<String>,
        client_cert: Option<(String, String)>,
    ) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            args,
            ca,
            auth,
            client_cert,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>/0`, or `rediss://` and the login where the server needs them.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        let auth = self
            .auth
            .as_ref()
            .map(|a| format!("{a}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL, by pid) and waits for it: what Redis loss looks like.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port.to_string();
        let listen: [&str; 4] = if self.ca.is_some() {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1"])
            .args(&self.args)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &std::env::temp_dir().display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| no_redis("redis-server", e));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut connection) = self.connection()
                && redis::cmd("PING").query::<String>(&mut connection).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A plain synchronous connection, to look at what the server holds.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = match &self.ca {
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: self.client_cert.as_ref().map(|(cert, key)| {
                        redis::ClientTlsConfig {
                            client_cert: cert.clone().into_bytes(),
                            client_key: key.clone().into_bytes(),
                        }
                    }),
                    root_cert: Some(ca.clone().into_bytes()),
                },
            )?,
            None => redis::Client::open(self.url())?,
        };
        client.get_connection_with_timeout(Duration::from_secs(1))
    }

    /// Every key and its raw value (strings only; the fleet tier stores nothing else).
    pub fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut connection = self.connection().expect("connect to redis-server");
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut cursor = 0u64;
        // Bounded: a test's Redis holds a handful of keys.
        for _ in 0..1_000 {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1_000)
                .query(&mut connection)
                .expect("SCAN");
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.into_iter()
            .map(|key| {
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query(&mut connection)
                    .expect("GET");
                (key, value.unwrap_or_default())
            })
            .collect()
    }
}

/// Bound on a server of a group answering, on the replica syncing, and on Sentinel seeing both.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a new cluster's nodes all reporting `cluster_state:ok`.
const CLUSTER_OK_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on `redis-cli --cluster create`.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one connection or reply while polling a server.
const POLL_IO_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause between two polls of a server's state.
const POLL_EVERY: Duration = Duration::from_millis(50);

fn no_redis(program: &str, e: std::io::Error) -> ! {
    panic!(
        "cannot start {program} ({e}): run the tests with `bash scripts/test`, which installs it, or `apt-get install redis-server`"
    )
}

/// A directory of its own under the temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("token-sidecar-{what}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Scratch(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }

    fn dir(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` on loopback `port` without persistence, with `args`, its files and log in
/// `scratch`.
fn spawn_server(scratch: &Scratch, port: u16, args: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--dir", &scratch.dir().display().to_string()])
        .args(["--logfile", &scratch.file(&format!("redis-{port}.log"))])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| no_redis("redis-server", e))
}

/// Kills a child (SIGKILL, by its pid) and reaps it.
fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Polls `ready` until it holds; panics naming `what` after `bound`.
fn wait_until(bound: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        std::thread::sleep(POLL_EVERY);
    }
}

/// `cmd` sent to the server on loopback `port`, on a fresh connection with bounded waits.
fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut connection = client.get_connection_with_timeout(POLL_IO_TIMEOUT)?;
    connection.set_read_timeout(Some(POLL_IO_TIMEOUT))?;
    cmd.query(&mut connection)
}

/// `INFO <section>` of the server on `port`, empty if it does not answer.
fn info(port: u16, section: &str) -> String {
    query(port, redis::cmd("INFO").arg(section)).unwrap_or_default()
}

fn answers(port: u16) -> bool {
    query::<String>(port, &redis::cmd("PING")).is_ok()
}

/// A Redis Cluster of masters only, each on its own free loopback port (and cluster bus port),
/// slots spread by `redis-cli --cluster create`. Dropping it kills every node.
pub struct RedisCluster {
    nodes: Vec<Option<Child>>,
    ports: Vec<u16>,
    /// The nodes' tables (`nodes-<port>.conf`) and logs; removed after the kills.
    scratch: Scratch,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.iter_mut().for_each(kill);
    }
}

impl RedisCluster {
    /// Starts `masters` (at least 3, as `redis-cli` requires) nodes, joins them, and waits until
    /// every node says `cluster_state:ok`.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters");
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(masters),
            ports: Vec::with_capacity(masters),
            scratch: Scratch::new("cluster"),
        };
        for _ in 0..masters {
            // An explicit bus port: the default, port + 10000, overflows for ephemeral ports.
            let (port, bus) = (free_port(), free_port());
            let args = [
                "--cluster-enabled".to_owned(),
                "yes".to_owned(),
                "--cluster-config-file".to_owned(),
                cluster.scratch.file(&format!("nodes-{port}.conf")),
                "--cluster-node-timeout".to_owned(),
                "1000".to_owned(),
                "--cluster-port".to_owned(),
                bus.to_string(),
            ];
            cluster
                .nodes
                .push(Some(spawn_server(&cluster.scratch, port, &args)));
            cluster.ports.push(port);
        }
        for &port in &cluster.ports {
            wait_until(START_TIMEOUT, "a cluster node answering PING", || {
                answers(port)
            });
        }
        cluster.create();
        for &port in &cluster.ports {
            wait_until(CLUSTER_OK_TIMEOUT, "cluster_state:ok on every node", || {
                query::<String>(port, redis::cmd("CLUSTER").arg("INFO"))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
        }
        cluster
    }

    /// Runs `redis-cli --cluster create` on the nodes (bounded); panics with its output if it
    /// fails.
    fn create(&self) {
        let log = self.scratch.file("create.log");
        let out = File::create(&log).expect("create the redis-cli log");
        let mut cli = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(self.ports.iter().map(|port| format!("127.0.0.1:{port}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| no_redis("redis-cli", e));
        let mut status = None;
        wait_until(CREATE_TIMEOUT, "redis-cli --cluster create exiting", || {
            status = cli.try_wait().expect("wait for redis-cli");
            status.is_some()
        });
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create failed:\n{output}"
        );
    }

    /// `redis://127.0.0.1:<port>` of each node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// The nodes' URLs, comma-separated: a seed list as configuration takes it.
    pub fn seeds(&self) -> String {
        self.urls().join(",")
    }

    /// Each node's port, in the order of [`RedisCluster::urls`].
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }
}

/// A primary, one replica of it, and one Sentinel monitoring them as [`RedisSentinel::MASTER`],
/// quick to fail over (down after 1 s). Dropping it kills all three.
pub struct RedisSentinel {
    /// The two data servers: the first primary, then its replica.
    servers: [Option<Child>; 2],
    ports: [u16; 2],
    /// Which of `servers` is the primary: 0, then 1 once a failover was waited for.
    primary: usize,
    sentinel: Option<Child>,
    sentinel_port: u16,
    /// The Sentinel's configuration (which it rewrites) and every log; removed after the kills.
    scratch: Scratch,
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        // The Sentinel first, so that it does not act on the servers' deaths.
        kill(&mut self.sentinel);
        self.servers.iter_mut().for_each(kill);
    }
}

impl RedisSentinel {
    /// The name the Sentinel monitors the primary under.
    pub const MASTER: &str = "mymaster";

    /// Starts the primary, then the replica and waits for it to sync, then the Sentinel, and
    /// waits until the Sentinel names the primary and knows the replica.
    pub fn start() -> RedisSentinel {
        let scratch = Scratch::new("sentinel");
        let ports = [free_port(), free_port()];
        // No diskless-sync delay (5 s by default): the replica syncs at once.
        let no_delay = ["--repl-diskless-sync-delay".to_owned(), "0".to_owned()];
        let primary = spawn_server(&scratch, ports[0], &no_delay);
        wait_until(START_TIMEOUT, "the primary answering PING", || {
            answers(ports[0])
        });
        let replica_of = ["--replicaof".to_owned(), format!("127.0.0.1 {}", ports[0])];
        let replica = spawn_server(&scratch, ports[1], &replica_of);
        // In sync on both sides: the primary streams writes to a replica once it is online.
        wait_until(START_TIMEOUT, "the replica in sync", || {
            info(ports[1], "replication").contains("master_link_status:up")
                && info(ports[0], "replication").contains(",state=online,")
        });
        let sentinel_port = free_port();
        let mut group = RedisSentinel {
            servers: [Some(primary), Some(replica)],
            ports,
            primary: 0,
            sentinel: None,
            sentinel_port,
            scratch,
        };
        group.sentinel = Some(group.spawn_sentinel());
        wait_until(START_TIMEOUT, "Sentinel naming the primary", || {
            group.names_primary(ports[0])
        });
        wait_until(START_TIMEOUT, "Sentinel knowing the replica", || {
            group.knows_replica(ports[1])
        });
        group
    }

    /// Writes the Sentinel's configuration to a file of its own (Sentinel rewrites it) and
    /// starts it.
    fn spawn_sentinel(&self) -> Child {
        let conf = self.scratch.file("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {log}\n\
             sentinel resolve-hostnames no\n\
             sentinel monitor {name} 127.0.0.1 {primary} 1\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 3000\n",
            port = self.sentinel_port,
            dir = self.scratch.dir().display(),
            log = self.scratch.file("sentinel.log"),
            name = Self::MASTER,
            primary = self.ports[0],
        );
        std::fs::write(&conf, text).expect("write the Sentinel's configuration");
        Command::new("redis-server")
            .args([conf.as_str(), "--sentinel"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| no_redis("redis-server --sentinel", e))
    }

    /// Whether the Sentinel names `port` as the primary and its record of it is settled: flags
    /// just `master` (not down, no failover in progress), the state clients insist on.
    fn names_primary(&self, port: u16) -> bool {
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("get-master-addr-by-name").arg(Self::MASTER);
        let named: Option<(String, u16)> = query(self.sentinel_port, &cmd).ok();
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("master").arg(Self::MASTER);
        let record: Vec<String> = query(self.sentinel_port, &cmd).unwrap_or_default();
        let flags = record
            .chunks_exact(2)
            .find(|kv| kv[0] == "flags")
            .map(|kv| kv[1].as_str());
        named == Some(("127.0.0.1".to_owned(), port)) && flags == Some("master")
    }

    /// Whether the Sentinel lists a replica on `port`.
    fn knows_replica(&self, port: u16) -> bool {
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("replicas").arg(Self::MASTER);
        let replicas: Vec<Vec<String>> = query(self.sentinel_port, &cmd).unwrap_or_default();
        let port = port.to_string();
        replicas
            .iter()
            .any(|fields| fields.windows(2).any(|kv| kv[0] == "port" && kv[1] == port))
    }

    /// `redis://127.0.0.1:<port>` of each Sentinel (one here).
    pub fn sentinel_urls(&self) -> Vec<String> {
        vec![format!("redis://127.0.0.1:{}", self.sentinel_port)]
    }

    pub fn master_name(&self) -> &'static str {
        Self::MASTER
    }

    /// The primary's port: the first one, or the promoted replica's after
    /// [`RedisSentinel::wait_failover`].
    pub fn primary_port(&self) -> u16 {
        self.ports[self.primary]
    }

    /// The replica's port (before a failover) or the old primary's (after one).
    pub fn replica_port(&self) -> u16 {
        self.ports[1 - self.primary]
    }

    /// Kills the primary (SIGKILL, by its pid): what the Sentinel will fail over from.
    pub fn kill_primary(&mut self) {
        kill(&mut self.servers[self.primary]);
    }

    /// Waits until the Sentinel names the replica as the primary and the failover is over;
    /// panics after `bound`.
    pub fn wait_failover(&mut self, bound: Duration) {
        let replica = self.replica_port();
        wait_until(
            bound,
            "Sentinel naming the replica as primary, failover over",
            || self.names_primary(replica),
        );
        self.primary = 1 - self.primary;
    }
}
