//! The config file: its schema as written (every key optional, unknown keys refused), reading
//! it, and parsing it once into a spanned document that both the schema is read from and errors
//! find their line in. A value the file gave that later fails validation is reported with the
//! line of its key: a route's key in its own `[[routes]]` table (found by the route's name), or
//! else in the top-level table the route falls back to.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::de::DeTable;

use super::error::{ConfigError, KeyPath};
use super::fleet::FileShared;
use super::model::{ClientConfig, Limits, LogConfig, TokenConfig};

/// The file as written: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) admin: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde")]
    pub(super) shutdown_grace: Option<Duration>,
    pub(super) workers: Option<usize>,
    #[serde(default)]
    pub(super) log: LogConfig,
    #[serde(default)]
    pub(super) limits: Limits,
    // The Genesys Cloud preset, instead of the one-route shortcut.
    pub(super) genesys_region: Option<String>,
    pub(super) genesys_login_upstream: Option<String>,
    pub(super) genesys_api_upstream: Option<String>,
    pub(super) genesys_client_id: Option<String>,
    pub(super) genesys_client_secret_file: Option<std::path::PathBuf>,
    // The one-route shortcut, mirrored by the flags.
    pub(super) upstream: Option<String>,
    pub(super) listen: Option<SocketAddr>,
    pub(super) token_paths: Option<Vec<String>>,
    pub(super) preserve_host: Option<bool>,
    pub(super) token: Option<TokenConfig>,
    pub(super) client: Option<ClientConfig>,
    #[serde(default)]
    pub(super) routes: Vec<FileRoute>,
    pub(super) shared: Option<FileShared>,
}

/// A `[[routes]]` table; `token` and `client` fall back to the top-level tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub(super) name: Option<String>,
    pub(super) listen: SocketAddr,
    pub(super) path_prefix: Option<String>,
    pub(super) strip_prefix: Option<bool>,
    pub(super) upstream: String,
    pub(super) token_paths: Option<Vec<String>>,
    pub(super) preserve_host: Option<bool>,
    pub(super) token: Option<TokenConfig>,
    pub(super) client: Option<ClientConfig>,
    pub(super) inject: Option<super::inject::FileInject>,
}

/// A config file as read, before parsing.
pub(super) struct FileText {
    path: PathBuf,
    text: String,
}

impl FileText {
    /// Reads the file at `path`, if one is named (by `--config` or `TOKEN_SIDECAR_CONFIG`).
    pub(super) fn read(
        path: Option<PathBuf>,
        read_file: &impl Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Option<FileText>, ConfigError> {
        let Some(path) = path else {
            return Ok(None);
        };
        let text = read_file(&path).map_err(|e| {
            ConfigError::new(format!("cannot read config file {}: {e}", path.display()))
        })?;
        Ok(Some(FileText { path, text }))
    }

    /// Parses the file once: the schema, and the spans its errors find their lines in. A file
    /// that does not parse, or does not fit the schema, is an error naming line and column.
    pub(super) fn parse(&self) -> Result<(FileConfig, Document<'_>), ConfigError> {
        let error = |e: toml::de::Error| self.parse_error(&e);
        let root = DeTable::parse(&self.text).map_err(error)?;
        // The deserializer consumes its tree; the copy keeps the spans for later errors.
        let config =
            FileConfig::deserialize(toml::de::Deserializer::from(root.clone())).map_err(error)?;
        let document = Document {
            path: &self.path,
            text: &self.text,
            root: root.into_inner(),
        };
        Ok((config, document))
    }

    /// `config file <path>: <what> (at line L, column C)`.
    fn parse_error(&self, e: &toml::de::Error) -> ConfigError {
        let at = e
            .span()
            .map(|span| {
                let (line, column) = position(&self.text, span.start);
                format!(" (at line {line}, column {column})")
            })
            .unwrap_or_default();
        let message = e.message().trim_end();
        ConfigError::new(format!(
            "config file {}: {message}{at}{}",
            self.path.display(),
            hint(message)
        ))
    }
}

/// Where each key of the file belongs, for the hint on a key written in the wrong table (a unit
/// test holds each list to the schema's own).
const TABLES: &[(&str, &[&str])] = &[
    (
        "at the top level",
        &[
            "admin",
            "shutdown_grace",
            "workers",
            "genesys_region",
            "genesys_login_upstream",
            "genesys_api_upstream",
            "genesys_client_id",
            "genesys_client_secret_file",
            "upstream",
            "listen",
            "token_paths",
            "preserve_host",
        ],
    ),
    ("in [log]", &["format", "filter"]),
    (
        "in [limits]",
        &[
            "max_request_body",
            "max_token_response",
            "max_headers",
            "max_header_bytes",
            "header_read_timeout",
            "body_read_timeout",
            "max_connections",
            "idle_timeout",
            "max_streams",
            "tunnel_idle_timeout",
        ],
    ),
    (
        "in [token]",
        &[
            "safety_margin_max",
            "safety_margin_ratio",
            "refresh_at",
            "refresh_jitter",
            "retry_after_max",
            "backoff_base",
            "backoff_max",
            "error_ttl",
            "refresh_token_ttl",
            "max_lifetime",
            "wait_timeout",
            "absorb_hold",
            "pool_size",
            "probe_interval",
            "max_entries",
            "idle_timeout",
            "max_concurrent_calls",
            "calls_per_second",
            "calls_burst",
        ],
    ),
    (
        "in [client]",
        &[
            "connect_timeout",
            "request_timeout",
            "pool_idle_timeout",
            "ca_file",
            "client_cert_file",
            "client_key_file",
        ],
    ),
    (
        "in [shared]",
        &[
            "redis",
            "key_file",
            "password_file",
            "ca_file",
            "cluster",
            "sentinel_master",
            "previous_key_file",
            "cert_file",
            "cert_key_file",
            "required",
            "timeout",
            "connect_timeout",
            "poll_interval",
        ],
    ),
    (
        "in a [[routes]] table",
        &[
            "name",
            "listen",
            "path_prefix",
            "strip_prefix",
            "upstream",
            "token_paths",
            "preserve_host",
        ],
    ),
];

/// What to do about a parse error, where the message alone does not say: where an unknown key
/// belongs, and what a duration looks like.
fn hint(message: &str) -> String {
    if message.contains("expected a duration") {
        return "; write a duration as a string such as \"30s\", \"500ms\", \"5m\" or \"1h 30m\""
            .to_owned();
    }
    let Some(key) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    else {
        return String::new();
    };
    let places: Vec<&str> = TABLES
        .iter()
        .filter(|(_, keys)| keys.contains(&key))
        .map(|(place, _)| *place)
        .collect();
    match places.as_slice() {
        [] => String::new(),
        places => format!("; `{key}` belongs {}", places.join(" or ")),
    }
}

/// A parsed config file: the document with the spans of its keys, to find a key's line in.
pub(super) struct Document<'a> {
    path: &'a Path,
    text: &'a str,
    root: DeTable<'a>,
}

