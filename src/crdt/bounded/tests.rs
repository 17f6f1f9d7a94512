use super::*;
use proptest::prelude::*;

mod hostile;

const W: u64 = 10_000;

fn spec() -> WindowSpec {
    WindowSpec::new(W, 5).unwrap()
}

fn slots(n: usize) -> Vec<Slot> {
    (0..n).map(|i| Slot::new(format!("r{i}"), "i0")).collect()
}

fn node(n: usize, i: usize, inc: u64, quota: u64, now: u64) -> BoundedTable {
    BoundedTable::new(
        slots(n),
        &slots(n)[i].actor(inc),
        [(
            1,
            StrictPolicy {
                quota,
                spec: spec(),
            },
        )],
        now,
    )
    .unwrap()
}

/// Delivers announces both ways between every pair until everyone has reclaimed.
fn handshake(nodes: &mut [BoundedTable], now: u64) {
    let n = nodes.len();
    for a in 0..n {
        let ann = nodes[a].announce();
        for b in 0..n {
            if a != b {
                for h in nodes[b].on_announce(&ann, now, 2) {
                    nodes[a].on_handover(&h, now);
                }
            }
        }
    }
}

#[test]
fn shares_are_split_deterministically() {
    assert_eq!(
        (0..3).map(|i| initial_share(100, 3, i)).collect::<Vec<_>>(),
        vec![34, 33, 33]
    );
    assert_eq!(initial_share(2, 3, 2), 0);
    assert_eq!(initial_share(7, 0, 0), 7);
}

#[test]
fn construction_is_validated() {
    let me = slots(2)[0].actor(1);
    let pol = [(
        1,
        StrictPolicy {
            quota: 5,
            spec: spec(),
        },
    )];
    assert_eq!(
        BoundedTable::new(vec![], &me, pol, 0).unwrap_err(),
        BoundedError::Slots
    );
    let dup = vec![slots(1)[0].clone(), slots(1)[0].clone()];
    assert_eq!(
        BoundedTable::new(dup, &me, pol, 0).unwrap_err(),
        BoundedError::Slots
    );
    let stranger = Actor::new("zz", "i0", 1);
    assert!(matches!(
        BoundedTable::new(slots(2), &stranger, pol, 0),
        Err(BoundedError::NotASlot(_))
    ));
    assert_eq!(
        BoundedTable::new(slots(2), &slots(2)[0].actor(0), pol, 0).unwrap_err(),
        BoundedError::Incarnation
    );
}

#[test]
fn cold_start_waits_then_reclaims_and_transfers() {
    let t0 = 1_000_000;
    let mut nodes: Vec<BoundedTable> = (0..3).map(|i| node(3, i, 1, 100, t0)).collect();
    assert!(!nodes[0].try_admit(1, "k", t0, 1).unwrap());
    // Handovers before the wait are not settled: no reclaim yet.
    handshake(&mut nodes, t0 + 10);
    assert!(!nodes[0].is_reclaimed());
    let later = t0 + W + W / 5;
    handshake(&mut nodes, later);
    assert!(nodes.iter().all(BoundedTable::is_reclaimed));
    assert_eq!(nodes[0].available(1, "k", later), 34);
    assert_eq!(nodes[2].available(1, "k", later), 33);
    for _ in 0..34 {
        assert!(nodes[0].try_admit(1, "k", later, 1).unwrap());
    }
    assert!(!nodes[0].try_admit(1, "k", later, 1).unwrap());
    // Ask slot 1 for 20: it gives half its idle rights at most.
    let ask = nodes[0].ask(1, "k", 20);
    let t = nodes[1].on_ask(&ask, later).unwrap();
    assert_eq!(t.given.total, 16);
    assert_eq!(nodes[1].available(1, "k", later), 17);
    assert_eq!(nodes[0].on_transfer(&t, later), TransferOutcome::Accepted);
    assert_eq!(nodes[0].on_transfer(&t, later), TransferOutcome::Accepted);
    assert_eq!(nodes[0].available(1, "k", later), 16);
    // Consumption returns by our own clock after w + L at most.
    let release = later + W + W / 5;
    assert_eq!(nodes[0].available(1, "k", release), 50);
    assert_eq!(nodes[0].live_consumed(1, "k", release), 0);
    nodes[0].gc(release);
    assert_eq!(nodes[0].key_count(), 1, "transfers keep the key");
    assert_eq!(nodes[1].transfer_to(1, "k", 0), Some(t));
}

