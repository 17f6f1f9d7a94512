//! The global-limits figures: memory per active key, gossip bytes per changed key per peer
//! (frames and real UDP bytes), gossip CPU at 10,000 changed keys per second, and the time to
//! converge after a partition heals, over real QUIC on loopback.
//!
//! ```text
//! cargo run --release --example gossip_figures
//! ```
//!
//! Three gossip machines run in this process, each with its own QUIC endpoint. A UDP relay
//! sits in front of the third one; cutting the relay is the partition, and its byte counts are
//! what crossed the "wire" (QUIC and TLS overhead included).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tollgate::crdt::bounded::StrictPolicy;
use tollgate::crdt::{Actor, BoundedTable, EventualPolicy, PolicyId, Slot, UsageTable, WindowSpec};
use tollgate::gossip::driver::{self, DriverTask, GossipHandle, PeerAddress};
use tollgate::gossip::proto::{Gossip, GossipConfig, LinkState, PeerId, PeerStatus, Policies};
use tollgate::gossip::quic::GossipEndpoint;
use tollgate::gossip::tls::PeerTls;

/// Counts live heap bytes, for the memory figure.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
const POLICY: PolicyId = 1;
const STRICT: PolicyId = 2;
const SEC: u64 = 1_000_000;
const KEYS_PER_SECOND: usize = 10_000;
const LOAD_SECONDS: u64 = 10;

fn spec() -> WindowSpec {
    WindowSpec::new(60 * SEC, 10).expect("60 s is a multiple of 10")
}

fn memory_per_key(keys: usize) {
    let now = tollgate::clock::now_us();
    let actors: Vec<Actor> = REGIONS.iter().map(|r| Actor::new(*r, "a", 1)).collect();
    // The other regions' deltas, built first so they are not counted.
    let mut deltas = Vec::new();
    for actor in &actors[1..] {
        let mut table = UsageTable::new([(POLICY, spec())]);
        let me = table.intern(actor).expect("fresh table");
        for k in 0..keys {
            table
                .record(me, POLICY, &format!("key:client-{k}"), now, 1)
                .expect("within limits");
        }
        deltas.extend(table.deltas_since(0, 4096, now));
    }
    let before = LIVE.load(Ordering::Relaxed);
    let mut table = UsageTable::new([(POLICY, spec())]);
    let me = table.intern(&actors[0]).expect("fresh table");
    for k in 0..keys {
        table
            .record(me, POLICY, &format!("key:client-{k}"), now, 1)
            .expect("within limits");
    }
    for delta in &deltas {
        table.merge_delta(delta, now);
    }
    let eventual = LIVE.load(Ordering::Relaxed) - before;
    drop(deltas);

    let before = LIVE.load(Ordering::Relaxed);
    let slots: Vec<Slot> = REGIONS.iter().map(|r| Slot::new(*r, "a")).collect();
    let policy = StrictPolicy {
        quota: 100,
        spec: spec(),
    };
    let mut strict =
        BoundedTable::new(slots.clone(), &actors[0], [(STRICT, policy)], now).expect("valid");
    // Reclaim the share as in production: the peers hand over once the wait is over.
    let later = now + spec().window_us() + spec().sub_len_us();
    for actor in &actors[1..] {
        let mut peer =
            BoundedTable::new(slots.clone(), actor, [(STRICT, policy)], now).expect("valid");
        peer.tick(later);
        for handover in peer.on_announce(&strict.announce(), later, 1024) {
            strict.on_handover(&handover, later);
        }
    }
    strict.tick(later);
    assert!(
        strict.is_reclaimed(),
        "the share is reclaimed after the handovers"
    );
    let now = later;
    for k in 0..keys {
        let _ = strict.try_admit(STRICT, &format!("key:client-{k}"), now, 1);
    }
    let strict_bytes = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "memory per active key ({keys} keys, 3 regions, 17-byte keys): eventual {} B (all three \
         regions' usage of the key), strict {} B",
        eventual / keys,
        strict_bytes / keys
    );
    drop(table);
    drop(strict);
}

/// A UDP relay in front of one endpoint: counts bytes each way and can drop everything.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    to_target: Arc<AtomicU64>,
    from_target: Arc<AtomicU64>,
}

