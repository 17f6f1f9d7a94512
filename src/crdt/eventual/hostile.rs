//! Hostile peers against the eventual core (issue 13, findings 5 and 6): forged cells and
//! acks are judged by what their author could honestly have sent, and the table returns to
//! its baseline after key churn, evicting rather than refusing at its key cap.

use super::tests::{actor, node, slots};
use super::*;
use crate::crdt::usage::{
    DeltaEntry, MAX_INCARNATION_SKEW_US, MAX_RELAYED_INCARNATIONS, PolicyDelta,
};
use crate::crdt::window::WindowSpec;
use proptest::prelude::*;

const SEC: u64 = 1_000_000;
/// A plausible wall-clock "now" (2025): incarnations are start times on this clock.
const T0: u64 = 1_750_000_000 * SEC;

fn spec() -> WindowSpec {
    WindowSpec::new(10 * SEC, 10).unwrap()
}

/// One entry of policy 1 for `key` in the sub-window of `now_us`.
fn forged(now_us: u64, actors: Vec<Actor>, key: &str, counts: Vec<(u16, u64, u64)>) -> Delta {
    Delta {
        from_version: 0,
        to_version: 1,
        chunk: 0,
        chunks: 1,
        actors,
        policies: vec![PolicyDelta {
            policy: 1,
            base_sub: spec().sub_window(now_us),
            entries: vec![DeltaEntry {
                key: key.into(),
                sub_off: 0,
                counts,
            }],
        }],
    }
}

#[test]
fn actors_outside_the_deployment_are_refused() {
    let mut me = node(0, 3, spec(), 30);
    me.set_peers((0..3).map(actor));
    let liar = actor(1);
    // 1000 actors of a slot nobody configured.
    let fakes: Vec<Actor> = (0..1000)
        .map(|i| Actor::new("nowhere", "x", i + 1))
        .collect();
    let counts = (0..1000u16).map(|i| (i, 1, 0)).collect();
    let r = me.on_delta(&liar, &forged(T0, fakes, "k", counts), T0);
    assert_eq!(r.foreign_actor, 1000);
    // 1000 incarnations of a configured slot, relayed: only a few are named.
    let incarnations: Vec<Actor> = (0..1000).map(|i| actor(2).slot().actor(i + 2)).collect();
    let counts = (0..1000u16).map(|i| (i, 1, 0)).collect();
    let r = me.on_delta(&liar, &forged(T0, incarnations, "k", counts), T0);
    assert_eq!(r.cells_changed, MAX_RELAYED_INCARNATIONS as u64);
    assert_eq!(
        r.too_many_incarnations,
        1000 - MAX_RELAYED_INCARNATIONS as u64
    );
    // Incarnation 0, one from the future, and our own actor.
    let odd = vec![
        actor(2).slot().actor(0),
        actor(2).slot().actor(T0 + MAX_INCARNATION_SKEW_US + 1),
        actor(0),
    ];
    let r = me.on_delta(
        &liar,
        &forged(T0, odd, "k", vec![(0, 1, 0), (1, 1, 0), (2, 9, 0)]),
        T0,
    );
    assert_eq!((r.bad_incarnation, r.own_actor), (2, 1));
    assert_eq!(me.table().actors().named(), 1 + MAX_RELAYED_INCARNATIONS);
    // The slot's own connection is not held back by what the liar filled.
    let own = actor(2).slot().actor(5_000);
    let r = me.on_delta(
        &own,
        &forged(T0, vec![own.clone()], "k", vec![(0, 1, 0)]),
        T0,
    );
    assert_eq!(r.cells_changed, 1);
    // A sender that is not a configured peer (or is ourselves) is refused whole.
    let r = me.on_delta(
        &actor(0),
        &forged(T0, vec![actor(1)], "k", vec![(0, 1, 0)]),
        T0,
    );
    assert_eq!((r.foreign_actor, r.cells_changed), (1, 0));
    // Once their cells are gone, GC forgets the relayed incarnations.
    me.gc(T0 + 30 * SEC);
    assert_eq!(me.table().actors().named(), 1);
}

