//! The layering: every setting from the first layer that gives it (a command-line flag, then a
//! `TOKEN_SIDECAR_*` variable, then the config file, then the default), the parts assembled into
//! a [`Config`], and that validated. What the flags gave arrives as [`Overrides`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::env::{
    TOKEN_SIDECAR_ADMIN, TOKEN_SIDECAR_GENESYS_API_UPSTREAM, TOKEN_SIDECAR_GENESYS_CLIENT_ID,
    TOKEN_SIDECAR_GENESYS_CLIENT_SECRET_FILE, TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM,
    TOKEN_SIDECAR_GENESYS_REGION, TOKEN_SIDECAR_LISTEN, TOKEN_SIDECAR_LOG_FORMAT,
    TOKEN_SIDECAR_SHARED_CLUSTER, TOKEN_SIDECAR_SHARED_KEY_FILE, TOKEN_SIDECAR_SHARED_REDIS,
    TOKEN_SIDECAR_SHARED_SENTINEL_MASTER, TOKEN_SIDECAR_UPSTREAM, TOKEN_SIDECAR_WORKERS, env_addr,
    given,
};
use super::error::{ConfigError, Source};
use super::file::FileConfig;
use super::fleet::{FileShared, SharedConfig};
use super::genesys::PresetLayers;
use super::model::{Config, LogConfig, LogFormat, RouteConfig, default_admin};
use super::routes::{RouteLayers, routes};

/// Values given on the command line; `None` where a flag was not given.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub upstream: Option<String>,
    pub genesys_region: Option<String>,
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub config: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub workers: Option<usize>,
    pub shared_redis: Option<String>,
    pub shared_key_file: Option<PathBuf>,
    pub shared_cluster: Option<bool>,
    pub shared_sentinel_master: Option<String>,
}

/// How long draining may take when neither the file nor a flag says.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The layering and validation of [`Config::load`], once the file is parsed.
pub(super) fn assemble(
    flags: Overrides,
    env: &impl Fn(&str) -> Option<String>,
    file: FileConfig,
) -> Result<Config, ConfigError> {
    let upstream = match &flags.upstream {
        Some(url) => Some((url.clone(), Source::Flag("--upstream"))),
        None => given(env, TOKEN_SIDECAR_UPSTREAM),
    };
    let listen = match flags.listen {
        Some(addr) => Some(addr),
        None => env_addr(env, TOKEN_SIDECAR_LISTEN)?,
    };
    let admin = match flags.admin {
        Some(addr) => addr,
        None => env_addr(env, TOKEN_SIDECAR_ADMIN)?
            .or(file.admin)
            .unwrap_or_else(default_admin),
    };
    let workers = workers(&flags, env, file.workers)?;
    let log = log(&flags, env, file.log.clone())?;
    let layers = RouteLayers {
        upstream,
        listen,
        preset: preset_layers(&flags, env, &file),
    };
    let mut routes = routes(layers, &file)?;
    inject(&mut routes, &file, env)?;
    genesys_inject(&mut routes, &file, env)?;
    let shared = shared(&flags, env, file.shared.unwrap_or_default())?;
    let config = Config {
        admin,
        shutdown_grace: file.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        workers,
        log,
        limits: file.limits,
        routes,
        shared,
    };
    config.validate()?;
    Ok(config)
}

/// The `[routes.inject]` tables, read into the routes the `[[routes]]` tables made (the last
/// ones); their secrets come from files or `env`.
fn inject(
    routes: &mut [RouteConfig],
    file: &FileConfig,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let first = routes.len() - file.routes.len();
    for (i, table) in file.routes.iter().enumerate() {
        if let Some(inject) = &table.inject {
            let route = &mut routes[first + i];
            let config = inject.clone().into_config((first + i, &route.name), env)?;
            route.inject = Some(config);
        }
    }
    Ok(())
}

