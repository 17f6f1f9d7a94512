//! The gossip driver over real QUIC on loopback: three regions converge on an eventual count
//! and a client hopping between them is held to a strict quota.
//!
//! Robust on a loaded machine: every wait polls an eventual state under a generous deadline;
//! nothing asserts on timing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tollgate::certs;
use tollgate::crdt::{EventualPolicy, PolicyId, Slot, StrictPolicy, WindowSpec};
use tollgate::gossip::driver::{self, DriverTask, GossipHandle, PeerAddress};
use tollgate::gossip::proto::{Gossip, GossipConfig, LinkState, PeerId, PeerStatus, Policies};
use tollgate::gossip::quic::GossipEndpoint;
use tollgate::gossip::tls::PeerTls;

/// Generous bound for anything on loopback; tests finish far sooner when things work.
const DEADLINE: Duration = Duration::from_secs(20);
const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const EVENTUAL: PolicyId = 1;
const STRICT: PolicyId = 2;
const STRICT_QUOTA: u64 = 30;
const SEC: u64 = 1_000_000;
const MS: u64 = 1_000;

fn gossip_config() -> GossipConfig {
    GossipConfig {
        interval_us: 20 * MS,
        max_entries_per_frame: 64,
        keepalive_us: 500 * MS,
        idle_timeout_us: 5 * SEC,
        backoff_base_us: 50 * MS,
        backoff_cap_us: 500 * MS,
        anti_entropy_every_us: 500 * MS,
        announce_every_us: 100 * MS,
        gc_every_us: SEC,
    }
}

/// Strict-mode window: short, because a slot reclaims its share only after a window plus a
/// sub-window (see `crdt::bounded`).
fn strict_spec() -> WindowSpec {
    WindowSpec::new(2 * SEC, 10).unwrap()
}

fn policies() -> Policies {
    Policies {
        // Far longer than a test, so nothing expires while it runs.
        eventual: vec![(
            EVENTUAL,
            EventualPolicy::unbounded(WindowSpec::new(600 * SEC, 10).unwrap()),
        )],
        strict: vec![(
            STRICT,
            StrictPolicy {
                quota: STRICT_QUOTA,
                spec: strict_spec(),
            },
        )],
    }
}

/// The most timestamps (sorted) within any span of `w`.
fn max_in_any_window(times: &[u64], w: u64) -> usize {
    let mut best = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while j < times.len() && times[j] <= times[i] + w {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

fn tls(dir: &Path, region: &str) -> PeerTls {
    PeerTls::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{region}.i0.pem")),
        &dir.join(format!("{region}.i0.key")),
    )
    .unwrap()
}

struct Mesh {
    handles: Vec<GossipHandle>,
    tasks: Vec<DriverTask>,
    addrs: Vec<SocketAddr>,
    dir: tempfile::TempDir,
}

/// Starts region `i` (incarnation `incarnation`) on `endpoint`, with every other region as
/// a peer.
fn start_region(
    i: usize,
    incarnation: u64,
    endpoint: GossipEndpoint,
    addrs: &[SocketAddr],
) -> (GossipHandle, DriverTask) {
    let slots: Vec<Slot> = REGIONS.iter().map(|r| Slot::new(*r, "i0")).collect();
    let gossip = Gossip::new(
        slots[i].actor(incarnation),
        slots.clone(),
        gossip_config(),
        policies(),
        0xC0FFEE,
        i as u64 + 1 + incarnation * 10,
        tollgate::clock::now_us(),
    )
    .unwrap();
    let peers = (0..REGIONS.len())
        .filter(|&j| j != i)
        .map(|j| PeerAddress {
            peer: PeerId(j as u16),
            addr: addrs[j].to_string(),
            region: REGIONS[j].to_string(),
            instance: "i0".to_string(),
        })
        .collect();
    driver::spawn_driver(gossip, endpoint, peers)
}

fn bind(dir: &Path, me: &str, addr: SocketAddr) -> std::io::Result<GossipEndpoint> {
    let others = REGIONS
        .iter()
        .filter(|r| *r != &me)
        .map(|r| Slot::new(*r, "i0"))
        .collect();
    GossipEndpoint::bind(addr, tls(dir, me), others).map_err(std::io::Error::other)
}

impl Mesh {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<certs::Gateway> = REGIONS
            .iter()
            .map(|r| certs::Gateway::new(r, "i0").unwrap())
            .collect();
        certs::generate(dir.path(), &names, false).unwrap();
        let endpoints: Vec<GossipEndpoint> = REGIONS
            .iter()
            .map(|me| bind(dir.path(), me, SocketAddr::from(([127, 0, 0, 1], 0))).unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.local_addr().unwrap()).collect();
        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        for (i, endpoint) in endpoints.into_iter().enumerate() {
            let (handle, task) = start_region(i, 1, endpoint, &addrs);
            handles.push(handle);
            tasks.push(task);
        }
        Mesh {
            handles,
            tasks,
            addrs,
            dir,
        }
    }

    async fn shutdown(self) {
        for task in self.tasks {
            within(task.shutdown(Duration::from_secs(1))).await.unwrap();
        }
    }
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .expect("deadline passed")
}

