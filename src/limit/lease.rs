//! Leased tokens: a hot bucket's tokens taken from the store a few at a time.
//!
//! Without leases every admitted request costs a store round trip. For a key that sends many
//! requests while far from its limit, the gateway instead asks the store for the request's
//! cost *plus* a lease of `lease` tokens, all or nothing under the store's usual rules, and
//! serves the next requests on that key from the lease in process. Near the limit it stops
//! leasing, so refusals stay the store's own.
//!
//! # What it costs in accuracy
//!
//! Leased tokens are taken from the shared bucket *before* they are handed out, so the total
//! admitted never exceeds what the bucket allowed: leasing cannot over-admit overall. It moves
//! admissions in time and between gateways, by at most one lease per gateway and key:
//!
//! - in a sliding window, a key may see up to `lease` more admissions per gateway than the
//!   bucket's `burst + window × rate` (tokens leased before the window, used inside it);
//! - while a gateway holds unused leased tokens, another gateway sharing the bucket may
//!   refuse up to that many requests early; tokens unused for [`LEASE_TTL_US`] (the key went
//!   quiet) are dropped;
//! - the `RateLimit` headers of a lease-served request count from the store's last answer.
//!
//! Leasing starts only on a key seen again within [`LEASE_TTL_US`] whose bucket had at least
//! `cost + 2 × lease` tokens left; only one lease request per key is in flight at once (so
//! concurrent requests cannot each take a lease), and a gateway never holds more than one
//! lease of a key. The automatic size is 1/64 of the burst,
//! so the slack is stated relative to the bucket (within 1/64 of the burst per gateway), and
//! buckets under 64 tokens never lease and stay exact.
//!
//! Pure: no clock, no IO. Every call takes `now_us` on the caller's monotonic clock.

use std::collections::HashMap;

use super::bucket::BucketSpec;
use crate::limit::bucket::BucketOutcome;

/// Most keys remembered; past it, expired entries go, and if that is not enough, all do
/// (forgetting only costs store round trips and drops unused leased tokens).
pub const DEFAULT_CAPACITY: usize = 100_000;

/// How long leased tokens stay usable, and how long a key counts as hot after a store
/// answer.
pub const LEASE_TTL_US: u64 = 1_000_000;

/// The automatic lease is the burst divided by this.
pub const AUTO_BURST_DIVISOR: u64 = 64;

/// How long one lease request may be outstanding before another may be sent. The rate-limit
/// layer reports every answer and failure; only a request dropped mid-flight (its client went
/// away) never reports back. The store may still apply that one, so its lease request lapses
/// only after this long, not at once (a client disconnecting on purpose cannot take a lease
/// per request), and not later either (leasing is not blocked for long).
pub const ASK_TIMEOUT_US: u64 = 250_000;

/// A policy's lease setting (`lease` in its config section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaseSize {
    /// The bucket's burst / [`AUTO_BURST_DIVISOR`] (0, no leasing, under 64 tokens).
    #[default]
    Auto,
    /// At most this many tokens (0: never lease).
    Tokens(u64),
}

impl LeaseSize {
    /// Tokens one lease takes from a bucket of shape `spec`.
    pub fn tokens(self, spec: BucketSpec) -> u64 {
        match self {
            Self::Auto => spec.burst / AUTO_BURST_DIVISOR,
            Self::Tokens(tokens) => tokens,
        }
    }
}

/// What to do with one bucket of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// Served from the lease: no store call for this bucket.
    Served(BucketOutcome),
    /// Ask the store for the cost plus `extra` leased tokens (0: a plain request).
    Ask {
        /// Leased tokens on top of the cost (0: none). Above 0, the answer must be reported
        /// ([`Leases::answered`] or [`Leases::unanswered`]).
        extra: u64,
    },
}

/// What is known of one hot bucket.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Leased tokens not yet used.
    tokens: u64,
    /// Whole tokens the store reported left in its last admitting answer (leases excluded).
    store_remaining: u64,
    /// The store's `next_token_us` in that answer.
    next_token_us: u64,
    /// When the tokens lapse and the key stops counting as hot: [`LEASE_TTL_US`] after the
    /// key's last store answer or lease-served request, so a key that keeps sending, however
    /// slowly, uses every token it leased.
    expires_us: u64,
    /// The size of the last lease granted: tokens held never exceed it (a give-back racing a
    /// new grant must not stack two leases).
    cap: u64,
    /// Until when a lease request is outstanding (0: none).
    asking_until_us: u64,
}

