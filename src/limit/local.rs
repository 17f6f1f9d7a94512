//! Token buckets held in process: one TAT per key, the same all-or-nothing decision as Redis
//! ([`bucket::decide_all`]). The `local` fallback of the limiter while the store fails, and
//! each shard of the memory store.
//!
//! Bounded: a bucket whose TAT is not after `now` is full, and a full bucket is the same as an
//! absent one, so such entries are dropped on write and by a sweep once the table has seen as
//! many operations as its last sweep kept entries (at least `sweep_min_ops`). A sweep costs at
//! most two entries per operation amortized and keeps the table at most about twice its live
//! entries.
//!
//! Pure: no clock, no IO. Every call takes `now_us`.

use std::borrow::Borrow;
use std::collections::HashMap;

use super::bucket::{self, BucketOutcome, BucketRequest, InvalidSpec};

/// The table is swept after at least this many operations (and at least as many as its last
/// sweep kept entries), so a small table is not rescanned on every request.
pub const SWEEP_MIN_OPS: u64 = 1024;

/// Key → TAT, for buckets that are not full.
#[derive(Debug)]
pub struct LocalBuckets {
    tats: HashMap<String, u64>,
    ops_since_sweep: u64,
    /// Entries left by the last sweep (all of them live then).
    kept_by_last_sweep: u64,
    sweep_min_ops: u64,
}

impl Default for LocalBuckets {
    fn default() -> Self {
        Self::with_sweep_min_ops(SWEEP_MIN_OPS)
    }
}

impl LocalBuckets {
    /// A table swept after at least `sweep_min_ops` operations.
    pub fn with_sweep_min_ops(sweep_min_ops: u64) -> Self {
        Self {
            tats: HashMap::new(),
            ops_since_sweep: 0,
            kept_by_last_sweep: 0,
            sweep_min_ops,
        }
    }

    /// Decides `requests` together, all or nothing, and stores what they took.
    pub fn acquire<R: Borrow<BucketRequest>>(
        &mut self,
        requests: &[R],
        now_us: u64,
    ) -> Result<Vec<BucketOutcome>, InvalidSpec> {
        let decided = bucket::decide_all(
            requests,
            |i| requests.get(i).map_or(0, |r| self.tat(&r.borrow().key)),
            now_us,
        )?;
        for &(i, tat) in &decided.commits {
            if let Some(request) = requests.get(i) {
                self.set(&request.borrow().key, tat, now_us);
            }
        }
        self.count_op(now_us);
        Ok(decided.outcomes)
    }

    /// The TAT stored for `key` (0: full).
    pub fn tat(&self, key: &str) -> u64 {
        self.tats.get(key).copied().unwrap_or(0)
    }

    /// Stores `key`'s new TAT, or forgets the key if that TAT means full at `now_us`.
    pub fn set(&mut self, key: &str, tat_us: u64, now_us: u64) {
        if tat_us > now_us {
            match self.tats.get_mut(key) {
                Some(stored) => *stored = tat_us,
                None => {
                    self.tats.insert(key.to_owned(), tat_us);
                }
            }
        } else {
            self.tats.remove(key);
        }
    }

    /// Counts one operation, and sweeps once there were as many since the last sweep as it
    /// kept entries (at least `sweep_min_ops`). Each operation adds at most one entry per
    /// bucket, so the sweep's cost is paid for by the operations before it.
    pub fn count_op(&mut self, now_us: u64) {
        self.ops_since_sweep += 1;
        if self.ops_since_sweep >= self.sweep_min_ops.max(self.kept_by_last_sweep) {
            self.sweep(now_us);
        }
    }

    /// Drops every full bucket now (forgetting a full bucket changes no decision).
    pub fn sweep(&mut self, now_us: u64) {
        self.tats.retain(|_, tat| *tat > now_us);
        self.ops_since_sweep = 0;
        self.kept_by_last_sweep = self.tats.len() as u64;
    }

    /// Buckets stored (not yet swept).
    pub fn len(&self) -> usize {
        self.tats.len()
    }

    /// Whether no bucket is stored.
    pub fn is_empty(&self) -> bool {
        self.tats.is_empty()
    }
}
