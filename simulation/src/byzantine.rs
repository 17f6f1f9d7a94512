//! The byzantine scenario family: one gateway (eu-west) lies, the two others are honest.
//!
//! Every case runs the same workload, 3x the limit's rate on one key spread evenly over the
//! gateways (three by default, so that the honest gateways alone are offered twice the quota
//! per window and an over-admission has room to show; four and five for the larger meshes
//! of [`GATEWAY_COUNTS`]), on the default network, with one [`Strategy`] applied to
//! eu-west's outgoing messages from the start of traffic (it is honest during the cold
//! start, so every strict share is reclaimed first).
//!
//! What a row shows, worst seed unless said otherwise:
//!
//! - `max_all`: the most admissions of the key in any sliding window, everyone's (the
//!   byzantine gateway's own included: unbounded for a greedy one);
//! - `max_hon`: the same, the honest gateways' admissions only;
//! - `over_sh`: `(max_hon − quota) / share`, in units of the byzantine gateway's fair share
//!   (`share`, its strict share of the quota: 67 of 200 among three, 50 among four, 40
//!   among five), 0 when not above the quota;
//! - `falsrej%`: requests the honest gateways refused while the true usage (everyone's
//!   admissions in the last window and sub-window, the longest any admission is counted)
//!   was below the quota (below 198 of 200 for three: see [`room_below`]), as % of what the honest
//!   gateways were offered;
//! - `starved`: honest gateways that, in one of the four 10 s windows of traffic, were
//!   offered at least their share and admitted less than half of it (the quantitative
//!   "stopped admitting": a trickle of admissions is not service);
//! - `links`: whether the honest gateways' link to each other was up at the end, every seed;
//! - `actors`: the most actors interned in an honest gateway's usage table at the end.
//!
//! The property the bounds state: a misbehaving gateway can make the honest ones admit at
//! most its own share beyond the quota (`over_sh ≤ 1`), and cannot make an honest gateway
//! crash (a panic fails the run), stall (a livelock is an error, the honest link stays up)
//! or stop admitting (`starved = 0`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::adversary::{Byzantine, Strategy, share_of};
use crate::metrics::max_in_window;
use crate::net::{N_REGIONS, gateway_name};
use crate::runner::{Mode, Violation};
use crate::scenario::{
    Kind, LIMIT, LIMIT_RATE, Request, SUB_WINDOWS, Scenario, TRAFFIC_START_US, TRAFFIC_US,
    WINDOW_US, Workload, default_skew,
};
use crate::world::{self, Admission, GlobalMode, SimError};

/// The byzantine region (eu-west: in the middle, it relays between the two others).
pub const BYZANTINE_REGION: usize = 1;

/// When the byzantine gateway starts lying (virtual time): the start of traffic.
pub const ATTACK_START_US: u64 = TRAFFIC_START_US;

/// The offered load, in multiples of the limit's rate.
pub const LOAD: f64 = 3.0;

/// The scenario name every case's [`Scenario`] carries.
pub const SCENARIO_NAME: &str = "byzantine";

/// The mesh sizes the family runs: the three regions of the main tables, the shipped
/// deployment's four gateways (two in us-east), and five. Strict mode's bound depends on
/// the count (see `tollgate::crdt::bounded`, "Peer input"): the larger meshes run its rows.
pub const GATEWAY_COUNTS: [usize; 3] = [3, 4, 5];

/// The byzantine gateway's fair share among `n`: its strict share of the quota (the first
/// `quota mod n` slots get one more).
pub fn fair_share(n: usize) -> u64 {
    share_of(n, BYZANTINE_REGION)
}

/// The workload, network and clocks every case of `n` gateways shares.
pub fn scenario(n: usize) -> Scenario {
    Scenario {
        name: SCENARIO_NAME,
        about: "3x the limit's rate on one key spread over the gateways; eu-west lies",
        kind: Kind::Steady,
        workload: Workload::Spread {
            rate: LOAD * LIMIT_RATE,
            regions: (0..n).collect(),
        },
        net: crate::net::geographic(),
        skew_us: default_skew(n),
        actions: Vec::new(),
        local_reserve: 0,
    }
}

