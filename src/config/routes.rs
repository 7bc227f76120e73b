//! The route sources and how they combine: the Genesys preset (a region expands to four routes
//! on one listener), the one-route shortcut (`upstream`, `listen`, `token_paths` and
//! `preserve_host` at the top level, or `--upstream` and `--listen`), and the `[[routes]]`
//! tables, which the flags may override only when there is a single one. Each route's `token`
//! and `client` tables fall back to the top-level ones.

use std::net::SocketAddr;

use super::env::{TOKEN_SIDECAR_GENESYS_REGION, TOKEN_SIDECAR_UPSTREAM};
use super::error::{ConfigError, KeyPath, Source};
use super::file::{FileConfig, FileRoute};
use super::genesys::PresetLayers;
use super::model::{
    ClientConfig, DEFAULT_TOKEN_PATH, RouteConfig, TokenConfig, UpstreamUrl, default_listen,
};

/// What the flags and the environment say about routes; the file says the rest.
pub(super) struct RouteLayers {
    /// `--upstream` or `TOKEN_SIDECAR_UPSTREAM`.
    pub(super) upstream: Option<(String, Source)>,
    /// `--listen` or `TOKEN_SIDECAR_LISTEN`.
    pub(super) listen: Option<SocketAddr>,
    /// The Genesys Cloud region and its host replacements.
    pub(super) preset: PresetLayers,
}

/// Every route, in order: the preset's, or the shortcut's one, then the `[[routes]]` tables.
pub(super) fn routes(
    layers: RouteLayers,
    file: &FileConfig,
) -> Result<Vec<RouteConfig>, ConfigError> {
    let RouteLayers {
        upstream,
        listen,
        preset,
    } = layers;
    let top = Fallback {
        token: file.token.clone().unwrap_or_default(),
        client: file.client.clone().unwrap_or_default(),
    };
    let listen_one = listen.or(file.listen).unwrap_or_else(default_listen);
    let preset = preset.preset(listen_one, &top.token, &top.client)?;
    let mut routes = Vec::new();
    if let Some(preset) = &preset {
        preset_alone(upstream.is_some(), file)?;
        routes.extend(preset.routes());
    } else if file.routes.is_empty() {
        routes.push(shortcut(upstream.clone(), file, listen_one, &top)?);
    }
    if !file.routes.is_empty() {
        // With the preset, the top-level listen is the preset's listener.
        let listen = if preset.is_some() { None } else { listen };
        tables_alone(upstream.is_some(), listen.is_some(), file, preset.is_some())?;
        let first = routes.len();
        routes.extend(tables(&file.routes, first, (upstream, listen), &top)?);
    }
    Ok(routes)
}

/// The top-level `token` and `client` tables, which routes without their own inherit.
struct Fallback {
    token: TokenConfig,
    client: ClientConfig,
}

/// With a region, the preset names the provider and serves `/oauth/token` to each host under its
/// own name: a top-level upstream, or shortcut settings other than the defaults, would be
/// silently ignored, so they are refused.
fn preset_alone(upstream_given: bool, file: &FileConfig) -> Result<(), ConfigError> {
    if upstream_given || file.upstream.is_some() {
        return Err(ConfigError::at(
            KeyPath::top("genesys_region"),
            format!(
                " (or --genesys-region, {TOKEN_SIDECAR_GENESYS_REGION}) and upstream both name the provider: give one"
            ),
        ));
    }
    // A file that restates the one-route defaults (as the shipped ones once did) starts with a
    // region too.
    let restates_default = file
        .token_paths
        .as_ref()
        .is_none_or(|paths| paths == &[DEFAULT_TOKEN_PATH])
        && file.preserve_host != Some(true);
    if !restates_default {
        return Err(ConfigError::new(
            "config file: top-level token_paths/preserve_host do not apply to the genesys_region preset (it serves /oauth/token and sends each host its own name); remove them",
        ));
    }
    Ok(())
}

/// With `[[routes]]`, the shortcut's top-level keys have no route to apply to, and the flags'
/// upstream and listen only a single table (with the preset, the top-level `listen` is the
/// preset's listener, and a flag's listen is too).
fn tables_alone(
    upstream_given: bool,
    listen_given: bool,
    file: &FileConfig,
    with_preset: bool,
) -> Result<(), ConfigError> {
    let listen_set = !with_preset && file.listen.is_some();
    if file.upstream.is_some()
        || listen_set
        || file.token_paths.is_some()
        || file.preserve_host.is_some()
    {
        return Err(ConfigError::new(
            "config file: top-level upstream/listen/token_paths/preserve_host cannot be combined with [[routes]]; move them into each route",
        ));
    }
    let single = !with_preset && file.routes.len() == 1;
    if !single && (upstream_given || listen_given) {
        return Err(ConfigError::new(
            "--upstream/--listen (or their TOKEN_SIDECAR_* variables) set a single route, but the config file defines several routes",
        ));
    }
    Ok(())
}

