//! HTTP plumbing shared by both services: the JSON body extractor, field validation errors,
//! and the routes and fallbacks every router has.
//!
//! Request bodies are parsed into a plain JSON object and then read field by field rather
//! than deserialized straight into a struct: serde stops at the first missing or mistyped
//! field, while clients deserve to hear about every problem of a request at once.

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, Request};
use axum::http::{Method, StatusCode, Uri, header};
use axum::routing::get;
use axum::{Json, middleware};
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::http::correlation::correlate;
use crate::problem::Problem;

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct FieldError {
    /// Path of the field in the request, e.g. `passengers[1].birthDate`.
    pub field: String,
    /// What is wrong with it, phrased to follow the field name.
    pub message: String,
}

/// Collects every invalid field of a request, to be reported together in one 422.
#[derive(Debug, Default)]
pub(crate) struct Violations(Vec<FieldError>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// `Ok` if nothing was recorded, else the 422 problem listing everything that was.
    pub fn into_result(self) -> Result<(), Problem> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(validation_problem(self.0))
        }
    }
}

/// 422 with an `errors` extension: `[{"field": .., "message": ..}, ..]`.
pub(crate) fn validation_problem(errors: Vec<FieldError>) -> Problem {
    let detail = match errors.len() {
        1 => "1 field is invalid".to_owned(),
        n => format!("{n} fields are invalid"),
    };
    // Serializing a Vec of plain string pairs cannot fail; an empty list is the safe fallback.
    let errors = serde_json::to_value(errors).unwrap_or_else(|_| Value::Array(Vec::new()));
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation-failed",
        "Request is invalid",
    )
    .detail(detail)
    .extension("errors", errors)
}

/// A single-field 422, for query parameters and lookups.
pub(crate) fn invalid_field(field: &str, message: &str) -> Problem {
    validation_problem(vec![FieldError {
        field: field.to_owned(),
        message: message.to_owned(),
    }])
}

/// Reads `object[key]` as a string; records at `path` why it is not one (missing, null or
/// another type) and returns `None` then.
pub(crate) fn string_field(
    object: &Map<String, Value>,
    key: &str,
    path: &str,
    violations: &mut Violations,
) -> Option<String> {
    match object.get(key) {
        Some(Value::String(value)) => Some(value.clone()),
        None | Some(Value::Null) => {
            violations.add(path, "is required");
            None
        }
        Some(_) => {
            violations.add(path, "must be a string");
            None
        }
    }
}

/// Checks a trimmed human-readable text (a name) for presence and length, recording at
/// `path` what is wrong; returns the trimmed text if it is fine.
pub(crate) fn check_text(
    value: Option<String>,
    path: &str,
    max_chars: usize,
    violations: &mut Violations,
) -> Option<String> {
    let value = value?;
    let trimmed = value.trim();
    if trimmed.is_empty() {
        violations.add(path, "must not be empty");
        None
    } else if trimmed.chars().count() > max_chars {
        violations.add(path, format!("must be at most {max_chars} characters"));
        None
    } else {
        Some(trimmed.to_owned())
    }
}

/// A request body that is a JSON object.
///
/// Rejections are problems, never axum's plain-text ones: a body that is not declared as JSON
/// or does not parse is a 400, a JSON value other than an object a 422.
#[derive(Debug)]
pub(crate) struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Problem> {
        let declared_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(is_json_media_type);
        if !declared_json {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "unsupported-content-type",
                "Request body must be JSON",
            )
            .detail("send the body with Content-Type: application/json"));
        }
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                Problem::new(
                    rejection.status(),
                    "unreadable-body",
                    "Request body could not be read",
                )
                .detail(rejection.body_text())
            })?;
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(object)) => Ok(Self(object)),
            Ok(_) => Err(invalid_field("body", "must be a JSON object")),
            Err(error) => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "Request body is not valid JSON",
            )
            .detail(error.to_string())),
        }
    }
}

/// `application/json` or any `application/*+json`, parameters (charset) ignored.
fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// 400 for a path parameter axum could not decode (e.g. invalid percent-encoding).
pub(crate) fn bad_path(rejection: PathRejection) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-path",
        "Request path is invalid",
    )
    .detail(rejection.body_text())
}

/// 400 for a query string axum could not decode.
pub(crate) fn bad_query(rejection: QueryRejection) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-query",
        "Query string is invalid",
    )
    .detail(rejection.body_text())
}

/// 404 for a resource that does not exist.
pub(crate) fn not_found(detail: String) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found").detail(detail)
}

/// Adds what every service router has: `GET /health`, problem+json for unknown routes and
/// methods, and the correlation middleware, outermost so it also covers those fallbacks.
pub(crate) fn finish(router: Router) -> Router {
    router
        .route("/health", get(health))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(unknown_route)
        .layer(middleware::from_fn(correlate))
}

/// Liveness only: it does not probe Redis or the users service, so that an orchestrator does
/// not restart every instance when a shared dependency blips.
async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn unknown_route(uri: Uri) -> Problem {
    not_found(format!("nothing is served at {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
    )
    .detail(format!("{method} is not allowed on {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(is_json_media_type("application/merge-patch+json"));
        assert!(!is_json_media_type("text/plain"));
        assert!(!is_json_media_type("application/jsonx"));
        assert!(!is_json_media_type(""));
    }

    #[test]
    fn string_field_reports_missing_and_mistyped() {
        let object = json!({"a": "x", "b": 5, "c": null});
        let Value::Object(object) = object else {
            unreachable!()
        };
        let mut violations = Violations::new();
        assert_eq!(
            string_field(&object, "a", "a", &mut violations),
            Some("x".into())
        );
        assert_eq!(string_field(&object, "b", "b", &mut violations), None);
        assert_eq!(string_field(&object, "c", "c", &mut violations), None);
        assert_eq!(string_field(&object, "d", "d", &mut violations), None);
        let fields: Vec<_> = violations.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["b", "c", "d"]);
        assert_eq!(violations.0[0].message, "must be a string");
        assert_eq!(violations.0[1].message, "is required");
    }

    #[test]
    fn check_text_trims_and_bounds() {
        let mut violations = Violations::new();
        assert_eq!(
            check_text(Some("  Ana ".into()), "name", 5, &mut violations),
            Some("Ana".into())
        );
        assert_eq!(
            check_text(Some("   ".into()), "name", 5, &mut violations),
            None
        );
        assert_eq!(
            check_text(Some("abcdef".into()), "name", 5, &mut violations),
            None
        );
        assert_eq!(check_text(None, "name", 5, &mut violations), None);
        assert_eq!(violations.0.len(), 2);
    }
}
