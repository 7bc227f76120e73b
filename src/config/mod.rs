//! Typed configuration: defaults, the TOML file, `TOKEN_SIDECAR_*` environment variables and
//! command-line flags, layered in that order (flag beats env beats file beats default), then
//! validated. Every error names the key or flag at fault, and a value the file gave, the line.
//!
//! Map of the folder, in the order a load runs:
//! - [`env`](mod@env): the names of the environment variables, and reading them through an injected
//!   lookup (tests never touch the process's own environment);
//! - `file.rs`: the file's schema as written, parsed once into spans that errors find lines in;
//! - `layer.rs`: [`Overrides`] (the flags) and the layering, which assembles a [`Config`];
//! - `routes.rs`: the route sources (the one-route shortcut, `[[routes]]`) and how they combine;
//! - [`genesys`]: the Genesys Cloud preset, a region table and the routes a region expands to;
//! - `fleet.rs`: the `[shared]` table, the fleet secret and [`SharedConfig`] for `crate::fleet`;
//! - `inject.rs`: a route's `[routes.inject]` table, the credentials it injects with;
//! - `model.rs`: [`Config`] and its parts with their defaults and their own checks;
//! - `validate.rs`: [`Config::validate`], the checks across routes and listeners;
//! - `error.rs`: [`ConfigError`] and the [`KeyPath`] it is about.
//!
//! Nothing here imports from the rest of the crate: the sidecar's parts take their settings from
//! here.

pub mod env;
mod error;
mod file;
mod fleet;
pub mod genesys;
mod inject;
mod layer;
mod model;
mod routes;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use error::{ConfigError, KeyPath};
pub(crate) use fleet::redacted;
pub use fleet::{ClientCert, FleetSecret, MIN_SECRET_LEN, RedisMode, SharedConfig};
pub use inject::{AssertionKey, AuthMethod, ClientSecret, DEFAULT_RETRY_BODY_LIMIT, InjectConfig};
pub use layer::Overrides;
pub use model::{
    ClientConfig, Config, DEFAULT_ADMIN, DEFAULT_LISTEN, DEFAULT_TOKEN_PATH, Limits, LogConfig,
    LogFormat, MAX_POOL_SIZE, MAX_WORKERS, RouteConfig, TokenConfig, UpstreamUrl,
};

use env::{TOKEN_SIDECAR_ADMIN, TOKEN_SIDECAR_CONFIG, env_addr, non_empty};
use file::{FileConfig, FileText};

