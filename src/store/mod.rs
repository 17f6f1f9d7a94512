//! Where token buckets live: the region's Redis (one Lua script per decision) or process
//! memory (the demo's embedded default, tests, and the `local` fallback while Redis is down).
//!
//! Every store runs the same GCRA formula ([`crate::limit::bucket`]); they differ only in
//! where the state is kept and which clock stamps `now`.

use futures_util::future::BoxFuture;

// The request and answer types belong to the pure limiter, which plans draws without knowing
// which store answers them; the stores speak them.
pub use crate::limit::bucket::{BucketOutcome, BucketRequest, hash_tag};

pub mod backend;
pub mod memory;
pub mod redis;

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
