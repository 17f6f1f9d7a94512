//! Black-box tests of the gateway's proxy over real sockets on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use support::gateway::{TestGateway, service};
use support::{client, closed_addr, serve};

/// Generous bound for anything that should happen promptly; hitting it means a bug (e.g. a
/// body that was buffered instead of streamed), not a slow machine.
const DEADLINE: Duration = Duration::from_secs(10);

/// An upstream that answers 201 with a JSON description of the request it received.
async fn echo_upstream() -> SocketAddr {
    serve(Router::new().fallback(any(echo))).await
}

async fn echo(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.to_string())
            .or_default()
            .push(value.to_str().unwrap_or("<binary>").to_owned());
    }
    let description = json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    (
        StatusCode::CREATED,
        [
            ("x-upstream", "echo"),
            ("connection", "x-upstream-hop"),
            ("x-upstream-hop", "1"),
        ],
        axum::Json(description),
    )
        .into_response()
}

async fn counting_upstream(counter: Arc<AtomicUsize>) -> SocketAddr {
    serve(counting_router(counter)).await
}

fn counting_router(counter: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .fallback(any(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                "counted"
            }
        }))
}

async fn assert_problem(response: reqwest::Response, status: u16, slug: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "a gateway error must be problem+json"
    );
    assert!(
        response.headers().contains_key("x-request-id"),
        "errors carry the correlation ID too"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], format!("urn:tollgate:problem:{slug}"));
    assert_eq!(body["status"], status);
    body
}

/// [`support::eventually`] within this file's deadline.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    support::eventually(what, DEADLINE, check).await;
}

#[tokio::test]
async fn passes_method_path_query_headers_and_body_through() {
    let upstream = echo_upstream().await;
    let gateway = TestGateway::start("", &service("users", "/api/v1/users", &[upstream], "")).await;
    let response = client()
        .patch(gateway.url("/api/v1/users/ada?expand=bookings&x=%20y"))
        .header("x-custom", "kept")
        .header("authorization", "Bearer abc")
        .header("content-type", "text/plain")
        .body("hello upstream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "the upstream's status comes back");
    assert_eq!(response.headers()["x-upstream"], "echo");
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["method"], "PATCH");
    assert_eq!(seen["uri"], "/api/v1/users/ada?expand=bookings&x=%20y");
    assert_eq!(seen["body"], "hello upstream");
    assert_eq!(seen["headers"]["x-custom"][0], "kept");
    assert_eq!(seen["headers"]["authorization"][0], "Bearer abc");
    assert_eq!(seen["headers"]["content-type"][0], "text/plain");
    assert_eq!(seen["headers"]["host"][0], upstream.to_string());
    gateway.stop().await;
}

#[tokio::test]
async fn strips_hop_by_hop_headers_both_ways() {
    let upstream = echo_upstream().await;
    let gateway = TestGateway::start("", &service("users", "/", &[upstream], "")).await;
    let response = client()
        .get(gateway.url("/x"))
        .header("connection", "keep-alive, x-session-secret")
        .header("x-session-secret", "do not forward")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("proxy-connection", "keep-alive")
        .header("x-end-to-end", "forward me")
        .send()
        .await
        .unwrap();
    assert!(
        !response.headers().contains_key("x-upstream-hop"),
        "a header the upstream named in Connection must not reach the client"
    );
    let seen: Value = response.json().await.unwrap();
    let headers = seen["headers"].as_object().unwrap();
    for hop in [
        "x-session-secret",
        "keep-alive",
        "proxy-authorization",
        "te",
        "proxy-connection",
    ] {
        assert!(
            !headers.contains_key(hop),
            "{hop} was forwarded: {headers:?}"
        );
    }
    assert_eq!(seen["headers"]["x-end-to-end"][0], "forward me");
    gateway.stop().await;
}

#[tokio::test]
async fn appends_x_forwarded_for_and_sets_proto_and_host() {
    let upstream = echo_upstream().await;
    let gateway = TestGateway::start("", &service("users", "/", &[upstream], "")).await;
    let seen: Value = client()
        .get(gateway.url("/"))
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        seen["headers"]["x-forwarded-for"][0],
        "203.0.113.7, 127.0.0.1"
    );
    assert_eq!(seen["headers"]["x-forwarded-proto"][0], "http");
    assert_eq!(
        seen["headers"]["x-forwarded-host"][0],
        gateway.addr.to_string()
    );
    gateway.stop().await;
}

