//! The simulator's own tests: the bounds on a handful of seeds per scenario,
//! determinism, the baselines' shape, and the command line's exit status.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use tollgate_simulation::metrics::convergence_bound_us;
use tollgate_simulation::report::{self, CSV_HEADER};
use tollgate_simulation::runner::{self, Mode, Row, SeedResult};
use tollgate_simulation::scenario::{self, LIMIT};
use tollgate_simulation::world::{self, GlobalMode};

/// Seeds every scenario runs with here.
const SEEDS: u64 = 3;

fn row<'a>(rows: &'a [Row], scenario: &str, mode: Mode) -> &'a Row {
    rows.iter()
        .find(|r| r.scenario == scenario && r.mode == mode)
        .expect("every scenario has a row per mode")
}

#[test]
fn every_bound_holds_on_a_handful_of_seeds_per_scenario() {
    let report = runner::run(&scenario::all(), 1, SEEDS).expect("runs");
    assert_eq!(report.rows.len(), scenario::all().len() * Mode::ALL.len());
    let violations: Vec<String> = report.violations.iter().map(|v| v.to_string()).collect();
    assert!(violations.is_empty(), "{violations:#?}");
    // Strict over-admission is exactly 0 everywhere (the check above covers it per seed; say
    // it once more on the rows, where it is visible).
    for r in report.rows.iter().filter(|r| r.mode == Mode::Strict) {
        assert_eq!(r.over_admission_pct, 0.0, "{}", r.scenario);
    }
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let scenarios: Vec<_> = [
        "partition-asymmetric",
        "restart-eu-west",
        "lossy-dup-reorder",
    ]
    .iter()
    .map(|n| scenario::by_name(n).expect("a scenario"))
    .collect();
    let render = |seed| {
        let r = runner::run(&scenarios, seed, 2).expect("runs");
        let plot = r.plot.expect("a plot");
        format!(
            "{}{}{}",
            report::table(&r.rows),
            report::csv(&r.rows),
            report::svg(plot.scenario, plot.seed, &plot.modes)
        )
    };
    let a = render(7);
    assert_eq!(a, render(7));
    assert_ne!(a, render(8), "the seed must matter");
}

#[test]
fn none_gives_about_n_times_the_limit_to_a_hopping_attacker() {
    let s = scenario::by_name("attacker-hop-2000rps").expect("a scenario");
    let report = runner::run(&[s], 1, 1).expect("runs");
    let none = row(&report.rows, "attacker-hop-2000rps", Mode::None);
    // Hopping every second, the attacker collects each region's full limit: 3x.
    assert!(none.over_admission_pct >= 150.0, "{none:?}");
    for mode in [Mode::Central, Mode::Eventual, Mode::Strict] {
        assert_eq!(
            row(&report.rows, "attacker-hop-2000rps", mode).over_admission_pct,
            0.0
        );
    }
}

#[test]
fn central_pays_a_round_trip_and_fails_closed_when_cut_off() {
    let names = ["steady-even-1.5x", "partition-full"];
    let scenarios: Vec<_> = names.iter().filter_map(|n| scenario::by_name(n)).collect();
    let report = runner::run(&scenarios, 1, 1).expect("runs");
    let steady = row(&report.rows, "steady-even-1.5x", Mode::Central);
    // Two thirds of the clients pay 75 or 200 ms, a third (us-east) nothing: about 92 ms.
    assert!(
        (80.0..110.0).contains(&steady.added_latency_ms),
        "{steady:?}"
    );
    assert!(steady.false_reject_pct.abs() < 1.0, "{steady:?}");
    let cut = row(&report.rows, "partition-full", Mode::Central);
    assert!(cut.false_reject_pct > 10.0, "{cut:?}");
}

#[test]
fn eventual_counts_converge_after_every_heal() {
    let scenarios: Vec<_> = scenario::all()
        .into_iter()
        .filter(|s| s.name.starts_with("partition-"))
        .collect();
    assert_eq!(scenarios.len(), 3);
    let report = runner::run(&scenarios, 1, SEEDS).expect("runs");
    for s in &scenarios {
        let r = row(&report.rows, s.name, Mode::Eventual);
        let Some(Some(ms)) = r.convergence_ms else {
            panic!("{}: no convergence measured: {r:?}", s.name);
        };
        assert!(
            ms > 0.0 && ms * 1e3 <= convergence_bound_us() as f64,
            "{r:?}"
        );
    }
}

#[test]
fn every_fault_heals_links_and_strict_shares_by_the_end() {
    for s in scenario::all() {
        let requests = s.requests(1);
        for mode in [GlobalMode::Eventual, GlobalMode::Strict] {
            let run = world::run(&s, mode, 1, &requests).expect("runs");
            assert!(run.all_connected_at_end, "{} {mode:?}", s.name);
            assert!(run.all_reclaimed_at_end, "{} {mode:?}", s.name);
            assert!(run.unreclaimed_at_start.is_empty(), "{} {mode:?}", s.name);
            assert_eq!(run.encode_errors, 0);
            assert!(run.gossip_bytes > 0);
        }
    }
}

