//! The fleet tier's configuration, the `[shared]` table: where Redis is (one server, Cluster
//! seed nodes or Sentinels), the fleet secret read from its key file and checked (and the
//! previous one, during a rotation), an optional password file, TLS files, the readiness gate,
//! and the tier's time bounds. The
//! tier itself (`crate::fleet`) takes [`SharedConfig`] and [`FleetSecret`] from here and derives
//! its keys from the secret; configuration never reaches into the tier.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::env::TOKEN_SIDECAR_SHARED_KEY_FILE;
use super::error::{ConfigError, KeyPath};

/// The shortest fleet secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;

/// The fleet secret, shared by every sidecar of a fleet, as read from the key file and checked.
/// Never printed; `crate::fleet::keys` derives one key per purpose from it.
#[derive(Clone)]
pub struct FleetSecret(Vec<u8>);

impl std::fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetSecret(..)")
    }
}

impl FleetSecret {
    /// The secret read from a key file: surrounding whitespace (a trailing newline) is not part
    /// of it; fewer than [`MIN_SECRET_LEN`] bytes are refused.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<FleetSecret, String> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_LEN {
            return Err(format!(
                "holds {} bytes; a fleet secret needs at least {MIN_SECRET_LEN} (e.g. `head -c 32 /dev/urandom | base64`)",
                trimmed.len()
            ));
        }
        Ok(FleetSecret(trimmed.to_vec()))
    }

    /// The secret itself, for key derivation only.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// How the Redis URLs of `shared.redis` are used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisMode {
    /// One server (or a proxy in front of several).
    Single,
    /// Seed nodes of a Redis Cluster; the topology is discovered and followed.
    Cluster,
    /// Sentinels that name the primary of this master; failovers are followed.
    Sentinel(String),
}

/// A TLS client certificate and its key, PEM, for Redis servers that require mTLS.
#[derive(Clone)]
pub struct ClientCert {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCert(..)")
    }
}

/// The fleet tier's settings (see `[shared]` in the docs).
#[derive(Clone)]
pub struct SharedConfig {
    /// `redis://` or `rediss://` URLs, comma-separated (several for Cluster seeds or
    /// Sentinels); may carry an ACL user and password, so never printed.
    pub redis: String,
    /// What the URLs are.
    pub mode: RedisMode,
    /// A password read from `password_file`, instead of one in the URL.
    pub password: Option<String>,
    /// The fleet secret, from `key_file`.
    pub secret: FleetSecret,
    /// Where the secret is read again on SIGHUP.
    pub key_file: PathBuf,
    /// The fleet secret before a rotation, from `previous_key_file`: read, never written.
    pub previous_secret: Option<FleetSecret>,
    /// Where the previous secret is read again on SIGHUP.
    pub previous_key_file: Option<PathBuf>,
    /// A PEM CA bundle for `rediss://`, instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate for servers that require one (`cert_file`, `cert_key_file`).
    pub client_cert: Option<ClientCert>,
    /// Not ready until Redis has answered once.
    pub required: bool,
    /// Longest wait for one Redis call's answer.
    pub timeout: Duration,
    /// Longest wait for a connection to Redis.
    pub connect_timeout: Duration,
    /// How often a follower asks again when no "landed" notice comes.
    pub poll_interval: Duration,
}

impl std::fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConfig")
            .field("redis", &redacted(&self.redis))
            .field("mode", &self.mode)
            .field("required", &self.required)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl SharedConfig {
    /// The URLs of `redis`, in order.
    pub fn urls(&self) -> Vec<&str> {
        urls(&self.redis)
    }
}

/// The schemes `shared.redis` accepts.
const SCHEMES: [&str; 4] = ["redis://", "rediss://", "redis+unix://", "unix://"];

/// The comma-separated URLs of `redis`, trimmed, empty ones left out. A comma splits only where
/// a URL follows it: a password may hold one.
fn urls(redis: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (comma, _) in redis.match_indices(',') {
        let next = redis[comma + 1..].trim_start();
        if next.is_empty() || SCHEMES.iter().any(|scheme| next.starts_with(scheme)) {
            out.push(redis[start..comma].trim());
            start = comma + 1;
        }
    }
    out.push(redis[start..].trim());
    out.retain(|url| !url.is_empty());
    out
}

