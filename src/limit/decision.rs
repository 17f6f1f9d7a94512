//! From per-policy outcomes to one verdict and its response headers.
//!
//! Headers follow draft-ietf-httpapi-ratelimit-headers-10: `RateLimit-Policy` announces each
//! policy's quota `q` per window `w` seconds; `RateLimit` reports what is left, `r`, and `t`,
//! the seconds until more quota becomes available. A rejection's `Retry-After` is never
//! earlier than that `t`: it is the time until the request's whole cost fits.

use http::{HeaderName, HeaderValue};

use super::policy::Limit;
use crate::limit::bucket::BucketOutcome;

/// `RateLimit`: per policy, the quota left `r` and the seconds `t` until more is available.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `RateLimit-Policy`: per policy, the quota `q` per window of `w` seconds.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// Legacy `X-RateLimit-Limit`: the rate's amount of the `legacy_headers` policy with the
/// least quota left.
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// Legacy `X-RateLimit-Remaining`: that policy's whole tokens left.
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// Legacy `X-RateLimit-Reset`: seconds until that policy's next token (a delay, not a
/// timestamp).
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// How one policy fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A store (Redis, memory, or the local fallback) decided.
    Decided(BucketOutcome),
    /// The store failed and the policy says `open`: admitted without a count.
    FailedOpen,
    /// The store failed and the policy says `closed`.
    StoreDown,
}

/// A request's rate-limit outcome, as the metrics and the trace label it. The HTTP layer puts
/// it in the response's extensions (absent means no limiter ran: `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// A policy matched and the request had a token.
    Admitted,
    /// A policy matched and the request was refused (429).
    Rejected,
    /// No policy matched the request.
    NoPolicy,
    /// The store failed and the policy let the request through without counting it.
    StoreFailOpen,
    /// The store failed and an in-process fallback bucket (`on_store_error = "local"`) admitted.
    AdmittedLocal,
    /// Identity could not be established (401: unknown API key, bad token).
    Unauthenticated,
    /// The store failed and a `closed` policy refused (503).
    Unavailable,
}

impl Decision {
    /// The `decision` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::Rejected => "rejected",
            Self::NoPolicy => "none",
            Self::StoreFailOpen => "fail_open",
            Self::AdmittedLocal => "admitted_local",
            Self::Unauthenticated => "unauthenticated",
            Self::Unavailable => "unavailable",
        }
    }
}

/// One policy's result for one request.
#[derive(Debug, Clone)]
pub struct PolicyResult {
    /// The policy's name, as listed in the headers and in a [`Verdict`]. Validated as a token,
    /// so it is safe inside a quoted header string.
    pub name: String,
    /// The limit that applied (the caller's tier's), announced in `RateLimit-Policy`.
    pub limit: Limit,
    /// Whether this policy also takes part in the `X-RateLimit-*` headers.
    pub legacy_headers: bool,
    /// What the store decided, or how its failure was handled.
    pub outcome: Outcome,
}

/// The request's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No policy refused (a policy that failed open counts as admitting): forward it.
    Admitted,
    /// 429: these policies had no room.
    Rejected {
        /// Names of the policies that refused, in policy order.
        violated: Vec<String>,
        /// Whole seconds; `None` when the cost can never fit (cost above burst).
        retry_after_secs: Option<u64>,
    },
    /// 503: a `closed` policy could not be checked.
    Unavailable {
        /// Names of the `closed` policies whose store was down.
        policies: Vec<String>,
    },
}

