//! Hostile peers against the pure core: what an authenticated but misbehaving slot can make
//! an honest table do.

use super::*;

/// Every node of `nodes` reclaimed at `now` (handovers delivered both ways).
fn reclaimed(n: usize, quota: u64) -> (Vec<BoundedTable>, u64) {
    let t0 = 1_000_000;
    let now = t0 + W + W / 5;
    let mut nodes: Vec<BoundedTable> = (0..n).map(|i| node(n, i, 1, quota, t0)).collect();
    for a in 0..n {
        let ann = nodes[a].announce();
        for b in 0..n {
            if a != b {
                for h in nodes[b].on_announce(&ann, now, 10) {
                    nodes[a].on_handover(&h, now);
                }
            }
        }
    }
    assert!(nodes.iter().all(BoundedTable::is_reclaimed));
    (nodes, now)
}

/// Finding 3: a peer's message naming a newer incarnation of *our* slot (as the receiver of
/// a transfer or handover, or as the author of an announce) must not make us a zombie.
#[test]
fn a_peer_cannot_declare_us_superseded() {
    let (mut nodes, now) = reclaimed(2, 10);
    let a = &mut nodes[0];
    let future = Transfer {
        policy: 1,
        key: "k".into(),
        from: 1,
        from_incarnation: 1,
        to: 0,
        given: Col {
            total: 1,
            to_inc: 2,
            base: 0,
            ..Col::default()
        },
    };
    a.on_transfer(&future, now);
    assert!(!a.is_superseded(), "a transfer to our next incarnation");
    a.on_handover(
        &Handover {
            from: 1,
            from_incarnation: 1,
            to: 0,
            to_incarnation: 2,
            settled: true,
            chunk: 0,
            chunks: 1,
            entries: vec![],
            floor: 0,
        },
        now,
    );
    assert!(!a.is_superseded(), "a handover to our next incarnation");
    a.on_announce(
        &Announce {
            slot: 0,
            incarnation: 9,
            want_handover: true,
        },
        now,
        10,
    );
    assert!(!a.is_superseded(), "an announce of our own slot");
    assert!(a.try_admit(1, "k", now, 1).unwrap());
    assert_eq!(a.stats().future, 3);
    // Only the gossip layer, from an authenticated Hello of our own gateway, can say so.
    a.on_own_newer_incarnation(1);
    assert!(!a.is_superseded(), "not newer");
    a.on_own_newer_incarnation(2);
    assert!(a.is_superseded());
    assert!(!a.try_admit(1, "k", now, 1).unwrap());
}

/// Finding 5: a column is believed only as far as its author could honestly have given.
#[test]
fn columns_are_bounded_by_what_the_giver_could_hold() {
    let (mut nodes, now) = reclaimed(3, 30);
    let t = |total: u64| Transfer {
        policy: 1,
        key: "k".into(),
        from: 1,
        from_incarnation: 1,
        to: 0,
        given: Col {
            total,
            to_inc: 1,
            base: 0,
            ..Col::default()
        },
    };
    let a = &mut nodes[0];
    let bad = Transfer {
        given: Col {
            base: 5,
            ..t(4).given
        },
        ..t(4)
    };
    assert_eq!(a.on_transfer(&bad, now), TransferOutcome::Refused);
    assert_eq!(a.available(1, "k", now), 10);
    // A lie is believed up to the truth it could at most have been, no further.
    assert_eq!(a.on_transfer(&t(u64::MAX), now), TransferOutcome::Clipped);
    assert_eq!(a.available(1, "k", now), 20);
    assert_eq!(a.on_transfer(&t(11), now), TransferOutcome::Clipped);
    assert_eq!(a.on_transfer(&t(10), now), TransferOutcome::Accepted);
    assert_eq!(a.available(1, "k", now), 20);
    assert_eq!(
        a.unbounded_by_slot()[1],
        2,
        "every column beyond the bound is counted"
    );
    // What we gave slot 1 is what it may give back on top of its share.
    let ask = nodes[1].ask(1, "k", 4);
    let back = nodes[0].on_ask(&ask, now).unwrap();
    assert_eq!(back.given.total, 4);
    let a = &mut nodes[0];
    assert_eq!(a.on_transfer(&t(15), now), TransferOutcome::Clipped);
    assert_eq!(a.available(1, "k", now), 20);
    assert_eq!(a.on_transfer(&t(14), now), TransferOutcome::Accepted);
    assert_eq!(a.available(1, "k", now), 20);
    // A handover is bounded the same way: what it says we gave it plus its share.
    let mut fresh = node(3, 0, 2, 30, now);
    let entry = |you_gave_me: u64, i_gave_you: u64| HandoverEntry {
        policy: 1,
        key: "k".into(),
        you_gave_me: Col {
            total: you_gave_me,
            to_inc: 1,
            base: 0,
            ..Col::default()
        },
        i_gave_you: Col {
            total: i_gave_you,
            to_inc: 2,
            base: 0,
            ..Col::default()
        },
    };
    let h = Handover {
        from: 1,
        from_incarnation: 1,
        to: 0,
        to_incarnation: 2,
        settled: true,
        chunk: 0,
        chunks: 1,
        entries: vec![entry(0, u64::MAX), entry(3, 14)],
        floor: 0,
    };
    fresh.on_handover(&h, now);
    assert_eq!(fresh.available(1, "k", now), 0, "both entries refused");
    let h = Handover {
        entries: vec![entry(3, 13)],
        ..h
    };
    fresh.on_handover(&h, now);
    // Before reclaiming, a slot's gifts count up to its share only.
    assert_eq!(fresh.available(1, "k", now), 10);
}

