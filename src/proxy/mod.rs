//! The reverse proxy: route, admit into the service's concurrency limit, pick an instance,
//! forward with bodies streaming both ways, and map every failure to a problem response.
//!
//! Retries: a request whose connection could not be made is tried on another instance, body
//! and all, since nothing of it was sent (see [`client`]). Once a request has gone out it is
//! never retried: a streamed body is consumed as it is sent and cannot be replayed, buffering
//! it to make retries possible is exactly what the gateway must not do, and the upstream may
//! already have acted on it.

mod body;
pub mod client;
mod concurrency;
mod error;
mod headers;
mod health;
mod pool;
mod routes;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;

use crate::config::{RegionConfig, ServiceConfig};
use crate::telemetry;
pub use body::{GuardedBody, LimitedBody};
use client::SendError;
pub use concurrency::{ConcurrencyLimit, Refused};
pub use error::ProxyError;
pub use headers::{add_forwarded, strip_hop_by_hop};
pub use pool::{Endpoint, Pool};
pub use routes::RouteTable;

/// Most instances one request is tried on (only connect failures are retried).
const MAX_ATTEMPTS: usize = 3;

/// `server.port` of an `http://` instance written without a port.
const DEFAULT_HTTP_PORT: u16 = 80;

/// One upstream service: its instances (each with its connections) and limits.
pub struct Upstream {
    pub config: ServiceConfig,
    pub pool: Pool,
    limit: ConcurrencyLimit,
}

impl Upstream {
    fn new(config: ServiceConfig) -> Self {
        Self {
            // Keep enough idle connections per instance for the concurrency the service allows.
            pool: Pool::new(
                &config.instances,
                config.connect_timeout,
                config.concurrency_limit,
            ),
            limit: ConcurrencyLimit::new(
                config.concurrency_limit,
                config.queue_size,
                config.queue_timeout,
            ),
            config,
        }
    }
}

/// The active health checks and idle-connection expiry of the current proxy's upstreams:
/// [`UpstreamTasks::follow`] starts them for new upstreams, keeps those of upstreams a
/// reload kept, and stops the rest (dropping a `JoinSet` aborts its tasks).
#[derive(Default)]
pub struct UpstreamTasks {
    running: Vec<(Arc<Upstream>, JoinSet<()>)>,
}

impl UpstreamTasks {
    pub fn follow(&mut self, proxy: &Proxy) {
        let mut next = Vec::with_capacity(proxy.upstreams.len());
        for upstream in &proxy.upstreams {
            let kept = self
                .running
                .iter()
                .position(|(running, _)| Arc::ptr_eq(running, upstream));
            next.push(match kept {
                Some(i) => self.running.swap_remove(i),
                None => (upstream.clone(), spawn_tasks(upstream)),
            });
        }
        self.running = next;
    }
}

fn spawn_tasks(upstream: &Arc<Upstream>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    tasks.spawn(health::reap_idle(upstream.clone()));
    if upstream.config.health_check.is_some() {
        tasks.spawn(health::run(upstream.clone()));
    }
    tasks
}

/// Health of one service as the readiness endpoint reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub name: String,
    pub healthy_instances: usize,
    pub instances: usize,
    pub in_flight: usize,
    pub queued: usize,
}

/// Where a path is routed: the matching route prefix and its service's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed<'a> {
    /// The route prefix that matched (a bounded label for spans and metrics, unlike paths).
    pub route: &'a str,
    /// The service's configured name.
    pub service: &'a str,
    /// The service, for [`Proxy::forward`] on the same [`Proxy`].
    pub upstream: UpstreamIdx,
}

/// One [`Proxy`]'s service, as its route table names it: meaningful only with the `Proxy`
/// that routed it (a reload builds another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamIdx(usize);

/// Every upstream of a region and the routes to them.
pub struct Proxy {
    routes: RouteTable,
    upstreams: Vec<Arc<Upstream>>,
    max_request_body: u64,
}

