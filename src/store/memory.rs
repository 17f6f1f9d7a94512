//! Token buckets in process memory: the demo's embedded store, tests, and the `local`
//! fallback while Redis is down.
//!
//! # Why it looks like this
//!
//! - **Same math as Redis.** Every decision is [`bucket::decide_all`] on one stored integer per
//!   key (the TAT), so a bucket behaves identically here and in `bucket.lua`. Each shard is a
//!   pure [`LocalBuckets`] table, the same the limiter's `local` fallback uses.
//! - **Sharded locks.** Keys are spread over [`DEFAULT_SHARDS`] `std::sync::Mutex`es by hash,
//!   so unrelated requests on different cores rarely touch the same lock. The critical section
//!   is a few hash lookups and integer operations, so a blocking mutex (never held across an
//!   `.await`) is cheaper than an async one.
//! - **Atomic multi-bucket decisions without deadlocks.** One `acquire` locks every shard its
//!   keys live in, always in ascending shard order (each shard once), then reads the clock,
//!   decides all buckets and commits only if all admit. Two acquires sharing any shard are
//!   therefore serialized, and the fixed order rules out lock cycles.
//! - **Bounded memory.** A bucket whose TAT is not after `now` is full, and a full bucket is
//!   indistinguishable from an absent one, so such entries are dropped: on write (a TAT that
//!   is already full is removed instead of stored) and by an opportunistic sweep of the shard
//!   once it has seen as many operations as its last sweep kept entries (at least
//!   [`SWEEP_MIN_OPS`]). The sweep costs at most two entries per operation amortized and
//!   keeps each shard at most about twice its live entries. [`MemoryStore::sweep`] can also be called from a timer.
//! - **Injectable clock.** [`MemoryStore::new`] uses the process clock ([`crate::clock`],
//!   on `tokio::time::Instant`), so tests can drive it with Tokio's paused clock;
//!   [`MemoryStore::with_clock`] takes any microsecond clock for fully deterministic tests.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::future::BoxFuture;

use super::{BucketOutcome, BucketRequest, BucketStore, StoreError};
use crate::limit::bucket;
use crate::limit::local::LocalBuckets;
pub use crate::limit::local::SWEEP_MIN_OPS;

/// Lock shards of a store built by [`MemoryStore::new`]. A power of two well above the core
/// count keeps the chance that two concurrent requests collide on a shard small.
pub const DEFAULT_SHARDS: usize = 64;

/// Microseconds on a monotonic clock; only differences matter.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Token buckets kept in this process. Cheap to share behind an `Arc`.
pub struct MemoryStore {
    shards: Box<[Mutex<LocalBuckets>]>,
    hasher: RandomState,
    clock: Clock,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store on the process clock ([`crate::clock`], which a paused Tokio test clock
    /// drives).
    pub fn new() -> Self {
        Self::with_clock(crate::clock::now_us)
    }

    /// A store on `clock` (microseconds; must not go backwards, or buckets refill late).
    pub fn with_clock(clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self::build(DEFAULT_SHARDS, SWEEP_MIN_OPS, Arc::new(clock))
    }

    fn build(shards: usize, sweep_min_ops: u64, clock: Clock) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(LocalBuckets::with_sweep_min_ops(sweep_min_ops)))
                .collect(),
            hasher: RandomState::new(),
            clock,
        }
    }

    /// Buckets currently stored (not yet swept), for metrics and tests.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    /// Whether no bucket is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every full bucket now (forgetting a full bucket changes no decision).
    pub fn sweep(&self) {
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            // Read the clock under the lock so no acquire on this shard can be later.
            let now = (self.clock)();
            shard.sweep(now);
        }
    }

    fn shard_index(&self, key: &str) -> usize {
        // The modulo result is below `shards.len()`, so the cast back to usize is lossless.
        (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
    }

    /// The whole decision, synchronously: lock, decide, commit or not, unlock.
    fn acquire_now(&self, requests: &[BucketRequest]) -> Result<Vec<BucketOutcome>, StoreError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let shard_of: Vec<usize> = requests.iter().map(|r| self.shard_index(&r.key)).collect();
        let mut order = shard_of.clone();
        order.sort_unstable();
        order.dedup();
        // Ascending shard order, each shard once: no two acquires can wait on each other in
        // a cycle.
        let mut guards: Vec<MutexGuard<'_, LocalBuckets>> =
            order.iter().map(|&i| lock(&self.shards[i])).collect();
        let now = (self.clock)();
        // `order` is sorted and holds every entry of `shard_of`, so this is its position.
        let slot = |i: usize| order.partition_point(|&s| s < shard_of[i]);

        let refs: Vec<&BucketRequest> = requests.iter().collect();
        let decided = bucket::decide_all(&refs, |i| guards[slot(i)].tat(&requests[i].key), now)
            .map_err(|invalid| StoreError::Protocol(invalid.to_string()))?;
        // Later entries for a repeated key carry its final TAT, so apply in order.
        for &(i, tat) in &decided.commits {
            guards[slot(i)].set(&requests[i].key, tat, now);
        }
        for guard in &mut guards {
            guard.count_op(now);
        }
        Ok(decided.outcomes)
    }
}