impl Config {
    /// Builds the configuration from flags, an environment lookup, and the file the flags or the
    /// environment name (read with `read_file`).
    ///
    /// A value the file gave that fails validation is reported with the file and its line.
    pub fn load(
        flags: Overrides,
        env: impl Fn(&str) -> Option<String>,
        read_file: impl Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Config, ConfigError> {
        let env = non_empty(env);
        let Some(file) = FileText::read(config_path(&flags, &env), &read_file)? else {
            return layer::assemble(flags, &env, FileConfig::default());
        };
        let (parsed, document) = file.parse()?;
        layer::assemble(flags, &env, parsed).map_err(|e| document.locate(e))
    }
}

/// The admin address alone, layered like [`Config::load`] does, for the `healthcheck`
/// subcommand: it must probe where the server listens without needing an upstream.
pub fn admin_address(
    flags: &Overrides,
    env: impl Fn(&str) -> Option<String>,
    read_file: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<SocketAddr, ConfigError> {
    let env = non_empty(env);
    if let Some(addr) = flags.admin.or(env_addr(&env, TOKEN_SIDECAR_ADMIN)?) {
        return Ok(addr);
    }
    let admin = match FileText::read(config_path(flags, &env), &read_file)? {
        Some(file) => file.parse()?.0.admin,
        None => None,
    };
    Ok(admin.unwrap_or_else(model::default_admin))
}

/// The config file `--config` or `TOKEN_SIDECAR_CONFIG` names, if any.
fn config_path(flags: &Overrides, env: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    flags
        .config
        .clone()
        .or_else(|| env(TOKEN_SIDECAR_CONFIG).map(PathBuf::from))
}

/// Loading end to end; the helpers serve the tests of every module in the folder.
#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    pub(super) fn load(
        flags: Overrides,
        env: &[(&str, &str)],
        file: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let file = file.map(str::to_owned);
        Config::load(
            flags,
            |k| env.get(k).cloned(),
            |_| {
                file.clone().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")
                })
            },
        )
    }

    /// The error for a config file with this text.
    pub(super) fn file_error(text: &str) -> ConfigError {
        load(with_file(), &[], Some(text)).unwrap_err()
    }

    pub(super) fn with_file() -> Overrides {
        Overrides {
            config: Some("t.toml".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_healthcheck_finds_the_admin_address_like_the_server() {
        let file = Some("admin = \"127.0.0.1:7777\"".to_owned());
        let read = |_: &std::path::Path| file.clone().ok_or_else(|| std::io::Error::other("none"));
        let flags = Overrides {
            config: Some("f.toml".into()),
            ..Default::default()
        };
        assert_eq!(
            admin_address(&flags, |_| None, read).unwrap().to_string(),
            "127.0.0.1:7777"
        );
        let env = |k: &str| (k == "TOKEN_SIDECAR_ADMIN").then(|| "127.0.0.1:7778".to_owned());
        assert_eq!(
            admin_address(&flags, env, read).unwrap().to_string(),
            "127.0.0.1:7778"
        );
        let bad = |k: &str| (k == "TOKEN_SIDECAR_ADMIN").then(|| "nope".to_owned());
        assert!(
            admin_address(&flags, bad, read)
                .unwrap_err()
                .to_string()
                .contains("TOKEN_SIDECAR_ADMIN")
        );
        assert_eq!(
            admin_address(&Overrides::default(), |_| None, read)
                .unwrap()
                .to_string(),
            DEFAULT_ADMIN
        );
    }

    #[test]
    fn config_path_can_come_from_the_environment() {
        let c = load(
            Overrides::default(),
            &[("TOKEN_SIDECAR_CONFIG", "x.toml")],
            Some("upstream = \"http://f\""),
        )
        .unwrap();
        assert_eq!(c.routes[0].upstream.to_string(), "http://f");
    }

    #[test]
    fn errors_name_the_problem() {
        let e = load(Overrides::default(), &[], None).unwrap_err();
        assert!(e.to_string().contains("no upstream"), "{e}");
        let e = load(
            Overrides {
                upstream: Some("ftp://x".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("--upstream") && e.to_string().contains("scheme"),
            "{e}"
        );
        let e = load(
            Overrides {
                upstream: Some("https://user:hunter2@idp.example".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("credentials") && !e.to_string().contains("hunter2"),
            "{e}"
        );
        let e = load(
            Overrides {
                upstream: Some("http://x/path".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("scheme://host"), "{e}");
        for secret_url in [
            "https://idp.example/oauth?key=hunter2",
            "ftp://hunter2",
            "hunter2",
        ] {
            let e = load(
                Overrides {
                    upstream: Some(secret_url.into()),
                    ..Default::default()
                },
                &[],
                None,
            )
            .unwrap_err();
            assert!(
                e.to_string().contains("--upstream") && !e.to_string().contains("hunter2"),
                "{e}"
            );
        }
        let e = load(with_file(), &[], None).unwrap_err();
        assert!(e.to_string().contains("cannot read config file"), "{e}");
        let e = file_error("upstream = \"http://x\"\nbogus = 1");
        assert!(
            e.to_string().contains("bogus") && e.to_string().contains("line 2"),
            "{e}"
        );
        let e = file_error("upstream = \"http://x\"\n[token]\nrefresh_at = \"high\"");
        assert!(
            e.to_string().contains("refresh_at") || e.to_string().contains("line 3"),
            "{e}"
        );
        let e = file_error("upstream = \"http://x\"\n[token]\nrefresh_at = 0.95");
        assert!(e.to_string().contains("token.refresh_at"), "{e}");
        let e = file_error("upstream = \"http://x\"\n[token]\nerror_ttl = \"5 parsecs\"");
        assert!(
            e.to_string().contains("error_ttl") || e.to_string().contains("line 3"),
            "{e}"
        );
        let e = load(
            Overrides::default(),
            &[
                ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
                ("TOKEN_SIDECAR_LISTEN", "nope"),
            ],
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("TOKEN_SIDECAR_LISTEN"), "{e}");
    }
}
