//! Prometheus metrics: the process's recorder, the catalogue of every metric name, and the
//! rate-limit decision a request's response carries.
//!
//! Everything is recorded through the [`::metrics`] facade (`metrics::counter!` and friends)
//! and rendered by the gateway's admin listener at `GET /metrics` in the Prometheus text
//! format. There is no extra HTTP listener: the admin route renders from [`handle`].
//!
//! # Catalogue
//!
//! Every metric is named `tollgate_*`. Labels have bounded values only: a service name from
//! the config, never a raw path, key or client address.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | [`REQUESTS_TOTAL`] `tollgate_requests_total` | counter | `service`, `status`, `decision` | requests answered by the proxy listener |
//! | [`REQUEST_DURATION_SECONDS`] `tollgate_request_duration_seconds` | histogram | `service` | time to the response headers |
//! | [`UPSTREAM_IN_FLIGHT`] `tollgate_upstream_in_flight` | gauge | `service` | requests sent upstream whose response has not finished |
//! | [`UPSTREAM_HEALTHY_INSTANCES`] `tollgate_upstream_healthy_instances` | gauge | `service` | instances that may take traffic |
//! | [`RATELIMIT_DECISIONS_TOTAL`] `tollgate_ratelimit_decisions_total` | counter | `policy`, `decision` | rate-limit decisions (limiter) |
//! | [`RATELIMIT_LEASE_SERVED_TOTAL`] `tollgate_ratelimit_lease_served_total` | counter | `policy` | buckets decided from tokens leased earlier, without the store (limiter) |
//! | [`STORE_LATENCY_SECONDS`] `tollgate_store_latency_seconds` | histogram | `store` | one limiter store round trip, failures included (limiter) |
//! | [`STORE_ERRORS_TOTAL`] `tollgate_store_errors_total` | counter | `store`, `kind` | failed store operations (limiter) |
//! | [`STORE_BREAKER_OPEN`] `tollgate_store_breaker_open` | gauge | `store` | 1 while the store's circuit breaker is open, else 0 (limiter) |
//! | [`GLOBAL_DECISIONS_TOTAL`] `tollgate_global_decisions_total` | counter | `policy`, `mode`, `admitted` | global (cross-region) checks decided locally |
//! | [`GOSSIP_SENT_BYTES_TOTAL`] `tollgate_gossip_sent_bytes_total` | counter | | gossip frame bytes handed to QUIC |
//! | [`GOSSIP_PEERS_CONNECTED`] `tollgate_gossip_peers_connected` | gauge | | peers with a completed handshake |
//! | [`GOSSIP_PEER_LAG_SECONDS`] `tollgate_gossip_peer_lag_seconds` | gauge | `peer` | age of the last delta merged from each peer (absent until one arrives) |
//! | [`GOSSIP_PEER_IMPOSSIBLE_GIFTS_TOTAL`] `tollgate_gossip_peer_impossible_gifts_total` | counter | `peer` | strict columns a peer sent beyond what it could honestly have given, believed only up to that bound: non-zero names a lying or misconfigured peer |
//! | [`GOSSIP_MESSAGES_SENT_TOTAL`] `tollgate_gossip_messages_sent_total` | counter | | gossip messages queued |
//! | [`GOSSIP_DROPPED_TOTAL`] `tollgate_gossip_dropped_total` | counter | `reason` | peer input dropped or refused (`unknown_peer`, `before_hello`, `refused_hello`, `merge_refused`, `transfer_refused`, ...), peers' lower quotas past the rollout window (`quota_overdue`), and frames dropped on a full queue (`queue_full`) |
//! | [`GLOBAL_KEYS`] `tollgate_global_keys` | gauge | `mode` | `(policy, key)` pairs held in the eventual and strict tables |
//! | [`CONFIG_RELOADS_TOTAL`] `tollgate_config_reloads_total` | counter | `result` | SIGHUP reloads: `applied`, `invalid` (the file did not validate; the running config stays), `restart_required` (it changes a setting only a restart applies; nothing applied) |
//! | `tollgate_gossip_refused_peers_total` | counter | `reason` | QUIC peers refused (certificate, per-region certificate, unconfigured gateway, handshakes in flight, no Hello) |
//! | `tollgate_gossip_hellos_refused_total` | counter | `reason` | accepted connections whose Hello was refused (`future-incarnation`, `stale-incarnation`, `already-connected`, `wrong-gateway`, `too-frequent`, ...) |
//! | `tollgate_gossip_identity_conflict` | gauge | | 1 while this process serves no global policy because a newer process with its identity runs |
//! | `tollgate_gossip_frames_skipped_total` | counter | | malformed frames skipped |
//!
//! `service` is the routed service's config name, or [`UNROUTED`] when no route matched.
//! `status` is the numeric HTTP status. `decision` is [`Decision::as_str`]: `admitted`,
//! `rejected` (429), `none` (no policy matched, or no limiter), `fail_open` (the store failed
//! and the request was let through uncounted), `admitted_local` (the store failed and a local
//! fallback bucket admitted), `unauthenticated` (401) or `unavailable` (the store failed and
//! a closed policy refused: 503). The upstream and gossip gauges and the gossip
//! counters taken from the state machine are sampled when `/metrics` is scraped, so they
//! cost nothing on the request path. `peer` is `region/instance` from the config.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::OnceLock;
use std::thread::LocalKey;
use std::time::Duration;

