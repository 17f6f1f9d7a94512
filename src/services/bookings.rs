//! The bookings service: a user books a flight for one to nine passengers.
//!
//! | method and path                  | answer                                                  |
//! |----------------------------------|---------------------------------------------------------|
//! | `POST /api/v1/bookings`          | 201 + `Location`, 422 with errors, 503 if users is down |
//! | `GET /api/v1/bookings/{id}`      | 200, 404                                                |
//! | `GET /api/v1/bookings?user=NAME` | `{"items": [...]}`, oldest first                        |
//!
//! A booking is only stored once the users service has confirmed that its user exists; if the
//! users service cannot answer, nothing is stored and the client gets a 503 it may retry.

mod store;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, FixedOffset, NaiveDate, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

pub use store::BookingStore;

use super::users::is_valid_username;
use super::users_client::{UserLookup, UsersClient};
use super::web::{self, JsonObject, Violations};
use super::{BookingsArgs, ServiceError};
use crate::http::correlation::RequestId;
use crate::problem::Problem;

/// Most passengers one booking may carry.
pub const MAX_PASSENGERS: usize = 9;
/// Longest passenger name, in characters.
pub const FULL_NAME_MAX_CHARS: usize = 100;
/// Shortest and longest passport number.
pub const PASSPORT_LEN: std::ops::RangeInclusive<usize> = 5..=20;

/// A stored booking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Booking {
    /// UUIDv7, so that IDs sort by creation time.
    #[serde(with = "uuid_text")]
    pub id: Uuid,
    pub user: String,
    pub flight_number: String,
    /// IATA airport code.
    pub origin: String,
    /// IATA airport code.
    pub destination: String,
    /// Kept with the offset the client gave, which is usually the departure airport's.
    pub departure_time: DateTime<FixedOffset>,
    pub passengers: Vec<Passenger>,
    pub created_at: DateTime<Utc>,
}

/// One traveller of a booking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Passenger {
    pub full_name: String,
    pub birth_date: NaiveDate,
    pub passport_number: String,
}

/// Serde for [`Uuid`] as its hyphenated text (the `uuid` crate's own serde feature is off).
mod uuid_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(id: &Uuid, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&id.hyphenated())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Uuid, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Uuid::parse_str(&text).map_err(serde::de::Error::custom)
    }
}

/// Whether `code` is an IATA airport code: exactly three ASCII capital letters.
pub fn is_iata_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

/// Whether `number` is a flight number like `AR1132`: a two-character airline designator of
/// capitals and digits with at least one letter, then one to four digits.
pub fn is_flight_number(number: &str) -> bool {
    let bytes = number.as_bytes();
    let Some((designator, digits)) = bytes.split_at_checked(2) else {
        return false;
    };
    designator
        .iter()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        && designator.iter().any(u8::is_ascii_uppercase)
        && (1..=4).contains(&digits.len())
        && digits.iter().all(u8::is_ascii_digit)
}