async fn relay(target: SocketAddr) -> Relay {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
    let addr = front.local_addr().expect("bound");
    let cut = Arc::new(AtomicBool::new(false));
    let to_target = Arc::new(AtomicU64::new(0));
    let from_target = Arc::new(AtomicU64::new(0));
    let (c, tt, ft) = (cut.clone(), to_target.clone(), from_target.clone());
    tokio::spawn(async move {
        let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, client)) = front.recv_from(&mut buf).await else {
                return;
            };
            if c.load(Ordering::Relaxed) {
                continue;
            }
            let back = match backs.get(&client) {
                Some(back) => back.clone(),
                None => {
                    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
                    back.connect(target).await.expect("connect");
                    let (front, back2, c, ft) =
                        (front.clone(), back.clone(), c.clone(), ft.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok(n) = back2.recv(&mut buf).await {
                            if !c.load(Ordering::Relaxed) {
                                ft.fetch_add(n as u64, Ordering::Relaxed);
                                let _ = front.send_to(&buf[..n], client).await;
                            }
                        }
                    });
                    backs.insert(client, back.clone());
                    back
                }
            };
            tt.fetch_add(n as u64, Ordering::Relaxed);
            let _ = back.send(&buf[..n]).await;
        }
    });
    Relay {
        addr,
        cut,
        to_target,
        from_target,
    }
}

fn tls(dir: &Path, region: &str) -> PeerTls {
    PeerTls::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{region}.a.pem")),
        &dir.join(format!("{region}.a.key")),
    )
    .expect("generated certificates")
}

/// Process CPU seconds (user + system) from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the name: state(0) ppid(1) ... utime(11) stime(12), in clock ticks (100 Hz).
    (ticks(11) + ticks(12)) / 100.0
}

async fn start(n_peers: usize, dir: &Path) -> (Vec<GossipHandle>, Vec<DriverTask>, Option<Relay>) {
    let slots: Vec<Slot> = REGIONS[..n_peers]
        .iter()
        .map(|r| Slot::new(*r, "a"))
        .collect();
    let mut endpoints = Vec::new();
    for region in &REGIONS[..n_peers] {
        let others: Vec<Slot> = REGIONS.iter().map(|r| Slot::new(*r, "a")).collect();
        endpoints.push(
            GossipEndpoint::bind(
                "127.0.0.1:0".parse().expect("addr"),
                tls(dir, region),
                others,
            )
            .expect("bind"),
        );
    }
    let mut addrs: Vec<SocketAddr> = endpoints
        .iter()
        .map(|e| e.local_addr().expect("bound"))
        .collect();
    let relay = if n_peers == 3 {
        let r = relay(addrs[2]).await;
        addrs[2] = r.addr;
        Some(r)
    } else {
        None
    };
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for (i, endpoint) in endpoints.into_iter().enumerate() {
        let now = tollgate::clock::now_us();
        let gossip = Gossip::new(
            slots[i].actor(now),
            slots.clone(),
            GossipConfig::default(),
            Policies {
                eventual: vec![(POLICY, EventualPolicy::unbounded(spec()))],
                strict: Vec::new(),
            },
            7,
            i as u64,
            now,
        )
        .expect("valid");
        let peers = (0..n_peers)
            .map(|j| PeerAddress {
                peer: PeerId(j as u16),
                addr: addrs[j].to_string(),
                region: REGIONS[j].to_owned(),
                instance: "a".to_owned(),
            })
            .collect();
        let (handle, task) = driver::spawn_driver(gossip, endpoint, peers);
        handles.push(handle);
        tasks.push(task);
    }
    (handles, tasks, relay)
}

fn all_connected(handles: &[GossipHandle]) -> bool {
    handles.iter().all(|h| {
        !h.is_learning()
            && h.peer_status()
                .iter()
                .all(|p| matches!(p.link, LinkState::Up { .. }) && p.status == PeerStatus::Ok)
    })
}

async fn wait(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} never happened"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    start.elapsed()
}

/// Admits `KEYS_PER_SECOND` distinct keys per second at `handle` for `seconds`; returns the
/// CPU seconds the process used meanwhile.
async fn load(handle: &GossipHandle, seconds: u64, first_key: usize) -> f64 {
    let cpu = cpu_seconds();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = KEYS_PER_SECOND / 100;
    let mut k = first_key;
    for _ in 0..seconds * 100 {
        tick.tick().await;
        for _ in 0..per_tick {
            handle.try_admit_eventual(POLICY, &format!("key:client-{k}"), 1, 1_000_000);
            k += 1;
        }
    }
    cpu_seconds() - cpu
}