/// Redis URLs without their user, password and query (a socket URL's `pass=`), for messages.
pub(crate) fn redacted(redis: &str) -> String {
    urls(redis)
        .iter()
        .map(|url| {
            let url = url.split_once('?').map_or(*url, |(before, _)| before);
            match (url.find("://"), url.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    format!("{}://…@{}", &url[..scheme], &url[at + 1..])
                }
                _ => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The `[shared]` table as written; a flag or variable replaces `redis` and `key_file` before
/// [`FileShared::into_config`] reads it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileShared {
    pub(super) redis: Option<String>,
    pub(super) key_file: Option<PathBuf>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    pub(super) cluster: Option<bool>,
    pub(super) sentinel_master: Option<String>,
    previous_key_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    cert_key_file: Option<PathBuf>,
    required: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
}

impl FileShared {
    /// The fleet tier's settings, off (`None`) without a Redis URL. The secret and the password
    /// are read here, so a bad one stops the start rather than the first token call.
    pub(super) fn into_config(self) -> Result<Option<SharedConfig>, ConfigError> {
        let Some(redis) = self.redis.clone() else {
            return Ok(None);
        };
        let Some(key_file) = &self.key_file else {
            return Err(ConfigError::at(
                KeyPath::top("shared.redis"),
                format!(
                    " is set but shared.key_file is not (or --shared-key-file, {TOKEN_SIDECAR_SHARED_KEY_FILE}): the fleet tier needs the fleet secret"
                ),
            ));
        };
        let mode = self.mode(&redis)?;
        let secret = read_secret("key_file", key_file)?;
        let previous_secret = self
            .previous_key_file
            .as_deref()
            .map(|path| read_secret("previous_key_file", path))
            .transpose()?;
        let password = self.password_file.as_deref().map(password).transpose()?;
        let client_cert = self.client_cert(&redis)?;
        Ok(Some(SharedConfig {
            key_file: key_file.clone(),
            previous_key_file: self.previous_key_file,
            previous_secret,
            client_cert,
            required: self.required.unwrap_or(false),
            mode,
            redis,
            password,
            secret,
            ca_file: self.ca_file,
            timeout: bounded("timeout", self.timeout, 75, 5_000)?,
            connect_timeout: bounded("connect_timeout", self.connect_timeout, 250, 30_000)?,
            poll_interval: bounded("poll_interval", self.poll_interval, 100, 5_000)?,
        }))
    }
}

impl FileShared {
    /// What the URLs are; each must be `redis://` or `rediss://`, and several need Cluster or
    /// Sentinel.
    fn mode(&self, redis: &str) -> Result<RedisMode, ConfigError> {
        let key = || KeyPath::top("shared.redis");
        let all = urls(redis);
        if all.is_empty() {
            return Err(ConfigError::at(
                key(),
                " is empty: give a redis:// or rediss:// URL",
            ));
        }
        if let Some(url) = all
            .iter()
            .find(|url| !SCHEMES.iter().any(|scheme| url.starts_with(scheme)))
        {
            return Err(ConfigError::at(
                key(),
                format!(" {}: use a redis:// or rediss:// URL", redacted(url)),
            ));
        }
        let sentinel = self
            .sentinel_master
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty());
        match (self.cluster.unwrap_or(false), sentinel) {
            (true, Some(_)) => Err(ConfigError::at(
                KeyPath::top("shared.cluster"),
                " and shared.sentinel_master are both set: a fleet's Redis is one or the other",
            )),
            (true, None) => Ok(RedisMode::Cluster),
            (false, Some(master)) => Ok(RedisMode::Sentinel(master.to_owned())),
            (false, None) if all.len() > 1 => Err(ConfigError::at(
                key(),
                format!(
                    " names {} servers: several need shared.cluster = true (Cluster seed nodes) or shared.sentinel_master (Sentinels)",
                    all.len()
                ),
            )),
            (false, None) => Ok(RedisMode::Single),
        }
    }

    /// The client certificate and its key, both or neither, for `rediss://` only.
    fn client_cert(&self, redis: &str) -> Result<Option<ClientCert>, ConfigError> {
        let (cert, key) = match (&self.cert_file, &self.cert_key_file) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            _ => {
                return Err(ConfigError::at(
                    KeyPath::top("shared.cert_file"),
                    " and shared.cert_key_file go together: give both or neither",
                ));
            }
        };
        if urls(redis).iter().any(|url| !url.starts_with("rediss://")) {
            return Err(ConfigError::at(
                KeyPath::top("shared.cert_file"),
                " is set but shared.redis is not rediss://: a client certificate needs TLS",
            ));
        }
        Ok(Some(ClientCert {
            cert: read("cert_file", cert)?,
            key: read("cert_key_file", key)?,
        }))
    }
}

