//! Tests of the usage table: counts, deltas, merge laws against `crdts::PNCounter`, sizes.

use super::*;
use crdts::{CmRDT, CvRDT, PNCounter};
use proptest::prelude::*;

const SEC: u64 = 1_000_000;
/// A plausible wall-clock "now" (2025), so sub-window numbers are realistic.
const T0: u64 = 1_750_000_000 * SEC;

fn spec() -> WindowSpec {
    WindowSpec::new(10 * SEC, 10).unwrap()
}

fn actor(i: usize) -> Actor {
    let regions = ["us-east", "eu-west", "ap-south", "us-west"];
    Actor::new(regions[i % 4], format!("i{}", i / 4), 1 + (i / 8) as u64)
}

fn table_for(i: usize) -> (UsageTable, ActorIdx) {
    let mut t = UsageTable::new([(1, spec()), (2, WindowSpec::new(SEC, 4).unwrap())]);
    let me = t.intern(&actor(i)).unwrap();
    (t, me)
}

#[test]
fn sliding_count_releases_whole_sub_windows() {
    let (mut t, me) = table_for(0);
    t.record(me, 1, "k", T0, 3).unwrap();
    t.record(me, 1, "k", T0 + 5 * SEC, 2).unwrap();
    assert_eq!(t.count(1, "k", T0 + 5 * SEC), 5);
    // Sub-window of T0 is [T0, T0+1s); counted while now < T0 + 1s + 10s.
    assert_eq!(t.count(1, "k", T0 + 11 * SEC - 1), 5);
    assert_eq!(t.count(1, "k", T0 + 11 * SEC), 2);
    assert_eq!(t.count(1, "k", T0 + 16 * SEC), 0);
    assert_eq!(t.count(1, "other", T0), 0);
    assert_eq!(t.count(9, "k", T0), 0);
}

#[test]
fn refunds_stay_in_the_admission_sub_window_and_are_capped() {
    let (mut t, me) = table_for(0);
    t.record(me, 1, "k", T0, 3).unwrap();
    let now = T0 + 2 * SEC;
    t.record(me, 1, "k", now, 1).unwrap();
    assert_eq!(t.refund(me, 1, "k", T0, now, 5).unwrap(), 3);
    assert_eq!(t.count(1, "k", now), 1);
    assert_eq!(t.refund(me, 1, "k", T0, now, 1).unwrap(), 0);
    assert_eq!(t.cell(me, 1, "k", spec().sub_window(T0)), Some((3, 3)));
    // Too late: the admission's sub-window is no longer counted.
    assert_eq!(t.refund(me, 1, "k", now, now + 20 * SEC, 1).unwrap(), 0);
}

#[test]
fn local_errors() {
    let (mut t, me) = table_for(0);
    assert_eq!(
        t.record(me, 7, "k", T0, 1),
        Err(UsageError::UnknownPolicy(7))
    );
    assert_eq!(
        t.record(ActorIdx(9), 1, "k", T0, 1),
        Err(UsageError::UnknownActor(9))
    );
    let long = "x".repeat(513);
    assert_eq!(t.record(me, 1, &long, T0, 1), Err(UsageError::KeyTooLong));
    let mut small = UsageTable::with_limits(
        [(1, spec())],
        UsageLimits {
            max_keys: 2,
            max_key_len: 16,
        },
    );
    let me = small.intern(&actor(0)).unwrap();
    small.record(me, 1, "a", T0, 1).unwrap();
    small.record(me, 1, "b", T0, 1).unwrap();
    // At the cap a new key evicts the one released first ("a": admitted at the same
    // instant, first in order), rather than being refused.
    small.record(me, 1, "c", T0, 1).unwrap();
    assert_eq!(small.key_count(), 2);
    assert_eq!(small.count(1, "a", T0) + small.count(1, "b", T0), 1);
    assert_eq!(small.evictions().live, 1);
    assert_eq!(
        small.gc(T0 + 30 * SEC),
        GcReport {
            cells: 2,
            keys: 2,
            actors: 0
        }
    );
    assert_eq!(small.key_count(), 0);
    small.record(me, 1, "c", T0 + 30 * SEC, 1).unwrap();
    let mut none = UsageTable::with_limits(
        [(1, spec())],
        UsageLimits {
            max_keys: 0,
            max_key_len: 16,
        },
    );
    let me = none.intern(&actor(0)).unwrap();
    assert_eq!(none.record(me, 1, "a", T0, 1), Err(UsageError::TableFull));
}