impl Proxy {
    pub fn new(config: &RegionConfig) -> Self {
        Self::build(config, |_| None)
    }

    /// The proxy for a reloaded `config`: a service whose configuration did not change keeps
    /// its upstream as it is (instance health, ejections, kept-alive connections, the
    /// concurrency limit and its queue); a changed or new one starts afresh. Requests in
    /// flight finish on the upstream they started with.
    pub fn reconfigured(&self, config: &RegionConfig) -> Self {
        Self::build(config, |service| {
            self.upstreams
                .iter()
                .find(|upstream| upstream.config == *service)
                .cloned()
        })
    }

    fn build(
        config: &RegionConfig,
        reuse: impl Fn(&ServiceConfig) -> Option<Arc<Upstream>>,
    ) -> Self {
        let upstreams: Vec<Arc<Upstream>> = config
            .services
            .values()
            .map(|service| {
                reuse(service).unwrap_or_else(|| Arc::new(Upstream::new(service.clone())))
            })
            .collect();
        let routes = RouteTable::new(upstreams.iter().enumerate().flat_map(|(i, upstream)| {
            upstream
                .config
                .routes
                .iter()
                .map(move |route| (route.clone(), i))
        }));
        Self {
            routes,
            upstreams,
            max_request_body: config.max_request_body,
        }
    }

    pub fn status(&self) -> Vec<ServiceStatus> {
        let now = Instant::now();
        self.upstreams
            .iter()
            .map(|upstream| ServiceStatus {
                name: upstream.config.name.clone(),
                healthy_instances: upstream.pool.available(now),
                instances: upstream.pool.endpoints.len(),
                in_flight: upstream.pool.endpoints.iter().map(|e| e.in_flight()).sum(),
                queued: upstream.limit.waiting(),
            })
            .collect()
    }