/// The double spend among four or more slots: the byzantine slot shows each honest slot the
/// books of an honest giver that gave only to it. Each pair check passes, so what the honest
/// slots accept from it together is the sum of what each accepts alone: with the share as
/// the bound, `(n − 1) · share_b` (the honest slots held `quota + (n − 2) · share_b`). The
/// gift bound holds them to the quota plus its share for every `n`.
#[test]
fn a_share_given_to_each_honest_slot_stays_within_one_share() {
    for (n, quota) in [(3, 200), (4, 200), (5, 200), (4, 7), (5, 9)] {
        let (mut nodes, now) = reclaimed(n, quota);
        let b = 1;
        let (share, bound) = (initial_share(quota, n, b), gift_bound(quota, n, b));
        for to in (0..n).filter(|&i| i != b) {
            let t = |total: u64| Transfer {
                policy: 1,
                key: "k".into(),
                from: b as u16,
                from_incarnation: 1,
                to: to as u16,
                given: Col {
                    total,
                    to_inc: 1,
                    base: 0,
                    ..Col::default()
                },
            };
            let honest = &mut nodes[to];
            if bound < share {
                assert_eq!(honest.on_transfer(&t(share), now), TransferOutcome::Clipped);
                assert_eq!(honest.unbounded_by_slot()[b], 1, "the liar is named");
            }
            assert_eq!(
                honest.on_transfer(&t(bound), now),
                TransferOutcome::Accepted
            );
            assert_eq!(
                honest.unbounded_by_slot().iter().sum::<u64>(),
                u64::from(bound < share)
            );
        }
        let held: u64 = (0..n)
            .filter(|&i| i != b)
            .map(|i| nodes[i].available(1, "k", now))
            .sum();
        assert_eq!(held, quota - share + (n as u64 - 1) * bound, "{n} slots");
        assert!(
            held <= quota + share,
            "{n} slots: {held} held, quota {quota} + {share}"
        );
    }
    // The bound itself: the share among two or three, two thirds of it among four, half
    // among five.
    assert_eq!(
        [2, 3, 4, 5].map(|n| gift_bound(200, n, 1)),
        [100, 67, 33, 20]
    );
}

/// An honest slot's gifts stay within its bound too: among four, a peer asking again and
/// again gets at most two thirds of its share, which every receiver accepts.
#[test]
fn an_honest_giver_gives_within_its_bound() {
    let (mut nodes, now) = reclaimed(4, 200);
    let mut last = None;
    for _ in 0..10 {
        let ask = nodes[0].ask(1, "k", 50);
        if let Some(t) = nodes[1].on_ask(&ask, now) {
            assert_eq!(nodes[0].on_transfer(&t, now), TransferOutcome::Accepted);
            last = Some(t.given.total);
        }
    }
    assert_eq!(last, Some(gift_bound(200, 4, 1)));
    assert_eq!(nodes[1].available(1, "k", now), 50 - 33);
    assert_eq!(nodes[0].available(1, "k", now), 50 + 33);
}

/// Finding 4: a peer's Ask flood must not fill our table: asks for keys we hold nothing for
/// create state only within a per-peer budget, and our own traffic on new keys still gets
/// admitted.
#[test]
fn an_ask_flood_does_not_fill_the_table() {
    let (mut nodes, now) = reclaimed(2, 10);
    nodes[0].set_max_keys(1_000);
    for i in 0..5_000 {
        let ask = nodes[1].ask(1, &format!("flood{i}"), 10);
        let _ = nodes[0].on_ask(&ask, now);
    }
    assert!(
        nodes[0].key_count() <= 500,
        "{} keys after the flood",
        nodes[0].key_count()
    );
    for i in 0..100 {
        assert_eq!(nodes[0].try_admit(1, &format!("mine{i}"), now, 1), Ok(true));
    }
}

/// Delivers every queued message (and what it causes) among `nodes`, in order, at `now`.
fn deliver_all(nodes: &mut [BoundedTable], now: u64) -> usize {
    let mut delivered = 0;
    loop {
        let mut queue: Vec<(usize, Outgoing)> = Vec::new();
        for (a, node) in nodes.iter_mut().enumerate() {
            queue.extend(node.take_outgoing().into_iter().map(|o| (a, o)));
        }
        if queue.is_empty() {
            return delivered;
        }
        for (from, o) in queue {
            delivered += 1;
            let to = usize::from(o.to());
            match o {
                Outgoing::Announce(_, a) => {
                    for h in nodes[to].on_announce(&a, now, 100) {
                        nodes[from].on_handover(&h, now);
                    }
                }
                Outgoing::Transfer(t) => {
                    nodes[to].on_transfer(&t, now);
                }
                Outgoing::Settled(s) => nodes[to].on_settled(&s, now),
            }
        }
    }
}

