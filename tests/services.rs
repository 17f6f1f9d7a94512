//! Behaviour of the users and bookings services over real sockets on 127.0.0.1: status codes,
//! headers, problem documents, the users lookup from bookings, and Redis-shared storage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use chrono::Utc;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate::services::bookings::{self, BookingStore};
use tollgate::services::users::{self, UserStore};
use tollgate::services::users_client::UsersClient;

use support::{RedisServer, client, closed_addr, serve};

const PROBLEM_JSON: &str = "application/problem+json";

fn base(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

async fn start_users(store: UserStore) -> String {
    base(serve(users::app(store)).await)
}

async fn start_bookings(store: BookingStore, users_url: &str) -> String {
    start_bookings_with(store, UsersClient::new(users_url).unwrap()).await
}

async fn start_bookings_with(store: BookingStore, users: UsersClient) -> String {
    base(serve(bookings::app(store, users)).await)
}

/// Users and bookings in memory, bookings asking this users instance.
async fn start_memory_pair() -> (String, String) {
    let users = start_users(UserStore::memory()).await;
    let bookings = start_bookings(BookingStore::memory(), &users).await;
    (users, bookings)
}

fn user_body(username: &str) -> Value {
    json!({
        "username": username,
        "password": "correct horse battery",
        "name": "Ana",
        "lastName": "Diaz",
    })
}

async fn create_user(http: &reqwest::Client, users: &str, username: &str) -> reqwest::Response {
    http.post(format!("{users}/api/v1/users"))
        .json(&user_body(username))
        .send()
        .await
        .unwrap()
}

fn booking_body(user: &str) -> Value {
    let departure = (Utc::now() + chrono::Duration::days(30)).to_rfc3339();
    json!({
        "user": user,
        "flightNumber": "AR1132",
        "origin": "EZE",
        "destination": "MAD",
        "departureTime": departure,
        "passengers": [
            {"fullName": "Ana Diaz", "birthDate": "1990-04-12", "passportNumber": "AAB123456"},
            {"fullName": "Luis Diaz", "birthDate": "2015-09-30", "passportNumber": "AAC654321"},
        ],
    })
}

async fn create_booking(http: &reqwest::Client, bookings: &str, body: &Value) -> reqwest::Response {
    http.post(format!("{bookings}/api/v1/bookings"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Asserts that `response` is a problem document with `status` and returns its body.
async fn expect_problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        PROBLEM_JSON,
        "not a problem document"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:tollgate:problem:")),
        "{body}"
    );
    body
}

/// The `field`s of a validation problem's `errors`, in order.
fn error_fields(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors array in {problem}"))
        .iter()
        .map(|error| {
            assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
            error["field"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// The usernames of every page, walking `nextCursor` with pages of `limit`, alternating
/// between the given instances.
async fn walk_users(http: &reqwest::Client, instances: &[&str], limit: usize) -> Vec<String> {
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        assert!(page < 100, "pagination does not end");
        let instance = instances[page % instances.len()];
        let mut url = format!("{instance}/api/v1/users?limit={limit}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let response = http.get(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        let items = body["items"].as_array().unwrap();
        assert!(items.len() <= limit);
        for item in items {
            assert!(item.get("password").is_none() && item.get("passwordHash").is_none());
            names.push(item["username"].as_str().unwrap().to_owned());
        }
        match &body["nextCursor"] {
            Value::Null => break,
            Value::String(next) => cursor = Some(next.clone()),
            other => panic!("nextCursor is {other}"),
        }
    }
    names
}

// ---------------------------------------------------------------- users

#[tokio::test]
async fn user_create_returns_201_location_and_no_password() {
    let http = client();
    let users = start_users(UserStore::memory()).await;
    let response = create_user(&http, &users, "ana.diaz").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["location"], "/api/v1/users/ana.diaz");
    let text = response.text().await.unwrap();
    assert!(!text.contains("correct horse"), "password leaked: {text}");
    assert!(!text.contains("argon2"), "hash leaked: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["username"], "ana.diaz");
    assert_eq!(body["name"], "Ana");
    assert_eq!(body["lastName"], "Diaz");
    let created = body["createdAt"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(created).is_ok(),
        "{created}"
    );
    assert_eq!(body.as_object().unwrap().len(), 4, "{body}");

    let fetched = http
        .get(format!("{users}/api/v1/users/ana.diaz"))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), StatusCode::OK);
    assert_eq!(fetched.json::<Value>().await.unwrap(), body);
}

#[tokio::test]
async fn user_duplicate_is_409() {
    let http = client();
    let users = start_users(UserStore::memory()).await;
    assert_eq!(
        create_user(&http, &users, "ana").await.status(),
        StatusCode::CREATED
    );
    let problem = expect_problem(
        create_user(&http, &users, "ana").await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(problem["username"], "ana");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_give_exactly_one_201() {
    let http = client();
    let users = start_users(UserStore::memory()).await;
    let statuses: Vec<StatusCode> = join_all((0..6).map(|_| create_user(&http, &users, "racer")))
        .await
        .into_iter()
        .map(|response| response.status())
        .collect();
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let conflicts = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((created, conflicts), (1, 5), "{statuses:?}");
}

#[tokio::test]
async fn user_validation_lists_every_invalid_field() {
    let http = client();
    let users = start_users(UserStore::memory()).await;
    let response = http
        .post(format!("{users}/api/v1/users"))
        .json(&json!({"username": "Bad Name!", "password": "short", "name": "", "lastName": 42}))
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(
        error_fields(&problem),
        ["username", "password", "name", "lastName"]
    );

    // Missing fields are reported too, all of them.
    let response = http
        .post(format!("{users}/api/v1/users"))
        .json(&json!({"username": "ok_name", "name": "x".repeat(101)}))
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(error_fields(&problem), ["password", "name", "lastName"]);
    // Nothing was created by either attempt.
    let list: Value = http
        .get(format!("{users}/api/v1/users"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([]));
}

#[tokio::test]
async fn malformed_bodies_get_problem_documents() {
    let http = client();
    let users = start_users(UserStore::memory()).await;
    let url = format!("{users}/api/v1/users");

    let broken = http
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"username": "ana", "#)
        .send()
        .await
        .unwrap();
    let problem = expect_problem(broken, StatusCode::BAD_REQUEST).await;
    assert_eq!(problem["type"], "urn:tollgate:problem:malformed-json");

    let not_json = http
        .post(&url)
        .header("content-type", "text/plain")
        .body(user_body("ana").to_string())
        .send()
        .await
        .unwrap();
    expect_problem(not_json, StatusCode::BAD_REQUEST).await;

    let not_object = http.post(&url).json(&json!(["ana"])).send().await.unwrap();
    let problem = expect_problem(not_object, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(error_fields(&problem), ["body"]);
}

#[tokio::test]
async fn unknown_user_is_404() {
    let http = client();
    let users = start_users(UserStore::memory()).await;
    for name in ["nobody", "NOT-VALID", "a"] {
        let response = http
            .get(format!("{users}/api/v1/users/{name}"))
            .send()
            .await
            .unwrap();
        expect_problem(response, StatusCode::NOT_FOUND).await;
    }
}

#[tokio::test]
async fn delete_is_204_then_404() {
    let http = client();
    let users = start_users(UserStore::memory()).await;
    create_user(&http, &users, "leaver").await;
    let url = format!("{users}/api/v1/users/leaver");
    let deleted = http.delete(&url).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    expect_problem(http.get(&url).send().await.unwrap(), StatusCode::NOT_FOUND).await;
    expect_problem(
        http.delete(&url).send().await.unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    // The name is free again.
    assert_eq!(
        create_user(&http, &users, "leaver").await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn pagination_walks_every_user_in_order() {
    let http = client();
    let users = start_users(UserStore::memory()).await;
    let names = [
        "delta", "alpha", "golf", "charlie", "echo", "bravo", "foxtrot",
    ];
    for name in names {
        assert_eq!(
            create_user(&http, &users, name).await.status(),
            StatusCode::CREATED
        );
    }
    let mut sorted = names.map(str::to_owned).to_vec();
    sorted.sort();
    for limit in [1, 3, 7, 50] {
        assert_eq!(
            walk_users(&http, &[&users], limit).await,
            sorted,
            "limit {limit}"
        );
    }
    // An exact multiple of the page size ends with null, not an empty extra page.
    let page: Value = http
        .get(format!("{users}/api/v1/users?limit=7"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 7);
    assert_eq!(page["nextCursor"], Value::Null);
}

#[tokio::test]
async fn invalid_page_parameters_are_422() {
    let http = client();
    let users = start_users(UserStore::memory()).await;
    for query in [
        "limit=0",
        "limit=201",
        "limit=abc",
        "limit=-1",
        "cursor=NOT%20A%20NAME",
    ] {
        let response = http
            .get(format!("{users}/api/v1/users?{query}"))
            .send()
            .await
            .unwrap();
        let problem = expect_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        let field = query.split('=').next().unwrap();
        assert_eq!(error_fields(&problem), [field], "{query}");
    }
    let ok = http
        .get(format!("{users}/api/v1/users?limit=200"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn health_fallbacks_and_request_ids() {
    let http = client();
    let (users, bookings) = start_memory_pair().await;
    for service in [&users, &bookings] {
        let health = http.get(format!("{service}/health")).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        // A fresh ID is generated when the client sends none.
        let generated = health.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
        assert_eq!(
            health.json::<Value>().await.unwrap(),
            json!({"status": "ok"})
        );

        // The client's ID is echoed, on errors too.
        let unknown = http
            .get(format!("{service}/no/such/route"))
            .header("x-request-id", "client-id-42")
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.headers()["x-request-id"], "client-id-42");
        expect_problem(unknown, StatusCode::NOT_FOUND).await;

        let wrong_method = http.put(format!("{service}/health")).send().await.unwrap();
        assert!(wrong_method.headers().contains_key("x-request-id"));
        assert!(wrong_method.headers().contains_key("allow"));
        expect_problem(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await;
    }
}

// ---------------------------------------------------------------- bookings

#[tokio::test]
async fn booking_create_returns_201_and_reads_back() {
    let http = client();
    let (users, bookings) = start_memory_pair().await;
    create_user(&http, &users, "ana").await;

    let body = booking_body("ana");
    let response = create_booking(&http, &bookings, &body).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    assert_eq!(location, format!("/api/v1/bookings/{id}"));
    assert!(chrono::DateTime::parse_from_rfc3339(created["createdAt"].as_str().unwrap()).is_ok());
    for field in [
        "user",
        "flightNumber",
        "origin",
        "destination",
        "passengers",
    ] {
        assert_eq!(created[field], body[field], "{field}");
    }

    let fetched = http
        .get(format!("{bookings}{location}"))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), StatusCode::OK);
    assert_eq!(fetched.json::<Value>().await.unwrap(), created);

    // A second booking; the list is oldest first and only this user's.
    let second: Value = create_booking(&http, &bookings, &body)
        .await
        .json()
        .await
        .unwrap();
    create_user(&http, &users, "other").await;
    create_booking(&http, &bookings, &booking_body("other")).await;
    let list: Value = http
        .get(format!("{bookings}/api/v1/bookings?user=ana"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id, second["id"].as_str().unwrap()]);
}

#[tokio::test]
async fn unknown_booking_is_404() {
    let http = client();
    let (_, bookings) = start_memory_pair().await;
    for id in [uuid::Uuid::now_v7().to_string(), "not-a-uuid".to_owned()] {
        let response = http
            .get(format!("{bookings}/api/v1/bookings/{id}"))
            .send()
            .await
            .unwrap();
        expect_problem(response, StatusCode::NOT_FOUND).await;
    }
}

#[tokio::test]
async fn booking_for_unknown_user_is_422_on_user() {
    let http = client();
    let (_, bookings) = start_memory_pair().await;
    let response = create_booking(&http, &bookings, &booking_body("ghost")).await;
    let problem = expect_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(error_fields(&problem), ["user"]);
}

#[tokio::test]
async fn users_service_down_is_503_and_stores_nothing() {
    let http = client();
    let bookings = start_bookings(BookingStore::memory(), &base(closed_addr())).await;
    let response = create_booking(&http, &bookings, &booking_body("ana")).await;
    let problem = expect_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(problem["type"], "urn:tollgate:problem:users-unavailable");

    let list: Value = http
        .get(format!("{bookings}/api/v1/bookings?user=ana"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list, json!({"items": []}));
}

#[tokio::test]
async fn users_service_5xx_or_timeout_is_503() {
    let http = client();
    let failing = Router::new().route(
        "/api/v1/users/{name}",
        get(|| async { axum::http::StatusCode::INTERNAL_SERVER_ERROR }),
    );
    let bookings = start_bookings(BookingStore::memory(), &base(serve(failing).await)).await;
    let response = create_booking(&http, &bookings, &booking_body("ana")).await;
    expect_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;

    // A users service that accepts the request and never answers.
    let hanging = Router::new().route(
        "/api/v1/users/{name}",
        get(std::future::pending::<axum::http::StatusCode>),
    );
    let client_with_deadline = UsersClient::new(&base(serve(hanging).await))
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let bookings = start_bookings_with(BookingStore::memory(), client_with_deadline).await;
    let response = create_booking(&http, &bookings, &booking_body("ana")).await;
    expect_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    let list: Value = http
        .get(format!("{bookings}/api/v1/bookings?user=ana"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([]));
}

#[tokio::test]
async fn booking_validation_lists_every_error_with_paths() {
    let http = client();
    let (users, bookings) = start_memory_pair().await;
    create_user(&http, &users, "ana").await;
    let body = json!({
        "user": "ana",
        "flightNumber": "A1",
        "origin": "eze",
        "destination": "MAD",
        "departureTime": "2001-01-01T00:00:00Z",
        "passengers": [
            {"fullName": "Ana Diaz", "birthDate": "2999-01-01", "passportNumber": "AAB123456"},
            {"fullName": " ", "birthDate": "1990-02-30", "passportNumber": "no!"},
        ],
    });
    let response = create_booking(&http, &bookings, &body).await;
    let problem = expect_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(
        error_fields(&problem),
        [
            "flightNumber",
            "origin",
            "departureTime",
            "passengers[0].birthDate",
            "passengers[1].fullName",
            "passengers[1].birthDate",
            "passengers[1].passportNumber",
        ]
    );

    let mut same_airports = booking_body("ana");
    same_airports["destination"] = json!("EZE");
    same_airports["passengers"] = json!([]);
    let response = create_booking(&http, &bookings, &same_airports).await;
    let problem = expect_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(error_fields(&problem), ["destination", "passengers"]);

    let mut too_many = booking_body("ana");
    too_many["passengers"] = json!(vec![body["passengers"][0].clone(); 10]);
    too_many.as_object_mut().unwrap().remove("flightNumber");
    let response = create_booking(&http, &bookings, &too_many).await;
    let problem = expect_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    let fields = error_fields(&problem);
    assert_eq!(fields[..2], ["flightNumber", "passengers"]);

    // Nothing was stored by any of these.
    let list: Value = http
        .get(format!("{bookings}/api/v1/bookings?user=ana"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([]));
}

#[tokio::test]
async fn booking_list_requires_a_user() {
    let http = client();
    let (_, bookings) = start_memory_pair().await;
    for query in ["", "?user=", "?user=Not%20Valid"] {
        let response = http
            .get(format!("{bookings}/api/v1/bookings{query}"))
            .send()
            .await
            .unwrap();
        let problem = expect_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(error_fields(&problem), ["user"], "{query}");
    }
}

#[tokio::test]
async fn bookings_forward_request_id_and_trace_context_to_users() {
    let http = client();
    let seen: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
    let recorder = {
        let seen = Arc::clone(&seen);
        move |headers: HeaderMap| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(headers);
                axum::Json(json!({"username": "ana"}))
            }
        }
    };
    let fake_users = serve(Router::new().route("/api/v1/users/{name}", get(recorder))).await;
    let bookings = start_bookings(BookingStore::memory(), &base(fake_users)).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = http
        .post(format!("{bookings}/api/v1/bookings"))
        .header("x-request-id", "booking-req-7")
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=abc")
        .json(&booking_body("ana"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-request-id"], "booking-req-7");

    {
        let recorded = seen.lock().unwrap();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0]["x-request-id"], "booking-req-7");
        assert_eq!(recorded[0]["traceparent"], traceparent);
        assert_eq!(recorded[0]["tracestate"], "vendor=abc");
    }

    // Without a client ID, the one bookings generated is the one users sees; without trace
    // context nothing is made up.
    let response = create_booking(&http, &bookings, &booking_body("ana")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let generated = response.headers()["x-request-id"].clone();
    let recorded = seen.lock().unwrap();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[1]["x-request-id"], generated);
    assert!(!recorded[1].contains_key("traceparent"));
}

// ---------------------------------------------------------------- Redis

/// Two users and two bookings instances on one redis-server: whatever is written through one
/// instance is read through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backed_data_is_shared_across_instances() {
    let redis = RedisServer::start();
    let http = client();
    let users_a = start_users(UserStore::redis(&redis.url()).await.unwrap()).await;
    let users_b = start_users(UserStore::redis(&redis.url()).await.unwrap()).await;
    // Each bookings instance asks the other users instance, so the lookup crosses too.
    let bookings_a =
        start_bookings(BookingStore::redis(&redis.url()).await.unwrap(), &users_b).await;
    let bookings_b =
        start_bookings(BookingStore::redis(&redis.url()).await.unwrap(), &users_a).await;

    // Users: created on A, read, listed, refused again and deleted on B.
    let created = create_user(&http, &users_a, "shared.user").await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let fetched = http
        .get(format!("{users_b}/api/v1/users/shared.user"))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), StatusCode::OK);
    assert_eq!(fetched.json::<Value>().await.unwrap(), created);
    expect_problem(
        create_user(&http, &users_b, "shared.user").await,
        StatusCode::CONFLICT,
    )
    .await;

    // Concurrent creates of one name through both instances: exactly one wins.
    let racers = (0..6).map(|i| {
        let instance = if i % 2 == 0 { &users_a } else { &users_b };
        create_user(&http, instance, "racer")
    });
    let statuses: Vec<StatusCode> = join_all(racers)
        .await
        .into_iter()
        .map(|response| response.status())
        .collect();
    let created_count = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    assert_eq!(created_count, 1, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| [StatusCode::CREATED, StatusCode::CONFLICT].contains(s))
    );

    // Pagination over the shared index, alternating instances page by page.
    for name in ["kilo", "alpha", "juliet", "bravo", "india"] {
        create_user(&http, &users_b, name).await;
    }
    let mut expected: Vec<String> = [
        "kilo",
        "alpha",
        "juliet",
        "bravo",
        "india",
        "racer",
        "shared.user",
    ]
    .map(str::to_owned)
    .to_vec();
    expected.sort();
    for limit in [2, 3, 200] {
        assert_eq!(
            walk_users(&http, &[&users_a, &users_b], limit).await,
            expected,
            "limit {limit}"
        );
    }

    // Bookings: created on A, read and listed on B.
    let response = create_booking(&http, &bookings_a, &booking_body("shared.user")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let booking: Value = response.json().await.unwrap();
    let fetched = http
        .get(format!("{bookings_b}{location}"))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), StatusCode::OK);
    assert_eq!(fetched.json::<Value>().await.unwrap(), booking);
    let second: Value = create_booking(&http, &bookings_b, &booking_body("shared.user"))
        .await
        .json()
        .await
        .unwrap();
    let list: Value = http
        .get(format!("{bookings_a}/api/v1/bookings?user=shared.user"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"], json!([booking, second]));

    // Deleted through B, gone through A, and out of the index.
    let deleted = http
        .delete(format!("{users_b}/api/v1/users/alpha"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = http
        .get(format!("{users_a}/api/v1/users/alpha"))
        .send()
        .await
        .unwrap();
    expect_problem(gone, StatusCode::NOT_FOUND).await;
    expected.retain(|name| name != "alpha");
    assert_eq!(walk_users(&http, &[&users_a], 4).await, expected);

    // The keys live under the agreed prefixes only.
    let keys = redis_keys(&redis).await;
    assert!(!keys.is_empty());
    assert!(
        keys.iter()
            .all(|k| k.starts_with("tollgate:users:") || k.starts_with("tollgate:bookings:")),
        "{keys:?}"
    );
}

async fn redis_keys(redis: &RedisServer) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Redis going away at request time is a 503 problem, not a panic or a hang.
#[tokio::test]
async fn redis_outage_is_503() {
    let redis = RedisServer::start();
    let http = client();
    let users = start_users(UserStore::redis(&redis.url()).await.unwrap()).await;
    let bookings = start_bookings(BookingStore::redis(&redis.url()).await.unwrap(), &users).await;
    assert_eq!(
        create_user(&http, &users, "ana").await.status(),
        StatusCode::CREATED
    );
    drop(redis);

    let get = http
        .get(format!("{users}/api/v1/users/ana"))
        .send()
        .await
        .unwrap();
    let problem = expect_problem(get, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(problem["type"], "urn:tollgate:problem:storage-unavailable");
    let list = http
        .get(format!("{users}/api/v1/users"))
        .send()
        .await
        .unwrap();
    assert!(list.headers().contains_key("retry-after"));
    expect_problem(list, StatusCode::SERVICE_UNAVAILABLE).await;
    let create = create_user(&http, &users, "bob").await;
    expect_problem(create, StatusCode::SERVICE_UNAVAILABLE).await;
    let booking = http
        .get(format!("{bookings}/api/v1/bookings?user=ana"))
        .send()
        .await
        .unwrap();
    expect_problem(booking, StatusCode::SERVICE_UNAVAILABLE).await;
}

// ---------------------------------------------------------------- startup

#[tokio::test]
async fn run_serves_until_shutdown_and_reports_startup_failures() {
    use tollgate::services::{BookingsArgs, ServiceError, UsersArgs};

    // Stops cleanly when the shutdown future resolves.
    let args = UsersArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        redis: None,
    };
    users::run(args, async {}).await.unwrap();

    // A taken port is a bind error naming the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let args = UsersArgs {
        listen: addr,
        redis: None,
    };
    let error = users::run(args, async {}).await.unwrap_err();
    assert!(matches!(error, ServiceError::Bind { .. }), "{error:?}");
    assert!(error.to_string().contains(&addr.to_string()));

    // An unusable users URL or an unreachable Redis stop bookings before it listens.
    let args = BookingsArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        redis: None,
        users_url: "https://users.example".into(),
    };
    let error = bookings::run(args, async {}).await.unwrap_err();
    assert!(matches!(error, ServiceError::UsersClient(_)), "{error:?}");
    let args = BookingsArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        redis: Some(format!("redis://{}/", closed_addr())),
        users_url: "http://127.0.0.1:7001".into(),
    };
    let error = bookings::run(args, async {}).await.unwrap_err();
    assert!(matches!(error, ServiceError::Store(_)), "{error:?}");
}