    /// The route and service `path` goes to, if any (for spans and metrics; cheap).
    pub fn route(&self, path: &str) -> Option<Routed<'_>> {
        self.routes.lookup_prefix(path).map(|(route, i)| Routed {
            route,
            service: &self.upstreams[i].config.name,
            upstream: UpstreamIdx(i),
        })
    }

    /// Forwards `request` from `client` to `upstream`, the service [`Proxy::route`] found
    /// for its path (`None`: no route, answered as such).
    ///
    /// Each attempt is a client span (OpenTelemetry HTTP client conventions) whose context is
    /// sent upstream as `traceparent`, so the upstream's server span is its child.
    pub async fn forward(
        &self,
        upstream: Option<UpstreamIdx>,
        request: Request<Body>,
        client: IpAddr,
    ) -> Result<Response<Body>, ProxyError> {
        let upstream = upstream
            .and_then(|UpstreamIdx(i)| self.upstreams.get(i))
            .ok_or_else(|| ProxyError::NoRoute {
                path: request.uri().path().to_owned(),
            })?;
        let name = &upstream.config.name;
        if content_length(&request).is_some_and(|len| len > self.max_request_body) {
            return Err(ProxyError::BodyTooLarge {
                limit: self.max_request_body,
            });
        }
        let slot = upstream
            .limit
            .acquire()
            .await
            .map_err(|_| ProxyError::Overloaded {
                service: name.clone(),
            })?;

        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        add_forwarded(&mut parts.headers, client, "http");
        // The upstream sees its own authority in Host (set per attempt below), as nginx does by
        // default; the client's Host travels in X-Forwarded-Host.
        parts.headers.remove(header::HOST);
        // Origin form: the connection already goes to the instance.
        parts.uri = match parts.uri.path_and_query() {
            Some(path_and_query) => Uri::from(path_and_query.clone()),
            None => Uri::from(PathAndQuery::from_static("/")),
        };
        parts.version = Version::HTTP_11;
        let too_large = Arc::new(AtomicBool::new(false));
        let body = LimitedBody::new(body, self.max_request_body, too_large.clone());
        let mut outgoing = Request::from_parts(parts, body);

        let mut tried = 0u64;
        let mut last_error = None;
        for _ in 0..MAX_ATTEMPTS.min(upstream.pool.endpoints.len()) {
            let now = Instant::now();
            let Some(index) = upstream.pool.pick(now, tried) else {
                break;
            };
            tried |= 1 << index.min(63);
            let endpoint = &upstream.pool.endpoints[index];
            outgoing
                .headers_mut()
                .insert(header::HOST, endpoint.connections.host_header().clone());

            let authority = &endpoint.instance.authority;
            // Only traces use the attempt's span (log lines name the instance themselves).
            let span = if !telemetry::exporting() {
                tracing::Span::none()
            } else {
                tracing::info_span!(
                    "upstream",
                    otel.name = outgoing.method().as_str(),
                    otel.kind = "client",
                    otel.status_code = Empty,
                    http.request.method = outgoing.method().as_str(),
                    server.address = authority.host(),
                    server.port = authority.port_u16().unwrap_or(DEFAULT_HTTP_PORT),
                    service = name.as_str(),
                    http.response.status_code = Empty,
                    error.type = Empty,
                )
            };
            // Replaces the client's traceparent with this attempt's; without trace export the
            // client's one travels on unchanged.
            telemetry::inject(&span, outgoing.headers_mut());

            let in_flight = endpoint.start_request();
            let sent = tokio::time::timeout(
                upstream.config.request_timeout,
                endpoint.connections.send(outgoing),
            )
            .instrument(span.clone())
            .await;
            record_attempt(&span, &sent);
            match sent {
                Ok(Ok((response, lease))) => {
                    let (mut head, incoming) = response.into_parts();
                    strip_hop_by_hop(&mut head.headers);
                    let body = Body::new(GuardedBody::new(incoming, lease, (slot, in_flight)));
                    return Ok(Response::from_parts(head, body));
                }
                Err(_elapsed) => {
                    return Err(ProxyError::Timeout {
                        service: name.clone(),
                        timeout: upstream.config.request_timeout,
                    });
                }
                Ok(Err(SendError::Connect { reason, request })) => {
                    if endpoint.eject(now, upstream.config.ejection_time) {
                        tracing::warn!(
                            service = %name,
                            instance = %endpoint.instance,
                            error = %reason,
                            "instance refused a connection, ejected for {:?}",
                            upstream.config.ejection_time
                        );
                    }
                    last_error = Some(ProxyError::Unreachable {
                        service: name.clone(),
                        instance: endpoint.instance.to_string(),
                        reason,
                    });
                    outgoing = *request;
                }
                Ok(Err(SendError::Failed(_))) if too_large.load(Ordering::Acquire) => {
                    return Err(ProxyError::BodyTooLarge {
                        limit: self.max_request_body,
                    });
                }
                Ok(Err(SendError::Failed(error))) => {
                    return Err(ProxyError::UpstreamFailed {
                        service: name.clone(),
                        instance: endpoint.instance.to_string(),
                        reason: error_chain(&error),
                    });
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ProxyError::NoHealthyInstance {
            service: name.clone(),
        }))
    }
}

/// Puts an attempt's outcome on its client span: the status, or what kind of failure.
fn record_attempt<B, L, E>(
    span: &tracing::Span,
    sent: &Result<Result<(Response<B>, L), SendError>, E>,
) {
    let error_type = match sent {
        Ok(Ok((response, _))) => {
            let status = response.status();
            span.record("http.response.status_code", status.as_u16());
            // For a client span every 4xx and 5xx is a failed call.
            if status.is_client_error() || status.is_server_error() {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", status.as_str());
            }
            return;
        }
        Err(_) => "timeout",
        Ok(Err(SendError::Connect { .. })) => "connect",
        Ok(Err(SendError::Failed(_))) => "upstream_failed",
    };
    span.record("otel.status_code", "ERROR");
    span.record("error.type", error_type);
}

fn content_length<B>(request: &Request<B>) -> Option<u64> {
    request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// An error and its sources on one line, for logs.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
