//! Correlation IDs: one per request, chosen at the edge and carried everywhere.
//!
//! A client may bring its own `X-Request-ID` so that it can find its request in our logs, but
//! the value ends up in log lines, spans and upstream headers, so only a short, inert alphabet
//! is trusted; anything else is replaced by a fresh UUIDv7 (time-ordered, so IDs sort by
//! arrival in log search).
//!
//! The layer that settles the ID also opens the request's OpenTelemetry server span (see
//! [`crate::telemetry`]) with the ID as its `correlation_id` attribute, so a trace in Jaeger
//! is found by the ID a client or a log line shows.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;

use crate::http::context::{RequestContext, connection_peer};
use crate::running::InForce;

use crate::telemetry;

/// The header that carries the correlation ID in both directions.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied ID we keep.
pub const MAX_LEN: usize = 128;

/// A validated correlation ID, stored in request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The client's ID if it is acceptable, else a new one.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        headers
            .get(&X_REQUEST_ID)
            .filter(|value| is_acceptable(value.as_bytes()))
            .map(|value| Self(value.clone()))
            .unwrap_or_else(Self::generate)
    }

    pub fn generate() -> Self {
        // The time-ordering context is one per thread: `Uuid::now_v7` shares one behind a
        // lock that every proxy worker's every request took, a cache line bouncing between
        // cores. IDs still sort by millisecond; within one, by arrival on each thread.
        thread_local! {
            static CONTEXT: uuid::ContextV7 = const { uuid::ContextV7::new() };
        }
        // uuid's `fast-rng` draws the random bits from a thread-local generator: without it
        // every ID cost a getrandom(2) system call.
        let uuid = CONTEXT.with(|context| uuid::Uuid::new_v7(uuid::Timestamp::now(context)));
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid.hyphenated().encode_lower(&mut text);
        // A hyphenated UUID is ASCII hex and '-', always a valid header value.
        Self(HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid")))
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Only IDs made of [A-Za-z0-9._-] are ever constructed, so this is valid UTF-8.
        self.0.to_str().unwrap_or_default()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// At most [`MAX_LEN`] characters of `[A-Za-z0-9._-]`, and not empty.
pub fn is_acceptable(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Middleware for the services and the admin API: [`traced`] with axum's matched route
/// template (e.g. `/api/v1/users/{username}`) as `http.route`.
pub async fn correlate(mut request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let server = Server {
        route: route.as_deref(),
        region: None,
        client: connection_peer(&request),
    };
    let id = RequestId::from_headers(request.headers());
    // Handlers take the ID as an extractor (`Extension<RequestId>`); the gateway's layers
    // read it from the header, which `traced` sets, and skip the extension's allocation.
    request.extensions_mut().insert(id.clone());
    traced(request, id, |request| next.run(request), server).await
}

/// The gateway's first layer ([`crate::http::stack`]): [`traced`] with the matched route prefix as
/// `http.route` and the region as `cloud.region`, and the request counted in the metrics
/// ([`crate::metrics`]) under its service, status and rate-limit decision.
///
/// It is the outermost layer, so every answer, refusals and 429s included, is counted and
/// traced, and the decision a limiter put in the response's extensions is seen.
///
/// The configuration snapshot in force, the route and the peer address are found here, once,
/// and travel in the request's [`RequestContext`], so the layers after it route the request
/// as it was counted, whatever a reload swaps in meanwhile.
pub async fn correlate_gateway<F, Fut>(
    region: &str,
    in_force: &InForce,
    mut request: Request,
    next: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let running = in_force.load();
    let routed = running.proxy.route(request.uri().path());
    let connection = connection_peer(&request);
    request.extensions_mut().insert(RequestContext {
        running: running.clone(),
        peer: connection.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        upstream: routed.map(|routed| routed.upstream),
    });
    let server = Server {
        route: routed.as_ref().map(|routed| routed.route),
        region: Some(region),
        client: connection,
    };
    let id = RequestId::from_headers(request.headers());
    let response = traced(request, id, next, server).await;
    crate::metrics::record_request(
        routed.map_or(crate::metrics::UNROUTED, |routed| routed.service),
        response.status(),
        crate::metrics::decision_label(response.extensions()),
        started.elapsed(),
    );
    response
}

/// What the server span knows about a request beyond the request itself.
#[derive(Debug, Clone, Copy)]
struct Server<'a> {
    /// A low-cardinality route (template or prefix), never the raw path.
    route: Option<&'a str>,
    /// The gateway's region; services have none.
    region: Option<&'a str>,
    /// The TCP peer, for `client.address`.
    client: Option<IpAddr>,
}

/// Forwards the request's settled ID `id` (the request header is overwritten, so whatever
/// reaches the handler or upstream is the validated value), opens the request's server span,
/// and echoes the ID on the response, errors included.
///
/// The span follows the OpenTelemetry HTTP server conventions and carries `correlation_id`,
/// so that every log line of the request has it and a trace can be found by it. It continues
/// the caller's trace when the request brings a valid `traceparent`.
async fn traced<F, Fut>(
    mut request: Request,
    id: RequestId,
    next: F,
    server: Server<'_>,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    request
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), id.header_value().clone());
    let method = request.method().clone();
    let client = server.client;
    if !telemetry::exporting() {
        // Without export the span is only log context, and at `info` it cost 9% of the
        // gateway's throughput (loadtest/run.sh, proxy.toml): it is a `debug` span, so lines
        // logged inside a request carry the correlation ID when RUST_LOG asks for debug. The
        // lines about a request itself name it at any level (see `http::stack::forward`).
        let span = tracing::debug_span!("request", correlation_id = %id);
        let mut response = next(request).instrument(span).await;
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), id.header_value().clone());
        return response;
    }
    let span = tracing::info_span!(
        "request",
        otel.name = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
        correlation_id = %id,
        http.request.method = %method,
        http.route = server.route,
        url.path = request.uri().path(),
        client.address = client.map(display),
        cloud.region = server.region,
        http.response.status_code = Empty,
    );
    // Span name per the conventions: "{method} {route}", or just the method without a route;
    // made only when the span is recorded, since it costs an allocation.
    if !span.is_disabled() {
        match server.route {
            Some(route) => span.record("otel.name", format!("{method} {route}")),
            None => span.record("otel.name", method.as_str()),
        };
    }
    telemetry::continue_trace(&span, request.headers());
    let mut response = next(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    // Server spans are errors only for 5xx: a 4xx is the client's mistake, not ours.
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), id.header_value().clone());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_valid_ids() {
        let mut headers = HeaderMap::new();
        headers.insert(
            X_REQUEST_ID.clone(),
            HeaderValue::from_static("abc.DEF_123-x"),
        );
        assert_eq!(RequestId::from_headers(&headers).as_str(), "abc.DEF_123-x");
    }

    #[test]
    fn replaces_invalid_ids() {
        for bad in ["", "has space", "semi;colon", &"a".repeat(129)] {
            let mut headers = HeaderMap::new();
            headers.insert(X_REQUEST_ID.clone(), HeaderValue::from_str(bad).unwrap());
            let id = RequestId::from_headers(&headers);
            assert_ne!(id.as_str(), bad);
            assert!(uuid::Uuid::parse_str(id.as_str()).is_ok());
        }
    }

    #[test]
    fn accepts_exactly_128_chars() {
        assert!(is_acceptable("a".repeat(128).as_bytes()));
        assert!(!is_acceptable("a".repeat(129).as_bytes()));
    }

    proptest! {
        #[test]
        fn generated_or_kept_ids_are_always_acceptable(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(&raw) {
                headers.insert(X_REQUEST_ID.clone(), value);
            }
            let id = RequestId::from_headers(&headers);
            prop_assert!(is_acceptable(id.header_value().as_bytes()));
        }
    }
}
