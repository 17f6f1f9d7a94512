//! Active health checks: one task per service probes every instance each interval.

use std::sync::Arc;

use http::{Method, Request, Uri};
use tokio::time::MissedTickBehavior;

use super::Upstream;
use super::body::LimitedBody;
use super::pool::Transition;

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
                let healthy = probe(
                    &upstream,
                    &endpoint.instance.to_string(),
                    &check.path,
                    check.timeout,
                )
                .await;
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

async fn probe(upstream: &Upstream, base: &str, path: &str, timeout: std::time::Duration) -> bool {
    let Ok(uri) = format!("{base}{path}").parse::<Uri>() else {
        return false;
    };
    let Ok(request) = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header("user-agent", "tollgate-health-check")
        .body(LimitedBody::empty())
    else {
        return false;
    };
    match tokio::time::timeout(timeout, upstream.client.request(request)).await {
        Ok(Ok(response)) => response.status().is_success(),
        _ => false,
    }
}
