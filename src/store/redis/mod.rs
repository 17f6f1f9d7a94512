//! Token buckets in Redis: [`RedisStore`] (one server) and [`RedisClusterStore`] (Redis
//! Cluster), both running `store/bucket.lua`.
//!
//! # Why it looks like this
//!
//! - **One script per decision.** All buckets of a request (in one hash slot) are decided and
//!   written by a single `EVALSHA`, which Redis runs alone: no read-modify-write races between
//!   gateways, one round trip, and Redis `TIME` as the one clock all gateways share.
//! - **With one server, one script per batch of concurrent decisions** (group commit). Under
//!   load most of a decision's cost is per command, not per bucket: the `EVALSHA` call, `TIME`,
//!   the client's encoding and decoding. So [`RedisStore`] does not send its own script per
//!   acquire: it queues the request for a batcher task, which takes the first waiting request
//!   and every one already queued behind it and decides them all with one run of the script's
//!   `batch` mode. Measured with 64 concurrent connections through the gateway: about 16
//!   requests per run and Redis CPU per request down from 14 to 6 µs; with 64 tasks calling
//!   the store in-process, client CPU per decision down from 3.9 to 1.9 µs.
//!   - *Exact.* The script reads `TIME` once and decides the requests in queue order, each all
//!     or nothing across its own buckets as a lone `acquire` would, carrying each key's TAT
//!     from one request to the next (the second request on a hot key sees the first's draw),
//!     and writes every changed key once at the end with the same expiry. Each request gets
//!     exactly what deciding them one after another at that `TIME` would give (tested against
//!     the pure [`crate::limit::bucket`] model at the `TIME` the script reports).
//!   - *Latency.* One batch is in flight at a time. A request arriving while none is out is
//!     sent at once, alone: there is no timer and never a wait for company. One arriving while
//!     a batch is out waits for that batch's answer, then goes with everything that queued
//!     meanwhile: at most one batch ahead of it, so the batch size grows with the load by
//!     itself. Two in flight were measured too: smaller batches, more Redis CPU, the same
//!     throughput.
//!   - *The cap.* A batch holds at most [`MAX_BATCH_REQUESTS`] requests and about
//!     [`MAX_BATCH_BUCKETS`] buckets, because Redis runs nothing else while the script runs
//!     (under 2 µs per one-bucket request was measured, about half a millisecond at the cap):
//!     the cap bounds what one batch adds to every other client's latency.
//!   - *Failures.* A failed or timed-out batch fails each of its waiters with the same
//!     [`StoreError`], so the limiter's breaker and `on_store_error` see what they saw before;
//!     a waiter also gives up at its own deadline. Requests whose waiter gave up while queued
//!     are not sent. The batcher is restarted by the next acquire if it stopped (its runtime
//!     shut down, a panic).
//! - **A hard deadline on every call.** A rate limiter sits on the request path: a slow answer
//!   is worse than none, because the limiter can fall back (`on_store_error`). Every acquire
//!   and ping is wrapped in `tokio::time::timeout` (`command_timeout`, 50 ms by default), which
//!   covers the cases redis-rs cannot see: a server frozen with SIGSTOP or a half-open TCP
//!   connection (socket open, no answer), and a reconnect in progress.
//! - **Never blocked by the client's own retries.** redis-rs's reconnect loop is configured
//!   with no connection retries, short connection timeouts and short backoffs: a call while the
//!   server is down fails fast with [`StoreError::Unavailable`] and itself triggers the next
//!   connection attempt, so a restarted server is used again by the next call or two.
//! - **Constructible while Redis is down.** The gateway may start before its Redis; the
//!   connection is made lazily (and warmed up in the background when constructed inside a
//!   Tokio runtime), and calls answer `Unavailable` until it exists.
//! - **Stale connections are replaced.** If calls have only timed out for
//!   [`STALE_CONNECTION_AFTER`], the connection is thrown away and a new one made: a peer that
//!   vanished without a TCP reset (host died, network partition) would otherwise hold the
//!   client on a dead socket for the kernel's retransmission timeout (~15 minutes). For the
//!   single-server store a batch is one call: a waiter that timed out only because it queued
//!   behind slow batches says nothing about the connection.
//!
//! # Known limits
//!
//! - A call that timed out may still have been executed by Redis (it was sent; the answer came
//!   late, e.g. after SIGCONT): its tokens stay taken until they refill. No client can avoid
//!   this without a second round trip. With batching this holds for every request of the
//!   batch.
//! - Only the single-server store batches. [`RedisClusterStore`] still sends one script per
//!   hash tag per request: a batch there would have to be split by slot and node, with one
//!   batcher per node, and requests spanning slots already need the refund path.
//! - The cluster store decides each hash tag atomically, but a request spanning several tags is
//!   all-or-nothing only eventually: admitted tags are refunded when another tag rejects, and
//!   for that short moment other requests see those tokens taken.
//! - Buckets whose `burst`, `interval_us` or `burst * interval_us` exceed 2^52 are refused with
//!   [`StoreError::Protocol`] (Lua computes in doubles; see `bucket.lua`).
//!
//! [`StoreError`]: crate::store::StoreError
//! [`StoreError::Unavailable`]: crate::store::StoreError::Unavailable
//! [`StoreError::Protocol`]: crate::store::StoreError::Protocol

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ::redis::{ErrorKind, RedisError, ServerErrorKind};
use tokio::time::Instant;

use crate::store::StoreError;

mod cluster;
mod script;
mod single;

