//! The checks no part can make on its own: the worker count, route names (well formed and
//! unique), path prefixes (well formed, and distinct per listener), token paths, and listen
//! addresses distinct from each other and from the admin one. Each route's `token` and `client`
//! tables and the `[limits]` table check themselves (`model.rs`), called from here.

use super::error::{ConfigError, KeyPath};
use super::model::{Config, MAX_WORKERS, RouteConfig};

impl Config {
    /// Checks values serde cannot: ranges, uniqueness, paths. The first problem found is the
    /// error, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers > MAX_WORKERS {
            return Err(ConfigError::at(
                KeyPath::top("workers"),
                format!(
                    " = {}: at most {MAX_WORKERS} (0 = one per CPU)",
                    self.workers
                ),
            ));
        }
        for (i, route) in self.routes.iter().enumerate() {
            validate_route(i, route, &self.routes[..i])?;
        }
        self.validate_addresses()?;
        self.limits.validate()
    }

    /// No two listeners, the admin one included, on one address (port 0 picks a fresh one).
    fn validate_addresses(&self) -> Result<(), ConfigError> {
        let mut addresses = vec![("admin", self.admin)];
        addresses.extend(self.listeners().into_iter().map(|addr| ("listen", addr)));
        for (i, (what, addr)) in addresses.iter().enumerate() {
            if let Some((other, _)) = addresses[..i]
                .iter()
                .find(|(_, a)| a == addr && addr.port() != 0)
            {
                return Err(ConfigError::at(
                    KeyPath::top(what),
                    format!(" {addr} is also used by {other}"),
                ));
            }
        }
        Ok(())
    }
}

/// Route `i`, given the routes before it.
fn validate_route(
    i: usize,
    route: &RouteConfig,
    earlier: &[RouteConfig],
) -> Result<(), ConfigError> {
    let at = |key: &str| KeyPath::route(i, &route.name, key);
    if route.name.is_empty()
        || !route
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::at(
            at("name"),
            ": use letters, digits, - and _",
        ));
    }
    if earlier.iter().any(|other| other.name == route.name) {
        return Err(ConfigError::at(
            at("name"),
            format!(": {:?} is used twice", route.name),
        ));
    }
    validate_prefix(at("path_prefix"), route, earlier)?;
    for path in &route.token_paths {
        if !path.starts_with('/') || path.contains('?') || path.contains('#') {
            return Err(ConfigError::at(
                at("token_paths"),
                format!(": {path:?} must be a path starting with /"),
            ));
        }
    }
    route.token.validate(&at("token"))?;
    route.client.validate(&at("client"))
}

/// A path prefix is a path (`/` for everything) with no trailing `/`, and serves one route per
/// listener.
fn validate_prefix(
    at: KeyPath,
    route: &RouteConfig,
    earlier: &[RouteConfig],
) -> Result<(), ConfigError> {
    let prefix = &route.path_prefix;
    if !prefix.starts_with('/')
        || (prefix.len() > 1 && prefix.ends_with('/'))
        || prefix.contains(['?', '#'])
    {
        return Err(ConfigError::at(
            at,
            format!(
                ": {prefix:?} must be a path starting with / and not ending with one (\"/\" for everything)"
            ),
        ));
    }
    if let Some(other) = earlier
        .iter()
        .find(|o| o.listen == route.listen && o.path_prefix == route.path_prefix)
    {
        return Err(ConfigError::at(
            at,
            format!(
                ": routes {:?} and {:?} both serve path_prefix {prefix:?} on {}",
                other.name, route.name, route.listen
            ),
        ));
    }
    Ok(())
}