/// The fleet secret in the file `shared.<key>` names, checked.
fn read_secret(key: &str, path: &Path) -> Result<FleetSecret, ConfigError> {
    FleetSecret::from_file_bytes(&read(key, path)?).map_err(|why| shared_error(key, path, why))
}

/// `shared.<key> <path>: <why>`.
fn shared_error(key: &str, path: &Path, why: impl std::fmt::Display) -> ConfigError {
    let key = KeyPath::top(&format!("shared.{key}"));
    ConfigError::at(key, format!(" {}: {why}", path.display()))
}

/// The file `shared.<key>` names.
fn read(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| shared_error(key, path, e))
}

/// The Redis password from `password_file`, without its line ending.
fn password(path: &Path) -> Result<String, ConfigError> {
    let text = String::from_utf8(read("password_file", path)?)
        .map_err(|_| shared_error("password_file", path, "not UTF-8"))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// `shared.<key>`, `default` when not given, more than 0 and at most `max` (milliseconds).
fn bounded(
    key: &str,
    value: Option<Duration>,
    default: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(Duration::from_millis(default));
    if value.is_zero() || value > Duration::from_millis(max) {
        return Err(ConfigError::at(
            KeyPath::top(&format!("shared.{key}")),
            format!(
                " = {}: give more than 0 and at most {}",
                humantime::format_duration(value),
                humantime::format_duration(Duration::from_millis(max))
            ),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use crate::config::tests::{load, with_file};

    #[test]
    fn the_shared_tier_layers_like_every_setting_and_needs_a_long_enough_key() {
        let dir = std::env::temp_dir().join(format!("ts-shared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("fleet.key");
        std::fs::write(&key, [b'k'; 40]).unwrap();
        let short = dir.join("short.key");
        std::fs::write(&short, b"0123456789\n").unwrap();
        let file = format!(
            "upstream = \"http://x\"\n[shared]\nredis = \"redis://file:6379/0\"\nkey_file = {:?}\ntimeout = \"20ms\"\n",
            short.display()
        );
        let off = load(with_file(), &[], Some("upstream = \"http://x\"")).unwrap();
        assert!(off.shared.is_none(), "off by default");

        let e = load(with_file(), &[], Some(&file)).unwrap_err();
        assert!(
            e.to_string().contains("shared.key_file") && e.to_string().contains("at least 32"),
            "{e}"
        );
        assert!(
            !e.to_string().contains("0123456789"),
            "the key is never quoted: {e}"
        );

        let key_env = key.display().to_string();
        let env = [
            ("TOKEN_SIDECAR_SHARED_REDIS", "redis://env:6379/1"),
            ("TOKEN_SIDECAR_SHARED_KEY_FILE", key_env.as_str()),
        ];
        let c = load(with_file(), &env, Some(&file)).unwrap();
        let shared = c.shared.unwrap();
        assert_eq!(shared.redis, "redis://env:6379/1");
        assert_eq!(
            shared.timeout,
            Duration::from_millis(20),
            "the file's timeout"
        );
        assert_eq!(
            shared.poll_interval,
            Duration::from_millis(100),
            "a default"
        );

        let flags = Overrides {
            shared_redis: Some("rediss://u:p@flag:6380/0".into()),
            ..with_file()
        };
        let c = load(flags, &env, Some(&file)).unwrap();
        let shared = c.shared.unwrap();
        assert_eq!(shared.redis, "rediss://u:p@flag:6380/0");
        assert!(
            !format!("{shared:?}").contains("u:p"),
            "Debug hides the login"
        );

        let no_key = load(
            Overrides::default(),
            &[
                ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
                ("TOKEN_SIDECAR_SHARED_REDIS", "redis://r:6379"),
            ],
            None,
        )
        .unwrap_err();
        assert!(no_key.to_string().contains("shared.key_file"), "{no_key}");
        let bad_scheme = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
            ("TOKEN_SIDECAR_SHARED_REDIS", "http://r:6379"),
            ("TOKEN_SIDECAR_SHARED_KEY_FILE", key_env.as_str()),
        ];
        let e = load(Overrides::default(), &bad_scheme, None).unwrap_err();
        assert!(e.to_string().contains("redis:// or rediss://"), "{e}");
        let slow = format!(
            "upstream = \"http://x\"\n[shared]\nredis = \"redis://r\"\nkey_file = {:?}\ntimeout = \"10s\"\n",
            key.display()
        );
        let e = load(with_file(), &[], Some(&slow)).unwrap_err();
        assert!(e.to_string().starts_with("shared.timeout = 10s"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(
            redacted("redis://app:s3cret@redis:6379/0"),
            "redis://…@redis:6379/0"
        );
        assert_eq!(redacted("redis://redis:6379"), "redis://redis:6379");
        // A comma in a password splits nothing, and nothing of it is shown.
        assert_eq!(
            urls("redis://u:pa,ss@h:6379/0"),
            ["redis://u:pa,ss@h:6379/0"]
        );
        assert_eq!(redacted("redis://u:pa,ss@h:6379/0"), "redis://…@h:6379/0");
        assert_eq!(
            redacted("redis://a:1, rediss://u:p,w@b:2"),
            "redis://a:1,rediss://…@b:2"
        );
        assert_eq!(
            redacted("redis+unix:///run/redis.sock?db=0&pass=secret"),
            "redis+unix:///run/redis.sock"
        );
    }

    #[test]
    fn cluster_sentinel_and_tls_files_are_checked_and_layered() {
        let dir = std::env::temp_dir().join(format!("ts-shared-modes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("fleet.key");
        std::fs::write(&key, [b'k'; 40]).unwrap();
        let pem = dir.join("client.pem");
        std::fs::write(&pem, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        let file = |shared: &str| {
            format!(
                "upstream = \"http://x\"\n[shared]\nkey_file = {:?}\n{shared}",
                key.display()
            )
        };
        let mode = |shared: &str, env: &[(&str, &str)]| {
            load(with_file(), env, Some(&file(shared))).map(|c| c.shared.unwrap().mode)
        };
        let seeds = "redis = \"redis://a:1, redis://b:2,redis://c:3\"\n";
        assert_eq!(
            mode(&format!("{seeds}cluster = true\n"), &[]).unwrap(),
            RedisMode::Cluster
        );
        assert_eq!(
            mode(seeds, &[("TOKEN_SIDECAR_SHARED_CLUSTER", "true")]).unwrap(),
            RedisMode::Cluster
        );
        assert_eq!(
            mode(
                seeds,
                &[("TOKEN_SIDECAR_SHARED_SENTINEL_MASTER", "mymaster")]
            )
            .unwrap(),
            RedisMode::Sentinel("mymaster".into())
        );
        let flags = Overrides {
            shared_sentinel_master: Some("flagged".into()),
            ..with_file()
        };
        let c = load(flags, &[], Some(&file(seeds))).unwrap();
        assert_eq!(
            c.shared.unwrap().mode,
            RedisMode::Sentinel("flagged".into())
        );

        let e = mode(seeds, &[]).unwrap_err().to_string();
        assert!(
            e.contains("shared.redis") && e.contains("names 3 servers"),
            "{e}"
        );
        assert!(e.contains("line 4"), "the file's line: {e}");
        let both = format!("{seeds}cluster = true\nsentinel_master = \"m\"\n");
        let e = mode(&both, &[]).unwrap_err().to_string();
        assert!(
            e.contains("shared.cluster") && e.contains("one or the other"),
            "{e}"
        );
        let e = mode(seeds, &[("TOKEN_SIDECAR_SHARED_CLUSTER", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TOKEN_SIDECAR_SHARED_CLUSTER") && e.contains("boolean"),
            "{e}"
        );

        let one = "redis = \"rediss://r:6380\"\n";
        let half = format!("{one}cert_file = {:?}\n", pem.display());
        let e = mode(&half, &[]).unwrap_err().to_string();
        assert!(
            e.contains("cert_key_file") && e.contains("both or neither"),
            "{e}"
        );
        let plain = format!(
            "redis = \"redis://r:6379\"\ncert_file = {:?}\ncert_key_file = {:?}\n",
            pem.display(),
            pem.display()
        );
        let e = mode(&plain, &[]).unwrap_err().to_string();
        assert!(e.contains("needs TLS"), "{e}");
        let whole = format!(
            "{half}cert_key_file = {:?}\nrequired = true\n",
            pem.display()
        );
        let c = load(with_file(), &[], Some(&file(&whole))).unwrap();
        let shared = c.shared.unwrap();
        assert!(shared.client_cert.is_some() && shared.required);
        assert!(!format!("{shared:?}").contains("BEGIN"), "no PEM in Debug");
        let short = dir.join("short.key");
        std::fs::write(&short, b"0123456789\n").unwrap();
        let rotating = format!("{one}previous_key_file = {:?}\n", short.display());
        let e = mode(&rotating, &[]).unwrap_err().to_string();
        assert!(
            e.contains("shared.previous_key_file") && e.contains("at least 32"),
            "{e}"
        );
        assert!(!e.contains("0123456789"), "the key is never quoted: {e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