#[test]
fn a_restarted_slot_starts_empty_and_rejects_its_predecessor() {
    let t0 = 1_000_000;
    let ready = t0 + W + W / 5;
    let mut nodes: Vec<BoundedTable> = (0..2).map(|i| node(2, i, 1, 10, t0)).collect();
    handshake(&mut nodes, ready);
    // Slot 0 gives 2 to slot 1, but the transfer is delayed; then slot 0 restarts.
    let ask = nodes[1].ask(1, "k", 4);
    let late = nodes[0].on_ask(&ask, ready).unwrap();
    assert_eq!(late.given.total, 2);
    let mut fresh = node(2, 0, 2, 10, ready + 5);
    assert_eq!(fresh.available(1, "k", ready + 5), 0);
    // Slot 1 learns of the new incarnation and hands over (already settled).
    let hs = nodes[1].on_announce(&fresh.announce(), ready + 6, 10);
    assert_eq!(
        nodes[1].on_transfer(&late, ready + 7),
        TransferOutcome::Stale
    );
    for h in &hs {
        fresh.on_handover(h, ready + 8);
    }
    assert!(
        !fresh.is_reclaimed(),
        "must wait a window plus a sub-window"
    );
    let after = ready + 5 + W + W / 5;
    fresh.tick(after);
    assert!(fresh.is_reclaimed());
    // The lost gift of 2 was never counted by slot 1, so the slot gets its whole share.
    assert_eq!(fresh.available(1, "k", after), 5);
    assert_eq!(nodes[1].available(1, "k", after), 5);
    // The old incarnation is a zombie once it hears of its successor.
    let ann = fresh.announce();
    nodes[0].on_announce(&ann, after, 10);
    assert!(!nodes[0].is_superseded(), "a peer's word is not enough");
    nodes[0].on_own_newer_incarnation(ann.incarnation);
    assert!(nodes[0].is_superseded());
    assert!(!nodes[0].try_admit(1, "k", after, 1).unwrap());
    assert_eq!(nodes[1].stats().stale, 1);
}

/// Sends `to`'s announce to `from` and delivers the handover back.
fn hand_over(from: &mut BoundedTable, to: &mut BoundedTable, now_from: u64, now_to: u64) {
    for h in from.on_announce(&to.announce(), now_from, 10) {
        to.on_handover(&h, now_to);
    }
}

/// Why handovers must be *settled*: B's old incarnation consumes rights that A's old
/// incarnation gave it, after A restarted, then dies itself. B's new incarnation knows
/// nothing of those rights; if A's new incarnation took its share back on B's word before
/// B's predecessor's admissions expired, both would be live at once.
#[test]
fn a_handover_counts_only_once_the_senders_predecessor_expired() {
    let l = W / 5;
    let t0 = 1_000_000;
    let ready = t0 + W + l;
    let mut a1 = node(2, 0, 1, 20, t0);
    let mut b1 = node(2, 1, 1, 20, t0);
    hand_over(&mut a1, &mut b1, ready, ready);
    hand_over(&mut b1, &mut a1, ready, ready);
    let gift = a1.on_ask(&b1.ask(1, "k", 10), ready).unwrap();
    assert_eq!(b1.on_transfer(&gift, ready), TransferOutcome::Accepted);
    // A restarts; a sub-window later B, not yet aware, uses all 15 rights, then dies.
    let t1 = ready + 100;
    let mut a2 = node(2, 0, 2, 20, t1);
    let mut admitted = 0;
    while b1.try_admit(1, "k", t1 + l + 100, 1).unwrap() {
        admitted += 1;
    }
    assert_eq!(admitted, 15);
    let t2 = t1 + l + 200;
    let mut b2 = node(2, 1, 2, 20, t2);
    // B2 hands over at once, but its handover is not settled.
    hand_over(&mut b2, &mut a2, t2, t2);
    hand_over(&mut a2, &mut b2, t2, t2);
    let a2_ready = t1 + W + l;
    a2.tick(a2_ready);
    assert!(!a2.is_reclaimed());
    assert!(!a2.try_admit(1, "k", a2_ready, 1).unwrap());
    // Once B2's own wait is over its handover settles, B1's admissions have expired,
    // and A2 gets back the whole share, the lost gift included.
    let b2_ready = t2 + W + l;
    assert!(b1.live_consumed(1, "k", b2_ready) == 0);
    hand_over(&mut b2, &mut a2, b2_ready, b2_ready);
    hand_over(&mut a2, &mut b2, b2_ready, b2_ready);
    assert!(a2.is_reclaimed() && b2.is_reclaimed());
    assert_eq!(
        a2.available(1, "k", b2_ready) + b2.available(1, "k", b2_ready),
        20
    );
}