/// Whether `number` is 5-20 ASCII letters and digits.
pub fn is_passport_number(number: &str) -> bool {
    PASSPORT_LEN.contains(&number.len()) && number.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A calendar date written exactly `YYYY-MM-DD`.
///
/// chrono alone would also take `1990-1-5` or a signed year; the shape check rules those out.
pub fn parse_date(text: &str) -> Option<NaiveDate> {
    let bytes = text.as_bytes();
    let shaped = bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shaped {
        return None;
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
}

/// A validated booking request, its user not yet confirmed.
#[derive(Debug)]
struct NewBooking {
    user: String,
    flight_number: String,
    origin: String,
    destination: String,
    departure_time: DateTime<FixedOffset>,
    passengers: Vec<Passenger>,
}

impl NewBooking {
    /// Checks every field against the clock `now`, reporting all problems together.
    fn parse(body: &Map<String, Value>, now: DateTime<Utc>) -> Result<Self, Problem> {
        let mut violations = Violations::new();
        let user = web::string_field(body, "user", "user", &mut violations).filter(|user| {
            let ok = is_valid_username(user);
            if !ok {
                violations.add("user", "must be a valid username");
            }
            ok
        });
        let flight_number =
            web::string_field(body, "flightNumber", "flightNumber", &mut violations).filter(
                |number| {
                    let ok = is_flight_number(number);
                    if !ok {
                        violations.add(
                            "flightNumber",
                            "must be a 2-character airline code and 1 to 4 digits, like AR1132",
                        );
                    }
                    ok
                },
            );
        let mut airport = |key: &str| {
            web::string_field(body, key, key, &mut violations).filter(|code| {
                let ok = is_iata_code(code);
                if !ok {
                    violations.add(key, "must be a 3-letter IATA code in capitals, like EZE");
                }
                ok
            })
        };
        let origin = airport("origin");
        let destination = airport("destination");
        if let (Some(origin), Some(destination)) = (&origin, &destination)
            && origin == destination
        {
            violations.add("destination", "must differ from origin");
        }
        let departure_time =
            web::string_field(body, "departureTime", "departureTime", &mut violations).and_then(
                |text| match DateTime::parse_from_rfc3339(&text) {
                    Ok(time) if time > now => Some(time),
                    Ok(_) => {
                        violations.add("departureTime", "must be in the future");
                        None
                    }
                    Err(_) => {
                        violations.add(
                            "departureTime",
                            "must be an RFC 3339 date-time, like 2030-01-31T18:45:00-03:00",
                        );
                        None
                    }
                },
            );
        let passengers = parse_passengers(body, now.date_naive(), &mut violations);
        violations.into_result()?;
        match (user, flight_number, origin, destination, departure_time) {
            (
                Some(user),
                Some(flight_number),
                Some(origin),
                Some(destination),
                Some(departure_time),
            ) => Ok(Self {
                user,
                flight_number,
                origin,
                destination,
                departure_time,
                passengers,
            }),
            // Unreachable: every `None` above recorded a violation, returned just before.
            _ => Err(web::invalid_field("body", "is invalid")),
        }
    }
}

/// The `passengers` array; only the first [`MAX_PASSENGERS`] entries are examined, which
/// bounds the error list whatever the client sends.
fn parse_passengers(
    body: &Map<String, Value>,
    today: NaiveDate,
    violations: &mut Violations,
) -> Vec<Passenger> {
    let items = match body.get("passengers") {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => {
            violations.add("passengers", "is required");
            return Vec::new();
        }
        Some(_) => {
            violations.add("passengers", "must be an array");
            return Vec::new();
        }
    };
    if !(1..=MAX_PASSENGERS).contains(&items.len()) {
        violations.add(
            "passengers",
            format!("must list 1 to {MAX_PASSENGERS} passengers"),
        );
    }
    let mut passengers = Vec::with_capacity(items.len().min(MAX_PASSENGERS));
    for (index, item) in items.iter().take(MAX_PASSENGERS).enumerate() {
        let path = format!("passengers[{index}]");
        let Value::Object(item) = item else {
            violations.add(path, "must be an object");
            continue;
        };
        let field = |key: &str| format!("{path}.{key}");
        let full_name = web::string_field(item, "fullName", &field("fullName"), violations);
        let full_name = web::check_text(
            full_name,
            &field("fullName"),
            FULL_NAME_MAX_CHARS,
            violations,
        );
        let birth_date = web::string_field(item, "birthDate", &field("birthDate"), violations)
            .and_then(|text| match parse_date(&text) {
                Some(date) if date < today => Some(date),
                Some(_) => {
                    violations.add(field("birthDate"), "must be in the past");
                    None
                }
                None => {
                    violations.add(field("birthDate"), "must be a date like 1990-12-31");
                    None
                }
            });
        let passport_number =
            web::string_field(item, "passportNumber", &field("passportNumber"), violations).filter(
                |number| {
                    let ok = is_passport_number(number);
                    if !ok {
                        violations.add(
                            field("passportNumber"),
                            "must be 5 to 20 letters and digits",
                        );
                    }
                    ok
                },
            );
        if let (Some(full_name), Some(birth_date), Some(passport_number)) =
            (full_name, birth_date, passport_number)
        {
            passengers.push(Passenger {
                full_name,
                birth_date,
                passport_number,
            });
        }
    }
    passengers
}

#[derive(Debug, Clone)]
struct AppState {
    store: BookingStore,
    users: UsersClient,
}

/// The bookings service's router, with `/health`, problem fallbacks and correlation IDs.
pub fn app(store: BookingStore, users: UsersClient) -> Router {
    web::finish(
        Router::new()
            .route("/api/v1/bookings", post(create_booking).get(list_bookings))
            .route("/api/v1/bookings/{id}", get(get_booking))
            .with_state(AppState { store, users }),
    )
}

/// Serves the bookings service on `args.listen` until `shutdown` resolves.
///
/// Connects to Redis first when `args.redis` is set, and fails if it cannot or if
/// `args.users_url` is not an http URL.
pub async fn run(
    args: BookingsArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let users = UsersClient::new(&args.users_url)?;
    let store = match &args.redis {
        Some(url) => BookingStore::redis(url).await?,
        None => BookingStore::memory(),
    };
    let backend = store.backend();
    tracing::info!(users_url = %users.base_url(), "bookings check users against this service");
    super::serve(
        "bookings",
        args.listen,
        backend,
        app(store, users),
        shutdown,
    )
    .await
}

async fn create_booking(
    State(state): State<AppState>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Response, Problem> {
    let now = Utc::now();
    let new = NewBooking::parse(&body, now)?;
    // Only a request that is valid in itself costs the users service a call.
    let request_id = request_id.map(|Extension(id)| id);
    match state
        .users
        .lookup(&new.user, request_id.as_ref(), &headers)
        .await
    {
        Ok(UserLookup::Exists) => {}
        Ok(UserLookup::NotFound) => {
            return Err(web::invalid_field(
                "user",
                "no such user; onboard them first",
            ));
        }
        Err(error) => {
            tracing::warn!(%error, "cannot confirm the booking's user");
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "users-unavailable",
                "Users service is unavailable",
            )
            .detail(
                "the booking's user could not be confirmed, so nothing was booked; retry shortly",
            )
            .retry_after(1));
        }
    }
    let booking = Booking {
        id: Uuid::now_v7(),
        user: new.user,
        flight_number: new.flight_number,
        origin: new.origin,
        destination: new.destination,
        departure_time: new.departure_time,
        passengers: new.passengers,
        // Millisecond precision is all clients can use and keeps the JSON short.
        created_at: now.trunc_subsecs(3),
    };
    state.store.insert(&booking).await?;
    tracing::info!(id = %booking.id, user = %booking.user, "booking created");
    let location = format!("/api/v1/bookings/{}", booking.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(booking),
    )
        .into_response())
}