/// The Genesys preset's injection on its API routes, when a client id and its secret's file are
/// given (by `TOKEN_SIDECAR_GENESYS_CLIENT_ID` and `TOKEN_SIDECAR_GENESYS_CLIENT_SECRET_FILE`, or
/// the file's `genesys_client_id` and `genesys_client_secret_file`): both or neither, and only
/// with a region. The token comes from the preset's login route, so apps that fetch their own
/// token with the same credentials share it.
fn genesys_inject(
    routes: &mut [RouteConfig],
    file: &FileConfig,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let id = env(TOKEN_SIDECAR_GENESYS_CLIENT_ID).or(file.genesys_client_id.clone());
    let secret = env(TOKEN_SIDECAR_GENESYS_CLIENT_SECRET_FILE)
        .map(PathBuf::from)
        .or(file.genesys_client_secret_file.clone());
    let (id, secret) = match (id, secret) {
        (None, None) => return Ok(()),
        (Some(id), Some(secret)) => (id, secret),
        _ => {
            return Err(ConfigError::new(format!(
                "genesys_client_id and genesys_client_secret_file ({TOKEN_SIDECAR_GENESYS_CLIENT_ID}, {TOKEN_SIDECAR_GENESYS_CLIENT_SECRET_FILE}) go together: give both or neither"
            )));
        }
    };
    let Some(login) = routes.iter().find(|r| r.name == "genesys-login") else {
        return Err(ConfigError::new(format!(
            "genesys_client_id ({TOKEN_SIDECAR_GENESYS_CLIENT_ID}) needs genesys_region: it injects on the preset's API routes"
        )));
    };
    let config = super::inject::preset(&login.upstream, id, secret)?;
    for route in routes.iter_mut() {
        if route.name == "genesys-api" || route.name == "genesys-api-gateway" {
            route.inject = Some(config.clone());
        }
    }
    Ok(())
}

/// Worker threads: flag, variable, file, one.
fn workers(
    flags: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
    file: Option<usize>,
) -> Result<usize, ConfigError> {
    match (flags.workers, env(TOKEN_SIDECAR_WORKERS)) {
        (Some(n), _) => Ok(n),
        (None, Some(text)) => text.trim().parse().map_err(|_| {
            ConfigError::new(format!(
                "{TOKEN_SIDECAR_WORKERS}={text:?}: give a whole number (0 = one per CPU)"
            ))
        }),
        (None, None) => Ok(file.unwrap_or(1)),
    }
}

/// The file's `[log]` table with its format replaced by the variable's, then the flag's.
fn log(
    flags: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
    mut log: LogConfig,
) -> Result<LogConfig, ConfigError> {
    if let Some(format) = env(TOKEN_SIDECAR_LOG_FORMAT) {
        log.format = <LogFormat as clap::ValueEnum>::from_str(&format, true).map_err(|_| {
            ConfigError::new(format!(
                "{TOKEN_SIDECAR_LOG_FORMAT}={format:?}: use text or json"
            ))
        })?;
    }
    if let Some(format) = flags.log_format {
        log.format = format;
    }
    Ok(log)
}

/// The Genesys Cloud region (flag, variable, file) and its hosts' replacements (variable, file).
fn preset_layers(
    flags: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
    file: &FileConfig,
) -> PresetLayers {
    let from_file =
        |value: &Option<String>, key: &str| value.clone().map(|value| (value, Source::file(key)));
    let region = match &flags.genesys_region {
        Some(region) => Some((region.clone(), Source::Flag("--genesys-region"))),
        None => given(env, TOKEN_SIDECAR_GENESYS_REGION)
            .or_else(|| from_file(&file.genesys_region, "genesys_region")),
    };
    PresetLayers {
        region,
        login: given(env, TOKEN_SIDECAR_GENESYS_LOGIN_UPSTREAM)
            .or_else(|| from_file(&file.genesys_login_upstream, "genesys_login_upstream")),
        api: given(env, TOKEN_SIDECAR_GENESYS_API_UPSTREAM)
            .or_else(|| from_file(&file.genesys_api_upstream, "genesys_api_upstream")),
    }
}

