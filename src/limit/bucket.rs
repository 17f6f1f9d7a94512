//! Token-bucket math, as GCRA (the generic cell rate algorithm).
//!
//! A bucket of capacity `burst` refilled with one token every `interval_us` is fully described
//! by one number, the theoretical arrival time (TAT): the instant at which the bucket would be
//! full again. Admitting `cost` tokens moves the TAT forward by `cost * interval_us`, and is
//! allowed while the TAT stays within `burst * interval_us` of now. One integer per key, no
//! floating point, and the same formula runs in Redis's Lua script (`store/bucket.lua`), in
//! the in-memory store and in the `local` fallback, so all three agree to the microsecond.
//!
//! Pure: no clock. Every function takes `now_us`, microseconds on any monotonic or wall clock
//! (Redis `TIME` in Redis, a process-local monotonic clock in memory).
//!
//! The guarantee (property-tested below): in any interval of length `t`, at most
//! `burst + t / interval_us` tokens are admitted.

use std::borrow::Borrow;

/// The shape of one bucket: capacity and refill speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketSpec {
    /// Capacity in tokens; also the largest cost that can ever be admitted.
    pub burst: u64,
    /// Microseconds per token. Rounded up from `period / amount`, so rounding can only make
    /// the bucket slightly stricter, never looser.
    pub interval_us: u64,
}

impl BucketSpec {
    /// `amount` tokens per `period_us`, with capacity `burst`.
    pub fn new(amount: u64, period_us: u64, burst: u64) -> Self {
        Self {
            burst,
            interval_us: period_us.div_ceil(amount.max(1)).max(1),
        }
    }

    /// Microseconds for an empty bucket to fill: also the TTL that makes a stored bucket
    /// state disposable (once a bucket is full, forgetting it changes nothing).
    pub fn full_refill_us(&self) -> u64 {
        self.burst.saturating_mul(self.interval_us)
    }
}

/// Outcome of asking a bucket for `cost` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketDecision {
    /// Whether the `cost` tokens were taken; when `false`, nothing was and `retry_after_us`
    /// says when a retry can succeed.
    pub admitted: bool,
    /// Whole tokens left after this decision.
    pub remaining: u64,
    /// Microseconds until at least one more token is available (0 when full). This is the
    /// `t` of the `RateLimit` header: "until additional quota is made available".
    pub next_token_us: u64,
    /// When rejected: microseconds until `cost` tokens are available, so a retry after this
    /// long can succeed. `u64::MAX` if `cost > burst` (never).
    pub retry_after_us: u64,
    /// The new TAT to store (unchanged when rejected).
    pub tat_us: u64,
}

/// Decides whether `cost` tokens can be taken from a bucket whose stored TAT is `tat_us`
/// (0 or absent: full).
pub fn decide(spec: BucketSpec, tat_us: u64, now_us: u64, cost: u64) -> BucketDecision {
    let tat = tat_us.max(now_us);
    let capacity_us = spec.full_refill_us();
    let increment = cost.saturating_mul(spec.interval_us);
    let new_tat = tat.saturating_add(increment);
    if cost <= spec.burst && new_tat - now_us <= capacity_us {
        let (remaining, next) = level(spec, new_tat, now_us);
        BucketDecision {
            admitted: true,
            remaining,
            next_token_us: next,
            retry_after_us: 0,
            tat_us: new_tat,
        }
    } else {
        let (remaining, next) = level(spec, tat, now_us);
        let retry_after_us = if cost > spec.burst {
            u64::MAX
        } else {
            // new_tat - now_us > capacity_us here.
            (new_tat - now_us) - capacity_us
        };
        BucketDecision {
            admitted: false,
            remaining,
            next_token_us: next,
            retry_after_us,
            tat_us,
        }
    }
}

/// Puts `cost` tokens back (a refund after another policy rejected the request). Never lets
/// the bucket exceed full.
pub fn refund(spec: BucketSpec, tat_us: u64, now_us: u64, cost: u64) -> u64 {
    tat_us
        .saturating_sub(cost.saturating_mul(spec.interval_us))
        .max(now_us.min(tat_us))
}

/// Whole tokens available and microseconds until the next one, for a bucket at `tat`.
fn level(spec: BucketSpec, tat: u64, now_us: u64) -> (u64, u64) {
    let used_us = tat.saturating_sub(now_us);
    let free_us = spec.full_refill_us().saturating_sub(used_us);
    let remaining = free_us / spec.interval_us;
    let next = if remaining >= spec.burst {
        0
    } else {
        spec.interval_us - free_us % spec.interval_us
    };
    (remaining, next)
}

