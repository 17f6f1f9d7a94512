//! [`RedisStore`]: buckets on one Redis server (a region's primary).
//!
//! All calls share one multiplexed connection (redis-rs's `ConnectionManager`), which
//! reconnects after the connection drops. Concurrent acquires are not sent one by one: they
//! queue for a batcher task that decides everything waiting with one script run (see the
//! parent module for why, and for the timeout and reconnection policy).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Value};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout_at};

use super::script::{self, BatchDecision};
use super::{Lazy, connect_timeout, store_error};
use crate::store::{BucketOutcome, BucketRequest, BucketStore, StoreError};

/// Most requests one script run decides. A batch blocks Redis while it runs (measured under
/// 2 µs per one-bucket request, so about half a millisecond at the cap), so the cap bounds what
/// one batch adds to everyone's latency, other gateways' included; beyond it the requests
/// simply wait for the next batch.
pub const MAX_BATCH_REQUESTS: usize = 256;

/// Most buckets one script run decides, for requests matching many policies. A batch may pass
/// it by the buckets of its last request (a request is never split).
pub const MAX_BATCH_BUCKETS: usize = 512;

/// Batches sent and not yet answered. With one, a request that arrives while a batch is out
/// waits for its answer and then goes with everything that arrived meanwhile: the batch size
/// follows the load by itself, and a lone request is sent at once (no timer, ever).
const MAX_IN_FLIGHT: usize = 1;

/// Token buckets on a single Redis server.
pub struct RedisStore {
    shared: Arc<Shared>,
    /// The batcher's queue; `None` until a driver runs (the store was made outside a runtime)
    /// and replaced when the driver has stopped (see [`RedisStore::enqueue`]).
    batcher: Mutex<Option<mpsc::UnboundedSender<Job>>>,
}

/// What the store and its batcher share.
struct Shared {
    client: Client,
    command_timeout: Duration,
    connection: Lazy<ConnectionManager>,
}

/// One waiting acquire.
struct Job {
    requests: Vec<BucketRequest>,
    /// When the waiter gives up: a job past it is not sent (nobody would use its answer, and
    /// its tokens would be taken for nothing).
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<BucketOutcome>, StoreError>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's connection info may hold a password: show only the address.
        f.debug_struct("RedisStore")
            .field(
                "addr",
                &self.shared.client.get_connection_info().addr().to_string(),
            )
            .field("command_timeout", &self.shared.command_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for the Redis at `url` (`redis://[user:password@]host:port[/db]`). Every call
    /// gives up after `command_timeout` (see [`super::DEFAULT_COMMAND_TIMEOUT`]).
    ///
    /// Does not need the server to be up: fails only for an invalid URL. Inside a Tokio
    /// runtime it starts connecting and its batcher in the background right away; otherwise
    /// on first use.
    pub fn new(url: &str, command_timeout: Duration) -> Result<Self, StoreError> {
        let client = Client::open(url)
            .map_err(|error| StoreError::Unavailable(format!("invalid Redis URL: {error}")))?;
        let shared = Arc::new(Shared {
            client,
            command_timeout,
            connection: Lazy::new(None),
        });
        let in_runtime = tokio::runtime::Handle::try_current().is_ok();
        let batcher = in_runtime.then(|| spawn_driver(shared.clone()));
        if in_runtime && let Ok(mut manager) = shared.connection.get(|| shared.connect()) {
            // Warm up: establish the connection before the first request needs it. A failure
            // here is fine; the next call tries again.
            let deadline = connect_timeout(command_timeout);
            tokio::spawn(async move {
                let ping = ::redis::cmd("PING");
                let _ =
                    tokio::time::timeout(deadline, ping.query_async::<Value>(&mut manager)).await;
            });
        }
        Ok(Self {
            shared,
            batcher: Mutex::new(batcher),
        })
    }

    /// The hard deadline of every call.
    pub fn command_timeout(&self) -> Duration {
        self.shared.command_timeout
    }

    /// Readiness: `PING` answered within the deadline.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.shared
            .connection
            .guard(self.shared.command_timeout, self.shared.ping())
            .await
    }

