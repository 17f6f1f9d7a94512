//! Scenarios: a workload, a network, clock offsets and a schedule of faults.
//!
//! Every scenario uses the same policies (the demo's premium tier, 200 requests per 10 s,
//! as a global policy) and the same timeline: all regions start at virtual time 0, traffic
//! starts at [`TRAFFIC_START_US`] and runs for [`TRAFFIC_US`]. The quiet start is deliberate:
//! a strict-mode cold start serves nothing of its own share until a window and a sub-window
//! have passed and every peer handed over (see `tollgate::crdt::bounded`), so the measured
//! phase starts after it. A restart *during* traffic is counted honestly.

use tollgate::crdt::bounded::StrictPolicy;
use tollgate::crdt::{EventualPolicy, WindowSpec};
use tollgate::crdt::{PolicyId, window::WindowError};
use tollgate::gossip::proto::{Policies, SplitMix64};

use crate::net::{MAX_GATEWAYS, MS, N_REGIONS, NetParams, SEC, unit};

/// The limit `q` of every policy (the demo's premium tier: `rate = "200/10s"`).
pub const LIMIT: u64 = 200;
/// The window `w` of every policy.
pub const WINDOW_US: u64 = 10 * SEC;
/// Sub-windows per window (the production default).
pub const SUB_WINDOWS: u32 = 10;
/// The eventual-mode policy id.
pub const EVENTUAL: PolicyId = 1;
/// The strict-mode policy id.
pub const STRICT: PolicyId = 2;
/// The limit's own rate, requests per second (`q / w`).
pub const LIMIT_RATE: f64 = LIMIT as f64 / (WINDOW_US as f64 / SEC as f64);

/// When traffic starts: a window and a sub-window (the strict reclaim wait) plus 2 s for
/// the handshakes and handovers.
pub const TRAFFIC_START_US: u64 = WINDOW_US + WINDOW_US / SUB_WINDOWS as u64 + 2 * SEC;
/// How long traffic runs.
pub const TRAFFIC_US: u64 = 40 * SEC;
/// The end of a run.
pub const END_US: u64 = TRAFFIC_START_US + TRAFFIC_US;

/// The policies' window.
pub fn window() -> Result<WindowSpec, WindowError> {
    WindowSpec::new(WINDOW_US, SUB_WINDOWS)
}

/// The policies every region runs: one eventual and one strict policy, same limit and window.
pub fn policies() -> Result<Policies, WindowError> {
    policies_with_reserve(0)
}

/// [`policies`], the eventual one with a local reserve of `local_reserve` thousandths.
pub fn policies_with_reserve(local_reserve: u16) -> Result<Policies, WindowError> {
    let spec = window()?;
    let eventual = EventualPolicy {
        reserve_permille: local_reserve,
        ..EventualPolicy::new(LIMIT, spec)
    };
    Ok(Policies {
        eventual: vec![(EVENTUAL, eventual)],
        strict: vec![(STRICT, StrictPolicy { quota: LIMIT, spec })],
    })
}

/// What kind of scenario, for the bounds that apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Steady client traffic on a healthy network.
    Steady,
    /// The region-hopping attacker.
    Attacker,
    /// Bursts over a background.
    Burst,
    /// A partition and its heal.
    Partition(PartitionKind),
    /// A region crash and restart.
    Restart,
    /// A degraded network or clocks (loss, duplication, reordering, skew).
    Degraded,
}

/// The shape of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionKind {
    /// Every region alone.
    Full,
    /// One region cut off from the two others.
    OneRegion,
    /// One direction of some links cut.
    Asymmetric,
}

/// A scheduled fault or repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Cuts every link both ways.
    CutAll,
    /// Cuts one region from every other, both ways.
    Isolate(usize),
    /// Cuts the directed link `from → to`.
    CutOneWay {
        /// The sender whose messages are dropped.
        from: usize,
        /// The receiver that no longer hears it.
        to: usize,
    },
    /// Restores every link.
    Heal,
    /// The region's process dies (its state is lost).
    Crash(usize),
    /// The region comes back as a new incarnation with fresh state.
    Restart(usize),
}

