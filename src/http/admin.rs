//! The admin API, on its own listener so proxy routes can never shadow it and it can be
//! kept off the public network.
//!
//! - `GET /health`: liveness. 200 while the process serves at all.
//! - `GET /ready`: readiness. 200 when every dependency can serve, else 503; the JSON body
//!   names each dependency (Redis, each upstream service's healthy instances) either way, so
//!   an operator sees why, and `config_digest`, the SHA-256 of the config file in force.
//! - `GET /metrics`: every `tollgate_*` metric in the Prometheus text format (catalogue in
//!   [`crate::metrics`]). The upstream and gossip gauges are sampled at scrape time.
//! - `GET /limits/{policy}?key=K`: a global policy's state for one client key as this
//!   gateway sees it: per actor usage (eventual), the rights held here (strict), and the age
//!   of the last delta from each peer. `K` is the policy's key value: `key:<api key name>`,
//!   `ip:<address>`, `sub:<hash>` or `h:<header>:<hash>` (as in the Redis bucket names).
//!
//! Gossip peers appear in `/ready` for information only: a gateway cut off from the other
//! regions keeps serving (that is the point of deciding locally), so it stays ready. So do
//! the strict policies that cannot admit with its share yet (`gossip.strict_waiting`, see
//! [`crate::global::strict_wait`]): a lone gateway refuses those, and serves everything else.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use http::{StatusCode, header};
use serde::Deserialize;
use serde_json::json;

use crate::crdt::eventual::local_reserve;
use crate::global::GlobalLimits;
use crate::global::strict_wait::is_connected;
use crate::gossip::proto::PeerStatus;
use crate::http::correlation::correlate;
use crate::limit::policy::GlobalMode;
use crate::problem::Problem;
use crate::running::InForce;
use crate::store::backend::Backend;

/// What the admin API reads of a gateway.
#[derive(Clone)]
pub struct AdminState {
    pub region: Arc<str>,
    /// The configuration in force (services and their instances, the config digest).
    pub running: Arc<InForce>,
    /// The gateway's share in global limits, when it gossips.
    pub global: Option<Arc<GlobalLimits>>,
    /// The region's store, pinged for readiness.
    pub backend: Arc<Backend>,
}

pub fn admin_app(state: AdminState) -> Router {
    // Before the first request is served, so that none goes uncounted.
    crate::metrics::install();
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/limits/{policy}", get(limits))
        .with_state(Arc::new(state))
        .layer(from_fn(correlate))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(gateway): State<Arc<AdminState>>) -> Response {
    for service in gateway.running.load().proxy.status() {
        crate::metrics::record_upstream(
            &service.name,
            service.in_flight,
            service.healthy_instances,
        );
    }
    if let Some(global) = &gateway.global {
        record_gossip(global);
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(),
    )
        .into_response()
}

async fn ready(State(gateway): State<Arc<AdminState>>) -> Response {
    let running = gateway.running.load();
    let services = running.proxy.status();
    let redis = gateway.backend.status().await;
    let services_ready = services.iter().all(|s| s.healthy_instances > 0);
    // A process that stood down for a newer one with its identity serves no global policy:
    // a load balancer should send its traffic to the other.
    let identity_ok = gateway
        .global
        .as_ref()
        .is_none_or(|g| g.handle.identity_conflict().is_none());
    let ready = services_ready && redis.is_ready() && identity_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if ready { "ready" } else { "not-ready" },
        "region": &*gateway.region,
        // SHA-256 of the config file in force (the last one a reload applied).
        "config_digest": running.digest,
        "dependencies": {
            "redis": redis,
            "services": services,
        },
    });
    if let Some(global) = &gateway.global {
        body["gossip"] = gossip_status(global);
    }
    (status, Json(body)).into_response()
}

fn status_str(status: PeerStatus) -> &'static str {
    match status {
        PeerStatus::Unknown => "handshaking",
        PeerStatus::Ok => "ok",
        PeerStatus::ConfigMismatch { .. } => "config-mismatch",
        PeerStatus::BadHello => "bad-hello",
    }
}

fn age_ms(now_us: u64, at_us: Option<u64>) -> Option<u64> {
    at_us.map(|t| now_us.saturating_sub(t) / 1_000)
}

/// The peers as `/ready` shows them.
fn gossip_status(global: &GlobalLimits) -> serde_json::Value {
    let now = crate::clock::now_us();
    let peers: Vec<serde_json::Value> = global
        .handle
        .peer_status()
        .into_iter()
        .map(|p| {
            let connected = is_connected(&p);
            json!({
                "peer": global.peer_name(p.peer),
                "actor": p.actor.map(|a| a.to_string()),
                "status": status_str(p.status),
                "connected": connected,
                "failed_attempts": p.failed_attempts,
                "last_heard_ms_ago": age_ms(now, p.last_heard_us),
                "last_delta_ms_ago": age_ms(now, p.last_delta_us),
                "impossible_gifts": p.impossible_gifts,
            })
        })
        .collect();
    let connected = peers.iter().filter(|p| p["connected"] == true).count();
    let (eventual_keys, strict_keys) = global.handle.key_counts();
    json!({
        "me": global.peer_name(global.me),
        "peers_connected": connected,
        "peers_total": peers.len(),
        "peers": peers,
        "keys": { "eventual": eventual_keys, "strict": strict_keys },
        // Strict policies that refuse what peers do not give (a lone gateway: everything).
        // Information, like the peers: the gateway still serves every other policy and
        // route, so it stays ready.
        "strict_waiting": global.strict_waiting(),
        // The newer incarnation of this gateway, found running elsewhere, that made this
        // process stop serving global policies.
        "identity_conflict": global.handle.identity_conflict(),
    })
}

