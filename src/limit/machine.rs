//! The rate limiter as one pure state machine: known-empty buckets, leases, the store
//! breaker, the `local` fallback and the merge with global decisions, for one request at a
//! time, with `now` passed in. The HTTP layer ([`crate::http::ratelimit`]) only identifies
//! the caller, asks the store when told to, and turns the decision into a response.
//!
//! # A request's way through it
//!
//! ```text
//! begin ──► Done                  a global policy refused; a bucket is known to be empty;
//!   │                             every bucket was served from a lease; the breaker is open
//!   │                             (each policy's on_store_error decides)
//!   └─────► Ask(pending) ─ store ─► settle ──► Done
//!                │                    └──────► Ask(pending)   once: refused while leasing,
//!                │                                            ask again for the cost alone
//!                └─ dropped while the store is asked ─► abandon
//! ```
//!
//! A [`Pending`] is the request's claim on the limiter: lease tokens it drew, lease requests
//! it holds open, the breaker probe it may be. [`Limiter::settle`] or [`Limiter::abandon`]
//! consumes it (a holder must not drop it otherwise). The shell calls `abandon` from a drop
//! guard, for a request whose client went away mid-store-call:
//!
//! - lease tokens it drew in process go back to the lease;
//! - a lease request it made stays open until the ask timeout, as if the answer were late:
//!   the store may well have applied the call (Redis runs a script whose caller went away),
//!   so asking again at once would let a client that disconnects on purpose take a lease
//!   per request from a shared bucket;
//! - if it was the breaker's probe of a failing store, the next probe may go once the
//!   store's deadline has passed since this one went, instead of a whole probe interval
//!   later (and not at once: a client that disconnects on purpose must not turn every
//!   request into a call to a failing store).
//!
//! What the store itself took for an abandoned request stays taken: refusing a little more
//! is the safe side.

//! Pure: no clock, no IO, no locks. Every call takes `now_us` from [`crate::clock`]'s scale.

use super::breaker::{Breaker, Transition};
use super::bucket::{BucketOutcome, BucketRequest};
use super::decision::{self, Decision, Outcome, PolicyResult, Verdict};
use super::empty::EmptyBuckets;
use super::lease::{Draw, Leases};
use super::local::LocalBuckets;
use super::policy::{Applied, OnStoreError};

/// The state a gateway keeps across requests (everything but the store's own).
#[derive(Debug)]
pub struct Limiter {
    breaker: Breaker,
    /// The longest the shell waits for one request's store calls: an abandoned probe is
    /// over by then.
    store_wait_us: u64,
    /// Buckets the store refused, until their cost fits again: refused without asking.
    empty: EmptyBuckets,
    /// Tokens taken from the store ahead of time for hot keys: admitted without asking.
    leases: Leases,
    /// Buckets of `local` policies while the store fails.
    local: LocalBuckets,
}

/// What global policies decided for a request: per global policy, its index in the
/// request's applied policies and its outcome in bucket terms. Empty: no global policy.
pub type GlobalOutcomes = Vec<(usize, BucketOutcome)>;

/// The next thing the shell does for a request.
#[derive(Debug)]
pub enum Step {
    /// Decided; nothing is held any more.
    Done(Decided),
    /// Ask the store for [`Pending::buckets`], then [`Limiter::settle`] with its answer (or
    /// [`Limiter::abandon`] if the request goes away first).
    Ask(Pending),
}

/// What the store said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// One outcome per asked bucket, in order.
    Outcomes(Vec<BucketOutcome>),
    /// No usable answer: an error, a timeout or the wrong number of outcomes (the shell
    /// counts which).
    Failed,
}

/// A request's claim on the limiter while the store is asked (see the module docs). The
/// default is a claim on nothing, for a holder between store calls.
#[derive(Debug, Default)]
#[must_use = "settle or abandon it, or what it holds stays held"]
pub struct Pending {
    /// Per applied policy: served from a lease, or asked for (with a lease on top).
    draws: Vec<Draw>,
    global: GlobalOutcomes,
    /// This request is the breaker's probe of a failing store, sent at this time (until the
    /// store's first answer reports to the breaker).
    probe: Option<u64>,
    /// Already the retry without leases: a refusal now stands.
    retried: bool,
    /// A breaker change from the first answer, reported with the decision.
    breaker: Option<Transition>,
}