#[tokio::main]
async fn main() {
    memory_per_key(1_000_000);

    let dir = tempfile::tempdir().expect("temp dir");
    let names: Vec<tollgate::certs::Gateway> = REGIONS
        .iter()
        .map(|r| tollgate::certs::Gateway::new(r, "a").expect("gateway name"))
        .collect();
    tollgate::certs::generate(dir.path(), &names, false).expect("certificates");
    tollgate::metrics::install();

    // The admissions alone: one machine, no peers.
    let (alone, alone_tasks, _) = start(1, dir.path()).await;
    let alone_cpu = load(&alone[0], LOAD_SECONDS, 0).await;
    for task in alone_tasks {
        let _ = task.shutdown(Duration::ZERO).await;
    }

    let (handles, _tasks, relay) = start(3, dir.path()).await;
    let relay = relay.expect("three regions have a relay");
    let took = wait("the handshakes", || all_connected(&handles)).await;
    println!("three regions connected in {} ms", took.as_millis());
    let frames_before = frame_bytes();
    let to_before = relay.to_target.load(Ordering::Relaxed);
    let gossip_cpu = load(&handles[0], LOAD_SECONDS, 0).await;
    let changed = KEYS_PER_SECOND as u64 * LOAD_SECONDS;
    let last = format!("key:client-{}", changed - 1);
    wait("the last change to arrive", || {
        handles[2].count(POLICY, &last) == 1 && handles[1].count(POLICY, &last) == 1
    })
    .await;
    let frames = frame_bytes() - frames_before;
    let wire = relay.to_target.load(Ordering::Relaxed) - to_before;
    println!(
        "{changed} keys changed at one region in {LOAD_SECONDS} s: gossip frames {:.1} B per \
         changed key per peer (every frame of all three, acks included); UDP to one peer {:.1} B \
         per changed key (QUIC and TLS included)",
        frames as f64 / (changed as f64 * 2.0),
        wire as f64 / changed as f64,
    );
    println!(
        "CPU at {KEYS_PER_SECOND} changed keys/s: {:.1}% of a core for three regions gossiping \
         (admissions alone: {:.1}%), so gossip costs {:.1}% of a core",
        gossip_cpu * 100.0 / LOAD_SECONDS as f64,
        alone_cpu * 100.0 / LOAD_SECONDS as f64,
        (gossip_cpu - alone_cpu) * 100.0 / LOAD_SECONDS as f64,
    );

    // Partition ap-south for longer than the idle timeout, change keys on both sides, heal.
    relay.cut.store(true, Ordering::Relaxed);
    let cut_for = Duration::from_secs(8);
    let started = Instant::now();
    for k in 0..1_000 {
        handles[0].try_admit_eventual(POLICY, &format!("key:during-cut-{k}"), 1, 1_000_000);
        handles[2].try_admit_eventual(POLICY, &format!("key:during-cut-ap-{k}"), 1, 1_000_000);
    }
    wait("the cut to drop the connection", || {
        !matches!(handles[0].peer_status()[1].link, LinkState::Up { .. })
    })
    .await;
    while started.elapsed() < cut_for {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.cut.store(false, Ordering::Relaxed);
    let healed = wait("convergence after the heal", || {
        handles[2].count(POLICY, "key:during-cut-999") == 1
            && handles[0].count(POLICY, "key:during-cut-ap-999") == 1
            && handles[1].count(POLICY, "key:during-cut-ap-999") == 1
    })
    .await;
    println!(
        "partition of {} s healed: converged {} ms after the heal (reconnect backoff, capped at \
         5 s, included; {} B came back from ap-south through the relay in all)",
        cut_for.as_secs(),
        healed.as_millis(),
        relay.from_target.load(Ordering::Relaxed)
    );
}

fn frame_bytes() -> u64 {
    let text = tollgate::metrics::render();
    text.lines()
        .find(|l| l.starts_with(tollgate::metrics::GOSSIP_SENT_BYTES_TOTAL))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}
