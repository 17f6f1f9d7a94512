//! The region's store as the readiness endpoint sees it: which kind, and whether it answers.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::redis::{RedisClusterStore, RedisStore};

/// How long a readiness probe waits for Redis.
const REDIS_PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Where the region's buckets live, kept concrete for readiness pings.
pub enum Backend {
    Memory,
    Redis(Arc<RedisStore>),
    Cluster(Arc<RedisClusterStore>),
}

/// Redis as the readiness endpoint reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum RedisStatus {
    NotConfigured,
    Up,
    Down { error: String },
}

impl RedisStatus {
    pub fn is_ready(&self) -> bool {
        !matches!(self, Self::Down { .. })
    }
}

impl Backend {
    /// Pings Redis (at most [`REDIS_PROBE_TIMEOUT`]).
    pub async fn status(&self) -> RedisStatus {
        let ping = match self {
            Self::Memory => return RedisStatus::NotConfigured,
            Self::Redis(store) => tokio::time::timeout(REDIS_PROBE_TIMEOUT, store.ping()).await,
            Self::Cluster(store) => tokio::time::timeout(REDIS_PROBE_TIMEOUT, store.ping()).await,
        };
        match ping {
            Ok(Ok(())) => RedisStatus::Up,
            Ok(Err(error)) => RedisStatus::Down {
                error: error.to_string(),
            },
            Err(_) => RedisStatus::Down {
                error: format!("no answer within {REDIS_PROBE_TIMEOUT:?}"),
            },
        }
    }
}