#[test]
fn relayed_counts_can_only_over_count() {
    let quota = 30;
    let mut me = node(0, 3, spec(), quota);
    me.set_peers((0..3).map(actor));
    let (liar, honest) = (actor(1), actor(2));
    for _ in 0..5 {
        assert!(me.try_admit(1, "k", T0, 1, quota).unwrap());
    }
    let r = me.on_delta(
        &honest,
        &forged(T0, vec![honest.clone()], "k", vec![(0, 10, 0)]),
        T0,
    );
    assert_eq!(r.cells_changed, 1);
    assert_eq!(me.table().count(1, "k", T0), 15);
    // The liar relays that the honest peer refunded everything, and that we did.
    let d = forged(
        T0,
        vec![honest.clone(), actor(0)],
        "k",
        vec![(0, 10, u64::MAX), (1, 0, u64::MAX)],
    );
    let r = me.on_delta(&liar, &d, T0);
    assert_eq!((r.own_actor, r.relayed_refunds_ignored), (1, 1));
    assert_eq!(
        me.table().count(1, "k", T0),
        15,
        "nobody's refunds but its own"
    );
    // Its own refunds and admissions are clamped to what it could have done.
    let d = forged(T0, vec![liar.clone()], "k", vec![(0, u64::MAX, u64::MAX)]);
    let r = me.on_delta(&liar, &d, T0);
    assert_eq!(r.clamped, 1);
    let sub = spec().sub_window(T0);
    let liar_idx = me.table().actors().get(&liar).unwrap();
    assert_eq!(me.table().cell(liar_idx, 1, "k", sub), Some((quota, quota)));
    assert_eq!(me.table().count(1, "k", T0), 15);
    // Inflating someone else's admissions over-counts, by at most the quota.
    let d = forged(T0, vec![honest.clone()], "k", vec![(0, u64::MAX, 0)]);
    assert_eq!(me.on_delta(&liar, &d, T0).clamped, 1);
    assert_eq!(me.table().count(1, "k", T0), 5 + quota);
    // The honest peer's own refund still counts.
    let d = forged(T0, vec![honest.clone()], "k", vec![(0, 10, 4)]);
    me.on_delta(&honest, &d, T0);
    assert_eq!(me.table().count(1, "k", T0), 5 + quota - 4);
}

#[test]
fn acks_cannot_settle_what_was_not_sent() {
    let mut me = node(0, 2, spec(), 10);
    let peer = actor(1);
    me.set_peers([peer.clone()]);
    me.on_ack(
        &peer,
        Ack {
            heard_from_you: u64::MAX,
            my_version: 0,
        },
    );
    assert!(me.try_admit(1, "k", T0, 1, 10).unwrap());
    assert_eq!(me.unacked(1, "k", T0), 1, "settled before it was sent");
    let sent = me.deltas_for(&peer, 10, T0);
    me.mark_sent();
    assert_eq!(sent[0].to_version, me.table().version());
    me.on_ack(
        &peer,
        Ack {
            heard_from_you: u64::MAX,
            my_version: 0,
        },
    );
    assert_eq!(me.unacked(1, "k", T0), 0, "what was sent may be settled");
    assert!(me.try_admit(1, "k", T0, 1, 10).unwrap());
    assert_eq!(me.unacked(1, "k", T0), 1);
    assert_eq!(me.acks().clamped_acks(), 2);
}

#[test]
fn an_honest_actor_never_sends_more_than_its_peers_believe() {
    // Admitted and refunded a whole quota in one sub-window: the next admission waits for
    // the next sub-window, as peers would not count it.
    let mut me = node(0, 1, spec(), 3);
    for _ in 0..3 {
        assert!(me.try_admit(1, "k", T0, 1, 3).unwrap());
        assert_eq!(me.refund(1, "k", T0, T0, 1).unwrap(), 1);
    }
    assert!(!me.try_admit(1, "k", T0, 1, 3).unwrap());
    assert!(me.try_admit(1, "k", T0 + SEC, 1, 3).unwrap());
    // A per-call limit above the registered quota is held to the quota.
    let mut me = node(0, 1, spec(), 3);
    let admitted = (0..10)
        .filter(|_| me.try_admit(1, "k", T0, 1, 100).unwrap())
        .count();
    assert_eq!(admitted, 3);
}

