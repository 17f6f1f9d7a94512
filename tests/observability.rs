//! Observability end to end: the real binary's gateway, bookings and users as child processes
//! exporting over OTLP to a receiver inside this test, and the gateway's `/metrics`.
//!
//! The receiver speaks both OTLP transports: `http/protobuf` (`POST /v1/traces`) and gRPC
//! (the `TraceService/Export` method over HTTP/2 without TLS). The gateway exports over gRPC
//! and the services over http/protobuf, so every test exercises both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::Frame;
use http_body_util::StreamBody;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::{Value, json};
use support::{client, free_port, parse_prometheus, prom_value};
use tokio::time::Instant;

/// How long anything (startup, an export, a shutdown) may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
const REGION: &str = "obs-test";

// ---------------------------------------------------------------- OTLP receiver

/// One exported span, flattened with its resource.
#[derive(Debug, Clone)]
struct SeenSpan {
    resource: HashMap<String, String>,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_id: String,
    name: String,
    kind: SpanKind,
    attributes: HashMap<String, String>,
}

impl SeenSpan {
    fn service(&self) -> &str {
        self.resource.get("service.name").map_or("", String::as_str)
    }

    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// Every span the receiver was sent, over either transport.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<SeenSpan>>>);

impl Received {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.resource_spans {
            let resource = attributes(
                resource_spans
                    .resource
                    .map(|r| r.attributes)
                    .unwrap_or_default(),
            );
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(SeenSpan {
                        resource: resource.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_id: hex(&span.parent_span_id),
                        name: span.name,
                        kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                        attributes: attributes(span.attributes),
                    });
                }
            }
        }
    }

    fn spans(&self) -> Vec<SeenSpan> {
        self.0.lock().unwrap().clone()
    }

    /// Polls until `check` finds what it wants in the spans so far, or fails at the deadline
    /// showing what did arrive.
    async fn wait_for<T>(&self, what: &str, check: impl Fn(&[SeenSpan]) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let spans = self.spans();
            if let Some(found) = check(&spans) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {DEADLINE:?}; received: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn attributes(pairs: Vec<KeyValue>) -> HashMap<String, String> {
    pairs
        .into_iter()
        .map(|pair| (pair.key, pair.value.map(any_to_string).unwrap_or_default()))
        .collect()
}

fn any_to_string(value: AnyValue) -> String {
    match value.value {
        Some(any_value::Value::StringValue(s)) => s,
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `http/protobuf`: the body is one `ExportTraceServiceRequest`.
async fn http_export(State(received): State<Received>, body: Bytes) -> Response {
    received.add(ExportTraceServiceRequest::decode(body).expect("OTLP/HTTP body decodes"));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .body(Body::from(
            ExportTraceServiceResponse::default().encode_to_vec(),
        ))
        .unwrap()
}

/// gRPC: length-prefixed messages (1 byte "compressed" flag, 4 bytes big-endian length), and
/// an answer whose status travels in the trailers.
async fn grpc_export(State(received): State<Received>, body: Bytes) -> Response {
    let mut rest = &body[..];
    while rest.len() >= 5 {
        assert_eq!(rest[0], 0, "compressed gRPC messages were not asked for");
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        received.add(
            ExportTraceServiceRequest::decode(&rest[5..5 + len]).expect("gRPC message decodes"),
        );
        rest = &rest[5 + len..];
    }
    let reply = ExportTraceServiceResponse::default().encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(reply.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&reply);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = futures_util::stream::iter([
        Ok::<_, Infallible>(Frame::data(Bytes::from(framed))),
        Ok(Frame::trailers(trailers)),
    ]);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/grpc")
        .body(Body::new(StreamBody::new(frames)))
        .unwrap()
}

/// Starts the receiver on a free port; returns its spans and its base URL.
async fn start_receiver() -> (Received, String) {
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(http_export))
        .route(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            post(grpc_export),
        )
        .with_state(received.clone());
    let addr = support::serve(app).await;
    (received, format!("http://{addr}"))
}

// ---------------------------------------------------------------- child processes

/// A role of the real binary, killed on drop. Its output goes to a file so that a failing
/// test can show it and a test can read its log lines.
struct Role {
    name: &'static str,
    child: std::process::Child,
    log: PathBuf,
}

impl Role {
    fn spawn(
        name: &'static str,
        dir: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        // Nothing inherited: no OTEL_* or TOLLGATE_* of the developer's shell may change
        // what is tested.
        command
            .env_clear()
            .env("RUST_LOG", "info")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = command.spawn().unwrap();
        Self { name, child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }

    /// SIGTERM, then waits (with the deadline) for a graceful exit.
    async fn terminate(&mut self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{} exited with {status}:\n{}",
                    self.name,
                    self.log()
                );
                return;
            }
            assert!(Instant::now() < deadline, "{} ignored SIGTERM", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory for logs and configs, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tollgate-obs-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The OTLP variables of a role exporting to `receiver` over `protocol`, quickly.
fn otel_env<'a>(receiver: &'a str, protocol: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ]
}

/// Polls `url` until it answers 2xx, the role exits, or the deadline.
/// The first JSON log line of `role` whose message is `message`, waiting for it (deadline).
async fn log_line(role: &Role, message: &str) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = role.log();
        if let Some(line) = log
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["message"] == message)
        {
            return line;
        }
        assert!(Instant::now() < deadline, "no log line {message:?}:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_ready(role: &mut Role, url: &str) {
    let http = client();
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
        {
            return;
        }
        role.assert_running();
        assert!(
            Instant::now() < deadline,
            "{} never answered {url}",
            role.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A gateway process of region [`REGION`] on the given ports, with `services` (and any other
/// config) appended to its `gateway.toml` in `dir`.
fn spawn_gateway(
    dir: &TempDir,
    proxy_port: u16,
    admin_port: u16,
    services: &str,
    env: &[(&str, &str)],
) -> Role {
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "region = \"{REGION}\"\nlisten = \"{}\"\nadmin_listen = \"{}\"\n{services}",
            addr(proxy_port),
            addr(admin_port),
        ),
    )
    .unwrap();
    Role::spawn(
        "gateway",
        &dir.0,
        &["gateway", "--config", config.to_str().unwrap()],
        env,
    )
}

/// users, bookings and a gateway in front of both, all exporting to the receiver.
struct Stack {
    gateway: String,
    admin: String,
    gateway_role: Role,
    _bookings: Role,
    _users: Role,
    _dir: TempDir,
}

impl Stack {
    async fn start(test: &str, receiver: &str) -> Self {
        Self::start_with(test, receiver, "").await
    }

    /// Like [`start`](Self::start), with `extra` appended to the gateway's config.
    async fn start_with(test: &str, receiver: &str, extra: &str) -> Self {
        let dir = TempDir::new(test);
        let (users_port, bookings_port) = (free_port(), free_port());
        let (proxy_port, admin_port) = (free_port(), free_port());

        let users_listen = addr(users_port).to_string();
        let mut users = Role::spawn(
            "users",
            &dir.0,
            &["users", "--listen", &users_listen],
            &otel_env(receiver, "http/protobuf"),
        );
        let users_url = format!("http://{users_listen}");
        let bookings_listen = addr(bookings_port).to_string();
        let mut bookings = Role::spawn(
            "bookings",
            &dir.0,
            &[
                "bookings",
                "--listen",
                &bookings_listen,
                "--users-url",
                &users_url,
            ],
            &otel_env(receiver, "http/protobuf"),
        );
        let mut gateway_env = otel_env(receiver, "grpc");
        gateway_env.push(("TOLLGATE_LOG_FORMAT", "json"));
        let mut gateway = spawn_gateway(
            &dir,
            proxy_port,
            admin_port,
            &format!(
                r#"
[services.users]
routes = ["/api/v1/users"]
instances = ["{users_url}"]

[services.bookings]
routes = ["/api/v1/bookings"]
instances = ["http://{bookings_listen}"]

{extra}
"#
            ),
            &gateway_env,
        );

        wait_ready(&mut users, &format!("{users_url}/health")).await;
        wait_ready(&mut bookings, &format!("http://{bookings_listen}/health")).await;
        let admin = format!("http://{}", addr(admin_port));
        wait_ready(&mut gateway, &format!("{admin}/ready")).await;
        Self {
            gateway: format!("http://{}", addr(proxy_port)),
            admin,
            gateway_role: gateway,
            _bookings: bookings,
            _users: users,
            _dir: dir,
        }
    }

    async fn create_user(&self, username: &str, request_id: &str) -> reqwest::Response {
        client()
            .post(format!("{}/api/v1/users", self.gateway))
            .header("x-request-id", request_id)
            .json(&json!({
                "username": username,
                "password": "correct-horse",
                "name": "Ada",
                "lastName": "Lovelace",
            }))
            .send()
            .await
            .unwrap()
    }

    async fn book(&self, username: &str, request_id: &str) -> reqwest::Response {
        client()
            .post(format!("{}/api/v1/bookings", self.gateway))
            .header("x-request-id", request_id)
            .json(&json!({
                "user": username,
                "flightNumber": "AR1132",
                "origin": "EZE",
                "destination": "MAD",
                "departureTime": "2031-05-01T10:00:00Z",
                "passengers": [{
                    "fullName": "Ada Lovelace",
                    "birthDate": "1815-12-10",
                    "passportNumber": "X1234567",
                }],
            }))
            .send()
            .await
            .unwrap()
    }
}

/// The server span of `service` whose correlation_id is `id`.
fn server_span<'a>(spans: &'a [SeenSpan], service: &str, id: &str) -> Option<&'a SeenSpan> {
    spans.iter().find(|span| {
        span.service() == service
            && span.kind == SpanKind::Server
            && span.attr("correlation_id") == Some(id)
    })
}

