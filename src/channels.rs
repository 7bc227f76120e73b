//! Genesys Cloud keeps at most 20 notification channels per user and app: a 21st closes the
//! oldest WebSocket, with no 429 to say so. When many threads share one token (interception or
//! injection), each creating its own channel, they drop each other's. The preset's API routes
//! count `POST /api/v2/notifications/channels` answered 2xx per client (the injected client, or
//! the bearer token the caller sent), expose it as metrics, and warn once per client and hour
//! when one passes 20 within 24 hours (docs/GENESYS.md: one channel, many topics).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tracing::warn;

use crate::metrics::ChannelMetrics;

/// Genesys Cloud's channels per user and app.
pub(crate) const LIMIT: usize = 20;
/// How long a channel counts (Genesys closes an unused channel within a day).
const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How often one client is warned.
const WARN_EVERY: Duration = Duration::from_secs(3600);
/// Clients remembered at most; past it the oldest-seen is forgotten.
const MAX_CLIENTS: usize = 10_000;

/// One route's count of channels per client.
#[derive(Debug)]
pub(crate) struct ChannelWatch {
    route: String,
    clients: Mutex<HashMap<[u8; 4], Created>>,
    metrics: ChannelMetrics,
}

/// One client's channels in the window, and when it was last warned.
#[derive(Debug, Default)]
struct Created {
    at: VecDeque<Instant>,
    warned: Option<Instant>,
}

/// The first bytes of the SHA-256 of `text`: a client id, or a bearer token, named without
/// being shown (the same 8 hex digits as the logs' client hash for an id).
pub(crate) fn digest(text: &[u8]) -> [u8; 4] {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(text);
    [digest[0], digest[1], digest[2], digest[3]]
}

/// Whether `path` (a normal form) creates a notification channel.
pub(crate) fn creates_channel(method: &http::Method, path: &str) -> bool {
    method == http::Method::POST
        && crate::path::match_key(path).ends_with("/api/v2/notifications/channels")
}

impl ChannelWatch {
    pub(crate) fn new(route: &str, metrics: ChannelMetrics) -> ChannelWatch {
        ChannelWatch {
            route: route.to_owned(),
            clients: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Counts a channel `client` (a hash prefix) created at `now`; returns how many it has
    /// created in the window.
    pub(crate) fn created(&self, client: [u8; 4], now: Instant) -> usize {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            let oldest = clients
                .iter()
                .min_by_key(|(_, c)| c.at.back().copied())
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                clients.remove(&oldest);
            }
        }
        let entry = clients.entry(client).or_default();
        entry.at.push_back(now);
        while entry
            .at
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > WINDOW)
        {
            entry.at.pop_front();
        }
        let count = entry.at.len();
        let due = entry
            .warned
            .is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
        if count > LIMIT && due {
            entry.warned = Some(now);
            let client: String = client.iter().map(|b| format!("{b:02x}")).collect();
            warn!(route = %self.route, client, channels = count, "Genesys Cloud keeps {LIMIT} notification channels per user and app and closes the oldest: one client created {count} in 24 h; create one channel and subscribe it to many topics (docs/GENESYS.md)");
        }
        let in_window = |c: &Created| {
            c.at.iter()
                .filter(|at| now.saturating_duration_since(**at) <= WINDOW)
                .count()
        };
        let most = clients.values().map(in_window).max().unwrap_or(0);
        self.metrics.created(&self.route, most);
        count
    }
}