/// One row of the family: a strategy in one global mode among some gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// What the byzantine gateway does.
    pub strategy: Strategy,
    /// The global mode the key runs in.
    pub mode: GlobalMode,
    /// How many gateways (one of them byzantine).
    pub gateways: usize,
    /// The eventual policy's local reserve, in thousandths of the quota (0 in
    /// [`cases`]; `--local-reserve-permille` sets it for a run).
    pub local_reserve: u16,
}

impl Case {
    /// The row name.
    pub fn name(&self) -> &'static str {
        self.strategy.name()
    }

    /// The mode column, as in the main table.
    pub fn mode_name(&self) -> &'static str {
        runner_mode(self.mode).name()
    }
}

fn runner_mode(mode: GlobalMode) -> Mode {
    match mode {
        GlobalMode::Eventual => Mode::Eventual,
        GlobalMode::Strict => Mode::Strict,
        GlobalMode::Both => Mode::Both,
    }
}

/// Every case, in table order: every strategy among three gateways, then the strict ones
/// among four and five.
pub fn cases() -> Vec<Case> {
    GATEWAY_COUNTS
        .iter()
        .flat_map(|&gateways| {
            Strategy::ALL.iter().flat_map(move |&strategy| {
                strategy
                    .modes()
                    .iter()
                    .filter(move |&&mode| gateways == N_REGIONS || mode == GlobalMode::Strict)
                    .map(move |&mode| Case {
                        strategy,
                        mode,
                        gateways,
                        local_reserve: 0,
                    })
            })
        })
        .collect()
}

/// The cases of the strategy called `name` (one per mode and mesh size it applies to).
pub fn by_name(name: &str) -> Vec<Case> {
    cases().into_iter().filter(|c| c.name() == name).collect()
}

/// The case of `strategy` in `mode` among `gateways`.
pub fn case(strategy: Strategy, mode: GlobalMode, gateways: usize) -> Case {
    Case {
        strategy,
        mode,
        gateways,
        local_reserve: 0,
    }
}

/// One seed of one case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseSeed {
    /// The seed.
    pub seed: u64,
    /// Requests offered, every region.
    pub offered: u64,
    /// Requests admitted, every region.
    pub admitted: u64,
    /// Requests admitted by the honest gateways.
    pub honest_admitted: u64,
    /// Most admissions of one key in any window, everyone's.
    pub max_all: u64,
    /// Most admissions of one key in any window, the honest gateways' only.
    pub max_honest: u64,
    /// `(max_honest − quota) / share`, 0 when not above the quota.
    pub over_shares: f64,
    /// Honest refusals with room under the quota, % of the honest gateways' offered.
    pub false_reject_pct: f64,
    /// Honest regions that, in some window of traffic, were offered at least their share
    /// and admitted less than half of it.
    pub starved: Vec<usize>,
    /// Whether every honest gateway's link to every other honest one was up at the end.
    pub honest_links_up: bool,
    /// Most actors interned in an honest gateway's usage table at the end.
    pub honest_actors: usize,
}

fn honest(region: usize) -> bool {
    region != BYZANTINE_REGION
}

