//! What happened to one token-path request, as a log field and a metric label, and the route's
//! counters of each. The enum and its labels are declared from one table, so the counters (indexed
//! by the table's order) cannot drift from the enum: a new outcome is counted once it is declared.

use prometheus_client::metrics::counter::Counter;

use crate::metrics::RouteMetrics;

/// Declares [`Outcome`], its labels and the list of all of them from one table.
macro_rules! outcomes {
    ($($(#[doc = $doc:literal])* $variant:ident => $label:literal,)*) => {
        /// What happened to one token-path request: a log field and a metric label.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Outcome {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Outcome {
            /// Every outcome, in declaration order, so `outcome as usize` indexes it.
            pub(crate) const ALL: &'static [Outcome] = &[$(Outcome::$variant,)*];

            /// The label used in logs and metrics.
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $(Outcome::$variant => $label,)*
                }
            }
        }
    };
}

outcomes! {
    /// Served from the cache.
    Hit => "hit",
    /// Fetched from the provider: nothing was cached.
    Miss => "miss",
    /// Fetched from the provider: the cached token was past its safety margin.
    Stale => "stale",
    /// Waited for another request's upstream call.
    Coalesced => "coalesced",
    /// Refused without an upstream call: the client id is cooling down.
    Cooldown => "cooldown",
    /// A remembered answer was replayed (a recent client error, or a refresh-token answer).
    Remembered => "remembered",
    /// Not cacheable: forwarded unchanged.
    Bypass => "bypass",
    /// The local request was malformed.
    Invalid => "invalid",
    /// The sidecar answered with its own error (upstream unreachable, unusable, wait timeout).
    Error => "error",
    /// Refused at once: the cache is full of calls in progress and tokens in use (503).
    Full => "full",
}

/// One route's counter per [`Outcome`], resolved once so that counting is one atomic add.
#[derive(Debug)]
pub(crate) struct OutcomeCounters(Vec<Counter>);

impl OutcomeCounters {
    pub(crate) fn new(metrics: &RouteMetrics) -> OutcomeCounters {
        OutcomeCounters(
            Outcome::ALL
                .iter()
                .map(|outcome| metrics.token_requests(outcome.as_str()))
                .collect(),
        )
    }

    pub(crate) fn count(&self, outcome: Outcome) {
        self.0[outcome as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_own_counter_and_label() {
        let metrics = crate::metrics::Metrics::new();
        let counters = OutcomeCounters::new(&metrics.route("r"));
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            counters.count(*outcome);
            assert_eq!(
                counters.0[i].get(),
                1,
                "{outcome:?} counts on its own counter"
            );
        }
        let labels: std::collections::HashSet<_> =
            Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }

    #[test]
    fn the_metric_help_names_every_outcome() {
        let help = crate::metrics::TOKEN_REQUESTS_HELP;
        let listed = help
            .split_once('(')
            .and_then(|(_, rest)| rest.strip_suffix(')'))
            .expect("the outcomes in parentheses");
        let listed: Vec<&str> = listed.split(", ").collect();
        let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(listed, labels, "{help}");
    }
}
