//! The gateway's tower layer stack, in ONE place, in the order a request passes through it,
//! and the loop that serves it on the proxy listener.
//!
//! ```text
//! client
//!   │
//!   ├─ 1. Correlate      X-Request-ID accepted or generated, server span opened (W3C
//!   │                    trace context continued), ID echoed on every response (errors
//!   │                    and refusals included), request counted in the metrics
//!   ├─ 2. RateLimit      identify the caller (401 if its credentials are bad), decide every
//!   │                    matching policy in one store round trip (429 / 503 with
//!   │                    RateLimit headers), add RateLimit headers to what passes
//!   ├─ 3. Forward        route → concurrency slot → instance → upstream (streaming)
//!   ▼
//! upstream
//! ```
//!
//! The correlation layer is outermost so that everything after it, refusals included, is
//! logged under the request's ID and answers with it. Rate limiting comes after the ID exists
//! (a 429 must carry it) and before any upstream resource (a concurrency slot, a connection)
//! is taken, so refused traffic costs the upstream nothing.
//!
//! # Why not an axum `Router`
//!
//! The proxy listener has one route (everything) and three layers. Built as an axum router
//! with `from_fn` middleware, the routing, the per-layer boxing and the handler adapters cost
//! about 9,000 instructions per request (callgrind, `loadtest/proxy.toml`), a sixth of the
//! gateway's whole work for a proxied request. Here each layer is a plain tower service whose
//! future is boxed once, and hyper serves the stack directly. The admin listener and the demo
//! services, whose routes are many and whose traffic is small, stay on axum.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceBuilder};

use crate::http::context::{RequestContext, peer_of};
use crate::http::correlation::{X_REQUEST_ID, correlate_gateway};
use crate::http::ratelimit::{RateLimiter, rate_limit};
use crate::running::InForce;

/// How long a client may take to send a request's head: a slow client holds a connection, not
/// the gateway.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers the layers add to a request before it goes upstream.
const FORWARD_HEADERS: usize = 4;

/// How long to back off after `accept` fails (out of file descriptors, mostly): retrying at
/// once would spin on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The future every layer returns.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// The proxy listener's service: the three layers above, outermost first.
pub type ProxyStack = Staged<Correlate, Staged<RateLimit, Forward>>;

/// Builds the stack for the gateway of `region`, on the configuration `running` holds and
/// the rules `limiter` holds. Each layer gets only what it uses. Requests must carry
/// [`ConnectInfo<SocketAddr>`] (as [`serve`] adds) so the client address is known.
pub fn proxy_stack(
    region: Arc<str>,
    running: Arc<InForce>,
    limiter: Arc<RateLimiter>,
) -> ProxyStack {
    ServiceBuilder::new()
        .layer(StageLayer(Correlate {
            region,
            running: running.clone(),
        }))
        .layer(StageLayer(RateLimit(limiter)))
        .service(Forward::new(running))
}

/// Serves `stack` on `listener` (HTTP/1.1) until `shutdown` resolves, then stops accepting and
/// waits for open connections to finish their in-flight request.
pub async fn serve(
    listener: TcpListener,
    stack: ProxyStack,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Responses are whole writes; Nagle would hold the next one for the client's ACK.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
        let stack = stack.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            // The layers add X-Request-ID and the three X-Forwarded-* headers: room for them
            // now is one resize of the header table instead of one per doubling.
            request.headers_mut().reserve(FORWARD_HEADERS);
            stack.serve(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The rest of the stack, as a layer sees it: served through a shared reference, so a layer
/// holds the rest of the stack without cloning it for every request.
pub trait Next: Send + Sync + 'static {
    fn serve(&self, request: Request) -> ResponseFuture;

    /// A copy for one proxy worker thread ([`crate::http::workers`]): the same configuration
    /// and limiter, but reference counts of its own. Every request clones and drops a layer's
    /// handle; shared by the workers, that count would be one cache line written by every
    /// core for every request.
    fn for_worker(&self) -> Self
    where
        Self: Sized;
}

/// One layer's work around the rest of the stack: the request goes in, `inner` is called (or
/// not: a refusal answers by itself), and what comes back may be changed on its way out.
pub trait Stage: Clone + Send + Sync + 'static {
    fn around<S: Next>(&self, request: Request, inner: &S)
    -> impl Future<Output = Response> + Send;
}