/// Runs `case` on `seed`.
pub fn run_seed(case: Case, seed: u64) -> Result<CaseSeed, SimError> {
    let n = case.gateways;
    let scenario = Scenario {
        local_reserve: case.local_reserve,
        ..scenario(n)
    };
    let requests = scenario.requests(seed);
    let adversary = Box::new(Byzantine::new(case.strategy, ATTACK_START_US));
    let run = world::run_with(
        &scenario,
        case.mode,
        seed,
        &requests,
        Some((BYZANTINE_REGION, adversary)),
    )?;
    let honest_adm: Vec<Admission> = run
        .admissions
        .iter()
        .copied()
        .filter(|a| honest(a.region))
        .collect();
    let max_all = max_in_window(&run.admissions, WINDOW_US);
    let max_honest = max_in_window(&honest_adm, WINDOW_US);
    let honest_offered = requests.iter().filter(|r| honest(r.region)).count() as u64;
    let false_rejects = false_rejections(n, &run.admissions, &run.refusals);
    let honest_links_up = (0..n).filter(|r| honest(*r)).all(|r| {
        (0..n)
            .filter(|p| *p != r && honest(*p))
            .all(|p| run.links_up_at_end.contains(&(r, p)))
    });
    let honest_actors = (0..n)
        .filter(|r| honest(*r))
        .map(|r| run.actors_at_end[r])
        .max()
        .unwrap_or(0);
    Ok(CaseSeed {
        seed,
        offered: requests.len() as u64,
        admitted: run.admissions.len() as u64,
        honest_admitted: honest_adm.len() as u64,
        max_all,
        max_honest,
        over_shares: max_honest.saturating_sub(LIMIT) as f64 / fair_share(n) as f64,
        false_reject_pct: if honest_offered == 0 {
            0.0
        } else {
            false_rejects as f64 * 100.0 / honest_offered as f64
        },
        starved: starved(n, &requests, &honest_adm),
        honest_links_up,
        honest_actors,
    })
}

/// The true usage below which an honest refusal is false among `n` gateways: the highest
/// count the eventual rule can reach, `quota − (n − 1)` (once the headroom is below `n` no
/// actor can take a whole unit, see `tollgate::crdt::eventual`). Without that slack every
/// refusal of a saturated key sitting at 198 or 199 of 200 would count as false.
pub fn room_below(n: usize) -> u64 {
    LIMIT - (n as u64 - 1)
}

/// Honest refusals of a request that fitted: fewer than [`room_below`] admissions of its key
/// (every region's) in the window and sub-window before it (the longest any admission is
/// counted).
fn false_rejections(n: usize, admissions: &[Admission], refusals: &[Admission]) -> u64 {
    let mut by_key: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for a in admissions {
        by_key.entry(a.key).or_default().push(a.at_us);
    }
    for times in by_key.values_mut() {
        times.sort_unstable();
    }
    let counted_for = WINDOW_US + WINDOW_US / u64::from(SUB_WINDOWS);
    refusals
        .iter()
        .filter(|r| honest(r.region))
        .filter(|r| {
            let times = by_key.get(&r.key).map_or(&[][..], Vec::as_slice);
            let lo = times.partition_point(|&t| t.saturating_add(counted_for) <= r.at_us);
            let hi = times.partition_point(|&t| t <= r.at_us);
            ((hi - lo) as u64) < room_below(n)
        })
        .count() as u64
}

/// Honest regions with a 10 s window of traffic in which they were offered at least their
/// share of the quota and admitted less than half of it.
fn starved(n: usize, requests: &[Request], honest_adm: &[Admission]) -> Vec<usize> {
    let windows = usize::try_from(TRAFFIC_US / WINDOW_US).unwrap_or(1).max(1);
    let window_of = |t: u64| {
        usize::try_from(t.saturating_sub(TRAFFIC_START_US) / WINDOW_US)
            .unwrap_or(usize::MAX)
            .min(windows - 1)
    };
    let mut offered = vec![vec![0u64; n]; windows];
    let mut admitted = vec![vec![0u64; n]; windows];
    for r in requests {
        offered[window_of(r.at_us)][r.region] += 1;
    }
    for a in honest_adm {
        admitted[window_of(a.at_us)][a.region] += 1;
    }
    (0..n)
        .filter(|r| honest(*r))
        .filter(|&r| {
            let share = share_of(n, r);
            (0..windows).any(|w| offered[w][r] >= share && 2 * admitted[w][r] < share)
        })
        .collect()
}

