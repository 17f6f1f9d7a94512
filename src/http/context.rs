//! What the first layer learns about a request, once, for the layers after it: the
//! configuration snapshot in force, the client's TCP address and the service the path routes
//! to. Carried in the request's extensions, so a reload between layers cannot forward a
//! request to another service than the one it was counted and traced under, and no layer
//! repeats the route lookup or the address extraction. (The limiter's policies are swapped
//! by a reload on their own; a request decided during one meets the old or the new rules.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};

use crate::proxy::UpstreamIdx;
use crate::running::Running;

/// A request's facts as the first layer found them.
#[derive(Clone)]
pub struct RequestContext {
    /// The configuration snapshot the request is decided and routed on.
    pub running: Arc<Running>,
    /// The TCP peer (the client, or the proxy in front of it: identity decides which).
    pub peer: IpAddr,
    /// The service the path routes to in `running` (`None`: no route).
    pub upstream: Option<UpstreamIdx>,
}

impl RequestContext {
    /// The context of `request`, if the first layer set one.
    pub fn of(request: &Request) -> Option<&RequestContext> {
        request.extensions().get::<RequestContext>()
    }
}

/// The TCP peer of `request`: from its context, else from the connection info the listener
/// adds, else unspecified (a request built in a test, with neither).
pub fn peer_of(request: &Request) -> IpAddr {
    if let Some(context) = RequestContext::of(request) {
        return context.peer;
    }
    connection_peer(request).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// The address the listener recorded for `request`'s connection.
pub fn connection_peer(request: &Request) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}
