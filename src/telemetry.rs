//! Logs and traces.
//!
//! Logging: every request's log lines carry its `correlation_id` through the request span
//! opened by [`crate::http::correlation::correlate`]. The level comes from `RUST_LOG`, or
//! else from the gateway's `log_level` ([`set_log_level`], applied again on every reload).
//!
//! Tracing: spans are exported over OTLP only when the standard OpenTelemetry variables ask
//! for it, so that a developer's `cargo run` neither tries to reach a collector nor warns
//! about one being absent:
//!
//! | variable | effect |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | export there; unset = no exporter at all |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` | `http/protobuf` (default, port 4318) or `grpc` (port 4317) |
//! | `OTEL_SERVICE_NAME` | overrides the role's default `service.name` (`gateway`, `users`, `bookings`) |
//! | `OTEL_RESOURCE_ATTRIBUTES` | extra resource attributes |
//! | `OTEL_BSP_*` | batch span processor: `SCHEDULE_DELAY`, `MAX_QUEUE_SIZE`, ... |
//! | `OTEL_TRACES_SAMPLER` (+ `_ARG`) | sampler; default `parentbased_always_on` |
//! | `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` | no exporter even with an endpoint |
//!
//! Gateways add `cloud.region` (their config's region) to the resource.
//!
//! Context propagation is W3C Trace Context (`traceparent`, `tracestate`): [`continue_trace`]
//! makes a server span the child of the caller's span, [`inject`] hands a client span's context
//! to the next hop. Without an exporter no OpenTelemetry layer exists; then nothing is
//! extracted or injected and the headers travel unchanged, so a caller's trace still
//! continues through a gateway that does not record it.

use std::future::Future;
use std::io::IsTerminal;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::{
    EnvResourceDetector, ResourceDetector, TelemetryResourceDetector,
};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// The W3C trace context headers.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Longest wait for the last spans to leave at shutdown; a collector that is down must not
/// hold up a deploy.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this process exports spans, i.e. whether an OpenTelemetry layer is installed.
/// Propagation is skipped without one: the span contexts would all be empty.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The installed log filter, replaced by [`set_log_level`].
static LOG_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The filter when neither `RUST_LOG` nor `log_level` says otherwise.
const DEFAULT_LOG_FILTER: &str = "info";

/// Parses a log filter as `RUST_LOG` would be (`info`, `tollgate=debug,warn`, ...).
pub fn parse_log_filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives).map_err(|error| error.to_string())
}

/// Whether `RUST_LOG` is set, which then decides the log filter whatever the config says
/// (as every `TOLLGATE_*` variable overrides its key).
fn log_filter_from_env() -> bool {
    std::env::var("RUST_LOG").is_ok_and(|value| !value.trim().is_empty())
}

/// Applies the config's `log_level` (`None`: the default) to the installed subscriber; a
/// no-op when `RUST_LOG` is set or no subscriber of [`init`] is installed. `level` was
/// validated with the config ([`parse_log_filter`]); an invalid one is ignored here.
pub fn set_log_level(level: Option<&str>) {
    let Some(handle) = LOG_FILTER.get() else {
        return;
    };
    if log_filter_from_env() {
        return;
    }
    let Ok(filter) = parse_log_filter(level.unwrap_or(DEFAULT_LOG_FILTER)) else {
        return;
    };
    if let Err(error) = handle.reload(filter) {
        tracing::warn!(%error, "log level not changed");
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines for terminals.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Which process this is, for its default `service.name` and resource attributes.
#[derive(Debug, Clone, Copy)]
pub enum Role<'a> {
    Gateway {
        region: &'a str,
    },
    Users,
    Bookings,
    /// `tollgate demo` itself: it serves nothing, so it never exports (its children do).
    Demo,
}

impl Role<'_> {
    /// `service.name` unless `OTEL_SERVICE_NAME` (or `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`) says otherwise. The demo sets the same names.
    pub fn default_service_name(&self) -> &'static str {
        match self {
            Self::Gateway { .. } => "gateway",
            Self::Users => "users",
            Self::Bookings => "bookings",
            Self::Demo => "demo",
        }
    }
}