/// The bounds `r` violates.
pub fn check(case: Case, r: &CaseSeed) -> Vec<Violation> {
    let mut v = Vec::new();
    let mut push = |what: String| {
        v.push(Violation {
            scenario: case.name(),
            mode: runner_mode(case.mode),
            seed: r.seed,
            what: format!("among {} gateways: {what}", case.gateways),
        })
    };
    if r.over_shares > 1.0 {
        push(format!(
            "the honest gateways admitted {} in one window, {:.2} byzantine shares ({}) beyond \
             the quota {LIMIT}; at most 1",
            r.max_honest,
            r.over_shares,
            fair_share(case.gateways)
        ));
    }
    if !r.starved.is_empty() {
        let names: Vec<String> = r.starved.iter().map(|&i| gateway_name(i)).collect();
        push(format!(
            "honest gateway(s) {} admitted less than half their share in a window while \
             offered at least their share (honest false rejections {:.2}%)",
            names.join(", "),
            r.false_reject_pct
        ));
    }
    if !r.honest_links_up {
        push("the honest gateways' link to each other is down at the end".to_owned());
    }
    v
}

/// An aggregated row over seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The case.
    pub case: Case,
    /// Seeds aggregated.
    pub seeds: u64,
    /// Mean offered per seed.
    pub offered: f64,
    /// Mean admitted per seed, every region.
    pub admitted: f64,
    /// Mean admitted per seed by the honest gateways.
    pub honest_admitted: f64,
    /// Worst seed's most admissions in one window, everyone's.
    pub max_all: u64,
    /// Worst seed's most admissions in one window, the honest gateways'.
    pub max_honest: u64,
    /// Worst seed's over-admission in byzantine shares.
    pub over_shares: f64,
    /// Worst seed's honest false rejections, %.
    pub false_reject_pct: f64,
    /// Worst seed's number of starved honest gateways.
    pub starved: usize,
    /// Whether the honest link was up at the end on every seed.
    pub honest_links_up: bool,
    /// Worst seed's most actors in an honest usage table.
    pub honest_actors: usize,
}

/// Aggregates one case over its seeds.
pub fn aggregate(case: Case, results: &[CaseSeed]) -> Row {
    let n = results.len().max(1) as f64;
    let mean = |f: &dyn Fn(&CaseSeed) -> u64| results.iter().map(|r| f(r) as f64).sum::<f64>() / n;
    let worst_f = |f: &dyn Fn(&CaseSeed) -> f64| results.iter().map(f).fold(0.0, f64::max);
    Row {
        case,
        seeds: results.len() as u64,
        offered: mean(&|r| r.offered),
        admitted: mean(&|r| r.admitted),
        honest_admitted: mean(&|r| r.honest_admitted),
        max_all: results.iter().map(|r| r.max_all).max().unwrap_or(0),
        max_honest: results.iter().map(|r| r.max_honest).max().unwrap_or(0),
        over_shares: worst_f(&|r| r.over_shares),
        false_reject_pct: worst_f(&|r| r.false_reject_pct),
        starved: results.iter().map(|r| r.starved.len()).max().unwrap_or(0),
        honest_links_up: results.iter().all(|r| r.honest_links_up),
        honest_actors: results.iter().map(|r| r.honest_actors).max().unwrap_or(0),
    }
}

/// What a run of the family produced.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Rows in table order.
    pub rows: Vec<Row>,
    /// Every violated bound, in table order.
    pub violations: Vec<Violation>,
}

/// Runs `cases` over `seeds` seeds from `seed_start`.
pub fn run(cases: &[Case], seed_start: u64, seeds: u64) -> Result<Report, SimError> {
    let mut report = Report::default();
    for &case in cases {
        let mut results = Vec::new();
        for seed in seed_start..seed_start.saturating_add(seeds) {
            let r = run_seed(case, seed)?;
            report.violations.extend(check(case, &r));
            results.push(r);
        }
        report.rows.push(aggregate(case, &results));
    }
    Ok(report)
}

/// The CSV header of the family's table.
pub const CSV_HEADER: &str = "scenario,mode,gateways,seeds,quota,share,offered,admitted,honest_admitted,\
max_all,max_honest,over_shares,false_reject_pct,starved,honest_links_up,honest_actors";

