//! What can go wrong while proxying, and the problem response for each.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::problem::Problem;

/// A request the gateway could not forward, or whose upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for {path}")]
    NoRoute { path: String },
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("service {service} is at its concurrency limit")]
    Overloaded { service: String },
    #[error("service {service} has no healthy instance")]
    NoHealthyInstance { service: String },
    #[error("service {service} instance {instance} unreachable: {reason}")]
    Unreachable {
        service: String,
        instance: String,
        reason: String,
    },
    #[error("service {service} did not answer within {timeout:?}")]
    Timeout { service: String, timeout: Duration },
    #[error("service {service} instance {instance} failed: {reason}")]
    UpstreamFailed {
        service: String,
        instance: String,
        reason: String,
    },
}

impl ProxyError {
    pub fn to_problem(&self) -> Problem {
        match self {
            Self::NoRoute { path } => Problem::new(
                StatusCode::NOT_FOUND,
                "no-route",
                "No route matches this path",
            )
            .detail(format!("no upstream service is routed for {path}")),
            Self::BodyTooLarge { limit } => Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
            )
            .detail(format!("the request body exceeds {limit} bytes"))
            .extension("maxBytes", *limit),
            Self::Overloaded { service } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Service at its concurrency limit",
            )
            .detail(format!("{service} has too many requests in progress"))
            .extension("service", service.clone())
            .retry_after(1),
            Self::NoHealthyInstance { service } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-healthy-instance",
                "No healthy upstream instance",
            )
            .detail(format!(
                "every instance of {service} is failing its health checks"
            ))
            .extension("service", service.clone())
            .retry_after(1),
            Self::Unreachable { service, .. } => Problem::new(
                StatusCode::BAD_GATEWAY,
                "upstream-unreachable",
                "Upstream unreachable",
            )
            .detail(format!("could not connect to {service}"))
            .extension("service", service.clone()),
            Self::Timeout { service, timeout } => Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                "Upstream timed out",
            )
            .detail(format!(
                "{service} did not answer within {} ms",
                timeout.as_millis()
            ))
            .extension("service", service.clone()),
            Self::UpstreamFailed { service, .. } => Problem::new(
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                "Upstream failed",
            )
            .detail(format!(
                "{service} closed the exchange without a valid response"
            ))
            .extension("service", service.clone()),
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        self.to_problem().into_response()
    }
}