/// [`support::eventually`] for a condition that needs no await, within this file's
/// deadline.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    support::eventually(what, DEADLINE, || std::future::ready(condition())).await;
}

/// Every region connected to every other, handshaken, and holding every peer's full state
/// (so eventual decisions count).
fn all_connected(handles: &[GossipHandle]) -> bool {
    handles.iter().all(|h| {
        !h.is_learning()
            && h.peer_status()
                .iter()
                .all(|p| matches!(p.link, LinkState::Up { .. }) && p.status == PeerStatus::Ok)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_converge_on_eventual_counts() {
    let mesh = Mesh::start().await;
    eventually("every region connected and handshaken", || {
        all_connected(&mesh.handles)
    })
    .await;

    let per_region = [10u64, 20, 30];
    for (handle, n) in mesh.handles.iter().zip(per_region) {
        for _ in 0..n {
            assert!(handle.try_admit_eventual(EVENTUAL, "tenant:a", 1, 1_000_000));
        }
    }
    let total: u64 = per_region.iter().sum();
    eventually("all regions count every admission", || {
        mesh.handles
            .iter()
            .all(|h| h.count(EVENTUAL, "tenant:a") == total)
    })
    .await;
    for handle in &mesh.handles {
        let inspection = handle.inspect(EVENTUAL, "tenant:a");
        assert_eq!(inspection.eventual.map(|e| e.merged), Some(total));
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hopping_regions_is_held_to_the_strict_quota() {
    let mesh = Mesh::start().await;
    eventually("every region reclaimed its strict share", || {
        mesh.handles.iter().all(|h| {
            h.inspect(STRICT, "hopper")
                .strict
                .is_some_and(|s| s.reclaimed)
        })
    })
    .await;

    // Hop until the quota is used up (rights may need transfers between regions), then keep
    // hopping for a while: within any window, no more than the quota may be admitted.
    let mut admitted = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut attempt = 0usize;
    while (admitted.len() as u64) < STRICT_QUOTA && tokio::time::Instant::now() < deadline {
        if mesh.handles[attempt % 3].try_admit_strict(STRICT, "hopper", 1) {
            admitted.push(tollgate::clock::now_us());
        } else {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        attempt += 1;
    }
    let quota_used = admitted.len() as u64;
    for i in 0..300 {
        if mesh.handles[i % 3].try_admit_strict(STRICT, "hopper", 1) {
            admitted.push(tollgate::clock::now_us());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Timestamps are read just after each admission, so compare over half a window: the
    // check only misfires if a thread stalls for half a window between admitting and
    // reading the clock. The quota is spent in a burst, so this still checks the limit.
    let w = strict_spec().window_us() / 2;
    let most = max_in_any_window(&admitted, w) as u64;
    assert!(
        most <= STRICT_QUOTA,
        "{most} admitted within a window, over a quota of {STRICT_QUOTA}"
    );
    assert!(
        quota_used >= STRICT_QUOTA / 2,
        "only {quota_used} of {STRICT_QUOTA} admitted"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_driver() {
    let mesh = Mesh::start().await;
    eventually("every region connected and handshaken", || {
        all_connected(&mesh.handles)
    })
    .await;
    let handles = mesh.handles.clone();
    mesh.shutdown().await;
    // The handles stay usable (the limiter may still hold them) after the driver is gone.
    assert!(handles[0].try_admit_eventual(EVENTUAL, "late", 1, 10));
    assert_eq!(handles[0].count(EVENTUAL, "late"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_region_is_redialled_and_catches_up() {
    let mut mesh = Mesh::start().await;
    eventually("every region connected and handshaken", || {
        all_connected(&mesh.handles)
    })
    .await;
    for _ in 0..5 {
        assert!(mesh.handles[0].try_admit_eventual(EVENTUAL, "tenant:b", 1, 1_000_000));
    }
    eventually("all regions count the first admissions", || {
        mesh.handles
            .iter()
            .all(|h| h.count(EVENTUAL, "tenant:b") == 5)
    })
    .await;

    // ap-south (the highest slot, dialled by both others) restarts as a new incarnation on
    // the same address; the port is free again once the old endpoint is fully dropped.
    within(mesh.tasks.pop().unwrap().shutdown(Duration::from_secs(1)))
        .await
        .unwrap();
    mesh.handles.pop();
    let addr = mesh.addrs[2];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let endpoint = loop {
        match bind(mesh.dir.path(), REGIONS[2], addr) {
            Ok(endpoint) => break endpoint,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot rebind {addr}: {error}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (handle, task) = start_region(2, 2, endpoint, &mesh.addrs);
    mesh.handles.push(handle);
    mesh.tasks.push(task);

    // It decides once it has every peer's full state (not only the first to arrive).
    eventually("the restarted region caught up", || {
        mesh.handles[2].count(EVENTUAL, "tenant:b") == 5 && !mesh.handles[2].is_learning()
    })
    .await;
    for _ in 0..7 {
        assert!(mesh.handles[2].try_admit_eventual(EVENTUAL, "tenant:b", 1, 1_000_000));
    }
    eventually(
        "all regions count the restarted region's admissions",
        || {
            mesh.handles
                .iter()
                .all(|h| h.count(EVENTUAL, "tenant:b") == 12)
        },
    )
    .await;
    mesh.shutdown().await;
}
