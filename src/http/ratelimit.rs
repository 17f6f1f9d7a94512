//! The rate-limit layer: identify the caller, decide every matching policy in at most one
//! store round trip, and answer 429 (or 401/503) before any upstream resource is taken.
//!
//! This is the IO shell around the pure limiter machine ([`crate::limit::machine`]), which
//! decides everything: known-empty buckets, leases, the breaker, the `local` fallback and
//! the merge with the global policies. The shell identifies the caller, decides the global
//! policies from the gossiped state ([`crate::global::admission`]), asks the store when the
//! machine says so, and turns the decision into headers, a refusal and metrics.
//!
//! Global policies are decided *first*: a refusal there costs no store round trip (the cheap
//! 429 a region-hopping client deserves), and since `on_store_error` only concerns the
//! regional bucket, no store failure can bypass a global check. If the request is then
//! refused, or goes away while the store is asked, what the global check took is given back.

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;

use crate::clock::now_us;
use crate::global::GlobalLimits;
use crate::global::admission::Taken;
use crate::http::refusal;
use crate::limit::breaker::{Breaker, Transition};
use crate::limit::decision::{self, Outcome};
use crate::limit::identity::{self, IdentityConfig};
use crate::limit::machine::{Answer, Decided, Limiter, Pending, Step};
use crate::limit::policy::{self, Applied, Policy};
pub use crate::metrics::Decision;
use crate::store::{BucketOutcome, BucketRequest, BucketStore, StoreError};

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
/// the store, the machine and the global state live as long as the gateway.
pub struct RateLimiter {
    rules: ArcSwap<Rules>,
    /// The region's store (Redis, or memory when there is no Redis).
    store: Arc<dyn BucketStore>,
    /// Never held across an await, and its work is integer and map operations (amortized
    /// O(1): the tables sweep as they go), so a blocking mutex is cheaper than an async one.
    machine: Mutex<Limiter>,
    /// The deployment-wide state of global policies, when the gateway gossips.
    global: Option<Arc<GlobalLimits>>,
}

/// The result of checking one request.
pub struct Checked {
    pub decision: Decision,
    /// Headers for the response (RateLimit, RateLimit-Policy, legacy).
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
    /// Set when the request must not be forwarded.
    pub refusal: Option<Response>,
}

