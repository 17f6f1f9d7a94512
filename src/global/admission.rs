//! One request's global policies, decided in process from the gossiped state: the checks
//! handed to [`crate::gossip::proto::Gossip::admit`], the outcomes in bucket terms for the
//! limiter machine ([`crate::limit::machine`]), and the refund of what they took when the
//! request is refused anyway (or goes away) after they admitted.

use crate::gossip::proto::{GlobalCheck, GlobalOutcome};
use crate::limit::bucket::BucketOutcome;
use crate::limit::machine::GlobalOutcomes;
use crate::limit::policy::{Applied, Scope};

use super::{GlobalEntry, GlobalLimits, GlobalPolicies};

/// What a request's global policies took from the global state: given back with
/// [`GlobalLimits::give_back`] if the request is not admitted after all.
#[derive(Debug)]
pub struct Taken<'a> {
    checks: Vec<GlobalCheck<'a>>,
    /// When they were decided (a refund releases what was taken in that sub-window).
    at_us: u64,
}

impl GlobalLimits {
    /// Decides the global policies among `applied` (`None`: there are none). All admit or
    /// none does; if all did, their usage is taken and [`Taken`] says what.
    pub fn decide<'a>(
        &self,
        applied: &'a [Applied<'a>],
        policies: &GlobalPolicies,
    ) -> Option<(Option<Taken<'a>>, GlobalOutcomes)> {
        let global = |a: &Applied<'_>| matches!(a.policy.scope, Scope::Global(_));
        let count = applied.iter().filter(|a| global(a)).count();
        if count == 0 {
            return None;
        }
        // Sized once: a push into an empty vector takes the slower growth path.
        let mut checks = Vec::with_capacity(count);
        let mut entries: Vec<(usize, &GlobalEntry)> = Vec::with_capacity(count);
        for (i, a) in applied.iter().enumerate() {
            if !global(a) {
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
        let (outcomes, at_us) = self.handle.admit(&checks);
        for ((_, entry), outcome) in entries.iter().zip(&outcomes) {
            crate::metrics::count_global_decision(
                &entry.policy,
                entry.mode.as_str(),
                outcome.admitted,
            );
        }
        let admitted = outcomes.iter().all(|o| o.admitted);
        let in_bucket_terms = entries
            .iter()
            .zip(&outcomes)
            .map(|(&(i, entry), outcome)| (i, as_bucket(outcome, entry)))
            .collect();
        let taken = admitted.then_some(Taken { checks, at_us });
        Some((taken, in_bucket_terms))
    }

    /// Gives back what `taken` took (the request was refused by another policy, or went
    /// away before it was decided).
    pub fn give_back(&self, taken: &Taken<'_>) {
        self.handle.refund(&taken.checks, taken.at_us);
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
