//! Where token buckets live: the region's Redis (one Lua script per decision) or process
//! memory (the demo's embedded default, tests, and the `local` fallback while Redis is down).
//!
//! Every store runs the same GCRA formula ([`crate::limit::bucket`]); they differ only in
//! where the state is kept and which clock stamps `now`.

use futures_util::future::BoxFuture;

use crate::limit::bucket::BucketSpec;

pub mod memory;
pub mod redis;

/// One bucket a request must draw from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketRequest {
    /// Full storage key, e.g. `tollgate:rl:{ip:203.0.113.7}:per-client`. The part in braces
    /// is the Redis Cluster hash tag: buckets with the same tag live in the same slot and are
    /// decided by one script atomically.
    pub key: String,
    pub spec: BucketSpec,
    /// Tokens this request takes.
    pub cost: u64,
}

impl BucketRequest {
    /// The hash tag (the text between the first `{` and the next `}`), or the whole key.
    pub fn hash_tag(&self) -> &str {
        hash_tag(&self.key)
    }
}

/// Redis Cluster's hash-tag rule.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// What a store answered for one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketOutcome {
    pub admitted: bool,
    /// Whole tokens left (after this request if admitted).
    pub remaining: u64,
    /// Microseconds until at least one more token is available (0 when full).
    pub next_token_us: u64,
    /// When rejected: microseconds until the cost fits (`u64::MAX`: never, cost > burst).
    pub retry_after_us: u64,
}

/// A store could not decide. The limiter then applies each policy's `on_store_error`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store answered something unexpected: {0}")]
    Protocol(String),
}

/// A place to keep token buckets.
pub trait BucketStore: Send + Sync + 'static {
    /// Takes `cost` from every bucket in `requests`, all or nothing: if any bucket rejects,
    /// no bucket is consumed. Outcomes are in the order of `requests`.
    ///
    /// Resolves within the store's own deadline (a [`StoreError::Timeout`] past it): the
    /// limiter sits on the request path and sets no timer of its own.
    ///
    /// Takes the requests by value: a store that queues them (the batching Redis store) keeps
    /// them without copying every key again.
    fn acquire(
        &self,
        requests: Vec<BucketRequest>,
    ) -> BoxFuture<'_, Result<Vec<BucketOutcome>, StoreError>>;

    /// Short name for logs and metrics: `memory`, `redis`, `redis-cluster`.
    fn kind(&self) -> &'static str;

    /// The deadline within which [`BucketStore::acquire`] resolves, if it can take that long
    /// (`None`: it answers at once, as memory does).
    fn deadline(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_follow_the_cluster_rule() {
        assert_eq!(hash_tag("tollgate:rl:{ip:1.2.3.4}:p"), "ip:1.2.3.4");
        assert_eq!(hash_tag("no-tag"), "no-tag");
        assert_eq!(hash_tag("empty{}tag"), "empty{}tag");
        assert_eq!(hash_tag("a{b}{c}"), "b");
    }
}
