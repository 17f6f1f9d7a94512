//! Which of the gossip machine's invariants a run asserts.
//!
//! The always-on ones hold for the code as it stands. The optional ones state what issue #13
//! asks of honest semantics, and each fails on the code before its fix (see `CHECKS`): they
//! are switched on by `TOLLGATE_FUZZ_CHECKS`, a comma-separated list of names, `all` or
//! `none`. Unset, [`DEFAULT`] applies.

use std::sync::OnceLock;

/// The optional invariants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checks {
    /// Strict: rights held (available plus live consumption) never exceed the quota, since
    /// no peer can have given more than it held (finding 5: `Transfer { total: u64::MAX }`).
    pub quota: bool,
    /// Strict, the property when every peer may lie: rights held never exceed the
    /// quota plus the other slots' shares (each liar adds at most its own share). Implied
    /// by `quota`; for a fix that bounds columns by shares rather than by what was given.
    pub quota_share: bool,
    /// Strict: no peer message makes us superseded; only our own slot's newer incarnation
    /// can, and no peer speaks for it (finding 3: a `Transfer`/`Handover` with a future
    /// `to_inc`).
    pub superseded: bool,
    /// Eventual: every actor in the usage table is of a configured slot (finding 5: a peer
    /// interns fake actors).
    pub actors: bool,
    /// Eventual: our own cells only hold what we admitted (finding 5: a peer's delta writes
    /// cells of the receiver's own actor).
    pub own_cells: bool,
    /// Strict: after every key has been idle for several windows, no strict key state is
    /// left (finding 6: state is kept once rights moved).
    pub strict_baseline: bool,
    /// Eventual: after every key has been idle for several windows, no usage key is left.
    pub eventual_baseline: bool,
}

/// Every optional check, by the name `TOLLGATE_FUZZ_CHECKS` uses.
pub const CHECKS: [&str; 7] = [
    "quota",
    "quota-share",
    "superseded",
    "actors",
    "own-cells",
    "strict-baseline",
    "eventual-baseline",
];

/// What runs when `TOLLGATE_FUZZ_CHECKS` is unset: the checks that hold for the code as it
/// stands. Left out: `quota` (the harness's two peers may both lie, and each may add up to
/// its own share: `quota-share` is the bound that holds) and `strict-baseline` (a strict key
/// is forgotten only after it is settled with its peers, which the harness's peers do not
/// do).
pub const DEFAULT: &str = "eventual-baseline,superseded,quota-share,actors,own-cells";

impl Checks {
    /// Parses a list of names (unknown names are an error, so a typo is not silently off).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut checks = Checks::default();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "none" => checks = Checks::default(),
                "all" => {
                    checks = Checks {
                        quota: true,
                        quota_share: true,
                        superseded: true,
                        actors: true,
                        own_cells: true,
                        strict_baseline: true,
                        eventual_baseline: true,
                    }
                }
                "quota" => checks.quota = true,
                "quota-share" => checks.quota_share = true,
                "superseded" => checks.superseded = true,
                "actors" => checks.actors = true,
                "own-cells" => checks.own_cells = true,
                "strict-baseline" => checks.strict_baseline = true,
                "eventual-baseline" => checks.eventual_baseline = true,
                other => return Err(format!("unknown check {other:?} (known: {CHECKS:?})")),
            }
        }
        Ok(checks)
    }

    /// The checks of this run (read once).
    pub fn from_env() -> Self {
        static CHECKS_OF_RUN: OnceLock<Checks> = OnceLock::new();
        *CHECKS_OF_RUN.get_or_init(|| {
            let list = std::env::var("TOLLGATE_FUZZ_CHECKS").unwrap_or_else(|_| DEFAULT.into());
            Checks::parse(&list).unwrap_or_else(|e| panic!("TOLLGATE_FUZZ_CHECKS: {e}"))
        })
    }
}