/// Why a new incarnation refuses, before it reclaims, gifts addressed to its predecessor:
/// such a gift may come from a dead giver whose successor already reclaimed without
/// counting it.
#[test]
fn a_fresh_incarnation_refuses_gifts_addressed_to_its_predecessor() {
    let l = W / 5;
    let t0 = 1_000_000;
    let ready = t0 + W + l;
    let mut a1 = node(2, 0, 1, 20, t0);
    let mut b1 = node(2, 1, 1, 20, t0);
    hand_over(&mut a1, &mut b1, ready, ready);
    hand_over(&mut b1, &mut a1, ready, ready);
    // A1 gives 5 to B1, but the transfer is delayed; A1 dies.
    let late = a1.on_ask(&b1.ask(1, "k", 10), ready).unwrap();
    let t1 = ready + 10;
    let mut a2 = node(2, 0, 2, 20, t1);
    // B1 (settled) hands over to A2, which reclaims its whole share: the gift is lost.
    hand_over(&mut b1, &mut a2, t1, t1);
    a2.tick(t1 + W + l);
    assert!(a2.is_reclaimed());
    assert_eq!(a2.available(1, "k", t1 + W + l), 10);
    // B restarts; the late gift reaches B2, which has never heard of A2.
    let t2 = t1 + W + l + 10;
    let mut b2 = node(2, 1, 2, 20, t2);
    assert_eq!(b2.on_transfer(&late, t2), TransferOutcome::NotAddressed);
    hand_over(&mut a2, &mut b2, t2, t2);
    hand_over(&mut b2, &mut a2, t2 + W + l, t2 + W + l);
    b2.tick(t2 + W + l);
    assert!(b2.is_reclaimed());
    let now = t2 + W + l;
    assert_eq!(a2.available(1, "k", now) + b2.available(1, "k", now), 20);
    // After reclaiming, B2 knows A2 and rejects A1's transfer as stale.
    assert_eq!(b2.on_transfer(&late, now), TransferOutcome::Stale);
}

