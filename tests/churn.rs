//! Key churn through real gateways (#13): two gateway processes of the built binary gossiping
//! over QUIC with mutual TLS on loopback, and 10^5 distinct keys per global mode driven
//! through their HTTP path, one request per key, spread over both. Each mode's key table
//! (`tollgate_global_keys{mode}`) must rise during the churn and return to where it was once
//! the keys are idle, on every gateway, and the gateways' memory must not grow with the
//! keys churned.
//!
//! The gateways are child processes, so `/proc/<pid>/status` measures one gateway's memory
//! alone (the test process holds the HTTP client and the upstream). Waits poll a condition
//! under a deadline; the figures are printed for the closing note (`--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::cluster::{Cluster, Role, Setup, global_policy};
use support::prom_value;

/// Each mode's keys come in rounds, each round's keys new: 10^5 distinct keys per mode, what
/// the issue names, in two rounds so that a second round starts from tables that the first
/// left (and must have emptied).
const ROUNDS: [&str; 2] = ["first", "second"];
const KEYS_PER_ROUND: usize = 50_000;
/// Requests in flight at once, over both gateways.
const CONCURRENCY: usize = 48;
/// Both policies' window: short, so keys go idle (and a cold start reclaims) quickly. A
/// round takes about four windows.
const WINDOW_S: u64 = 2;
/// Strict shares are 2 for us-east and 1 for eu-west: a key's one request at eu-west leaves
/// it below the ask batch (one right), so it asks and us-east gives. Rights move on every key
/// eu-west serves, and each of those pairs must then be settled before the key can go.
const STRICT_QUOTA: u64 = 3;
const EVENTUAL_QUOTA: u64 = 3;
const STRICT: &str = "churn-strict";
const EVENTUAL: &str = "churn-eventual";
/// The header the policies key on: every request names a new key.
const KEY_HEADER: &str = "x-churn";
/// From the end of a round to every table back at its baseline: a window and a sub-window
/// until the last keys are idle, then settle passes (16,384 strict keys a second per
/// gateway, each pair a message to the peer) and GC runs (one a second). Measured: 3-7 s.
const RETURN_DEADLINE: Duration = Duration::from_secs(40);
/// How much above its RSS before any churn a gateway may be after all of it: generous (like
/// the Ask-flood bound of tests/hostile_peer.rs), it catches unboundedness, not a few pages
/// (measured: 25-27 MB before, 39-72 MB after, depending on the machine's load).
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// How long the RSS bounds may take to hold: the allocator returns pages on its own schedule.
const RSS_DEADLINE: Duration = Duration::from_secs(15);
/// How often the sampler reads the key gauges and RSS during a round.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

fn tables() -> String {
    let by = [format!("header:{KEY_HEADER}")];
    let by: Vec<&str> = by.iter().map(String::as_str).collect();
    let rate = |quota: u64| format!("{quota}/{WINDOW_S}s");
    global_policy(STRICT, "/strict", &by, &rate(STRICT_QUOTA), "strict")
        + &global_policy(
            EVENTUAL,
            "/eventual",
            &by,
            &rate(EVENTUAL_QUOTA),
            "eventual",
        )
}

/// One global mode's churn.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// The `mode` label of `tollgate_global_keys`.
    label: &'static str,
    path: &'static str,
}

const MODES: [Mode; 2] = [
    Mode {
        label: "strict",
        path: "/strict",
    },
    Mode {
        label: "eventual",
        path: "/eventual",
    },
];

/// One gateway over one round.
#[derive(Debug, Default, Clone, Copy)]
struct Gauges {
    keys_before: u64,
    keys_peak: u64,
    keys_after: u64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    rss_after_kib: u64,
}

impl Gauges {
    /// One sample: peaks, and the latest reading as "after" until the round is over.
    fn note(&mut self, keys: Option<u64>, rss_kib: u64) {
        if let Some(keys) = keys {
            self.keys_peak = self.keys_peak.max(keys);
            self.keys_after = keys;
        }
        self.rss_peak_kib = self.rss_peak_kib.max(rss_kib);
        self.rss_after_kib = rss_kib;
    }
}

