//! A gateway whose strict policy cannot admit with its own share (#14): a lone gateway of a
//! three-gateway deployment (its peers down) warns once per strict policy, naming the peers
//! it waits for, and `/ready` shows it while staying 200; when the peers come up, the
//! gateway reclaims its share and both clear. Waits poll a condition under a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::peer::{CLIENTS, Deployment, Role, STRICT};

const LONE: usize = 0;
const WARNING: &str = "cannot admit with this gateway's share";

fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains(WARNING))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_gateway_says_once_which_peers_its_strict_policy_waits_for() {
    let mut d = Deployment::start(&[
        ("us-east", "a", Role::Process),
        ("eu-west", "a", Role::Test),
        ("ap-south", "a", Role::Test),
    ])
    .await;
    d.until(
        "the strict policy to wait for unreachable peers",
        || async {
            d.ready(LONE)
                .await
                .is_some_and(|r| r["gossip"]["strict_waiting"][0]["reason"] == "unreachable-peers")
        },
    )
    .await;
    let response = d.http.get(d.admin(LONE, "/ready")).send().await.unwrap();
    assert_eq!(response.status(), 200, "it still serves everything else");
    let ready: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        ready["gossip"]["strict_waiting"],
        json!([{
            "policy": STRICT,
            "reason": "unreachable-peers",
            "waiting_for": ["eu-west/a", "ap-south/a"],
        }])
    );
    let refused = d
        .request(LONE, "/strict", CLIENTS[0], Duration::from_secs(5))
        .await;
    assert_eq!(refused, Some(429), "{}", d.logs());

    d.until("the warning", || async {
        !warnings(&d.log(LONE)).is_empty()
    })
    .await;
    let log = d.log(LONE);
    let warning = warnings(&log)[0];
    assert!(warning.contains(STRICT), "{warning}");
    assert!(
        warning.contains("unreachable: eu-west/a, ap-south/a"),
        "{warning}"
    );

    // The peers come up: the lone gateway gets every handover and reclaims its share.
    d.restart(1);
    d.restart(2);
    d.wait_reclaimed(LONE).await;
    d.until("/ready to clear", || async {
        d.ready(LONE)
            .await
            .is_some_and(|r| r["gossip"]["strict_waiting"] == json!([]))
    })
    .await;
    d.until("the all-clear line", || async {
        d.log(LONE)
            .contains("strict policies admit with this gateway's share now")
    })
    .await;
    // Seconds of waiting, one poll a second, one warning.
    assert_eq!(warnings(&d.log(LONE)).len(), 1, "{}", d.log(LONE));
}