#[test]
fn a_violation_names_scenario_mode_and_seed() {
    let s = scenario::by_name("partition-full").expect("a scenario");
    let r = SeedResult {
        seed: 42,
        offered: 1000,
        admitted: 201,
        max_in_window: LIMIT + 1,
        over_pct: 0.5,
        false_reject_pct: 0.0,
        convergence_us: None,
        heals: false,
        added_latency_us: 0.0,
        gossip_bytes_per_key: 0.0,
        admissions: Vec::new(),
    };
    let v = runner::check(&s, Mode::Strict, &r);
    assert_eq!(v.len(), 1);
    let msg = v[0].to_string();
    assert!(
        msg.contains("partition-full") && msg.contains("seed 42"),
        "{msg}"
    );
    // The same result is within eventual mode's partition bound (5%).
    assert!(runner::check(&s, Mode::Eventual, &r).is_empty());
}

#[test]
fn the_command_line_writes_csv_and_plot_and_reports_violations_by_exit_status() {
    let bin = env!("CARGO_BIN_EXE_tollgate-simulation");
    let dir = std::env::temp_dir().join(format!("tollgate-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let csv = dir.join("out.csv");
    let svg = dir.join("out.svg");
    let ok = Command::new(bin)
        .args(["--seeds", "2", "--seed-start", "1", "--scenario"])
        .arg("attacker-hop-200rps")
        .arg("--csv")
        .arg(&csv)
        .arg("--plot")
        .arg(&svg)
        .output()
        .expect("runs");
    assert!(ok.status.success(), "{ok:?}");
    let text = std::fs::read_to_string(&csv).expect("csv written");
    assert_eq!(text.lines().next(), Some(CSV_HEADER));
    assert_eq!(text.lines().count(), 1 + Mode::ALL.len());
    let plot = std::fs::read_to_string(&svg).expect("svg written");
    assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_violated_bound_is_reported_with_scenario_and_seed() {
    // No production run violates a bound any more, so feed the checker results that do.
    let scenarios = scenario::all();
    let steady = scenarios
        .iter()
        .find(|s| s.name == "steady-even-0.8x")
        .expect("scenario exists");
    let results = runner::run(std::slice::from_ref(steady), 7, 1).expect("runs");
    assert!(results.violations.is_empty());
    let mut over = runner::run_seed(steady, 7)
        .expect("runs")
        .into_iter()
        .find(|(m, _)| *m == Mode::Strict)
        .map(|(_, r)| r)
        .expect("a strict result");
    over.max_in_window = LIMIT + 1;
    over.false_reject_pct = 2.5;
    let found: Vec<String> = runner::check(steady, Mode::Strict, &over)
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found
            .iter()
            .all(|v| v.contains("steady-even-0.8x") && v.contains("seed 7"))
    );
    assert!(found[0].contains("over-admission") && found[1].contains("false rejections"));
}

/// The price of the gift bound (see `tollgate::crdt::bounded`, "Peer input"): among four
/// gateways a key whose traffic all reaches one of them gets, per window, at most that
/// gateway's share plus two thirds of each other's (200: 50 + 3 · 33 = 149); among three it
/// still gets the whole quota.
#[test]
fn among_four_one_busy_gateway_gathers_its_share_and_two_thirds_of_each_other() {
    let one_region = scenario::by_name("steady-one-region").expect("a scenario");
    for (n, lo, hi) in [(3, LIMIT - 10, LIMIT), (4, 140, 149)] {
        let s = scenario::Scenario {
            skew_us: scenario::default_skew(n),
            ..one_region.clone()
        };
        let requests = s.requests(1);
        let run = world::run(&s, GlobalMode::Strict, 1, &requests).expect("runs");
        let most = tollgate_simulation::metrics::max_in_window(
            &run.admissions,
            tollgate_simulation::metrics::window_us(),
        );
        assert!((lo..=hi).contains(&most), "among {n}: {most} in one window");
    }
}

/// The request path's multi-policy admission (`Gossip::admit`, all or nothing) on the
/// production machine: every request under an eventual and a strict policy of the same
/// quota. Never more than the quota in a window, and the policy that had room is refunded
/// whenever the other refuses, so the pair admits about what the stricter of the two admits
/// alone: without the refunds, every request strict refused would still spend eventual
/// quota.
#[test]
fn both_policies_on_every_request_stay_within_the_quota_and_refunds_keep_the_pair_whole() {
    for s in scenario::all() {
        for seed in 1..=2 {
            let results =
                runner::run_seed_in(&s, seed, &[Mode::Eventual, Mode::Strict, Mode::Both]).unwrap();
            let [eventual, strict, both] = [0, 1, 2].map(|i| &results[i].1);
            let violations = runner::check(&s, Mode::Both, both);
            assert!(violations.is_empty(), "{}", violations[0]);
            let alone = eventual.admitted.min(strict.admitted);
            eprintln!(
                "{} seed {seed}: both {} / eventual {} / strict {} (false rejections {:.2}%)",
                s.name, both.admitted, eventual.admitted, strict.admitted, both.false_reject_pct
            );
            assert!(
                both.admitted <= eventual.admitted.max(strict.admitted),
                "{} seed {seed}",
                s.name
            );
            assert!(
                both.admitted + alone / 20 + 5 >= alone,
                "{} seed {seed}: both admitted {}, the stricter alone {alone}",
                s.name,
                both.admitted
            );
        }
    }
}
