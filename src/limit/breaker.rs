//! A circuit breaker around the bucket store, as a pure state machine taking `now`.
//!
//! While Redis is down, paying a command timeout on every request would add the timeout to
//! every request's latency. After `failure_threshold` consecutive failures the breaker opens
//! and decisions skip the store entirely (each policy's `on_store_error` decides instead);
//! every `probe_interval` one request is let through as a probe, and its success closes the
//! breaker, so the store is used again within one probe interval of coming back.

use std::time::Duration;

/// Breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The store is used.
    Closed {
        /// Failures in a row since the last success; at the threshold the breaker opens.
        consecutive_failures: u32,
    },
    /// The store is skipped until `probe_at`.
    Open {
        /// When the next probe may go (µs, on the clock of the `now_us` given to
        /// [`Breaker::allow`]).
        probe_at: u64,
    },
    /// One probe is in flight; others skip the store.
    Probing {
        /// When the probe was let through; if it has not reported back one probe interval
        /// later, another goes.
        since: u64,
    },
}

/// A state change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// `failure_threshold` failures in a row: the store is skipped from now on.
    Opened,
    /// A success while open or probing: the store is used again.
    Closed,
}

/// Whether requests use the bucket store, from its recent successes and failures (see the
/// module docs).
#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    failure_threshold: u32,
    probe_interval_us: u64,
}

impl Breaker {
    /// A closed breaker that opens after `failure_threshold` consecutive failures (at least 1)
    /// and then lets one probe through every `probe_interval`.
    pub fn new(failure_threshold: u32, probe_interval: Duration) -> Self {
        Self {
            state: State::Closed {
                consecutive_failures: 0,
            },
            failure_threshold: failure_threshold.max(1),
            probe_interval_us: u64::try_from(probe_interval.as_micros()).unwrap_or(u64::MAX),
        }
    }

    /// The current state, without changing it (unlike [`Breaker::allow`], which may start a
    /// probe).
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the store is being skipped: open or probing, anything but [`State::Closed`].
    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }

    /// Whether this request should use the store. `now` is µs since any fixed origin.
    pub fn allow(&mut self, now: u64) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { probe_at } if now >= probe_at => {
                self.state = State::Probing { since: now };
                true
            }
            // A probe that never reported back (its task was cancelled) must not wedge the
            // breaker open forever: after another interval, probe again.
            State::Probing { since } if now >= since.saturating_add(self.probe_interval_us) => {
                self.state = State::Probing { since: now };
                true
            }
            State::Open { .. } | State::Probing { .. } => false,
        }
    }

    /// Records a store success: closes the breaker and resets the failure count. Returns
    /// [`Transition::Closed`] if it was open or probing.
    pub fn on_success(&mut self) -> Option<Transition> {
        let was_open = self.is_open();
        self.state = State::Closed {
            consecutive_failures: 0,
        };
        was_open.then_some(Transition::Closed)
    }

    /// Records a store failure at `now`. Opens the breaker after `failure_threshold` in a row
    /// (returning [`Transition::Opened`]); while open or probing, it pushes the next probe to
    /// `now + probe_interval`.
    pub fn on_failure(&mut self, now: u64) -> Option<Transition> {
        match self.state {
            State::Closed {
                consecutive_failures,
            } => {
                let failures = consecutive_failures + 1;
                if failures >= self.failure_threshold {
                    self.state = State::Open {
                        probe_at: now.saturating_add(self.probe_interval_us),
                    };
                    Some(Transition::Opened)
                } else {
                    self.state = State::Closed {
                        consecutive_failures: failures,
                    };
                    None
                }
            }
            State::Open { .. } | State::Probing { .. } => {
                self.state = State::Open {
                    probe_at: now.saturating_add(self.probe_interval_us),
                };
                None
            }
        }
    }

    /// The probe let through at `since` went away before the store answered: it proves
    /// nothing, so the next request at or after `probe_at` probes instead of waiting out a
    /// whole interval. A probe let through since is left alone.
    pub fn probe_abandoned(&mut self, since: u64, probe_at: u64) {
        if self.state == (State::Probing { since }) {
            self.state = State::Open { probe_at };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000;

    #[test]
    fn opens_after_threshold_and_probes_each_interval() {
        let mut b = Breaker::new(3, Duration::from_millis(250));
        assert_eq!(b.on_failure(0), None);
        assert_eq!(b.on_failure(MS), None);
        assert!(b.allow(2 * MS));
        assert_eq!(b.on_failure(2 * MS), Some(Transition::Opened));
        assert!(!b.allow(100 * MS));
        assert!(b.allow(252 * MS), "probe after the interval");
        assert!(!b.allow(253 * MS), "only one probe at a time");
        assert_eq!(b.on_failure(260 * MS), None);
        assert!(!b.allow(400 * MS));
        assert!(b.allow(510 * MS));
        assert_eq!(b.on_success(), Some(Transition::Closed));
        assert!(b.allow(511 * MS));
    }

    #[test]
    fn success_resets_the_failure_count() {
        let mut b = Breaker::new(2, Duration::from_millis(250));
        b.on_failure(0);
        assert_eq!(b.on_success(), None);
        assert_eq!(b.on_failure(MS), None);
        assert_eq!(b.on_failure(2 * MS), Some(Transition::Opened));
    }

    #[test]
    fn lost_probe_does_not_wedge_the_breaker() {
        let mut b = Breaker::new(1, Duration::from_millis(100));
        b.on_failure(0);
        assert!(b.allow(100 * MS));
        assert!(!b.allow(150 * MS));
        assert!(b.allow(200 * MS));
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let mut b = Breaker::new(1, Duration::from_millis(100));
        b.on_failure(0);
        assert!(b.allow(100 * MS));
        assert!(!b.allow(110 * MS), "the probe is in flight");
        b.probe_abandoned(100 * MS, 120 * MS);
        assert!(!b.allow(119 * MS), "not before the given time");
        assert!(b.allow(120 * MS), "then the next request probes");
        assert!(!b.allow(121 * MS));
        b.probe_abandoned(100 * MS, 130 * MS);
        assert!(
            !b.allow(130 * MS),
            "a stale probe leaves the current one alone"
        );
        b.on_failure(140 * MS);
        b.probe_abandoned(120 * MS, 150 * MS);
        assert!(!b.allow(150 * MS), "only a probe in flight is given up");
    }
}
