//! Where users live: this process's memory, or Redis shared by every instance.
//!
//! Redis layout (all keys under `tollgate:users:` so the same Redis can serve other uses):
//! * `tollgate:users:user:{username}`: the user's JSON, password hash included;
//! * `tollgate:users:index`: sorted set of all usernames, every score 0, so that
//!   `ZRANGEBYLEX` walks them in username order for pagination.
//!
//! The record and its index entry change together in one Lua script, so a reader never sees
//! an indexed user without a record (a crash between two commands would leave one), and two
//! concurrent creates of the same name race on a single `SET NX`: exactly one wins.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use redis::Script;
use redis::aio::ConnectionManager;

use super::User;
use crate::services::kv::{self, StoreError};

const USER_KEY_PREFIX: &str = "tollgate:users:user:";
const INDEX_KEY: &str = "tollgate:users:index";

/// KEYS: record, index. ARGV: JSON, username. Returns 1 if created, 0 if the name is taken.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
            redis.call('ZADD', KEYS[2], 0, ARGV[2])
            return 1
        end
        return 0
        ",
    )
});

/// KEYS: record, index. ARGV: username. Returns 1 if deleted, 0 if there was no such user.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('DEL', KEYS[1]) == 1 then
            redis.call('ZREM', KEYS[2], ARGV[1])
            return 1
        end
        return 0
        ",
    )
});

fn user_key(username: &str) -> String {
    format!("{USER_KEY_PREFIX}{username}")
}

/// One page of users in username order.
#[derive(Debug, Clone)]
pub struct UserPage {
    pub users: Vec<User>,
    /// The last username of this page if more follow, to pass back as the cursor.
    pub next_cursor: Option<String>,
}

/// The users' storage. Cheap to clone: clones share the same data.
#[derive(Clone)]
pub struct UserStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    /// Keyed and ordered by username, which is both the uniqueness check and the page order.
    Memory(Arc<RwLock<BTreeMap<String, User>>>),
    Redis(ConnectionManager),
}

impl std::fmt::Debug for UserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserStore")
            .field("backend", &self.backend())
            .finish()
    }
}

impl UserStore {
    /// Users in this process only, lost when it exits.
    pub fn memory() -> Self {
        Self {
            backend: Backend::Memory(Arc::default()),
        }
    }

    /// Users in the Redis at `url`; fails if it cannot be reached now.
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

    /// Stores `user` unless the username is taken; `Ok(false)` if it is.
    pub async fn insert(&self, user: &User) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Memory(users) => {
                let mut users = users.write().unwrap_or_else(PoisonError::into_inner);
                match users.entry(user.username.clone()) {
                    std::collections::btree_map::Entry::Occupied(_) => Ok(false),
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(user.clone());
                        Ok(true)
                    }
                }
            }
            Backend::Redis(conn) => {
                let json = serde_json::to_string(user).map_err(|source| StoreError::Corrupt {
                    key: user_key(&user.username),
                    source,
                })?;
                let mut invocation = CREATE.key(user_key(&user.username));
                invocation.key(INDEX_KEY).arg(json).arg(&user.username);
                let created: i64 = invocation.invoke_async(&mut conn.clone()).await?;
                Ok(created == 1)
            }
        }
    }

    /// The user named `username`, if any.
    pub async fn get(&self, username: &str) -> Result<Option<User>, StoreError> {
        match &self.backend {
            Backend::Memory(users) => Ok(users
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(username)
                .cloned()),
            Backend::Redis(conn) => {
                let key = user_key(username);
                let raw: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn.clone())
                    .await?;
                raw.map(|raw| kv::decode(&key, &raw)).transpose()
            }
        }
    }

    /// Whether a user named `username` exists, without fetching the record.
    pub async fn exists(&self, username: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Memory(users) => Ok(users
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(username)),
            Backend::Redis(conn) => {
                let count: i64 = redis::cmd("EXISTS")
                    .arg(user_key(username))
                    .query_async(&mut conn.clone())
                    .await?;
                Ok(count > 0)
            }
        }
    }

    /// Removes the user; `Ok(false)` if there was none.
    pub async fn delete(&self, username: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Memory(users) => Ok(users
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(username)
                .is_some()),
            Backend::Redis(conn) => {
                let mut invocation = DELETE.key(user_key(username));
                invocation.key(INDEX_KEY).arg(username);
                let deleted: i64 = invocation.invoke_async(&mut conn.clone()).await?;
                Ok(deleted == 1)
            }
        }
    }

    /// Up to `limit` users with usernames after `after` (exclusive), in username order.
    pub async fn list(&self, after: Option<&str>, limit: usize) -> Result<UserPage, StoreError> {
        match &self.backend {
            Backend::Memory(users) => {
                let users = users.read().unwrap_or_else(PoisonError::into_inner);
                let start = after.map_or(Bound::Unbounded, Bound::Excluded);
                let mut page: Vec<User> = users
                    .range::<str, _>((start, Bound::Unbounded))
                    .take(limit.saturating_add(1))
                    .map(|(_, user)| user.clone())
                    .collect();
                let more = page.len() > limit;
                page.truncate(limit);
                let next_cursor = more
                    .then(|| page.last().map(|user| user.username.clone()))
                    .flatten();
                Ok(UserPage {
                    users: page,
                    next_cursor,
                })
            }
            Backend::Redis(conn) => {
                let mut conn = conn.clone();
                let min = after.map_or_else(|| "-".to_owned(), |after| format!("({after}"));
                // One extra name tells whether another page follows.
                let mut names: Vec<String> = redis::cmd("ZRANGEBYLEX")
                    .arg(INDEX_KEY)
                    .arg(min)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit.saturating_add(1))
                    .query_async(&mut conn)
                    .await?;
                let more = names.len() > limit;
                names.truncate(limit);
                if names.is_empty() {
                    return Ok(UserPage {
                        users: Vec::new(),
                        next_cursor: None,
                    });
                }
                let keys: Vec<String> = names.iter().map(|name| user_key(name)).collect();
                let raws: Vec<Option<String>> =
                    redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
                let mut users = Vec::with_capacity(raws.len());
                // A record deleted between the two commands is simply skipped.
                for (key, raw) in keys.iter().zip(raws) {
                    if let Some(raw) = raw {
                        users.push(kv::decode(key, &raw)?);
                    }
                }
                // The cursor follows the index, not the records, so a concurrently deleted
                // last user does not make the walk restart.
                let next_cursor = if more { names.pop() } else { None };
                Ok(UserPage { users, next_cursor })
            }
        }
    }
}
