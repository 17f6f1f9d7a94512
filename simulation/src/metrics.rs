//! What a run is judged by, and the bounds of the issue.

use std::collections::BTreeMap;

use crate::net::{MAX_RTT_US, N_REGIONS};
use crate::scenario::{Kind, LIMIT, WINDOW_US};
use crate::world::{Admission, gossip_config};

/// The largest number of admissions of one key in any closed interval of length `window_us`
/// (sliding: every admission starts a candidate interval), over all keys.
pub fn max_in_window(admissions: &[Admission], window_us: u64) -> u64 {
    let mut by_key: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for a in admissions {
        by_key.entry(a.key).or_default().push(a.at_us);
    }
    let mut best = 0u64;
    for times in by_key.values_mut() {
        times.sort_unstable();
        let mut lo = 0usize;
        for hi in 0..times.len() {
            while times[hi] - times[lo] > window_us {
                lo += 1;
            }
            best = best.max((hi - lo + 1) as u64);
        }
    }
    best
}

/// Over-admission as a percentage of the limit: `(max_in_window − q) / q`, 0 when never above.
pub fn over_admission_pct(max_in_window: u64, limit: u64) -> f64 {
    max_in_window.saturating_sub(limit) as f64 * 100.0 / limit.max(1) as f64
}

/// False rejections as a percentage of what the exact reference admitted (negative when the
/// mode admitted more).
pub fn false_reject_pct(reference: u64, admitted: u64) -> f64 {
    if reference == 0 {
        return 0.0;
    }
    (reference as f64 - admitted as f64) * 100.0 / reference as f64
}

/// The convergence bound after a heal: 3 × gossip interval + the largest round trip
/// + the reconnect backoff cap + a handshake (one more largest round trip: the dial and the
///   `Hello` exchange overlap, see the README).
pub fn convergence_bound_us() -> u64 {
    let c = gossip_config();
    3 * c.interval_us + MAX_RTT_US + c.backoff_cap_us + MAX_RTT_US
}

/// The bound on eventual-mode over-admission for a scenario kind, in percent, if any.
pub fn eventual_over_bound_pct(kind: Kind) -> Option<f64> {
    match kind {
        Kind::Steady | Kind::Attacker => Some(1.0),
        Kind::Partition(_) => Some(5.0),
        _ => None,
    }
}

/// The bound on strict-mode false rejections for a scenario kind, in percent, if any.
pub fn strict_false_reject_bound_pct(kind: Kind) -> Option<f64> {
    matches!(kind, Kind::Steady).then_some(2.0)
}

/// What `none` is expected to allow at most: every region its own full limit.
pub fn none_ceiling() -> u64 {
    LIMIT * N_REGIONS as u64
}

/// The window length over-admission is measured on.
pub fn window_us() -> u64 {
    WINDOW_US
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(at_us: u64, key: u32) -> Admission {
        Admission {
            at_us,
            region: 0,
            key,
        }
    }

    #[test]
    fn sliding_count_includes_both_ends_of_the_interval() {
        let a = [adm(0, 0), adm(5, 0), adm(10, 0), adm(11, 0)];
        assert_eq!(max_in_window(&a, 10), 3);
        assert_eq!(max_in_window(&a, 11), 4);
    }

    #[test]
    fn keys_are_counted_apart() {
        let a = [adm(0, 0), adm(1, 1), adm(2, 0), adm(3, 1), adm(4, 1)];
        assert_eq!(max_in_window(&a, 100), 3);
    }

    #[test]
    fn percentages() {
        assert_eq!(over_admission_pct(190, 200), 0.0);
        assert_eq!(over_admission_pct(210, 200), 5.0);
        assert_eq!(false_reject_pct(200, 196), 2.0);
        assert_eq!(false_reject_pct(0, 5), 0.0);
    }
}