/// Bucket key → its lease.
#[derive(Debug)]
pub struct Leases {
    entries: HashMap<Box<str>, Entry>,
    capacity: usize,
    ask_timeout_us: u64,
}

impl Default for Leases {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Leases {
    /// At most `capacity` keys.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
            ask_timeout_us: ASK_TIMEOUT_US,
        }
    }

    /// How long a lease request may stay unanswered before another may be sent (at least
    /// [`ASK_TIMEOUT_US`]): the caller's longest wait for the store, so that a slow store
    /// cannot have two lease requests of one key in flight.
    pub fn with_ask_timeout(mut self, ask_timeout_us: u64) -> Self {
        self.ask_timeout_us = ask_timeout_us.max(ASK_TIMEOUT_US);
        self
    }

    /// Forgets every lease (a reload changed the policies: tokens leased under the old
    /// shape go unused, which refuses more, never less). A lease request still in flight is
    /// answered into a fresh entry.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Takes `cost` from `bucket`'s lease if it holds enough; otherwise says what to ask the
    /// store for. An `Ask` with `extra > 0` must be followed by [`Leases::answered`] or
    /// [`Leases::unanswered`] (or the lease request lapses after the ask timeout).
    pub fn draw(&mut self, bucket: &str, cost: u64, lease: u64, now_us: u64) -> Draw {
        let Some(entry) = self.entries.get_mut(bucket) else {
            return Draw::Ask { extra: 0 };
        };
        if entry.expires_us <= now_us {
            entry.tokens = 0;
            return Draw::Ask { extra: 0 };
        }
        if entry.tokens >= cost {
            entry.tokens -= cost;
            entry.expires_us = now_us.saturating_add(LEASE_TTL_US);
            return Draw::Served(entry.view());
        }
        let hot_enough = lease > 0
            && entry.store_remaining >= cost.saturating_add(lease.saturating_mul(2))
            && entry.asking_until_us <= now_us;
        if hot_enough {
            entry.asking_until_us = now_us.saturating_add(self.ask_timeout_us);
            Draw::Ask { extra: lease }
        } else {
            Draw::Ask { extra: 0 }
        }
    }

    /// Puts back `cost` tokens drawn by a request that was not admitted after all (another of
    /// its buckets refused). Tokens that lapsed meanwhile stay lapsed, and no more than one
    /// lease is held: if a new lease came meanwhile, the excess is dropped (never admitting
    /// more is the safe side).
    pub fn give_back(&mut self, bucket: &str, cost: u64, now_us: u64) {
        if let Some(entry) = self.entries.get_mut(bucket)
            && entry.expires_us > now_us
        {
            entry.tokens = entry.tokens.saturating_add(cost).min(entry.cap);
        }
    }

    /// The store answered a request on `bucket` that asked for `extra` leased tokens on top
    /// of its cost. Returns the outcome to report for the request: an admission also grants
    /// the lease, and reports what the client has left counting it.
    pub fn answered(
        &mut self,
        bucket: &str,
        extra: u64,
        outcome: BucketOutcome,
        now_us: u64,
    ) -> BucketOutcome {
        if !outcome.admitted {
            // A refusal says the bucket is near empty: no leasing until an admission says
            // otherwise. Unused tokens stay (they were taken from the bucket already).
            if let Some(entry) = self.entries.get_mut(bucket) {
                entry.store_remaining = outcome.remaining;
                // Only the request that asked for the lease frees the slot: another's
                // answer says nothing of that request, still in flight.
                if extra > 0 {
                    entry.asking_until_us = 0;
                }
            }
            return outcome;
        }
        let entry = match self.entries.get_mut(bucket) {
            Some(entry) => entry,
            None => {
                self.make_room(now_us);
                self.entries.entry(bucket.into()).or_insert(Entry {
                    tokens: 0,
                    store_remaining: 0,
                    next_token_us: 0,
                    expires_us: 0,
                    cap: 0,
                    asking_until_us: 0,
                })
            }
        };
        if entry.expires_us <= now_us {
            entry.tokens = 0;
        }
        if extra > 0 {
            // A lease is asked for only when fewer than `cost` tokens were left; those few
            // are dropped so that one lease is all a gateway ever holds.
            entry.tokens = extra;
            entry.cap = extra;
        }
        entry.store_remaining = outcome.remaining;
        entry.next_token_us = outcome.next_token_us;
        entry.expires_us = now_us.saturating_add(LEASE_TTL_US);
        if extra > 0 {
            entry.asking_until_us = 0;
        }
        BucketOutcome {
            remaining: outcome.remaining.saturating_add(entry.tokens),
            ..outcome
        }
    }

    /// A lease request on `bucket` got no answer (the store failed): another may be sent.
    pub fn unanswered(&mut self, bucket: &str) {
        if let Some(entry) = self.entries.get_mut(bucket) {
            entry.asking_until_us = 0;
        }
    }

    /// Keys remembered (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Unused leased tokens on `bucket` at `now_us`.
    pub fn tokens(&self, bucket: &str, now_us: u64) -> u64 {
        self.entries
            .get(bucket)
            .filter(|entry| entry.expires_us > now_us)
            .map_or(0, |entry| entry.tokens)
    }

    fn make_room(&mut self, now_us: u64) {
        if self.entries.len() < self.capacity {
            return;
        }
        self.entries.retain(|_, entry| entry.expires_us > now_us);
        if self.entries.len() >= self.capacity {
            self.entries.clear();
        }
    }
}

