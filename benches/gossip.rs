//! The gossip state machine (`tollgate::gossip::proto::Gossip::handle`) receiving a
//! `Message::Delta` of 1,000 keys from a connected peer: the per-message work of a gateway's
//! gossip task besides QUIC and the codec (merge, ack bookkeeping, peer state).
//!
//! `cargo bench --bench gossip -- --warm-up-time 1 --measurement-time 3`

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;

use common::{NOW, POLICY, delta_from, keys, set_counts, window};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tollgate::crdt::{Ack, EventualPolicy, Slot};
use tollgate::gossip::proto::{Gossip, GossipConfig, Message, PeerId, PeerStatus, Policies};

const DIGEST: u64 = 0xBE7C_4000;

fn slots() -> Vec<Slot> {
    vec![Slot::new("us-east", "a"), Slot::new("eu-west", "a")]
}

fn node(slot: &Slot, seed: u64) -> Gossip {
    Gossip::new(
        slot.actor(1),
        slots(),
        GossipConfig::default(),
        Policies {
            eventual: vec![(POLICY, EventualPolicy::unbounded(window()))],
            strict: Vec::new(),
        },
        DIGEST,
        seed,
        NOW,
    )
    .expect("valid slots and actor")
}

/// Two machines that have connected and exchanged `Hello`s (and what follows them) the way
/// the QUIC driver would, as `src/gossip/proto/tests.rs` does over its simulated network.
fn connected_pair() -> (Gossip, Gossip) {
    let (mut a, mut b) = (node(&slots()[0], 1), node(&slots()[1], 2));
    a.on_connected(PeerId(1), NOW);
    b.on_connected(PeerId(0), NOW);
    loop {
        let mut quiet = true;
        while let Some((_, msg)) = a.poll_transmit(NOW) {
            b.handle(NOW, PeerId(0), msg);
            quiet = false;
        }
        while let Some((_, msg)) = b.poll_transmit(NOW) {
            a.handle(NOW, PeerId(1), msg);
            quiet = false;
        }
        if quiet {
            break;
        }
    }
    for (machine, peer) in [(&a, PeerId(1)), (&b, PeerId(0))] {
        let report = machine
            .peer_status()
            .into_iter()
            .find(|r| r.peer == peer)
            .expect("the peer is configured");
        assert_eq!(report.status, PeerStatus::Ok, "handshake done");
    }
    (a, b)
}

fn bench(c: &mut Criterion) {
    let (mut receiver, sender) = connected_pair();
    let delta = delta_from(sender.actor());
    let ack = Ack::default();
    let key = keys().remove(0);

    let mut group = c.benchmark_group("gossip::handle (Message::Delta, 1,000 keys)");
    // Outside the closure: criterion calls it once per phase, and every delivery must raise
    // the counts above all earlier ones.
    let mut template = delta.clone();
    let mut p = 0;
    group.bench_function("every cell raised", |b| {
        b.iter_batched(
            || {
                p += 1;
                set_counts(&mut template, p);
                Message::Delta {
                    delta: template.clone(),
                    ack,
                }
            },
            |msg| receiver.handle(NOW, PeerId(1), black_box(msg)),
            BatchSize::SmallInput,
        )
    });
    assert_eq!(
        receiver.count(POLICY, &key, NOW),
        p,
        "every delivery merged"
    );
    group.bench_function("duplicate (nothing changes)", |b| {
        b.iter_batched(
            || Message::Delta {
                delta: delta.clone(),
                ack,
            },
            |msg| receiver.handle(NOW, PeerId(1), black_box(msg)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
