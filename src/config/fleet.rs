//! The fleet tier's configuration, the `[shared]` table: the Redis URL, the fleet secret read
//! from its key file and checked, an optional password file, and the tier's time bounds. The
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

/// The fleet tier's settings (see `[shared]` in the docs).
#[derive(Clone)]
pub struct SharedConfig {
    /// `redis://` or `rediss://` URL; may carry an ACL user and password, so never printed.
    pub redis: String,
    /// A password read from `password_file`, instead of one in the URL.
    pub password: Option<String>,
    /// The fleet secret, from `key_file`.
    pub secret: FleetSecret,
    /// A PEM CA bundle for `rediss://`, instead of the system's roots.
    pub ca_file: Option<PathBuf>,
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
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

/// A Redis URL without its user and password, for messages.
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
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
        let Some(redis) = self.redis else {
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
        if !["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|scheme| redis.starts_with(scheme))
        {
            return Err(ConfigError::at(
                KeyPath::top("shared.redis"),
                format!(" {}: use a redis:// or rediss:// URL", redacted(&redis)),
            ));
        }
        let secret = FleetSecret::from_file_bytes(&read("key_file", key_file)?)
            .map_err(|why| shared_error("key_file", key_file, why))?;
        let password = self.password_file.as_deref().map(password).transpose()?;
        Ok(Some(SharedConfig {
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
    }
}