impl Entry {
    /// What a lease-served request reports: the store's last count plus the lease left.
    fn view(&self) -> BucketOutcome {
        BucketOutcome {
            admitted: true,
            remaining: self.store_remaining.saturating_add(self.tokens),
            next_token_us: self.next_token_us,
            retry_after_us: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::bucket::{self, BucketSpec};
    use proptest::prelude::*;

    fn admitted(remaining: u64) -> BucketOutcome {
        BucketOutcome {
            admitted: true,
            remaining,
            next_token_us: 0,
            retry_after_us: 0,
        }
    }

    fn refused(remaining: u64) -> BucketOutcome {
        BucketOutcome {
            admitted: false,
            remaining,
            next_token_us: 10,
            retry_after_us: 10,
        }
    }

    #[test]
    fn auto_size_is_a_sixty_fourth_of_the_burst() {
        let spec = |burst| BucketSpec::new(burst, 1_000_000, burst);
        assert_eq!(LeaseSize::Auto.tokens(spec(63)), 0);
        assert_eq!(LeaseSize::Auto.tokens(spec(640)), 10);
        assert_eq!(LeaseSize::Auto.tokens(spec(1_000_000)), 15_625);
        assert_eq!(LeaseSize::Tokens(5).tokens(spec(10)), 5);
        assert_eq!(LeaseSize::Tokens(0).tokens(spec(1_000_000)), 0);
    }

    #[test]
    fn a_cold_key_asks_plainly_then_leases_once_hot() {
        let mut leases = Leases::default();
        assert_eq!(leases.draw("k", 1, 8, 0), Draw::Ask { extra: 0 });
        assert_eq!(leases.answered("k", 0, admitted(99), 0), admitted(99));
        // Seen again within the TTL, far from the limit: ask for a lease.
        assert_eq!(leases.draw("k", 1, 8, 10), Draw::Ask { extra: 8 });
        // Only one lease request in flight.
        assert_eq!(leases.draw("k", 1, 8, 11), Draw::Ask { extra: 0 });
        assert_eq!(leases.answered("k", 8, admitted(90), 12), admitted(98));
        for left in (0..8).rev() {
            assert_eq!(
                leases.draw("k", 1, 8, 13),
                Draw::Served(admitted(90 + left))
            );
        }
        assert_eq!(leases.draw("k", 1, 8, 14), Draw::Ask { extra: 8 });
    }

    #[test]
    fn no_lease_near_the_limit_or_after_a_refusal() {
        let mut leases = Leases::default();
        leases.answered("k", 0, admitted(16), 0);
        assert_eq!(leases.draw("k", 1, 8, 1), Draw::Ask { extra: 0 });
        leases.answered("k", 0, admitted(17), 2);
        assert_eq!(leases.draw("k", 1, 8, 3), Draw::Ask { extra: 8 });
        assert_eq!(leases.answered("k", 8, refused(3), 4), refused(3));
        assert_eq!(leases.draw("k", 1, 8, 5), Draw::Ask { extra: 0 });
    }

    #[test]
    fn only_the_lease_request_frees_its_slot() {
        let mut leases = Leases::default();
        leases.answered("k", 0, admitted(100), 0);
        assert_eq!(leases.draw("k", 1, 4, 1), Draw::Ask { extra: 4 });
        // Concurrent plain requests are answered first, admitted or refused.
        leases.answered("k", 0, admitted(99), 2);
        leases.answered("k", 0, refused(50), 3);
        assert_eq!(leases.draw("k", 1, 4, 4), Draw::Ask { extra: 0 });
        leases.answered("k", 4, admitted(90), 5);
        assert!(matches!(leases.draw("k", 1, 4, 6), Draw::Served(_)));
    }

    #[test]
    fn tokens_lapse_and_given_back_tokens_are_served_again() {
        let mut leases = Leases::default();
        leases.answered("k", 4, admitted(100), 0);
        assert!(matches!(leases.draw("k", 3, 4, 1), Draw::Served(_)));
        leases.give_back("k", 3, 2);
        assert_eq!(leases.tokens("k", 2), 4);
        // The TTL counts from the last use (the draw at 1).
        assert_eq!(leases.tokens("k", LEASE_TTL_US), 4);
        assert_eq!(leases.tokens("k", 1 + LEASE_TTL_US), 0);
        // Past the TTL the key is cold again: a plain ask.
        assert_eq!(
            leases.draw("k", 1, 4, 1 + LEASE_TTL_US),
            Draw::Ask { extra: 0 }
        );
        leases.give_back("k", 3, 1 + LEASE_TTL_US);
        assert_eq!(leases.tokens("k", 1 + LEASE_TTL_US), 0);
    }

    #[test]
    fn a_give_back_after_a_new_lease_holds_one_lease_at_most() {
        let mut leases = Leases::default();
        leases.answered("k", 0, admitted(1_000), 0);
        assert_eq!(leases.draw("k", 10, 10, 1), Draw::Ask { extra: 10 });
        leases.answered("k", 10, admitted(900), 2);
        // Request A draws the whole lease; B, meanwhile, gets the next one.
        assert!(matches!(leases.draw("k", 10, 10, 3), Draw::Served(_)));
        assert_eq!(leases.draw("k", 10, 10, 4), Draw::Ask { extra: 10 });
        leases.answered("k", 10, admitted(880), 5);
        // A is refused by another policy and gives its 10 back: still one lease held.
        leases.give_back("k", 10, 6);
        assert_eq!(leases.tokens("k", 6), 10);
    }

    #[test]
    fn a_slow_hot_key_uses_every_token_it_leases() {
        // 1,000 tokens, no refill to speak of, a request every half second: the lease of 15
        // outlives the TTL counted from its grant, but every use extends it.
        let spec = BucketSpec {
            burst: 1_000,
            interval_us: 1_000_000_000,
        };
        let lease = LeaseSize::Auto.tokens(spec);
        assert_eq!(lease, 15);
        let requests = vec![(500_000, 0); 1_001];
        let admitted_at = run(spec, lease, &mut [Leases::default()], &requests);
        assert_eq!(admitted_at.len(), 1_000);
    }

    #[test]
    fn an_unanswered_lease_request_frees_the_slot() {
        let mut leases = Leases::default();
        leases.answered("k", 0, admitted(100), 0);
        assert_eq!(leases.draw("k", 1, 4, 1), Draw::Ask { extra: 4 });
        assert_eq!(leases.draw("k", 1, 4, 2), Draw::Ask { extra: 0 });
        leases.unanswered("k");
        assert_eq!(leases.draw("k", 1, 4, 3), Draw::Ask { extra: 4 });
        // A waiter that never reported back blocks leasing only until the ask times out.
        assert_eq!(
            leases.draw("k", 1, 4, 3 + ASK_TIMEOUT_US),
            Draw::Ask { extra: 4 }
        );
    }

    #[test]
    fn stays_bounded() {
        let mut leases = Leases::with_capacity(10);
        for i in 0..100u64 {
            leases.answered(&format!("k{i}"), 1, admitted(100), i);
            assert!(leases.len() <= 10);
        }
    }

    /// Admission times of a run of requests, each sent to one of several gateways in front of
    /// one bucket (`tat`).
    fn run(
        spec: BucketSpec,
        lease: u64,
        gateways: &mut [Leases],
        requests: &[(u64, usize)],
    ) -> Vec<u64> {
        let mut tat = 0;
        let mut now = 0;
        let mut admitted_at = Vec::new();
        for &(gap, pick) in requests {
            now += gap;
            let leases = &mut gateways[pick % gateways.len()];
            let admitted = match leases.draw("k", 1, lease, now) {
                Draw::Served(_) => true,
                Draw::Ask { extra } => {
                    // As the rate-limit layer does: a refusal while asking for a lease is
                    // asked again without it.
                    let mut d = bucket::decide(spec, tat, now, 1 + extra);
                    let mut granted = extra;
                    if !d.admitted && extra > 0 {
                        d = bucket::decide(spec, tat, now, 1);
                        granted = 0;
                    }
                    tat = d.tat_us;
                    let outcome = BucketOutcome {
                        admitted: d.admitted,
                        remaining: d.remaining,
                        next_token_us: d.next_token_us,
                        retry_after_us: d.retry_after_us,
                    };
                    leases.answered("k", granted, outcome, now).admitted
                }
            };
            if admitted {
                admitted_at.push(now);
            }
        }
        admitted_at
    }

    #[test]
    fn a_lease_held_while_the_bucket_refills_adds_at_most_one_lease_to_a_burst() {
        let spec = BucketSpec {
            burst: 10,
            interval_us: 1_000,
        };
        let mut gateways = vec![Leases::default()];
        let mut requests = vec![(0, 0), (0, 0)];
        // 100 ms later the bucket is full again, and the lease of 2 is still held.
        requests.push((100_000, 0));
        requests.extend(std::iter::repeat_n((0, 0), 14));
        let admitted_at = run(spec, 2, &mut gateways, &requests);
        let burst_at_100ms = admitted_at.iter().filter(|&&t| t == 100_000).count();
        assert_eq!(burst_at_100ms, 10 + 2);
    }

    proptest! {
        /// Several gateways sharing one bucket: admissions in any window stay within the
        /// bucket's guarantee plus one lease per gateway.
        #[test]
        fn gateways_sharing_a_bucket_overshoot_a_window_by_at_most_one_lease_each(
            burst in 1u64..60,
            interval_us in 1u64..5_000,
            lease_setting in 0u64..10,
            gateway_count in 1usize..4,
            // Mostly bursts (gaps far below the refill interval), now and then a pause long
            // enough to refill the bucket while a lease is held.
            requests in proptest::collection::vec(
                (prop_oneof![4 => Just(0u64), 1 => 0u64..100_000], 0usize..4),
                1..400,
            ),
        ) {
            let spec = BucketSpec { burst, interval_us };
            let lease = LeaseSize::Tokens(lease_setting).tokens(spec);
            let mut gateways: Vec<Leases> = (0..gateway_count).map(|_| Leases::default()).collect();
            let admitted_at = run(spec, lease, &mut gateways, &requests);
            let slack = lease * gateway_count as u64;
            for (i, &start) in admitted_at.iter().enumerate() {
                for (count, &end) in (1u64..).zip(&admitted_at[i..]) {
                    let allowed = burst + (end - start) / interval_us + slack;
                    prop_assert!(
                        count <= allowed,
                        "{count} admitted in [{start}, {end}], allowed {allowed}"
                    );
                }
            }
        }
    }
}