/// Microseconds to whole seconds, rounding up so a client waiting that long is not early.
pub fn ceil_secs(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

/// Combines the policies' results: any `closed` policy with its store down makes it
/// [`Verdict::Unavailable`]; else any refusal makes it [`Verdict::Rejected`], retrying after
/// the longest wait among the refusals (at least 1 s); else [`Verdict::Admitted`].
pub fn verdict(results: &[PolicyResult]) -> Verdict {
    let down: Vec<String> = results
        .iter()
        .filter(|r| r.outcome == Outcome::StoreDown)
        .map(|r| r.name.clone())
        .collect();
    if !down.is_empty() {
        return Verdict::Unavailable { policies: down };
    }
    let mut violated = Vec::new();
    let mut retry_after: Option<u64> = Some(0);
    for result in results {
        if let Outcome::Decided(outcome) = result.outcome
            && !outcome.admitted
        {
            violated.push(result.name.clone());
            retry_after = match (retry_after, outcome.retry_after_us) {
                (_, u64::MAX) | (None, _) => None,
                (Some(max), us) => Some(max.max(ceil_secs(us).max(1))),
            };
        }
    }
    if violated.is_empty() {
        Verdict::Admitted
    } else {
        Verdict::Rejected {
            violated,
            retry_after_secs: retry_after,
        }
    }
}

/// The `RateLimit-Policy`, `RateLimit` and legacy headers for a response.
///
/// Every limited response carries them, so each value is written into one string by hand:
/// through `format!` the two headers cost about 2,500 instructions per request (callgrind),
/// more than deciding the bucket.
pub fn headers(results: &[PolicyResult], admitted: bool) -> Vec<(HeaderName, HeaderValue)> {
    if results.is_empty() {
        return Vec::new();
    }
    let mut policy = String::with_capacity(32 * results.len());
    for r in results {
        if !policy.is_empty() {
            policy.push_str(", ");
        }
        push_item(&mut policy, &r.name, "q", r.limit.rate.amount);
        policy.push_str(";w=");
        push_u64(&mut policy, r.limit.rate.window_secs());
    }
    let mut items = String::with_capacity(32 * results.len());
    let mut legacy: Option<(u64, u64, u64)> = None;
    for result in results {
        let Outcome::Decided(outcome) = result.outcome else {
            continue;
        };
        let remaining = if admitted && outcome.admitted {
            outcome.remaining
        } else if outcome.admitted {
            // Admitted by this policy but refused by another: nothing was consumed, so one
            // more request's worth is still there.
            outcome.remaining.saturating_add(1).min(result.limit.burst)
        } else {
            0
        };
        let t = ceil_secs(outcome.next_token_us);
        if !items.is_empty() {
            items.push_str(", ");
        }
        push_item(&mut items, &result.name, "r", remaining);
        items.push_str(";t=");
        push_u64(&mut items, t);
        if result.legacy_headers && legacy.is_none_or(|(_, r, _)| remaining < r) {
            legacy = Some((result.limit.rate.amount, remaining, t));
        }
    }
    let mut out = Vec::with_capacity(5);
    // Policy names are validated to be token characters, so these are valid header values.
    if let Ok(value) = HeaderValue::try_from(policy) {
        out.push((RATELIMIT_POLICY.clone(), value));
    }
    if !items.is_empty()
        && let Ok(value) = HeaderValue::try_from(items)
    {
        out.push((RATELIMIT.clone(), value));
    }
    if let Some((limit, remaining, reset)) = legacy {
        out.push((X_RATELIMIT_LIMIT.clone(), HeaderValue::from(limit)));
        out.push((X_RATELIMIT_REMAINING.clone(), HeaderValue::from(remaining)));
        out.push((X_RATELIMIT_RESET.clone(), HeaderValue::from(reset)));
    }
    out
}

/// `"name";key=value`, the start of one list member.
fn push_item(out: &mut String, name: &str, key: &str, value: u64) {
    out.push('"');
    out.push_str(name);
    out.push_str("\";");
    out.push_str(key);
    out.push('=');
    push_u64(out, value);
}

/// `n` in decimal.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        // n % 10 < 10, so the cast loses nothing.
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &digit in &digits[start..] {
        out.push(char::from(digit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::rate::Rate;
    use std::time::Duration;

    proptest::proptest! {
        #[test]
        fn numbers_print_as_display_does(n: u64) {
            let mut out = String::new();
            push_u64(&mut out, n);
            proptest::prop_assert_eq!(out, n.to_string());
        }
    }

    fn result(
        name: &str,
        admitted: bool,
        remaining: u64,
        next_us: u64,
        retry_us: u64,
    ) -> PolicyResult {
        PolicyResult {
            name: name.into(),
            limit: Limit {
                rate: Rate {
                    amount: 100,
                    period: Duration::from_secs(10),
                },
                burst: 100,
            },
            legacy_headers: false,
            outcome: Outcome::Decided(BucketOutcome {
                admitted,
                remaining,
                next_token_us: next_us,
                retry_after_us: retry_us,
            }),
        }
    }

    fn header<'a>(headers: &'a [(HeaderName, HeaderValue)], name: &HeaderName) -> &'a str {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_str().unwrap())
            .unwrap()
    }

    #[test]
    fn admitted_headers_follow_the_draft_syntax() {
        let results = [result("per-client", true, 42, 2_100_000, 0)];
        assert_eq!(verdict(&results), Verdict::Admitted);
        let h = headers(&results, true);
        assert_eq!(header(&h, &RATELIMIT_POLICY), "\"per-client\";q=100;w=10");
        assert_eq!(header(&h, &RATELIMIT), "\"per-client\";r=42;t=3");
    }

    #[test]
    fn rejection_names_violators_and_retry_after_is_not_before_t() {
        let results = [
            result("a", true, 5, 0, 0),
            result("b", false, 0, 1_500_000, 1_500_000),
            result("c", false, 0, 200_000, 3_200_000),
        ];
        assert_eq!(
            verdict(&results),
            Verdict::Rejected {
                violated: vec!["b".into(), "c".into()],
                retry_after_secs: Some(4)
            }
        );
        let h = headers(&results, false);
        assert_eq!(
            header(&h, &RATELIMIT),
            "\"a\";r=6;t=0, \"b\";r=0;t=2, \"c\";r=0;t=1"
        );
    }

    #[test]
    fn cost_above_burst_has_no_retry_after() {
        let results = [result("a", false, 100, 0, u64::MAX)];
        assert_eq!(
            verdict(&results),
            Verdict::Rejected {
                violated: vec!["a".into()],
                retry_after_secs: None
            }
        );
    }

    #[test]
    fn closed_policy_with_store_down_is_unavailable() {
        let mut down = result("strict", true, 0, 0, 0);
        down.outcome = Outcome::StoreDown;
        let mut open = result("lenient", true, 0, 0, 0);
        open.outcome = Outcome::FailedOpen;
        assert_eq!(verdict(&[open.clone()]), Verdict::Admitted);
        assert_eq!(
            verdict(&[open, down]),
            Verdict::Unavailable {
                policies: vec!["strict".into()]
            }
        );
    }

    #[test]
    fn legacy_headers_report_the_tightest_policy() {
        let mut a = result("a", true, 7, 1_000_000, 0);
        a.legacy_headers = true;
        let mut b = result("b", true, 3, 2_000_000, 0);
        b.legacy_headers = true;
        let h = headers(&[a, b], true);
        assert_eq!(header(&h, &X_RATELIMIT_REMAINING), "3");
        assert_eq!(header(&h, &X_RATELIMIT_LIMIT), "100");
        assert_eq!(header(&h, &X_RATELIMIT_RESET), "2");
    }
}