/// A [`Stage`] as a tower layer.
#[derive(Clone)]
pub struct StageLayer<St>(St);

impl<St: Clone, S> Layer<S> for StageLayer<St> {
    type Service = Staged<St, S>;

    fn layer(&self, inner: S) -> Staged<St, S> {
        Staged(Arc::new(Layered {
            stage: self.0.clone(),
            inner,
        }))
    }
}

/// A [`Stage`] in front of the rest of the stack. Cloning it is one reference count.
pub struct Staged<St, S>(Arc<Layered<St, S>>);

struct Layered<St, S> {
    stage: St,
    inner: S,
}

impl<St, S> Clone for Staged<St, S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<St: Stage, S: Next> Next for Staged<St, S> {
    fn serve(&self, request: Request) -> ResponseFuture {
        let layered = self.0.clone();
        Box::pin(async move { Ok(layered.stage.around(request, &layered.inner).await) })
    }

    fn for_worker(&self) -> Self {
        Self(Arc::new(Layered {
            stage: self.0.stage.clone(),
            inner: self.0.inner.for_worker(),
        }))
    }
}

impl<St: Stage, S: Next> Service<Request> for Staged<St, S> {
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every layer is always ready: backpressure is the concurrency limit in `Forward`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> ResponseFuture {
        self.serve(request)
    }
}

/// Layer 1: the request's correlation ID, server span and metrics, and its
/// [`RequestContext`] (the snapshot in force, the route, the client address).
#[derive(Clone)]
pub struct Correlate {
    region: Arc<str>,
    running: Arc<InForce>,
}

impl Stage for Correlate {
    async fn around<S: Next>(&self, request: Request, inner: &S) -> Response {
        correlate_gateway(&self.region, &self.running, request, |request| {
            call_inner(inner, request)
        })
        .await
    }
}

/// Layer 2: identity and rate limits.
#[derive(Clone)]
pub struct RateLimit(Arc<RateLimiter>);

impl Stage for RateLimit {
    async fn around<S: Next>(&self, request: Request, inner: &S) -> Response {
        rate_limit(&self.0, request, |request| call_inner(inner, request)).await
    }
}

/// Layer 3, the innermost service: forwards to the upstream the path routes to.
#[derive(Clone)]
pub struct Forward(Arc<ForwardTo>);

struct ForwardTo {
    in_force: Arc<InForce>,
}

impl Forward {
    fn new(in_force: Arc<InForce>) -> Self {
        Self(Arc::new(ForwardTo { in_force }))
    }
}

impl Next for Forward {
    fn serve(&self, request: Request) -> ResponseFuture {
        let to = self.0.clone();
        Box::pin(async move { Ok(forward(&to.in_force, request).await) })
    }

    fn for_worker(&self) -> Self {
        Self::new(self.0.in_force.clone())
    }
}

impl Service<Request> for Forward {
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> ResponseFuture {
        self.serve(request)
    }
}

async fn forward(in_force: &InForce, mut request: Request) -> Response {
    // The first layer overwrote the header with the settled ID (a reference count, kept for
    // the log line of a request that fails).
    let id = request.headers().get(&X_REQUEST_ID).cloned();
    // The context the first layer set (see `correlate_gateway`), taken rather than cloned:
    // nothing reads it after this layer, and a clone would write the snapshot's reference
    // count, one cache line every core's requests share. A stack built without that layer
    // routes here.
    let context = match request.extensions_mut().remove::<RequestContext>() {
        Some(context) => context,
        None => {
            let running = in_force.load();
            let upstream = running
                .proxy
                .route(request.uri().path())
                .map(|routed| routed.upstream);
            RequestContext {
                peer: peer_of(&request),
                running,
                upstream,
            }
        }
    };
    let RequestContext {
        running,
        peer,
        upstream,
    } = context;
    match running.proxy.forward(upstream, request, peer).await {
        Ok(response) => response,
        Err(error) => {
            let correlation_id = id.as_ref().and_then(|id| id.to_str().ok());
            tracing::info!(correlation_id, %error, "request not proxied");
            error.into_response()
        }
    }
}

/// Calls the next layer. The layers here never fail (errors are responses), so the
/// `Infallible` error cannot occur.
async fn call_inner<S: Next>(inner: &S, request: Request) -> Response {
    match inner.serve(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}