/// Why tracing could not be set up as the environment asks.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter rejected its configuration (e.g. an endpoint that is not a URL).
    #[error("cannot export traces as OTEL_* asks: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// Export needs the Tokio runtime that serves the process; init was called outside it.
    #[error("trace export must be set up inside the Tokio runtime")]
    NoRuntime,
}

/// The installed tracing pipeline. Call [`Telemetry::shutdown`] when the role returns, or
/// the spans still queued in the batch processor are lost.
#[must_use = "shut it down after the role returns, or pending spans are lost"]
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes pending spans and stops the exporter (at most [`SHUTDOWN_TIMEOUT`]).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks until its export thread is done, and that export may need
        // this runtime's workers (tonic, hyper): block a pool thread, never a worker.
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "trace export did not shut down cleanly"),
            Err(error) => tracing::warn!(%error, "trace export shutdown task failed"),
        }
    }
}

/// Installs the global subscriber: log lines filtered by `RUST_LOG` (default `info`) and, when
/// the `OTEL_*` variables ask for it, an OTLP trace exporter.
///
/// A second init in one process (only possible in tests) keeps the first subscriber.
pub fn init(format: LogFormat, role: Role<'_>) -> Result<Telemetry, TelemetryError> {
    let provider = match role {
        Role::Demo => None,
        _ if !export_requested(|name| std::env::var(name).ok()) => None,
        _ => Some(tracer_provider(role)?),
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let (filter, filter_handle) = reload::Layer::new(filter);
    let logs = match format {
        // Colours only for a terminal: escape codes garble files and log collectors, and
        // styling every span's fields costs time on each request.
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stdout().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
    };
    // Only tollgate's own spans are exported, whatever RUST_LOG says: quieter logs must not
    // cost traces, and the exporter's own HTTP/gRPC client must not trace itself.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tollgate"))
            // Entering a span happens on every poll of a request's future. Parents are found
            // through tracing's own span tree and contexts are injected from the span itself,
            // so OpenTelemetry's thread-local "current context" need not follow each poll;
            // busy/idle bookkeeping and thread ids say little about async code. Without the
            // three, entering and leaving a span costs this layer nothing. Code locations
            // are left out too: each span name has exactly one, and they cost three
            // attributes on every span exported.
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_filter(Targets::new().with_target("tollgate", Level::INFO))
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        EXPORTING.store(true, Ordering::Release);
    }
    if installed {
        let _ = LOG_FILTER.set(filter_handle);
    }
    tracing::debug!(
        service = role.default_service_name(),
        exporting = provider.is_some(),
        "telemetry initialised"
    );
    Ok(Telemetry { provider })
}

/// Whether the environment names an OTLP endpoint and does not switch tracing off.
fn export_requested(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|value| !value.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider(role: Role<'_>) -> Result<SdkTracerProvider, TelemetryError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    // Protocol, endpoint, headers, timeout and compression all come from OTEL_EXPORTER_OTLP_*.
    let exporter = opentelemetry_otlp::SpanExporter::builder().build()?;
    // The sampler (OTEL_TRACES_SAMPLER) and the batch settings (OTEL_BSP_*) are read from the
    // environment by the SDK's defaults.
    Ok(SdkTracerProvider::builder()
        .with_resource(resource(role, |name| std::env::var(name).ok()))
        .with_batch_exporter(OnRuntime {
            inner: exporter,
            runtime,
        })
        .build())
}

/// The process's resource: SDK attributes, `OTEL_RESOURCE_ATTRIBUTES`, `service.name` and,
/// for gateways, `cloud.region`.
fn resource(role: Role<'_>, var: impl Fn(&str) -> Option<String>) -> Resource {
    let from_env = EnvResourceDetector::new().detect();
    let service_key = Key::from_static_str("service.name");
    // Precedence as the specification has it: OTEL_SERVICE_NAME, then service.name in
    // OTEL_RESOURCE_ATTRIBUTES, then the role's default (not the SDK's "unknown_service").
    let service_name = var("OTEL_SERVICE_NAME")
        .filter(|name| !name.trim().is_empty())
        .map(opentelemetry::Value::from)
        .or_else(|| from_env.get(&service_key))
        .unwrap_or_else(|| role.default_service_name().into());
    let mut builder = Resource::builder_empty()
        .with_detectors(&[
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ])
        .with_attribute(KeyValue::new(service_key, service_name));
    if let Role::Gateway { region } = role {
        // The config's region is what this gateway serves, so it wins over the environment.
        builder = builder.with_attribute(KeyValue::new("cloud.region", region.to_owned()));
    }
    builder.build()
}

/// Whether spans are exported (an OTLP exporter was installed). Without export, per-request
/// spans serve only as log context: callers then make a span with just the correlation ID,
/// or none, since creating, formatting and entering a span with a dozen attributes cost
/// about a fifth of the gateway's throughput (measured with `loadtest/run.sh`).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

/// Makes `span` (a server span not yet entered) the child of the caller's span named by the
/// `traceparent`/`tracestate` in `headers`. A missing or malformed `traceparent` is ignored:
/// the span then starts a new trace.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !EXPORTING.load(Ordering::Acquire) {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Fails only if the span is disabled or already started; then it keeps its own root.
        let _ = span.set_parent(parent);
    }
}