/// Finding 6: key churn. 100,000 distinct keys over a few windows between three slots,
/// rights moving for every one of them; once idle, settle passes and GC bring every table
/// back to no keys at all, every key's rights summing to exactly its quota throughout.
#[test]
fn key_churn_returns_to_baseline() {
    const KEYS: usize = 100_000;
    const QUOTA: u64 = 10;
    let (mut nodes, mut now) = reclaimed(3, QUOTA);
    deliver_all(&mut nodes, now);
    let key = |i: usize| format!("client-{i}");
    let mut moved = 0;
    for i in 0..KEYS {
        // Spread over four windows.
        if i % (KEYS / 40) == 0 {
            now += W / 10;
        }
        let (a, k) = (i % 3, key(i));
        let mut admitted = 0;
        while nodes[a].try_admit(1, &k, now, 1).unwrap() {
            admitted += 1;
        }
        // Short: ask both peers, as the gossip layer does.
        for b in (0..3).filter(|&b| b != a) {
            let ask = nodes[a].ask(1, &k, 4);
            if let Some(t) = nodes[b].on_ask(&ask, now) {
                moved += 1;
                assert_eq!(nodes[a].on_transfer(&t, now), TransferOutcome::Accepted);
            }
        }
        while nodes[a].try_admit(1, &k, now, 1).unwrap() {
            admitted += 1;
        }
        assert!(admitted as u64 <= QUOTA);
        if i % 997 == 0 {
            let held: u64 = nodes
                .iter()
                .map(|n| n.available(1, &k, now) + n.live_consumed(1, &k, now))
                .sum();
            assert!(held <= QUOTA, "{held} held for {k}");
        }
    }
    let peak: Vec<usize> = nodes.iter().map(BoundedTable::key_count).collect();
    assert!(moved >= KEYS, "rights moved {moved} times");
    assert!(peak.iter().all(|&c| c > KEYS / 3), "{peak:?}");
    // Idle from here: consumption expires, then the pairs settle and the keys go.
    now += W + W / 5 + 1;
    let mut rounds = 0;
    while nodes.iter().any(|n| n.key_count() > 0) {
        rounds += 1;
        assert!(
            rounds < 1_000,
            "still {:?} keys",
            nodes
                .iter()
                .map(BoundedTable::key_count)
                .collect::<Vec<_>>()
        );
        for n in nodes.iter_mut() {
            n.settle(now, 4_096);
        }
        deliver_all(&mut nodes, now);
        for n in nodes.iter_mut() {
            n.gc(now);
        }
        now += 1;
    }
    // Every key is back to the initial split, and new traffic starts from it.
    for i in (0..KEYS).step_by(991) {
        let k = key(i);
        let shares: Vec<u64> = nodes.iter().map(|n| n.available(1, &k, now)).collect();
        assert_eq!(shares, vec![4, 3, 3], "{k}");
    }
    eprintln!(
        "key churn: peak key counts {peak:?}, {moved} transfers, back to 0 after {rounds} settle rounds"
    );
}

/// A column of a newer epoch than our floor creates the key at that epoch: the next column
/// of the same epoch joins it instead of voiding it.
#[test]
fn a_new_key_takes_the_epoch_of_its_first_column() {
    let (mut nodes, now) = reclaimed(2, 10);
    let t = |total: u64| Transfer {
        policy: 1,
        key: "k".into(),
        from: 1,
        from_incarnation: 1,
        to: 0,
        given: Col {
            total,
            to_inc: 1,
            base: 0,
            epoch: 3,
        },
    };
    assert_eq!(nodes[0].on_transfer(&t(2), now), TransferOutcome::Accepted);
    // The peer's certificate for that same epoch voids nothing.
    let cert = Settled {
        policy: 1,
        key: "k".into(),
        from: 1,
        from_incarnation: 1,
        to: 0,
        epoch: 3,
    };
    nodes[0].on_settled(&cert, now);
    assert_eq!(nodes[0].available(1, "k", now), 7);
    assert_eq!(nodes[0].on_transfer(&t(4), now), TransferOutcome::Accepted);
    assert_eq!(nodes[0].available(1, "k", now), 9);
    // An older epoch is refused and answered with ours.
    let old = Transfer {
        given: Col {
            epoch: 2,
            ..t(5).given
        },
        ..t(5)
    };
    assert_eq!(nodes[0].on_transfer(&old, now), TransferOutcome::StaleEpoch);
    let out = nodes[0].take_outgoing();
    assert!(
        out.iter()
            .any(|o| matches!(o, Outgoing::Settled(s) if s.epoch == 3)),
        "{out:?}"
    );
}