/// 100,000 distinct keys over four windows, with the peer restarting (a new actor) every
/// window: after GC the table holds what it held before, and named actors are back to one.
#[test]
fn key_churn_returns_to_baseline() {
    let window = spec().window_us();
    let mut me = node(0, 2, spec(), 1_000);
    let first = actor(1).slot().actor(T0);
    me.set_peers([first]);
    let (base_keys, base_mem) = (me.key_count(), me.memory_bytes());
    let mut now = T0;
    let (mut peak_keys, mut peak_mem) = (0, 0);
    for w in 0..4u64 {
        let peer = actor(1).slot().actor(T0 + w * window);
        me.set_peers([peer.clone()]);
        for k in 0..25_000u64 {
            let key = format!("client-{w}-{k}");
            assert!(me.try_admit(1, &key, now, 1, 1_000).unwrap());
            if k % 100 == 0 {
                let d = forged(now, vec![peer.clone()], &key, vec![(0, 1, 0)]);
                assert_eq!(me.on_delta(&peer, &d, now).cells_changed, 1);
            }
            now += window / 25_000;
        }
        peak_keys = peak_keys.max(me.key_count());
        peak_mem = peak_mem.max(me.memory_bytes());
        me.gc(now);
    }
    me.gc(now + 3 * window);
    let (keys, mem) = (me.key_count(), me.memory_bytes());
    println!(
        "key churn: keys {base_keys} -> peak {peak_keys} -> {keys}; \
         memory_bytes {base_mem} -> peak {peak_mem} -> {mem}"
    );
    assert!(peak_keys >= 25_000);
    assert_eq!(keys, base_keys);
    assert_eq!(me.table().actors().named(), 1);
    assert!(me.log.is_empty());
    // Only the actor table's slack may differ (one freed index): nothing per key or actor.
    assert!(mem <= base_mem + 64, "{base_mem} -> {mem}");
}

#[test]
fn a_full_table_evicts_instead_of_refusing_new_keys() {
    let limits = UsageLimits {
        max_keys: 100,
        max_key_len: 64,
    };
    let mut me = EventualNode::with_limits(
        actor(0),
        slots(2),
        [(1, EventualPolicy::new(10, spec()))],
        limits,
    )
    .unwrap();
    me.set_peers([actor(1)]);
    // 1000 new clients within one window: every key is live, and every one is admitted.
    let mut now = T0;
    for k in 0..1000u64 {
        assert!(
            me.try_admit(1, &format!("k{k}"), now, 1, 10).unwrap(),
            "k{k}"
        );
        now += 5_000;
    }
    assert_eq!(me.key_count(), 100);
    let ev = me.table().evictions();
    println!("cap 100, 1000 live keys: {ev:?}");
    assert_eq!(ev.live, 900);
    assert!(ev.sweeps <= 900 / 64 + 1, "{} sweeps", ev.sweeps);
    // A peer cannot make us forget live usage: its new keys are refused while all are live.
    let peer = actor(1);
    let d = forged(now, vec![peer.clone()], "from-peer", vec![(0, 1, 0)]);
    assert_eq!(me.on_delta(&peer, &d, now).refused, 1);
    // Once keys stop counting, they make room for anyone.
    let later = now + 2 * spec().window_us();
    let d = forged(later, vec![peer.clone()], "from-peer", vec![(0, 1, 0)]);
    assert_eq!(me.on_delta(&peer, &d, later).cells_changed, 1);
    assert!(me.table().evictions().expired > 0);
    assert!(me.key_count() <= 100);
}

