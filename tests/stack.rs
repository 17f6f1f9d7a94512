//! The proxy listener's layer stack in process, with `oneshot`: no listener, requests built
//! in the test with the connection info the listener would add. The upstream's instance is a
//! port nothing listens on, so a request that gets past the limiter answers 502 at once (503
//! once the failed instance is ejected).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{Request, StatusCode};
use tower::ServiceExt;

use tollgate::config::RegionConfig;
use tollgate::gateway::Gateway;
use tollgate::http::stack::{ProxyStack, proxy_stack};

const CONFIG: &str = r#"
region = "test"
listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"

[services.users]
routes = ["/api/v1/users"]
instances = ["http://127.0.0.1:9"]

[policies.one-a-day]
key = ["ip"]
rate = "1/24h"
burst = 1
"#;

fn stack() -> ProxyStack {
    let config = RegionConfig::parse(Path::new("stack.toml"), CONFIG, |_| None).unwrap();
    proxy_stack(Arc::new(Gateway::new(config).unwrap()))
}

fn from(peer: &str, path: &str) -> Request<Body> {
    let peer: SocketAddr = peer.parse().unwrap();
    let mut request = Request::get(path).body(Body::empty()).unwrap();
    request.extensions_mut().insert(ConnectInfo(peer));
    request
}

#[tokio::test]
async fn an_unrouted_path_is_a_404_problem_with_its_request_id() {
    let response = stack()
        .oneshot(from("10.0.0.1:1000", "/nowhere"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.headers().contains_key("x-request-id"));
    assert!(response.headers().contains_key("ratelimit-policy"));
}

#[tokio::test]
async fn the_limiter_keys_on_the_connection_peer_the_first_layer_recorded() {
    let stack = stack();
    let status = |peer: &'static str| {
        let stack = stack.clone();
        async move {
            let response = stack.oneshot(from(peer, "/api/v1/users")).await.unwrap();
            response.status()
        }
    };
    // Past the limiter, to an instance that is down.
    assert_eq!(status("10.0.0.1:1000").await, StatusCode::BAD_GATEWAY);
    // Another connection of the same client: its one request a day is spent.
    assert_eq!(status("10.0.0.1:2000").await, StatusCode::TOO_MANY_REQUESTS);
    // Another client passes the limiter (the failed instance is now ejected: 503).
    let other = status("10.0.0.2:1000").await;
    assert!(
        other == StatusCode::BAD_GATEWAY || other == StatusCode::SERVICE_UNAVAILABLE,
        "{other}"
    );
}