#[test]
fn malformed_input_is_refused() {
    let mut a = node(2, 0, 1, 10, 0);
    let bad = Transfer {
        policy: 1,
        key: "k".into(),
        from: 9,
        from_incarnation: 1,
        to: 0,
        given: Col {
            total: 1,
            to_inc: 1,
            base: 0,
            ..Col::default()
        },
    };
    assert_eq!(a.on_transfer(&bad, 0), TransferOutcome::Refused);
    let inverted = Transfer {
        from: 1,
        given: Col {
            total: 1,
            to_inc: 1,
            base: 5,
            ..Col::default()
        },
        ..bad.clone()
    };
    assert_eq!(a.on_transfer(&inverted, 0), TransferOutcome::Refused);
    let long = Transfer {
        from: 1,
        key: "x".repeat(MAX_KEY_LEN + 1),
        ..bad.clone()
    };
    assert_eq!(a.on_transfer(&long, 0), TransferOutcome::Refused);
    let unknown = Transfer {
        from: 1,
        policy: 77,
        ..bad.clone()
    };
    assert_eq!(a.on_transfer(&unknown, 0), TransferOutcome::Refused);
    let ok = Transfer {
        from: 1,
        ..bad.clone()
    };
    assert_eq!(a.on_transfer(&ok, 0), TransferOutcome::Accepted);
    assert_eq!(
        a.available(1, "k", 0),
        1,
        "addressed rights are usable at once"
    );
    let elsewhere = Transfer {
        from: 1,
        given: Col {
            total: 3,
            to_inc: 0,
            base: 0,
            ..Col::default()
        },
        ..bad.clone()
    };
    assert_eq!(a.on_transfer(&elsewhere, 0), TransferOutcome::NotAddressed);
    a.on_handover(
        &Handover {
            from: 1,
            from_incarnation: 1,
            to: 0,
            to_incarnation: 1,
            settled: true,
            chunk: 3,
            chunks: 1,
            entries: vec![],
            floor: 0,
        },
        0,
    );
    assert!(
        a.on_announce(
            &Announce {
                slot: 40,
                incarnation: 1,
                want_handover: true
            },
            0,
            1
        )
        .is_empty()
    );
    let s = a.stats();
    assert_eq!((s.malformed, s.refused, s.not_addressed), (4, 2, 1));
    let newer = Transfer {
        from: 1,
        given: Col {
            total: 1,
            to_inc: 2,
            base: 0,
            ..Col::default()
        },
        ..bad
    };
    assert_eq!(a.on_transfer(&newer, 0), TransferOutcome::Refused);
    assert!(!a.is_superseded());
    assert_eq!(a.stats().future, 1);
}

/// A message in flight, addressed to a slot (delivered to its current incarnation).
#[derive(Debug, Clone)]
enum Msg {
    Announce(Announce),
    Ask(Ask),
    Transfer(Transfer),
    Handover(Handover),
    Settled(Settled),
}

impl From<Outgoing> for Msg {
    fn from(o: Outgoing) -> Msg {
        match o {
            Outgoing::Announce(_, a) => Msg::Announce(a),
            Outgoing::Transfer(t) => Msg::Transfer(t),
            Outgoing::Settled(s) => Msg::Settled(s),
        }
    }
}

/// The most slots the model runs (slot indices in [`step`] are drawn below it).
const MAX_MODEL_SLOTS: usize = 5;

/// The keys of the model: rights and limits are per key, so two keys exercise the table
/// (and its eviction) without making the run slower to shrink.
const KEYS: [&str; 2] = ["k", "j"];

#[derive(Debug, Clone)]
enum Step {
    Advance(u64),
    Admit(usize, u64, usize),
    Ask(usize, usize, u64, usize),
    Announce(usize),
    Resend(usize, usize, usize),
    Deliver(prop::sample::Index, bool),
    Drop(prop::sample::Index),
    Restart(usize, u64),
    Partition(usize, usize),
    Gc(usize),
    /// Refund a past admission (the request was refused by another policy).
    Refund(prop::sample::Index),
    /// Graceful shutdown of a slot, handing its rights to another.
    Retire(usize, usize),
    /// The byzantine slot (if any) sends an arbitrary message to a slot.
    Forge(usize, Forged),
    /// A settle pass over a few keys of a slot.
    Settle(usize, usize),
}

/// An arbitrary message from the byzantine slot: which kind, and raw values that the
/// builder maps onto its fields (counts near the quota, the slot's incarnations, extremes).
#[derive(Debug, Clone)]
struct Forged {
    kind: u8,
    key: usize,
    epoch: u64,
    vals: [u64; 6],
    flag: bool,
}