/// The `[shared]` table with its Redis URL and key file from the first layer that gives them.
fn shared(
    flags: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
    mut table: FileShared,
) -> Result<Option<SharedConfig>, ConfigError> {
    table.redis = flags
        .shared_redis
        .clone()
        .or_else(|| env(TOKEN_SIDECAR_SHARED_REDIS))
        .or(table.redis.take());
    table.key_file = flags
        .shared_key_file
        .clone()
        .or_else(|| env(TOKEN_SIDECAR_SHARED_KEY_FILE).map(PathBuf::from))
        .or(table.key_file.take());
    if let Some(cluster) = flags.shared_cluster {
        table.cluster = Some(cluster);
    } else if let Some(value) = env(TOKEN_SIDECAR_SHARED_CLUSTER) {
        table.cluster = Some(env_bool(TOKEN_SIDECAR_SHARED_CLUSTER, &value)?);
    }
    table.sentinel_master = flags
        .shared_sentinel_master
        .clone()
        .or_else(|| env(TOKEN_SIDECAR_SHARED_SENTINEL_MASTER))
        .or(table.sentinel_master.take());
    table.into_config()
}

/// A boolean variable: `true`/`false`, `1`/`0`, `yes`/`no`; the error names the variable.
fn env_bool(name: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::new(format!(
            "{name}={value:?} is not a boolean: use true or false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{file_error, load, with_file};
    use crate::config::{DEFAULT_ADMIN, DEFAULT_LISTEN, DEFAULT_TOKEN_PATH, TokenConfig};

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let file =
            "upstream = \"http://file:1\"\nlisten = \"127.0.0.1:7001\"\nadmin = \"127.0.0.1:7002\"";
        let c = load(with_file(), &[], Some(file)).unwrap();
        assert_eq!(c.routes[0].upstream.to_string(), "http://file:1");
        assert_eq!(c.routes[0].listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(c.admin, "127.0.0.1:7002".parse().unwrap());

        let env = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://env:2"),
            ("TOKEN_SIDECAR_ADMIN", "127.0.0.1:7003"),
        ];
        let c = load(with_file(), &env, Some(file)).unwrap();
        assert_eq!(c.routes[0].upstream.to_string(), "http://env:2");
        assert_eq!(c.admin, "127.0.0.1:7003".parse().unwrap());

        let flags = Overrides {
            upstream: Some("https://flag:3/".into()),
            ..with_file()
        };
        let c = load(flags, &env, Some(file)).unwrap();
        assert_eq!(c.routes[0].upstream.to_string(), "https://flag:3");

        let c = load(
            Overrides {
                upstream: Some("http://x".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap();
        assert_eq!(c.routes[0].listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin.to_string(), DEFAULT_ADMIN);
        assert_eq!(c.routes[0].token_paths, vec![DEFAULT_TOKEN_PATH]);
        assert_eq!(c.routes[0].token, TokenConfig::default());
    }

    #[test]
    fn workers_layer_like_every_setting_and_bad_values_are_named() {
        let file = "upstream = \"http://x\"\nworkers = 3";
        assert_eq!(load(with_file(), &[], Some(file)).unwrap().workers, 3);
        let env = [("TOKEN_SIDECAR_WORKERS", "2")];
        assert_eq!(load(with_file(), &env, Some(file)).unwrap().workers, 2);
        let flags = Overrides {
            workers: Some(1),
            ..with_file()
        };
        assert_eq!(load(flags, &env, Some(file)).unwrap().workers, 1);
        let default = load(
            Overrides::default(),
            &[("TOKEN_SIDECAR_UPSTREAM", "http://x")],
            None,
        );
        assert_eq!(
            default.unwrap().workers,
            1,
            "one thread unless asked for more"
        );

        let bad_env = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://x"),
            ("TOKEN_SIDECAR_WORKERS", "two"),
        ];
        let e = load(Overrides::default(), &bad_env, None).unwrap_err();
        assert!(
            e.to_string().starts_with("TOKEN_SIDECAR_WORKERS=\"two\""),
            "{e}"
        );
        let e = file_error("upstream = \"http://x\"\nworkers = 5000");
        assert!(e.to_string().starts_with("workers = 5000"), "{e}");
        let e = file_error("upstream = \"http://x\"\nworkers = -1");
        assert!(e.to_string().contains("line 2, column 11"), "{e}");
    }
}
