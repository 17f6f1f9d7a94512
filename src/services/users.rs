//! The users service: the airline's employees, who must be onboarded before they may book.
//!
//! | method and path                   | answer                                             |
//! |-----------------------------------|----------------------------------------------------|
//! | `POST /api/v1/users`              | 201 + `Location`, 409 if taken, 422 listing errors |
//! | `GET /api/v1/users?limit&cursor`  | a page ordered by username, `nextCursor` or null   |
//! | `GET /api/v1/users/{username}`    | 200, 404                                           |
//! | `DELETE /api/v1/users/{username}` | 204, 404                                           |
//!
//! Passwords are stored only as argon2id PHC strings and never leave the service.

mod store;

use std::sync::Arc;

use argon2::password_hash::PasswordHasher;
use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

pub use store::{UserPage, UserStore};

use super::web::{self, JsonObject, Violations};
use super::{ServiceError, UsersArgs};
use crate::problem::Problem;

/// Shortest and longest username.
pub const USERNAME_LEN: std::ops::RangeInclusive<usize> = 3..=32;
/// Shortest and longest password, in characters. The upper bound keeps one request from
/// buying an arbitrarily long hash computation.
pub const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=256;
/// Longest first or last name, in characters.
pub const NAME_MAX_CHARS: usize = 100;
/// Page size when the client does not ask for one.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page a client may ask for.
pub const MAX_PAGE_SIZE: usize = 200;

/// Whether `name` is a well-formed username: 3-32 characters of `[a-z0-9_.-]`.
///
/// The alphabet is safe in URL paths, headers and Redis keys without any escaping, which is
/// what lets usernames appear verbatim in `Location`, in the bookings service's lookups and in
/// key names.
pub fn is_valid_username(name: &str) -> bool {
    USERNAME_LEN.contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

/// A user as stored, password hash included.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub username: String,
    pub name: String,
    pub last_name: String,
    /// Argon2id PHC string (`$argon2id$v=19$...`), salt included.
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
}

impl std::fmt::Debug for User {
    /// Leaves the hash out, so a user can be logged without leaking it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("username", &self.username)
            .field("name", &self.name)
            .field("last_name", &self.last_name)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// A user as shown to clients: everything but the password hash.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub username: String,
    pub name: String,
    pub last_name: String,
    pub created_at: DateTime<Utc>,
}

impl From<User> for UserView {
    fn from(user: User) -> Self {
        Self {
            username: user.username,
            name: user.name,
            last_name: user.last_name,
            created_at: user.created_at,
        }
    }
}

/// Failure to hash a password. Never the client's fault: always a 500.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("argon2 failed: {0}")]
    Argon2(#[from] argon2::password_hash::Error),
    #[error("hashing task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("hashing pool is closed")]
    Closed(#[from] tokio::sync::AcquireError),
}

impl From<HashError> for Problem {
    fn from(error: HashError) -> Self {
        tracing::error!(%error, "password hashing failed");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal-error",
            "Internal error",
        )
        .detail("the password could not be hashed")
    }
}

/// Hashes passwords off the async workers, at most one per core at a time.
///
/// Argon2 takes tens of milliseconds and ~19 MiB per hash by design. Run inline it would
/// stall every request sharing the worker thread; run unbounded on the blocking pool a burst of
/// sign-ups would allocate hundreds of those buffers at once. Queueing on a semaphore sized to
/// the cores keeps both latency and memory flat.
#[derive(Debug, Clone)]
struct Hasher {
    permits: Arc<Semaphore>,
}

impl Hasher {
    fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            permits: Arc::new(Semaphore::new(cores)),
        }
    }

    /// PHC string of `password` with a fresh random salt and the default argon2id parameters.
    async fn hash(&self, password: String) -> Result<String, HashError> {
        let permit = Arc::clone(&self.permits).acquire_owned().await?;
        let hash = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            argon2::Argon2::default()
                .hash_password(password.as_bytes())
                .map(|hash| hash.to_string())
        })
        .await??;
        Ok(hash)
    }
}

#[derive(Debug, Clone)]
struct AppState {
    store: UserStore,
    hasher: Hasher,
}

/// The users service's router, with `/health`, problem fallbacks and correlation IDs.
pub fn app(store: UserStore) -> Router {
    let state = AppState {
        store,
        hasher: Hasher::new(),
    };
    web::finish(
        Router::new()
            .route("/api/v1/users", post(create_user).get(list_users))
            .route(
                "/api/v1/users/{username}",
                get(get_user).delete(delete_user),
            )
            .with_state(state),
    )
}

/// Serves the users service on `args.listen` until `shutdown` resolves.
///
/// Connects to Redis first when `args.redis` is set, and fails if it cannot.
pub async fn run(
    args: UsersArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let store = match &args.redis {
        Some(url) => UserStore::redis(url).await?,
        None => UserStore::memory(),
    };
    let backend = store.backend();
    super::serve("users", args.listen, backend, app(store), shutdown).await
}

/// A validated sign-up request.
struct NewUser {
    username: String,
    password: String,
    name: String,
    last_name: String,
}