/// A poisoned shard is still consistent: every critical section only assigns whole integers,
/// and nothing in it can panic, so the data is used as is.
fn lock(shard: &Mutex<LocalBuckets>) -> MutexGuard<'_, LocalBuckets> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BucketStore for MemoryStore {
    fn acquire(
        &self,
        requests: Vec<BucketRequest>,
    ) -> BoxFuture<'_, Result<Vec<BucketOutcome>, StoreError>> {
        // Decide when polled, not when called, so `now` is the time the caller awaits.
        Box::pin(async move { self.acquire_now(&requests) })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::bucket::BucketSpec;
    use futures_util::FutureExt;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    const SEC: u64 = 1_000_000;

    fn request(key: &str, spec: BucketSpec, cost: u64) -> BucketRequest {
        BucketRequest {
            key: key.to_owned(),
            spec,
            cost,
        }
    }

    /// A store on a clock the test moves by hand.
    fn manual(shards: usize, sweep_min_ops: u64) -> (MemoryStore, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_000 * SEC));
        let clock = now.clone();
        let store = MemoryStore::build(
            shards,
            sweep_min_ops,
            Arc::new(move || clock.load(Ordering::SeqCst)),
        );
        (store, now)
    }

    fn acquire(store: &MemoryStore, requests: &[BucketRequest]) -> Vec<BucketOutcome> {
        store
            .acquire(requests.to_vec())
            .now_or_never()
            .expect("the memory store answers without waiting")
            .expect("valid requests")
    }

    #[test]
    fn burst_then_rejection_then_refill() {
        let (store, now) = manual(4, SWEEP_MIN_OPS);
        let spec = BucketSpec::new(1, SEC, 3);
        let req = [request("k", spec, 1)];
        for expected in [2, 1, 0] {
            let [o] = acquire(&store, &req)[..] else {
                panic!("one outcome")
            };
            assert!(o.admitted);
            assert_eq!(o.remaining, expected);
        }
        let [o] = acquire(&store, &req)[..] else {
            panic!("one outcome")
        };
        assert!(!o.admitted);
        assert_eq!(
            (o.remaining, o.retry_after_us, o.next_token_us),
            (0, SEC, SEC)
        );
        now.fetch_add(SEC, Ordering::SeqCst);
        assert!(acquire(&store, &req)[0].admitted);
    }

    #[test]
    fn all_or_nothing_consumes_nothing_on_rejection() {
        let (store, _) = manual(4, SWEEP_MIN_OPS);
        let wide = BucketSpec::new(1, SEC, 5);
        let narrow = BucketSpec::new(1, SEC, 1);
        let both = [request("a", wide, 1), request("b", narrow, 1)];
        assert!(acquire(&store, &both).iter().all(|o| o.admitted));
        let second = acquire(&store, &both);
        assert!(second[0].admitted, "a had room");
        assert_eq!(second[0].remaining, 4, "a reports its untouched level");
        assert!(!second[1].admitted);
        let alone = acquire(&store, &[request("a", wide, 1)]);
        assert_eq!(
            alone[0].remaining, 3,
            "the rejected call took nothing from a"
        );
    }

    #[test]
    fn a_key_listed_twice_draws_twice() {
        let (store, _) = manual(4, SWEEP_MIN_OPS);
        let spec = BucketSpec::new(1, SEC, 3);
        let twice = [request("k", spec, 2), request("k", spec, 1)];
        let outcomes = acquire(&store, &twice);
        assert_eq!(
            outcomes.iter().map(|o| o.remaining).collect::<Vec<_>>(),
            [1, 0]
        );
        assert!(!acquire(&store, &[request("k", spec, 1)])[0].admitted);
    }

    #[test]
    fn zero_interval_is_an_error_not_a_panic() {
        let (store, _) = manual(4, SWEEP_MIN_OPS);
        let bad = BucketSpec {
            burst: 1,
            interval_us: 0,
        };
        let result = store
            .acquire(vec![request("k", bad, 1)])
            .now_or_never()
            .expect("ready");
        assert!(matches!(result, Err(StoreError::Protocol(_))));
        assert!(acquire(&store, &[]).is_empty());
    }

    #[test]
    fn full_buckets_are_swept() {
        let (store, now) = manual(1, 8);
        let spec = BucketSpec::new(1, SEC, 10);
        for i in 0..100 {
            acquire(&store, &[request(&format!("k{i}"), spec, 1)]);
        }
        assert!(store.len() >= 90, "live buckets are kept");
        // One token refills in a second; after that every bucket is full again.
        now.fetch_add(SEC, Ordering::SeqCst);
        // A sweep comes at the latest after as many operations as there are entries.
        for _ in 0..=100 {
            acquire(&store, &[request("other", spec, 0)]);
        }
        assert_eq!(store.len(), 0, "the sweep dropped every full bucket");

        acquire(&store, &[request("x", spec, 1)]);
        assert_eq!(store.len(), 1);
        now.fetch_add(SEC, Ordering::SeqCst);
        store.sweep();
        assert!(store.is_empty());
    }

    #[test]
    fn memory_stays_bounded_under_many_distinct_keys() {
        let (store, now) = manual(4, 16);
        let spec = BucketSpec::new(1, 1_000, 1); // full again 1 ms after a draw
        for i in 0..20_000u64 {
            now.fetch_add(100, Ordering::SeqCst);
            acquire(&store, &[request(&format!("k{i}"), spec, 1)]);
        }
        // Only the last ~10 keys are live; dead ones may linger until the next sweep.
        assert!(store.len() < 200, "{} entries kept", store.len());
    }

    #[test]
    fn concurrent_acquires_on_overlapping_keys_are_exact_and_do_not_deadlock() {
        let store = Arc::new(MemoryStore::with_clock(|| 5 * SEC)); // frozen: no refill
        let spec = BucketSpec::new(1, SEC, 500);
        let admitted = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                let admitted = admitted.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        // Alternate the listing order to provoke lock-order bugs.
                        let (first, second) = if (t + i) % 2 == 0 {
                            ("a", "b")
                        } else {
                            ("b", "a")
                        };
                        let reqs = [request(first, spec, 1), request(second, spec, 1)];
                        let out = store
                            .acquire(reqs.to_vec())
                            .now_or_never()
                            .expect("ready")
                            .expect("ok");
                        if out.iter().all(|o| o.admitted) {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("worker thread");
        }
        assert_eq!(admitted.load(Ordering::SeqCst), 500);
    }

    #[tokio::test(start_paused = true)]
    async fn default_clock_follows_tokio_time() {
        let store = MemoryStore::new();
        let spec = BucketSpec::new(1, SEC, 1);
        let req = [request("k", spec, 1)];
        assert!(store.acquire(req.to_vec()).await.expect("ok")[0].admitted);
        let rejected = store.acquire(req.to_vec()).await.expect("ok")[0];
        assert!(!rejected.admitted);
        assert_eq!(rejected.retry_after_us, SEC);
        tokio::time::advance(std::time::Duration::from_micros(SEC)).await;
        assert!(store.acquire(req.to_vec()).await.expect("ok")[0].admitted);
        assert_eq!(store.kind(), "memory");
    }

    /// The reference model: `decide` applied to each call's buckets in order, committed only
    /// when all admit.
    fn model(
        tats: &mut HashMap<String, u64>,
        requests: &[BucketRequest],
        now: u64,
    ) -> Vec<BucketOutcome> {
        let mut scratch = tats.clone();
        let decisions: Vec<_> = requests
            .iter()
            .map(|r| {
                let d = bucket::decide(
                    r.spec,
                    scratch.get(&r.key).copied().unwrap_or(0),
                    now,
                    r.cost,
                );
                if d.admitted {
                    scratch.insert(r.key.clone(), d.tat_us);
                }
                d
            })
            .collect();
        if decisions.iter().all(|d| d.admitted) {
            *tats = scratch;
            decisions
                .iter()
                .map(bucket::BucketDecision::outcome)
                .collect()
        } else {
            requests
                .iter()
                .zip(decisions)
                .map(|(r, d)| {
                    if d.admitted {
                        let level =
                            bucket::decide(r.spec, tats.get(&r.key).copied().unwrap_or(0), now, 0);
                        BucketOutcome {
                            admitted: true,
                            remaining: level.remaining,
                            next_token_us: level.next_token_us,
                            retry_after_us: 0,
                        }
                    } else {
                        d.outcome()
                    }
                })
                .collect()
        }
    }

    proptest! {
        /// The store (sharded, sweeping, all-or-nothing) agrees with `decide` applied
        /// sequentially, outcome for outcome.
        #[test]
        fn agrees_with_sequential_decide(
            specs in proptest::collection::vec((1u64..6, 1u64..200_000), 4),
            calls in proptest::collection::vec(
                (0u64..400_000, proptest::collection::vec((0usize..4, 0u64..8), 1..4)),
                1..120,
            ),
            shards in 1usize..4,
        ) {
            let (store, clock) = manual(shards, 2);
            let mut tats = HashMap::new();
            for (gap, picks) in calls {
                let now = clock.fetch_add(gap, Ordering::SeqCst) + gap;
                let requests: Vec<BucketRequest> = picks
                    .iter()
                    .map(|&(k, cost)| {
                        let (burst, interval_us) = specs[k];
                        request(&format!("k{k}"), BucketSpec { burst, interval_us }, cost)
                    })
                    .collect();
                let expected = model(&mut tats, &requests, now);
                prop_assert_eq!(acquire(&store, &requests), expected);
            }
        }
    }
}
