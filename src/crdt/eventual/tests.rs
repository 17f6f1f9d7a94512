//! Tests of the rule, the ack bookkeeping and the no-over-admission property.

use super::*;
use crate::crdt::window::WindowSpec;
use proptest::prelude::*;

#[test]
fn rule_arithmetic() {
    // Alone: the whole limit.
    assert!(eventual_admit(10, 9, 9, 1, 1));
    assert!(!eventual_admit(10, 10, 10, 1, 1));
    // Three actors, nothing seen: a third each.
    assert!(eventual_admit(9, 0, 0, 3, 3));
    assert!(!eventual_admit(9, 0, 0, 3, 4));
    assert!(!eventual_admit(9, 3, 3, 3, 1));
    // Settled admissions are headroom used, not a share.
    assert!(eventual_admit(9, 3, 0, 3, 2));
    assert!(!eventual_admit(9, 3, 0, 3, 3));
    assert!(!eventual_admit(5, 50, 0, 3, 1));
    assert!(eventual_admit(u64::MAX, u64::MAX - 1, 0, u32::MAX, 0));
    assert!(!eventual_admit(u64::MAX, 0, u64::MAX, u32::MAX, u64::MAX));
    assert!(eventual_admit(1, 0, 0, 0, 1));
}

pub(super) fn actor(i: usize) -> Actor {
    Actor::new(format!("r{i}"), "i0", 1)
}

/// The configured slots of a deployment of `n` actors `actor(0..n)`.
pub(super) fn slots(n: usize) -> Vec<Slot> {
    (0..n).map(|i| actor(i).slot()).collect()
}

/// Node `i` of `n`, counting policy 1 with `spec` under `quota`.
pub(super) fn node(i: usize, n: usize, spec: WindowSpec, quota: u64) -> EventualNode {
    EventualNode::new(actor(i), slots(n), [(1, EventualPolicy::new(quota, spec))]).unwrap()
}

#[test]
fn acks_count_only_with_the_ackers_state() {
    let mut book = AckBook::new();
    book.set_peers([actor(1)]);
    assert_eq!(book.n_actors(), 2);
    book.note_sent(&actor(1), 5);
    // The peer says it merged our version 5, as of its version 3, which we do not have.
    book.on_ack(
        &actor(1),
        Ack {
            heard_from_you: 5,
            my_version: 3,
        },
    );
    assert_eq!(book.confirmed_by(&actor(1)), 5);
    assert_eq!(book.settled_version(), 0);
    let delta = |from, to, chunk, chunks| Delta {
        from_version: from,
        to_version: to,
        chunk,
        chunks,
        actors: vec![],
        policies: vec![],
    };
    // Chunk 1 of 2 alone proves nothing; in order, both do.
    assert!(!book.on_delta(&actor(1), &delta(0, 3, 1, 2)));
    assert!(!book.on_delta(&actor(1), &delta(0, 3, 0, 2)));
    assert!(book.on_delta(&actor(1), &delta(0, 3, 1, 2)));
    assert_eq!(book.heard_from(&actor(1)), 3);
    assert_eq!(book.settled_version(), 5);
    // A gap (from 4 > heard 3) does not advance.
    assert!(!book.on_delta(&actor(1), &delta(4, 9, 0, 1)));
    assert!(!book.on_delta(&actor(1), &delta(0, 0, 1, 1)));
    assert_eq!(
        book.ack_for(&actor(1), 7),
        Ack {
            heard_from_you: 3,
            my_version: 7
        }
    );
    // Unknown peers are ignored.
    book.on_ack(
        &actor(9),
        Ack {
            heard_from_you: 99,
            my_version: 0,
        },
    );
    assert_eq!(book.confirmed_by(&actor(9)), 0);
    book.set_peers([]);
    assert_eq!(book.settled_version(), u64::MAX);
}

#[test]
fn pending_acks_are_bounded() {
    let mut book = AckBook::new();
    book.set_peers([actor(1)]);
    book.note_sent(&actor(1), 20);
    for v in 1..=20 {
        book.on_ack(
            &actor(1),
            Ack {
                heard_from_you: v,
                my_version: v,
            },
        );
    }
    assert_eq!(book.peers[&actor(1)].pending.len(), MAX_PENDING_ACKS);
}

#[test]
fn unacked_log_buckets_and_prunes() {
    let mut log = UnackedLog::new();
    log.on_admit(1, "k", 10, 1, 2);
    log.on_admit(1, "k", 10, 2, 1);
    log.on_sent(2);
    log.on_admit(1, "k", 10, 3, 4);
    assert_eq!(log.unacked(1, "k", 0, 0), 7);
    assert_eq!(log.unacked(1, "k", 0, 2), 4);
    assert_eq!(log.unacked(1, "k", 11, 0), 0);
    for v in 4..40 {
        log.on_sent(v);
        log.on_admit(1, "k", 10 + v, v + 1, 1);
    }
    assert!(log.policies[&1]["k"].len() <= MAX_BUCKETS);
    assert_eq!(log.unacked(1, "k", 0, 0), 7 + 36);
    log.prune(40, |_| 0);
    assert!(log.is_empty());
}

/// A message in flight between eventual nodes.
#[derive(Debug, Clone)]
enum Msg {
    Delta(Delta),
    Ack(Ack),
}

#[derive(Debug, Clone)]
enum Step {
    Advance(u64),
    Admit(usize, u64),
    Send(usize, usize),
    Deliver(prop::sample::Index, bool),
    Drop(prop::sample::Index),
    Gc(usize),
    /// The actor gives back its latest admission (a request admitted, then refused by
    /// another policy or abandoned before it was forwarded).
    Refund(usize),
}

