//! [`RedisStore`]: buckets on one Redis server (a region's primary).
//!
//! All calls share one multiplexed connection (redis-rs's `ConnectionManager`): concurrent
//! decisions are pipelined on one socket instead of waiting for pool slots, and the manager
//! reconnects after the connection drops. See the parent module for the timeout and
//! reconnection policy.

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Value};
use futures_util::future::BoxFuture;

use super::script::{self, BatchDecision};
use super::{Lazy, connect_timeout, store_error};
use crate::store::{BucketOutcome, BucketRequest, BucketStore, StoreError};

/// Token buckets on a single Redis server.
pub struct RedisStore {
    client: Client,
    command_timeout: Duration,
    connection: Lazy<ConnectionManager>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's connection info may hold a password: show only the address.
        f.debug_struct("RedisStore")
            .field(
                "addr",
                &self.client.get_connection_info().addr().to_string(),
            )
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for the Redis at `url` (`redis://[user:password@]host:port[/db]`). Every call
    /// gives up after `command_timeout` (see [`super::DEFAULT_COMMAND_TIMEOUT`]).
    ///
    /// Does not need the server to be up: fails only for an invalid URL. Inside a Tokio
    /// runtime it starts connecting in the background right away; otherwise on first use.
    pub fn new(url: &str, command_timeout: Duration) -> Result<Self, StoreError> {
        let client = Client::open(url)
            .map_err(|error| StoreError::Unavailable(format!("invalid Redis URL: {error}")))?;
        let store = Self {
            client,
            command_timeout,
            connection: Lazy::new(None),
        };
        if tokio::runtime::Handle::try_current().is_ok()
            && let Ok(mut manager) = store.connection.get(|| store.connect())
        {
            // Warm up: establish the connection before the first request needs it. A failure
            // here is fine; the next call tries again.
            let deadline = connect_timeout(command_timeout);
            tokio::spawn(async move {
                let ping = ::redis::cmd("PING");
                let _ =
                    tokio::time::timeout(deadline, ping.query_async::<Value>(&mut manager)).await;
            });
        }
        Ok(store)
    }

    /// The hard deadline of every call.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// Readiness: `PING` answered within the deadline.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.connection
            .guard(self.command_timeout, self.ping_inner())
            .await
    }

    async fn ping_inner(&self) -> Result<(), StoreError> {
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

    /// Decides `batch` with one script run, in this order: each request all or nothing, each
    /// seeing the draws of those before it, all at one Redis `TIME` (returned). Under the
    /// same deadline as [`BucketStore::acquire`].
    pub async fn acquire_batch(
        &self,
        batch: &[&[BucketRequest]],
    ) -> Result<BatchDecision, StoreError> {
        for requests in batch {
            script::check(requests)?;
        }
        self.connection
            .guard(self.command_timeout, self.decide(batch.iter().copied()))
            .await
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
}

impl BucketStore for RedisStore {
    fn acquire<'a>(
        &'a self,
        requests: &'a [BucketRequest],
    ) -> BoxFuture<'a, Result<Vec<BucketOutcome>, StoreError>> {
        Box::pin(async move {
            if requests.is_empty() {
                return Ok(Vec::new());
            }
            script::check(requests)?;
            let batch = std::iter::once(requests);
            let decision = self
                .connection
                .guard(self.command_timeout, self.decide(batch))
                .await?;
            decision
                .outcomes
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::Protocol("a batch of one got no answer".to_owned()))
        })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