/// The keys gateway `i` holds in `mode`'s table, from its `/metrics` (`None` if it does not
/// answer).
async fn keys_held(d: &Cluster, i: usize, mode: Mode) -> Option<u64> {
    let samples = d.metrics(i).await;
    if samples.is_empty() {
        return None;
    }
    let held = prom_value(&samples, "tollgate_global_keys", &[("mode", mode.label)]);
    Some(held as u64)
}

/// Gossip frames gateway `i` dropped because a peer's queue was full.
async fn queue_full_drops(d: &Cluster, i: usize) -> u64 {
    let samples = d.metrics(i).await;
    prom_value(
        &samples,
        "tollgate_gossip_dropped_total",
        &[("reason", "queue_full")],
    ) as u64
}

/// Answers counted by status.
#[derive(Default)]
struct Tally {
    admitted: AtomicU64,
    refused: AtomicU64,
}

/// [`KEYS_PER_ROUND`] requests on `mode`'s path, each with a key of its own, alternating
/// between the gateways, [`CONCURRENCY`] at a time. Panics on any answer but 200 or 429.
async fn drive(d: &Cluster, mode: Mode, round: &str) -> Tally {
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Tally::default());
    let urls: Arc<Vec<String>> =
        Arc::new((0..d.nodes.len()).map(|i| d.url(i, mode.path)).collect());
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (next, tally, urls, http) = (next.clone(), tally.clone(), urls.clone(), d.http.clone());
        let prefix = format!("{}-{round}", mode.label);
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= KEYS_PER_ROUND {
                    return;
                }
                let url = &urls[n % urls.len()];
                let response = http
                    .get(url)
                    .header(KEY_HEADER, format!("{prefix}-{n}"))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("GET {url}: {e}"));
                match response.status().as_u16() {
                    200 => tally.admitted.fetch_add(1, Ordering::Relaxed),
                    429 => tally.refused.fetch_add(1, Ordering::Relaxed),
                    other => panic!("GET {url}: unexpected status {other}"),
                };
                // Read the body so the connection is reused.
                let _ = response.bytes().await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::into_inner(tally).expect("every request task has finished")
}