/// Who sends what.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// One key, Poisson arrivals at `rate` req/s in total, spread evenly over `regions`.
    Spread {
        /// Total requests per second.
        rate: f64,
        /// The regions clients are in.
        regions: Vec<usize>,
    },
    /// `keys` keys with a Zipf(`exponent`) popularity, Poisson arrivals at `rate` req/s in
    /// total, spread evenly over the regions.
    Zipf {
        /// Total requests per second.
        rate: f64,
        /// Number of keys.
        keys: u32,
        /// The Zipf exponent.
        exponent: f64,
    },
    /// One key sent from one region at a time at `rate` req/s (evenly spaced), hopping to
    /// another region every `hop_us`: the double-allowance attack.
    Hop {
        /// Requests per second from the current region.
        rate: f64,
        /// How long the attacker stays in one region.
        hop_us: u64,
    },
    /// One key: a Poisson background spread over the regions, plus every `every_us` a burst
    /// of `size` requests within `spread_us` from one random region.
    Burst {
        /// Background requests per second in total.
        background: f64,
        /// Requests per burst.
        size: u32,
        /// Time between bursts.
        every_us: u64,
        /// How long one burst lasts.
        spread_us: u64,
    },
}

/// One offered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Virtual time.
    pub at_us: u64,
    /// The region the client is in.
    pub region: usize,
    /// The key (index into [`key_name`]).
    pub key: u32,
}

/// The client key string of key index `k`.
pub fn key_name(k: u32) -> String {
    format!("client-{k}")
}

/// A complete scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Its name (`steady-*`, `partition-*`, ...).
    pub name: &'static str,
    /// One line on what it is.
    pub about: &'static str,
    /// Which bounds apply.
    pub kind: Kind,
    /// The clients.
    pub workload: Workload,
    /// The network.
    pub net: NetParams,
    /// Per-gateway clock offset: a gateway's clock reads virtual time plus this. Its length
    /// is the number of gateways (see [`Scenario::gateways`]).
    pub skew_us: Vec<i64>,
    /// Faults and repairs, in time order.
    pub actions: Vec<(u64, Action)>,
    /// The eventual policy's local reserve, in thousandths of the quota (see
    /// `tollgate::crdt::eventual`, "The local reserve"): 0, the default, unless a run asks
    /// for one (`--local-reserve-permille`).
    pub local_reserve: u16,
}

/// Small clock offsets every scenario has unless it says otherwise: what NTP keeps regions
/// within (a few milliseconds), per gateway of [`crate::net::GATEWAYS`].
pub const DEFAULT_SKEW_US: [i64; MAX_GATEWAYS] = [0, 1_000, -2_000, 1_500, -500];

/// The default clock offsets of a world of `n` gateways (at most [`MAX_GATEWAYS`]).
pub fn default_skew(n: usize) -> Vec<i64> {
    DEFAULT_SKEW_US[..n.min(MAX_GATEWAYS)].to_vec()
}

/// When partitions start and heal, and when a region crashes and restarts.
const FAULT_AT_US: u64 = TRAFFIC_START_US + 10 * SEC;
const HEAL_AT_US: u64 = TRAFFIC_START_US + 25 * SEC;
const RESTART_AT_US: u64 = FAULT_AT_US + 2 * SEC;

fn steady(name: &'static str, about: &'static str, workload: Workload, kind: Kind) -> Scenario {
    Scenario {
        name,
        about,
        kind,
        workload,
        net: crate::net::geographic(),
        skew_us: default_skew(N_REGIONS),
        actions: Vec::new(),
        local_reserve: 0,
    }
}

fn spread(factor: f64, regions: &[usize]) -> Workload {
    Workload::Spread {
        rate: factor * LIMIT_RATE,
        regions: regions.to_vec(),
    }
}

const ALL: [usize; N_REGIONS] = [0, 1, 2];

