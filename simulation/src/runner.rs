//! Runs scenarios × modes × seeds, aggregates rows and checks the bounds.

use std::fmt;

use crate::baseline;
use crate::metrics::{
    convergence_bound_us, eventual_over_bound_pct, false_reject_pct, max_in_window,
    over_admission_pct, strict_false_reject_bound_pct, window_us,
};
use crate::scenario::{Kind, LIMIT, Scenario, TRAFFIC_US};
use crate::world::{self, Admission, GlobalMode, SimError};

/// A row of the table: one way of enforcing the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Every region alone.
    None,
    /// One exact store in us-east.
    Central,
    /// Eventual mode on the production machines.
    Eventual,
    /// Strict mode on the production machines.
    Strict,
    /// An eventual and a strict policy on every request, all or nothing (not in the main
    /// table: its bounds are the strict ones, tested in `tests/sim.rs`).
    Both,
}

impl Mode {
    /// Every mode, in table order.
    pub const ALL: [Mode; 4] = [Mode::None, Mode::Central, Mode::Eventual, Mode::Strict];

    /// The name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Central => "central",
            Mode::Eventual => "eventual",
            Mode::Strict => "strict",
            Mode::Both => "both",
        }
    }
}

/// One seed of one scenario in one mode.
#[derive(Debug, Clone)]
pub struct SeedResult {
    /// The seed.
    pub seed: u64,
    /// Requests offered.
    pub offered: u64,
    /// Requests admitted.
    pub admitted: u64,
    /// Most admissions of one key in any interval of length `w`.
    pub max_in_window: u64,
    /// Over-admission, % of the limit.
    pub over_pct: f64,
    /// False rejections against the exact reference, %.
    pub false_reject_pct: f64,
    /// Worst convergence after a heal or restart (`None`: not applicable; `Some(None)`: not
    /// converged by the end of the run).
    pub convergence_us: Option<Option<u64>>,
    /// Whether the scenario heals a partition (the convergence bound applies).
    pub heals: bool,
    /// Mean added latency per answered request, µs.
    pub added_latency_us: f64,
    /// Gossip bytes per key per second of traffic.
    pub gossip_bytes_per_key: f64,
    /// Admissions, for the plot.
    pub admissions: Vec<Admission>,
}

/// An aggregated row over seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Scenario name.
    pub scenario: &'static str,
    /// Mode.
    pub mode: Mode,
    /// Seeds aggregated.
    pub seeds: u64,
    /// The limit `q`.
    pub limit: u64,
    /// Mean offered per seed.
    pub offered: f64,
    /// Mean admitted per seed.
    pub admitted: f64,
    /// Worst seed's over-admission, %.
    pub over_admission_pct: f64,
    /// Worst seed's false rejections, %.
    pub false_reject_pct: f64,
    /// Worst seed's convergence, ms (`None`: not applicable; `Some(None)`: never).
    pub convergence_ms: Option<Option<f64>>,
    /// Mean added latency, ms.
    pub added_latency_ms: f64,
    /// Mean gossip bytes per key per second.
    pub gossip_bytes_per_key: f64,
}

/// A bound that did not hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Scenario name.
    pub scenario: &'static str,
    /// Mode.
    pub mode: Mode,
    /// The seed.
    pub seed: u64,
    /// What was violated, with the numbers.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bound violated: scenario {} mode {} seed {}: {}",
            self.scenario,
            self.mode.name(),
            self.seed,
            self.what
        )
    }
}

/// Every mode's result for one seed of one scenario.
pub fn run_seed(scenario: &Scenario, seed: u64) -> Result<Vec<(Mode, SeedResult)>, SimError> {
    run_seed_in(scenario, seed, &Mode::ALL)
}

