//! The byzantine gateway family: one gateway (eu-west) with a valid identity lies on the wire.
//!
//! The property of issue #13, per strategy, as two tests:
//!
//! - `*_within_its_share`: the honest gateways admit at most the byzantine gateway's share
//!   beyond the quota in any window (`over_shares <= 1`);
//! - `*_keeps_honest_serving`: no run crashes (a panic fails the test) or livelocks (an
//!   error), the honest gateways' link is up at the end, and no honest gateway, offered at
//!   least its share in a window, admits less than half of it.
//!
//! Strict strategies run among three, four and five gateways (the bound on what one gateway
//! may give another depends on the count: see `tollgate::crdt::bounded`, "Peer input").
//!
//! Every test but six failed before #13's validation of peer input (the figures are in the
//! simulator's byzantine table, `--byzantine`). The six ignored ones state what eventual
//! mode does not promise: it believes each gateway's counts up to the quota per sub-window,
//! first-hand or relayed, so a liar can make a key refuse everywhere for a window (it
//! over-counts, failing closed) though never make the honest gateways over-admit; strict
//! mode keeps serving under the same attacks. Run them with `-- --include-ignored`. A policy
//! can trade a bounded excess for availability with a local reserve: see
//! `a_local_reserve_keeps_eventual_serving_against_a_liar_claiming_full_quotas`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use tollgate_simulation::adversary::Strategy;
use tollgate_simulation::byzantine::{self, CSV_HEADER, CaseSeed, fair_share};
use tollgate_simulation::scenario::LIMIT;
use tollgate_simulation::world::GlobalMode;

/// Seeds every case runs with here.
const SEEDS: u64 = 3;

fn seeds(strategy: Strategy) -> Vec<(byzantine::Case, CaseSeed)> {
    seeds_with_reserve(strategy, 0)
}

/// Every case of `strategy` (eventual ones with a local reserve of `local_reserve`
/// thousandths), each with [`SEEDS`] seeds.
fn seeds_with_reserve(strategy: Strategy, local_reserve: u16) -> Vec<(byzantine::Case, CaseSeed)> {
    let cases = byzantine::by_name(strategy.name());
    assert!(!cases.is_empty(), "{strategy:?} has no case");
    cases
        .into_iter()
        .map(|c| byzantine::Case { local_reserve, ..c })
        .flat_map(|c| (1..=SEEDS).map(move |s| (c, byzantine::run_seed(c, s).expect("runs"))))
        .collect()
}

fn described(case: &byzantine::Case, r: &CaseSeed) -> String {
    format!(
        "{} {} among {} seed {} (local reserve {}‰)",
        case.name(),
        case.mode_name(),
        case.gateways,
        r.seed,
        case.local_reserve
    )
}

fn assert_within_its_share(case: &byzantine::Case, r: &CaseSeed) {
    assert!(
        r.over_shares <= 1.0,
        "{}: the honest gateways admitted {} in one window, {:.2} shares of {} beyond the \
         quota {LIMIT}",
        described(case, r),
        r.max_honest,
        r.over_shares,
        fair_share(case.gateways)
    );
}

fn assert_keeps_honest_serving(case: &byzantine::Case, r: &CaseSeed) {
    let at = described(case, r);
    assert!(
        r.honest_links_up,
        "{at}: the honest link is down at the end"
    );
    assert!(
        r.starved.is_empty(),
        "{at}: honest regions {:?} admitted less than half their share in a window while \
         offered at least that (honest false rejections {:.2}%)",
        r.starved,
        r.false_reject_pct
    );
}

fn within_its_share(strategy: Strategy) -> Vec<CaseSeed> {
    let runs = seeds(strategy);
    for (case, r) in &runs {
        assert_within_its_share(case, r);
    }
    runs.into_iter().map(|(_, r)| r).collect()
}

fn keeps_honest_serving(strategy: Strategy) -> Vec<CaseSeed> {
    let runs = seeds(strategy);
    for (case, r) in &runs {
        assert_keeps_honest_serving(case, r);
    }
    runs.into_iter().map(|(_, r)| r).collect()
}