/// The family's rows as CSV.
pub fn csv(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(CSV_HEADER);
    s.push('\n');
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{LIMIT},{},{:.1},{:.1},{:.1},{},{},{:.2},{:.2},{},{},{}",
            r.case.name(),
            r.case.mode_name(),
            r.case.gateways,
            r.seeds,
            fair_share(r.case.gateways),
            r.offered,
            r.admitted,
            r.honest_admitted,
            r.max_all,
            r.max_honest,
            r.over_shares,
            r.false_reject_pct,
            r.starved,
            r.honest_links_up,
            r.honest_actors,
        );
    }
    s
}

/// The family's human table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:<8} {:>2} {:>5} {:>5} {:>5} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} \
         {:>5} {:>6}",
        "scenario",
        "mode",
        "gw",
        "seeds",
        "quota",
        "share",
        "offered",
        "admitted",
        "honest",
        "max_all",
        "max_hon",
        "over_sh",
        "falsrej%",
        "starved",
        "links",
        "actors"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<24} {:<8} {:>2} {:>5} {:>5} {:>5} {:>7.1} {:>8.1} {:>7.1} {:>7} {:>7} {:>7.2} \
             {:>8.2} {:>7} {:>5} {:>6}",
            r.case.name(),
            r.case.mode_name(),
            r.case.gateways,
            r.seeds,
            LIMIT,
            fair_share(r.case.gateways),
            r.offered,
            r.admitted,
            r.honest_admitted,
            r.max_all,
            r.max_honest,
            r.over_shares,
            r.false_reject_pct,
            r.starved,
            if r.honest_links_up { "up" } else { "DOWN" },
            r.honest_actors,
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(at_us: u64, region: usize) -> Admission {
        Admission {
            at_us,
            region,
            key: 0,
        }
    }

    #[test]
    fn the_share_is_eu_west_s_strict_share() {
        // 200 over 3: 67/67/66, eu-west is the second slot; over 4: 50 each; over 5: 40.
        assert_eq!(fair_share(3), 67);
        assert_eq!(fair_share(4), 50);
        assert_eq!(fair_share(5), 40);
    }

    #[test]
    fn a_refusal_is_false_only_with_room_under_the_quota() {
        let full: Vec<Admission> = (0..room_below(3)).map(|i| adm(i, 1)).collect();
        // Right after the quota was used (as far as the eventual rule can): a true refusal.
        assert_eq!(false_rejections(3, &full, &[adm(LIMIT, 0)]), 0);
        assert_eq!(false_rejections(3, &full[1..], &[adm(LIMIT, 0)]), 1);
        // A window and a sub-window later it all expired: a false one.
        let later = LIMIT + WINDOW_US + WINDOW_US / u64::from(SUB_WINDOWS);
        assert_eq!(false_rejections(3, &full, &[adm(later, 0)]), 1);
        // The byzantine gateway's own refusals are not counted.
        assert_eq!(false_rejections(3, &[], &[adm(5, BYZANTINE_REGION)]), 0);
    }

    #[test]
    fn a_region_offered_its_share_and_admitting_under_half_of_it_starved() {
        let t = |w: u64| TRAFFIC_START_US + w * WINDOW_US + 1;
        let requests: Vec<_> = (0..4)
            .flat_map(|w| {
                (0..100).flat_map(move |_| {
                    [0, 2].map(|region| Request {
                        at_us: t(w),
                        region,
                        key: 0,
                    })
                })
            })
            .collect();
        // us-east's share is 67 and ap-south's 66: 34 and 33 are at least half.
        let served = |n: u64| -> Vec<Admission> {
            (0..4)
                .flat_map(|w| (0..n).flat_map(move |_| [adm(t(w), 0), adm(t(w), 2)]))
                .collect()
        };
        assert!(starved(3, &requests, &served(34)).is_empty());
        assert_eq!(starved(3, &requests, &served(33)), vec![0]);
        assert_eq!(starved(3, &requests, &served(32)), vec![0, 2]);
        // One bad window is enough.
        let gap: Vec<_> = served(40).into_iter().filter(|a| a.at_us != t(2)).collect();
        assert_eq!(starved(3, &requests, &gap), vec![0, 2]);
        // Offered less than its share, a gateway admitting little is not starved.
        assert!(starved(3, &requests[..60], &[]).is_empty());
    }
}
