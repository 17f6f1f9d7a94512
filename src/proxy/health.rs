//! Active health checks: one task per service probes every instance each interval; and the
//! task that closes idle upstream connections past their time.

use std::sync::Arc;

use http::{Method, Request, Uri, header};
use http_body_util::BodyExt;
use tokio::time::MissedTickBehavior;

use super::Upstream;
use super::body::LimitedBody;
use super::pool::{Endpoint, Transition};

/// How often idle connections are checked for expiry.
const REAP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// Probes `upstream`'s instances forever; the caller aborts the task on shutdown.
pub async fn run(upstream: Arc<Upstream>) {
    let Some(check) = upstream.config.health_check.clone() else {
        return;
    };
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let probes = upstream.pool.endpoints.iter().map(|endpoint| {
            let upstream = upstream.clone();
            let check = check.clone();
            async move {
                let healthy = probe(endpoint, &check.path, check.timeout).await;
                match endpoint.record_check(healthy, &check) {
                    Transition::BecameHealthy => tracing::info!(
                        service = %upstream.config.name,
                        instance = %endpoint.instance,
                        "instance healthy again"
                    ),
                    Transition::BecameUnhealthy => tracing::warn!(
                        service = %upstream.config.name,
                        instance = %endpoint.instance,
                        "instance failed its health checks, taken out of rotation"
                    ),
                    Transition::None => {}
                }
            }
        });
        futures_util::future::join_all(probes).await;
    }
}

async fn probe(endpoint: &Endpoint, path: &str, timeout: std::time::Duration) -> bool {
    let Ok(uri) = path.parse::<Uri>() else {
        return false;
    };
    let Ok(request) = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(header::HOST, endpoint.connections.host_header().clone())
        .header(header::USER_AGENT, "tollgate-health-check")
        .body(LimitedBody::empty())
    else {
        return false;
    };
    let exchange = async {
        let (response, lease) = endpoint.connections.send(request).await.ok()?;
        let healthy = response.status().is_success();
        // Reading the (small) body to its end lets the connection serve the next request.
        response.into_body().collect().await.ok()?;
        lease.release();
        Some(healthy)
    };
    matches!(
        tokio::time::timeout(timeout, exchange).await,
        Ok(Some(true))
    )
}

/// Closes idle upstream connections past their time, every [`REAP_INTERVAL`], forever; the
/// caller aborts the task on shutdown.
pub async fn reap_idle(upstream: Arc<Upstream>) {
    let mut ticker = tokio::time::interval(REAP_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let now = ticker.tick().await;
        for endpoint in &upstream.pool.endpoints {
            endpoint.connections.reap(now);
        }
    }
}
