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
use tollgate::http::stack::ProxyStack;

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
    Gateway::new(config).unwrap().proxy_stack()
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

/// A store that fails its first two calls, never answers its third, and admits from then on.
struct FailsThenHangs {
    calls: std::sync::atomic::AtomicUsize,
}

impl tollgate::store::BucketStore for FailsThenHangs {
    fn acquire(
        &self,
        requests: Vec<tollgate::store::BucketRequest>,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<Vec<tollgate::store::BucketOutcome>, tollgate::store::StoreError>,
    > {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            match call {
                0 | 1 => Err(tollgate::store::StoreError::Unavailable("down".into())),
                2 => std::future::pending().await,
                _ => Ok(requests
                    .iter()
                    .map(|_| tollgate::store::BucketOutcome {
                        admitted: true,
                        remaining: 1,
                        next_token_us: 0,
                        retry_after_us: 0,
                    })
                    .collect()),
            }
        })
    }

    fn kind(&self) -> &'static str {
        "test"
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_whose_client_goes_away_lets_the_next_request_probe_at_once() {
    use futures_util::FutureExt;
    use tollgate::http::ratelimit::{Decision, RateLimiter};

    let config = RegionConfig::parse(
        Path::new("stack.toml"),
        &CONFIG.replace("burst = 1", "burst = 1\non_store_error = \"closed\""),
        |_| None,
    )
    .unwrap();
    let store = Arc::new(FailsThenHangs {
        calls: Default::default(),
    });
    let probe_interval = std::time::Duration::from_secs(10);
    let limiter = RateLimiter::new(
        config.policies.clone(),
        config.identity.clone(),
        store.clone(),
        tollgate::limit::breaker::Breaker::new(2, probe_interval),
    );
    let peer = "10.0.0.1".parse().unwrap();
    let headers = http::HeaderMap::new();
    let check = || limiter.check(&http::Method::GET, "/api/v1/users", &headers, peer);
    for _ in 0..2 {
        assert_eq!(check().await.decision, Decision::Unavailable);
    }
    assert!(limiter.breaker_open());
    tokio::time::advance(probe_interval).await;
    // The probe's store call never answers; its client goes away (the future is dropped).
    assert!(check().now_or_never().is_none());
    let calls = || store.calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(calls(), 3);
    // Without the drop guard the breaker would wait for the lost probe for another 10 s,
    // refusing with 503 meanwhile.
    assert_eq!(check().await.decision, Decision::Admitted);
    assert_eq!(calls(), 4);
    assert!(!limiter.breaker_open());
}