fn forged() -> impl Strategy<Value = Forged> {
    let val = prop_oneof![
        4 => 0u64..40,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => any::<u64>(),
    ];
    (
        0u8..5,
        0usize..KEYS.len(),
        prop_oneof![4 => 0u64..4, 1 => Just(u64::MAX), 1 => any::<u64>()],
        proptest::array::uniform6(val),
        any::<bool>(),
    )
        .prop_map(|(kind, key, epoch, vals, flag)| Forged {
            kind,
            key,
            epoch,
            vals,
            flag,
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..3_000).prop_map(Step::Advance),
        // Quiet spells, in which keys go idle and settle.
        2 => (10_000u64..30_000).prop_map(Step::Advance),
        12 => (0usize..MAX_MODEL_SLOTS, 1u64..4, 0usize..KEYS.len()).prop_map(|(a, c, k)| Step::Admit(a, c, k)),
        6 => (0usize..MAX_MODEL_SLOTS, 0usize..MAX_MODEL_SLOTS, 1u64..30, 0usize..KEYS.len())
            .prop_map(|(a, b, w, k)| Step::Ask(a, b, w, k)),
        4 => (0usize..MAX_MODEL_SLOTS).prop_map(Step::Announce),
        2 => (0usize..MAX_MODEL_SLOTS, 0usize..MAX_MODEL_SLOTS, 0usize..KEYS.len()).prop_map(|(a, b, k)| Step::Resend(a, b, k)),
        20 => (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(i, d)| Step::Deliver(i, d)),
        2 => any::<prop::sample::Index>().prop_map(Step::Drop),
        // Rare enough that slots usually get to reclaim between restarts.
        1 => (0usize..MAX_MODEL_SLOTS * MAX_MODEL_SLOTS, 0u64..50_000).prop_map(|(a, o)| Step::Restart(a, o)),
        1 => (0usize..MAX_MODEL_SLOTS, 0usize..MAX_MODEL_SLOTS).prop_map(|(a, b)| Step::Partition(a, b)),
        1 => (0usize..MAX_MODEL_SLOTS).prop_map(Step::Gc),
        2 => any::<prop::sample::Index>().prop_map(Step::Refund),
        1 => (0usize..MAX_MODEL_SLOTS, 0usize..MAX_MODEL_SLOTS).prop_map(|(a, b)| Step::Retire(a, b)),
        4 => (0usize..MAX_MODEL_SLOTS, forged()).prop_map(|(a, f)| Step::Forge(a, f)),
        6 => (0usize..MAX_MODEL_SLOTS, 1usize..3).prop_map(|(a, k)| Step::Settle(a, k)),
    ]
}

/// One simulated slot: its current incarnation and that incarnation's clock offset.
struct Sim {
    node: BoundedTable,
    offset: u64,
}

/// Builds the byzantine slot's message for `to` from raw values.
fn forge(f: &Forged, byz: &BoundedTable, to: &BoundedTable) -> Msg {
    let [a, b, c, d, e, g] = f.vals;
    let key = KEYS[f.key].to_owned();
    let (from, to_slot) = (byz.my_slot(), to.my_slot());
    // Incarnations: its own (current, next, extreme) and the receiver's (current, next).
    let own_inc = |v: u64| match v % 4 {
        0 | 1 => byz.incarnation(),
        2 => byz.incarnation() + 1,
        _ => v,
    };
    let their_inc = |v: u64| match v % 3 {
        0 | 1 => to.incarnation(),
        _ => to.incarnation() + 1,
    };
    let col = |total: u64, base: u64, inc: u64| Col {
        total,
        to_inc: their_inc(inc),
        base: if base.is_multiple_of(2) { 0 } else { base },
        epoch: f.epoch,
    };
    match f.kind {
        0 => Msg::Transfer(Transfer {
            policy: 1,
            key,
            from,
            from_incarnation: own_inc(a),
            to: to_slot,
            given: col(b, c, d),
        }),
        1 => Msg::Handover(Handover {
            from,
            from_incarnation: own_inc(a),
            to: to_slot,
            to_incarnation: their_inc(d),
            settled: f.flag,
            chunk: 0,
            chunks: 1,
            entries: vec![HandoverEntry {
                policy: 1,
                key,
                you_gave_me: Col {
                    total: e,
                    to_inc: own_inc(g),
                    base: 0,
                    epoch: f.epoch,
                },
                i_gave_you: col(b, c, d),
            }],
            floor: e % 4,
        }),
        4 => Msg::Settled(Settled {
            policy: 1,
            key,
            from,
            from_incarnation: own_inc(a),
            to: to_slot,
            epoch: f.epoch,
        }),
        2 => Msg::Ask(Ask {
            policy: 1,
            key,
            slot: from,
            incarnation: own_inc(a),
            want: b,
        }),
        _ => Msg::Announce(Announce {
            // Now and then in the receiver's own name.
            slot: if c % 3 == 0 { to_slot } else { from },
            incarnation: if c % 3 == 0 {
                to.incarnation() + 1
            } else {
                own_inc(a)
            },
            want_handover: f.flag,
        }),
    }
}

