//! The Genesys Cloud preset: the region table (the one place it lives in the code) and the routes
//! a region expands to, so that both ways the Genesys SDKs can be pointed at the sidecar work
//! unmodified on one listener.
//!
//! No Genesys SDK has a login host setting of its own: `ApiClient(host=...)` and the gateway
//! settings send the login call and every API call to the same host. The preset therefore routes
//! by path:
//! - host (or gateway without path params) pointed at the sidecar: `/oauth/token` (cached) and the
//!   rest of `/` go to `https://login.<domain>`, `/api/v2/...` to `https://api.<domain>`;
//! - gateway with `path_params_login = "login"` and `path_params_api = "api"`: `/login/...` goes
//!   to the login host and `/api/...` to the API host, each with its prefix removed.
//!
//! The region comes from `--genesys-region`, `TOKEN_SIDECAR_GENESYS_REGION` or `genesys_region`
//! (picked in `layer.rs`); `PresetLayers::preset` turns it into a [`Preset`].

use std::net::SocketAddr;

use super::error::{ConfigError, Source};
use super::model::{ClientConfig, DEFAULT_TOKEN_PATH, RouteConfig, TokenConfig, UpstreamUrl};

/// One Genesys Cloud region: its AWS-style name and its domain. The login host is
/// `login.<domain>`, the API host `api.<domain>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub name: &'static str,
    pub domain: &'static str,
}

/// Every Genesys Cloud region (docs/GENESYS.md has the same table; tests/genesys_sdks.rs checks it
/// against the region lists of the Python and JavaScript SDKs).
pub const REGIONS: &[Region] = &[
    region("us-east-1", "mypurecloud.com"),
    region("us-east-2", "use2.us-gov-pure.cloud"),
    region("us-west-2", "usw2.pure.cloud"),
    region("ca-central-1", "cac1.pure.cloud"),
    region("sa-east-1", "sae1.pure.cloud"),
    region("mx-central-1", "mxc1.pure.cloud"),
    region("eu-west-1", "mypurecloud.ie"),
    region("eu-west-2", "euw2.pure.cloud"),
    region("eu-central-1", "mypurecloud.de"),
    region("eu-central-2", "euc2.pure.cloud"),
    region("eusc-de-east-1", "edee1.eusc-pure.cloud"),
    region("me-central-1", "mec1.pure.cloud"),
    region("ap-south-1", "aps1.pure.cloud"),
    region("ap-southeast-1", "apse1.pure.cloud"),
    region("ap-southeast-2", "mypurecloud.com.au"),
    region("ap-northeast-1", "mypurecloud.jp"),
    region("ap-northeast-2", "apne2.pure.cloud"),
    region("ap-northeast-3", "apne3.pure.cloud"),
];

const fn region(name: &'static str, domain: &'static str) -> Region {
    Region { name, domain }
}