use ::metrics::{Counter, Histogram};
use http::StatusCode;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "tollgate_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "tollgate_request_duration_seconds";
pub const UPSTREAM_IN_FLIGHT: &str = "tollgate_upstream_in_flight";
pub const UPSTREAM_HEALTHY_INSTANCES: &str = "tollgate_upstream_healthy_instances";
pub const RATELIMIT_DECISIONS_TOTAL: &str = "tollgate_ratelimit_decisions_total";
pub const RATELIMIT_LEASE_SERVED_TOTAL: &str = "tollgate_ratelimit_lease_served_total";
pub const STORE_LATENCY_SECONDS: &str = "tollgate_store_latency_seconds";
pub const STORE_ERRORS_TOTAL: &str = "tollgate_store_errors_total";
pub const STORE_BREAKER_OPEN: &str = "tollgate_store_breaker_open";
pub const GLOBAL_DECISIONS_TOTAL: &str = "tollgate_global_decisions_total";
pub const GOSSIP_SENT_BYTES_TOTAL: &str = "tollgate_gossip_sent_bytes_total";
pub const GOSSIP_PEERS_CONNECTED: &str = "tollgate_gossip_peers_connected";
pub const GOSSIP_PEER_LAG_SECONDS: &str = "tollgate_gossip_peer_lag_seconds";
pub const GOSSIP_PEER_IMPOSSIBLE_GIFTS_TOTAL: &str = "tollgate_gossip_peer_impossible_gifts_total";
pub const GOSSIP_MESSAGES_SENT_TOTAL: &str = "tollgate_gossip_messages_sent_total";
pub const GOSSIP_DROPPED_TOTAL: &str = "tollgate_gossip_dropped_total";
pub const GLOBAL_KEYS: &str = "tollgate_global_keys";
pub const CONFIG_RELOADS_TOTAL: &str = "tollgate_config_reloads_total";

/// The `service` label of a request no route matched.
pub const UNROUTED: &str = "unrouted";

/// The `Content-Type` of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Request durations: 1 ms to 30 s, the range between a cached answer and a request timeout.
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Store round trips: 100 µs (local Redis) to 250 ms (well past any sane breaker timeout).
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

/// How often histogram samples are folded into buckets when nobody scrapes. Without upkeep
/// an unscraped gateway would keep every sample it ever recorded.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

pub use crate::limit::decision::Decision;

/// The `decision` label of a response: the decision a limiter put in its extensions, or
/// `none` if no limiter ran.
pub fn decision_label(extensions: &http::Extensions) -> &'static str {
    extensions
        .get::<Decision>()
        .copied()
        .unwrap_or(Decision::NoPolicy)
        .as_str()
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder, once; later calls
/// (several gateways in one test process) return the same handle.
///
/// If some other recorder was installed first, ours stays private and renders nothing
/// recorded: a warning says so, nothing fails.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        if let Err(error) = ::metrics::set_global_recorder(recorder) {
            tracing::warn!(%error, "another metrics recorder is installed; /metrics stays empty");
        }
        let upkeep = handle.clone();
        // A plain thread, not a task: the recorder outlives any one Tokio runtime (tests run
        // many), and upkeep is a few microseconds every few seconds.
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "no metrics upkeep thread; histograms drain only on scrape");
        }
        handle
    })
}

