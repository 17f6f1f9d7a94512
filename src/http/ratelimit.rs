//! The rate-limit layer: identify the caller, decide every matching policy in at most one
//! store round trip, and answer 429 (or 401/503) before any upstream resource is taken.
//!
//! This is the IO shell around the pure [`crate::limit`] code. It owns the store, the local
//! fallback, the breaker, the known-empty buckets and the leases; it is where
//! `on_store_error` is applied:
//!
//! - buckets known to be empty are refused, and buckets with leased tokens
//!   ([`crate::limit::lease`]) admitted, without the store; the rest ask it, with a lease on
//!   top for hot keys;
//! - the store answers: its decisions stand, all or nothing across the request's policies
//!   (lease-served buckets included: a refused request gives their tokens back);
//! - the store fails or the breaker is open: `local` policies are decided by an in-process
//!   bucket of the same shape, `open` policies admit (counted in metrics), `closed` policies
//!   refuse with 503. With the breaker open the store is not even tried, so a decision costs
//!   microseconds, not a timeout.
//!
//! Global policies ([`crate::global`]) are decided *first*, in process, from the gossiped
//! state: a refusal there costs no store round trip (the cheap 429 a region-hopping client
//! deserves), and since `on_store_error` only concerns the regional bucket, no store failure
//! can bypass a global check. If the store then refuses the request, what the global check
//! took is given back.

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;
use tokio::time::Instant;

use crate::global::{GlobalEntry, GlobalLimits, GlobalPolicies};
use crate::gossip::proto::{GlobalCheck, GlobalOutcome};
use crate::http::problem::Problem;
use crate::limit::breaker::{Breaker, Transition};
use crate::limit::decision::{self, Outcome, PolicyResult, Verdict};
use crate::limit::empty::EmptyBuckets;
use crate::limit::identity::{self, IdentityConfig, IdentityError};
use crate::limit::lease::{Draw, Leases};
use crate::limit::policy::{self, Applied, OnStoreError, Policy, Scope};
pub use crate::metrics::Decision;
use crate::store::{BucketOutcome, BucketRequest, BucketStore, StoreError, memory::MemoryStore};

/// What a reload replaces: the policies and how callers are identified. A request decides
/// on the rules it started with, whatever a reload swaps in meanwhile.
#[derive(Debug)]
struct Rules {
    policies: Vec<Policy>,
    identity: IdentityConfig,
}

impl Rules {
    fn needs_identity(&self) -> bool {
        !self.policies.is_empty()
            || !self.identity.api_keys.is_empty()
            || self.identity.jwt.is_some()
    }
}

/// Everything the layer needs, shared by all requests. The rules are swapped by a reload;
/// everything else (the store, the breaker, the local buckets, known-empty buckets, leases,
/// the global state) lives as long as the gateway.
pub struct RateLimiter {
    rules: ArcSwap<Rules>,
    /// The region's store (Redis, or memory when there is no Redis).
    store: Arc<dyn BucketStore>,
    /// In-process buckets for `local` policies while the store is failing.
    local: MemoryStore,
    breaker: Mutex<Breaker>,
    origin: Instant,
    /// The deployment-wide state of global policies, when the gateway gossips.
    global: Option<Arc<GlobalLimits>>,
    /// Buckets the store refused, until their cost fits again: refused without asking.
    empty: Mutex<EmptyBuckets>,
    /// Tokens taken from the store ahead of time for hot keys: admitted without asking.
    leases: Mutex<Leases>,
}

/// The result of checking one request.
pub struct Checked {
    pub decision: Decision,
    /// Headers for the response (RateLimit, RateLimit-Policy, legacy).
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
    /// Set when the request must not be forwarded.
    pub refusal: Option<Response>,
}

