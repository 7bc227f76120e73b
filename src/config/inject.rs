//! A route's `[routes.inject]` table: the client credentials the sidecar holds for the apps behind
//! it, so that the requests it forwards on that route carry a bearer token the apps never asked
//! for. The secret is read here, from a file or a variable (never from a flag or the file's
//! text), so a missing one stops the start; it is never printed.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

use super::error::{ConfigError, KeyPath};
use super::model::UpstreamUrl;

/// How the sidecar authenticates its token calls (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// HTTP Basic with the URL-encoded id and secret (`client_secret_basic`).
    Basic,
    /// `client_id` and `client_secret` in the form (`client_secret_post`).
    Post,
    /// A JWT signed with the client's private key (RFC 7523 `private_key_jwt`), fresh for
    /// every call.
    PrivateKeyJwt,
}

/// The private key `private_key_jwt` signs with (PEM, RSA or EC P-256), and its `kid`; never
/// printed.
#[derive(Clone)]
pub struct AssertionKey {
    pub pem: Vec<u8>,
    pub kid: Option<String>,
}

impl std::fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The client secret, as read; never printed.
#[derive(Clone)]
pub struct ClientSecret(String);

impl ClientSecret {
    /// The secret itself, for the token call only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(..)")
    }
}

/// A route's injection settings, checked.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// Where tokens come from: the provider's origin...
    pub token_origin: UpstreamUrl,
    /// ...and its token path.
    pub token_path: String,
    pub client_id: String,
    /// The client secret; with `private_key_jwt`, a stand-in the token path keys the client by
    /// (a digest of the key, never sent: each call carries a fresh assertion instead).
    pub client_secret: ClientSecret,
    /// The key of `private_key_jwt`.
    pub assertion_key: Option<AssertionKey>,
    /// Form parameters besides the grant and the credentials (`scope`, `audience`, `resource`,
    /// and the table's `params`), in a stable order.
    pub params: Vec<(String, String)>,
    pub auth_method: AuthMethod,
    /// Replace an `Authorization` the caller sent; by default such a request goes as it is.
    pub overwrite: bool,
    /// A caller's own `Authorization: Basic` client credentials are swapped for that client's
    /// bearer (keyed and cached as if the caller had asked the token path).
    pub from_basic: bool,
    /// The largest request body kept to send again after a 401.
    pub retry_body_limit: usize,
}

/// The default [`InjectConfig::retry_body_limit`]: 64 KiB.
pub const DEFAULT_RETRY_BODY_LIMIT: usize = 64 * 1024;

/// The `[routes.inject]` table as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileInject {
    token_url: String,
    client_id: String,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    scope: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, String>,
    auth_method: Option<String>,
    assertion_key_file: Option<PathBuf>,
    assertion_kid: Option<String>,
    overwrite: Option<bool>,
    from_basic: Option<bool>,
    retry_body_limit: Option<usize>,
}

