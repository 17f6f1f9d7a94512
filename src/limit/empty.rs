//! Buckets known to be empty: the cheap 429.
//!
//! When the store refuses a bucket it says when the request's cost will fit again. Until
//! then every request on that bucket is refused too: other gateways sharing the bucket can
//! only spend more of it, never refill it sooner, so remembering "empty until T" locally is
//! exact (a refusal it gives is one the store would give), and a client hammering past its
//! limit costs a hash lookup instead of a store round trip. The one slack is the store's
//! answer time: T is counted from when the answer arrived, so a bucket may be refused locally
//! for up to one round trip (well under a millisecond) after it could admit again.

use std::collections::HashMap;

/// Most buckets remembered; past it, expired entries go, and if that is not enough, all do
/// (forgetting only costs store round trips, never a wrong answer).
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Bucket key → the instant (µs on the caller's clock) before which it cannot admit.
#[derive(Debug)]
pub struct EmptyBuckets {
    until: HashMap<Box<str>, u64>,
    capacity: usize,
}

impl Default for EmptyBuckets {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl EmptyBuckets {
    /// A cache of at most `capacity` buckets.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            until: HashMap::new(),
            capacity,
        }
    }

    /// Forgets every bucket (a reload changed the policies, and with them the refill rates).
    pub fn clear(&mut self) {
        self.until.clear();
    }

    /// Microseconds until `bucket` may admit, if it is known to be empty at `now_us`.
    pub fn refused_for(&self, bucket: &str, now_us: u64) -> Option<u64> {
        let until = *self.until.get(bucket)?;
        (until > now_us).then(|| until - now_us)
    }

    /// The store refused `bucket` at `now_us`; its cost fits again `retry_after_us` later
    /// (`u64::MAX`: never, the cost is above the burst, which is not remembered: that request
    /// is refused by its cost alone).
    pub fn note_refused(&mut self, bucket: &str, retry_after_us: u64, now_us: u64) {
        if retry_after_us == 0 || retry_after_us == u64::MAX {
            return;
        }
        if self.until.len() >= self.capacity {
            self.until.retain(|_, until| *until > now_us);
            if self.until.len() >= self.capacity {
                self.until.clear();
            }
        }
        let until = now_us.saturating_add(retry_after_us);
        match self.until.get_mut(bucket) {
            Some(known) => *known = (*known).max(until),
            None => {
                self.until.insert(bucket.into(), until);
            }
        }
    }

    /// Buckets remembered (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_until_the_cost_fits_then_forgets() {
        let mut e = EmptyBuckets::default();
        assert_eq!(e.refused_for("a", 0), None);
        e.note_refused("a", 500, 1_000);
        assert_eq!(e.refused_for("a", 1_000), Some(500));
        assert_eq!(e.refused_for("a", 1_499), Some(1));
        assert_eq!(e.refused_for("a", 1_500), None);
        assert_eq!(e.refused_for("b", 1_000), None);
    }

    #[test]
    fn keeps_the_later_instant_and_ignores_never() {
        let mut e = EmptyBuckets::default();
        e.note_refused("a", 500, 0);
        e.note_refused("a", 100, 0);
        assert_eq!(e.refused_for("a", 0), Some(500));
        e.note_refused("b", u64::MAX, 0);
        e.note_refused("c", 0, 0);
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn stays_bounded() {
        let mut e = EmptyBuckets::with_capacity(10);
        for i in 0..100u64 {
            e.note_refused(&format!("k{i}"), 1_000_000, i);
            assert!(e.len() <= 10);
        }
        // Expired entries are swept before live ones are dropped.
        let mut e = EmptyBuckets::with_capacity(2);
        e.note_refused("old", 1, 0);
        e.note_refused("live", 1_000, 0);
        e.note_refused("new", 1_000, 10);
        assert_eq!(e.refused_for("live", 10), Some(990));
        assert_eq!(e.refused_for("new", 10), Some(1_000));
    }
}