/// Every scenario of the default run, in table order.
pub fn all() -> Vec<Scenario> {
    let hop = |rate| Workload::Hop { rate, hop_us: SEC };
    let partition = |name, about, kind, actions: Vec<(u64, Action)>| Scenario {
        actions,
        ..steady(name, about, spread(1.5, &ALL), Kind::Partition(kind))
    };
    vec![
        steady(
            "steady-even-0.8x",
            "one key, 0.8x the limit's rate spread evenly over 3 regions",
            spread(0.8, &ALL),
            Kind::Steady,
        ),
        steady(
            "steady-even-1.5x",
            "one key, 1.5x the limit's rate spread evenly over 3 regions",
            spread(1.5, &ALL),
            Kind::Steady,
        ),
        steady(
            "steady-one-region",
            "one key, 1.5x the limit's rate, all from eu-west",
            spread(1.5, &[1]),
            Kind::Steady,
        ),
        steady(
            "steady-zipf-1000keys",
            "1000 keys, Zipf(1.1) popularity, 300 req/s spread over 3 regions",
            Workload::Zipf {
                rate: 300.0,
                keys: 1000,
                exponent: 1.1,
            },
            Kind::Steady,
        ),
        steady(
            "burst-150",
            "one key, 0.5x background plus a 150-request burst in 200 ms every 5 s",
            Workload::Burst {
                background: 0.5 * LIMIT_RATE,
                size: 150,
                every_us: 5 * SEC,
                spread_us: 200 * MS,
            },
            Kind::Burst,
        ),
        steady(
            "attacker-hop-40rps",
            "one key from one region at a time, 40 req/s (2x the limit's rate), hops every 1 s",
            hop(2.0 * LIMIT_RATE),
            Kind::Attacker,
        ),
        steady(
            "attacker-hop-200rps",
            "one key from one region at a time, 200 req/s, hops every 1 s",
            hop(200.0),
            Kind::Attacker,
        ),
        steady(
            "attacker-hop-2000rps",
            "one key from one region at a time, 2000 req/s, hops every 1 s",
            hop(2000.0),
            Kind::Attacker,
        ),
        partition(
            "partition-full",
            "1.5x spread; every link cut for 15 s, then healed",
            PartitionKind::Full,
            vec![(FAULT_AT_US, Action::CutAll), (HEAL_AT_US, Action::Heal)],
        ),
        partition(
            "partition-ap-south-cut",
            "1.5x spread; ap-south cut off for 15 s, then healed",
            PartitionKind::OneRegion,
            vec![
                (FAULT_AT_US, Action::Isolate(2)),
                (HEAL_AT_US, Action::Heal),
            ],
        ),
        partition(
            "partition-asymmetric",
            "1.5x spread; us-east's outbound links cut (it still hears others) for 15 s",
            PartitionKind::Asymmetric,
            vec![
                (FAULT_AT_US, Action::CutOneWay { from: 0, to: 1 }),
                (FAULT_AT_US, Action::CutOneWay { from: 0, to: 2 }),
                (HEAL_AT_US, Action::Heal),
            ],
        ),
        Scenario {
            actions: vec![
                (FAULT_AT_US, Action::Crash(1)),
                (RESTART_AT_US, Action::Restart(1)),
            ],
            ..steady(
                "restart-eu-west",
                "1.5x spread; eu-west crashes, restarts 2 s later as a new incarnation",
                spread(1.5, &ALL),
                Kind::Restart,
            )
        },
        Scenario {
            net: NetParams {
                loss: 0.05,
                dup: 0.05,
                reorder_us: 40 * MS,
                ..crate::net::geographic()
            },
            ..steady(
                "lossy-dup-reorder",
                "1.5x spread; 5% loss, 5% duplication, up to 40 ms extra reordering delay",
                spread(1.5, &ALL),
                Kind::Degraded,
            )
        },
        Scenario {
            skew_us: vec![0, 400_000, -300_000],
            ..steady(
                "skew-400ms",
                "1.5x spread; eu-west's clock 400 ms ahead, ap-south's 300 ms behind",
                spread(1.5, &ALL),
                Kind::Degraded,
            )
        },
    ]
}

