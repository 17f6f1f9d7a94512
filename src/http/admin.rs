//! The admin API, on its own listener so proxy routes can never shadow it and it can be
//! kept off the public network.
//!
//! - `GET /health`: liveness. 200 while the process serves at all.
//! - `GET /ready`: readiness. 200 when every dependency can serve, else 503; the JSON body
//!   names each dependency (Redis, each upstream service's healthy instances) either way, so
//!   an operator sees why.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use http::StatusCode;
use serde_json::json;

use crate::gateway::Gateway;
use crate::http::correlation::correlate;

pub fn admin_app(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(gateway)
        .layer(from_fn(correlate))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    let services = gateway.proxy.status();
    let redis = gateway.redis_status().await;
    let services_ready = services.iter().all(|s| s.healthy_instances > 0);
    let ready = services_ready && redis.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not-ready" },
        "region": gateway.config.region,
        "dependencies": {
            "redis": redis,
            "services": services,
        },
    });
    (status, Json(body)).into_response()
}
