//! The simulator's command line: runs the scenarios, prints the table, writes the CSV and the
//! plot, and exits non-zero (naming scenario and seed) when a bound is violated. With
//! `--byzantine` it runs the byzantine gateway family instead (its own table and CSV).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use tollgate_simulation::{byzantine, report, runner, scenario};

/// Deterministic multi-region simulation of tollgate's global rate limits.
#[derive(Debug, Parser)]
#[command(name = "tollgate-simulation")]
struct Args {
    /// Seeds per scenario.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    seed_start: u64,
    /// Run only this scenario (see --list).
    #[arg(long)]
    scenario: Option<String>,
    /// Write the table as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write an SVG of admitted vs limit over time per region (first scenario, first seed;
    /// not with --byzantine).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Run the byzantine gateway family (one gateway forges what it sends) instead.
    #[arg(long)]
    byzantine: bool,
    /// With --byzantine: only the cases among this many gateways (3, 4 or 5).
    #[arg(long)]
    gateways: Option<usize>,
    /// The eventual policy's local reserve, in thousandths of the quota (a policy's
    /// `local_reserve`; 170 is 17%).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=500))]
    local_reserve_permille: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.byzantine {
        return run_byzantine(&args);
    }
    if args.list {
        for s in scenario::all() {
            println!("{:<24} {}", s.name, s.about);
        }
        return ExitCode::SUCCESS;
    }
    let scenarios = match &args.scenario {
        Some(name) => match scenario::by_name(name) {
            Some(s) => vec![s],
            None => {
                eprintln!("unknown scenario {name:?} (see --list)");
                return ExitCode::from(2);
            }
        },
        None => scenario::all(),
    };
    let scenarios: Vec<scenario::Scenario> = scenarios
        .into_iter()
        .map(|s| scenario::Scenario {
            local_reserve: args.local_reserve_permille,
            ..s
        })
        .collect();
    print_reserve(args.local_reserve_permille);
    let report = match runner::run(&scenarios, args.seed_start, args.seeds) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("simulation failed: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report::table(&report.rows));
    if let Some(path) = &args.csv
        && let Err(e) = std::fs::write(path, report::csv(&report.rows))
    {
        eprintln!("cannot write {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if let Some(path) = &args.plot
        && let Some(plot) = &report.plot
        && let Err(e) = std::fs::write(path, report::svg(plot.scenario, plot.seed, &plot.modes))
    {
        eprintln!("cannot write {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if report.violations.is_empty() {
        println!("all bounds hold");
        ExitCode::SUCCESS
    } else {
        for v in &report.violations {
            eprintln!("{v}");
        }
        ExitCode::FAILURE
    }
}

fn run_byzantine(args: &Args) -> ExitCode {
    if args.plot.is_some() {
        eprintln!("--plot draws the main scenarios only, not --byzantine");
        return ExitCode::from(2);
    }
    let among = |c: &byzantine::Case| args.gateways.is_none_or(|n| c.gateways == n);
    if args.list {
        for c in byzantine::cases().iter().filter(|c| among(c)) {
            println!(
                "{:<24} {:<8} {:>2} {}",
                c.name(),
                c.mode_name(),
                c.gateways,
                c.strategy.about()
            );
        }
        return ExitCode::SUCCESS;
    }
    let cases: Vec<byzantine::Case> = match &args.scenario {
        Some(name) => {
            let cases = byzantine::by_name(name);
            if cases.is_empty() {
                eprintln!("unknown byzantine scenario {name:?} (see --byzantine --list)");
                return ExitCode::from(2);
            }
            cases
        }
        None => byzantine::cases(),
    };
    let cases: Vec<byzantine::Case> = cases
        .into_iter()
        .filter(|c| among(c))
        .map(|c| byzantine::Case {
            local_reserve: args.local_reserve_permille,
            ..c
        })
        .collect();
    if cases.is_empty() {
        eprintln!(
            "no byzantine case among {:?} gateways (see --byzantine --list)",
            args.gateways
        );
        return ExitCode::from(2);
    }
    let report = match byzantine::run(&cases, args.seed_start, args.seeds) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("simulation failed: {e}");
            return ExitCode::from(2);
        }
    };
    print_reserve(args.local_reserve_permille);
    print!("{}", byzantine::table(&report.rows));
    if let Some(path) = &args.csv
        && let Err(e) = std::fs::write(path, byzantine::csv(&report.rows))
    {
        eprintln!("cannot write {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if report.violations.is_empty() {
        println!("all bounds hold");
        ExitCode::SUCCESS
    } else {
        for v in &report.violations {
            eprintln!("{v}");
        }
        ExitCode::FAILURE
    }
}

/// Names a run's local reserve above its table (none: the default, nothing printed).
fn print_reserve(permille: u16) {
    if permille > 0 {
        println!(
            "eventual local reserve: {}.{}% of the quota",
            permille / 10,
            permille % 10
        );
    }
}
