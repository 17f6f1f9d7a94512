//! The process clock: every `now_us` the pure cores are given comes from here.
//!
//! One time type throughout: `u64` microseconds on a monotonic clock anchored at the
//! wall-clock time of a fixed per-process origin. Monotonic, so a bucket or a breaker never
//! sees time run backwards when NTP steps the wall clock; wall-anchored, so gossip peers
//! compare sub-windows and incarnations on roughly the same scale (see the gossip driver's
//! "Time"). Durations in the config are `Duration`s until they meet the clock. Only JWT
//! validity is judged on the wall clock itself ([`unix_secs`]): a token's `exp` is wall time.
//!
//! On `tokio::time::Instant`, so a paused Tokio test clock drives everything at once.

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

/// The process clock in microseconds: monotonic, anchored at the wall-clock time of a fixed
/// per-process origin (see the module docs).
pub fn now_us() -> u64 {
    let (start, wall) = origin();
    let now = Instant::now();
    match now.checked_duration_since(*start) {
        Some(elapsed) => wall.saturating_add(micros(elapsed)),
        // Only a paused Tokio clock reads before the origin: the origin was taken on another
        // runtime's clock (another test's, or one advanced further). Counting back from it
        // keeps this clock moving with its runtime's instead of standing still until it
        // catches up, which had a breaker in one test wait for a probe that never came due.
        None => wall.saturating_sub(micros(*start - now)),
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

pub(crate) fn instant_of(us: u64) -> Instant {
    let (start, wall) = origin();
    match us.checked_sub(*wall) {
        Some(after) => *start + Duration::from_micros(after),
        // Before the origin (see `now_us`); an instant the platform cannot represent is the
        // origin itself, the earliest this process's clock normally reads.
        None => start
            .checked_sub(Duration::from_micros(wall - us))
            .unwrap_or(*start),
    }
}

/// Seconds since the Unix epoch on the wall clock (0 if the clock is before 1970), for
/// credentials whose validity is stated in wall time.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
