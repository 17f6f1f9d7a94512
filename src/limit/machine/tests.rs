//! The limiter machine against an in-process store ([`LocalBuckets`], the same decision as
//! Redis), with the request cancelled at every point where the shell awaits.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::limit::lease::LeaseSize;
use crate::limit::policy::{KeySource, Limit, Policy, Scope};
use crate::limit::rate::Rate;

const MS: u64 = 1_000;

fn policy(name: &str, burst: u64, lease: LeaseSize, on_store_error: OnStoreError) -> Policy {
    Policy {
        name: name.into(),
        routes: vec![],
        methods: vec![],
        key: vec![KeySource::Ip],
        limit: Limit {
            rate: Rate {
                amount: burst,
                period: Duration::from_secs(10),
            },
            burst,
        },
        tiers: BTreeMap::new(),
        cost: 1,
        scope: Scope::Region,
        regional: None,
        sub_windows: 10,
        local_reserve: 0,
        on_store_error,
        legacy_headers: false,
        lease,
    }
}

fn applied<'p>(policy: &'p Policy, key: &str) -> Applied<'p> {
    Applied {
        policy,
        limit: policy.limit,
        tier: None,
        key: key.to_owned(),
        bucket: BucketRequest {
            key: crate::limit::policy::bucket_key(&policy.name, key),
            spec: policy.limit.spec(),
            cost: policy.cost,
        },
    }
}

fn limiter() -> Limiter {
    Limiter::new(Breaker::new(2, Duration::from_millis(100)), 0)
}

/// The region's store, as the shell would call it.
struct Store {
    buckets: LocalBuckets,
    up: bool,
    /// Tokens it handed out per bucket key (costs and leases of admitted requests).
    granted: HashMap<String, u64>,
}

impl Store {
    fn new() -> Self {
        Self {
            buckets: LocalBuckets::default(),
            up: true,
            granted: HashMap::new(),
        }
    }