#[tokio::test]
async fn streams_the_response_in_lock_step() {
    // The upstream sends chunk 2 only after the client has received chunk 1: a gateway that
    // buffered the response would never deliver chunk 1 and the test would hit its deadline.
    let (received_tx, received_rx) = mpsc::channel::<()>(1);
    let received_rx = Arc::new(tokio::sync::Mutex::new(received_rx));
    let upstream = serve(Router::new().route(
        "/stream",
        get(move || {
            let received_rx = received_rx.clone();
            async move {
                let stream = async_stream_chunks(received_rx);
                Body::from_stream(stream)
            }
        }),
    ))
    .await;
    let gateway = TestGateway::start("", &service("s", "/", &[upstream], "")).await;
    let mut response = client().get(gateway.url("/stream")).send().await.unwrap();
    let first = tokio::time::timeout(DEADLINE, response.chunk())
        .await
        .expect("chunk 1 must arrive before the upstream finishes")
        .unwrap()
        .unwrap();
    assert_eq!(first, "chunk-1");
    received_tx.send(()).await.unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, response.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"chunk-2");
    gateway.stop().await;
}

fn async_stream_chunks(
    received: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(0, move |step| {
        let received = received.clone();
        async move {
            match step {
                0 => Some((Ok(Bytes::from_static(b"chunk-1")), 1)),
                1 => {
                    received.lock().await.recv().await?;
                    Some((Ok(Bytes::from_static(b"chunk-2")), 2))
                }
                _ => None,
            }
        }
    })
}

#[tokio::test]
async fn streams_the_request_in_lock_step() {
    // The client sends chunk 2 only after the upstream has received chunk 1.
    let (got_first_tx, mut got_first_rx) = mpsc::channel::<Bytes>(1);
    let upstream = serve(Router::new().route(
        "/upload",
        axum::routing::post(move |request: Request| {
            let got_first_tx = got_first_tx.clone();
            async move {
                let mut body = request.into_body();
                let mut total = Vec::new();
                let mut first = true;
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        if first {
                            got_first_tx.send(data.clone()).await.unwrap();
                            first = false;
                        }
                        total.extend_from_slice(&data);
                    }
                }
                String::from_utf8(total).unwrap()
            }
        }),
    ))
    .await;
    let gateway = TestGateway::start("", &service("s", "/", &[upstream], "")).await;
    let (chunk_tx, chunk_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(chunk_rx));
    let request = tokio::spawn(client().post(gateway.url("/upload")).body(body).send());
    chunk_tx
        .send(Ok(Bytes::from_static(b"part-1;")))
        .await
        .unwrap();
    let first = tokio::time::timeout(DEADLINE, got_first_rx.recv())
        .await
        .expect("the upstream must see chunk 1 before the client sends chunk 2")
        .unwrap();
    assert_eq!(first, "part-1;");
    chunk_tx
        .send(Ok(Bytes::from_static(b"part-2")))
        .await
        .unwrap();
    drop(chunk_tx);
    let response = request.await.unwrap().unwrap();
    assert_eq!(response.text().await.unwrap(), "part-1;part-2");
    gateway.stop().await;
}

#[tokio::test]
async fn correlation_id_is_kept_generated_echoed_and_forwarded() {
    let upstream = echo_upstream().await;
    let gateway = TestGateway::start("", &service("s", "/", &[upstream], "")).await;

    let response = client()
        .get(gateway.url("/"))
        .header("x-request-id", "trip-42.retry_1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trip-42.retry_1");
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["headers"]["x-request-id"], json!(["trip-42.retry_1"]));

    for invalid in [
        Some("has spaces and ; semicolons"),
        Some(&*"a".repeat(129)),
        None,
    ] {
        let mut request = client().get(gateway.url("/"));
        if let Some(id) = invalid {
            request = request.header("x-request-id", id);
        }
        let response = request.send().await.unwrap();
        let echoed = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            uuid::Uuid::parse_str(&echoed).is_ok(),
            "{echoed} is not a UUID"
        );
        assert_ne!(Some(echoed.as_str()), invalid);
        let seen: Value = response.json().await.unwrap();
        assert_eq!(
            seen["headers"]["x-request-id"],
            json!([echoed]),
            "upstream sees the same ID"
        );
    }
    gateway.stop().await;
}

#[tokio::test]
async fn unroutable_path_is_404_problem() {
    let upstream = echo_upstream().await;
    let gateway = TestGateway::start("", &service("s", "/api/v1/users", &[upstream], "")).await;
    let response = client()
        .get(gateway.url("/api/v1/usersettings"))
        .send()
        .await
        .unwrap();
    assert_problem(response, 404, "no-route").await;
    gateway.stop().await;
}

#[tokio::test]
async fn refused_connection_is_502_problem() {
    let gateway = TestGateway::start("", &service("s", "/", &[closed_addr()], "")).await;
    let response = client().get(gateway.url("/")).send().await.unwrap();
    let body = assert_problem(response, 502, "upstream-unreachable").await;
    assert_eq!(body["service"], "s");
    gateway.stop().await;
}

