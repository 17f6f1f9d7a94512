//! Rate-limited logging of repeated events, such as refused connections: the first of a kind
//! is logged, the repeats within an interval are only counted, and the next one after it
//! logs a summary with that count.
//!
//! Separate and pure (time is the `now_us` passed in) because both the transport and the
//! driver refuse peers that may reconnect in a loop, and one rule, tested once, keeps such
//! a peer from flooding the log while still saying how often it happened.

use std::collections::HashMap;
use std::hash::Hash;

/// How often one kind of refusal from one address is logged at most (a minute).
pub const REFUSAL_LOG_EVERY_US: u64 = 60_000_000;

/// Kinds (keys) remembered at most; beyond it, events of new kinds are counted by their
/// callers' metrics but not logged, so a flood from many addresses cannot grow the map.
pub const MAX_LOGGED_KINDS: usize = 4096;

/// What to do with one event (see [`LogLimiter::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogVerdict {
    /// Log it: the first of its kind in an interval, nothing suppressed before it.
    Log,
    /// Log it with the number of events of its kind not logged since the last line.
    Summary {
        /// Events suppressed since the last line of this kind.
        suppressed: u64,
    },
    /// Do not log it (counted for the next summary, if its kind is remembered).
    Suppress,
}

#[derive(Debug, Clone, Copy)]
struct Logged {
    /// When the last line of this kind was logged.
    at_us: u64,
    suppressed: u64,
}

/// Decides, per kind of event, whether it is logged (see the module docs).
#[derive(Debug)]
pub struct LogLimiter<K> {
    every_us: u64,
    max_kinds: usize,
    logged: HashMap<K, Logged>,
}

impl<K: Hash + Eq> LogLimiter<K> {
    /// At most one line per kind per `every_us`, for at most `max_kinds` kinds at once.
    pub fn new(every_us: u64, max_kinds: usize) -> Self {
        Self {
            every_us,
            max_kinds,
            logged: HashMap::new(),
        }
    }

    /// The verdict for one event of `kind` at `now_us`.
    pub fn check(&mut self, kind: K, now_us: u64) -> LogVerdict {
        let every_us = self.every_us;
        if let Some(seen) = self.logged.get_mut(&kind) {
            if now_us < seen.at_us.saturating_add(every_us) {
                seen.suppressed = seen.suppressed.saturating_add(1);
                return LogVerdict::Suppress;
            }
            let suppressed = std::mem::take(&mut seen.suppressed);
            seen.at_us = now_us;
            return match suppressed {
                0 => LogVerdict::Log,
                suppressed => LogVerdict::Summary { suppressed },
            };
        }
        if self.logged.len() >= self.max_kinds {
            // Kinds whose interval is over would log their next event anyway; forgetting
            // them loses at most a pending summary's count.
            self.logged
                .retain(|_, seen| now_us < seen.at_us.saturating_add(every_us));
            if self.logged.len() >= self.max_kinds {
                return LogVerdict::Suppress;
            }
        }
        self.logged.insert(
            kind,
            Logged {
                at_us: now_us,
                suppressed: 0,
            },
        );
        LogVerdict::Log
    }

    /// Kinds remembered now.
    pub fn len(&self) -> usize {
        self.logged.len()
    }

    /// Whether no kind is remembered.
    pub fn is_empty(&self) -> bool {
        self.logged.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: u64 = 60_000_000;

    #[test]
    fn the_first_event_logs_repeats_are_counted_and_summarised_once_an_interval() {
        let mut log = LogLimiter::new(EVERY, 16);
        let t0 = 1_000;
        assert_eq!(log.check(("bad-hello", 1), t0), LogVerdict::Log);
        // A peer reconnecting in a loop: every repeat within the interval is silent.
        for i in 1..=100 {
            assert_eq!(
                log.check(("bad-hello", 1), t0 + i * 1_000),
                LogVerdict::Suppress
            );
        }
        // Another reason or another address is another kind: logged at once.
        assert_eq!(log.check(("no-hello", 1), t0 + 5), LogVerdict::Log);
        assert_eq!(log.check(("bad-hello", 2), t0 + 5), LogVerdict::Log);
        // Just before the interval ends: still silent.
        assert_eq!(
            log.check(("bad-hello", 1), t0 + EVERY - 1),
            LogVerdict::Suppress
        );
        // After it: one summary with everything suppressed since the first line.
        assert_eq!(
            log.check(("bad-hello", 1), t0 + EVERY),
            LogVerdict::Summary { suppressed: 101 }
        );
        assert_eq!(
            log.check(("bad-hello", 1), t0 + EVERY + 1),
            LogVerdict::Suppress
        );
        // A kind that went quiet for a whole interval logs plainly again.
        assert_eq!(log.check(("no-hello", 1), t0 + 3 * EVERY), LogVerdict::Log);
    }

    #[test]
    fn kinds_are_bounded_and_expired_ones_make_room() {
        let mut log = LogLimiter::new(EVERY, 2);
        assert_eq!(log.check(1, 0), LogVerdict::Log);
        assert_eq!(log.check(2, 0), LogVerdict::Log);
        // Full, nothing expired: a new kind is not logged and not remembered.
        assert_eq!(log.check(3, 1), LogVerdict::Suppress);
        assert_eq!(log.len(), 2);
        // Once the others' intervals are over, they are forgotten to make room.
        assert_eq!(log.check(3, EVERY), LogVerdict::Log);
        assert!(log.len() <= 2);
    }
}