impl FileInject {
    /// The checked settings of route `route` (its index and name, for messages); `env` reads
    /// `client_secret_env`.
    pub(super) fn into_config(
        self,
        route: (usize, &str),
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<InjectConfig, ConfigError> {
        let key = |name: &str| KeyPath::route(route.0, route.1, &format!("inject.{name}"));
        let (token_origin, token_path) = split_token_url(&self.token_url)
            .map_err(|why| ConfigError::at(key("token_url"), format!(" {why}")))?;
        if self.client_id.trim().is_empty() {
            return Err(ConfigError::at(key("client_id"), " is empty"));
        }
        let auth_method = match self.auth_method.as_deref().unwrap_or("basic") {
            "basic" => AuthMethod::Basic,
            "post" => AuthMethod::Post,
            "private_key_jwt" => AuthMethod::PrivateKeyJwt,
            other => {
                return Err(ConfigError::at(
                    key("auth_method"),
                    format!(" = {other:?}: use basic (the default), post or private_key_jwt"),
                ));
            }
        };
        let (client_secret, assertion_key) = if auth_method == AuthMethod::PrivateKeyJwt {
            let assertion = self.assertion_key(&key)?;
            (stand_in(&assertion.pem), Some(assertion))
        } else if self.assertion_key_file.is_some() {
            return Err(ConfigError::at(
                key("assertion_key_file"),
                " needs auth_method = \"private_key_jwt\"",
            ));
        } else {
            (self.secret(env, &key)?, None)
        };
        let mut params = Vec::new();
        for (name, value) in [
            ("scope", &self.scope),
            ("audience", &self.audience),
            ("resource", &self.resource),
        ] {
            if let Some(value) = value {
                params.push((name.to_owned(), value.clone()));
            }
        }
        for (name, value) in self.params {
            if RESERVED.contains(&name.as_str()) {
                return Err(ConfigError::at(
                    key("params"),
                    format!(" may not set {name}: the sidecar sets it"),
                ));
            }
            params.push((name, value));
        }
        Ok(InjectConfig {
            token_origin,
            token_path,
            client_id: self.client_id,
            client_secret,
            assertion_key,
            params,
            auth_method,
            overwrite: self.overwrite.unwrap_or(false),
            from_basic: self.from_basic.unwrap_or(false),
            retry_body_limit: self.retry_body_limit.unwrap_or(DEFAULT_RETRY_BODY_LIMIT),
        })
    }

    /// The `private_key_jwt` key: a PEM file holding an RSA or EC P-256 private key, and no
    /// client secret besides.
    fn assertion_key(&self, key: &impl Fn(&str) -> KeyPath) -> Result<AssertionKey, ConfigError> {
        if self.client_secret_file.is_some() || self.client_secret_env.is_some() {
            return Err(ConfigError::at(
                key("client_secret_file"),
                " or client_secret_env: private_key_jwt signs with assertion_key_file instead",
            ));
        }
        let Some(path) = &self.assertion_key_file else {
            return Err(ConfigError::at(
                key("assertion_key_file"),
                " is required with auth_method = \"private_key_jwt\" (a PEM RSA or EC P-256 private key)",
            ));
        };
        let pem = std::fs::read(path).map_err(|e| {
            ConfigError::at(
                key("assertion_key_file"),
                format!(" {}: {e}", path.display()),
            )
        })?;
        let usable = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).is_ok()
            || jsonwebtoken::EncodingKey::from_ec_pem(&pem).is_ok();
        if !usable {
            return Err(ConfigError::at(
                key("assertion_key_file"),
                format!(
                    " {}: not an RSA or EC (P-256) private key in PEM",
                    path.display()
                ),
            ));
        }
        Ok(AssertionKey {
            pem,
            kid: self.assertion_kid.clone(),
        })
    }

    /// The client secret from its file or variable: exactly one of them, not empty.
    fn secret(
        &self,
        env: &impl Fn(&str) -> Option<String>,
        key: &impl Fn(&str) -> KeyPath,
    ) -> Result<ClientSecret, ConfigError> {
        let secret = match (&self.client_secret_file, &self.client_secret_env) {
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::at(
                        key("client_secret_file"),
                        format!(" {}: {e}", path.display()),
                    )
                })?;
                let secret = text.trim_end_matches(['\r', '\n']).to_owned();
                if secret.is_empty() {
                    return Err(ConfigError::at(
                        key("client_secret_file"),
                        format!(" {}: the file is empty", path.display()),
                    ));
                }
                secret
            }
            (None, Some(name)) => match env(name) {
                Some(secret) if !secret.is_empty() => secret,
                _ => {
                    return Err(ConfigError::at(
                        key("client_secret_env"),
                        format!(" = {name:?}: the variable is not set or empty"),
                    ));
                }
            },
            _ => {
                return Err(ConfigError::at(
                    key("client_secret_file"),
                    " or client_secret_env: give exactly one (the secret never goes in this file)",
                ));
            }
        };
        Ok(ClientSecret(secret))
    }
}

/// The Genesys preset's injection: `client_id` and the secret in `secret_file`
/// (`genesys_client_id`, `genesys_client_secret_file` in messages), tokens from `login`'s
/// `/oauth/token`, Basic, nothing else.
pub(super) fn preset(
    login: &UpstreamUrl,
    client_id: String,
    secret_file: PathBuf,
) -> Result<InjectConfig, ConfigError> {
    let key = |name: &str| {
        KeyPath::top(match name {
            "client_secret_file" => "genesys_client_secret_file",
            "client_id" => "genesys_client_id",
            other => other,
        })
    };
    if client_id.trim().is_empty() {
        return Err(ConfigError::at(key("client_id"), " is empty"));
    }
    let table = FileInject {
        token_url: format!("{login}/oauth/token"),
        client_id,
        client_secret_file: Some(secret_file),
        ..FileInject::default()
    };
    let client_secret = table.secret(&|_: &str| None, &key)?;
    let (token_origin, token_path) = split_token_url(&table.token_url)
        .map_err(|why| ConfigError::new(format!("the Genesys login host {login}: {why}")))?;
    Ok(InjectConfig {
        token_origin,
        token_path,
        client_id: table.client_id,
        client_secret,
        assertion_key: None,
        params: Vec::new(),
        auth_method: AuthMethod::Basic,
        overwrite: false,
        from_basic: false,
        retry_body_limit: DEFAULT_RETRY_BODY_LIMIT,
    })
}