impl Pending {
    /// The buckets to ask the store for, each with its lease on top, in policy order.
    pub fn buckets(&self, applied: &[Applied<'_>]) -> Vec<BucketRequest> {
        applied
            .iter()
            .zip(&self.draws)
            .filter_map(|(a, draw)| match draw {
                Draw::Ask { extra } => Some(BucketRequest {
                    key: a.bucket.key.clone(),
                    spec: a.bucket.spec,
                    cost: a.bucket.cost.saturating_add(*extra),
                }),
                Draw::Served(_) => None,
            })
            .collect()
    }

    /// Whether abandoning it would give anything back (lease tokens, a lease request, the
    /// breaker's probe).
    pub fn holds_anything(&self) -> bool {
        self.probe.is_some()
            || self.breaker.is_some()
            || self.draws.iter().any(|draw| {
                matches!(draw, Draw::Served(_)) || matches!(draw, Draw::Ask { extra } if *extra > 0)
            })
    }

    /// How many outcomes the store's answer must hold.
    pub fn asked(&self) -> usize {
        self.draws
            .iter()
            .filter(|draw| matches!(draw, Draw::Ask { .. }))
            .count()
    }
}

/// A request's decision.
#[derive(Debug, Clone)]
pub struct Decided {
    /// Per policy that was decided, for the headers: every applied policy, except on the
    /// short cuts (a global refusal reports the global policies, a known-empty bucket the
    /// refusing ones).
    pub results: Vec<PolicyResult>,
    /// Forward it, 429 or 503.
    pub verdict: Verdict,
    /// The same, as the metrics and the trace label it.
    pub decision: Decision,
    /// The global policies admitted but the request is refused anyway: what they took must
    /// be given back to the global state.
    pub refund_global: bool,
    /// A breaker state change this request caused (worth a log line and a gauge).
    pub breaker: Option<Transition>,
    /// The applied policies an admitted request drew from leases, bit `i` for policy `i`
    /// (counted in the metrics; policies past the 64th of one request are not counted).
    pub lease_served: u64,
}

impl Limiter {
    /// A limiter around a store guarded by `breaker`. `ask_timeout_us`: the longest the
    /// shell may wait for one request's store calls; until then no second lease request is
    /// sent for the same key.
    pub fn new(breaker: Breaker, ask_timeout_us: u64) -> Self {
        Self {
            breaker,
            store_wait_us: ask_timeout_us,
            empty: EmptyBuckets::default(),
            leases: Leases::default().with_ask_timeout(ask_timeout_us),
            local: LocalBuckets::default(),
        }
    }