/// Several buckets decided together, all or nothing: what to answer and, only when every
/// bucket admitted, the TATs to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllOrNothing {
    /// One outcome per request, in order. A bucket that had room while another refused reports
    /// its level untouched (admitted, nothing taken).
    pub outcomes: Vec<BucketOutcome>,
    /// (request index, new TAT) to store, in order (a key listed twice: the later entry is its
    /// final TAT). Empty unless every bucket admitted.
    pub commits: Vec<(usize, u64)>,
}

/// A bucket whose spec cannot be decided (a refill interval of 0 would divide by zero).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bucket {key:?} has interval_us 0 (build specs with BucketSpec::new)")]
pub struct InvalidSpec {
    /// The bucket's storage key.
    pub key: String,
}

/// Decides `requests` together at `now_us`, all or nothing, with `stored(i)` the TAT stored
/// for request `i`'s key (0: full). A key listed twice sees its own earlier draw. The same
/// decision as `bucket.lua`'s, so memory, the `local` fallback and Redis agree.
pub fn decide_all<R: Borrow<BucketRequest>>(
    requests: &[R],
    stored: impl Fn(usize) -> u64,
    now_us: u64,
) -> Result<AllOrNothing, InvalidSpec> {
    if let Some(bad) = requests
        .iter()
        .map(Borrow::borrow)
        .find(|r| r.spec.interval_us == 0)
    {
        return Err(InvalidSpec {
            key: bad.key.clone(),
        });
    }
    let mut commits: Vec<(usize, u64)> = Vec::with_capacity(requests.len());
    let mut decisions = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().map(Borrow::borrow).enumerate() {
        let before = stored(i);
        let current = commits
            .iter()
            .rev()
            .find(|(j, _)| {
                requests
                    .get(*j)
                    .is_some_and(|r| r.borrow().key == request.key)
            })
            .map_or(before, |&(_, tat)| tat);
        let decision = decide(request.spec, current, now_us, request.cost);
        if decision.admitted {
            commits.push((i, decision.tat_us));
        }
        decisions.push((before, decision));
    }
    let all_admitted = decisions.iter().all(|(_, d)| d.admitted);
    let outcomes = requests
        .iter()
        .map(Borrow::borrow)
        .zip(decisions)
        .map(|(request, (before, decision))| {
            if all_admitted || !decision.admitted {
                decision.outcome()
            } else {
                // This bucket had room but nothing was taken: its level as it is (a cost-0
                // decision reports exactly that level).
                BucketOutcome {
                    admitted: true,
                    retry_after_us: 0,
                    ..decide(request.spec, before, now_us, 0).outcome()
                }
            }
        })
        .collect();
    if !all_admitted {
        commits.clear();
    }
    Ok(AllOrNothing { outcomes, commits })
}

impl BucketDecision {
    /// What a caller is told of this decision (the TAT stays with the store).
    pub fn outcome(&self) -> BucketOutcome {
        BucketOutcome {
            admitted: self.admitted,
            remaining: self.remaining,
            next_token_us: self.next_token_us,
            retry_after_us: self.retry_after_us,
        }
    }
}

/// One bucket a request must draw from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketRequest {
    /// Full storage key, e.g. `tollgate:rl:{ip:203.0.113.7}:per-client`. The part in braces
    /// is the Redis Cluster hash tag: buckets with the same tag live in the same slot and are
    /// decided by one script atomically.
    pub key: String,
    /// Capacity and refill of the bucket the key names.
    pub spec: BucketSpec,
    /// Tokens this request takes.
    pub cost: u64,
}

impl BucketRequest {
    /// The hash tag (the text between the first `{` and the next `}`), or the whole key.
    pub fn hash_tag(&self) -> &str {
        hash_tag(&self.key)
    }
}