impl NewUser {
    /// Checks every field, reporting all problems together.
    fn parse(body: &serde_json::Map<String, serde_json::Value>) -> Result<Self, Problem> {
        let mut violations = Violations::new();
        let username =
            web::string_field(body, "username", "username", &mut violations).filter(|username| {
                let ok = is_valid_username(username);
                if !ok {
                    violations.add(
                        "username",
                        "must be 3 to 32 characters of a-z, 0-9, '_', '.' and '-'",
                    );
                }
                ok
            });
        let password =
            web::string_field(body, "password", "password", &mut violations).filter(|password| {
                let ok = PASSWORD_LEN.contains(&password.chars().count());
                if !ok {
                    violations.add(
                        "password",
                        format!(
                            "must be {} to {} characters",
                            PASSWORD_LEN.start(),
                            PASSWORD_LEN.end()
                        ),
                    );
                }
                ok
            });
        let name = web::string_field(body, "name", "name", &mut violations);
        let name = web::check_text(name, "name", NAME_MAX_CHARS, &mut violations);
        let last_name = web::string_field(body, "lastName", "lastName", &mut violations);
        let last_name = web::check_text(last_name, "lastName", NAME_MAX_CHARS, &mut violations);
        violations.into_result()?;
        match (username, password, name, last_name) {
            (Some(username), Some(password), Some(name), Some(last_name)) => Ok(Self {
                username,
                password,
                name,
                last_name,
            }),
            // Unreachable: every `None` above recorded a violation, returned just before.
            _ => Err(web::invalid_field("body", "is invalid")),
        }
    }
}

fn user_taken(username: &str) -> Problem {
    Problem::new(StatusCode::CONFLICT, "user-exists", "User already exists")
        .detail(format!("username {username} is taken"))
        .extension("username", username)
}

fn no_such_user(username: &str) -> Problem {
    web::not_found(format!("no user named {username}"))
}

async fn create_user(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, Problem> {
    let new = NewUser::parse(&body)?;
    // Not needed for correctness (the insert below is atomic), but it spares the hash
    // computation for the common case of a retried or duplicate sign-up.
    if state.store.exists(&new.username).await? {
        return Err(user_taken(&new.username));
    }
    let password_hash = state.hasher.hash(new.password).await?;
    let user = User {
        username: new.username,
        name: new.name,
        last_name: new.last_name,
        password_hash,
        // Millisecond precision is all clients can use and keeps the JSON short.
        created_at: Utc::now().trunc_subsecs(3),
    };
    if !state.store.insert(&user).await? {
        return Err(user_taken(&user.username));
    }
    tracing::info!(username = %user.username, "user created");
    let location = format!("/api/v1/users/{}", user.username);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(UserView::from(user)),
    )
        .into_response())
}

async fn get_user(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<UserView>, Problem> {
    let Path(username) = path.map_err(web::bad_path)?;
    if !is_valid_username(&username) {
        return Err(no_such_user(&username));
    }
    match state.store.get(&username).await? {
        Some(user) => Ok(Json(user.into())),
        None => Err(no_such_user(&username)),
    }
}

async fn delete_user(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, Problem> {
    let Path(username) = path.map_err(web::bad_path)?;
    if is_valid_username(&username) && state.store.delete(&username).await? {
        tracing::info!(%username, "user deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_such_user(&username))
    }
}

/// Raw query of the list endpoint; parsed by hand so bad values become 422 field errors.
#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// One page of users.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PageView {
    items: Vec<UserView>,
    /// Pass as `cursor` to get the next page; `null` on the last one.
    next_cursor: Option<String>,
}

async fn list_users(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<PageView>, Problem> {
    let Query(query) = query.map_err(web::bad_query)?;
    let mut violations = Violations::new();
    let limit = match query.limit.as_deref() {
        None => Some(DEFAULT_PAGE_SIZE),
        Some(raw) => match raw.parse::<usize>() {
            Ok(limit) if (1..=MAX_PAGE_SIZE).contains(&limit) => Some(limit),
            _ => {
                violations.add(
                    "limit",
                    format!("must be an integer from 1 to {MAX_PAGE_SIZE}"),
                );
                None
            }
        },
    };
    // The cursor is the last username of the previous page; an empty one means "from the
    // start", which is what a client naively appending `cursor=` expects.
    let cursor = query.cursor.filter(|cursor| !cursor.is_empty());
    if let Some(cursor) = &cursor
        && !is_valid_username(cursor)
    {
        violations.add("cursor", "is not a cursor this service issued");
    }
    violations.into_result()?;
    let limit = limit.unwrap_or(DEFAULT_PAGE_SIZE);
    let page = state.store.list(cursor.as_deref(), limit).await?;
    Ok(Json(PageView {
        items: page.users.into_iter().map(UserView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for good in ["abc", "a.b-c_d", "user123", &"x".repeat(32)] {
            assert!(is_valid_username(good), "{good}");
        }
        for bad in [
            "ab",
            "Abc",
            "a b",
            "ab/c",
            "ab:c",
            "ñam",
            "",
            &"x".repeat(33),
        ] {
            assert!(!is_valid_username(bad), "{bad}");
        }
    }

    #[test]
    fn parse_lists_every_error() {
        let body =
            serde_json::json!({"username": "A", "password": "short", "name": " ", "lastName": 3});
        let serde_json::Value::Object(body) = body else {
            unreachable!()
        };
        let problem = NewUser::parse(&body).err().unwrap();
        let fields: Vec<_> = problem.extensions["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(fields, ["username", "password", "name", "lastName"]);
    }

    #[test]
    fn debug_hides_the_hash() {
        let user = User {
            username: "ana".into(),
            name: "Ana".into(),
            last_name: "Diaz".into(),
            password_hash: "$argon2id$secret".into(),
            created_at: Utc::now(),
        };
        assert!(!format!("{user:?}").contains("argon2"));
    }

    #[tokio::test]
    async fn hashes_are_salted_phc_strings() {
        let hasher = Hasher::new();
        let a = hasher.hash("correct horse".into()).await.unwrap();
        let b = hasher.hash("correct horse".into()).await.unwrap();
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b);
    }
}