impl Document<'_> {
    /// `error`, with the file and line that set its key when the file sets it.
    pub(super) fn locate(&self, mut error: ConfigError) -> ConfigError {
        if let Some(line) = error.key().and_then(|key| self.line_of(key)) {
            error.set_line(self.path, line);
        }
        error
    }

    /// The line that sets `key`: a route's key in its own `[[routes]]` table, else (or for a
    /// top-level key) in the top-level tables.
    fn line_of(&self, key: &KeyPath) -> Option<usize> {
        let path: Vec<&str> = key.path().split('.').collect();
        let in_route = key
            .route_name()
            .and_then(|name| self.route_table(name))
            .and_then(|table| key_offset(table, &path));
        let offset = in_route.or_else(|| key_offset(&self.root, &path))?;
        Some(position(self.text, offset).0)
    }

    /// The `[[routes]]` table of the route named `name`: the one with that `name`, or for an
    /// unnamed route (`route2`) the one at its index.
    fn route_table(&self, name: &str) -> Option<&DeTable<'_>> {
        let routes = self.root.get("routes")?.get_ref().as_array()?;
        let tables: Vec<&DeTable<'_>> = routes
            .iter()
            .filter_map(|route| route.get_ref().as_table())
            .collect();
        let named = |table: &&DeTable<'_>| {
            table.get("name").and_then(|n| n.get_ref().as_str()) == Some(name)
        };
        tables
            .iter()
            .position(named)
            .or_else(|| name.strip_prefix("route")?.parse().ok())
            .and_then(|index| tables.get(index).copied())
    }
}

/// The byte offset of the key at dotted `path` below `table`.
fn key_offset(table: &DeTable<'_>, path: &[&str]) -> Option<usize> {
    let (first, rest) = path.split_first()?;
    let (key, value) = table.get_key_value(*first)?;
    match rest {
        [] => Some(key.span().start),
        _ => key_offset(value.get_ref().as_table()?, rest),
    }
}