fn record_gossip(global: &GlobalLimits) {
    let now = crate::clock::now_us();
    let mut connected = 0u32;
    for p in global.handle.peer_status() {
        if is_connected(&p) {
            connected += 1;
        }
        metrics::counter!(
            crate::metrics::GOSSIP_PEER_IMPOSSIBLE_GIFTS_TOTAL,
            "peer" => global.peer_name(p.peer),
        )
        .absolute(p.impossible_gifts);
        if let Some(at) = p.last_delta_us {
            metrics::gauge!(
                crate::metrics::GOSSIP_PEER_LAG_SECONDS,
                "peer" => global.peer_name(p.peer),
            )
            .set(now.saturating_sub(at) as f64 / 1e6);
        }
    }
    metrics::gauge!(crate::metrics::GOSSIP_PEERS_CONNECTED).set(f64::from(connected));
    let (eventual_keys, strict_keys) = global.handle.key_counts();
    metrics::gauge!(crate::metrics::GLOBAL_KEYS, "mode" => "eventual").set(eventual_keys as f64);
    metrics::gauge!(crate::metrics::GLOBAL_KEYS, "mode" => "strict").set(strict_keys as f64);
    let conflict = global.handle.identity_conflict().is_some();
    metrics::gauge!(crate::gossip::driver::IDENTITY_CONFLICT).set(f64::from(u8::from(conflict)));
    let stats = global.handle.stats();
    metrics::counter!(crate::metrics::GOSSIP_MESSAGES_SENT_TOTAL).absolute(stats.sent);
    for (reason, value) in [
        ("unknown_peer", stats.unknown_peer),
        ("no_connection", stats.no_connection),
        ("before_hello", stats.before_hello),
        ("refused_hello", stats.refused_hello),
        ("duplicate_identity", stats.duplicate_identity),
        ("misattributed", stats.misattributed),
        ("quota_overdue", stats.quota_overdue),
        ("merge_refused", stats.merge_refusals),
        ("transfer_refused", stats.transfers_refused),
        ("queue_full", global.handle.dropped_frames()),
    ] {
        metrics::counter!(crate::metrics::GOSSIP_DROPPED_TOTAL, "reason" => reason).absolute(value);
    }
}

#[derive(Debug, Deserialize)]
struct LimitsQuery {
    key: Option<String>,
}

/// `GET /limits/{policy}?key=K`.
async fn limits(
    State(gateway): State<Arc<AdminState>>,
    Path(policy): Path<String>,
    Query(query): Query<LimitsQuery>,
) -> Response {
    let Some(global) = &gateway.global else {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "no-global-limits",
            "No global limits",
        )
        .detail("this gateway has no [gossip] section, so no global policy")
        .into_response();
    };
    let policies = global.policies();
    let entries: Vec<_> = policies
        .entries()
        .iter()
        .filter(|e| e.policy == policy)
        .collect();
    if entries.is_empty() {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "unknown-policy",
            "Unknown global policy",
        )
        .detail(format!("{policy:?} is not a global policy of this gateway"))
        .into_response();
    }
    let Some(key) = query.key.filter(|k| !k.is_empty()) else {
        return Problem::new(StatusCode::BAD_REQUEST, "missing-key", "Missing key")
            .detail("pass the client key as ?key=, e.g. ?key=key:demo-free-key or ?key=ip:10.0.0.7")
            .into_response();
    };
    let now = crate::clock::now_us();
    let tiers: Vec<serde_json::Value> = entries
        .iter()
        .map(|entry| {
            let inspection = global.handle.inspect(entry.id, &key);
            let eventual = inspection.eventual.map(|e| {
                json!({
                    "merged": e.merged,
                    "remaining": entry.quota.saturating_sub(e.merged),
                    "unsettled": e.unsettled,
                    "actors_in_rule": e.n_actors,
                    "per_actor": e.per_actor.iter().map(|(actor, used)| json!({
                        "actor": actor.to_string(),
                        "used": used,
                    })).collect::<Vec<_>>(),
                })
            });
            let strict = inspection.strict.map(|s| {
                json!({
                    "rights_held": s.available,
                    "live_consumed": s.live_consumed,
                    "share_reclaimed": s.reclaimed,
                })
            });
            // What this gateway admits of a key per window whatever its peers report (of
            // the quota in force, as the admission rule takes it).
            let quota_in_force = global.quota_in_force(entry.id);
            let local_reserve = (entry.mode == GlobalMode::Eventual).then(|| {
                let quota = quota_in_force.unwrap_or(entry.quota).min(entry.quota);
                local_reserve(quota, entry.local_reserve)
            });
            json!({
                "tier": entry.tier,
                "quota": entry.quota,
                "local_reserve": local_reserve,
                // The smallest of this gateway's and its peers' configured quotas: what is
                // enforced while a change rolls through the deployment.
                "quota_in_force": quota_in_force,
                "window_s": entry.spec.window_us() as f64 / 1e6,
                "sub_windows": entry.spec.sub_windows(),
                "eventual": eventual,
                "strict": strict,
            })
        })
        .collect();
    let peers: Vec<serde_json::Value> = global
        .handle
        .peer_status()
        .into_iter()
        .map(|p| {
            json!({
                "peer": global.peer_name(p.peer),
                "actor": p.actor.map(|a| a.to_string()),
                "status": status_str(p.status),
                "last_delta_ms_ago": age_ms(now, p.last_delta_us),
                "impossible_gifts": p.impossible_gifts,
            })
        })
        .collect();
    Json(json!({
        "policy": policy,
        "mode": entries[0].mode.as_str(),
        "key": key,
        "me": global.peer_name(global.me),
        "tiers": tiers,
        "peers": peers,
    }))
    .into_response()
}
