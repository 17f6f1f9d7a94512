//! The process clock on paused Tokio clocks that read before its origin. Its own test binary:
//! the origin is set once per process, and this test must be the one that sets it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tollgate::clock::now_us;

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

#[test]
fn a_paused_clock_that_reads_before_the_origin_still_moves_with_its_runtime() {
    // The origin is taken a day ahead, on a runtime whose clock was advanced (as a test that
    // advances first and reads the clock later does).
    paused_runtime().block_on(async {
        tokio::time::advance(Duration::from_secs(86_400)).await;
        now_us();
    });
    // A second runtime's clock reads about a day before that origin.
    paused_runtime().block_on(async {
        let before = now_us();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(now_us() - before, 10_000_000);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(now_us() - before, 10_001_000);
    });
}