fn step(n: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0u64..150).prop_map(Step::Advance),
        4 => (0..n, 1u64..4).prop_map(|(a, c)| Step::Admit(a, c)),
        3 => (0..n, 0..n).prop_map(|(a, b)| Step::Send(a, b)),
        4 => (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(i, d)| Step::Deliver(i, d)),
        1 => any::<prop::sample::Index>().prop_map(Step::Drop),
        1 => (0..n).prop_map(Step::Gc),
        1 => (0..n).prop_map(Step::Refund),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// N actors apply the rule against their own stale views, with deltas and acks lost,
    /// duplicated, reordered and chunked, and admissions refunded: no interval of length w
    /// ever holds more served requests than the limit, plus each actor's local reserve where
    /// the policy has one.
    #[test]
    fn never_over_admits(
        n in 2usize..5,
        limit in 1u64..40,
        reserve_permille in prop_oneof![Just(0u16), 0u16..=500],
        steps in proptest::collection::vec(step(4), 1..400),
    ) {
        let spec = WindowSpec::new(1_000, 5).unwrap();
        let policy = EventualPolicy { reserve_permille, ..EventualPolicy::new(limit, spec) };
        let mut nodes: Vec<EventualNode> = (0..n)
            .map(|i| EventualNode::new(actor(i), slots(n), [(1, policy)]).unwrap())
            .collect();
        // Each actor's reserve is an excess the rule allows on purpose (see the module docs).
        let bound = limit + n as u64 * local_reserve(limit, reserve_permille);
        for node in &mut nodes {
            node.set_peers((0..n).map(actor));
        }
        let mut now = 1_000_000u64;
        let mut net: Vec<(usize, usize, Msg)> = Vec::new();
        // (when, cost served, by whom): a refund takes back what it refunds.
        let mut admitted: Vec<(u64, u64, usize)> = Vec::new();
        for s in steps {
            match s {
                Step::Advance(dt) => now += dt,
                Step::Admit(a, cost) => {
                    let a = a % n;
                    if nodes[a].try_admit(1, "k", now, cost, limit).unwrap() {
                        admitted.push((now, cost, a));
                    }
                }
                Step::Send(a, b) => {
                    let (a, b) = (a % n, b % n);
                    if a == b { continue; }
                    let peer = actor(b);
                    for d in nodes[a].deltas_for(&peer, 1, now) {
                        net.push((a, b, Msg::Delta(d)));
                    }
                    net.push((a, b, Msg::Ack(nodes[a].ack_for(&peer))));
                    nodes[a].mark_sent();
                }
                Step::Deliver(i, dup) => {
                    if net.is_empty() { continue; }
                    let i = i.index(net.len());
                    let (from, to, msg) = if dup { net[i].clone() } else { net.remove(i) };
                    match msg {
                        Msg::Delta(d) => { nodes[to].on_delta(&actor(from), &d, now); }
                        Msg::Ack(ack) => nodes[to].on_ack(&actor(from), ack),
                    }
                }
                Step::Drop(i) => {
                    if !net.is_empty() {
                        let i = i.index(net.len());
                        net.remove(i);
                    }
                }
                Step::Gc(a) => nodes[a % n].gc(now),
                Step::Refund(a) => {
                    let a = a % n;
                    if let Some(i) = admitted.iter().rposition(|&(_, c, by)| by == a && c > 0) {
                        let (at, cost, _) = admitted[i];
                        let back = nodes[a].refund(1, "k", at, now, cost).unwrap();
                        prop_assert!(back <= cost, "refunded {} of {}", back, cost);
                        admitted[i].1 -= back;
                    }
                }
            }
        }
        let w = spec.window_us();
        for (i, &(start, _, _)) in admitted.iter().enumerate() {
            let total: u64 = admitted[i..].iter().take_while(|(t, _, _)| *t <= start + w).map(|(_, c, _)| c).sum();
            prop_assert!(total <= bound, "{} admitted in [{}, {}] with limit {} and bound {}", total, start, start + w, limit, bound);
        }
    }
}

/// With prompt gossip, one actor serving a key alone gets the whole limit but the last
/// `N − 1`: the rule only holds back admissions not yet acknowledged, and a headroom
/// below `N` gives nobody a whole unit.
#[test]
fn a_lone_busy_actor_gets_the_limit() {
    let spec = WindowSpec::new(10_000, 10).unwrap();
    let mut nodes: Vec<EventualNode> = (0..3).map(|i| node(i, 3, spec, 100)).collect();
    for node in &mut nodes {
        node.set_peers((0..3).map(actor));
    }
    let mut now = 1_000_000;
    let mut admitted = 0;
    for _ in 0..200 {
        now += 10;
        if nodes[0].try_admit(1, "k", now, 1, 100).unwrap() {
            admitted += 1;
        }
        // A full gossip round: 0 -> peers, peers -> 0 (deltas then acks).
        for p in 1..3 {
            for d in nodes[0].deltas_for(&actor(p), 100, now) {
                nodes[p].on_delta(&actor(0), &d, now);
            }
            let ack0 = nodes[0].ack_for(&actor(p));
            nodes[p].on_ack(&actor(0), ack0);
            for d in nodes[p].deltas_for(&actor(0), 100, now) {
                nodes[0].on_delta(&actor(p), &d, now);
            }
            let ack = nodes[p].ack_for(&actor(0));
            nodes[0].on_ack(&actor(p), ack);
        }
        nodes[0].mark_sent();
    }
    assert_eq!(admitted, 100 - 2);
    assert_eq!(nodes[1].table().count(1, "k", now), 98);
    assert_eq!(nodes[0].unacked(1, "k", now), 0);
    nodes[0].gc(now);
    assert!(nodes[0].log.is_empty());
}
