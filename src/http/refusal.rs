//! The limiter's answers when a request is not forwarded: 429, 503 and 401, as problem
//! documents ([`crate::problem`]).

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::limit::decision::Verdict;
use crate::limit::identity::IdentityError;
use crate::problem::Problem;

/// The response for a verdict that refuses (`None`: it admits).
pub fn for_verdict(verdict: &Verdict) -> Option<Response> {
    match verdict {
        Verdict::Admitted => None,
        Verdict::Rejected {
            violated,
            retry_after_secs,
        } => Some(too_many_requests(violated, *retry_after_secs)),
        Verdict::Unavailable { policies } => Some(unavailable(policies)),
    }
}

fn too_many_requests(violated: &[String], retry_after_secs: Option<u64>) -> Response {
    let mut problem = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "quota-exceeded",
        "Rate limit exceeded",
    )
    .extension("violatedPolicies", json!(violated));
    problem = match retry_after_secs {
        Some(secs) => problem
            .detail(format!(
                "quota exhausted for {}; retry in {secs} s",
                violated.join(", ")
            ))
            .retry_after(secs),
        None => problem.detail(format!(
            "the request costs more than {} allows at once: it can never be admitted",
            violated.join(", ")
        )),
    };
    problem.into_response()
}

fn unavailable(policies: &[String]) -> Response {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "rate-limit-unavailable",
        "Rate limit cannot be checked",
    )
    .detail(format!(
        "the rate-limit store is unavailable and {} refuse requests then",
        policies.join(", ")
    ))
    .extension("policies", json!(policies))
    .retry_after(1)
    .into_response()
}

/// 401 for credentials that were not accepted; a bad bearer token also gets the
/// `WWW-Authenticate` challenge RFC 6750 asks for.
pub fn unauthenticated(error: &IdentityError) -> Response {
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "Credentials not accepted",
    )
    .detail(error.to_string())
    .into_response();
    if matches!(
        error,
        IdentityError::InvalidToken(_) | IdentityError::Expired | IdentityError::NotYetValid
    ) {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    response
}
