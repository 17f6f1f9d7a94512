//! The baselines: `none`, `central`, and the exact reference false rejections are measured
//! against.
//!
//! Each store is a production [`Gossip`] with a single slot, so the decision is the
//! production eventual rule with `N = 1`, which is exact (`U + c ≤ limit`, everything settled
//! at once) and uses the same sliding-window rule as the global modes.
//!
//! - `none`: every region alone with its own store and clock (what the seeds give: up to
//!   `N × limit`). A crash loses the region's counts.
//! - `central`: one store in us-east. A request from another region reaches it after a
//!   one-way delay and its answer comes back after another: the added latency is the round
//!   trip. A request whose path is cut, or that finds the store crashed, fails (is not
//!   admitted). Requests are not subject to message loss (a request RPC is retried by its
//!   transport; only its latency would grow).
//! - reference: one store, every request decided at the instant it is offered, no faults.

use tollgate::crdt::{Actor, Slot};
use tollgate::gossip::proto::Gossip;

use crate::net::{N_REGIONS, Network, REGIONS};
use crate::scenario::{Action, EVENTUAL, LIMIT, Request, Scenario, key_name, policies};
use crate::world::{Admission, CONFIG_DIGEST, SimError, gossip_config, local_time};

/// Where the `central` store lives (us-east).
pub const CENTRAL_REGION: usize = 0;

/// One exact store: a single-slot production machine.
struct Store {
    gossip: Gossip,
}

impl Store {
    fn new(region: usize, incarnation: u64, now_us: u64) -> Result<Self, SimError> {
        let name = REGIONS[region];
        let gossip = Gossip::new(
            Actor::new(name, "i0", incarnation),
            vec![Slot::new(name, "i0")],
            gossip_config(),
            policies()?,
            CONFIG_DIGEST,
            incarnation,
            now_us,
        )?;
        Ok(Self { gossip })
    }

    fn admit(&mut self, key: &str, now_us: u64) -> bool {
        // Timers only garbage-collect here (no peers): run them when due.
        if self.gossip.poll_timeout().is_some_and(|d| d <= now_us) {
            self.gossip.handle_timeout(now_us);
        }
        self.gossip
            .try_admit_eventual(EVENTUAL, key, 1, LIMIT, now_us)
    }
}

/// The state of the scheduled faults at virtual time `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Faults {
    /// `blocked[from][to]`.
    blocked: [[bool; N_REGIONS]; N_REGIONS],
    alive: [bool; N_REGIONS],
    incarnation: [u64; N_REGIONS],
}

fn faults_at(scenario: &Scenario, t: u64) -> Faults {
    let mut f = Faults {
        blocked: [[false; N_REGIONS]; N_REGIONS],
        alive: [true; N_REGIONS],
        incarnation: [1; N_REGIONS],
    };
    for &(at, action) in &scenario.actions {
        if at > t {
            break;
        }
        match action {
            Action::CutAll => {
                for (a, row) in f.blocked.iter_mut().enumerate() {
                    for (b, cell) in row.iter_mut().enumerate() {
                        *cell = a != b;
                    }
                }
            }
            Action::Isolate(r) => {
                for b in 0..N_REGIONS {
                    if b != r {
                        f.blocked[r][b] = true;
                        f.blocked[b][r] = true;
                    }
                }
            }
            Action::CutOneWay { from, to } => f.blocked[from][to] = true,
            Action::Heal => f.blocked = [[false; N_REGIONS]; N_REGIONS],
            Action::Crash(r) => f.alive[r] = false,
            Action::Restart(r) => {
                f.alive[r] = true;
                f.incarnation[r] += 1;
            }
        }
    }
    f
}

/// The exact reference: one store, decisions at the instant offered, no faults.
pub fn reference(scenario: &Scenario, requests: &[Request]) -> Result<Vec<Admission>, SimError> {
    let keys: Vec<String> = (0..scenario.keys()).map(key_name).collect();
    let mut store = Store::new(CENTRAL_REGION, 1, local_time(0, 0))?;
    let mut out = Vec::new();
    for req in requests {
        let key = keys.get(req.key as usize).map(String::as_str).unwrap_or("");
        if store.admit(key, local_time(req.at_us, 0)) {
            out.push(Admission {
                at_us: req.at_us,
                region: req.region,
                key: req.key,
            });
        }
    }
    Ok(out)
}

/// `none`: every region alone.
pub fn none(scenario: &Scenario, requests: &[Request]) -> Result<Vec<Admission>, SimError> {
    let keys: Vec<String> = (0..scenario.keys()).map(key_name).collect();
    let mut stores = Vec::new();
    let mut incs = [1u64; N_REGIONS];
    for (r, off) in scenario.skew_us.iter().enumerate() {
        stores.push(Store::new(r, 1, local_time(0, *off))?);
    }
    let mut out = Vec::new();
    for req in requests {
        let f = faults_at(scenario, req.at_us);
        let r = req.region;
        if !f.alive[r] {
            continue;
        }
        let now = local_time(req.at_us, scenario.skew_us[r]);
        if f.incarnation[r] != incs[r] {
            // Restarted: the counts died with the process.
            incs[r] = f.incarnation[r];
            stores[r] = Store::new(r, incs[r], now)?;
        }
        let key = keys.get(req.key as usize).map(String::as_str).unwrap_or("");
        if stores[r].admit(key, now) {
            out.push(Admission {
                at_us: req.at_us,
                region: r,
                key: req.key,
            });
        }
    }
    Ok(out)
}

/// What `central` produced: admissions (at the store's decision time) and the latency it
/// added to the requests it answered.
#[derive(Debug, Clone, Default)]
pub struct CentralOutput {
    /// Admissions, at the instant the store decided.
    pub admissions: Vec<Admission>,
    /// Sum of added latency (answer time minus offer time) over answered requests.
    pub added_latency_us: u64,
    /// Requests answered.
    pub answered: u64,
}

/// `central`: one store in us-east.
pub fn central(
    scenario: &Scenario,
    seed: u64,
    requests: &[Request],
) -> Result<CentralOutput, SimError> {
    let keys: Vec<String> = (0..scenario.keys()).map(key_name).collect();
    let mut net = Network::new(scenario.net, seed ^ 0x63_656e_7472_616c);
    let c = CENTRAL_REGION;
    // (arrival at the store, offer index, reply delay)
    let mut arrivals = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        if req.region == c {
            arrivals.push((req.at_us, i, 0));
            continue;
        }
        if faults_at(scenario, req.at_us).blocked[req.region][c] {
            continue;
        }
        let there = net.delay(req.region, c);
        let back = net.delay(c, req.region);
        arrivals.push((req.at_us + there, i, back));
    }
    // Decide in arrival order (ties in offer order).
    arrivals.sort_unstable();
    let off = scenario.skew_us[c];
    let mut inc = 1;
    let mut store = Store::new(c, inc, local_time(0, off))?;
    let mut out = CentralOutput::default();
    for (at, i, back) in arrivals {
        let Some(req) = requests.get(i) else { continue };
        let f = faults_at(scenario, at);
        if !f.alive[c] || (req.region != c && f.blocked[c][req.region]) {
            continue;
        }
        let now = local_time(at, off);
        if f.incarnation[c] != inc {
            inc = f.incarnation[c];
            store = Store::new(c, inc, now)?;
        }
        out.answered += 1;
        out.added_latency_us += at - req.at_us + back;
        let key = keys.get(req.key as usize).map(String::as_str).unwrap_or("");
        if store.admit(key, now) {
            out.admissions.push(Admission {
                at_us: at,
                region: req.region,
                key: req.key,
            });
        }
    }
    Ok(out)
}