/// The handle to render from, installing the recorder if nothing did yet.
pub fn handle() -> &'static PrometheusHandle {
    install()
}

/// Every metric in the Prometheus text format.
pub fn render() -> String {
    handle().render()
}

fn builder() -> PrometheusBuilder {
    // Explicit buckets make these true Prometheus histograms (aggregatable across gateways)
    // instead of per-process summaries.
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(REQUEST_DURATION_SECONDS.to_owned()),
            REQUEST_BUCKETS,
        )
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                Matcher::Full(STORE_LATENCY_SECONDS.to_owned()),
                STORE_BUCKETS,
            )
        })
        // Only an empty bucket list is an error, and both lists are constant and non-empty.
        .unwrap_or_else(|_| PrometheusBuilder::new())
}

/// Counts one answered proxy request and its duration.
pub fn record_request(
    service: &str,
    status: StatusCode,
    decision: &'static str,
    elapsed: Duration,
) {
    thread_local! {
        static REQUESTS: Cached<(u16, &'static str), Counter> = Cached::new();
        static DURATIONS: Cached<(), Histogram> = Cached::new();
    }
    let status = status.as_u16();
    with_cached(
        &REQUESTS,
        service,
        (status, decision),
        || {
            ::metrics::counter!(
                REQUESTS_TOTAL,
                "service" => service.to_owned(),
                "status" => status.to_string(),
                "decision" => decision,
            )
        },
        |counter| counter.increment(1),
    );
    with_cached(
        &DURATIONS,
        service,
        (),
        || ::metrics::histogram!(REQUEST_DURATION_SECONDS, "service" => service.to_owned()),
        |histogram| histogram.record(elapsed.as_secs_f64()),
    );
}

/// Counts one rate-limit decision of `policy`.
pub fn count_decision(policy: &str, decision: &'static str) {
    thread_local! {
        static DECISIONS: Cached<&'static str, Counter> = Cached::new();
    }
    with_cached(
        &DECISIONS,
        policy,
        decision,
        || {
            ::metrics::counter!(
                RATELIMIT_DECISIONS_TOTAL,
                "policy" => policy.to_owned(),
                "decision" => decision,
            )
        },
        |counter| counter.increment(1),
    );
}

/// Counts one bucket of `policy` decided from its lease.
pub fn count_lease_served(policy: &str) {
    thread_local! {
        static SERVED: Cached<(), Counter> = Cached::new();
    }
    with_cached(
        &SERVED,
        policy,
        (),
        || ::metrics::counter!(RATELIMIT_LEASE_SERVED_TOTAL, "policy" => policy.to_owned()),
        |counter| counter.increment(1),
    );
}

/// Records one store round trip of the limiter.
pub fn record_store_latency(store: &str, elapsed: Duration) {
    thread_local! {
        static LATENCY: Cached<(), Histogram> = Cached::new();
    }
    with_cached(
        &LATENCY,
        store,
        (),
        || ::metrics::histogram!(STORE_LATENCY_SECONDS, "store" => store.to_owned()),
        |histogram| histogram.record(elapsed.as_secs_f64()),
    );
}

/// Counts one global (cross-region) check of `policy`.
pub fn count_global_decision(policy: &str, mode: &'static str, admitted: bool) {
    thread_local! {
        static GLOBAL: Cached<(&'static str, bool), Counter> = Cached::new();
    }
    with_cached(
        &GLOBAL,
        policy,
        (mode, admitted),
        || {
            ::metrics::counter!(
                GLOBAL_DECISIONS_TOTAL,
                "policy" => policy.to_owned(),
                "mode" => mode,
                "admitted" => if admitted { "true" } else { "false" },
            )
        },
        |counter| counter.increment(1),
    );
}

/// Metric handles by a name label (a service or policy from the config) and a few small
/// labels, each made once per thread.
///
/// `metrics::counter!` with owned labels allocates its key and looks it up in the registry on
/// every call: about 4,800 instructions per proxied request in a callgrind profile, more than
/// routing the request. The label sets are few (services x statuses x decisions), so each is
/// made once and its handle kept. Kept per thread, because the proxy's worker threads
/// (`http::workers`) each serve their own connections: a shared map behind a lock had every
/// request of every core take the same lock word, a cache line bouncing between cores. The
/// handles a thread keeps point at the same registry entries as every other thread's.
struct Cached<K, H> {
    handles: RefCell<HashMap<Box<str>, ByLabels<K, H>, FastHash>>,
}

/// Runs `use_handle` on this thread's handle for (`name`, `labels`) in `cache`, made by `make`
/// the first time. A thread whose locals are being torn down records through a handle made
/// for the occasion instead.
fn with_cached<K: Copy + Eq + Hash, H>(
    cache: &'static LocalKey<Cached<K, H>>,
    name: &str,
    labels: K,
    make: impl FnOnce() -> H,
    use_handle: impl FnOnce(&H),
) {
    let mut calls = Some((make, use_handle));
    let cached = cache.try_with(|cache| {
        if let Some((make, use_handle)) = calls.take() {
            cache.with(name, labels, make, use_handle);
        }
    });
    if cached.is_err()
        && let Some((make, use_handle)) = calls.take()
    {
        use_handle(&make());
    }
}

/// One name's handles, by the rest of their labels.
type ByLabels<K, H> = HashMap<K, H, FastHash>;

/// The maps' keys are config names and small constant labels, not attacker-chosen: a fast
/// hash needs no flooding resistance here.
type FastHash = foldhash::fast::FixedState;

impl<K: Copy + Eq + Hash, H> Cached<K, H> {
    fn new() -> Self {
        // Handles are bound to the recorder installed when they are made: install ours first.
        install();
        Self {
            handles: RefCell::new(HashMap::default()),
        }
    }

    /// Runs `use_handle` on the handle for (`name`, `labels`), made by `make` the first time.
    fn with(&self, name: &str, labels: K, make: impl FnOnce() -> H, use_handle: impl FnOnce(&H)) {
        // `make` and `use_handle` only call the recorder, never this thread's cache, so no
        // borrow here is ever refused (and a refused one would only skip the cache).
        if let Ok(handles) = self.handles.try_borrow()
            && let Some(handle) = handles
                .get(name)
                .and_then(|by_labels| by_labels.get(&labels))
        {
            use_handle(handle);
            return;
        }
        let handle = make();
        use_handle(&handle);
        if let Ok(mut handles) = self.handles.try_borrow_mut() {
            handles
                .entry(name.into())
                .or_default()
                .insert(labels, handle);
        }
    }
}

/// Samples one upstream service's gauges (called when `/metrics` is scraped).
pub fn record_upstream(service: &str, in_flight: usize, healthy_instances: usize) {
    // Counts far below 2^52 are exact as f64.
    ::metrics::gauge!(UPSTREAM_IN_FLIGHT, "service" => service.to_owned()).set(in_flight as f64);
    ::metrics::gauge!(UPSTREAM_HEALTHY_INSTANCES, "service" => service.to_owned())
        .set(healthy_instances as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_labels() {
        let mut extensions = http::Extensions::new();
        assert_eq!(decision_label(&extensions), "none");
        extensions.insert(Decision::Rejected);
        assert_eq!(decision_label(&extensions), "rejected");
        assert_eq!(Decision::Admitted.as_str(), "admitted");
        assert_eq!(Decision::StoreFailOpen.as_str(), "fail_open");
    }

    #[test]
    fn install_is_idempotent_and_renders_what_was_recorded() {
        let first: *const PrometheusHandle = install();
        let second: *const PrometheusHandle = install();
        assert_eq!(first, second);
        record_request(
            "unit-test-svc",
            StatusCode::OK,
            "none",
            Duration::from_millis(3),
        );
        // Cached handles: the same label set counts on, another gets its own series.
        for _ in 0..2 {
            record_request(
                "unit-test-svc",
                StatusCode::TOO_MANY_REQUESTS,
                "rejected",
                Duration::from_millis(1),
            );
        }
        let text = render();
        assert!(
            text.contains(
                r#"tollgate_requests_total{service="unit-test-svc",status="200",decision="none"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tollgate_requests_total{service="unit-test-svc",status="429",decision="rejected"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tollgate_request_duration_seconds_bucket{service="unit-test-svc",le="0.005"} 3"#
            ),
            "{text}"
        );
    }
}
