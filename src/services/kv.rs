//! What the users and bookings stores share: the Redis connection and the storage error.
//!
//! A [`ConnectionManager`] is used rather than a plain connection because it reconnects by
//! itself after Redis restarts or a network blip; a request that hits the gap fails with
//! [`StoreError::Unavailable`] (503) instead of taking the service down.

use std::time::Duration;

use http::StatusCode;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::problem::Problem;

/// How long one Redis command may take before the request fails with 503. Redis answers in
/// well under a millisecond when healthy, so waiting longer only piles requests up.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long one (re)connection attempt may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);

/// Reconnection attempts after the first, with jittered exponential backoff capped at
/// [`MAX_RETRY_DELAY`]. Requests issued while the manager reconnects wait for it, so the
/// library's default (6 retries, uncapped: over ten seconds) would hold every request that
/// long before its 503; a couple of quick retries ride out a restart without that.
const CONNECTION_RETRIES: usize = 2;
const MAX_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Failure of a store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The Redis URL given at startup does not parse.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(#[source] redis::RedisError),
    /// Redis did not answer (down, unreachable, timed out) or refused the command.
    #[error("Redis is unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
    /// A stored record does not decode; someone else wrote to our keys.
    #[error("stored record {key} does not decode: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Connects to Redis at `url`, failing fast at startup if it cannot be reached, so a
/// misconfigured deployment shows up immediately instead of as 503s later.
pub(crate) async fn connect(url: &str) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(url).map_err(StoreError::InvalidUrl)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_number_of_retries(CONNECTION_RETRIES)
        .set_max_delay(MAX_RETRY_DELAY);
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

/// Decodes a stored JSON record, naming the key if it is not ours.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    raw: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(raw).map_err(|source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

impl From<StoreError> for Problem {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Corrupt { .. } => {
                tracing::error!(%error, "store holds a record that does not decode");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal-error",
                    "Internal error",
                )
                .detail("a stored record is damaged")
            }
            StoreError::InvalidUrl(_) | StoreError::Unavailable(_) => {
                tracing::warn!(%error, "store unavailable");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage-unavailable",
                    "Storage is unavailable",
                )
                .detail("the data store did not answer; retry shortly")
                .retry_after(1)
            }
        }
    }
}