/// The spans of `trace_id` once they form one complete tree: every parent present but the
/// root's, and spans from gateway, bookings and users.
fn complete_trace(spans: &[SeenSpan], trace_id: &str) -> Option<Vec<SeenSpan>> {
    let trace: Vec<SeenSpan> = spans
        .iter()
        .filter(|span| span.trace_id == trace_id)
        .cloned()
        .collect();
    let ids: BTreeSet<&str> = trace.iter().map(|span| span.span_id.as_str()).collect();
    let orphans = trace
        .iter()
        .filter(|span| !ids.contains(span.parent_id.as_str()))
        .count();
    let services: BTreeSet<&str> = trace.iter().map(SeenSpan::service).collect();
    // gateway server + client, bookings server + client, users server.
    (orphans == 1 && services.len() == 3 && trace.len() >= 5).then_some(trace)
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_through_the_gateway_is_one_trace_across_three_processes() {
    let (received, receiver) = start_receiver().await;
    let stack = Stack::start("booking-trace", &receiver).await;
    assert_eq!(
        stack.create_user("ada", "obs-user-1").await.status(),
        StatusCode::CREATED
    );
    let response = stack.book("ada", "obs-booking-1").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-request-id"], "obs-booking-1");

    let trace_id = received
        .wait_for("gateway server span of the booking", |spans| {
            server_span(spans, "gateway", "obs-booking-1").map(|span| span.trace_id.clone())
        })
        .await;
    let trace = received
        .wait_for("complete booking trace", |spans| {
            complete_trace(spans, &trace_id)
        })
        .await;

    // One trace for the booking: every span that names its correlation ID is in it.
    let spans = received.spans();
    let traces: BTreeSet<&str> = spans
        .iter()
        .filter(|span| span.attr("correlation_id") == Some("obs-booking-1"))
        .map(|span| span.trace_id.as_str())
        .collect();
    assert_eq!(traces, BTreeSet::from([trace_id.as_str()]));

    let services: BTreeSet<&str> = trace.iter().map(SeenSpan::service).collect();
    assert_eq!(services, BTreeSet::from(["bookings", "gateway", "users"]));
    let by_id: HashMap<&str, &SeenSpan> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_of = |span: &SeenSpan| by_id.get(span.parent_id.as_str()).copied();

    // The root is the gateway's server span; the booking's path crosses each process
    // boundary from a client span to the next process's server span.
    let gateway = server_span(&trace, "gateway", "obs-booking-1").unwrap();
    assert!(gateway.parent_id.is_empty(), "no traceparent was sent");
    assert_eq!(gateway.name, "POST /api/v1/bookings");
    assert_eq!(gateway.attr("http.request.method"), Some("POST"));
    assert_eq!(gateway.attr("http.route"), Some("/api/v1/bookings"));
    assert_eq!(gateway.attr("http.response.status_code"), Some("201"));
    assert_eq!(gateway.attr("client.address"), Some("127.0.0.1"));
    assert_eq!(gateway.attr("cloud.region"), Some(REGION));
    assert_eq!(
        gateway.resource.get("cloud.region").map(String::as_str),
        Some(REGION)
    );

    let bookings = server_span(&trace, "bookings", "obs-booking-1").unwrap();
    let upstream = parent_of(bookings).expect("bookings' parent is in the trace");
    assert_eq!(upstream.service(), "gateway");
    assert_eq!(upstream.kind, SpanKind::Client);
    assert_eq!(upstream.attr("http.request.method"), Some("POST"));
    assert_eq!(upstream.attr("server.address"), Some("127.0.0.1"));
    assert!(upstream.attr("server.port").is_some());
    assert_eq!(upstream.attr("http.response.status_code"), Some("201"));
    assert_eq!(
        parent_of(upstream).map(|s| s.span_id.as_str()),
        Some(gateway.span_id.as_str())
    );
    assert_eq!(bookings.attr("http.route"), Some("/api/v1/bookings"));
    assert!(!bookings.resource.contains_key("cloud.region"));

    let users = server_span(&trace, "users", "obs-booking-1").unwrap();
    assert_eq!(users.name, "GET /api/v1/users/{username}");
    let lookup = parent_of(users).expect("users' parent is in the trace");
    assert_eq!(lookup.service(), "bookings");
    assert_eq!(lookup.kind, SpanKind::Client);
    assert_eq!(lookup.attr("http.response.status_code"), Some("200"));
    assert_eq!(
        parent_of(lookup).map(|s| s.span_id.as_str()),
        Some(bookings.span_id.as_str())
    );

    // Every server span in the trace carries the ID the client sent.
    for span in trace.iter().filter(|span| span.kind == SpanKind::Server) {
        assert_eq!(
            span.attr("correlation_id"),
            Some("obs-booking-1"),
            "{span:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_checked_at_the_edge_and_kept_to_the_last_hop() {
    let (received, receiver) = start_receiver().await;
    let stack = Stack::start("request-ids", &receiver).await;
    assert_eq!(
        stack.create_user("grace", "setup-1").await.status(),
        StatusCode::CREATED
    );

    // A valid ID reaches the users service behind bookings unchanged.
    let response = stack.book("grace", "edge.kept_ID-1").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-request-id"], "edge.kept_ID-1");
    received
        .wait_for("users span of the kept ID", |spans| {
            server_span(spans, "users", "edge.kept_ID-1").cloned()
        })
        .await;

    // An invalid one is replaced at the gateway, and the replacement is what every hop sees.
    let response = stack.book("grace", "not valid; id").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let replaced = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(replaced, "not valid; id");
    assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "{replaced}");
    for service in ["gateway", "bookings", "users"] {
        received
            .wait_for(&format!("{service} span of the replaced ID"), |spans| {
                server_span(spans, service, &replaced).cloned()
            })
            .await;
    }
    assert!(
        received
            .spans()
            .iter()
            .all(|span| span.attr("correlation_id") != Some("not valid; id"))
    );

    // The ID is on the gateway's log lines too (JSON logs: in the request span's fields).
    let no_route = client()
        .get(format!("{}/nowhere", stack.gateway))
        .header("x-request-id", "log-line-1")
        .send()
        .await
        .unwrap();
    assert_eq!(no_route.status(), StatusCode::NOT_FOUND);
    let line = log_line(&stack.gateway_role, "request not proxied").await;
    assert_eq!(line["span"]["correlation_id"], "log-line-1", "{line}");
    assert_eq!(line["correlation_id"], "log-line-1", "{line}");
}

/// Without trace export the request span is only log context and is not made at `info`; the
/// line about a request not proxied still names the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_a_request_log_line_still_names_its_correlation_id() {
    let dir = TempDir::new("log-without-export");
    let (proxy_port, admin_port) = (free_port(), free_port());
    let mut gateway = spawn_gateway(
        &dir,
        proxy_port,
        admin_port,
        r#"
[services.users]
routes = ["/api/v1/users"]
instances = ["http://127.0.0.1:1"]
"#,
        &[("TOLLGATE_LOG_FORMAT", "json")],
    );
    wait_ready(&mut gateway, &format!("http://{}/ready", addr(admin_port))).await;
    let no_route = client()
        .get(format!("http://{}/nowhere", addr(proxy_port)))
        .header("x-request-id", "quiet-line-1")
        .send()
        .await
        .unwrap();
    assert_eq!(no_route.status(), StatusCode::NOT_FOUND);
    let line = log_line(&gateway, "request not proxied").await;
    assert_eq!(line["correlation_id"], "quiet-line-1", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_context_is_continued_and_a_malformed_one_ignored() {
    let (received, receiver) = start_receiver().await;
    let stack = Stack::start("traceparent", &receiver).await;
    let http = client();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let response = http
        .get(format!("{}/api/v1/users/nobody", stack.gateway))
        .header("x-request-id", "continued-1")
        .header("traceparent", format!("00-{trace_id}-{parent_id}-01"))
        .header("tracestate", "vendor=abc")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let (gateway, users) = received
        .wait_for("both spans of the continued trace", |spans| {
            Some((
                server_span(spans, "gateway", "continued-1")?.clone(),
                server_span(spans, "users", "continued-1")?.clone(),
            ))
        })
        .await;
    assert_eq!(gateway.trace_id, trace_id);
    assert_eq!(gateway.parent_id, parent_id);
    assert_eq!(users.trace_id, trace_id);
    assert_ne!(
        users.parent_id, parent_id,
        "the gateway's client span is in between"
    );

    for malformed in [
        "garbage",
        "00-0000-zz-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    ] {
        let id = format!("malformed-{}", malformed.len());
        let response = http
            .get(format!("{}/api/v1/users/nobody", stack.gateway))
            .header("x-request-id", &id)
            .header("traceparent", malformed)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{malformed}");
        let (gateway, users) = received
            .wait_for("spans of a request with a malformed traceparent", |spans| {
                Some((
                    server_span(spans, "gateway", &id)?.clone(),
                    server_span(spans, "users", &id)?.clone(),
                ))
            })
            .await;
        assert!(
            gateway.parent_id.is_empty(),
            "a new trace starts: {gateway:#?}"
        );
        assert_eq!(users.trace_id, gateway.trace_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_service_status_and_decision() {
    let (_received, receiver) = start_receiver().await;
    let stack = Stack::start("metrics", &receiver).await;
    let http = client();
    let scrape = || async {
        let response = http
            .get(format!("{}/metrics", stack.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        parse_prometheus(&response.text().await.unwrap())
    };
    let requests = |samples: &[support::PromSample], service: &str, status: &str| {
        prom_value(
            samples,
            "tollgate_requests_total",
            &[
                ("service", service),
                ("status", status),
                ("decision", "none"),
            ],
        )
    };

    let before = scrape().await;
    for _ in 0..3 {
        let response = http
            .get(format!("{}/api/v1/users/nobody", stack.gateway))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    assert_eq!(
        stack.create_user("metric.user", "m-1").await.status(),
        StatusCode::CREATED
    );
    let unrouted = http
        .get(format!("{}/elsewhere", stack.gateway))
        .send()
        .await
        .unwrap();
    assert_eq!(unrouted.status(), StatusCode::NOT_FOUND);
    let after = scrape().await;

    assert_eq!(
        requests(&after, "users", "404") - requests(&before, "users", "404"),
        3.0
    );
    assert_eq!(
        requests(&after, "users", "201") - requests(&before, "users", "201"),
        1.0
    );
    assert_eq!(
        requests(&after, "unrouted", "404") - requests(&before, "unrouted", "404"),
        1.0
    );
    let durations = |samples: &[support::PromSample]| {
        prom_value(
            samples,
            "tollgate_request_duration_seconds_count",
            &[("service", "users")],
        )
    };
    assert_eq!(durations(&after) - durations(&before), 4.0);
    assert!(
        after
            .iter()
            .any(|s| s.name == "tollgate_request_duration_seconds_bucket"
                && s.labels.get("le").map(String::as_str) == Some("+Inf")),
        "the duration is a real histogram"
    );
    assert_eq!(
        prom_value(
            &after,
            "tollgate_upstream_healthy_instances",
            &[("service", "users")]
        ),
        1.0
    );
    assert_eq!(
        prom_value(
            &after,
            "tollgate_upstream_in_flight",
            &[("service", "bookings")]
        ),
        0.0
    );
    assert!(
        after.iter().all(|s| s.name.starts_with("tollgate_")),
        "only tollgate_* metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_spans_still_waiting_for_their_batch() {
    let (received, receiver) = start_receiver().await;
    let dir = TempDir::new("flush");
    let mut roles = Vec::new();
    for (protocol, name) in [("grpc", "users-grpc"), ("http/protobuf", "users-http")] {
        let listen = addr(free_port()).to_string();
        let mut env = otel_env(&receiver, protocol);
        // A batch would wait ten minutes: only the shutdown flush can deliver it in time.
        env.retain(|(key, _)| *key != "OTEL_BSP_SCHEDULE_DELAY");
        env.push(("OTEL_BSP_SCHEDULE_DELAY", "600000"));
        env.push(("OTEL_SERVICE_NAME", name));
        let mut role = Role::spawn(name, &dir.0, &["users", "--listen", &listen], &env);
        let base = format!("http://{listen}");
        wait_ready(&mut role, &format!("{base}/health")).await;
        let response = client()
            .get(format!("{base}/api/v1/users/nobody"))
            .header("x-request-id", format!("flush-{name}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        roles.push((role, name));
    }
    assert!(
        received.spans().is_empty(),
        "nothing is exported before the batch is due"
    );
    for (role, _) in &mut roles {
        role.terminate().await;
    }
    for (_, name) in &roles {
        let span = received
            .wait_for("flushed span", |spans| {
                server_span(spans, name, &format!("flush-{name}")).cloned()
            })
            .await;
        assert_eq!(span.attr("http.response.status_code"), Some("404"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_otel_variables_nothing_is_exported_and_nothing_complains() {
    let dir = TempDir::new("quiet");
    let listen = addr(free_port()).to_string();
    let mut users = Role::spawn("users", &dir.0, &["users", "--listen", &listen], &[]);
    let base = format!("http://{listen}");
    wait_ready(&mut users, &format!("{base}/health")).await;
    let response = client()
        .get(format!("{base}/api/v1/users/nobody"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    users.terminate().await;
    let log = users.log();
    for line in log.lines() {
        assert!(
            !line.contains("WARN") && !line.contains("ERROR"),
            "unexpected complaint: {line}\n{log}"
        );
        assert!(
            !line.to_ascii_lowercase().contains("opentelemetry")
                && !line.to_ascii_lowercase().contains("otlp"),
            "tracing noise: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_request_is_counted_rejected_and_traced_with_its_decision() {
    let (received, receiver) = start_receiver().await;
    let policy = r#"
[policies.tight]
routes = ["/api/v1/users"]
key = ["ip"]
rate = "2/1m"
burst = 2
"#;
    let stack = Stack::start_with("rate-limit", &receiver, policy).await;
    let http = client();
    let scrape = || support::scrape_metrics(&stack.admin);
    let before = scrape().await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        let response = http
            .get(format!("{}/api/v1/users/nobody", stack.gateway))
            .header("x-request-id", format!("limited-{i}"))
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::NOT_FOUND,
            StatusCode::NOT_FOUND,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let after = scrape().await;
    let delta = |status: &str, decision: &str| {
        let labels = [
            ("service", "users"),
            ("status", status),
            ("decision", decision),
        ];
        prom_value(&after, "tollgate_requests_total", &labels)
            - prom_value(&before, "tollgate_requests_total", &labels)
    };
    assert_eq!(delta("404", "admitted"), 2.0);
    assert_eq!(delta("429", "rejected"), 1.0);

    // The 429's server span has the rate-limit decision as a child span.
    let (server, limit) = received
        .wait_for("the 429's server and rate_limit spans", |spans| {
            let server = server_span(spans, "gateway", "limited-2")?;
            let limit = spans
                .iter()
                .find(|span| span.name == "rate_limit" && span.parent_id == server.span_id)?;
            Some((server.clone(), limit.clone()))
        })
        .await;
    assert_eq!(server.attr("http.response.status_code"), Some("429"));
    assert_eq!(limit.attr("decision"), Some("rejected"));
    assert_eq!(limit.attr("policy"), Some("tight"));
    assert_eq!(limit.trace_id, server.trace_id);
}