    fn answer(&mut self, pending: &Pending, applied: &[Applied<'_>], now: u64) -> Answer {
        if !self.up {
            return Answer::Failed;
        }
        let buckets = pending.buckets(applied);
        let refs: Vec<&BucketRequest> = buckets.iter().collect();
        let outcomes = self.buckets.acquire(&refs, now).expect("valid specs");
        if outcomes.iter().all(|o| o.admitted) {
            for b in &buckets {
                *self.granted.entry(b.key.clone()).or_default() += b.cost;
            }
        }
        Answer::Outcomes(outcomes)
    }
}

/// Runs one request to its decision, the store answering every ask.
fn run(
    limiter: &mut Limiter,
    store: &mut Store,
    applied: &[Applied<'_>],
    global: GlobalOutcomes,
    now: u64,
) -> (Decided, usize) {
    let mut asks = 0;
    let mut step = limiter.begin(applied, global, now);
    loop {
        match step {
            Step::Done(decided) => return (decided, asks),
            Step::Ask(pending) => {
                asks += 1;
                let answer = store.answer(&pending, applied, now);
                step = limiter.settle(pending, applied, answer, now);
            }
        }
    }
}

fn admitted(outcome: &Decided) -> bool {
    outcome.verdict == Verdict::Admitted
}

#[test]
fn a_hot_key_is_served_from_its_lease_without_the_store() {
    let p = policy("p", 6400, LeaseSize::Auto, OnStoreError::Closed);
    let a = [applied(&p, "ip:1")];
    let (mut limiter, mut store) = (limiter(), Store::new());
    let mut asks = 0;
    for i in 0..200 {
        let (decided, n) = run(&mut limiter, &mut store, &a, Vec::new(), i * MS);
        assert!(admitted(&decided));
        assert_eq!(
            decided.lease_served,
            u64::from(n == 0),
            "served from the lease"
        );
        asks += n;
    }
    // The second request asks for a lease of 100; then 100 requests are served per ask.
    assert!(asks <= 4, "{asks} store calls for 200 requests");
    let used = 200;
    assert!(store.granted[&a[0].bucket.key] >= used);
}

#[test]
fn a_known_empty_bucket_is_refused_without_the_store() {
    let p = policy("p", 2, LeaseSize::Tokens(0), OnStoreError::Closed);
    let a = [applied(&p, "ip:1")];
    let (mut limiter, mut store) = (limiter(), Store::new());
    for _ in 0..2 {
        assert!(admitted(
            &run(&mut limiter, &mut store, &a, Vec::new(), 0).0
        ));
    }
    let (refused, asks) = run(&mut limiter, &mut store, &a, Vec::new(), 0);
    assert!(!admitted(&refused));
    assert_eq!(asks, 1, "the store said it is empty");
    let (refused, asks) = run(&mut limiter, &mut store, &a, Vec::new(), 10 * MS);
    assert_eq!((refused.decision, asks), (Decision::Rejected, 0));
}

#[test]
fn a_global_refusal_asks_nothing_and_takes_nothing() {
    let p = policy("p", 10, LeaseSize::Tokens(0), OnStoreError::Closed);
    let a = [applied(&p, "ip:1")];
    let (mut limiter, mut store) = (limiter(), Store::new());
    let refused = BucketOutcome {
        admitted: false,
        remaining: 0,
        next_token_us: 5,
        retry_after_us: 5,
    };
    let (decided, asks) = run(&mut limiter, &mut store, &a, vec![(0, refused)], 0);
    assert_eq!((decided.decision, asks), (Decision::Rejected, 0));
    assert!(!decided.refund_global, "nothing was taken");
}

#[test]
fn a_regional_refusal_gives_back_what_the_global_policies_took() {
    let p = policy("p", 1, LeaseSize::Tokens(0), OnStoreError::Closed);
    let a = [applied(&p, "ip:1")];
    let (mut limiter, mut store) = (limiter(), Store::new());
    let room = BucketOutcome {
        admitted: true,
        remaining: 7,
        next_token_us: 0,
        retry_after_us: 0,
    };
    let (first, _) = run(&mut limiter, &mut store, &a, vec![(0, room)], 0);
    assert!(admitted(&first) && !first.refund_global);
    let (second, _) = run(&mut limiter, &mut store, &a, vec![(0, room)], 0);
    assert_eq!(second.decision, Decision::Rejected);
    assert!(second.refund_global);
}

#[test]
fn an_open_breaker_decides_by_each_policy_fallback_without_the_store() {
    let local = policy("local", 1, LeaseSize::Tokens(0), OnStoreError::Local);
    let open = policy("open", 1, LeaseSize::Tokens(0), OnStoreError::Open);
    let closed = policy("closed", 1, LeaseSize::Tokens(0), OnStoreError::Closed);
    let (mut limiter, mut store) = (limiter(), Store::new());
    store.up = false;
    let both = [applied(&local, "ip:1"), applied(&open, "ip:1")];
    let (first, asks) = run(&mut limiter, &mut store, &both, Vec::new(), 0);
    assert_eq!((first.decision, asks), (Decision::StoreFailOpen, 1));
    let (second, _) = run(&mut limiter, &mut store, &both, Vec::new(), MS);
    assert_eq!(second.breaker, Some(Transition::Opened));
    assert_eq!(
        second.decision,
        Decision::Rejected,
        "the local bucket holds 1"
    );
    let (third, asks) = run(
        &mut limiter,
        &mut store,
        &[applied(&closed, "ip:1")],
        Vec::new(),
        2 * MS,
    );
    assert_eq!(
        (third.decision, asks),
        (Decision::Unavailable, 0),
        "skipped while open"
    );
    store.up = true;
    let (probe, asks) = run(
        &mut limiter,
        &mut store,
        &[applied(&closed, "ip:1")],
        Vec::new(),
        200 * MS,
    );
    assert_eq!(
        (probe.decision, asks, probe.breaker),
        (Decision::Admitted, 1, Some(Transition::Closed))
    );
}

#[test]
fn a_refused_lease_request_is_asked_again_for_the_cost_alone() {
    // 6,400 tokens, lease 100: spend down to where a lease no longer fits, from another
    // gateway (straight in the store), while this one still believes it may lease.
    let p = policy("p", 6400, LeaseSize::Auto, OnStoreError::Closed);
    let a = [applied(&p, "ip:1")];
    let (mut limiter, mut store) = (limiter(), Store::new());
    assert!(admitted(
        &run(&mut limiter, &mut store, &a, Vec::new(), 0).0
    ));
    let other = BucketRequest {
        cost: 6400 - 1 - 50,
        ..a[0].bucket.clone()
    };
    assert!(store.buckets.acquire(&[&other], 0).unwrap()[0].admitted);
    let (decided, asks) = run(&mut limiter, &mut store, &a, Vec::new(), 0);
    assert!(admitted(&decided), "the cost alone fits");
    assert_eq!(asks, 2);
}

#[test]
fn a_lease_request_abandoned_after_the_store_applied_it_lapses_only_at_the_ask_timeout() {
    // A client that closes its connection while every request asks for a lease: the store
    // applies each call, so each abandoned lease request must not free the key for another.
    let p = policy("p", 6400, LeaseSize::Auto, OnStoreError::Closed);
    let a = [applied(&p, "ip:1")];
    let (mut limiter, mut store) = (limiter(), Store::new());
    assert!(admitted(
        &run(&mut limiter, &mut store, &a, Vec::new(), 0).0
    ));
    let key = a[0].bucket.key.clone();
    let before = store.granted[&key];
    let mut leases = 0;
    for i in 1..=70 {
        let Step::Ask(pending) = limiter.begin(&a, Vec::new(), i * MS) else {
            panic!("asks the store")
        };
        if pending.buckets(&a)[0].cost > 1 {
            leases += 1;
        }
        // The store applies the call; the answer finds nobody.
        let _ = store.answer(&pending, &a, i * MS);
        let _ = limiter.abandon(pending, &a, i * MS);
    }
    assert_eq!(leases, 1, "one lease request per ask timeout");
    assert_eq!(store.granted[&key] - before, 100 + 70);
    // After the ask timeout, leasing resumes.
    let Step::Ask(pending) = limiter.begin(&a, Vec::new(), 300 * MS) else {
        panic!("asks the store")
    };
    assert!(pending.buckets(&a)[0].cost > 1, "may lease again");
    let _ = limiter.abandon(pending, &a, 300 * MS);
}

#[test]
fn a_request_abandoned_after_drawing_from_a_lease_gives_the_tokens_back() {
    let hot = policy("hot", 6400, LeaseSize::Auto, OnStoreError::Closed);
    let cold = policy("cold", 10, LeaseSize::Tokens(0), OnStoreError::Closed);
    let (mut limiter, mut store) = (limiter(), Store::new());
    let alone = [applied(&hot, "ip:1")];
    for _ in 0..2 {
        assert!(admitted(
            &run(&mut limiter, &mut store, &alone, Vec::new(), 0).0
        ));
    }
    let held = limiter.leases.tokens(&alone[0].bucket.key, 0);
    assert!(held > 0, "leased");
    let both = [applied(&hot, "ip:1"), applied(&cold, "ip:1")];
    let Step::Ask(pending) = limiter.begin(&both, Vec::new(), MS) else {
        panic!("the cold bucket is asked")
    };
    assert_eq!(limiter.leases.tokens(&alone[0].bucket.key, MS), held - 1);
    assert_eq!(limiter.abandon(pending, &both, MS), None);
    assert_eq!(limiter.leases.tokens(&alone[0].bucket.key, MS), held);
}

#[test]
fn an_abandoned_probe_lets_the_next_request_probe_once_the_store_deadline_passed() {
    let p = policy("p", 10, LeaseSize::Tokens(0), OnStoreError::Closed);
    let a = [applied(&p, "ip:1")];
    // The shell waits at most 50 ms for the store.
    let mut limiter = Limiter::new(Breaker::new(2, Duration::from_millis(100)), 50 * MS);
    let mut store = Store::new();
    store.up = false;
    for t in 0..2 {
        run(&mut limiter, &mut store, &a, Vec::new(), t * MS);
    }
    assert!(limiter.breaker_open());
    let Step::Ask(probe) = limiter.begin(&a, Vec::new(), 150 * MS) else {
        panic!("a probe after the interval")
    };
    assert!(probe.holds_anything());
    assert_eq!(limiter.abandon(probe, &a, 151 * MS), None);
    // Not at once: a client that disconnects on purpose cannot make every request a probe.
    let Step::Done(skipped) = limiter.begin(&a, Vec::new(), 152 * MS) else {
        panic!("the store is still skipped")
    };
    assert_eq!(skipped.decision, Decision::Unavailable);
    // Once the abandoned probe's call is over for sure, the next request probes, without
    // waiting for the rest of the 100 ms interval.
    let Step::Ask(next) = limiter.begin(&a, Vec::new(), 200 * MS) else {
        panic!("the next request probes")
    };
    let _ = limiter.abandon(next, &a, 200 * MS);
}

#[test]
fn a_breaker_change_is_reported_even_when_the_retry_is_abandoned() {
    let p = policy("p", 6400, LeaseSize::Auto, OnStoreError::Closed);
    let a = [applied(&p, "ip:1")];
    let (mut limiter, mut store) = (limiter(), Store::new());
    assert!(admitted(
        &run(&mut limiter, &mut store, &a, Vec::new(), 0).0
    ));
    // The store fails twice: the breaker opens.
    store.up = false;
    let cold = policy("cold", 10, LeaseSize::Tokens(0), OnStoreError::Closed);
    let c = [applied(&cold, "ip:2")];
    for t in 1..3 {
        run(&mut limiter, &mut store, &c, Vec::new(), t * MS);
    }
    assert!(limiter.breaker_open());
    store.up = true;
    // Another gateway empties the bucket so far that the lease no longer fits.
    let other = BucketRequest {
        cost: 6400 - 50,
        ..a[0].bucket.clone()
    };
    assert!(store.buckets.acquire(&[&other], 200 * MS).unwrap()[0].admitted);
    // The probe asks for a lease, is refused, closes the breaker and retries; its client
    // goes away during the retry.
    let Step::Ask(probe) = limiter.begin(&a, Vec::new(), 200 * MS) else {
        panic!("a probe")
    };
    let answer = store.answer(&probe, &a, 200 * MS);
    let Step::Ask(retry) = limiter.settle(probe, &a, answer, 200 * MS) else {
        panic!("the retry without the lease")
    };
    assert!(!limiter.breaker_open());
    assert!(
        retry.holds_anything(),
        "the transition is still to be reported"
    );
    assert_eq!(
        limiter.abandon(retry, &a, 201 * MS),
        Some(Transition::Closed)
    );
}

/// One step of a random schedule.
#[derive(Debug, Clone)]
enum Event {
    /// A request on these policies (indices into the set below) and key; `cancel_at`: the
    /// store call at which its client goes away (beyond the calls it makes: never), before
    /// the store sees the call or, `after_store`, once it applied it.
    Request {
        policies: Vec<usize>,
        key: u8,
        cancel_at: usize,
        after_store: bool,
        global: Option<bool>,
    },
    /// Another gateway spends tokens of a key's bucket straight in the store.
    Elsewhere {
        policy: usize,
        key: u8,
        cost: u64,
    },
    StoreDown(bool),
    Advance(u64),
}

fn events() -> impl Strategy<Value = Vec<Event>> {
    let event = prop_oneof![
        6 => (proptest::collection::vec(0usize..3, 1..3), 0u8..3, 0usize..4, any::<bool>(), proptest::option::of(any::<bool>()))
            .prop_map(|(policies, key, cancel_at, after_store, global)| Event::Request { policies, key, cancel_at, after_store, global }),
        1 => (0usize..3, 0u8..3, 1u64..200).prop_map(|(policy, key, cost)| Event::Elsewhere { policy, key, cost }),
        1 => any::<bool>().prop_map(Event::StoreDown),
        2 => (0u64..50_000).prop_map(Event::Advance),
    ];
    proptest::collection::vec(event, 1..120)
}

proptest! {
    /// Whatever the schedule, cancellations included: a bucket never admits more tokens than
    /// the store handed out for it (leases move admissions, they never add any); every
    /// request the store could not be asked for is decided by its fallback; and a request
    /// whose global policies admitted but which is refused anyway gives back what they took.
    #[test]
    fn leases_and_cancellations_never_admit_beyond_what_the_store_granted(schedule in events()) {
        let set = [
            policy("a", 640, LeaseSize::Auto, OnStoreError::Closed),
            policy("b", 6400, LeaseSize::Tokens(50), OnStoreError::Local),
            policy("c", 5, LeaseSize::Tokens(0), OnStoreError::Closed),
        ];
        let (mut limiter, mut store) = (limiter(), Store::new());
        let mut used: HashMap<String, u64> = HashMap::new();
        let mut now = 1_000 * MS;
        for event in schedule {
            match event {
                Event::Request { mut policies, key, cancel_at, after_store, global } => {
                    policies.sort_unstable();
                    policies.dedup();
                    let key = format!("ip:{key}");
                    let a: Vec<Applied<'_>> = policies.iter().map(|&i| applied(&set[i], &key)).collect();
                    let global: GlobalOutcomes = global.map(|admits| (0, BucketOutcome {
                        admitted: admits,
                        remaining: u64::from(admits),
                        next_token_us: 0,
                        retry_after_us: if admits { 0 } else { MS },
                    })).into_iter().collect();
                    let global_admits = global.iter().all(|(_, o)| o.admitted);
                    let had_global = !global.is_empty();
                    let mut step = limiter.begin(&a, global, now);
                    let mut calls = 0;
                    let decided = loop {
                        match step {
                            Step::Done(decided) => break Some(decided),
                            Step::Ask(pending) => {
                                if calls == cancel_at {
                                    if after_store {
                                        let _ = store.answer(&pending, &a, now);
                                    }
                                    let _ = limiter.abandon(pending, &a, now);
                                    break None;
                                }
                                calls += 1;
                                let answer = store.answer(&pending, &a, now);
                                step = limiter.settle(pending, &a, answer, now);
                            }
                        }
                    };
                    prop_assert!(calls <= 2, "at most the retry without the lease");
                    let Some(decided) = decided else { continue };
                    let ok = admitted(&decided);
                    prop_assert_eq!(decided.refund_global, had_global && global_admits && !ok);
                    if ok {
                        prop_assert!(global_admits);
                        for applied in &a {
                            if decided.decision == Decision::Admitted {
                                *used.entry(applied.bucket.key.clone()).or_default() += applied.bucket.cost;
                            }
                        }
                    }
                }
                Event::Elsewhere { policy, key, cost } => {
                    let bucket = applied(&set[policy], &format!("ip:{key}")).bucket;
                    let request = BucketRequest { cost, ..bucket };
                    store.buckets.acquire(&[&request], now).expect("valid spec");
                }
                Event::StoreDown(down) => store.up = !down,
                Event::Advance(us) => now += us,
            }
            for (key, used) in &used {
                let granted = store.granted.get(key).copied().unwrap_or(0);
                prop_assert!(*used <= granted, "{key}: {used} admitted, {granted} granted");
            }
        }
    }
}
