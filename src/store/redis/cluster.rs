//! [`RedisClusterStore`]: buckets in Redis Cluster.
//!
//! A Lua script may only touch keys of one hash slot, so a request's buckets are grouped by
//! hash tag (keys with the same `{tag}` share a slot) and each group is decided by one script
//! call, all groups in parallel. Each group is atomic; across groups the store restores
//! all-or-nothing by refunding the groups that admitted when another rejected (or failed).
//! The refund is awaited until the call's deadline, then left to finish in the background, so
//! a call never takes longer than `command_timeout`.

use std::time::Duration;

use ::redis::Value;
use ::redis::cluster::{ClusterClient, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use futures_util::future::{BoxFuture, join_all};
use tokio::time::{Instant, timeout_at};

use super::script::{self, Mode};
use super::{Lazy, connect_timeout, store_error};
use crate::store::{BucketOutcome, BucketRequest, BucketStore, StoreError};

/// Token buckets in a Redis Cluster.
pub struct RedisClusterStore {
    client: ClusterClient,
    command_timeout: Duration,
    connection: Lazy<ClusterConnection>,
}

impl std::fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterStore")
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

/// One group's script answer: its request indices and outcomes (or why there are none).
type GroupResult = (Vec<usize>, Result<Vec<BucketOutcome>, StoreError>);

impl RedisClusterStore {
    /// A store for the cluster reachable through any of `nodes` (`redis://host:port` or
    /// `host:port`; the rest of the topology is discovered). Every call gives up after
    /// `command_timeout`.
    ///
    /// Does not need the cluster to be up: fails only for invalid or no node addresses.
    pub fn new(nodes: &[String], command_timeout: Duration) -> Result<Self, StoreError> {
        if nodes.is_empty() {
            return Err(StoreError::Unavailable(
                "no Redis Cluster nodes configured".to_owned(),
            ));
        }
        let urls: Vec<String> = nodes
            .iter()
            .map(|node| {
                if node.contains("://") {
                    node.clone()
                } else {
                    format!("redis://{node}")
                }
            })
            .collect();
        let client = ClusterClient::builder(urls)
            // Redirects (MOVED/ASK during resharding) and TRYAGAIN are retried a few times with
            // millisecond waits; the call's deadline bounds the total either way.
            .retries(3)
            .min_retry_wait(1)
            .max_retry_wait(20)
            .retry_wait_formula(5, 2)
            .connection_timeout(connect_timeout(command_timeout))
            .build()
            .map_err(|error| {
                StoreError::Unavailable(format!("invalid Redis Cluster nodes: {error}"))
            })?;
        let store = Self {
            client,
            command_timeout,
            connection: Lazy::new(None),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Starts discovering the topology in the background; a failure is retried by the
            // next call.
            let _ = store.connection.get(|| Ok(store.connect()));
        }
        Ok(store)
    }

    /// The hard deadline of every call.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// Readiness: every primary answered `PING` within the deadline.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.connection
            .guard(self.command_timeout, self.ping_inner())
            .await
    }

    async fn ping_inner(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.get(|| Ok(self.connect()))?;
        // PING goes to every primary and succeeds only if all answer.
        let reply: Value = ::redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .map_err(|error| store_error(error, self.command_timeout))?;
        match reply {
            Value::SimpleString(pong) if pong == "PONG" => Ok(()),
            other => Err(StoreError::Protocol(format!("PING answered {other:?}"))),
        }
    }

    /// A connection that discovers the cluster in the background; calls fail until it has.
    fn connect(&self) -> ClusterConnection {
        let config = ClusterConfig::new()
            .set_connection_timeout(connect_timeout(self.command_timeout))
            .set_response_timeout(self.command_timeout);
        self.client.get_pending_async_connection_with_config(config)
    }

    async fn acquire_inner(
        &self,
        requests: &[BucketRequest],
        deadline: Instant,
    ) -> Result<Vec<BucketOutcome>, StoreError> {
        let connection = self.connection.get(|| Ok(self.connect()))?;
        let groups = group_by_tag(requests);
        let calls = groups.into_iter().map(|indices| {
            let mut connection = connection.clone();
            let invocation =
                script::invocation(Mode::Acquire, indices.iter().map(|&i| &requests[i]));
            let command_timeout = self.command_timeout;
            async move {
                let result =
                    match timeout_at(deadline, invocation.invoke_async::<Value>(&mut connection))
                        .await
                    {
                        Ok(Ok(reply)) => script::parse_reply(reply, indices.len()),
                        Ok(Err(error)) => Err(store_error(error, command_timeout)),
                        Err(_) => Err(StoreError::Timeout(command_timeout)),
                    };
                (indices, result)
            }
        });
        let results: Vec<GroupResult> = join_all(calls).await;

        let mut outcomes: Vec<Option<BucketOutcome>> = vec![None; requests.len()];
        let mut admitted_groups = Vec::new();
        let mut first_error = None;
        for (indices, result) in results {
            match result {
                Ok(group) => {
                    let admitted = group.iter().all(|o| o.admitted);
                    for (&i, outcome) in indices.iter().zip(&group) {
                        outcomes[i] = Some(*outcome);
                    }
                    if admitted {
                        admitted_groups.push(indices);
                    }
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        let all_admitted = first_error.is_none()
            && outcomes
                .iter()
                .all(|outcome| outcome.is_some_and(|o| o.admitted));
        if !all_admitted && !admitted_groups.is_empty() {
            self.refund(
                requests,
                &admitted_groups,
                &mut outcomes,
                deadline,
                &connection,
            )
            .await;
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                // Every index belongs to exactly one group, and every group answered (no error),
                // so every slot is filled; a gap would be a bug, reported instead of panicking.
                outcome.ok_or_else(|| StoreError::Protocol("a bucket got no outcome".to_owned()))
            })
            .collect()
    }

    /// Gives the tokens of `groups` back. Runs as its own task so it completes even when the
    /// call's deadline passes first; until then its answer (the buckets' level after the
    /// refund) replaces their outcomes, and otherwise the level is computed from the admission.
    async fn refund(
        &self,
        requests: &[BucketRequest],
        groups: &[Vec<usize>],
        outcomes: &mut [Option<BucketOutcome>],
        deadline: Instant,
        connection: &ClusterConnection,
    ) {
        // The level before an admission of `cost` is exactly `cost` tokens more (the TAT moved
        // by a whole number of intervals), with no wait when that makes the bucket full.
        for &i in groups.iter().flatten() {
            if let Some(outcome) = outcomes[i].as_mut() {
                let spec = requests[i].spec;
                outcome.remaining = outcome.remaining.saturating_add(requests[i].cost);
                if outcome.remaining >= spec.burst {
                    outcome.next_token_us = 0;
                }
            }
        }

        let command_timeout = self.command_timeout;
        let calls: Vec<_> = groups
            .iter()
            .map(|indices| {
                let mut connection = connection.clone();
                let invocation =
                    script::invocation(Mode::Refund, indices.iter().map(|&i| &requests[i]));
                let indices = indices.clone();
                async move {
                    let result = tokio::time::timeout(
                        command_timeout,
                        invocation.invoke_async::<Value>(&mut connection),
                    )
                    .await;
                    let result = match result {
                        Ok(Ok(reply)) => script::parse_reply(reply, indices.len()),
                        Ok(Err(error)) => Err(store_error(error, command_timeout)),
                        Err(_) => Err(StoreError::Timeout(command_timeout)),
                    };
                    if let Err(error) = &result {
                        tracing::warn!(
                            %error,
                            "redis cluster store: refund failed; tokens stay taken until they refill"
                        );
                    }
                    (indices, result)
                }
            })
            .collect();
        let task = tokio::spawn(join_all(calls));
        if let Ok(Ok(results)) = timeout_at(deadline, task).await {
            for (indices, result) in results {
                if let Ok(group) = result {
                    for (&i, outcome) in indices.iter().zip(group) {
                        outcomes[i] = Some(outcome);
                    }
                }
            }
        }
    }
}

/// Request indices grouped by hash tag, groups in order of first appearance.
fn group_by_tag(requests: &[BucketRequest]) -> Vec<Vec<usize>> {
    let mut tags: Vec<&str> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let tag = request.hash_tag();
        match tags.iter().position(|&t| t == tag) {
            Some(g) => groups[g].push(i),
            None => {
                tags.push(tag);
                groups.push(vec![i]);
            }
        }
    }
    groups
}

impl BucketStore for RedisClusterStore {
    fn acquire(
        &self,
        requests: Vec<BucketRequest>,
    ) -> BoxFuture<'_, Result<Vec<BucketOutcome>, StoreError>> {
        Box::pin(async move {
            if requests.is_empty() {
                return Ok(Vec::new());
            }
            script::check(&requests)?;
            let deadline = Instant::now() + self.command_timeout;
            // Every await inside is bounded by `deadline` on its own. There is deliberately no
            // timeout around the whole: cancelling between "a group admitted" and "its refund
            // was sent" would leak that group's tokens.
            let result = self.acquire_inner(&requests, deadline).await;
            self.connection.record(&result);
            result
        })
    }

    fn kind(&self) -> &'static str {
        "redis-cluster"
    }

    fn deadline(&self) -> Option<Duration> {
        Some(self.command_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::bucket::BucketSpec;

    #[test]
    fn groups_follow_hash_tags_in_order() {
        let spec = BucketSpec::new(1, 1_000_000, 1);
        let requests: Vec<BucketRequest> = ["a:{x}:1", "b:{y}:1", "c:{x}:2", "untagged"]
            .iter()
            .map(|key| BucketRequest {
                key: (*key).to_owned(),
                spec,
                cost: 1,
            })
            .collect();
        assert_eq!(group_by_tag(&requests), [vec![0, 2], vec![1], vec![3]]);
    }

    #[test]
    fn construction_needs_no_server_and_rejects_bad_nodes() {
        let ok = RedisClusterStore::new(&["127.0.0.1:1".to_owned()], Duration::from_millis(50));
        assert!(ok.is_ok());
        assert!(RedisClusterStore::new(&[], Duration::from_millis(50)).is_err());
        let bad = RedisClusterStore::new(&["redis://[::1".to_owned()], Duration::from_millis(50));
        assert!(bad.is_err());
    }
}
