//! Logging setup and the one way to name a client in logs and metrics: a short, stable hash of
//! the client id, never the id's secret and never a token.

use sha2::{Digest, Sha256};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG` (read through `env`) overrides the configured filter.
pub fn init(log: &LogConfig, env: impl Fn(&str) -> Option<String>) -> Result<(), String> {
    let directives = env("RUST_LOG").unwrap_or_else(|| log.filter.clone());
    let filter =
        EnvFilter::try_new(&directives).map_err(|e| format!("log filter {directives:?}: {e}"))?;
    // Colour only for a person at a terminal: a file, a pipe or a log collector gets plain text,
    // and `NO_COLOR` (https://no-color.org) turns it off everywhere.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && env("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}

/// Eight hex digits of SHA-256 of the client id: enough to tell clients apart in logs and metric
/// labels, stable across restarts, and useless for authentication.
pub fn client_hash(client_id: &str) -> String {
    let digest = Sha256::digest(client_id.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hash_is_short_stable_and_not_the_id() {
        assert_eq!(client_hash("my-app"), client_hash("my-app"));
        assert_ne!(client_hash("my-app"), client_hash("my-app2"));
        assert_eq!(client_hash("my-app").len(), 8);
        assert!(!client_hash("my-app").contains("my-app"));
    }
}