    /// Whether the store is being skipped (the breaker is open or probing).
    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Forgets what it knows of bucket levels (the policies changed: a bucket known to be
    /// empty under the old rate may have room under the new one, and tokens leased under the
    /// old shape are not spent under the new one; at most a lease per hot key goes unused).
    pub fn forget_levels(&mut self) {
        self.empty.clear();
        self.leases.clear();
    }

    /// Starts deciding a request on its `applied` policies, with what its global policies
    /// decided (already taken from the global state if they all admitted).
    pub fn begin(&mut self, applied: &[Applied<'_>], global: GlobalOutcomes, now_us: u64) -> Step {
        if global.iter().any(|(_, outcome)| !outcome.admitted) {
            // Only the global policies are reported: the store is not asked, so nothing else
            // is known. Nothing was taken from the global state either.
            let results = global
                .iter()
                .filter_map(|&(i, outcome)| {
                    Some(result(applied.get(i)?, Outcome::Decided(outcome)))
                })
                .collect();
            return Step::Done(decided(results, false, false, None, 0));
        }
        let took_global = !global.is_empty();
        if let Some(results) = self.known_empty(applied, now_us) {
            return Step::Done(decided(results, took_global, false, None, 0));
        }
        let draws = self.draw_leases(applied, now_us);
        if draws.iter().all(|draw| matches!(draw, Draw::Served(_))) {
            let mut results: Vec<PolicyResult> = applied
                .iter()
                .zip(&draws)
                .map(|(a, draw)| match draw {
                    Draw::Served(outcome) => result(a, Outcome::Decided(*outcome)),
                    // Not reached: every draw was served.
                    Draw::Ask { .. } => result(a, Outcome::StoreDown),
                })
                .collect();
            merge_global(&mut results, &global);
            let lease_served = every_policy(applied.len());
            return Step::Done(decided(results, took_global, false, None, lease_served));
        }
        let was_open = self.breaker.is_open();
        if !self.breaker.allow(now_us) {
            self.return_leases(applied, &draws, now_us);
            return Step::Done(self.fall_back(applied, &global, None, now_us));
        }
        Step::Ask(Pending {
            draws,
            global,
            probe: was_open.then_some(now_us),
            retried: false,
            breaker: None,
        })
    }

    /// The store answered `pending`'s buckets (or failed to).
    pub fn settle(
        &mut self,
        pending: Pending,
        applied: &[Applied<'_>],
        answer: Answer,
        now_us: u64,
    ) -> Step {
        debug_assert_eq!(
            pending.draws.len(),
            applied.len(),
            "the request's own policies"
        );
        let outcomes = match answer {
            Answer::Outcomes(outcomes) if outcomes.len() == pending.asked() => outcomes,
            Answer::Outcomes(_) | Answer::Failed => {
                self.return_leases(applied, &pending.draws, now_us);
                let breaker = self.breaker.on_failure(now_us).or(pending.breaker);
                return Step::Done(self.fall_back(applied, &pending.global, breaker, now_us));
            }
        };
        let breaker = self.breaker.on_success().or(pending.breaker);
        let leased = pending
            .draws
            .iter()
            .any(|draw| matches!(draw, Draw::Ask { extra } if *extra > 0));
        if !pending.retried && leased && outcomes.iter().any(|o| !o.admitted) {
            // Refused while asking for a lease: the lease may be what did not fit. Ask again
            // for the cost alone (rare: leases are asked for only far from the limit).
            self.lease_refused(applied, &pending.draws, &outcomes, now_us);
            let draws = pending
                .draws
                .iter()
                .map(|draw| match draw {
                    Draw::Ask { .. } => Draw::Ask { extra: 0 },
                    served => *served,
                })
                .collect();
            return Step::Ask(Pending {
                draws,
                retried: true,
                breaker,
                // The first answer reported to the breaker: the retry is no probe.
                probe: None,
                ..pending
            });
        }
        Step::Done(self.store_answered(applied, &pending, outcomes, breaker, now_us))
    }

    /// `pending`'s request went away before the store answered: gives back what it held (see
    /// the module docs). Returns a breaker change an earlier answer of the request caused,
    /// still to be reported.
    pub fn abandon(
        &mut self,
        pending: Pending,
        applied: &[Applied<'_>],
        now_us: u64,
    ) -> Option<Transition> {
        debug_assert_eq!(
            pending.draws.len(),
            applied.len(),
            "the request's own policies"
        );
        for (a, draw) in applied.iter().zip(&pending.draws) {
            if let Draw::Served(_) = draw {
                self.leases.give_back(&a.bucket.key, a.bucket.cost, now_us);
            }
        }
        if let Some(sent_us) = pending.probe {
            let next = sent_us.saturating_add(self.store_wait_us).max(now_us);
            self.breaker.probe_abandoned(sent_us, next);
        }
        pending.breaker
    }

    /// Refusals without a store round trip: if a bucket of the request is known to be empty,
    /// the request is refused by it (the other policies are not reported: nothing was asked
    /// of them). `None`: ask on.
    fn known_empty(&self, applied: &[Applied<'_>], now_us: u64) -> Option<Vec<PolicyResult>> {
        if self.empty.is_empty() {
            return None;
        }
        let results: Vec<PolicyResult> = applied
            .iter()
            .filter_map(|a| {
                let wait = self.empty.refused_for(&a.bucket.key, now_us)?;
                Some(result(
                    a,
                    Outcome::Decided(BucketOutcome {
                        admitted: false,
                        remaining: 0,
                        next_token_us: wait,
                        retry_after_us: wait,
                    }),
                ))
            })
            .collect();
        (!results.is_empty()).then_some(results)
    }

    /// What the leases say for each bucket of the request.
    fn draw_leases(&mut self, applied: &[Applied<'_>], now_us: u64) -> Vec<Draw> {
        applied
            .iter()
            .map(|a| match a.lease_tokens() {
                // Never leasing: nothing to look up, and nothing to remember later.
                0 => Draw::Ask { extra: 0 },
                lease => self
                    .leases
                    .draw(&a.bucket.key, a.bucket.cost, lease, now_us),
            })
            .collect()
    }

    /// Gives back the lease tokens a request drew, when it is not admitted after all, and
    /// frees its lease requests.
    fn return_leases(&mut self, applied: &[Applied<'_>], draws: &[Draw], now_us: u64) {
        for (a, draw) in applied.iter().zip(draws) {
            match draw {
                Draw::Served(_) => self.leases.give_back(&a.bucket.key, a.bucket.cost, now_us),
                Draw::Ask { extra } if *extra > 0 => self.leases.unanswered(&a.bucket.key),
                Draw::Ask { .. } => {}
            }
        }
    }

    /// A request that asked for leases was refused: nothing was taken. Records what the
    /// refused buckets have left (so they stop leasing) and frees the lease requests.
    fn lease_refused(
        &mut self,
        applied: &[Applied<'_>],
        draws: &[Draw],
        outcomes: &[BucketOutcome],
        now_us: u64,
    ) {
        let asked = applied
            .iter()
            .zip(draws)
            .filter_map(|(a, draw)| match draw {
                Draw::Ask { extra } => Some((a, *extra)),
                Draw::Served(_) => None,
            });
        for ((a, extra), outcome) in asked.zip(outcomes) {
            if outcome.admitted {
                if extra > 0 {
                    self.leases.unanswered(&a.bucket.key);
                }
            } else {
                self.leases.answered(&a.bucket.key, extra, *outcome, now_us);
            }
        }
    }

    /// The store's outcomes (one per asked bucket) and the lease draws, as the request's
    /// results: grants the leases of an admitted request, gives back what a refused one
    /// drew, and remembers the buckets that refused.
    fn store_answered(
        &mut self,
        applied: &[Applied<'_>],
        pending: &Pending,
        outcomes: Vec<BucketOutcome>,
        breaker: Option<Transition>,
        now_us: u64,
    ) -> Decided {
        let admitted = outcomes.iter().all(|o| o.admitted);
        let mut outcomes = outcomes.into_iter();
        let mut results = Vec::with_capacity(applied.len());
        let mut lease_served = 0u64;
        for (i, (a, draw)) in applied.iter().zip(&pending.draws).enumerate() {
            let outcome = match draw {
                Draw::Served(served) if admitted => {
                    lease_served |= bit(i);
                    *served
                }
                Draw::Served(served) => {
                    // Not admitted after all: the drawn tokens go back to the lease.
                    self.leases.give_back(&a.bucket.key, a.bucket.cost, now_us);
                    BucketOutcome {
                        remaining: served.remaining.saturating_add(a.bucket.cost),
                        ..*served
                    }
                }
                Draw::Ask { extra } => {
                    // `settle` checked there is one outcome per asked bucket.
                    let Some(outcome) = outcomes.next() else {
                        break;
                    };
                    let leasing = a.lease_tokens() > 0;
                    if leasing && (admitted || !outcome.admitted) {
                        // An admission grants the lease; a refusal says the bucket is near
                        // empty: no lease is asked for until an admission says otherwise.
                        self.leases.answered(&a.bucket.key, *extra, outcome, now_us)
                    } else {
                        if *extra > 0 {
                            self.leases.unanswered(&a.bucket.key);
                        }
                        outcome
                    }
                }
            };
            if !outcome.admitted {
                self.empty
                    .note_refused(&a.bucket.key, outcome.retry_after_us, now_us);
            }
            results.push(result(a, Outcome::Decided(outcome)));
        }
        merge_global(&mut results, &pending.global);
        decided(
            results,
            !pending.global.is_empty(),
            false,
            breaker,
            lease_served,
        )
    }

    /// The store cannot be asked: each policy's `on_store_error` decides (`local` by an
    /// in-process bucket of the same shape, `open` admits uncounted, `closed` refuses).
    fn fall_back(
        &mut self,
        applied: &[Applied<'_>],
        global: &GlobalOutcomes,
        breaker: Option<Transition>,
        now_us: u64,
    ) -> Decided {
        let local: Vec<&BucketRequest> = applied
            .iter()
            .filter(|a| a.policy.on_store_error == OnStoreError::Local)
            .map(|a| &a.bucket)
            .collect();
        // Specs come from validated policies; an invalid one is treated as "store down" for
        // those policies rather than silently admitting.
        let mut local_outcomes = if local.is_empty() {
            Vec::new()
        } else {
            self.local.acquire(&local, now_us).unwrap_or_default()
        }
        .into_iter();
        let mut used_local = false;
        let mut results: Vec<PolicyResult> = applied
            .iter()
            .map(|a| {
                let outcome = match a.policy.on_store_error {
                    OnStoreError::Open => Outcome::FailedOpen,
                    OnStoreError::Closed => Outcome::StoreDown,
                    OnStoreError::Local => match local_outcomes.next() {
                        Some(outcome) => {
                            used_local = true;
                            Outcome::Decided(outcome)
                        }
                        None => Outcome::StoreDown,
                    },
                };
                result(a, outcome)
            })
            .collect();
        merge_global(&mut results, global);
        decided(results, !global.is_empty(), used_local, breaker, 0)
    }
}

/// The verdict and its label. `took_global`: the global policies admitted, so a refusal
/// must give back what they took.
fn decided(
    results: Vec<PolicyResult>,
    took_global: bool,
    used_local: bool,
    breaker: Option<Transition>,
    lease_served: u64,
) -> Decided {
    let verdict = decision::verdict(&results);
    let decision = match &verdict {
        Verdict::Admitted if results.iter().any(|r| r.outcome == Outcome::FailedOpen) => {
            Decision::StoreFailOpen
        }
        Verdict::Admitted if used_local => Decision::AdmittedLocal,
        Verdict::Admitted => Decision::Admitted,
        Verdict::Rejected { .. } => Decision::Rejected,
        Verdict::Unavailable { .. } => Decision::Unavailable,
    };
    let admitted = verdict == Verdict::Admitted;
    Decided {
        results,
        verdict,
        decision,
        refund_global: took_global && !admitted,
        breaker,
        lease_served: if admitted { lease_served } else { 0 },
    }
}

/// Policy `i`'s bit in [`Decided::lease_served`] (none past the 64th).
fn bit(i: usize) -> u64 {
    u32::try_from(i)
        .ok()
        .and_then(|i| 1u64.checked_shl(i))
        .unwrap_or(0)
}

/// The bits of the first `n` policies.
fn every_policy(n: usize) -> u64 {
    (0..n.min(64)).fold(0, |bits, i| bits | bit(i))
}

/// Folds the (admitting) global outcomes into the regional results: a policy passes only if
/// both its regional bucket and its global quota do, and reports the smaller remainder.
fn merge_global(results: &mut [PolicyResult], global: &GlobalOutcomes) {
    for &(i, global) in global {
        let Some(r) = results.get_mut(i) else {
            continue;
        };
        r.outcome = match r.outcome {
            Outcome::Decided(regional) => Outcome::Decided(BucketOutcome {
                admitted: regional.admitted && global.admitted,
                remaining: regional.remaining.min(global.remaining),
                next_token_us: regional.next_token_us.max(global.next_token_us),
                retry_after_us: regional.retry_after_us,
            }),
            // The regional bucket could not be asked and its policy says `open`: the global
            // check still stands, and it admitted.
            Outcome::FailedOpen => Outcome::Decided(global),
            Outcome::StoreDown => Outcome::StoreDown,
        };
    }
}

fn result(applied: &Applied<'_>, outcome: Outcome) -> PolicyResult {
    PolicyResult {
        name: applied.policy.name.clone(),
        limit: applied.limit,
        legacy_headers: applied.policy.legacy_headers,
        outcome,
    }
}

#[cfg(test)]
mod tests;