/// Runs the model; with `byzantine`, the last slot also sends arbitrary messages and its own
/// admissions and rights are left out of the checks, whose bound grows by what the module
/// docs say a byzantine slot can obtain for the others: `(n − 1) · gift_bound − share`, at
/// most its share (none for two slots).
fn run_model(
    n: usize,
    quota: u64,
    offsets: &[u64],
    steps: Vec<Step>,
    byzantine: bool,
    max_keys: usize,
) -> Result<(), TestCaseError> {
    const BASE: u64 = 1_000_000_000;
    let byz = (byzantine && n >= 2).then_some(n - 1);
    let honest = |i: usize| Some(i) != byz;
    let bound = match byz {
        Some(b) => {
            let share = initial_share(quota, n, b);
            let bound = quota + (n as u64 - 1) * gift_bound(quota, n, b) - share;
            // The property of #13, for every n.
            prop_assert!(bound <= quota + share);
            bound
        }
        None => quota,
    };
    let mut now = 0u64; // reference time
    let fresh = |i: usize, inc: u64, at: u64| {
        let mut node = node(n, i, inc, quota, at);
        node.set_max_keys(max_keys);
        node
    };
    let mut sims: Vec<Sim> = (0..n)
        .map(|i| Sim {
            node: fresh(i, 1, BASE + offsets[i]),
            offset: offsets[i],
        })
        .collect();
    let mut dead: Vec<(usize, Sim)> = Vec::new();
    let mut cut = vec![vec![false; n]; n];
    let mut net: Vec<(usize, usize, Msg)> = Vec::new();
    // Per key: (reference time, cost) of honest admissions.
    let mut admitted: Vec<Vec<(u64, u64)>> = vec![Vec::new(); KEYS.len()];
    // (slot, incarnation, its clock at admission, key, index in `admitted[key]`)
    let mut admissions: Vec<(usize, u64, u64, usize, usize)> = Vec::new();
    let own = |s: &Sim, now: u64| BASE + s.offset + now;
    for st in steps {
        match st {
            Step::Advance(dt) => now += dt,
            Step::Admit(a, cost, k) => {
                let a = a % n;
                let s = &mut sims[a];
                let t = own(s, now);
                if s.node.try_admit(1, KEYS[k], t, cost).unwrap_or(false) && honest(a) {
                    admissions.push((a, s.node.incarnation(), t, k, admitted[k].len()));
                    admitted[k].push((now, cost));
                }
            }
            Step::Ask(a, b, want, k) => {
                let (a, b) = (a % n, b % n);
                if a != b && !cut[a][b] {
                    net.push((a, b, Msg::Ask(sims[a].node.ask(1, KEYS[k], want))));
                }
            }
            Step::Announce(a) => {
                let a = a % n;
                let ann = sims[a].node.announce();
                for (b, &cut_off) in cut[a].iter().enumerate() {
                    if b != a && !cut_off {
                        net.push((a, b, Msg::Announce(ann)));
                    }
                }
            }
            Step::Resend(a, b, k) => {
                let (a, b) = (a % n, b % n);
                if a != b
                    && !cut[a][b]
                    && let Some(t) = sims[a].node.transfer_to(1, KEYS[k], b as u16)
                {
                    net.push((a, b, Msg::Transfer(t)));
                }
            }
            Step::Deliver(i, dup) => {
                if net.is_empty() {
                    continue;
                }
                let i = i.index(net.len());
                let (from, to, msg) = if dup { net[i].clone() } else { net.remove(i) };
                let s = &mut sims[to];
                let t = own(s, now);
                let mut replies = Vec::new();
                match msg {
                    Msg::Announce(a) => {
                        for h in s.node.on_announce(&a, t, 1) {
                            replies.push(Msg::Handover(h));
                        }
                    }
                    Msg::Ask(a) => {
                        if let Some(tr) = s.node.on_ask(&a, t) {
                            replies.push(Msg::Transfer(tr));
                        }
                    }
                    Msg::Transfer(tr) => {
                        s.node.on_transfer(&tr, t);
                    }
                    Msg::Handover(h) => s.node.on_handover(&h, t),
                    Msg::Settled(c) => s.node.on_settled(&c, t),
                }
                if !cut[to][from] {
                    net.extend(replies.into_iter().map(|m| (to, from, m)));
                }
            }
            Step::Drop(i) => {
                if !net.is_empty() {
                    let i = i.index(net.len());
                    net.remove(i);
                }
            }
            Step::Restart(a, offset) => {
                // Four in five restart draws do nothing.
                if a >= MAX_MODEL_SLOTS {
                    continue;
                }
                let a = a % n;
                let inc = sims[a].node.incarnation() + 1;
                let restarted = Sim {
                    node: fresh(a, inc, BASE + offset + now),
                    offset,
                };
                dead.push((a, std::mem::replace(&mut sims[a], restarted)));
            }
            Step::Partition(a, b) => {
                let (a, b) = (a % n, b % n);
                cut[a][b] = !cut[a][b];
                cut[b][a] = cut[a][b];
            }
            Step::Gc(a) => {
                let s = &mut sims[a % n];
                let t = own(s, now);
                s.node.gc(t);
            }
            Step::Refund(i) => {
                if admissions.is_empty() {
                    continue;
                }
                let (a, inc, at, k, idx) = admissions.remove(i.index(admissions.len()));
                let s = &mut sims[a];
                if s.node.incarnation() == inc {
                    let t = own(s, now);
                    let back = s.node.refund(1, KEYS[k], at, admitted[k][idx].1, t);
                    prop_assert!(back <= admitted[k][idx].1);
                    admitted[k][idx].1 -= back;
                }
            }
            Step::Retire(a, b) => {
                let (a, b) = (a % n, b % n);
                let t = own(&sims[a], now);
                for tr in sims[a].node.retire(b as u16, t) {
                    if a != b && !cut[a][b] {
                        net.push((a, b, Msg::Transfer(tr)));
                    }
                }
                prop_assert!(!sims[a].node.try_admit(1, "k", t, 1).unwrap());
            }
            Step::Settle(a, k) => {
                let s = &mut sims[a % n];
                let t = own(s, now);
                s.node.settle(t, k);
            }
            Step::Forge(to, f) => {
                let Some(b) = byz else { continue };
                let to = to % n;
                if to != b {
                    let msg = forge(&f, &sims[b].node, &sims[to].node);
                    net.push((b, to, msg));
                }
            }
        }
        // Whatever the tables queued (settlements, give-backs, announces) goes out now.
        for (a, s) in sims.iter_mut().enumerate() {
            for o in s.node.take_outgoing() {
                let b = usize::from(o.to());
                if b < n && b != a && !cut[a][b] {
                    net.push((a, b, Msg::from(o)));
                }
            }
        }
        // Conservation, on the reference timeline, per key.
        for key in KEYS {
            let held: u64 = sims
                .iter()
                .enumerate()
                .filter(|(i, _)| honest(*i))
                .map(|(_, s)| {
                    let t = own(s, now);
                    s.node.available(1, key, t) + s.node.live_consumed(1, key, t)
                })
                .sum::<u64>()
                + dead
                    .iter()
                    .filter(|(i, _)| honest(*i))
                    .map(|(_, s)| s.node.live_consumed(1, key, own(s, now)))
                    .sum::<u64>();
            prop_assert!(
                held <= bound,
                "{} rights held or live for {} with bound {}",
                held,
                key,
                bound
            );
        }
    }
    if std::env::var("MODEL_STATS").is_ok() {
        let st: Vec<StrictStats> = sims.iter().map(|s| s.node.stats()).collect();
        let settled: usize = sims
            .iter()
            .map(|s| {
                s.node.floor.iter().filter(|&&f| f > 0).count()
                    + s.node
                        .keys
                        .values()
                        .flat_map(|k| k.values())
                        .filter(|kr| {
                            kr.cols
                                .as_ref()
                                .is_some_and(|c| c.given.iter().any(|g| g.epoch > 0))
                        })
                        .count()
            })
            .sum();
        eprintln!(
            "MODEL evicted={} stale_epoch={} unbounded={} future={} budget={} epochs>0={}",
            st.iter().map(|s| s.evicted).sum::<u64>(),
            st.iter().map(|s| s.stale_epoch).sum::<u64>(),
            st.iter().map(|s| s.unbounded).sum::<u64>(),
            st.iter().map(|s| s.future).sum::<u64>(),
            st.iter().map(|s| s.over_budget).sum::<u64>(),
            settled
        );
    }
    for (k, admitted) in admitted.iter().enumerate() {
        for (i, &(start, _)) in admitted.iter().enumerate() {
            let total: u64 = admitted[i..]
                .iter()
                .take_while(|(t, _)| *t <= start + W)
                .map(|(_, c)| c)
                .sum();
            prop_assert!(
                total <= bound,
                "{} admitted for {} in [{}, {}] with bound {}",
                total,
                KEYS[k],
                start,
                start + W,
                bound
            );
        }
    }
    Ok(())
}