async fn get_booking(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Booking>, Problem> {
    let Path(raw) = path.map_err(web::bad_path)?;
    let missing = || web::not_found(format!("no booking with id {raw}"));
    let id = Uuid::parse_str(&raw).map_err(|_| missing())?;
    state.store.get(id).await?.map(Json).ok_or_else(missing)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    user: Option<String>,
}

#[derive(Debug, Serialize)]
struct BookingList {
    items: Vec<Booking>,
}

async fn list_bookings(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<BookingList>, Problem> {
    let Query(query) = query.map_err(web::bad_query)?;
    let user = match query.user {
        None => return Err(web::invalid_field("user", "is required")),
        Some(user) if !is_valid_username(&user) => {
            return Err(web::invalid_field("user", "must be a valid username"));
        }
        Some(user) => user,
    };
    Ok(Json(BookingList {
        items: state.store.list_for_user(&user).await?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flight_numbers() {
        for good in ["AR1132", "U21", "2K1234", "AA1"] {
            assert!(is_flight_number(good), "{good}");
        }
        for bad in ["AR", "AR12345", "12123", "ar1132", "AR11A", "A", "", "ÁR12"] {
            assert!(!is_flight_number(bad), "{bad}");
        }
    }

    #[test]
    fn iata_and_passports() {
        assert!(is_iata_code("EZE"));
        for bad in ["eze", "EZ", "EZEE", "E1E", ""] {
            assert!(!is_iata_code(bad), "{bad}");
        }
        assert!(is_passport_number("AAB12345"));
        assert!(!is_passport_number("AB-123"));
        assert!(!is_passport_number("A123"));
    }

    #[test]
    fn dates_must_be_exactly_shaped() {
        assert_eq!(
            parse_date("1990-12-31"),
            NaiveDate::from_ymd_opt(1990, 12, 31)
        );
        for bad in [
            "1990-1-5",
            "1990-02-30",
            "+1990-01-01",
            "19900101",
            "1990-01-01T",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn parse_lists_every_error_with_paths() {
        let body = json!({
            "user": "ana",
            "flightNumber": "X",
            "origin": "EZE",
            "destination": "EZE",
            "departureTime": "2000-01-01T00:00:00Z",
            "passengers": [
                {"fullName": "Ana", "birthDate": "2999-01-01", "passportNumber": "AB12345"},
                "nope",
                {"fullName": "", "birthDate": "1990-13-01", "passportNumber": "x"}
            ]
        });
        let Value::Object(body) = body else {
            unreachable!()
        };
        let problem = NewBooking::parse(&body, Utc::now()).unwrap_err();
        let fields: Vec<_> = problem.extensions["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            fields,
            [
                "flightNumber",
                "destination",
                "departureTime",
                "passengers[0].birthDate",
                "passengers[1]",
                "passengers[2].fullName",
                "passengers[2].birthDate",
                "passengers[2].passportNumber",
            ]
        );
    }

    #[test]
    fn booking_json_round_trips() {
        let booking = Booking {
            id: Uuid::now_v7(),
            user: "ana".into(),
            flight_number: "AR1132".into(),
            origin: "EZE".into(),
            destination: "MAD".into(),
            departure_time: DateTime::parse_from_rfc3339("2030-01-01T10:00:00-03:00").unwrap(),
            passengers: vec![Passenger {
                full_name: "Ana Diaz".into(),
                birth_date: NaiveDate::from_ymd_opt(1990, 1, 2).unwrap(),
                passport_number: "AAB123456".into(),
            }],
            created_at: Utc::now().trunc_subsecs(3),
        };
        let json = serde_json::to_value(&booking).unwrap();
        assert_eq!(json["flightNumber"], "AR1132");
        assert_eq!(json["passengers"][0]["birthDate"], "1990-01-02");
        assert_eq!(json["departureTime"], "2030-01-01T10:00:00-03:00");
        assert_eq!(serde_json::from_value::<Booking>(json).unwrap(), booking);
    }
}
