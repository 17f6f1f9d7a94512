//! The eventual-mode CRDT (`tollgate::crdt::UsageTable`) merging a 1,000-key delta, and the
//! gossip codec (`tollgate::gossip::codec`) framing and parsing that delta as sent on the wire.
//!
//! `cargo bench --bench crdt -- --warm-up-time 1 --measurement-time 3`

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;

use common::{KEYS, NOW, POLICY, delta_from, set_counts, window};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tollgate::crdt::{Ack, Actor, UsageTable};
use tollgate::gossip::codec::{DEFAULT_MAX_FRAME, Decoder, encode};
use tollgate::gossip::proto::Message;

fn receiver() -> UsageTable {
    let mut table = UsageTable::new([(POLICY, window())]);
    table
        .intern(&Actor::new("eu-west", "a", 1))
        .expect("a well-formed actor");
    table
}

fn merge(c: &mut Criterion) {
    let delta = delta_from(&Actor::new("us-east", "a", 1));
    let mut group = c.benchmark_group("crdt::merge_delta (1,000 keys)");
    group.bench_function("new keys (empty table)", |b| {
        b.iter_batched_ref(
            receiver,
            |table| table.merge_delta(black_box(&delta), NOW),
            BatchSize::SmallInput,
        )
    });
    // Outside the closure: criterion calls it once per phase, and every merge must find the
    // keys present and raise the counts above all earlier ones.
    let mut table = receiver();
    table.merge_delta(&delta, NOW);
    let mut template = delta.clone();
    let mut p = 1;
    group.bench_function("every cell raised (keys known)", |b| {
        b.iter_batched_ref(
            || {
                p += 1;
                set_counts(&mut template, p);
                template.clone()
            },
            |next| table.merge_delta(black_box(next), NOW),
            BatchSize::SmallInput,
        )
    });
    assert_eq!(
        table.count(POLICY, "ip:10.0.0.0", NOW),
        p,
        "every merge raised"
    );
    group.bench_function("duplicate (nothing changes)", |b| {
        let mut table = receiver();
        table.merge_delta(&delta, NOW);
        b.iter(|| table.merge_delta(black_box(&delta), NOW))
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    let delta = delta_from(&Actor::new("us-east", "a", 1));
    let message = Message::Delta {
        delta,
        ack: Ack {
            heard_from_you: 12_345,
            my_version: 67_890,
        },
    };
    let frame = encode(&message, DEFAULT_MAX_FRAME).expect("the delta fits one frame");
    eprintln!(
        "a {KEYS}-key Message::Delta frames to {} bytes ({:.1} B per key)",
        frame.len(),
        frame.len() as f64 / KEYS as f64
    );
    let mut group = c.benchmark_group("codec (1,000-key delta)");
    group.bench_function("encode", |b| {
        b.iter(|| encode(black_box(&message), DEFAULT_MAX_FRAME))
    });
    group.bench_function("decode", |b| {
        let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
        b.iter(|| {
            decoder.extend(black_box(&frame));
            decoder
                .decode::<Message>()
                .expect("a well-formed frame")
                .expect("a complete frame")
        })
    });
    group.finish();
}

criterion_group!(benches, merge, codec);
criterion_main!(benches);