/// 512 cases by default; `STRICT_MODEL_CASES` runs more (a longer search).
fn cases() -> u32 {
    std::env::var("STRICT_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// THE property: random admissions on actors with skewed clocks, asks, transfers,
    /// resends, loss, duplication, reordering, delay, partitions and restarts never admit
    /// more than the quota in any interval of length w on the reference timeline, and the
    /// rights held plus live consumption (dead incarnations' included) never exceed the
    /// quota.
    #[test]
    fn strict_never_exceeds_quota(
        n in 1usize..=MAX_MODEL_SLOTS,
        quota in 1u64..30,
        offsets in proptest::collection::vec(0u64..50_000, MAX_MODEL_SLOTS),
        steps in proptest::collection::vec(step(), 50..600),
        max_keys in prop_oneof![Just(1usize), Just(2), Just(DEFAULT_MAX_KEYS)],
    ) {
        run_model(n, quota, &offsets, steps, false, max_keys)?;
    }

    /// The same with the last slot byzantine: besides its honest traffic it sends arbitrary
    /// transfers, handovers, asks and announces (any counts, `u64::MAX` included, its own
    /// and the receivers' future incarnations, announces in the receiver's name). The
    /// honest slots never admit, in any interval of length w, more than
    /// `quota − share_b + (n − 1) · gift_bound_b ≤ quota + share_b` (`share_b` the byzantine
    /// slot's initial share), for two to five slots, and their rights plus live consumption
    /// never exceed that either.
    #[test]
    fn a_byzantine_slot_gains_the_others_at_most_its_share(
        n in 2usize..=MAX_MODEL_SLOTS,
        quota in 1u64..30,
        offsets in proptest::collection::vec(0u64..50_000, MAX_MODEL_SLOTS),
        steps in proptest::collection::vec(step(), 50..600),
        max_keys in prop_oneof![Just(1usize), Just(2), Just(DEFAULT_MAX_KEYS)],
    ) {
        run_model(n, quota, &offsets, steps, true, max_keys)?;
    }
}