#[tokio::test]
async fn slow_upstream_is_504_problem() {
    let upstream = serve(Router::new().fallback(any(std::future::pending::<String>))).await;
    let gateway = TestGateway::start(
        "",
        &service("s", "/", &[upstream], "request_timeout = \"200ms\""),
    )
    .await;
    let response = client().get(gateway.url("/")).send().await.unwrap();
    assert_problem(response, 504, "upstream-timeout").await;
    gateway.stop().await;
}

#[tokio::test]
async fn no_healthy_instance_is_503_problem_with_retry_after() {
    let upstream = serve(
        Router::new()
            .route(
                "/health",
                get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
            )
            .fallback(any(|| async { "should not be reached" })),
    )
    .await;
    let checks = "health_check = { path = \"/health\", interval = \"50ms\", timeout = \"50ms\", unhealthy_threshold = 1 }";
    let gateway = TestGateway::start("", &service("s", "/", &[upstream], checks)).await;
    eventually("the failing instance is taken out", || async {
        gateway.ready().await["dependencies"]["services"][0]["healthyInstances"] == 0
    })
    .await;
    let response = client().get(gateway.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert_problem(response, 503, "no-healthy-instance").await;
    let ready = client()
        .get(gateway.admin_url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        503,
        "not ready while a service has no instance"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413_problem() {
    let upstream = echo_upstream().await;
    let gateway = TestGateway::start(
        "max_request_body = 1024",
        &service("s", "/", &[upstream], ""),
    )
    .await;

    // Announced by Content-Length: refused before anything is forwarded.
    let response = client()
        .post(gateway.url("/"))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    let body = assert_problem(response, 413, "body-too-large").await;
    assert_eq!(body["maxBytes"], 1024);

    // Chunked, no length announced: cut off while streaming.
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        (0..4).map(|_| Ok(Bytes::from(vec![b'y'; 512]))).collect();
    let response = client()
        .post(gateway.url("/"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_problem(response, 413, "body-too-large").await;

    // At the limit is fine.
    let response = client()
        .post(gateway.url("/"))
        .body(vec![b'z'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    gateway.stop().await;
}

#[tokio::test]
async fn load_is_spread_over_two_instances() {
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let a = counting_upstream(counts[0].clone()).await;
    let b = counting_upstream(counts[1].clone()).await;
    let gateway = TestGateway::start("", &service("s", "/", &[a, b], "")).await;
    let http = client();
    for _ in 0..200 {
        let response = http.get(gateway.url("/work")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let (a, b) = (
        counts[0].load(Ordering::SeqCst),
        counts[1].load(Ordering::SeqCst),
    );
    assert_eq!(a + b, 200);
    assert!(a >= 50 && b >= 50, "uneven spread: {a} / {b}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_instance_is_ejected_and_comes_back_when_healthy() {
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let down = closed_addr();
    let up = counting_upstream(counts[1].clone()).await;
    // A refused connection fails a check at once; the timeout and a second failure in a row
    // keep a stalled CI machine from failing the live instance's checks too.
    let checks = "ejection_time = \"1h\"\nhealth_check = { path = \"/health\", interval = \"250ms\", timeout = \"250ms\", healthy_threshold = 1, unhealthy_threshold = 2 }";
    let gateway = TestGateway::start("", &service("s", "/", &[down, up], checks)).await;
    let http = client();

    // Bodyless requests are retried on the other instance: no client sees the dead one.
    for _ in 0..20 {
        assert_eq!(
            http.get(gateway.url("/")).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(counts[1].load(Ordering::SeqCst), 20);
    eventually("the dead instance is reported unhealthy", || async {
        gateway.ready().await["dependencies"]["services"][0]["healthyInstances"] == 1
    })
    .await;

    // The instance comes back on the same port; health checks return it to rotation even
    // though its passive ejection (1h) has not expired.
    let listener = tokio::net::TcpListener::bind(down).await.unwrap();
    let recovered = counting_router(counts[0].clone());
    tokio::spawn(async move {
        axum::serve(listener, recovered).await.unwrap();
    });
    eventually("the recovered instance is healthy", || async {
        gateway.ready().await["dependencies"]["services"][0]["healthyInstances"] == 2
    })
    .await;
    let before = counts[1].load(Ordering::SeqCst);
    for _ in 0..100 {
        assert_eq!(
            http.get(gateway.url("/")).send().await.unwrap().status(),
            200
        );
    }
    let recovered_share = 100 - (counts[1].load(Ordering::SeqCst) - before);
    assert!(
        recovered_share >= 20,
        "recovered instance got {recovered_share}/100"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_request_with_a_body_is_retried_when_an_instance_refuses_the_connection() {
    // Nothing was sent on a connection that never opened, so the body is still whole and
    // goes to the other instance.
    let down = closed_addr();
    let up = echo_upstream().await;
    let gateway = TestGateway::start("", &service("s", "/", &[down, up], "")).await;
    let http = client();
    for i in 0..10 {
        let response = http
            .post(gateway.url("/orders"))
            .body(format!("order {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "the echo upstream answers 201");
        let seen: Value = response.json().await.unwrap();
        assert_eq!(seen["body"], format!("order {i}"));
    }
    gateway.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_reused_across_requests() {
    let accepted = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("pong")))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    let gateway = TestGateway::start("", &service("s", "/", &[addr], "")).await;
    let http = client();
    for _ in 0..50 {
        let response = http.get(gateway.url("/ping")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "pong");
    }
    // One after the other, every request finds the previous one's connection idle.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn concurrency_limit_refuses_excess_with_503_and_retry_after() {
    let (entered_tx, mut entered_rx) = mpsc::channel::<()>(4);
    let release = Arc::new(tokio::sync::Notify::new());
    let upstream = serve(Router::new().fallback(any({
        let release = release.clone();
        move || {
            let entered_tx = entered_tx.clone();
            let release = release.clone();
            async move {
                entered_tx.send(()).await.unwrap();
                release.notified().await;
                "done"
            }
        }
    })))
    .await;
    let gateway = TestGateway::start(
        "",
        &service(
            "s",
            "/",
            &[upstream],
            "concurrency_limit = 1\nqueue_size = 0",
        ),
    )
    .await;
    let first = tokio::spawn(client().get(gateway.url("/slow")).send());
    tokio::time::timeout(DEADLINE, entered_rx.recv())
        .await
        .unwrap();

    let refused = client().get(gateway.url("/slow")).send().await.unwrap();
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_problem(refused, 503, "overloaded").await;

    release.notify_one();
    assert_eq!(first.await.unwrap().unwrap().text().await.unwrap(), "done");
    gateway.stop().await;
}

#[tokio::test]
async fn admin_endpoints_are_never_shadowed_by_routes() {
    let upstream = serve(Router::new().fallback(any(|| async { "upstream" }))).await;
    let gateway = TestGateway::start("", &service("catch-all", "/", &[upstream], "")).await;
    let http = client();
    // On the proxy port, /health belongs to the upstream...
    let proxied = http.get(gateway.url("/health")).send().await.unwrap();
    assert_eq!(proxied.text().await.unwrap(), "upstream");
    // ...and on the admin port, to the gateway.
    let health: Value = http
        .get(gateway.admin_url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let ready = gateway.ready().await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["region"], "test");
    assert_eq!(ready["dependencies"]["redis"]["status"], "not-configured");
    assert_eq!(ready["dependencies"]["services"][0]["name"], "catch-all");
    gateway.stop().await;
}

#[tokio::test]
async fn readiness_reports_redis_down() {
    let upstream = echo_upstream().await;
    let extra = format!("redis_url = \"redis://{}\"", closed_addr());
    let gateway = TestGateway::start(&extra, &service("s", "/", &[upstream], "")).await;
    let response = client()
        .get(gateway.admin_url("/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["dependencies"]["redis"]["status"], "down");
    gateway.stop().await;
}

#[tokio::test]
async fn readiness_reports_redis_up() {
    let redis = support::RedisServer::start();
    let upstream = echo_upstream().await;
    let extra = format!("redis_url = \"{}\"", redis.url());
    let gateway = TestGateway::start(&extra, &service("s", "/", &[upstream], "")).await;
    // The first probe also connects, within the probe's 250 ms: polled, not read once.
    eventually("/ready to report Redis up", || async {
        let ready = gateway.ready().await;
        ready["dependencies"]["redis"]["status"] == "up" && ready["status"] == "ready"
    })
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let (entered_tx, mut entered_rx) = mpsc::channel::<()>(1);
    let release = Arc::new(tokio::sync::Notify::new());
    let upstream = serve(Router::new().fallback(any({
        let release = release.clone();
        move || {
            let entered_tx = entered_tx.clone();
            let release = release.clone();
            async move {
                entered_tx.send(()).await.unwrap();
                release.notified().await;
                "finished"
            }
        }
    })))
    .await;
    let gateway = TestGateway::start("", &service("s", "/", &[upstream], "")).await;
    let addr = gateway.addr;
    let in_flight = tokio::spawn(client().get(gateway.url("/")).send());
    tokio::time::timeout(DEADLINE, entered_rx.recv())
        .await
        .unwrap();
    let stopping = tokio::spawn(gateway.stop());
    // New connections are refused once the gateway stops accepting...
    eventually("the listener closes", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // ...while the request already in flight completes.
    release.notify_one();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.text().await.unwrap(), "finished");
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .unwrap()
        .unwrap();
}