/// The line and column, both from 1 and the column in characters, of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use crate::config::Overrides;
    use crate::config::tests::{load, with_file};

    #[test]
    fn out_of_range_values_from_the_file_name_its_line() {
        let cases = [
            (
                "upstream = \"http://x\"\n\n[token]\nmax_lifetime = \"1s\"\n",
                "routes[0] (default).token.max_lifetime",
                4,
            ),
            (
                "upstream = \"http://x\"\n[limits]\nmax_streams = 0\n",
                "limits.max_streams",
                3,
            ),
            (
                "upstream = \"http://x\"\nworkers = 5000\n",
                "workers = 5000",
                2,
            ),
            (
                "upstream = \"http://x\"\ntoken.pool_size = 99\n",
                "routes[0] (default).token.pool_size",
                2,
            ),
            (
                "[token]\nwait_timeout = \"9s\"\n[[routes]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"http://a\"\n[[routes]]\nname = \"b\"\nlisten = \"127.0.0.1:2\"\nupstream = \"http://b\"\n[routes.token]\nrefresh_at = 2.0\n",
                "routes[1] (b).token.refresh_at",
                12,
            ),
            (
                "[token]\nrefresh_at = 2.0\n[[routes]]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://a\"\n",
                "routes[0] (route0).token.refresh_at",
                2,
            ),
        ];
        for (file, starts, line) in cases {
            let e = load(with_file(), &[], Some(file)).unwrap_err();
            assert!(e.to_string().starts_with(starts), "{e}");
            assert!(
                e.to_string()
                    .ends_with(&format!("(config file t.toml, line {line})")),
                "{file}: {e}"
            );
        }
        // Values from flags or the environment have no line to name.
        let e = load(
            Overrides {
                workers: Some(5000),
                upstream: Some("http://x".into()),
                ..Default::default()
            },
            &[],
            None,
        )
        .unwrap_err();
        assert!(!e.to_string().contains("line"), "{e}");
    }

    #[test]
    fn an_error_carries_its_key_and_finds_its_line_from_the_spans() {
        let file = "[[routes]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"http://a\"\n[[routes]]\nname = \"b\"\nlisten = \"127.0.0.1:2\"\nupstream = \"http://b\"\nclient = { request_timeout = \"0s\" }\n";
        let e = load(with_file(), &[], Some(file)).unwrap_err();
        let key = e.key().map(ToString::to_string);
        assert_eq!(key.as_deref(), Some("routes[1] (b).client"), "{e}");
        assert_eq!(e.line(), Some(9), "{e}");
        // A table written as a header has its line too, and so has an unnamed route's key.
        let file = "upstream = \"http://x\"\n[client]\nconnect_timeout = \"0s\"";
        assert_eq!(
            load(with_file(), &[], Some(file)).unwrap_err().line(),
            Some(2)
        );
        let file = "[[routes]]\nlisten = \"127.0.0.1:1\"\nupstream = \"nope\"\n";
        let e = load(with_file(), &[], Some(file)).unwrap_err();
        assert!(e.message().starts_with("routes[0].upstream: "), "{e}");
        assert_eq!(e.line(), Some(3), "{e}");
    }

    #[test]
    fn a_key_in_the_wrong_table_says_where_it_belongs_and_durations_show_an_example() {
        let e = load(
            with_file(),
            &[],
            Some("[token]\nconnect_timeout = \"5s\"\n"),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .ends_with("; `connect_timeout` belongs in [client] or in [shared]"),
            "{e}"
        );
        let e = load(with_file(), &[], Some("wait_timeout = \"5s\"\n")).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("; `wait_timeout` belongs in [token]"),
            "{e}"
        );
        let e = load(with_file(), &[], Some("[limits]\nmax_entries = 5\n")).unwrap_err();
        assert!(
            e.to_string().contains("`max_entries` belongs in [token]"),
            "{e}"
        );
        let e = load(with_file(), &[], Some("[token]\nnonsense = 1\n")).unwrap_err();
        assert!(!e.to_string().contains("belongs"), "{e}");
        for value in ["30", "\"thirty\""] {
            let file = format!("upstream = \"http://x\"\n[token]\nwait_timeout = {value}\n");
            let e = load(with_file(), &[], Some(&file)).unwrap_err();
            assert!(e.to_string().contains("line 3"), "{e}");
            assert!(e.to_string().contains("such as \"30s\""), "{e}");
        }
    }

    /// Each list of [`super::TABLES`] is exactly what the schema accepts there: an unknown key
    /// in that table makes serde list the table's fields.
    #[test]
    fn the_hint_tables_match_the_schema() {
        let nested = [
            "log", "limits", "token", "client", "routes", "shared", "inject",
        ];
        for (place, keys) in super::TABLES {
            let file = match *place {
                "at the top level" => "zz_probe = 1\n".to_owned(),
                "in a [[routes]] table" => "[[routes]]\nzz_probe = 1\n".to_owned(),
                table => format!("{}\nzz_probe = 1\n", &table[3..]),
            };
            let e = load(with_file(), &[], Some(&file)).unwrap_err().to_string();
            // serde says "expected one of `a`, `b`, `c`", or "expected `a` or `b`".
            let listed: Vec<&str> = e
                .split(", expected ")
                .nth(1)
                .and_then(|rest| rest.split(" (at line").next())
                .unwrap_or_else(|| panic!("{place}: {e}"))
                .trim_start_matches("one of ")
                .split(", ")
                .flat_map(|k| k.split(" or "))
                .map(|k| k.trim_matches('`'))
                .filter(|k| !nested.contains(k))
                .collect();
            assert_eq!(&listed, keys, "{place}");
        }
    }
}
