//! A global strict quota changed by reloading one gateway at a time (SIGHUP to real gateway
//! processes): while the two disagree, no window admits more than the smaller quota.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::peer::{CLIENTS, Deployment, Role, STRICT, STRICT_QUOTA, STRICT_WINDOW_S};

const WINDOW: Duration = Duration::from_secs(STRICT_WINDOW_S);
/// How long each phase drives traffic: a few windows.
const PHASE: Duration = Duration::from_secs(3 * STRICT_WINDOW_S);

/// Gateway `i`'s configured strict quota and the one in force.
async fn quotas(d: &Deployment, i: usize) -> Option<(u64, u64)> {
    let limits = d.limits(i, STRICT, CLIENTS[0]).await?;
    let tier = &limits["tiers"][0];
    Some((tier["quota"].as_u64()?, tier["quota_in_force"].as_u64()?))
}

async fn wait_quotas(d: &Deployment, i: usize, configured: u64, in_force: u64) {
    d.until(
        &format!("gateway {i} to configure {configured} and enforce {in_force}"),
        || async { quotas(d, i).await == Some((configured, in_force)) },
    )
    .await;
}

/// One phase's admissions: when each admitted response arrived, and the slowest request.
struct Load {
    admitted: Vec<Instant>,
    refused: usize,
    slowest: Duration,
}

impl Load {
    /// The most admissions whose responses arrived within `WINDOW - slowest` of each
    /// other. A response arrives at most `slowest` after its decision, so these decisions
    /// all fell within one window: this is a lower bound on the gateways' per-window
    /// count, and never more than it.
    fn max_per_window(&self) -> usize {
        let span = WINDOW.saturating_sub(self.slowest);
        let mut times = self.admitted.clone();
        times.sort();
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| **t - times[i] < span)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

/// Both gateways admit on one key as fast as they answer, for `PHASE`.
async fn load(d: &Deployment) -> Load {
    let end = Instant::now() + PHASE;
    let one = |i: usize| async move {
        let mut load = Load {
            admitted: Vec::new(),
            refused: 0,
            slowest: Duration::ZERO,
        };
        while Instant::now() < end {
            let sent = Instant::now();
            let status = d
                .request(i, "/strict", CLIENTS[0], Duration::from_secs(5))
                .await;
            let arrived = Instant::now();
            load.slowest = load.slowest.max(arrived - sent);
            match status {
                Some(200) => load.admitted.push(arrived),
                Some(429) => load.refused += 1,
                other => panic!("gateway {i} answered {other:?}\n{}", d.logs()),
            }
        }
        load
    };
    let (mut a, b) = tokio::join!(one(0), one(1));
    a.admitted.extend(b.admitted);
    a.refused += b.refused;
    a.slowest = a.slowest.max(b.slowest);
    a
}

fn report(phase: &str, load: &Load) -> usize {
    let max = load.max_per_window();
    eprintln!(
        "{phase}: {} admitted, {} refused, at most {max} in one {}s window (slowest request {:?})",
        load.admitted.len(),
        load.refused,
        STRICT_WINDOW_S,
        load.slowest
    );
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_quota_reloaded_one_gateway_at_a_time_never_exceeds_the_smaller() {
    let d = Deployment::start(&[("r1", "a", Role::Process), ("r2", "a", Role::Process)]).await;
    d.wait_connected(0, 1).await;
    d.wait_connected(1, 1).await;
    d.wait_reclaimed(0).await;
    d.wait_reclaimed(1).await;
    let (old, new, lower) = (STRICT_QUOTA, 2 * STRICT_QUOTA, STRICT_QUOTA / 2);

    // An increase, first gateway: its peer still announces the old quota.
    d.reload_strict_quota(0, new);
    wait_quotas(&d, 0, new, old).await;
    wait_quotas(&d, 1, old, old).await;
    let max = report(&format!("r1 at {new}, r2 at {old}"), &load(&d).await);
    assert!(
        max as u64 <= old,
        "{max} admitted in one window during the change"
    );

    // The second gateway: now both agree, the new quota is in force.
    d.reload_strict_quota(1, new);
    wait_quotas(&d, 0, new, new).await;
    wait_quotas(&d, 1, new, new).await;
    let max = report(&format!("both at {new}"), &load(&d).await);
    assert!(max as u64 <= new, "{max} admitted in one window");
    assert!(
        max as u64 > old,
        "the increase never took effect: {max} per window"
    );

    // A decrease, first gateway: once its peer heard of it, the lower quota binds both.
    d.reload_strict_quota(0, lower);
    wait_quotas(&d, 0, lower, lower).await;
    wait_quotas(&d, 1, new, lower).await;
    let max = report(&format!("r1 at {lower}, r2 at {new}"), &load(&d).await);
    assert!(
        max as u64 <= lower,
        "{max} admitted in one window during the change"
    );

    d.reload_strict_quota(1, lower);
    wait_quotas(&d, 1, lower, lower).await;
    let max = report(&format!("both at {lower}"), &load(&d).await);
    assert!(max as u64 <= lower, "{max} admitted in one window");
    assert!(max > 0, "nothing admitted after the change\n{}", d.logs());
    for i in 0..2 {
        let reloads = support::prom_value(
            &d.metrics(i).await,
            "tollgate_config_reloads_total",
            &[("result", "applied")],
        );
        assert_eq!(reloads, 2.0, "gateway {i}");
    }
}