/// Redis Cluster's hash-tag rule.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// What a store answered for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketOutcome {
    /// Whether the request's `cost` was taken.
    pub admitted: bool,
    /// Whole tokens left (after this request if admitted).
    pub remaining: u64,
    /// Microseconds until at least one more token is available (0 when full).
    pub next_token_us: u64,
    /// When rejected: microseconds until the cost fits (`u64::MAX`: never, cost > burst).
    pub retry_after_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000;

    #[test]
    fn burst_then_refill() {
        let spec = BucketSpec::new(10, 10 * SEC, 3); // 1 token/s, burst 3
        let mut tat = 0;
        let now = 1_000 * SEC;
        for expected_remaining in [2, 1, 0] {
            let d = decide(spec, tat, now, 1);
            assert!(d.admitted);
            assert_eq!(d.remaining, expected_remaining);
            tat = d.tat_us;
        }
        let rejected = decide(spec, tat, now, 1);
        assert!(!rejected.admitted);
        assert_eq!(rejected.remaining, 0);
        assert_eq!(rejected.retry_after_us, SEC);
        assert_eq!(rejected.next_token_us, SEC);
        assert_eq!(rejected.tat_us, tat, "a rejection consumes nothing");
        let later = decide(spec, tat, now + SEC, 1);
        assert!(later.admitted);
    }

    #[test]
    fn full_bucket_reports_no_wait() {
        let spec = BucketSpec::new(1, SEC, 5);
        let d = decide(spec, 0, 10 * SEC, 0);
        assert!(d.admitted);
        assert_eq!((d.remaining, d.next_token_us), (5, 0));
    }

    #[test]
    fn cost_above_burst_is_never_admitted() {
        let spec = BucketSpec::new(100, SEC, 10);
        let d = decide(spec, 0, 5 * SEC, 11);
        assert!(!d.admitted);
        assert_eq!(d.retry_after_us, u64::MAX);
        assert_eq!(d.remaining, 10);
    }

    #[test]
    fn refund_restores_but_never_overfills() {
        let spec = BucketSpec::new(1, SEC, 2);
        let now = 100 * SEC;
        let taken = decide(spec, 0, now, 2);
        let restored = refund(spec, taken.tat_us, now, 2);
        assert_eq!(decide(spec, restored, now, 0).remaining, 2);
        let over = refund(spec, restored, now, 5);
        assert_eq!(decide(spec, over, now, 0).remaining, 2);
    }

    #[test]
    fn interval_rounds_up() {
        assert_eq!(BucketSpec::new(3, 10, 1).interval_us, 4);
        assert_eq!(BucketSpec::new(0, 10, 1).interval_us, 10);
    }

    proptest! {
        /// Never more than burst + t/interval admitted in any window of length t.
        #[test]
        fn never_admits_more_than_burst_plus_rate_times_t(
            amount in 1u64..50,
            period_ms in 1u64..5_000,
            burst in 1u64..20,
            steps in proptest::collection::vec((0u64..300_000, 1u64..4), 1..200),
        ) {
            let spec = BucketSpec::new(amount, period_ms * 1000, burst);
            let mut now = 1_000_000_000u64;
            let mut tat = 0;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (gap, cost) in steps {
                now += gap;
                let d = decide(spec, tat, now, cost);
                if d.admitted {
                    tat = d.tat_us;
                    admitted.push((now, cost));
                }
            }
            for (i, &(start, _)) in admitted.iter().enumerate() {
                let mut total = 0;
                for &(at, cost) in &admitted[i..] {
                    total += cost;
                    let t = at - start;
                    prop_assert!(
                        total <= burst + t / spec.interval_us,
                        "{total} tokens in {t}us with burst {burst}, interval {}", spec.interval_us
                    );
                }
            }
        }

        /// A cost above the burst can never be admitted, whatever the bucket's state, and the
        /// rejection says so (retry never) instead of suggesting a wait.
        #[test]
        fn cost_above_burst_is_always_rejected(
            burst in 1u64..100,
            extra in 1u64..100,
            interval in 1u64..1_000_000,
            tat_offset in 0u64..10_000_000,
            now in 0u64..1_000_000_000,
        ) {
            let spec = BucketSpec { burst, interval_us: interval };
            let d = decide(spec, now.saturating_sub(tat_offset), now, burst + extra);
            prop_assert!(!d.admitted);
            prop_assert_eq!(d.retry_after_us, u64::MAX);
        }

        /// A rejection's retry-after is honest: waiting that long admits the same cost.
        #[test]
        fn retry_after_is_sufficient_and_not_early(
            burst in 1u64..20,
            interval in 1u64..1_000_000,
            used in 0u64..40,
            cost in 1u64..20,
        ) {
            let spec = BucketSpec { burst, interval_us: interval };
            let now = 10_000_000_000u64;
            let tat = now + used.min(burst) * interval;
            let d = decide(spec, tat, now, cost);
            if !d.admitted && cost <= burst {
                prop_assert!(decide(spec, tat, now + d.retry_after_us, cost).admitted);
                prop_assert!(!decide(spec, tat, now + d.retry_after_us - 1, cost).admitted);
                prop_assert!(d.retry_after_us >= d.next_token_us || d.remaining >= cost);
            }
        }
    }
}
