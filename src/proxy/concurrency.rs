//! Per-service concurrency limit with a short, bounded queue.
//!
//! An upstream that is slow must not make the gateway hold an unbounded number of requests
//! (memory, file descriptors, and latency for everyone behind them). A few requests may wait
//! briefly for a slot, which absorbs bursts; beyond that, clients get a fast 503 with
//! `Retry-After` and can go elsewhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why no slot was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue was full.
    QueueFull,
    /// The request waited `queue_timeout` without a slot freeing up.
    QueueTimeout,
}

#[derive(Debug)]
pub struct ConcurrencyLimit {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue_size: usize,
    queue_timeout: Duration,
}

impl ConcurrencyLimit {
    pub fn new(limit: usize, queue_size: usize, queue_timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            waiting: AtomicUsize::new(0),
            queue_size,
            queue_timeout,
        }
    }

    /// A slot, held until the permit is dropped (with the response body).
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, Refused> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        // The place in the queue is given back by a guard, not after the await: a client that
        // goes away while it waits drops this future mid-await, and a decrement written after
        // the await would never run, leaving the queue a place shorter for good.
        let place = QueuePlace::take(&self.waiting);
        if place.position >= self.queue_size {
            return Err(Refused::QueueFull);
        }
        let result =
            tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await;
        drop(place);
        match result {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a closed one would mean no slot ever again.
            Ok(Err(_)) | Err(_) => Err(Refused::QueueTimeout),
        }
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

/// One place in the wait queue, held while a request waits and given back on drop.
struct QueuePlace<'a> {
    waiting: &'a AtomicUsize,
    /// How many were waiting before this one.
    position: usize,
}

impl<'a> QueuePlace<'a> {
    fn take(waiting: &'a AtomicUsize) -> Self {
        let position = waiting.fetch_add(1, Ordering::AcqRel);
        Self { waiting, position }
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn excess_beyond_limit_and_queue_is_refused_at_once() {
        let limit = Arc::new(ConcurrencyLimit::new(1, 1, Duration::from_millis(100)));
        let held = limit.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await.map(|_| ()) }
        });
        while limit.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(limit.acquire().await.map(|_| ()), Err(Refused::QueueFull));
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_times_out() {
        let limit = ConcurrencyLimit::new(1, 4, Duration::from_millis(100));
        let _held = limit.acquire().await.unwrap();
        assert_eq!(
            limit.acquire().await.map(|_| ()),
            Err(Refused::QueueTimeout)
        );
        assert_eq!(limit.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_goes_away_gives_its_place_back() {
        let limit = Arc::new(ConcurrencyLimit::new(1, 1, Duration::from_secs(60)));
        let held = limit.acquire().await.unwrap();
        let abandoned = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await.map(|_| ()) }
        });
        while limit.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        // The client disconnects: hyper drops the request's future while it waits.
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        assert_eq!(limit.waiting(), 0);

        // The queue's one place is free again: the next request waits instead of being refused.
        let next = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await.map(|_| ()) }
        });
        while limit.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(next.await.unwrap(), Ok(()));
    }
}
