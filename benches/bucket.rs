//! GCRA bucket math (`tollgate::limit::bucket`): the arithmetic every regional decision runs,
//! in the in-memory store and the `local` fallback (Redis runs the same formula in Lua); and
//! a hot key's lease (`tollgate::limit::lease`), which decides instead of Redis.
//!
//! `cargo bench --bench bucket -- --warm-up-time 1 --measurement-time 3`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::limit::bucket::{BucketSpec, decide, refund};
use tollgate::limit::lease::{Draw, Leases};
use tollgate::store::BucketOutcome;

const SEC: u64 = 1_000_000;
/// A realistic wall-clock instant (2025), so the numbers are as large as in production.
const NOW: u64 = 1_750_000_000 * SEC;

fn bench(c: &mut Criterion) {
    // 100 per 10 s with a burst of 20, like the demo's per-client policy.
    let spec = BucketSpec::new(100, 10 * SEC, 20);
    let mut group = c.benchmark_group("bucket");
    group.bench_function("decide/admit (half-full bucket)", |b| {
        let tat = NOW + 10 * spec.interval_us;
        b.iter(|| {
            decide(
                black_box(spec),
                black_box(tat),
                black_box(NOW),
                black_box(1),
            )
        })
    });
    group.bench_function("decide/reject (empty bucket)", |b| {
        let tat = NOW + spec.full_refill_us();
        b.iter(|| {
            decide(
                black_box(spec),
                black_box(tat),
                black_box(NOW),
                black_box(1),
            )
        })
    });
    group.bench_function("decide/stream of 1,000 at 1 ms", |b| {
        // A client sending faster than the rate: admissions drain the burst, then refusals.
        b.iter(|| {
            let mut tat = 0;
            let mut admitted = 0u32;
            for i in 0..1_000 {
                let d = decide(spec, tat, NOW + i * 1_000, 1);
                tat = d.tat_us;
                admitted += u32::from(d.admitted);
            }
            black_box(admitted)
        })
    });
    group.bench_function("refund", |b| {
        let tat = NOW + 10 * spec.interval_us;
        b.iter(|| {
            refund(
                black_box(spec),
                black_box(tat),
                black_box(NOW),
                black_box(1),
            )
        })
    });
    group.bench_function("lease draw, served (one of 10,000 hot keys)", |b| {
        // The table the gateway keeps: many hot keys, each with a lease far from empty.
        let mut leases = Leases::default();
        let keys: Vec<String> = (0..10_000)
            .map(|i| format!("tollgate:rl:{{ip:10.0.{}.{}}}:per-client", i / 256, i % 256))
            .collect();
        let granted = BucketOutcome {
            admitted: true,
            remaining: 1_000_000,
            next_token_us: 0,
            retry_after_us: 0,
        };
        for key in &keys {
            leases.answered(key, u64::MAX / 2, granted, 0);
        }
        let key = &keys[4_321];
        b.iter(|| {
            let draw = leases.draw(black_box(key), 1, 64, black_box(1));
            debug_assert!(matches!(draw, Draw::Served(_)));
            draw
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