/// Writes `span`'s context as `traceparent`/`tracestate` into `headers`, replacing whatever
/// was there, and returns true; returns false (headers untouched) when spans are not
/// recorded, so a caller can pass the incoming context on instead.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) -> bool {
    if !EXPORTING.load(Ordering::Acquire) {
        return false;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return false;
    }
    // A stale tracestate must not ride along with our traceparent.
    headers.remove(&TRACEPARENT);
    headers.remove(&TRACESTATE);
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    true
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // A header that is not visible ASCII cannot be a valid trace header: ignore it.
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes its own header names and hex/ASCII values; anything
        // else would be its bug, and dropping the header beats a broken request.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Runs an exporter's futures with the process's Tokio runtime entered.
///
/// The SDK's batch processor exports from its own thread, outside any runtime, but the tonic
/// and hyper clients need one (to connect, spawn connection tasks and time out). Entering the
/// runtime on every poll lets them register with its I/O and timer drivers, which the
/// runtime's workers keep driving; no second runtime or blocking HTTP client is needed.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let _entered = self.runtime.enter();
        EnteredFuture {
            runtime: self.runtime.clone(),
            future: Box::pin(self.inner.export(batch)),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A future polled with a runtime entered (see [`OnRuntime`]).
struct EnteredFuture<F> {
    runtime: tokio::runtime::Handle,
    future: Pin<Box<F>>,
}

impl<F: Future> Future for EnteredFuture<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _entered = this.runtime.enter();
        this.future.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn export_only_with_an_endpoint_and_not_disabled() {
        assert!(!export_requested(env(&[])));
        assert!(!export_requested(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            " "
        )])));
        assert!(export_requested(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://localhost:4318"
        )])));
        assert!(export_requested(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://localhost:4318/v1/traces"
        )])));
        assert!(!export_requested(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])));
        assert!(!export_requested(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])));
    }

    #[test]
    fn service_name_defaults_to_the_role_and_yields_to_the_environment() {
        let name = |role, pairs: &[(&str, &str)]| {
            resource(role, env(pairs))
                .get(&Key::from_static_str("service.name"))
                .map(|value| value.to_string())
        };
        assert_eq!(name(Role::Users, &[]).as_deref(), Some("users"));
        assert_eq!(
            name(Role::Bookings, &[("OTEL_SERVICE_NAME", "b-eu")]).as_deref(),
            Some("b-eu")
        );
        let gateway = resource(Role::Gateway { region: "eu-west" }, env(&[]));
        assert_eq!(
            gateway
                .get(&Key::from_static_str("cloud.region"))
                .map(|v| v.to_string())
                .as_deref(),
            Some("eu-west")
        );
    }

    #[test]
    fn nothing_is_injected_or_extracted_without_export() {
        let span = tracing::info_span!("test");
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        continue_trace(&span, &headers);
        assert!(!inject(&span, &mut headers));
        assert_eq!(headers[&TRACEPARENT], "garbage");
    }

    #[test]
    fn malformed_traceparents_extract_to_nothing() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(&TRACEPARENT, HeaderValue::from_str(bad).unwrap());
            let cx = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
            assert!(!cx.span().span_context().is_valid(), "{bad}");
        }
    }
}