pub use cluster::RedisClusterStore;
pub use script::BatchDecision;
pub use single::{MAX_BATCH_BUCKETS, MAX_BATCH_REQUESTS, RedisStore};

/// Default hard deadline for one acquire or ping.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(50);

/// If every call has timed out for this long, the connection is replaced by a new one.
pub const STALE_CONNECTION_AFTER: Duration = Duration::from_secs(1);

/// How long one TCP connect (and handshake) to a Redis node may take. Longer than a command
/// (connecting to another region's Redis over TLS takes a few round trips) but short enough
/// that a connection attempt to a frozen or black-holed server is abandoned quickly. Calls
/// never wait for it longer than their own deadline.
fn connect_timeout(command_timeout: Duration) -> Duration {
    command_timeout.clamp(Duration::from_millis(250), Duration::from_secs(1))
}

/// A lazily made connection (a cheap-to-clone handle to a multiplexed connection), replaced
/// when it has gone stale.
struct Lazy<C> {
    state: Mutex<LazyState<C>>,
}

struct LazyState<C> {
    connection: Option<C>,
    /// Since when every call has timed out (`None` after any answer).
    timing_out_since: Option<Instant>,
}

impl<C: Clone> Lazy<C> {
    fn new(connection: Option<C>) -> Self {
        Self {
            state: Mutex::new(LazyState {
                connection,
                timing_out_since: None,
            }),
        }
    }

    /// The current connection, made by `connect` if there is none. Making one spawns
    /// redis-rs's driver task, so outside a Tokio runtime this is `Unavailable`, not a panic.
    fn get(&self, connect: impl FnOnce() -> Result<C, StoreError>) -> Result<C, StoreError> {
        let mut state = self.lock();
        if let Some(connection) = &state.connection {
            return Ok(connection.clone());
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::Unavailable(
                "the Redis store must be used inside a Tokio runtime".to_owned(),
            ));
        }
        let connection = connect()?;
        state.connection = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `call` under the store's hard deadline (`timeout` from now) and notes how it
    /// ended, so every call of every store shares one timeout-and-stale-connection policy.
    async fn guard<T>(
        &self,
        timeout: Duration,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(timeout)),
        };
        self.record(&result);
        result
    }

    /// Notes how a call ended; after [`STALE_CONNECTION_AFTER`] of nothing but timeouts the
    /// connection is dropped so the next call makes a new one.
    fn record<T>(&self, result: &Result<T, StoreError>) {
        let mut state = self.lock();
        match result {
            Err(StoreError::Timeout(_)) => {
                let now = Instant::now();
                match state.timing_out_since {
                    None => state.timing_out_since = Some(now),
                    Some(since) if now.duration_since(since) >= STALE_CONNECTION_AFTER => {
                        tracing::warn!(
                            "redis store: no answer for {:?}; replacing the connection",
                            now.duration_since(since)
                        );
                        state.connection = None;
                        state.timing_out_since = None;
                    }
                    Some(_) => {}
                }
            }
            // Any answer, even an error reply, shows the connection is alive; connection
            // errors are handled by redis-rs's own reconnect.
            _ => state.timing_out_since = None,
        }
    }

    /// The state is two plain fields that are always assigned whole, so a panic elsewhere
    /// while holding the lock cannot leave it inconsistent.
    fn lock(&self) -> std::sync::MutexGuard<'_, LazyState<C>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Maps a redis-rs error to the store's error.
fn store_error(error: RedisError, command_timeout: Duration) -> StoreError {
    if error.is_timeout() {
        return StoreError::Timeout(command_timeout);
    }
    match error.kind() {
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound | ErrorKind::AuthenticationFailed => {
            StoreError::Unavailable(error.to_string())
        }
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::NoPerm,
        ) => StoreError::Unavailable(error.to_string()),
        // BUSY (another script runs too long) and OOM are transient server states.
        ErrorKind::Extension if matches!(error.code(), Some("BUSY" | "OOM")) => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Protocol(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_timeout_is_bounded() {
        assert_eq!(
            connect_timeout(Duration::from_millis(50)),
            Duration::from_millis(250)
        );
        assert_eq!(
            connect_timeout(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn errors_map_to_store_errors() {
        let timeout = Duration::from_millis(50);
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(
            store_error(io, timeout),
            StoreError::Unavailable(_)
        ));
        let timed_out = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(matches!(
            store_error(timed_out, timeout),
            StoreError::Timeout(_)
        ));
        let parse = RedisError::from((ErrorKind::UnexpectedReturnType, "odd"));
        assert!(matches!(
            store_error(parse, timeout),
            StoreError::Protocol(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_only_times_out_is_replaced() {
        let lazy = Lazy::new(Some(7u8));
        let timeout: Result<(), StoreError> = Err(StoreError::Timeout(Duration::from_millis(50)));
        lazy.record(&timeout);
        tokio::time::advance(STALE_CONNECTION_AFTER / 2).await;
        lazy.record(&timeout);
        lazy.record(&Ok(()));
        tokio::time::advance(STALE_CONNECTION_AFTER).await;
        lazy.record(&timeout);
        assert_eq!(
            lazy.get(|| Ok(9)).ok(),
            Some(7),
            "an answer reset the timer"
        );
        tokio::time::advance(STALE_CONNECTION_AFTER).await;
        lazy.record(&timeout);
        assert_eq!(
            lazy.get(|| Ok(9)).ok(),
            Some(9),
            "replaced after a stale second"
        );
    }
}