/// [`run_seed`] for the given modes ([`Mode::Both`] included).
pub fn run_seed_in(
    scenario: &Scenario,
    seed: u64,
    modes: &[Mode],
) -> Result<Vec<(Mode, SeedResult)>, SimError> {
    let requests = scenario.requests(seed);
    let offered = requests.len() as u64;
    let reference = baseline::reference(scenario, &requests)?.len() as u64;
    let keys = f64::from(scenario.keys().max(1));
    let secs = TRAFFIC_US as f64 / 1e6;
    let heals = matches!(scenario.kind, Kind::Partition(_));
    let mut out = Vec::new();
    for &mode in modes {
        let (admissions, latency, bytes, convergence) = match mode {
            Mode::None => (baseline::none(scenario, &requests)?, 0.0, 0, None),
            Mode::Central => {
                let c = baseline::central(scenario, seed, &requests)?;
                let lat = if c.answered == 0 {
                    0.0
                } else {
                    c.added_latency_us as f64 / c.answered as f64
                };
                (c.admissions, lat, 0, None)
            }
            Mode::Eventual | Mode::Strict | Mode::Both => {
                let gm = match mode {
                    Mode::Eventual => GlobalMode::Eventual,
                    Mode::Strict => GlobalMode::Strict,
                    _ => GlobalMode::Both,
                };
                let run = world::run(scenario, gm, seed, &requests)?;
                // The worst recovery; one that never completed is the worst of all.
                // Only eventual mode gossips usage deltas: strict traffic moves rights by
                // asks and transfers, so "every region merged a post-recovery delta from
                // every other" does not apply to it.
                let conv = if run.recoveries.is_empty() || mode == Mode::Strict {
                    None
                } else {
                    Some(
                        run.recoveries
                            .iter()
                            .try_fold(0u64, |acc, (_, d)| d.map(|d| acc.max(d))),
                    )
                };
                (run.admissions, 0.0, run.gossip_bytes, conv)
            }
        };
        let admitted = admissions.len() as u64;
        let m = max_in_window(&admissions, window_us());
        out.push((
            mode,
            SeedResult {
                seed,
                offered,
                admitted,
                max_in_window: m,
                over_pct: over_admission_pct(m, LIMIT),
                false_reject_pct: false_reject_pct(reference, admitted),
                convergence_us: convergence,
                heals,
                added_latency_us: latency,
                gossip_bytes_per_key: bytes as f64 / keys / secs,
                admissions,
            },
        ));
    }
    Ok(out)
}

/// The bounds of the issue that `r` violates.
pub fn check(scenario: &Scenario, mode: Mode, r: &SeedResult) -> Vec<Violation> {
    let mut v = Vec::new();
    let mut push = |what: String| {
        v.push(Violation {
            scenario: scenario.name,
            mode,
            seed: r.seed,
            what,
        })
    };
    match mode {
        // A request under both policies is held to the quota by the strict one; its false
        // rejections are the two rules' together (tested against each alone in tests/sim.rs).
        Mode::Both => {
            if r.max_in_window > LIMIT {
                push(format!(
                    "over-admission under both policies {:.2}% (admitted {} in one window, \
                     quota {LIMIT}); must be exactly 0",
                    r.over_pct, r.max_in_window
                ));
            }
        }
        Mode::Strict => {
            if r.max_in_window > LIMIT {
                push(format!(
                    "strict over-admission {:.2}% (admitted {} in one window, quota {LIMIT}); \
                     must be exactly 0",
                    r.over_pct, r.max_in_window
                ));
            }
            if let Some(b) = strict_false_reject_bound_pct(scenario.kind)
                && r.false_reject_pct > b
            {
                push(format!(
                    "strict false rejections {:.2}% > {b}%",
                    r.false_reject_pct
                ));
            }
        }
        Mode::Eventual => {
            if let Some(b) = eventual_over_bound_pct(scenario.kind)
                && r.over_pct > b
            {
                push(format!(
                    "eventual over-admission {:.2}% (admitted {} in one window, limit {LIMIT}) \
                     > {b}%",
                    r.over_pct, r.max_in_window
                ));
            }
            if r.heals {
                let bound = convergence_bound_us();
                match r.convergence_us {
                    Some(Some(c)) if c <= bound => {}
                    Some(Some(c)) => push(format!(
                        "eventual convergence {:.1} ms > {:.1} ms",
                        c as f64 / 1e3,
                        bound as f64 / 1e3
                    )),
                    _ => push("eventual counts never converged after the heal".to_owned()),
                }
            }
        }
        Mode::None | Mode::Central => {}
    }
    v
}