/// What the byzantine peer does in one step.
#[derive(Debug, Clone)]
enum Step {
    Advance(u64),
    Admit(usize, u64),
    /// Honest `a` sends its deltas and ack to honest `b`.
    Sync(usize, usize),
    /// Every honest actor sends its deltas and acks to every other, and its deltas to the
    /// byzantine actor (whose acks can then settle them).
    Round,
    /// The byzantine actor sends `a` forged counts: `(which actor, P, N, sub back)`.
    Forge(usize, Vec<(u8, u64, u64)>, u64, u8),
    /// The byzantine actor relays honest `a`'s whole state to honest `b`, every count
    /// refunded (`true`) or inflated to `u64::MAX`.
    Relay(usize, usize, bool),
    /// The byzantine actor acks `a` with anything (every honest actor: `None`).
    Ack(Option<usize>, u64, u64),
    Gc(usize),
}

fn any_count() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..6, Just(u64::MAX), any::<u64>()]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0u64..100).prop_map(Step::Advance),
        // Actor 0 serves most requests, so what others learn of it matters.
        6 => (prop_oneof![3 => Just(0usize), 1 => 1usize..3], 1u64..4)
            .prop_map(|(a, c)| Step::Admit(a, c)),
        3 => (0usize..3, 0usize..3).prop_map(|(a, b)| Step::Sync(a, b)),
        2 => Just(Step::Round),
        3 => (
            0usize..3,
            proptest::collection::vec((0u8..7, any_count(), any_count()), 1..4),
            any_count(),
            0u8..3,
        )
            .prop_map(|(a, c, v, back)| Step::Forge(a, c, v, back)),
        2 => (0usize..3, 0usize..3, any::<bool>()).prop_map(|(a, b, r)| Step::Relay(a, b, r)),
        2 => (proptest::option::of(0usize..3), any_count(), 0u64..4)
            .prop_map(|(a, h, m)| Step::Ack(a, h, m)),
        1 => (0usize..3).prop_map(Step::Gc),
    ]
}

/// Honest `a` sends honest `b` its deltas (chunks of 2) and its ack, delivered at once.
fn sync(nodes: &mut [EventualNode], a: usize, b: usize, now: u64) {
    if a == b {
        return;
    }
    for d in nodes[a].deltas_for(&actor(b), 2, now) {
        nodes[b].on_delta(&actor(a), &d, now);
    }
    let ack = nodes[a].ack_for(&actor(b));
    nodes[b].on_ack(&actor(a), ack);
    nodes[a].mark_sent();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Three honest actors and a byzantine fourth that sends them arbitrary forged counts
    /// (for the honest actors, for the receiver itself, for itself, for fake and future
    /// incarnations, with any `P` and `N`) and arbitrary acks, interleaved with honest
    /// gossip: the honest actors never admit more than the limit plus the byzantine actor's
    /// share (`⌈limit / 4⌉`) in any interval of length `w`.
    #[test]
    fn a_byzantine_peer_gets_at_most_its_share(
        limit in 3u64..40,
        steps in proptest::collection::vec(step(), 1..300),
    ) {
        let (n, byz) = (3usize, 3usize);
        let spec = WindowSpec::new(1_000, 5).unwrap();
        let mut nodes: Vec<EventualNode> = (0..n).map(|i| node(i, n + 1, spec, limit)).collect();
        for node in &mut nodes {
            node.set_peers((0..=n).map(actor));
        }
        let mut now = 1_000_000u64;
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        for s in steps {
            match s {
                Step::Advance(dt) => now += dt,
                Step::Admit(a, cost) => {
                    if nodes[a].try_admit(1, "k", now, cost, limit).unwrap() {
                        admitted.push((now, cost));
                    }
                }
                Step::Sync(a, b) => sync(&mut nodes, a, b, now),
                Step::Round => {
                    for a in 0..n {
                        for b in 0..n {
                            sync(&mut nodes, a, b, now);
                        }
                        nodes[a].deltas_for(&actor(byz), 8, now);
                        nodes[a].mark_sent();
                    }
                }
                Step::Forge(a, counts, version, back) => {
                    let sub = spec.sub_window(now);
                    // Any honest actor (the receiver's own included), itself, an actor of
                    // no configured slot, a future and a plausible retired incarnation.
                    let actors = vec![
                        actor(0),
                        actor(1),
                        actor(2),
                        actor(byz),
                        Actor::new("fake", "z", 1),
                        actor(0).slot().actor(now + 2 * MAX_INCARNATION_SKEW_US),
                        actor(0).slot().actor(2),
                    ];
                    let d = Delta {
                        from_version: 0,
                        to_version: version,
                        chunk: 0,
                        chunks: 1,
                        actors,
                        policies: vec![PolicyDelta {
                            policy: 1,
                            base_sub: sub.saturating_sub(u64::from(back)),
                            entries: vec![DeltaEntry {
                                key: "k".into(),
                                sub_off: 0,
                                counts: counts.into_iter().map(|(w, p, q)| (u16::from(w), p, q)).collect(),
                            }],
                        }],
                    };
                    nodes[a].on_delta(&actor(byz), &d, now);
                }
                Step::Relay(a, b, refund) => {
                    for mut d in nodes[a].table().full_state_chunks(8, now) {
                        for e in d.policies.iter_mut().flat_map(|p| p.entries.iter_mut()) {
                            for c in &mut e.counts {
                                if refund { c.2 = c.1 } else { c.1 = u64::MAX }
                            }
                        }
                        nodes[b].on_delta(&actor(byz), &d, now);
                    }
                }
                Step::Ack(to, heard, mine) => {
                    for a in to.map_or(0..n, |a| a..a + 1) {
                        nodes[a].on_ack(&actor(byz), Ack { heard_from_you: heard, my_version: mine });
                    }
                }
                Step::Gc(a) => nodes[a].gc(now),
            }
        }
        let w = spec.window_us();
        let share = limit.div_ceil((n + 1) as u64);
        for (i, &(start, _)) in admitted.iter().enumerate() {
            let total: u64 = admitted[i..].iter().take_while(|(t, _)| *t <= start + w).map(|(_, c)| c).sum();
            prop_assert!(total <= limit + share, "{} admitted in [{}, {}] with limit {}", total, start, start + w, limit);
        }
    }
}

