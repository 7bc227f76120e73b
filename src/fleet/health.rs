//! What the fleet tier knows of its own state, for logs, `/status` and readiness: whether Redis
//! has ever answered, and why it does not now. A cause is logged once, when it first appears or
//! changes, and its end once: a tier that is down says so in one line, not in one per call.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::{info, warn};

/// The tier's health, shared by the calls and the reconnect task.
#[derive(Debug)]
pub(crate) struct Health {
    /// Where Redis is, without credentials.
    address: String,
    answered: AtomicBool,
    cause: Mutex<Option<String>>,
}

impl Health {
    pub(crate) fn new(address: String) -> Health {
        Health {
            address,
            answered: AtomicBool::new(false),
            cause: Mutex::new(None),
        }
    }

    /// Redis answered.
    pub(crate) fn ok(&self) {
        self.answered.store(true, Ordering::Release);
        if self.lock().take().is_some() {
            info!(redis = %self.address, "fleet tier: Redis answers again; the fleet shares tokens");
        }
    }

    /// Redis failed because of `why` (no secret in it).
    pub(crate) fn failed(&self, op: &str, why: String) {
        let mut cause = self.lock();
        if cause.as_deref() != Some(why.as_str()) {
            warn!(redis = %self.address, op, why, "fleet tier: Redis failed; each pod goes on alone until it answers");
            *cause = Some(why);
        }
    }

    /// Redis has answered at least once since the start.
    pub(crate) fn answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// Why Redis does not answer now, if it does not.
    pub(crate) fn cause(&self) -> Option<String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.cause.lock().unwrap_or_else(|e| e.into_inner())
    }
}
