//! The gateway's tower layer stack, in ONE place, in the order a request passes through it.
//!
//! ```text
//! client
//!   │
//!   ├─ 1. correlate      X-Request-ID accepted or generated, request span opened,
//!   │                    ID echoed on every response (errors and refusals included)
//!   ├─ 2. proxy          route → concurrency slot → instance → upstream (streaming)
//!   ▼
//! upstream
//! ```
//!
//! The correlation layer is outermost so that everything after it, refusals included, is
//! logged under the request's ID and answers with it. Rate limiting slots in between 1 and 2:
//! after the ID exists (a 429 must carry it) and before any upstream resource is taken.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Response};

use crate::gateway::Gateway;
use crate::http::correlation::correlate;

/// The proxy listener's app. Serve it with `into_make_service_with_connect_info::<SocketAddr>`
/// so the client address is known.
pub fn proxy_app(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .fallback(proxy)
        .with_state(gateway)
        .layer(from_fn(correlate))
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