#[test]
fn deltas_carry_only_changes_and_chunk() {
    let (mut a, ma) = table_for(0);
    let (mut b, _) = table_for(1);
    for k in 0..25 {
        a.record(ma, 1, &format!("k{k}"), T0, 1).unwrap();
    }
    let v = a.version();
    a.record(ma, 1, "k3", T0, 2).unwrap();
    let d = a.deltas_since(v, 10, T0);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].entry_count(), 1);
    assert_eq!(d[0].policies[0].entries[0].counts, vec![(0, 3, 0)]);
    let full = a.full_state_chunks(10, T0);
    assert_eq!(full.len(), 3);
    assert!(
        full.iter()
            .all(|c| c.chunks == 3 && c.to_version == a.version())
    );
    assert_eq!(full.iter().map(Delta::entry_count).sum::<usize>(), 25);
    for c in &full {
        b.merge_delta(c, T0);
    }
    assert_eq!(b.digest(T0), a.digest(T0));
    assert_eq!(b.count(1, "k3", T0), 3);
    // Nothing changed: one empty chunk that still moves the receiver's version on.
    let none = a.deltas_since(a.version(), 10, T0);
    assert_eq!((none.len(), none[0].entry_count()), (1, 0));
}

#[test]
fn malformed_deltas_are_refused_and_counted() {
    let (mut t, _) = table_for(0);
    let sub = spec().sub_window(T0);
    let entry = |key: &str, off: u32, counts: Vec<(u16, u64, u64)>| DeltaEntry {
        key: key.into(),
        sub_off: off,
        counts,
    };
    let d = Delta {
        from_version: 0,
        to_version: 5,
        chunk: 0,
        chunks: 1,
        actors: vec![actor(1), Actor::new("x".repeat(500), "i", 1), actor(3)],
        policies: vec![
            PolicyDelta {
                policy: 1,
                base_sub: sub,
                entries: vec![
                    entry("ok", 0, vec![(0, 4, 1), (7, 1, 1), (1, 9, 0)]),
                    entry("future", 1_000_000, vec![(0, 1, 0)]),
                    entry(&"y".repeat(600), 0, vec![(0, 1, 0)]),
                    entry("zero", 0, vec![(0, 0, 0)]),
                ],
            },
            PolicyDelta {
                policy: 1,
                base_sub: u64::MAX,
                entries: vec![entry("overflow", 5, vec![(0, 1, 0)])],
            },
            PolicyDelta {
                policy: 1,
                base_sub: 0,
                entries: vec![entry("stale", 0, vec![(0, 1, 0)])],
            },
            PolicyDelta {
                policy: 42,
                base_sub: sub,
                entries: vec![entry("k", 0, vec![(0, 1, 0)])],
            },
        ],
    };
    let r = t.merge_delta(&d, T0);
    assert_eq!(r.cells_changed, 1);
    assert_eq!(r.bad_actor, 1);
    assert_eq!(r.refused, 2); // long key, malformed actor
    assert_eq!(r.future, 2); // far future, base + off overflow
    assert_eq!(r.stale, 1);
    assert_eq!(r.unknown_policy, 1);
    assert!(r.has_refusals());
    assert_eq!(t.count(1, "ok", T0), 3);
    assert_eq!(t.key_count(), 1);
    // Only referenced, well-formed actors are interned (ourselves and actor 1).
    assert_eq!(t.actors().len(), 2);
}

/// Operations for the oracle test.
#[derive(Debug, Clone)]
enum Op {
    Inc {
        replica: usize,
        n: u64,
    },
    Refund {
        replica: usize,
        n: u64,
    },
    /// `to` merges everything `from` has changed since `to` last heard from it.
    Sync {
        from: usize,
        to: usize,
    },
    /// Replays an old delta (duplicate or reordered delivery).
    Replay {
        idx: usize,
        to: usize,
    },
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..n, 1u64..5).prop_map(|(replica, n)| Op::Inc { replica, n }),
        (0..n, 1u64..3).prop_map(|(replica, n)| Op::Refund { replica, n }),
        (0..n, 0..n).prop_map(|(from, to)| Op::Sync { from, to }),
        (0..64usize, 0..n).prop_map(|(idx, to)| Op::Replay { idx, to }),
    ]
}