/// One round of `mode`'s churn: drives it while sampling every gateway's key gauge and RSS,
/// then waits (still sampling) until every table is back at its baseline. Prints and returns
/// each gateway's figures.
async fn churn(d: &Cluster, mode: Mode, round: &str) -> Vec<Gauges> {
    let gateways = d.nodes.len();
    let mut before = Vec::new();
    for i in 0..gateways {
        before.push(Gauges {
            keys_before: keys_held(d, i, mode)
                .await
                .expect("gateway answers /metrics"),
            rss_before_kib: d.rss_kib(i),
            ..Gauges::default()
        });
    }
    let gauges = RefCell::new(before);
    // Never borrowed across an await: the sampler and the waits run in this one task.
    let sample = async |i: usize| {
        let keys = keys_held(d, i, mode).await;
        gauges.borrow_mut()[i].note(keys, d.rss_kib(i));
        keys
    };

    let started = Instant::now();
    let done = AtomicBool::new(false);
    let sampler = async {
        while !done.load(Ordering::Relaxed) {
            for i in 0..gateways {
                sample(i).await;
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    };
    let run = async {
        let tally = drive(d, mode, round).await;
        done.store(true, Ordering::Relaxed);
        tally
    };
    let (tally, ()) = tokio::join!(run, sampler);
    let took = started.elapsed();

    let admitted = tally.admitted.load(Ordering::Relaxed);
    let refused = tally.refused.load(Ordering::Relaxed);
    eprintln!(
        "{} {round}: {KEYS_PER_ROUND} keys in {:.1} s ({:.0} requests/s; {admitted} admitted, \
         {refused} refused)",
        mode.label,
        took.as_secs_f64(),
        KEYS_PER_ROUND as f64 / took.as_secs_f64(),
    );

    let idle_from = Instant::now();
    let held_now = || {
        let held: Vec<u64> = gauges.borrow().iter().map(|g| g.keys_after).collect();
        format!(
            "every {} table back at its baseline (held: {held:?})",
            mode.label
        )
    };
    d.until_within(RETURN_DEADLINE, &held_now, || async {
        let mut back = true;
        for i in 0..gateways {
            let held = sample(i).await;
            back &= held.is_some_and(|held| held <= gauges.borrow()[i].keys_before);
        }
        back
    })
    .await;
    eprintln!(
        "{} {round}: tables back at baseline {:.1} s after the round",
        mode.label,
        idle_from.elapsed().as_secs_f64(),
    );

    let mut gauges = gauges.into_inner();
    for (i, g) in gauges.iter_mut().enumerate() {
        g.keys_after = keys_held(d, i, mode)
            .await
            .expect("gateway answers /metrics");
        g.rss_after_kib = d.rss_kib(i);
        eprintln!(
            "  {}/{}: keys {} before, {} at peak, {} after; RSS {:.1} MB before, {:.1} at \
             peak, {:.1} after; {} gossip frames dropped on a full queue so far",
            d.nodes[i].region,
            d.nodes[i].instance,
            g.keys_before,
            g.keys_peak,
            g.keys_after,
            mib(g.rss_before_kib),
            mib(g.rss_peak_kib),
            mib(g.rss_after_kib),
            queue_full_drops(d, i).await,
        );
    }
    assert_eq!(admitted + refused, KEYS_PER_ROUND as u64);
    for (i, g) in gauges.iter().enumerate() {
        // Every gateway held many keys at once: the churn reached its table (an eventual key
        // is gossiped to both; a strict key of eu-west's moved rights from us-east), and it
        // is that state which had to go.
        assert!(
            g.keys_peak >= g.keys_before + 1_000,
            "gateway {i} held at most {} {} keys during the {round} round",
            g.keys_peak,
            mode.label
        );
    }
    gauges
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Waits until every gateway's RSS is at most `bound_kib[i]`.
async fn until_rss_within(d: &Cluster, what: &str, bound_kib: &[u64]) {
    let rss_now = || {
        let rss: Vec<u64> = (0..bound_kib.len()).map(|i| d.rss_kib(i)).collect();
        format!("{what} (RSS now {rss:?} KiB)")
    };
    d.until_within(RSS_DEADLINE, &rss_now, || async {
        bound_kib
            .iter()
            .enumerate()
            .all(|(i, bound)| d.rss_kib(i) <= *bound)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn strict_and_eventual_keys_churned_through_two_gateways_return_to_baseline() {
    let tables = tables();
    let setup = Setup {
        drain_timeout: "1s",
        tables: &tables,
    };
    let d = Cluster::start(
        &[
            ("us-east", "a", Role::Process),
            ("eu-west", "a", Role::Process),
        ],
        &setup,
    )
    .await;
    for i in 0..2 {
        d.wait_connected(i, 1).await;
        d.until(&format!("gateway {i} to reclaim its strict share"), || {
            d.reclaimed(i, STRICT, "probe")
        })
        .await;
    }
    let rss_start: Vec<u64> = (0..2).map(|i| d.rss_kib(i)).collect();

    // The behavioural check is the key count (every table back at its baseline after each
    // round, in `churn`). RSS is only bounded where a leak would show beyond the allocator's
    // noise: a round's state is 20-30 MB at peak and a second round of the same mode came
    // back 10-21 MB above the first's (the allocator keeps and reuses pages), so a
    // round-to-round bound cannot tell one leaked round from that; the bound after all four
    // rounds can (an unbounded table: 313 MB in the Ask flood before #13).
    for mode in MODES {
        for round in ROUNDS {
            churn(&d, mode, round).await;
        }
    }

    let bound: Vec<u64> = rss_start.iter().map(|r| r + RSS_BOUND_KIB).collect();
    until_rss_within(
        &d,
        &format!(
            "every gateway's RSS within {} MB of where it started ({rss_start:?} KiB)",
            RSS_BOUND_KIB / 1024
        ),
        &bound,
    )
    .await;
}
