//! The gossip clock: monotonic microseconds anchored at the wall-clock time of a fixed
//! per-process origin (see the driver's "Time").
//!
//! Separate because the driver, the transport's refusal log and anything else that feeds
//! the pure cores a `now_us` must read the same clock.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

fn origin() -> &'static (Instant, u64) {
    static ORIGIN: OnceLock<(Instant, u64)> = OnceLock::new();
    ORIGIN.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            // A clock before 1970 is broken; any fixed start keeps the clock monotonic.
            .unwrap_or(0);
        (Instant::now(), wall)
    })
}

/// The gossip clock in microseconds: monotonic, anchored at the wall-clock time of a fixed
/// per-process origin (see the module docs). Use it for [`Gossip::new`] as well.
pub fn now_us() -> u64 {
    let (start, wall) = origin();
    let elapsed = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    wall.saturating_add(elapsed)
}

pub(crate) fn instant_of(us: u64) -> Instant {
    let (start, wall) = origin();
    *start + Duration::from_micros(us.saturating_sub(*wall))
}