    /// Decides `batch` with one script run, in this order, as the batcher does with the
    /// requests it finds waiting, but without the queue: each request all or nothing, each
    /// seeing the draws of those before it, all at one Redis `TIME` (returned). Under the
    /// same deadline as [`BucketStore::acquire`].
    pub async fn acquire_batch(
        &self,
        batch: &[&[BucketRequest]],
    ) -> Result<BatchDecision, StoreError> {
        for requests in batch {
            script::check(requests)?;
        }
        self.shared
            .connection
            .guard(
                self.shared.command_timeout,
                self.shared.decide(batch.iter().copied()),
            )
            .await
    }

    /// Hands `job` to the batcher, starting one if there is none or it stopped (its runtime
    /// shut down, or it panicked: its queue is then closed). Sending on an unbounded queue
    /// never waits, so the lock is held only for that; the queue cannot grow beyond the
    /// acquires started within one `command_timeout`, because the driver drops jobs whose
    /// waiter has given up without sending them.
    fn enqueue(&self, job: Job) -> Result<(), StoreError> {
        let mut batcher = self.batcher.lock().unwrap_or_else(PoisonError::into_inner);
        let job = match batcher.as_ref() {
            Some(queue) => match queue.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::Unavailable(
                "the Redis store must be used inside a Tokio runtime".to_owned(),
            ));
        }
        if batcher.is_some() {
            tracing::warn!("redis store: the batcher had stopped; starting a new one");
        }
        let queue = spawn_driver(self.shared.clone());
        let sent = queue.send(job).map_err(|_| {
            // Only if the runtime dropped the new task at once (it is shutting down).
            StoreError::Unavailable("the Redis store's batcher could not start".to_owned())
        });
        *batcher = Some(queue);
        sent
    }
}

impl Shared {
    async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.get(|| self.connect())?;
        let reply: Value = ::redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .map_err(|error| store_error(error, self.command_timeout))?;
        match reply {
            Value::SimpleString(pong) if pong == "PONG" => Ok(()),
            other => Err(StoreError::Protocol(format!("PING answered {other:?}"))),
        }
    }

    /// A lazy connection manager: it connects on first use, fails a call at once when the
    /// server refuses the connection (no retry loop inside a call), and starts a new
    /// connection attempt whenever a call finds the connection broken.
    fn connect(&self) -> Result<ConnectionManager, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout(self.command_timeout)))
            // The call's own deadline is the response timeout (it also covers waiting for a
            // reconnect, which redis-rs's per-command timeout does not).
            .set_response_timeout(None)
            .set_number_of_retries(0)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|error| store_error(error, self.command_timeout))
    }

    /// One `EVALSHA` of the batch script for `batch` (requests already checked).
    async fn decide<'r>(
        &self,
        batch: impl ExactSizeIterator<Item = &'r [BucketRequest]> + Clone,
    ) -> Result<BatchDecision, StoreError> {
        let sizes: Vec<usize> = batch.clone().map(<[BucketRequest]>::len).collect();
        let invocation = script::batch_invocation(batch);
        let mut connection = self.connection.get(|| self.connect())?;
        let reply = match invocation.invoke_async::<Value>(&mut connection).await {
            // Refused means the command was never sent, so one retry cannot take tokens twice.
            // The failure made the manager start a fresh connection attempt, which this retry
            // awaits: the first call after a restart succeeds instead of reporting the old
            // failure.
            Err(error) if error.is_connection_refusal() => {
                invocation.invoke_async::<Value>(&mut connection).await
            }
            other => other,
        }
        .map_err(|error| store_error(error, self.command_timeout))?;
        script::parse_batch_reply(reply, &sizes)
    }

    /// Sends one batch and answers its waiters. Bounded by the latest waiter's deadline: past
    /// it nobody waits for the answer, and the next batch must not queue behind a frozen
    /// server. The outcome is recorded once per batch (not per waiter) for the
    /// stale-connection rule: a waiter that timed out only because it queued behind busy
    /// batches says nothing about the connection.
    async fn run(&self, batch: Vec<Job>) {
        let Some(deadline) = batch.iter().map(|job| job.deadline).max() else {
            return;
        };
        let requests = batch.iter().map(|job| job.requests.as_slice());
        let result = match timeout_at(deadline, self.decide(requests)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(self.command_timeout)),
        };
        self.connection.record(&result);
        match result {
            Ok(decision) => {
                for (job, outcomes) in batch.into_iter().zip(decision.outcomes) {
                    // The waiter may have given up meanwhile; its answer is then unused.
                    let _ = job.reply.send(Ok(outcomes));
                }
            }
            Err(error) => {
                for job in batch {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Starts a batcher on the current runtime and returns its queue. The driver stops when the
/// queue's senders are gone (the store was dropped), after answering the batches it sent.
fn spawn_driver(shared: Arc<Shared>) -> mpsc::UnboundedSender<Job> {
    let (queue, jobs) = mpsc::unbounded_channel();
    tokio::spawn(drive(shared, jobs));
    queue
}

async fn drive(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            // Answers first: a finished batch frees its slot before more jobs are taken.
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            job = jobs.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(first) = job else { break };
                let batch = collect(first, &mut jobs, shared.command_timeout);
                if !batch.is_empty() {
                    let shared = shared.clone();
                    in_flight.push(async move { shared.run(batch).await });
                }
            }
        }
    }
    while in_flight.next().await.is_some() {}
}

