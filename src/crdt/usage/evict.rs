//! What the table does at its key cap ([`super::UsageLimits::max_keys`]): make room.
//!
//! Refusing new keys at the cap fails closed (every new client refused until GC frees
//! room), so the table evicts instead, in the order in which keys stop counting: the key
//! whose newest cell is released first (by [`WindowSpec::release_at_us`]) goes first.
//!
//! - A key whose every cell is already released counts nothing here: evicting it costs no
//!   accuracy (peers whose clocks lag ours may still count it, but they have it from its
//!   writers). Such keys are evicted for anyone.
//! - When every key is live, a local admission (a new client here) still evicts the key
//!   that stops counting soonest: the least recently admitted key, whose live usage is
//!   forgotten. That *under-counts* that key: its client may be admitted again, by at most
//!   what it had live (at most its quota) in what remains of its window (at most `w`). The
//!   table's memory is the hard bound, and a full table of live keys means more clients than
//!   it was sized for; counted in [`EvictionReport::live`] so that it shows.
//! - A peer's delta never evicts a live key: otherwise a peer flooding new keys could make
//!   us forget genuine live usage, an under-count it causes. Its new keys are refused
//!   instead (counted as refused) until a key expires or a local admission makes room.
//!
//! Finding the next key to evict costs a sweep over the table, so a sweep also drops every
//! released key it meets and remembers the earliest-releasing live keys as candidates
//! (validated again when used: a key admitted since is skipped), and when no key had expired
//! it remembers when the first one will: before that (and within 100 ms of a sweep), merges at
//! the cap do not sweep.

use std::collections::BinaryHeap;

use super::super::window::WindowSpec;
use super::{KeyUsage, PolicyId, UsageTable};

/// Fewest candidates a sweep remembers; more for larger tables (a thousandth of the cap), so
/// that a table full of live keys sweeps once per that many evictions.
const MIN_CANDIDATES: usize = 64;
/// Most candidates a sweep remembers (their keys are copied).
const MAX_CANDIDATES: usize = 4096;
/// Least time between two sweeps started by merges: a peer's deltas at the cap must not
/// make every merge walk the whole table while keys expire one by one.
const MERGE_SWEEP_GAP_US: u64 = 100_000;

/// What eviction did since the table was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictionReport {
    /// Keys evicted whose cells were all released (no accuracy lost).
    pub expired: u64,
    /// Keys evicted with live usage, to admit a new local key (each an under-count).
    pub live: u64,
    /// Sweeps over the whole table.
    pub sweeps: u64,
}

/// Eviction state: candidates from the last sweep and what it learnt.
#[derive(Debug, Clone, Default)]
pub(super) struct Eviction {
    /// `(release instant, policy, key)`, latest release first: `pop` gives the earliest.
    candidates: Vec<(u64, PolicyId, Box<str>)>,
    /// Merges do not sweep before this instant: no key is released before it (a lower bound
    /// from the last sweep, keys only grow newer), or the last sweep was too recent.
    merge_sweep_after_us: u64,
    pub(super) report: EvictionReport,
}

impl Eviction {
    /// Forgets the candidates (after GC or a policy change: they may be gone).
    pub(super) fn clear(&mut self) {
        self.candidates = Vec::new();
        self.merge_sweep_after_us = 0;
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.candidates.capacity() * size_of::<(u64, PolicyId, Box<str>)>()
            + self.candidates.iter().map(|c| c.2.len()).sum::<usize>()
    }
}

/// The instant from which nothing of `ku` counts any more (0 for a key without cells).
pub(super) fn released_at(spec: &WindowSpec, ku: &KeyUsage) -> u64 {
    ku.cells
        .iter()
        .map(|c| ku.sub(c))
        .max()
        .map_or(0, |sub| spec.release_at_us(sub))
}

impl UsageTable {
    /// Frees room for one new key at `now_us`; `allow_live` lets it evict a key with live
    /// usage (local admissions only, see the module docs). Returns whether there is room.
    pub(super) fn make_room(&mut self, now_us: u64, allow_live: bool) -> bool {
        let mut swept = false;
        loop {
            if self.key_count < self.limits.max_keys {
                return true;
            }
            while let Some((release, policy, key)) = self.eviction.candidates.pop() {
                let Some(pol) = self.policies.get_mut(&policy) else {
                    continue;
                };
                let Some(ku) = pol.keys.get(&key) else {
                    continue;
                };
                let now_release = released_at(&pol.policy.spec, ku);
                if now_release > release {
                    // Admitted since the sweep: no longer among the first to go.
                    continue;
                }
                let live = now_release > now_us;
                if live && !allow_live {
                    self.eviction.candidates.push((release, policy, key));
                    break;
                }
                if let Some(ku) = pol.keys.remove(&key) {
                    for c in ku.cells.iter() {
                        self.writers.drop_cell(c.actor);
                    }
                    self.key_count -= 1;
                    if live {
                        self.eviction.report.live += 1;
                    } else {
                        self.eviction.report.expired += 1;
                    }
                    return true;
                }
            }
            if swept || (!allow_live && now_us < self.eviction.merge_sweep_after_us) {
                return false;
            }
            self.sweep(now_us);
            swept = true;
        }
    }

    /// Drops every released key and remembers the earliest-releasing live ones.
    fn sweep(&mut self, now_us: u64) {
        let keep = (self.limits.max_keys / 1000).clamp(MIN_CANDIDATES, MAX_CANDIDATES);
        let mut heap: BinaryHeap<(u64, PolicyId, Box<str>)> = BinaryHeap::new();
        let mut earliest = u64::MAX;
        let mut dropped = 0usize;
        let writers = &mut self.writers;
        for (&policy, pol) in self.policies.iter_mut() {
            let spec = pol.policy.spec;
            pol.keys.retain(|key, ku| {
                let release = released_at(&spec, ku);
                if release <= now_us {
                    for c in ku.cells.iter() {
                        writers.drop_cell(c.actor);
                    }
                    dropped += 1;
                    return false;
                }
                earliest = earliest.min(release);
                if heap.len() < keep {
                    heap.push((release, policy, key.clone()));
                } else if heap.peek().is_some_and(|top| release < top.0) {
                    heap.pop();
                    heap.push((release, policy, key.clone()));
                }
                true
            });
        }
        self.key_count -= dropped;
        self.eviction.report.expired += dropped as u64;
        self.eviction.report.sweeps += 1;
        let mut candidates = heap.into_sorted_vec();
        candidates.reverse();
        self.eviction.candidates = candidates;
        self.eviction.merge_sweep_after_us =
            earliest.max(now_us.saturating_add(MERGE_SWEEP_GAP_US));
    }
}