impl Region {
    /// The region a name (`ap-southeast-1`, `ap_southeast_1`) or a domain (`apse1.pure.cloud`,
    /// also as `login.` or `api.` host) stands for.
    pub fn find(text: &str) -> Option<&'static Region> {
        let text = text.trim().trim_end_matches('.').to_ascii_lowercase();
        let domain = text
            .strip_prefix("login.")
            .or_else(|| text.strip_prefix("api."))
            .unwrap_or(&text);
        let name = text.replace('_', "-");
        REGIONS
            .iter()
            .find(|r| r.name == name || r.domain == domain)
    }

    /// The valid names, for an error message.
    pub fn names() -> String {
        REGIONS
            .iter()
            .map(|r| r.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `https://login.<domain>`.
    pub fn login(&self) -> UpstreamUrl {
        UpstreamUrl::parse(&format!("https://login.{}", self.domain)).expect("valid host")
    }

    /// `https://api.<domain>`.
    pub fn api(&self) -> UpstreamUrl {
        UpstreamUrl::parse(&format!("https://api.{}", self.domain)).expect("valid host")
    }
}

/// Where the preset's routes go and how they are tuned.
#[derive(Debug, Clone)]
pub struct Preset {
    pub listen: SocketAddr,
    pub login: UpstreamUrl,
    pub api: UpstreamUrl,
    pub token: TokenConfig,
    pub client: ClientConfig,
}

impl Preset {
    /// The four routes, all on `listen`: login and API, each plainly and behind the gateway's
    /// path params. The longest prefix wins, so `/api/v2/...` is the plain API route and
    /// `/api/api/v2/...` the gateway's.
    pub fn routes(&self) -> Vec<RouteConfig> {
        let route =
            |name: &str, prefix: &str, strip, upstream: &UpstreamUrl, token_paths| RouteConfig {
                name: name.to_owned(),
                listen: self.listen,
                path_prefix: prefix.to_owned(),
                strip_prefix: strip,
                upstream: upstream.clone(),
                token_paths,
                preserve_host: false,
                token: self.token.clone(),
                client: self.client.clone(),
                inject: None,
            };
        let token_path = || vec![DEFAULT_TOKEN_PATH.to_owned()];
        vec![
            route("genesys-login", "/", false, &self.login, token_path()),
            route("genesys-api", "/api/v2", false, &self.api, vec![]),
            route(
                "genesys-login-gateway",
                "/login",
                true,
                &self.login,
                token_path(),
            ),
            route("genesys-api-gateway", "/api", true, &self.api, vec![]),
        ]
    }
}

/// The preset as the layers gave it: the region, and replacements for its two hosts, each with
/// the flag, variable or key it came from.
pub(super) struct PresetLayers {
    pub(super) region: Option<(String, Source)>,
    pub(super) login: Option<(String, Source)>,
    pub(super) api: Option<(String, Source)>,
}

impl PresetLayers {
    /// The preset on `listen`, if a region is given. Its login and API upstreams default to the
    /// region's hosts; `genesys_login_upstream` and `genesys_api_upstream` (or their
    /// `TOKEN_SIDECAR_*` twins) replace them, for private proxies and tests.
    pub(super) fn preset(
        self,
        listen: SocketAddr,
        token: &TokenConfig,
        client: &ClientConfig,
    ) -> Result<Option<Preset>, ConfigError> {
        let Some((text, source)) = self.region else {
            if self.login.is_some() || self.api.is_some() {
                return Err(ConfigError::new(
                    "genesys_login_upstream/genesys_api_upstream (or their TOKEN_SIDECAR_* twins) need genesys_region",
                ));
            }
            return Ok(None);
        };
        let region = Region::find(&text).ok_or_else(|| {
            source.error(format!(
                "={text:?}: not a Genesys Cloud region; use one of {} (or its domain, e.g. mypurecloud.com)",
                Region::names()
            ))
        })?;
        let upstream = |given: Option<(String, Source)>, default: UpstreamUrl| match given {
            Some((url, source)) => {
                UpstreamUrl::parse(&url).map_err(|e| source.error(format!(": {e}")))
            }
            None => Ok(default),
        };
        Ok(Some(Preset {
            listen,
            login: upstream(self.login, region.login())?,
            api: upstream(self.api, region.api())?,
            token: token.clone(),
            client: client.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{file_error, load, with_file};
    use crate::config::{DEFAULT_LISTEN, Overrides};

    #[test]
    fn regions_are_found_by_name_or_domain() {
        let apse1 = Region::find("ap-southeast-1").unwrap();
        assert_eq!(apse1.domain, "apse1.pure.cloud");
        for alias in [
            "apse1.pure.cloud",
            "login.apse1.pure.cloud",
            "API.apse1.pure.cloud.",
            "ap_southeast_1",
        ] {
            assert_eq!(Region::find(alias), Some(apse1), "{alias}");
        }
        assert_eq!(Region::find("mypurecloud.com").unwrap().name, "us-east-1");
        assert_eq!(Region::find("moon-1"), None);
        assert!(Region::names().contains("eu-west-1"));
        assert_eq!(apse1.login().to_string(), "https://login.apse1.pure.cloud");
        assert_eq!(apse1.api().to_string(), "https://api.apse1.pure.cloud");
    }

    #[test]
    fn names_and_domains_are_unique() {
        for (i, a) in REGIONS.iter().enumerate() {
            for b in &REGIONS[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.domain, b.domain);
            }
        }
    }

    #[test]
    fn a_genesys_region_expands_to_login_and_api_routes_on_one_listener() {
        let c = load(
            Overrides {
                genesys_region: Some("apse1.pure.cloud".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap();
        let summary: Vec<(&str, &str, bool, String)> = c
            .routes
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.path_prefix.as_str(),
                    r.strip_prefix,
                    r.upstream.to_string(),
                )
            })
            .collect();
        let (login, api) = (
            "https://login.apse1.pure.cloud",
            "https://api.apse1.pure.cloud",
        );
        assert_eq!(
            summary,
            [
                ("genesys-login", "/", false, login.to_owned()),
                ("genesys-api", "/api/v2", false, api.to_owned()),
                ("genesys-login-gateway", "/login", true, login.to_owned()),
                ("genesys-api-gateway", "/api", true, api.to_owned()),
            ]
        );
        assert_eq!(
            c.listeners(),
            [DEFAULT_LISTEN.parse::<SocketAddr>().unwrap()]
        );
        assert!(
            c.routes[1].token_paths.is_empty(),
            "API routes only forward"
        );

        let env = [
            ("TOKEN_SIDECAR_GENESYS_REGION", "eu-west-1"),
            ("TOKEN_SIDECAR_GENESYS_API_UPSTREAM", "http://127.0.0.1:9"),
        ];
        let c = load(Overrides::default(), &env, None).unwrap();
        assert_eq!(
            c.routes[0].upstream.to_string(),
            "https://login.mypurecloud.ie"
        );
        assert_eq!(c.routes[1].upstream.to_string(), "http://127.0.0.1:9");

        let e = file_error("genesys_region = \"moon-1\"");
        assert!(
            e.to_string().contains("moon-1")
                && e.to_string().contains("us-east-1")
                && e.to_string().contains("ap-southeast-1"),
            "{e}"
        );
        let e = file_error("genesys_region = \"us-east-1\"\nupstream = \"http://x\"");
        assert!(e.to_string().contains("give one"), "{e}");
        let e = file_error("genesys_login_upstream = \"http://x\"\nupstream = \"http://y\"");
        assert!(e.to_string().contains("need genesys_region"), "{e}");
        let stray = [
            ("TOKEN_SIDECAR_UPSTREAM", "http://y"),
            ("TOKEN_SIDECAR_GENESYS_API_UPSTREAM", "http://x"),
        ];
        let e = load(Overrides::default(), &stray, None).unwrap_err();
        assert!(e.to_string().contains("need genesys_region"), "{e}");
        let e = file_error("genesys_region = \"us-east-1\"\npreserve_host = true");
        assert!(e.to_string().contains("preserve_host"), "{e}");
        let e = file_error("genesys_region = \"us-east-1\"\ntoken_paths = [\"/token\"]");
        assert!(e.to_string().contains("token_paths"), "{e}");
    }

    #[test]
    fn a_region_starts_with_a_file_that_restates_the_one_route_defaults() {
        let file = "token_paths = [\"/oauth/token\"]\npreserve_host = false";
        let env = [("TOKEN_SIDECAR_GENESYS_REGION", "us-east-1")];
        let c = load(with_file(), &env, Some(file)).unwrap();
        assert_eq!(
            c.routes[0].upstream.to_string(),
            "https://login.mypurecloud.com"
        );
        assert_eq!(c.routes.len(), 4);
    }
}