/// The stand-in secret a `private_key_jwt` client is keyed by: a digest of its key.
fn stand_in(pem: &[u8]) -> ClientSecret {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(pem);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    ClientSecret(format!("private-key-jwt-{hex}"))
}

/// Form parameters the sidecar sets itself.
const RESERVED: [&str; 5] = [
    "grant_type",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
];

/// `https://host[:port]/path` as its origin and path; the path is required, a query is not
/// allowed.
fn split_token_url(url: &str) -> Result<(UpstreamUrl, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "is not a URL like https://login.example.com/oauth/token".to_owned())?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err("needs a scheme and a host, like https://login.example.com/oauth/token".into());
    };
    if uri.query().is_some() {
        return Err("may not carry a query".into());
    }
    let path = uri.path();
    if path.is_empty() || path == "/" {
        return Err("needs the token endpoint's path, like /oauth/token".into());
    }
    let origin = UpstreamUrl::parse(&format!("{scheme}://{authority}"))?;
    Ok((origin, path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> FileInject {
        toml::from_str(&format!(
            "token_url = \"https://login.example.com/oauth/token\"\nclient_id = \"app\"\n{extra}"
        ))
        .unwrap()
    }

    fn env(name: &str) -> Option<String> {
        (name == "APP_SECRET").then(|| "s3cret".to_owned())
    }

    #[test]
    fn an_inject_table_is_checked_and_its_secret_read_from_a_file_or_a_variable() {
        let dir = std::env::temp_dir().join(format!("ts-inject-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let route = (0, "api");

        let c = table(&format!(
            "client_secret_file = {:?}\nscope = \"read write\"\nparams = {{ tenant = \"t1\" }}\n",
            file.display()
        ))
        .into_config(route, &env)
        .unwrap();
        assert_eq!(c.client_secret.expose(), "from-file");
        assert_eq!(c.token_origin.to_string(), "https://login.example.com");
        assert_eq!(c.token_path, "/oauth/token");
        assert_eq!(c.auth_method, AuthMethod::Basic);
        assert!(!c.overwrite);
        assert_eq!(c.retry_body_limit, DEFAULT_RETRY_BODY_LIMIT);
        assert_eq!(
            c.params,
            [
                ("scope".into(), "read write".into()),
                ("tenant".into(), "t1".into())
            ]
        );
        assert!(!format!("{c:?}").contains("from-file"), "never printed");

        let c = table("client_secret_env = \"APP_SECRET\"\nauth_method = \"post\"\n")
            .into_config(route, &env)
            .unwrap();
        assert_eq!(c.client_secret.expose(), "s3cret");
        assert_eq!(c.auth_method, AuthMethod::Post);

        let error = |extra: &str| {
            table(extra)
                .into_config(route, &env)
                .unwrap_err()
                .to_string()
        };
        let e = error("");
        assert!(
            e.contains("inject.client_secret_file") && e.contains("exactly one"),
            "{e}"
        );
        let e = error(&format!("client_secret_file = {:?}\n", empty.display()));
        assert!(
            e.contains("empty") && e.contains(&empty.display().to_string()),
            "{e}"
        );
        let e = error("client_secret_env = \"NOT_SET\"\n");
        assert!(e.contains("NOT_SET") && e.contains("not set"), "{e}");
        let e = error("client_secret_env = \"APP_SECRET\"\nauth_method = \"jwt\"\n");
        assert!(e.contains("inject.auth_method"), "{e}");
        let e = error("client_secret_env = \"APP_SECRET\"\nparams = { grant_type = \"x\" }\n");
        assert!(e.contains("grant_type"), "{e}");
        let bad_url: FileInject = toml::from_str(
            "token_url = \"https://login.example.com\"\nclient_id = \"a\"\nclient_secret_env = \"APP_SECRET\"\n",
        )
        .unwrap();
        let e = bad_url.into_config(route, &env).unwrap_err().to_string();
        assert!(e.contains("inject.token_url") && e.contains("path"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