/// `first` and the jobs already queued behind it, up to the caps, in queue order. Jobs whose
/// waiter has given up are left out (and do not count).
fn collect(
    first: Job,
    jobs: &mut mpsc::UnboundedReceiver<Job>,
    command_timeout: Duration,
) -> Vec<Job> {
    let now = Instant::now();
    let mut batch = Vec::new();
    let mut buckets = 0;
    let mut next = Some(first);
    while let Some(job) = next {
        if job.deadline <= now {
            // Answered rather than dropped: the waiter's timer fires at millisecond
            // granularity, so it may still be waiting, and a dropped reply would read as a
            // stopped batcher instead of the timeout it is.
            let _ = job.reply.send(Err(StoreError::Timeout(command_timeout)));
        } else if !job.reply.is_closed() {
            buckets += job.requests.len();
            batch.push(job);
            if batch.len() >= MAX_BATCH_REQUESTS || buckets >= MAX_BATCH_BUCKETS {
                break;
            }
        }
        next = jobs.try_recv().ok();
    }
    batch
}

impl BucketStore for RedisStore {
    fn acquire(
        &self,
        requests: Vec<BucketRequest>,
    ) -> BoxFuture<'_, Result<Vec<BucketOutcome>, StoreError>> {
        Box::pin(async move {
            if requests.is_empty() {
                return Ok(Vec::new());
            }
            // Checked here, so a bad request fails alone instead of failing its batch.
            script::check(&requests)?;
            let timeout = self.shared.command_timeout;
            let deadline = Instant::now() + timeout;
            let (reply, answer) = oneshot::channel();
            self.enqueue(Job {
                requests,
                deadline,
                reply,
            })?;
            match timeout_at(deadline, answer).await {
                Ok(Ok(result)) => result,
                // The driver was dropped with this job (its runtime shut down): the next call
                // starts a new one.
                Ok(Err(_)) => Err(StoreError::Unavailable(
                    "the Redis store's batcher stopped".to_owned(),
                )),
                Err(_) => Err(StoreError::Timeout(timeout)),
            }
        })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn deadline(&self) -> Option<Duration> {
        Some(self.shared.command_timeout)
    }
}