/// What the six ignored tests below lack, an eventual policy can buy with a local reserve:
/// at 17% (34 of 200, half a share among three gateways) each honest gateway admits its
/// reserve whatever the liar claims, so none starves, and the honest ones stay within one
/// share beyond the quota. Without it the same runs starve two gateways (asserted too, so
/// the reserve is what makes the difference).
#[test]
fn a_local_reserve_keeps_eventual_serving_against_a_liar_claiming_full_quotas() {
    for strategy in [
        Strategy::InflateOwnMax,
        Strategy::InflateOwnQuota,
        Strategy::InflateOthersMax,
        Strategy::InflateThirdQuota,
        Strategy::UnblockOthers,
        Strategy::UnblockThirdQuota,
    ] {
        for (case, r) in seeds_with_reserve(strategy, 170) {
            assert_within_its_share(&case, &r);
            assert_keeps_honest_serving(&case, &r);
            assert!(r.max_honest >= 2 * 34, "{}: {r:?}", described(&case, &r));
        }
        let without = seeds_with_reserve(strategy, 0);
        assert!(
            without.iter().any(|(_, r)| !r.starved.is_empty()),
            "{strategy:?} starves nobody without a reserve: {without:?}"
        );
    }
}

#[test]
fn the_honest_control_admits_within_the_quota_and_keeps_serving() {
    for r in keeps_honest_serving(Strategy::Honest) {
        assert!(r.max_all <= LIMIT, "{r:?}");
        assert!(r.false_reject_pct < 5.0, "{r:?}");
    }
}

#[test]
fn a_greedy_gateway_over_admits_only_its_own_traffic() {
    let control = seeds(Strategy::Honest);
    let greedy = keeps_honest_serving(Strategy::Greedy);
    for ((_, c), g) in control.iter().zip(&greedy) {
        // It serves all it is offered (a third of 3x the limit's rate: the quota per window
        // by itself), so the total goes well past the quota ...
        assert!(g.max_all >= LIMIT + fair_share(3), "{g:?}");
        // ... while the honest gateways, whose messages it leaves alone, decide exactly as
        // they do next to an honest peer (its books, and so its gossip, are honest).
        assert_eq!(g.honest_admitted, c.honest_admitted, "{g:?}");
        assert!(g.max_honest <= LIMIT);
    }
}

#[test]
fn a_double_spent_share_reaches_the_honest_gateways_and_stays_within_it() {
    let runs = within_its_share(Strategy::TransferShareToEach);
    // The forged gifts are believed (they are what an honest gift looks like): the honest
    // gateways go past the quota, which is what "its own share beyond the quota" allows.
    assert!(runs.iter().any(|r| r.max_honest > LIMIT), "{runs:?}");
}

/// Among four gateways (the shipped deployment) the liar shows each of the three honest ones
/// the books of a giver that gave only to it. With its share believed by each, they admitted
/// 277 in one window (1.54 shares beyond the quota; among five 2.45); with the gift bound
/// (two thirds of the share among four, half among five) at most the quota plus one share.
#[test]
fn among_four_and_five_a_double_spent_share_stays_within_one_share() {
    for n in [4, 5] {
        let case = byzantine::case(Strategy::TransferShareToEach, GlobalMode::Strict, n);
        for seed in 1..=SEEDS {
            let r = byzantine::run_seed(case, seed).expect("runs");
            assert!(r.over_shares <= 1.0, "among {n}, seed {seed}: {r:?}");
            assert!(r.max_honest > LIMIT, "the forged gifts are believed: {r:?}");
        }
    }
}

