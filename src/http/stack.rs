//! The gateway's tower layer stack, in ONE place, in the order a request passes through it.
//!
//! ```text
//! client
//!   │
//!   ├─ 1. correlate      X-Request-ID accepted or generated, server span opened (W3C
//!   │                    trace context continued), ID echoed on every response (errors
//!   │                    and refusals included), request counted in the metrics
//!   ├─ 2. rate_limit     identify the caller (401 if its credentials are bad), decide every
//!   │                    matching policy in one store round trip (429 / 503 with
//!   │                    RateLimit headers), add RateLimit headers to what passes
//!   ├─ 3. proxy          route → concurrency slot → instance → upstream (streaming)
//!   ▼
//! upstream
//! ```
//!
//! The correlation layer is outermost so that everything after it, refusals included, is
//! logged under the request's ID and answers with it. Rate limiting comes after the ID exists
//! (a 429 must carry it) and before any upstream resource (a concurrency slot, a connection)
//! is taken, so refused traffic costs the upstream nothing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};

use crate::gateway::Gateway;
use crate::http::correlation::correlate_gateway;
use crate::http::ratelimit::rate_limit;

/// The proxy listener's app. Serve it with `into_make_service_with_connect_info::<SocketAddr>`
/// so the client address is known.
pub fn proxy_app(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .fallback(proxy)
        .with_state(gateway.clone())
        .layer(from_fn_with_state(gateway.limiter.clone(), rate_limit))
        .layer(from_fn_with_state(gateway, correlate_gateway))
}

async fn proxy(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    match gateway.proxy.forward(request, client).await {
        Ok(response) => response,
        Err(error) => {
            tracing::info!(%error, "request not proxied");
            error.into_response()
        }
    }
}
