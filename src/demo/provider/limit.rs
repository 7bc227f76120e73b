//! The provider's rate limit: how many token calls it answers per second before it says 429 with
//! `Retry-After: 1`. Two kinds, both seen at real providers:
//!
//! - the token service's own quota, per whole second of the provider's clock, every call
//!   counting, rejected ones too, decided once the call's latency has passed (the demo's and the
//!   tests' provider);
//! - a gateway in front of it: admitted calls in any rolling second, decided as a call arrives
//!   and refused at once, before the call's latency (the benchmark's). A refused call does not
//!   keep the window full, so a client that waits out `Retry-After: 1` gets in unless others took
//!   the places first; the oldest admitted call is always less than a second old, so one second
//!   is also the honest `Retry-After`.

use std::collections::VecDeque;
use std::time::Duration;

const SECOND: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(super) struct RateLimit {
    /// Calls allowed per second.
    calls: u64,
    window: Window,
}

#[derive(Debug)]
enum Window {
    /// The whole second it is for, and the calls counted in it.
    Fixed { second: u64, calls: u64 },
    /// When each admitted call of the last second arrived; at most `calls` of them.
    Rolling(VecDeque<Duration>),
}

impl RateLimit {
    pub(super) fn fixed(calls: u64) -> RateLimit {
        let window = Window::Fixed {
            second: 0,
            calls: 0,
        };
        RateLimit { calls, window }
    }

    pub(super) fn rolling(calls: u64) -> RateLimit {
        let window = Window::Rolling(VecDeque::new());
        RateLimit { calls, window }
    }

    /// Whether calls are decided as they arrive (the gateway), not after their latency.
    pub(super) fn at_arrival(&self) -> bool {
        matches!(self.window, Window::Rolling(_))
    }

    /// Counts a call decided `now` (the provider's clock); true if it is over the limit.
    pub(super) fn over(&mut self, now: Duration) -> bool {
        match &mut self.window {
            Window::Fixed { second, calls } => {
                if *second != now.as_secs() {
                    (*second, *calls) = (now.as_secs(), 0);
                }
                *calls += 1;
                *calls > self.calls
            }
            Window::Rolling(admitted) => {
                while admitted.front().is_some_and(|at| *at + SECOND <= now) {
                    admitted.pop_front();
                }
                let over = admitted.len() as u64 >= self.calls;
                if !over {
                    admitted.push_back(now);
                }
                over
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_fixed_window_counts_every_call_until_the_next_whole_second() {
        let mut limit = RateLimit::fixed(2);
        assert!(!limit.at_arrival());
        let over: Vec<bool> = [100, 200, 300, 400, 999, 1000, 1001, 1002]
            .map(|ms| limit.over(at(ms)))
            .to_vec();
        assert_eq!(
            over,
            [false, false, true, true, true, false, false, true],
            "refused calls count too, and the count starts again at each whole second"
        );
    }

    #[test]
    fn a_rolling_window_counts_admitted_calls_of_the_last_second_only() {
        let mut limit = RateLimit::rolling(2);
        assert!(limit.at_arrival());
        assert!(!limit.over(at(900)));
        assert!(!limit.over(at(950)));
        assert!(limit.over(at(1000)), "a new whole second does not empty it");
        assert!(limit.over(at(1899)));
        assert!(!limit.over(at(1900)), "the first call has left the window");
        assert!(
            !limit.over(at(1950)),
            "the refused calls took no place in it"
        );
        assert!(limit.over(at(1951)));
    }
}
