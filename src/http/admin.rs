//! The admin API, on its own listener so proxy routes can never shadow it and it can be
//! kept off the public network.
//!
//! - `GET /health`: liveness. 200 while the process serves at all.
//! - `GET /ready`: readiness. 200 when every dependency can serve, else 503; the JSON body
//!   names each dependency (Redis, each upstream service's healthy instances) either way, so
//!   an operator sees why.
//! - `GET /metrics`: every `tollgate_*` metric in the Prometheus text format (catalogue in
//!   [`crate::metrics`]). The upstream gauges are sampled at scrape time.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use http::{StatusCode, header};
use serde_json::json;

use crate::gateway::Gateway;
use crate::http::correlation::correlate;

pub fn admin_app(gateway: Arc<Gateway>) -> Router {
    // Before the first request is served, so that none goes uncounted.
    crate::metrics::install();
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(gateway)
        .layer(from_fn(correlate))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    for service in gateway.proxy.status() {
        crate::metrics::record_upstream(
            &service.name,
            service.in_flight,
            service.healthy_instances,
        );
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(),
    )
        .into_response()
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