/// The scenario called `name`.
pub fn by_name(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

/// Poisson arrival times at `rate` per second in `[start, end)`.
fn poisson(rng: &mut SplitMix64, rate: f64, start: u64, end: u64, out: &mut Vec<u64>) {
    if rate <= 0.0 {
        return;
    }
    let mut t = start as f64;
    loop {
        // 1 - unit is in (0, 1], so the logarithm is finite.
        t += -(1.0 - unit(rng)).ln() / rate * SEC as f64;
        if t >= end as f64 {
            return;
        }
        out.push(t as u64);
    }
}

impl Scenario {
    /// Number of distinct keys the workload uses.
    pub fn keys(&self) -> u32 {
        match &self.workload {
            Workload::Zipf { keys, .. } => *keys,
            _ => 1,
        }
    }

    /// Number of gateways: one per clock offset.
    pub fn gateways(&self) -> usize {
        self.skew_us.len()
    }

    /// The offered requests for `seed`, in time order (the same for every mode).
    pub fn requests(&self, seed: u64) -> Vec<Request> {
        let n = self.gateways().max(2);
        let mut rng = SplitMix64::new(seed ^ 0x5eed_0fc1_1e47);
        let (start, end) = (TRAFFIC_START_US, END_US);
        let mut out = Vec::new();
        match &self.workload {
            Workload::Spread { rate, regions } => {
                let mut times = Vec::new();
                poisson(&mut rng, *rate, start, end, &mut times);
                let spread = regions.len().max(1) as u64;
                for at_us in times {
                    let i = rng.up_to(spread - 1) as usize;
                    out.push(Request {
                        at_us,
                        region: regions.get(i).copied().unwrap_or(0),
                        key: 0,
                    });
                }
            }
            Workload::Zipf {
                rate,
                keys,
                exponent,
            } => {
                let weights: Vec<f64> = (1..=*keys)
                    .map(|k| 1.0 / f64::from(k).powf(*exponent))
                    .collect();
                let total: f64 = weights.iter().sum();
                let mut acc = 0.0;
                let cdf: Vec<f64> = weights
                    .iter()
                    .map(|w| {
                        acc += w / total;
                        acc
                    })
                    .collect();
                let mut times = Vec::new();
                poisson(&mut rng, *rate, start, end, &mut times);
                for at_us in times {
                    let u = unit(&mut rng);
                    let key = cdf.partition_point(|c| *c < u).min(cdf.len() - 1);
                    out.push(Request {
                        at_us,
                        region: rng.up_to(n as u64 - 1) as usize,
                        key: u32::try_from(key).unwrap_or(0),
                    });
                }
            }
            Workload::Hop { rate, hop_us } => {
                let step = (SEC as f64 / rate).max(1.0);
                let mut region = rng.up_to(n as u64 - 1) as usize;
                let mut hop_start = start;
                let mut t = start as f64;
                while (t as u64) < end {
                    let at_us = t as u64;
                    if at_us >= hop_start + hop_us {
                        hop_start += hop_us;
                        // Always a different region: that is the attack.
                        region = (region + 1 + rng.up_to(n as u64 - 2) as usize) % n;
                    }
                    out.push(Request {
                        at_us,
                        region,
                        key: 0,
                    });
                    t += step;
                }
            }
            Workload::Burst {
                background,
                size,
                every_us,
                spread_us,
            } => {
                let mut times = Vec::new();
                poisson(&mut rng, *background, start, end, &mut times);
                for at_us in times {
                    out.push(Request {
                        at_us,
                        region: rng.up_to(n as u64 - 1) as usize,
                        key: 0,
                    });
                }
                let mut b = start + every_us / 2;
                while b < end {
                    let region = rng.up_to(n as u64 - 1) as usize;
                    for _ in 0..*size {
                        out.push(Request {
                            at_us: b + rng.up_to(*spread_us),
                            region,
                            key: 0,
                        });
                    }
                    b += every_us;
                }
                // Stable: equal instants keep their generation order.
                out.sort_by_key(|r| r.at_us);
            }
        }
        out
    }
}
