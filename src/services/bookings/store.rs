//! Where bookings live: this process's memory, or Redis shared by every instance.
//!
//! Redis layout (all keys under `tollgate:bookings:` so the same Redis can serve other uses):
//! * `tollgate:bookings:booking:{id}`: the booking's JSON;
//! * `tollgate:bookings:user:{username}`: sorted set of the user's booking IDs, scored by
//!   creation time in milliseconds, so a user's bookings list oldest first.
//!
//! Both are written in one `MULTI`/`EXEC`, so an indexed ID always has its record.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use redis::aio::ConnectionManager;
use uuid::Uuid;

use super::Booking;
use crate::services::kv::{self, StoreError};

const BOOKING_KEY_PREFIX: &str = "tollgate:bookings:booking:";
const USER_INDEX_PREFIX: &str = "tollgate:bookings:user:";

fn booking_key(id: Uuid) -> String {
    format!("{BOOKING_KEY_PREFIX}{}", id.hyphenated())
}

fn user_index_key(user: &str) -> String {
    format!("{USER_INDEX_PREFIX}{user}")
}

/// The bookings' storage. Cheap to clone: clones share the same data.
#[derive(Clone)]
pub struct BookingStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Memory(Arc<RwLock<Memory>>),
    Redis(ConnectionManager),
}

#[derive(Default)]
struct Memory {
    by_id: HashMap<Uuid, Booking>,
    /// Each user's booking IDs in insertion order.
    by_user: HashMap<String, Vec<Uuid>>,
}

impl std::fmt::Debug for BookingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BookingStore")
            .field("backend", &self.backend())
            .finish()
    }
}

impl BookingStore {
    /// Bookings in this process only, lost when it exits.
    pub fn memory() -> Self {
        Self {
            backend: Backend::Memory(Arc::default()),
        }
    }

    /// Bookings in the Redis at `url`; fails if it cannot be reached now.
    pub async fn redis(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Redis(kv::connect(url).await?),
        })
    }

    /// `"memory"` or `"redis"`, for logs.
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Memory(_) => "memory",
            Backend::Redis(_) => "redis",
        }
    }

    /// Stores a new booking. IDs are fresh UUIDs, so there is nothing to collide with.
    pub async fn insert(&self, booking: &Booking) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Memory(memory) => {
                let mut memory = memory.write().unwrap_or_else(PoisonError::into_inner);
                memory.by_id.insert(booking.id, booking.clone());
                memory
                    .by_user
                    .entry(booking.user.clone())
                    .or_default()
                    .push(booking.id);
                Ok(())
            }
            Backend::Redis(conn) => {
                let key = booking_key(booking.id);
                let json =
                    serde_json::to_string(booking).map_err(|source| StoreError::Corrupt {
                        key: key.clone(),
                        source,
                    })?;
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(&key)
                    .arg(json)
                    .ignore()
                    .cmd("ZADD")
                    .arg(user_index_key(&booking.user))
                    .arg(booking.created_at.timestamp_millis())
                    .arg(booking.id.hyphenated().to_string())
                    .ignore()
                    .query_async::<()>(&mut conn.clone())
                    .await?;
                Ok(())
            }
        }
    }

    /// The booking with this ID, if any.
    pub async fn get(&self, id: Uuid) -> Result<Option<Booking>, StoreError> {
        match &self.backend {
            Backend::Memory(memory) => Ok(memory
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .by_id
                .get(&id)
                .cloned()),
            Backend::Redis(conn) => {
                let key = booking_key(id);
                let raw: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn.clone())
                    .await?;
                raw.map(|raw| kv::decode(&key, &raw)).transpose()
            }
        }
    }

    /// All bookings of `user`, oldest first.
    pub async fn list_for_user(&self, user: &str) -> Result<Vec<Booking>, StoreError> {
        let mut bookings = match &self.backend {
            Backend::Memory(memory) => {
                let memory = memory.read().unwrap_or_else(PoisonError::into_inner);
                memory
                    .by_user
                    .get(user)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| memory.by_id.get(id).cloned())
                    .collect()
            }
            Backend::Redis(conn) => {
                let mut conn = conn.clone();
                let ids: Vec<String> = redis::cmd("ZRANGE")
                    .arg(user_index_key(user))
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let keys: Vec<String> = ids
                    .iter()
                    .map(|id| format!("{BOOKING_KEY_PREFIX}{id}"))
                    .collect();
                let raws: Vec<Option<String>> =
                    redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
                let mut bookings = Vec::with_capacity(raws.len());
                for (key, raw) in keys.iter().zip(raws) {
                    if let Some(raw) = raw {
                        bookings.push(kv::decode::<Booking>(key, &raw)?);
                    }
                }
                bookings
            }
        };
        // Concurrent inserts may land slightly out of creation order; the ID breaks ties
        // (UUIDv7 orders by time too).
        bookings.sort_by_key(|booking| (booking.created_at, booking.id));
        Ok(bookings)
    }
}