/// The attack relayed refunds would allow: actor 0 used the whole limit; the byzantine
/// actor tells the others that actor 0 refunded it all. They must keep refusing.
#[test]
fn a_lying_relay_cannot_unblock_a_key() {
    let (n, byz, limit) = (3usize, 3usize, 20u64);
    let spec = WindowSpec::new(1_000, 5).unwrap();
    let mut nodes: Vec<EventualNode> = (0..n).map(|i| node(i, n + 1, spec, limit)).collect();
    for node in &mut nodes {
        node.set_peers((0..=n).map(actor));
    }
    let round = |nodes: &mut Vec<EventualNode>, now| {
        for a in 0..n {
            for b in 0..n {
                sync(nodes, a, b, now);
            }
        }
        for node in nodes.iter_mut() {
            let v = node.table().version();
            node.note_sent(&actor(byz), v);
            node.on_ack(
                &actor(byz),
                Ack {
                    heard_from_you: v,
                    my_version: 0,
                },
            );
        }
    };
    let now = 1_000_000;
    let mut admitted = 0;
    for _ in 0..100 {
        if nodes[0].try_admit(1, "k", now, 1, limit).unwrap() {
            admitted += 1;
        }
        round(&mut nodes, now);
    }
    assert!(admitted >= limit - 3, "{admitted}");
    let sub = spec.sub_window(now);
    let lie = Delta {
        from_version: 0,
        to_version: 1,
        chunk: 0,
        chunks: 1,
        actors: vec![actor(0)],
        policies: vec![PolicyDelta {
            policy: 1,
            base_sub: sub,
            entries: vec![DeltaEntry {
                key: "k".into(),
                sub_off: 0,
                counts: vec![(0, u64::MAX, u64::MAX)],
            }],
        }],
    };
    for node in &mut nodes[1..] {
        node.on_delta(&actor(byz), &lie, now);
    }
    let mut more = 0;
    for _ in 0..100 {
        for node in &mut nodes[1..] {
            if node.try_admit(1, "k", now, 1, limit).unwrap() {
                more += 1;
            }
        }
        round(&mut nodes, now);
    }
    assert!(
        admitted + more <= limit,
        "{admitted} + {more} admitted with limit {limit}"
    );
}

