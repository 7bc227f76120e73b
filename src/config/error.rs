//! What a configuration error says and what it is about. A [`ConfigError`] carries its message
//! for the operator and, when a config-file key is at fault, that key as a [`KeyPath`]
//! (`routes[1] (eu).token.wait_timeout`, `shared.timeout`, `workers`); [`Config::load`] then adds
//! the line of the file that sets it, found from the parser's spans. [`Source`] names where a
//! value came from (a flag, a variable or a file key), so that an error about it says so.
//!
//! [`Config::load`]: super::Config::load

use std::fmt;
use std::path::{Path, PathBuf};

/// A key of the config file, as errors name it: top-level (`workers`, `limits.max_streams`) or
/// within a route (`routes[1] (eu).token.wait_timeout`), which is looked for in that route's
/// `[[routes]]` table first and in the top-level table it falls back to second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPath {
    /// The route's index in [`Config::routes`](super::Config::routes) and its name.
    route: Option<(usize, String)>,
    /// Dotted, from the route's table or from the top level.
    path: String,
}

impl KeyPath {
    /// A key outside `[[routes]]`: `workers`, `limits.max_streams`, `shared.timeout`.
    pub(super) fn top(path: &str) -> KeyPath {
        KeyPath {
            route: None,
            path: path.to_owned(),
        }
    }

    /// A key of route `index`, named `name`: `token.refresh_at`, `path_prefix`.
    pub(super) fn route(index: usize, name: &str, path: &str) -> KeyPath {
        KeyPath {
            route: Some((index, name.to_owned())),
            path: path.to_owned(),
        }
    }

    /// The same route, another key below it: `routes[0] (a).token` → `routes[0] (a).token.x`.
    pub(super) fn join(&self, key: &str) -> KeyPath {
        KeyPath {
            route: self.route.clone(),
            path: format!("{}.{key}", self.path),
        }
    }

    /// The name of the route the key belongs to, if any.
    pub fn route_name(&self) -> Option<&str> {
        self.route.as_ref().map(|(_, name)| name.as_str())
    }

    /// The dotted key within the route's table, or from the top level.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.route {
            Some((index, name)) => write!(f, "routes[{index}] ({name}).{}", self.path),
            None => f.write_str(&self.path),
        }
    }
}

/// Where a value came from, as an error about it names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Source {
    /// A command-line flag, `--upstream`.
    Flag(&'static str),
    /// An environment variable, `TOKEN_SIDECAR_UPSTREAM`.
    Env(&'static str),
    /// A key of the config file.
    File(KeyPath),
}

impl Source {
    /// A top-level key of the config file.
    pub(super) fn file(path: &str) -> Source {
        Source::File(KeyPath::top(path))
    }

    /// An error whose message is this source's name followed by `rest`; about the file's key
    /// when the value came from the file.
    pub(super) fn error(&self, rest: impl fmt::Display) -> ConfigError {
        let message = format!("{self}{rest}");
        match self {
            Source::File(key) => ConfigError::about(key.clone(), message),
            Source::Flag(_) | Source::Env(_) => ConfigError::new(message),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(name) | Source::Env(name) => f.write_str(name),
            Source::File(key) => key.fmt(f),
        }
    }
}

/// A configuration problem, worded for the operator: the message, the file key it is about (if
/// a key is), and the file and line that set that key (once looked up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
    key: Option<KeyPath>,
    /// The config file and the line (from 1) that sets `key`.
    line: Option<(PathBuf, usize)>,
}

impl ConfigError {
    /// An error about no key of the config file: a flag, a variable, a combination of settings.
    pub fn new(message: impl Into<String>) -> ConfigError {
        ConfigError {
            message: message.into(),
            key: None,
            line: None,
        }
    }

    /// An error about `key`, whose message is `message`.
    pub(super) fn about(key: KeyPath, message: impl Into<String>) -> ConfigError {
        ConfigError {
            message: message.into(),
            key: Some(key),
            line: None,
        }
    }

    /// An error about `key` whose message is the key followed by `rest`:
    /// `at(limits.max_streams, " must be greater than 0")`.
    pub(super) fn at(key: KeyPath, rest: impl fmt::Display) -> ConfigError {
        let message = format!("{key}{rest}");
        ConfigError::about(key, message)
    }

    /// The message, without the file and line.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The config-file key the error is about, if one is.
    pub fn key(&self) -> Option<&KeyPath> {
        self.key.as_ref()
    }

    /// The line of the config file that sets [`key`](Self::key), if the file sets it.
    pub fn line(&self) -> Option<usize> {
        self.line.as_ref().map(|(_, line)| *line)
    }

    /// Records that line `line` of `file` sets the key.
    pub(super) fn set_line(&mut self, file: &Path, line: usize) {
        self.line = Some((file.to_owned(), line));
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match &self.line {
            Some((file, line)) => write!(f, " (config file {}, line {line})", file.display()),
            None => Ok(()),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_as_the_operator_writes_them() {
        let token = KeyPath::route(1, "eu", "token");
        assert_eq!(
            token.join("wait_timeout").to_string(),
            "routes[1] (eu).token.wait_timeout"
        );
        assert_eq!(KeyPath::top("shared.timeout").to_string(), "shared.timeout");
        let mut e = ConfigError::at(KeyPath::top("workers"), " = 5000: at most 1024");
        assert_eq!(e.to_string(), "workers = 5000: at most 1024");
        e.set_line(Path::new("t.toml"), 2);
        assert_eq!(
            e.to_string(),
            "workers = 5000: at most 1024 (config file t.toml, line 2)"
        );
        assert_eq!(e.message(), "workers = 5000: at most 1024");
        assert_eq!(Source::Flag("--upstream").error(": bad").key(), None);
        assert_eq!(
            Source::file("upstream").error(": bad").key(),
            Some(&KeyPath::top("upstream"))
        );
    }
}