/// The one-route shortcut: `default`, everything on `listen` to one upstream.
fn shortcut(
    upstream: Option<(String, Source)>,
    file: &FileConfig,
    listen: SocketAddr,
    top: &Fallback,
) -> Result<RouteConfig, ConfigError> {
    let (upstream, source) = match (upstream, &file.upstream) {
        (Some(given), _) => given,
        (None, Some(url)) => (url.clone(), Source::file("upstream")),
        (None, None) => {
            return Err(ConfigError::new(format!(
                "no upstream: give --upstream URL, {TOKEN_SIDECAR_UPSTREAM}, `upstream` in the config file, or a Genesys Cloud region (--genesys-region)"
            )));
        }
    };
    Ok(RouteConfig {
        name: "default".into(),
        listen,
        path_prefix: "/".into(),
        strip_prefix: false,
        upstream: UpstreamUrl::parse(&upstream).map_err(|e| source.error(format!(": {e}")))?,
        token_paths: file
            .token_paths
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_TOKEN_PATH.into()]),
        preserve_host: file.preserve_host.unwrap_or(false),
        token: top.token.clone(),
        client: top.client.clone(),
        inject: None,
    })
}

/// The `[[routes]]` tables as routes, the first at index `first` of the whole list;
/// `overrides` are the flags' upstream and listen, which apply when the file has a single route.
fn tables(
    tables: &[FileRoute],
    first: usize,
    overrides: (Option<(String, Source)>, Option<SocketAddr>),
    top: &Fallback,
) -> Result<Vec<RouteConfig>, ConfigError> {
    let (upstream, listen) = overrides;
    let mut routes = Vec::with_capacity(tables.len());
    for (i, route) in tables.iter().enumerate() {
        let name = route.name.clone().unwrap_or_else(|| format!("route{i}"));
        let upstream = match &upstream {
            Some((url, source)) => {
                UpstreamUrl::parse(url).map_err(|e| source.error(format!(": {e}")))?
            }
            None => UpstreamUrl::parse(&route.upstream).map_err(|e| {
                let key = KeyPath::route(first + i, &name, "upstream");
                ConfigError::about(key, format!("routes[{i}].upstream: {e}"))
            })?,
        };
        routes.push(RouteConfig {
            listen: listen.unwrap_or(route.listen),
            path_prefix: route.path_prefix.clone().unwrap_or_else(|| "/".into()),
            strip_prefix: route.strip_prefix.unwrap_or(false),
            upstream,
            token_paths: route
                .token_paths
                .clone()
                .unwrap_or_else(|| vec![DEFAULT_TOKEN_PATH.into()]),
            preserve_host: route.preserve_host.unwrap_or(false),
            token: route.token.clone().unwrap_or_else(|| top.token.clone()),
            client: route.client.clone().unwrap_or_else(|| top.client.clone()),
            inject: None,
            name,
        });
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use crate::config::Overrides;
    use crate::config::tests::{file_error, load, with_file};
    use std::time::Duration;

    #[test]
    fn routes_inherit_top_level_tables_and_need_distinct_listeners() {
        let file = r#"
            [token]
            error_ttl = "7s"
            [[routes]]
            name = "eu"
            listen = "127.0.0.1:7101"
            upstream = "https://eu.example"
            [[routes]]
            name = "us"
            listen = "127.0.0.1:7102"
            upstream = "https://us.example"
            token_paths = ["/oauth/token", "/v1/token"]
            [routes.token]
            error_ttl = "1s"
        "#;
        let c = load(with_file(), &[], Some(file)).unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].token.error_ttl, Duration::from_secs(7));
        assert_eq!(c.routes[1].token.error_ttl, Duration::from_secs(1));
        assert_eq!(c.routes[1].token_paths.len(), 2);
        let e = load(
            Overrides {
                upstream: Some("http://x".into()),
                ..with_file()
            },
            &[],
            Some(file),
        )
        .unwrap_err();
        assert!(e.to_string().contains("several"), "{e}");
        // One listener may serve both, by prefix; the same prefix twice is an error naming both.
        let shared = file.replace("7102", "7101");
        let e = file_error(&shared);
        assert!(
            e.to_string().contains("path_prefix")
                && e.to_string().contains("\"eu\"")
                && e.to_string().contains("\"us\""),
            "{e}"
        );
        let by_prefix = shared.replace(
            "name = \"us\"",
            "name = \"us\"\npath_prefix = \"/us\"\nstrip_prefix = true",
        );
        let c = load(with_file(), &[], Some(&by_prefix)).unwrap();
        assert_eq!(c.listeners().len(), 1);
        assert_eq!(
            (c.routes[1].path_prefix.as_str(), c.routes[1].strip_prefix),
            ("/us", true)
        );
        for bad in ["us", "/us/", "/us?x"] {
            let text = by_prefix.replace("\"/us\"", &format!("{bad:?}"));
            let e = file_error(&text);
            assert!(
                e.to_string().contains("routes[1] (us).path_prefix"),
                "{bad}: {e}"
            );
        }
    }
}
