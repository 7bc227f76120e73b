//! The environment: the name of every `TOKEN_SIDECAR_*` variable the sidecar reads (each one
//! spelled here and nowhere else), and how a value is read. The environment is an injected
//! lookup, never the process's own, so tests need no `set_var`; an empty variable counts as
//! unset.

use std::net::SocketAddr;

use super::error::{ConfigError, Source};

/// The provider's base URL, for the one-route shortcut (`--upstream`).
pub const TOKEN_SIDECAR_UPSTREAM: &str = "TOKEN_SIDECAR_UPSTREAM";
/// Where local apps connect (`--listen`).
pub const TOKEN_SIDECAR_LISTEN: &str = "TOKEN_SIDECAR_LISTEN";
/// The admin listener (`--admin`).
pub const TOKEN_SIDECAR_ADMIN: &str = "TOKEN_SIDECAR_ADMIN";
/// The config file (`--config`).
pub const TOKEN_SIDECAR_CONFIG: &str = "TOKEN_SIDECAR_CONFIG";
/// `text` or `json` (`--log-format`).
pub const TOKEN_SIDECAR_LOG_FORMAT: &str = "TOKEN_SIDECAR_LOG_FORMAT";
/// Worker threads (`--workers`).
pub const TOKEN_SIDECAR_WORKERS: &str = "TOKEN_SIDECAR_WORKERS";
/// A Genesys Cloud region or domain (`--genesys-region`).
pub const TOKEN_SIDECAR_GENESYS_REGION: &str = "TOKEN_SIDECAR_GENESYS_REGION";
/// Replaces the Genesys preset's login host (`genesys_login_upstream`).
pub const TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM: &str = "TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM";
/// Replaces the Genesys preset's API host (`genesys_api_upstream`).
pub const TOKEN_SIDECAR_GENESYS_API_UPSTREAM: &str = "TOKEN_SIDECAR_GENESYS_API_UPSTREAM";
/// The client id the Genesys preset injects with on its API routes (`genesys_client_id`).
pub const TOKEN_SIDECAR_GENESYS_CLIENT_ID: &str = "TOKEN_SIDECAR_GENESYS_CLIENT_ID";
/// The file holding that client's secret (`genesys_client_secret_file`).
pub const TOKEN_SIDECAR_GENESYS_CLIENT_SECRET_FILE: &str =
    "TOKEN_SIDECAR_GENESYS_CLIENT_SECRET_FILE";
/// The fleet tier's Redis URL (`--shared-redis`, `shared.redis`).
pub const TOKEN_SIDECAR_SHARED_REDIS: &str = "TOKEN_SIDECAR_SHARED_REDIS";
/// The fleet secret's file (`--shared-key-file`, `shared.key_file`).
pub const TOKEN_SIDECAR_SHARED_KEY_FILE: &str = "TOKEN_SIDECAR_SHARED_KEY_FILE";
/// `true`: `shared.redis` names Redis Cluster seed nodes (`--shared-cluster`, `shared.cluster`).
pub const TOKEN_SIDECAR_SHARED_CLUSTER: &str = "TOKEN_SIDECAR_SHARED_CLUSTER";
/// The Sentinel master name; `shared.redis` then names the Sentinels
/// (`--shared-sentinel-master`, `shared.sentinel_master`).
pub const TOKEN_SIDECAR_SHARED_SENTINEL_MASTER: &str = "TOKEN_SIDECAR_SHARED_SENTINEL_MASTER";

/// The environment as the sidecar reads it: an empty variable is unset, so
/// `-e TOKEN_SIDECAR_LISTEN=` clears a value an image sets.
pub(super) fn non_empty(env: impl Fn(&str) -> Option<String>) -> impl Fn(&str) -> Option<String> {
    move |name| env(name).filter(|v| !v.trim().is_empty())
}

/// A variable's value and its name, as a [`Source`] for errors about it.
pub(super) fn given(
    env: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Option<(String, Source)> {
    env(name).map(|value| (value, Source::Env(name)))
}

/// An address from the environment; the error names the variable.
pub(super) fn env_addr(
    env: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    env(name)
        .map(|v| {
            v.parse().map_err(|_| {
                ConfigError::new(format!(
                    "{name}={v:?} is not an address like 127.0.0.1:8080"
                ))
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use crate::config::tests::load;
    use crate::config::{DEFAULT_ADMIN, DEFAULT_LISTEN, Overrides};

    #[test]
    fn empty_environment_values_count_as_unset() {
        let env = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
            ("TOKEN_SIDECAR_LISTEN", ""),
            ("TOKEN_SIDECAR_ADMIN", " "),
        ];
        let c = load(Overrides::default(), &env, None).unwrap();
        assert_eq!(c.routes[0].listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin.to_string(), DEFAULT_ADMIN);
    }
}