impl RateLimiter {
    pub fn new(
        policies: Vec<Policy>,
        identity: IdentityConfig,
        store: Arc<dyn BucketStore>,
        breaker: Breaker,
    ) -> Self {
        // A lease request may take two store calls (the retry without the lease), each up to
        // the store's deadline; until then no second one is sent for the same key.
        let ask_timeout_us = store.deadline().map_or(0, |deadline| {
            u64::try_from(deadline.as_micros().saturating_mul(2)).unwrap_or(u64::MAX)
        });
        Self {
            rules: ArcSwap::from_pointee(Rules { policies, identity }),
            store,
            local: MemoryStore::new(),
            breaker: Mutex::new(breaker),
            origin: Instant::now(),
            global: None,
            empty: Mutex::new(EmptyBuckets::default()),
            leases: Mutex::new(Leases::default().with_ask_timeout(ask_timeout_us)),
        }
    }

    /// Decides global policies with `global` (without it they are enforced as regional
    /// policies only).
    pub fn with_global(mut self, global: Arc<GlobalLimits>) -> Self {
        self.global = Some(global);
        self
    }

    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }

    pub fn breaker_open(&self) -> bool {
        self.breaker().is_open()
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // Never held across a panic point; recover rather than propagate poisoning.
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the policies and the identity settings (a reload). Buckets in the store are
    /// named by policy and key, so a policy that kept its name keeps its buckets. When any
    /// policy changed, what this gateway remembers of bucket levels is dropped: a bucket
    /// known to be empty under the old rate may have room under the new one, and tokens
    /// leased under the old shape are not spent under the new one (at most a lease per hot
    /// key goes unused: refusals, never excess).
    pub fn set_rules(&self, policies: Vec<Policy>, identity: IdentityConfig) {
        let changed = self.rules.load().policies != policies;
        self.rules.store(Arc::new(Rules { policies, identity }));
        if changed {
            self.empty().clear();
            self.leases().clear();
        }
    }

    /// Decides one request.
    pub async fn check(
        &self,
        method: &http::Method,
        path: &str,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> Checked {
        let rules = self.rules.load_full();
        if !rules.needs_identity() {
            return Checked {
                decision: Decision::NoPolicy,
                headers: Vec::new(),
                refusal: None,
            };
        }
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let identity = match identity::identify(&rules.identity, headers, peer, now_unix) {
            Ok(identity) => identity,
            Err(error) => {
                return Checked {
                    decision: Decision::Unauthenticated,
                    headers: Vec::new(),
                    refusal: Some(unauthenticated(&error)),
                };
            }
        };
        let applied = policy::plan(&rules.policies, method, path, &identity, headers);
        if applied.is_empty() {
            return Checked {
                decision: Decision::NoPolicy,
                headers: Vec::new(),
                refusal: None,
            };
        }

        // Only traces use this span: its fields appear on no log line.
        let span = if !crate::telemetry::exporting() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                "rate_limit",
                policy = tracing::field::Empty,
                key_hash = tracing::field::Empty,
                decision = tracing::field::Empty,
                remaining = tracing::field::Empty,
                store = self.store.kind(),
                store_latency_ms = tracing::field::Empty,
            )
        };
        // Joining names and hashing keys costs allocations and a SHA-256 per request: only
        // pay for them when the span is recorded somewhere.
        if !span.is_disabled() {
            let policies: Vec<&str> = applied.iter().map(|a| a.policy.name.as_str()).collect();
            span.record("policy", policies.join(","));
            span.record("key_hash", key_hash(&applied));
        }
        let started = Instant::now();
        let global_policies = self.global.as_ref().map(|g| g.policies());
        let global = self.decide_global(&applied, global_policies.as_deref());
        let (results, used_fallback) = match &global {
            Some(g) if !g.admitted() => (g.refusal(&applied), false),
            _ => {
                let (mut results, used_fallback) = self.decide(&applied).await;
                if let Some(g) = &global {
                    g.merge_into(&mut results);
                }
                (results, used_fallback)
            }
        };
        span.record("store_latency_ms", started.elapsed().as_secs_f64() * 1000.0);

        let verdict = decision::verdict(&results);
        if verdict != Verdict::Admitted
            && let (Some(g), Some(limits)) = (&global, &self.global)
            && g.admitted()
        {
            limits.handle.refund(&g.checks, g.at_us);
        }
        let admitted = verdict == Verdict::Admitted;
        let headers = decision::headers(&results, admitted);
        if let Some(min) = results
            .iter()
            .filter_map(|r| match r.outcome {
                Outcome::Decided(o) => Some(o.remaining),
                _ => None,
            })
            .min()
        {
            span.record("remaining", min);
        }
        let (decision, refusal) = match verdict {
            Verdict::Admitted => {
                let decision = if results.iter().any(|r| r.outcome == Outcome::FailedOpen) {
                    Decision::StoreFailOpen
                } else if used_fallback {
                    Decision::AdmittedLocal
                } else {
                    Decision::Admitted
                };
                (decision, None)
            }
            Verdict::Rejected {
                violated,
                retry_after_secs,
            } => (
                Decision::Rejected,
                Some(too_many_requests(&violated, retry_after_secs)),
            ),
            Verdict::Unavailable { policies } => {
                (Decision::Unavailable, Some(unavailable(&policies)))
            }
        };
        span.record("decision", decision.as_str());
        for applied in &applied {
            crate::metrics::count_decision(&applied.policy.name, decision.as_str());
        }
        Checked {
            decision,
            headers,
            refusal,
        }
    }

    /// Decides the request's global policies in process (`None`: it has none).
    fn decide_global<'a>(
        &'a self,
        applied: &'a [Applied<'a>],
        policies: Option<&'a GlobalPolicies>,
    ) -> Option<GlobalDecision<'a>> {
        let (limits, policies) = (self.global.as_ref()?, policies?);
        let mut checks = Vec::new();
        let mut entries = Vec::new();
        for (i, a) in applied.iter().enumerate() {
            if !matches!(a.policy.scope, Scope::Global(_)) {
                continue;
            }
            let Some(entry) = policies.find(&a.policy.name, a.tier) else {
                continue;
            };
            checks.push(GlobalCheck {
                policy: entry.id,
                mode: entry.mode,
                key: &a.key,
                cost: a.policy.cost,
                quota: entry.quota,
            });
            entries.push((i, entry));
        }
        if checks.is_empty() {
            return None;
        }
        let (outcomes, at_us) = limits.handle.admit(&checks);
        for ((_, entry), outcome) in entries.iter().zip(&outcomes) {
            crate::metrics::count_global_decision(
                &entry.policy,
                entry.mode.as_str(),
                outcome.admitted,
            );
        }
        Some(GlobalDecision {
            checks,
            entries,
            outcomes,
            at_us,
        })
    }

    /// Serves what it can from leases, asks the store for the rest (unless the breaker is
    /// open), and falls back per policy on failure. Returns the results and whether the local
    /// fallback decided any of them.
    async fn decide(&self, applied: &[Applied<'_>]) -> (Vec<PolicyResult>, bool) {
        if let Some(results) = self.known_empty(applied) {
            return (results, false);
        }
        let draws = self.draw_leases(applied);
        let all_served: Option<Vec<PolicyResult>> = applied
            .iter()
            .zip(&draws)
            .map(|(a, draw)| match draw {
                Draw::Served(outcome) => Some(result(a, Outcome::Decided(*outcome))),
                Draw::Ask { .. } => None,
            })
            .collect();
        if let Some(results) = all_served {
            for a in applied {
                crate::metrics::count_lease_served(&a.policy.name);
            }
            return (results, false);
        }
        if !self.breaker().allow(self.origin.elapsed()) {
            self.return_leases(applied, &draws);
            return self.fallback(applied).await;
        }
        let mut answer = self.ask_store(applied, &draws).await;
        if let Ok(outcomes) = &answer
            && outcomes.iter().any(|o| !o.admitted)
            && draws
                .iter()
                .any(|draw| matches!(draw, Draw::Ask { extra } if *extra > 0))
        {
            // Refused while asking for a lease: the lease may be what did not fit. Ask again
            // for the cost alone (rare: leases are asked for only far from the limit).
            self.lease_refused(applied, &draws, outcomes);
            let plain: Vec<Draw> = draws
                .iter()
                .map(|draw| match draw {
                    Draw::Ask { .. } => Draw::Ask { extra: 0 },
                    served => *served,
                })
                .collect();
            answer = self.ask_store(applied, &plain).await;
            return self.settle(applied, &plain, answer).await;
        }
        self.settle(applied, &draws, answer).await
    }

    /// What the leases say for each bucket of the request.
    fn draw_leases(&self, applied: &[Applied<'_>]) -> Vec<Draw> {
        let now = self.now_us();
        let mut leases = self.leases();
        applied
            .iter()
            .map(|a| match a.lease_tokens() {
                // Never leasing: nothing to look up, and nothing to remember below.
                0 => Draw::Ask { extra: 0 },
                lease => leases.draw(&a.bucket.key, a.bucket.cost, lease, now),
            })
            .collect()
    }

    /// Gives back the lease tokens a request drew, when it is not admitted after all, and
    /// frees its lease requests.
    fn return_leases(&self, applied: &[Applied<'_>], draws: &[Draw]) {
        let now = self.now_us();
        let mut leases = self.leases();
        for (a, draw) in applied.iter().zip(draws) {
            match draw {
                Draw::Served(_) => leases.give_back(&a.bucket.key, a.bucket.cost, now),
                Draw::Ask { extra } if *extra > 0 => leases.unanswered(&a.bucket.key),
                Draw::Ask { .. } => {}
            }
        }
    }

    /// A request that asked for leases was refused: nothing was taken. Records what the
    /// refused buckets have left (so they stop leasing) and frees the lease requests.
    fn lease_refused(&self, applied: &[Applied<'_>], draws: &[Draw], outcomes: &[BucketOutcome]) {
        let now = self.now_us();
        let mut leases = self.leases();
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
                    leases.unanswered(&a.bucket.key);
                }
            } else {
                leases.answered(&a.bucket.key, extra, *outcome, now);
            }
        }
    }

    /// One store call for the buckets `draws` did not serve, each with its lease on top.
    /// Outcomes are in the order of those buckets.
    async fn ask_store(
        &self,
        applied: &[Applied<'_>],
        draws: &[Draw],
    ) -> Result<Vec<BucketOutcome>, StoreError> {
        let buckets: Vec<BucketRequest> = applied
            .iter()
            .zip(draws)
            .filter_map(|(a, draw)| match draw {
                Draw::Ask { extra } => Some(BucketRequest {
                    key: a.bucket.key.clone(),
                    spec: a.bucket.spec,
                    cost: a.bucket.cost.saturating_add(*extra),
                }),
                Draw::Served(_) => None,
            })
            .collect();
        let asked = buckets.len();
        // No timer of our own: every store answers within its deadline (the trait's
        // contract), and a second timer per request cost a timer-wheel insert and removal.
        let started = Instant::now();
        let answer = self.store.acquire(buckets).await;
        crate::metrics::record_store_latency(self.store.kind(), started.elapsed());
        match answer {
            Ok(outcomes) if outcomes.len() == asked => Ok(outcomes),
            Ok(outcomes) => Err(StoreError::Protocol(format!(
                "{} outcomes for {asked} buckets",
                outcomes.len()
            ))),
            Err(error) => Err(error),
        }
    }

    /// Turns the store's answer (and the lease draws) into the request's results: grants the
    /// leases of an admitted request, gives back what a refused one drew, and falls back when
    /// the store failed.
    async fn settle(
        &self,
        applied: &[Applied<'_>],
        draws: &[Draw],
        answer: Result<Vec<BucketOutcome>, StoreError>,
    ) -> (Vec<PolicyResult>, bool) {
        let outcomes = match answer {
            Ok(outcomes) => outcomes,
            Err(error) => {
                self.return_leases(applied, draws);
                self.record_failure(&error);
                return self.fallback(applied).await;
            }
        };
        if self.breaker().on_success() == Some(Transition::Closed) {
            metrics::gauge!(crate::metrics::STORE_BREAKER_OPEN, "store" => self.store.kind())
                .set(0.0);
            tracing::info!(
                store = self.store.kind(),
                "bucket store answering again, back to normal"
            );
        }
        let admitted = outcomes.iter().all(|o| o.admitted);
        let now = self.now_us();
        let mut outcomes = outcomes.into_iter();
        let mut results = Vec::with_capacity(applied.len());
        {
            let mut leases = self.leases();
            for (a, draw) in applied.iter().zip(draws) {
                let outcome = match draw {
                    Draw::Served(served) if admitted => {
                        crate::metrics::count_lease_served(&a.policy.name);
                        *served
                    }
                    Draw::Served(served) => {
                        // Not admitted after all: the drawn tokens go back to the lease.
                        leases.give_back(&a.bucket.key, a.bucket.cost, now);
                        BucketOutcome {
                            remaining: served.remaining.saturating_add(a.bucket.cost),
                            ..*served
                        }
                    }
                    Draw::Ask { extra } => {
                        // ask_store returned one outcome per asked bucket.
                        let Some(outcome) = outcomes.next() else {
                            break;
                        };
                        let leasing = a.lease_tokens() > 0;
                        if admitted && leasing {
                            leases.answered(&a.bucket.key, *extra, outcome, now)
                        } else if admitted {
                            outcome
                        } else {
                            if !outcome.admitted && leasing {
                                // Near empty: no lease asked for until an admission says
                                // otherwise.
                                leases.answered(&a.bucket.key, *extra, outcome, now);
                            } else if *extra > 0 {
                                leases.unanswered(&a.bucket.key);
                            }
                            outcome
                        }
                    }
                };
                results.push(result(a, Outcome::Decided(outcome)));
            }
        }
        if !admitted {
            let mut empty = self.empty();
            for (a, r) in applied.iter().zip(&results) {
                if let Outcome::Decided(o) = r.outcome
                    && !o.admitted
                {
                    empty.note_refused(&a.bucket.key, o.retry_after_us, now);
                }
            }
        }
        (results, false)
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        // Never held across a panic point; recover rather than propagate poisoning.
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn empty(&self) -> std::sync::MutexGuard<'_, EmptyBuckets> {
        // Never held across a panic point; recover rather than propagate poisoning.
        self.empty.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refusals without a store round trip: if a bucket of the request is known to be
    /// empty, the request is refused by it (the other policies are not reported: nothing was
    /// asked of them). `None`: ask the store.
    fn known_empty(&self, applied: &[Applied<'_>]) -> Option<Vec<PolicyResult>> {
        let now = self.now_us();
        let empty = self.empty();
        if empty.is_empty() {
            return None;
        }
        let results: Vec<PolicyResult> = applied
            .iter()
            .filter_map(|a| {
                let wait = empty.refused_for(&a.bucket.key, now)?;
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

    fn record_failure(&self, error: &StoreError) {
        let kind = match error {
            StoreError::Timeout(_) => "timeout",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Protocol(_) => "protocol",
        };
        metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL, "store" => self.store.kind(), "kind" => kind)
            .increment(1);
        if self.breaker().on_failure(self.origin.elapsed()) == Some(Transition::Opened) {
            metrics::gauge!(crate::metrics::STORE_BREAKER_OPEN, "store" => self.store.kind())
                .set(1.0);
            tracing::warn!(
                store = self.store.kind(),
                %error,
                "bucket store failing: breaker open, policies fall back to their on_store_error"
            );
        }
    }

    async fn fallback(&self, applied: &[Applied<'_>]) -> (Vec<PolicyResult>, bool) {
        let local: Vec<BucketRequest> = applied
            .iter()
            .filter(|a| a.policy.on_store_error == OnStoreError::Local)
            .map(|a| a.bucket.clone())
            .collect();
        // The memory store cannot fail; an error would only mean a bug, and is treated as
        // "store down" for those policies rather than silently admitting.
        let mut local_outcomes = if local.is_empty() {
            Vec::new().into_iter()
        } else {
            self.local
                .acquire(local)
                .await
                .unwrap_or_default()
                .into_iter()
        };
        let mut used_local = false;
        let results = applied
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
        (results, used_local)
    }
}

/// What the global check decided for one request.
struct GlobalDecision<'a> {
    checks: Vec<GlobalCheck<'a>>,
    /// Index in the request's applied policies, and the entry, per check.
    entries: Vec<(usize, &'a GlobalEntry)>,
    outcomes: Vec<GlobalOutcome>,
    /// When it was decided (for a refund).
    at_us: u64,
}

impl GlobalDecision<'_> {
    fn admitted(&self) -> bool {
        self.outcomes.iter().all(|o| o.admitted)
    }

    /// Results when a global policy refused: only the global policies are reported (the
    /// store was not asked, so nothing else is known).
    fn refusal(&self, applied: &[Applied<'_>]) -> Vec<PolicyResult> {
        self.entries
            .iter()
            .zip(&self.outcomes)
            .filter_map(|((i, entry), outcome)| {
                let a = applied.get(*i)?;
                Some(result(a, Outcome::Decided(as_bucket(outcome, entry))))
            })
            .collect()
    }

    /// Folds the (admitting) global outcomes into the store's results: a policy passes only
    /// if both its regional bucket and its global quota do, and reports the smaller
    /// remainder.
    fn merge_into(&self, results: &mut [PolicyResult]) {
        for ((i, entry), outcome) in self.entries.iter().zip(&self.outcomes) {
            let Some(r) = results.get_mut(*i) else {
                continue;
            };
            let global = as_bucket(outcome, entry);
            r.outcome = match r.outcome {
                Outcome::Decided(regional) => Outcome::Decided(BucketOutcome {
                    admitted: regional.admitted && global.admitted,
                    remaining: regional.remaining.min(global.remaining),
                    next_token_us: regional.next_token_us.max(global.next_token_us),
                    retry_after_us: regional.retry_after_us,
                }),
                // The regional bucket could not be asked and its policy says `open`: the
                // global check still stands, and it admitted.
                Outcome::FailedOpen => Outcome::Decided(global),
                Outcome::StoreDown => Outcome::StoreDown,
            };
        }
    }
}

/// A global outcome in bucket terms, for the RateLimit headers: what is left, and (when
/// nothing is) one sub-window as the time until more comes free, since admissions are
/// released a sub-window at a time.
fn as_bucket(outcome: &GlobalOutcome, entry: &GlobalEntry) -> BucketOutcome {
    let sub = entry.spec.sub_len_us();
    BucketOutcome {
        admitted: outcome.admitted,
        remaining: outcome.remaining,
        next_token_us: if outcome.remaining == 0 { sub } else { 0 },
        retry_after_us: if outcome.admitted { 0 } else { sub },
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

/// Bucket keys can hold addresses and key names: spans get a short hash instead.
fn key_hash(applied: &[Applied<'_>]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for a in applied {
        hasher.update(a.key.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(&hasher.finalize()[..8])
}

fn too_many_requests(violated: &[String], retry_after_secs: Option<u64>) -> Response {
    let mut problem = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "quota-exceeded",
        "Rate limit exceeded",
    )
    .extension("violatedPolicies", json!(violated));
    problem = match retry_after_secs {
        Some(secs) => problem
            .detail(format!(
                "quota exhausted for {}; retry in {secs} s",
                violated.join(", ")
            ))
            .retry_after(secs),
        None => problem.detail(format!(
            "the request costs more than {} allows at once: it can never be admitted",
            violated.join(", ")
        )),
    };
    problem.into_response()
}

fn unavailable(policies: &[String]) -> Response {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "rate-limit-unavailable",
        "Rate limit cannot be checked",
    )
    .detail(format!(
        "the rate-limit store is unavailable and {} refuse requests then",
        policies.join(", ")
    ))
    .extension("policies", json!(policies))
    .retry_after(1)
    .into_response()
}

fn unauthenticated(error: &IdentityError) -> Response {
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "Credentials not accepted",
    )
    .detail(error.to_string())
    .into_response();
    if matches!(
        error,
        IdentityError::InvalidToken(_) | IdentityError::Expired | IdentityError::NotYetValid
    ) {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    response
}

/// The gateway's second layer ([`crate::http::stack`]): checks the request; refuses it, or
/// passes it to `next` and adds the headers to what comes back.
pub async fn rate_limit<F, Fut>(limiter: &RateLimiter, request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let peer = crate::http::context::peer_of(&request);
    let checked = limiter
        .check(
            request.method(),
            request.uri().path(),
            request.headers(),
            peer,
        )
        .await;
    let mut response = match checked.refusal {
        Some(refusal) => refusal,
        None => next(request).await,
    };
    let headers = response.headers_mut();
    for (name, value) in checked.headers {
        headers.insert(name, value);
    }
    response.extensions_mut().insert(checked.decision);
    response
}