impl Checked {
    fn unlimited(decision: Decision, refusal: Option<Response>) -> Self {
        Self {
            decision,
            headers: Vec::new(),
            refusal,
        }
    }
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
            machine: Mutex::new(Limiter::new(breaker, ask_timeout_us)),
            global: None,
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
        self.machine().breaker_open()
    }

    fn machine(&self) -> MutexGuard<'_, Limiter> {
        // Nothing panics while it is held (the machine is pure integer and map work), so a
        // poisoned lock still guards consistent state.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the policies and the identity settings (a reload). Buckets in the store are
    /// named by policy and key, so a policy that kept its name keeps its buckets; when any
    /// policy changed, what this gateway remembers of bucket levels is forgotten.
    pub fn set_rules(&self, policies: Vec<Policy>, identity: IdentityConfig) {
        let changed = self.rules.load().policies != policies;
        self.rules.store(Arc::new(Rules { policies, identity }));
        if changed {
            self.machine().forget_levels();
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
            return Checked::unlimited(Decision::NoPolicy, None);
        }
        let identity =
            match identity::identify(&rules.identity, headers, peer, crate::clock::unix_secs()) {
                Ok(identity) => identity,
                Err(error) => {
                    let refusal = refusal::unauthenticated(&error);
                    return Checked::unlimited(Decision::Unauthenticated, Some(refusal));
                }
            };
        let applied = policy::plan(&rules.policies, method, path, &identity, headers);
        if applied.is_empty() {
            return Checked::unlimited(Decision::NoPolicy, None);
        }
        let span = self.span(&applied);
        let started = Instant::now();
        let decided = self.decide(&applied).await;
        span.record("store_latency_ms", started.elapsed().as_secs_f64() * 1000.0);
        self.report(&applied, &decided, &span);
        let admitted = decided.verdict == decision::Verdict::Admitted;
        Checked {
            decision: decided.decision,
            headers: decision::headers(&decided.results, admitted),
            refusal: refusal::for_verdict(&decided.verdict),
        }
    }

    /// Runs the machine: global policies first, then the store as often as it asks (at most
    /// twice). A drop guard gives back what the request held if it goes away mid-call.
    async fn decide<'a>(&self, applied: &'a [Applied<'a>]) -> Decided {
        let global_policies = self.global.as_ref().map(|g| g.policies());
        let (taken, global_outcomes) = match (&self.global, &global_policies) {
            (Some(limits), Some(policies)) => limits.decide(applied, policies).unzip(),
            _ => (None, None),
        };
        let mut held = Held {
            limiter: self,
            applied,
            global: taken.flatten(),
            pending: Pending::default(),
        };
        let mut step = self
            .machine()
            .begin(applied, global_outcomes.unwrap_or_default(), now_us());
        let mut last_error = None;
        let decided = loop {
            let pending = match step {
                Step::Done(decided) => break decided,
                Step::Ask(pending) => pending,
            };
            let buckets = pending.buckets(applied);
            let asked = pending.asked();
            debug_assert!(!held.pending.holds_anything(), "one claim at a time");
            held.pending = pending;
            let answer = match self.ask_store(buckets, asked).await {
                Ok(outcomes) => Answer::Outcomes(outcomes),
                Err(error) => {
                    last_error = Some(error);
                    Answer::Failed
                }
            };
            let pending = std::mem::take(&mut held.pending);
            step = self.machine().settle(pending, applied, answer, now_us());
        };
        if decided.refund_global
            && let (Some(limits), Some(taken)) = (&self.global, &held.global)
        {
            limits.give_back(taken);
        }
        // Settled: nothing left for the guard to give back.
        held.global = None;
        self.breaker_changed(decided.breaker, last_error.as_ref());
        decided
    }

    /// One store call for `buckets`, expecting `asked` outcomes; a failure is counted by kind.
    async fn ask_store(
        &self,
        buckets: Vec<BucketRequest>,
        asked: usize,
    ) -> Result<Vec<BucketOutcome>, StoreError> {
        // No timer of our own: every store answers within its deadline (the trait's
        // contract), and a second timer per request cost a timer-wheel insert and removal.
        let started = Instant::now();
        let answer = self.store.acquire(buckets).await;
        crate::metrics::record_store_latency(self.store.kind(), started.elapsed());
        let error = match answer {
            Ok(outcomes) if outcomes.len() == asked => return Ok(outcomes),
            Ok(outcomes) => {
                StoreError::Protocol(format!("{} outcomes for {asked} buckets", outcomes.len()))
            }
            Err(error) => error,
        };
        let kind = match &error {
            StoreError::Timeout(_) => "timeout",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Protocol(_) => "protocol",
        };
        metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL, "store" => self.store.kind(), "kind" => kind)
            .increment(1);
        tracing::debug!(store = self.store.kind(), %error, "bucket store call failed");
        Err(error)
    }

    /// The breaker's gauge and log line, when a request changed it.
    fn breaker_changed(&self, transition: Option<Transition>, error: Option<&StoreError>) {
        let store = self.store.kind();
        match transition {
            Some(Transition::Opened) => {
                metrics::gauge!(crate::metrics::STORE_BREAKER_OPEN, "store" => store).set(1.0);
                let error = error.map(ToString::to_string);
                tracing::warn!(
                    store,
                    error,
                    "bucket store failing: breaker open, policies fall back to their on_store_error"
                );
            }
            Some(Transition::Closed) => {
                metrics::gauge!(crate::metrics::STORE_BREAKER_OPEN, "store" => store).set(0.0);
                tracing::info!(store, "bucket store answering again, back to normal");
            }
            None => {}
        }
    }

    /// Only traces use this span: its fields appear on no log line.
    fn span(&self, applied: &[Applied<'_>]) -> tracing::Span {
        if !crate::telemetry::exporting() {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            "rate_limit",
            policy = tracing::field::Empty,
            key_hash = tracing::field::Empty,
            decision = tracing::field::Empty,
            remaining = tracing::field::Empty,
            store = self.store.kind(),
            store_latency_ms = tracing::field::Empty,
        );
        // Joining names and hashing keys costs allocations and a SHA-256 per request: only
        // pay for them when the span is recorded somewhere.
        if !span.is_disabled() {
            let policies: Vec<&str> = applied.iter().map(|a| a.policy.name.as_str()).collect();
            span.record("policy", policies.join(","));
            span.record("key_hash", key_hash(applied));
        }
        span
    }

    /// Metrics and the span's fields for a decision.
    fn report(&self, applied: &[Applied<'_>], decided: &Decided, span: &tracing::Span) {
        if decided.lease_served != 0 {
            for (i, a) in applied.iter().enumerate().take(64) {
                if decided.lease_served >> i & 1 == 1 {
                    crate::metrics::count_lease_served(&a.policy.name);
                }
            }
        }
        let remaining = decided.results.iter().filter_map(|r| match r.outcome {
            Outcome::Decided(o) => Some(o.remaining),
            _ => None,
        });
        if let Some(min) = remaining.min() {
            span.record("remaining", min);
        }
        span.record("decision", decided.decision.as_str());
        for a in applied {
            crate::metrics::count_decision(&a.policy.name, decided.decision.as_str());
        }
    }
}

/// What a request holds while the store is asked: its claim on the machine and what its
/// global policies took. Dropped with either still set (the request's future was dropped:
/// the client went away), it gives them back.
struct Held<'a> {
    limiter: &'a RateLimiter,
    applied: &'a [Applied<'a>],
    global: Option<Taken<'a>>,
    /// A claim on nothing except while the store is asked.
    pending: Pending,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.pending.holds_anything() {
            let pending = std::mem::take(&mut self.pending);
            let transition = self
                .limiter
                .machine()
                .abandon(pending, self.applied, now_us());
            self.limiter.breaker_changed(transition, None);
        }
        if let (Some(limits), Some(taken)) = (&self.limiter.global, &self.global) {
            limits.give_back(taken);
        }
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
    // No decision is what the metrics read from a response without one, and a request no
    // policy matched (a plain proxy) then costs no extension map of its own.
    if checked.decision != Decision::NoPolicy {
        response.extensions_mut().insert(checked.decision);
    }
    response
}