/// The oracle's view of a delta: a fresh `crdts::PNCounter` holding the same pairs.
fn to_oracle(chunks: &[Delta]) -> PNCounter<Actor> {
    let mut c = PNCounter::new();
    for d in chunks {
        for pd in &d.policies {
            for e in &pd.entries {
                for &(a, p, n) in &e.counts {
                    let who = d.actors[usize::from(a)].clone();
                    let mut one = PNCounter::new();
                    one.apply(one.inc_many(who.clone(), p));
                    one.apply(one.dec_many(who, n));
                    c.merge(one);
                }
            }
        }
    }
    c
}

proptest! {
    /// Same answers as `crdts::PNCounter` for one (policy, key, sub-window): each replica
    /// and its oracle apply the same increments and refunds and merge the same deltas
    /// (syncs, duplicates and reorderings, into any replica); after a final full exchange
    /// every replica holds the true total of all operations.
    #[test]
    fn matches_crdts_pncounter(ops in proptest::collection::vec(op(3), 1..120)) {
        let n = 3;
        let mut ours: Vec<(UsageTable, ActorIdx)> = (0..n).map(table_for).collect();
        let mut oracle: Vec<PNCounter<Actor>> = (0..n).map(|_| PNCounter::new()).collect();
        let mut truth: i128 = 0;
        // Per (from, to): the version `to` has merged from `from`.
        let mut heard = vec![vec![0u64; n]; n];
        let mut sent: Vec<Vec<Delta>> = Vec::new();
        for op in ops {
            match op {
                Op::Inc { replica, n: k } => {
                    let (t, me) = &mut ours[replica];
                    t.record(*me, 1, "k", T0, k).unwrap();
                    let o = &mut oracle[replica];
                    o.apply(o.inc_many(actor(replica), k));
                    truth += i128::from(k);
                }
                Op::Refund { replica, n: k } => {
                    let (t, me) = &mut ours[replica];
                    let applied = t.refund(*me, 1, "k", T0, T0, k).unwrap();
                    if applied > 0 {
                        let o = &mut oracle[replica];
                        o.apply(o.dec_many(actor(replica), applied));
                    }
                    truth -= i128::from(applied);
                }
                Op::Sync { from, to } => {
                    if from == to { continue; }
                    let chunks = ours[from].0.deltas_since(heard[from][to], 1, T0);
                    for c in &chunks {
                        ours[to].0.merge_delta(c, T0);
                    }
                    heard[from][to] = chunks[0].to_version;
                    oracle[to].merge(to_oracle(&chunks));
                    sent.push(chunks);
                }
                Op::Replay { idx, to } => {
                    if sent.is_empty() { continue; }
                    let chunks = &sent[idx % sent.len()];
                    for c in chunks.iter().rev() {
                        ours[to].0.merge_delta(c, T0);
                    }
                    oracle[to].merge(to_oracle(chunks));
                }
            }
            for (i, (t, _)) in ours.iter().enumerate() {
                prop_assert_eq!(BigValue(t.net(1, "k", T0)), BigValue::of(&oracle[i]));
            }
        }
        // Anti-entropy: everyone sends its full state to everyone.
        for from in 0..n {
            let chunks = ours[from].0.full_state_chunks(2, T0);
            for to in 0..n {
                for c in &chunks {
                    ours[to].0.merge_delta(c, T0);
                }
                oracle[to].merge(to_oracle(&chunks));
            }
        }
        let d0 = ours[0].0.digest(T0);
        for (i, (t, _)) in ours.iter().enumerate() {
            prop_assert_eq!(BigValue(t.net(1, "k", T0)), BigValue::of(&oracle[i]));
            prop_assert_eq!(t.net(1, "k", T0), truth);
            prop_assert_eq!(t.digest(T0), d0);
        }
    }

    /// Merge laws on whole tables: any delivery order of the same deltas, with duplicates,
    /// gives the same counts and digest; losses are repaired by a full-state merge.
    #[test]
    fn merge_is_commutative_associative_idempotent(
        writes in proptest::collection::vec((0usize..3, 0usize..4, 0u64..30, 1u64..4, any::<bool>()), 1..60),
        order in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
        lose in proptest::collection::vec(any::<bool>(), 40),
    ) {
        let n = 3;
        let mut src: Vec<(UsageTable, ActorIdx)> = (0..n).map(table_for).collect();
        let mut deltas = Vec::new();
        let mut last = vec![0u64; n];
        for (r, key, dt, k, refund) in writes {
            let now = T0 + dt * SEC / 3;
            let (t, me) = &mut src[r];
            let key = format!("key{key}");
            if refund {
                t.refund(*me, 1, &key, now, now, k).unwrap();
            } else {
                t.record(*me, 1, &key, now, k).unwrap();
            }
            t.record(*me, 2, &key, now, 1).unwrap();
            deltas.extend(t.deltas_since(last[r], 3, T0 + 10 * SEC));
            last[r] = t.version();
        }
        let now = T0 + 10 * SEC;
        // Replica A: in production order. Replica B: shuffled with duplicates.
        let (mut a, _) = table_for(3);
        for d in &deltas {
            a.merge_delta(d, now);
        }
        let (mut b, _) = table_for(3);
        for idx in &order {
            b.merge_delta(&deltas[idx.index(deltas.len())], now);
        }
        for d in deltas.iter().rev() {
            b.merge_delta(d, now);
        }
        // Replica C: loses some deltas, then anti-entropy from every source.
        let (mut c, _) = table_for(3);
        for (i, d) in deltas.iter().enumerate() {
            if !lose[i % lose.len()] {
                c.merge_delta(d, now);
            }
        }
        for (t, _) in &src {
            for chunk in t.full_state_chunks(4, now) {
                c.merge_delta(&chunk, now);
            }
        }
        // The sources merged into one table (associativity: merge of merges).
        let (mut all, _) = table_for(3);
        for (t, _) in &src {
            let mut copy = all.clone();
            for chunk in t.full_state_chunks(1000, now) {
                copy.merge_delta(&chunk, now);
            }
            all = copy;
        }
        for t in [&b, &c, &all] {
            prop_assert_eq!(t.digest(now), a.digest(now));
            for key in 0..4 {
                let key = format!("key{key}");
                for p in [1, 2] {
                    prop_assert_eq!(t.net(p, &key, now), a.net(p, &key, now));
                    let expect: i128 = src.iter().map(|(s, me)| i128::from(s.own_count(*me, p, &key, now))).sum();
                    prop_assert_eq!(t.net(p, &key, now), expect);
                }
            }
        }
        // Idempotence: merging everything again changes nothing.
        let before = (a.digest(now), a.version());
        for d in &deltas {
            prop_assert_eq!(a.merge_delta(d, now).cells_changed, 0);
        }
        prop_assert_eq!((a.digest(now), a.version()), before);
    }
}