/// A peer claiming a key's whole quota (its own cell and a relayed one for a third actor):
/// without a local reserve the receiver refuses the key for the window; with a 10% reserve
/// it still admits exactly its reserve, and never more (the lie is not a licence either).
#[test]
fn a_full_quota_claim_leaves_the_local_reserve() {
    let (limit, liar, third) = (100u64, actor(1), actor(2));
    let claim = |now| {
        forged(
            now,
            vec![liar.clone(), third.clone()],
            "k",
            vec![(0, limit, 0), (1, limit, 0)],
        )
    };
    let admitted = |reserve_permille: u16| {
        let policy = EventualPolicy {
            reserve_permille,
            ..EventualPolicy::new(limit, spec())
        };
        let slots = vec![actor(0).slot(), liar.slot(), third.slot()];
        let mut me = EventualNode::new(actor(0), slots, [(1, policy)]).unwrap();
        me.set_peers([actor(0), liar.clone(), third.clone()]);
        let report = me.on_delta(&liar, &claim(T0), T0);
        assert_eq!(report.cells_changed, 2);
        assert_eq!(me.table().count(1, "k", T0), 2 * limit);
        (0..50)
            .filter(|i| me.try_admit(1, "k", T0 + i * 1_000, 1, limit).unwrap())
            .count()
    };
    assert_eq!(admitted(0), 0);
    assert_eq!(admitted(100), 10);
    assert_eq!(admitted(1000), 50);
    // Rounded down: 5.5% of 100 is 5.
    assert_eq!(admitted(55), 5);
}

#[test]
fn the_local_reserve_is_a_fraction_of_the_limit_rounded_down() {
    assert_eq!(local_reserve(100, 0), 0);
    assert_eq!(local_reserve(100, 100), 10);
    assert_eq!(local_reserve(9, 100), 0);
    assert_eq!(local_reserve(u64::MAX, 1000), u64::MAX);
    assert_eq!(local_reserve(u64::MAX, u16::MAX), u64::MAX);
    assert_eq!(local_reserve(7, 500), 3);
}

/// The reserve is spent by our own admissions, settled or not: with full gossip rounds (every
/// admission acknowledged by the honest peer before the next) under a liar's full-quota
/// claim, each honest actor admits exactly its reserve per window, and is told what is left
/// of it (a `remaining` of 0 would make a well-behaved client back off from what it is
/// granted).
#[test]
fn settled_admissions_use_the_reserve_up_and_remaining_reports_it() {
    let (limit, byz) = (100u64, 2usize);
    let policy = EventualPolicy {
        reserve_permille: 100,
        ..EventualPolicy::new(limit, spec())
    };
    let mut nodes: Vec<EventualNode> = (0..2)
        .map(|i| EventualNode::new(actor(i), slots(3), [(1, policy)]).unwrap())
        .collect();
    for node in &mut nodes {
        node.set_peers((0..3).map(actor));
    }
    let mut now = T0;
    let claim = forged(now, vec![actor(byz)], "k", vec![(0, limit, 0)]);
    for node in &mut nodes {
        assert_eq!(node.on_delta(&actor(byz), &claim, now).cells_changed, 1);
    }
    let mut admitted = [0u64; 2];
    for _ in 0..30 {
        now += 10_000;
        for i in 0..2 {
            let (ok, remaining) = nodes[i].try_admit_counted(1, "k", now, 1, limit).unwrap();
            if ok {
                admitted[i] += 1;
            }
            assert_eq!(remaining, 10 - admitted[i], "actor {i}");
            assert_eq!(nodes[i].remaining(1, "k", limit, now), remaining);
        }
        sync(&mut nodes, 0, 1, now);
        sync(&mut nodes, 1, 0, now);
        // The liar acknowledges everything too (it would rather we settled).
        for node in &mut nodes {
            let version = node.table().version();
            node.note_sent(&actor(byz), version);
            let ack = Ack {
                heard_from_you: version,
                my_version: 0,
            };
            node.on_ack(&actor(byz), ack);
        }
    }
    assert_eq!(admitted, [10, 10]);
    assert_eq!(
        nodes[0].unacked(1, "k", now),
        0,
        "the rounds settled everything"
    );
}