/// Aggregates one scenario × mode over its seeds.
pub fn aggregate(scenario: &Scenario, mode: Mode, results: &[&SeedResult]) -> Row {
    let n = results.len().max(1) as f64;
    let mean = |f: &dyn Fn(&SeedResult) -> f64| results.iter().map(|r| f(r)).sum::<f64>() / n;
    let worst = |f: &dyn Fn(&SeedResult) -> f64| {
        results
            .iter()
            .map(|r| f(r))
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let convergence_ms = if results.iter().any(|r| r.convergence_us.is_some()) {
        let mut worst_c: Option<f64> = Some(0.0);
        for r in results {
            match r.convergence_us {
                Some(Some(c)) => worst_c = worst_c.map(|w| w.max(c as f64 / 1e3)),
                Some(None) => worst_c = None,
                None => {}
            }
        }
        Some(worst_c)
    } else {
        None
    };
    Row {
        scenario: scenario.name,
        mode,
        seeds: results.len() as u64,
        limit: LIMIT,
        offered: mean(&|r| r.offered as f64),
        admitted: mean(&|r| r.admitted as f64),
        over_admission_pct: worst(&|r| r.over_pct),
        false_reject_pct: worst(&|r| r.false_reject_pct),
        convergence_ms,
        added_latency_ms: mean(&|r| r.added_latency_us / 1e3),
        gossip_bytes_per_key: mean(&|r| r.gossip_bytes_per_key),
    }
}

/// Everything a run of the simulator produced.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Rows in table order.
    pub rows: Vec<Row>,
    /// Every violated bound, in table order.
    pub violations: Vec<Violation>,
    /// The first seed's admissions per mode of the first scenario (for the plot).
    pub plot: Option<Plot>,
}

/// What the plot shows: one scenario, one seed, every mode's admissions.
#[derive(Debug, Clone, Default)]
pub struct Plot {
    /// The scenario.
    pub scenario: &'static str,
    /// The seed.
    pub seed: u64,
    /// Admissions per mode, in table order.
    pub modes: Vec<(Mode, Vec<Admission>)>,
}

/// Runs `scenarios` over `seeds` seeds from `seed_start`.
pub fn run(scenarios: &[Scenario], seed_start: u64, seeds: u64) -> Result<Report, SimError> {
    let mut report = Report::default();
    for scenario in scenarios {
        let mut per_mode: Vec<(Mode, Vec<SeedResult>)> =
            Mode::ALL.iter().map(|m| (*m, Vec::new())).collect();
        for seed in seed_start..seed_start.saturating_add(seeds) {
            for (mode, r) in run_seed(scenario, seed)? {
                if let Some((_, v)) = per_mode.iter_mut().find(|(m, _)| *m == mode) {
                    v.push(r);
                }
            }
        }
        if report.plot.is_none() {
            let modes = per_mode
                .iter()
                .filter_map(|(m, v)| v.first().map(|r| (*m, r.admissions.clone())))
                .collect();
            report.plot = Some(Plot {
                scenario: scenario.name,
                seed: seed_start,
                modes,
            });
        }
        for (mode, results) in &per_mode {
            for r in results {
                report.violations.extend(check(scenario, *mode, r));
            }
            let refs: Vec<&SeedResult> = results.iter().collect();
            report.rows.push(aggregate(scenario, *mode, &refs));
        }
    }
    Ok(report)
}