/// Compares our i128 with the oracle's BigInt through their decimal strings.
#[derive(Debug, PartialEq, Eq)]
struct BigValue(i128);

impl BigValue {
    fn of(c: &PNCounter<Actor>) -> Self {
        Self(c.read().to_string().parse().unwrap())
    }
}

fn build(keys: usize, actors: usize) -> (UsageTable, Vec<ActorIdx>) {
    build_in_order(keys, actors, 1)
}

/// Keys inserted in the order `k · stride mod keys` (a permutation when coprime): sorted
/// insertion leaves B-tree nodes about half full, arrival order in production is random.
fn build_in_order(keys: usize, actors: usize, stride: usize) -> (UsageTable, Vec<ActorIdx>) {
    let mut t = UsageTable::new([(1, spec())]);
    let ids: Vec<ActorIdx> = (0..actors).map(|i| t.intern(&actor(i)).unwrap()).collect();
    for k in (0..keys).map(|i| i * stride % keys) {
        let key = format!("client-{k:06}");
        for &a in &ids {
            t.record(a, 1, &key, T0, 1 + (k % 7) as u64).unwrap();
        }
    }
    (t, ids)
}

/// Bytes per active key by capacity accounting, and the bincode size of a delta of changed
/// keys. Budget: ≤ 200 bytes of memory per key (3 actors, one sub-window) and ≤ 32 bytes
/// of gossip per changed key once the per-delta actor table is amortized.
#[test]
fn memory_and_delta_size_budgets() {
    let (mut t, ids) = build(10_000, 3);
    let per_key = t.memory_bytes() / t.key_count();
    assert!(per_key <= 200, "{per_key} bytes per key");
    let v = t.version();
    for k in (0..10_000).step_by(10) {
        t.record(ids[0], 1, &format!("client-{k:06}"), T0 + SEC / 2, 1)
            .unwrap();
    }
    let chunks = t.deltas_since(v, 1_000, T0 + SEC / 2);
    assert_eq!((chunks.len(), chunks[0].entry_count()), (1, 1_000));
    let bytes = bincode::serde::encode_to_vec(&chunks[0], bincode::config::standard()).unwrap();
    let per_changed = bytes.len() / 1_000;
    assert!(per_changed <= 32, "{per_changed} bytes per changed key");
    let (back, _): (Delta, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
    assert_eq!(back, chunks[0]);
}