/// An Announce naming the liar's incarnation + 1000 made its peers take every real message of
/// it for a predecessor's: its transfers were refused, and the honest gateways refused 67% of
/// their requests while its rights sat idle. The gossip layer now holds strict messages to
/// the incarnation of the connection's vetted Hello.
#[test]
fn a_future_announce_does_not_make_the_honest_gateways_refuse() {
    for n in [3, 4] {
        let case = byzantine::case(Strategy::AnnounceFutureIncarnation, GlobalMode::Strict, n);
        for seed in 1..=SEEDS {
            let r = byzantine::run_seed(case, seed).expect("runs");
            assert!(r.false_reject_pct < 5.0, "among {n}, seed {seed}: {r:?}");
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_byzantine_table() {
    let cases: Vec<_> = ["byz-honest", "byz-forge-actors", "byz-transfer-total-max"]
        .iter()
        .flat_map(|n| byzantine::by_name(n))
        .collect();
    let render = |seed| {
        let r = byzantine::run(&cases, seed, 1).expect("runs");
        format!("{}{}", byzantine::table(&r.rows), byzantine::csv(&r.rows))
    };
    let a = render(5);
    assert_eq!(a, render(5));
    assert_ne!(a, render(6), "the seed must matter");
}

#[test]
fn a_byzantine_violation_names_the_strategy_mode_and_seed() {
    let case = byzantine::by_name("byz-ask-hoard")[0];
    let r = CaseSeed {
        seed: 42,
        offered: 100,
        admitted: 100,
        honest_admitted: 100,
        max_all: 400,
        max_honest: LIMIT + 2 * fair_share(3),
        over_shares: 2.0,
        false_reject_pct: 0.0,
        starved: vec![0],
        honest_links_up: false,
        honest_actors: 3,
    };
    let v: Vec<String> = byzantine::check(case, &r)
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(
        v.iter()
            .all(|m| m.contains("byz-ask-hoard") && m.contains("strict") && m.contains("seed 42")),
        "{v:?}"
    );
    assert!(v[0].contains("2.00 byzantine shares") && v[1].contains("us-east"));
}

#[test]
fn the_command_line_runs_the_byzantine_family_and_writes_its_csv() {
    let bin = env!("CARGO_BIN_EXE_tollgate-simulation");
    let dir = std::env::temp_dir().join(format!("tollgate-byz-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let csv = dir.join("byz.csv");
    let ok = Command::new(bin)
        .args([
            "--byzantine",
            "--seeds",
            "1",
            "--scenario",
            "byz-honest",
            "--csv",
        ])
        .arg(&csv)
        .output()
        .expect("runs");
    assert!(ok.status.success(), "{ok:?}");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        stdout.contains("over_sh") && stdout.contains("all bounds hold"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&csv).expect("csv written");
    assert_eq!(text.lines().next(), Some(CSV_HEADER));
    // One row per mode the control runs in among three gateways, and strict among four and
    // five.
    assert_eq!(text.lines().count(), 5);
    let four = Command::new(bin)
        .args(["--byzantine", "--list", "--gateways", "4"])
        .output()
        .expect("runs");
    let listed = String::from_utf8_lossy(&four.stdout);
    assert!(four.status.success(), "{four:?}");
    assert!(
        listed
            .lines()
            .all(|l| l.contains(" strict ") && l.contains(" 4 ")),
        "{listed}"
    );
    let unknown = Command::new(bin)
        .args(["--byzantine", "--scenario", "byz-nothing"])
        .output()
        .expect("runs");
    assert_eq!(unknown.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// One test per property and strategy; `$ignore` marks what eventual mode does not promise.
macro_rules! property {
    ($test:ident, $check:ident, $strategy:ident $(, $ignore:literal)?) => {
        #[test]
        $(#[ignore = $ignore])?
        fn $test() {
            $check(Strategy::$strategy);
        }
    };
}

property!(greedy_within_its_share, within_its_share, Greedy);
property!(
    inflate_own_max_within_its_share,
    within_its_share,
    InflateOwnMax
);
property!(
    inflate_own_max_keeps_honest_serving,
    keeps_honest_serving,
    InflateOwnMax,
    "eventual mode believes counts up to the quota: a liar can make a key refuse for a window"
);
property!(
    inflate_own_quota_within_its_share,
    within_its_share,
    InflateOwnQuota
);
// A quota-sized cell passes "P per sub-window <= quota"; it takes a bound on an actor's live
// total (or counting a peer for at most what it could have admitted) to keep serving here.
property!(
    inflate_own_quota_keeps_honest_serving,
    keeps_honest_serving,
    InflateOwnQuota,
    "eventual mode believes counts up to the quota: a liar can make a key refuse for a window"
);
property!(
    inflate_others_max_within_its_share,
    within_its_share,
    InflateOthersMax
);
property!(
    inflate_others_max_keeps_honest_serving,
    keeps_honest_serving,
    InflateOthersMax,
    "eventual mode believes counts up to the quota: a liar can make a key refuse for a window"
);
property!(
    inflate_third_quota_within_its_share,
    within_its_share,
    InflateThirdQuota
);
property!(
    inflate_third_quota_keeps_honest_serving,
    keeps_honest_serving,
    InflateThirdQuota,
    "eventual mode believes counts up to the quota: a liar can make a key refuse for a window"
);
property!(
    unblock_own_n_max_within_its_share,
    within_its_share,
    UnblockOwnN
);
property!(
    unblock_own_n_max_keeps_honest_serving,
    keeps_honest_serving,
    UnblockOwnN
);
property!(
    unblock_others_max_within_its_share,
    within_its_share,
    UnblockOthers
);
property!(
    unblock_others_max_keeps_honest_serving,
    keeps_honest_serving,
    UnblockOthers,
    "eventual mode believes counts up to the quota: a liar can make a key refuse for a window"
);
// Every forged cell passes `N <= P <= quota`: relayed cells of a third gateway need more
// than per-cell checks (e.g. never letting a relay lower a gateway's net count).
property!(
    unblock_third_quota_within_its_share,
    within_its_share,
    UnblockThirdQuota
);
property!(
    unblock_third_quota_keeps_honest_serving,
    keeps_honest_serving,
    UnblockThirdQuota,
    "eventual mode believes counts up to the quota: a liar can make a key refuse for a window"
);
property!(forge_actors_within_its_share, within_its_share, ForgeActors);
property!(
    forge_actors_keeps_honest_serving,
    keeps_honest_serving,
    ForgeActors
);
property!(
    transfer_total_max_within_its_share,
    within_its_share,
    TransferTotalMax
);
property!(
    transfer_total_max_keeps_honest_serving,
    keeps_honest_serving,
    TransferTotalMax
);
// Among five, seed 1 of the double spend once left one honest gateway below half its share
// for a window (30% honest false refusals): a column beyond the gift bound was refused
// whole, so the liar's genuine gift-backs were refused with its forgeries and the rights
// its peers gave it were lost to them for the epoch. Columns are now believed up to the
// bound.
property!(
    transfer_share_each_keeps_honest_serving,
    keeps_honest_serving,
    TransferShareToEach
);
property!(
    transfer_future_incarnation_within_its_share,
    within_its_share,
    TransferFutureIncarnation
);
property!(
    transfer_future_incarnation_keeps_honest_serving,
    keeps_honest_serving,
    TransferFutureIncarnation
);
property!(
    handover_gave_huge_within_its_share,
    within_its_share,
    HandoverGaveHuge
);
property!(
    handover_gave_huge_keeps_honest_serving,
    keeps_honest_serving,
    HandoverGaveHuge
);
property!(
    handover_took_huge_within_its_share,
    within_its_share,
    HandoverTookHuge
);
property!(
    handover_took_huge_keeps_honest_serving,
    keeps_honest_serving,
    HandoverTookHuge
);
property!(
    handover_future_incarnation_within_its_share,
    within_its_share,
    HandoverFutureIncarnation
);
property!(
    handover_future_incarnation_keeps_honest_serving,
    keeps_honest_serving,
    HandoverFutureIncarnation
);
property!(ask_hoard_within_its_share, within_its_share, AskHoard);
property!(
    ask_hoard_keeps_honest_serving,
    keeps_honest_serving,
    AskHoard
);
property!(
    announce_future_incarnation_within_its_share,
    within_its_share,
    AnnounceFutureIncarnation
);
property!(
    announce_future_incarnation_keeps_honest_serving,
    keeps_honest_serving,
    AnnounceFutureIncarnation
);
property!(
    hello_rising_incarnation_within_its_share,
    within_its_share,
    HelloRisingIncarnation
);
// Failed in eventual mode before Hellos were vetted (every replaced incarnation was kept as
// a peer until its admissions expired, so N grew past a hundred).
property!(
    hello_rising_incarnation_keeps_honest_serving,
    keeps_honest_serving,
    HelloRisingIncarnation
);

#[test]
fn forged_actors_are_not_interned_by_the_honest_gateways() {
    // 128 new actors per delta fill an honest usage table to its 65,535 cap within the run
    // today. Cells only for configured gateways (and their plausible incarnations) keep it
    // at a handful: 64 leaves room for restarts.
    for (case, r) in seeds(Strategy::ForgeActors) {
        assert!(
            r.honest_actors <= 64,
            "{} seed {}: {} actors interned by an honest gateway",
            case.name(),
            r.seed,
            r.honest_actors
        );
    }
}
