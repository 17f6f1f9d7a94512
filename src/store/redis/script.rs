//! The Lua side of the Redis stores: the script, its arguments, and its reply.
//!
//! Everything here is pure (no IO), so the checks that keep Lua's doubles exact and the
//! parsing that turns any unexpected reply into [`StoreError::Protocol`] are unit-tested
//! without a server.

use std::collections::HashMap;
use std::sync::LazyLock;

use ::redis::{Script, ScriptInvocation, Value};

use crate::limit::bucket::BucketSpec;
use crate::store::{BucketOutcome, BucketRequest, StoreError};

/// `store/bucket.lua`, loaded once per process. `redis::Script` sends `EVALSHA` and, on
/// `NOSCRIPT` (a restarted or flushed server), `SCRIPT LOAD`s it and retries once
/// (`ScriptInvocation::invoke_async` in redis 1.x); in a cluster `SCRIPT LOAD` goes to every
/// primary.
pub(crate) static SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../bucket.lua")));

/// Largest `burst`, `interval_us` and `burst * interval_us` the script computes exactly:
/// Lua numbers are doubles, exact below 2^53, and `now` (Redis `TIME` in microseconds,
/// ~1.8e15) is added to values up to this bound. 2^52 µs is about 142 years, far beyond any
/// rate-limit window.
pub(crate) const LUA_EXACT_MAX: u64 = 1 << 52;

/// What the script does with its buckets (one request; a batch has [`batch_invocation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Take `cost` from every bucket, all or nothing.
    Acquire,
    /// Give `cost` back to every bucket, never beyond full.
    Refund,
}

impl Mode {
    fn as_arg(self) -> &'static str {
        match self {
            Self::Acquire => "acquire",
            Self::Refund => "refund",
        }
    }
}

/// Rejects buckets the script cannot decide exactly (see [`LUA_EXACT_MAX`]). A spec from
/// `BucketSpec::new` with a sane configuration always passes.
pub(crate) fn check(requests: &[BucketRequest]) -> Result<(), StoreError> {
    for request in requests {
        let spec = request.spec;
        let capacity = spec.burst.checked_mul(spec.interval_us);
        let valid = spec.interval_us >= 1
            && spec.interval_us <= LUA_EXACT_MAX
            && spec.burst <= LUA_EXACT_MAX
            && capacity.is_some_and(|c| c <= LUA_EXACT_MAX);
        if !valid {
            return Err(StoreError::Protocol(format!(
                "bucket {:?}: burst {} × interval_us {} is outside what the Redis script \
                 computes exactly (interval_us ≥ 1, each and their product ≤ 2^52)",
                request.key, spec.burst, spec.interval_us
            )));
        }
    }
    Ok(())
}

/// The `EVALSHA` for `requests` (all in one hash slot in a cluster). Call [`check`] first.
pub(crate) fn invocation<'r>(
    mode: Mode,
    requests: impl IntoIterator<Item = &'r BucketRequest>,
) -> ScriptInvocation<'static> {
    let mut invocation = SCRIPT.prepare_invoke();
    invocation.arg(mode.as_arg());
    for request in requests {
        let spec = request.spec;
        invocation
            .key(request.key.as_str())
            .arg(spec.interval_us)
            .arg(spec.burst)
            .arg(lua_cost(request));
    }
    invocation
}

/// A cost above burst is rejected whatever its size; clamping keeps it exact in Lua. `check`
/// bounds burst by 2^52, so `burst + 1` cannot overflow.
fn lua_cost(request: &BucketRequest) -> u64 {
    request.cost.min(request.spec.burst.saturating_add(1))
}

/// The `EVALSHA` deciding several requests in this order with one script run (`batch` mode of
/// `bucket.lua`). Call [`check`] on every request first.
pub(crate) fn batch_invocation<'r>(
    batch: impl ExactSizeIterator<Item = &'r [BucketRequest]>,
) -> ScriptInvocation<'static> {
    let (keys, args) = batch_layout(batch);
    let mut invocation = SCRIPT.prepare_invoke();
    invocation.arg("batch");
    for key in keys {
        invocation.key(key);
    }
    for arg in args {
        invocation.arg(arg);
    }
    invocation
}

/// KEYS and ARGV (after the mode) of a batch: every bucket kind (key and spec) once, with its
/// interval_us and burst; the number of requests; per request its bucket count, then per
/// bucket its kind's index (from 1) and cost. A hot key shared by the whole batch costs its
/// bytes and its spec once, and each of its requests three small integers.
fn batch_layout<'r>(
    batch: impl ExactSizeIterator<Item = &'r [BucketRequest]>,
) -> (Vec<&'r str>, Vec<u64>) {
    let mut keys: Vec<&str> = Vec::new();
    let mut kinds: Vec<u64> = Vec::new();
    let mut index: HashMap<(&str, BucketSpec), u64> = HashMap::new();
    let mut requests = Vec::with_capacity(1 + batch.len() * 3);
    requests.push(batch.len() as u64);
    for buckets in batch {
        requests.push(buckets.len() as u64);
        for request in buckets {
            let spec = request.spec;
            let kind = *index
                .entry((request.key.as_str(), spec))
                .or_insert_with(|| {
                    keys.push(request.key.as_str());
                    kinds.extend([spec.interval_us, spec.burst]);
                    keys.len() as u64
                });
            requests.extend([kind, lua_cost(request)]);
        }
    }
    kinds.extend(requests);
    (keys, kinds)
}

/// Parses the script's reply: 4 integers per bucket. Any other shape is a protocol error.
pub(crate) fn parse_reply(value: Value, buckets: usize) -> Result<Vec<BucketOutcome>, StoreError> {
    let items = array(value, buckets * 4)?;
    parse_outcomes(&items)
}

/// What one `batch` script run answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchDecision {
    /// Redis `TIME` in microseconds: the `now` of every decision in the batch.
    pub now_us: u64,
    /// Each request's outcomes (one per bucket, in its order), requests in batch order.
    pub outcomes: Vec<Vec<BucketOutcome>>,
}

/// Parses a `batch` reply for requests of `sizes` buckets each: Redis TIME, then 4 integers per
/// bucket. Any other shape is a protocol error.
pub(crate) fn parse_batch_reply(
    value: Value,
    sizes: &[usize],
) -> Result<BatchDecision, StoreError> {
    let buckets: usize = sizes.iter().sum();
    let items = array(value, 1 + buckets * 4)?;
    let now_us = match items.first() {
        Some(Value::Int(now)) => u64::try_from(*now).ok(),
        _ => None,
    }
    .ok_or_else(|| {
        StoreError::Protocol(format!(
            "bucket script replied {:?} where TIME was expected",
            items.first()
        ))
    })?;
    let mut all = parse_outcomes(&items[1..])?.into_iter();
    let outcomes = sizes
        .iter()
        .map(|&size| all.by_ref().take(size).collect())
        .collect();
    Ok(BatchDecision { now_us, outcomes })
}

/// The reply as an array of exactly `len` values.
fn array(value: Value, len: usize) -> Result<Vec<Value>, StoreError> {
    let Value::Array(items) = value else {
        return Err(StoreError::Protocol(format!(
            "bucket script replied {value:?}, expected an array"
        )));
    };
    if items.len() != len {
        return Err(StoreError::Protocol(format!(
            "bucket script replied {} values, expected {len}",
            items.len()
        )));
    }
    Ok(items)
}

/// 4 integers per bucket as outcomes; `items.len()` is a multiple of 4 (checked by [`array`]).
fn parse_outcomes(items: &[Value]) -> Result<Vec<BucketOutcome>, StoreError> {
    let mut numbers = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::Int(n) => numbers.push(*n),
            other => {
                return Err(StoreError::Protocol(format!(
                    "bucket script replied {other:?} where an integer was expected"
                )));
            }
        }
    }
    numbers
        .chunks_exact(4)
        .map(|chunk| {
            let &[admitted, remaining, next_token_us, retry_after_us] = chunk else {
                // `chunks_exact(4)` only yields slices of length 4.
                return Err(StoreError::Protocol("short chunk".to_owned()));
            };
            let admitted = match admitted {
                0 => false,
                1 => true,
                other => {
                    return Err(StoreError::Protocol(format!(
                        "bucket script replied admitted = {other}"
                    )));
                }
            };
            let non_negative = |name: &str, n: i64| {
                u64::try_from(n).map_err(|_| {
                    StoreError::Protocol(format!("bucket script replied {name} = {n}"))
                })
            };
            Ok(BucketOutcome {
                admitted,
                remaining: non_negative("remaining", remaining)?,
                next_token_us: non_negative("next_token_us", next_token_us)?,
                retry_after_us: if retry_after_us == -1 {
                    u64::MAX
                } else {
                    non_negative("retry_after_us", retry_after_us)?
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(burst: u64, interval_us: u64, cost: u64) -> BucketRequest {
        BucketRequest {
            key: "tollgate:rl:{t}:p".to_owned(),
            spec: BucketSpec { burst, interval_us },
            cost,
        }
    }

    #[test]
    fn check_bounds_specs_to_exact_lua_integers() {
        assert!(check(&[request(100, 36_000_000, 1)]).is_ok());
        assert!(check(&[request(1 << 20, 1 << 32, 1)]).is_ok());
        assert!(check(&[request(1, 0, 1)]).is_err());
        assert!(check(&[request(1 << 21, 1 << 32, 1)]).is_err());
        assert!(check(&[request(u64::MAX, u64::MAX, 1)]).is_err());
        assert!(check(&[request(0, u64::MAX, 1)]).is_err());
        assert!(check(&[request(0, 1, u64::MAX)]).is_ok(), "cost is clamped");
    }

    fn keyed(key: &str, burst: u64, cost: u64) -> BucketRequest {
        BucketRequest {
            key: key.to_owned(),
            spec: BucketSpec {
                burst,
                interval_us: 10,
            },
            cost,
        }
    }

    #[test]
    fn batch_layout_sends_each_kind_once_and_clamps_costs() {
        let first = [keyed("hot", 5, 1), keyed("a", 2, 9)];
        let second = [keyed("hot", 5, 2)];
        // "a" with another burst (a reloaded policy) is another kind.
        let third = [keyed("b", 3, 1), keyed("hot", 5, 1), keyed("a", 4, 1)];
        let batch: [&[BucketRequest]; 3] = [&first, &second, &third];
        let (keys, args) = batch_layout(batch.into_iter());
        assert_eq!(keys, ["hot", "a", "b", "a"]);
        assert_eq!(
            args,
            [
                10, 5, 10, 2, 10, 3, 10, 4, // interval and burst per kind
                3, // requests
                2, 1, 1, 2, 3, // a's cost 9 > burst 2: clamped to 3
                1, 1, 2, // hot again: kind 1
                3, 3, 1, 1, 1, 4, 1,
            ]
        );
    }

    #[test]
    fn batch_reply_is_split_per_request() {
        let outcome = |remaining| {
            [
                Value::Int(1),
                Value::Int(remaining),
                Value::Int(0),
                Value::Int(0),
            ]
        };
        let mut items = vec![Value::Int(1_700_000_000_000_000)];
        for remaining in [4, 3, 2] {
            items.extend(outcome(remaining));
        }
        let decision = parse_batch_reply(Value::Array(items.clone()), &[2, 1]).expect("valid");
        assert_eq!(decision.now_us, 1_700_000_000_000_000);
        let remaining: Vec<Vec<u64>> = decision
            .outcomes
            .iter()
            .map(|request| request.iter().map(|o| o.remaining).collect())
            .collect();
        assert_eq!(remaining, [vec![4, 3], vec![2]]);

        let wrong_sizes = parse_batch_reply(Value::Array(items.clone()), &[1, 1]);
        assert!(matches!(wrong_sizes, Err(StoreError::Protocol(_))));
        items[0] = Value::Int(-1);
        let negative_time = parse_batch_reply(Value::Array(items), &[2, 1]);
        assert!(matches!(negative_time, Err(StoreError::Protocol(_))));
        let no_time = parse_batch_reply(Value::Array(outcome(1).to_vec()), &[1]);
        assert!(matches!(no_time, Err(StoreError::Protocol(_))));
    }

    #[test]
    fn parse_maps_never_and_rejects_odd_shapes() {
        let ok = Value::Array(vec![
            Value::Int(0),
            Value::Int(3),
            Value::Int(10),
            Value::Int(-1),
        ]);
        assert_eq!(
            parse_reply(ok, 1).expect("valid"),
            [BucketOutcome {
                admitted: false,
                remaining: 3,
                next_token_us: 10,
                retry_after_us: u64::MAX,
            }]
        );
        let bad = [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![Value::Int(1); 3]),
            Value::Array(vec![
                Value::Int(2),
                Value::Int(0),
                Value::Int(0),
                Value::Int(0),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::Int(-5),
                Value::Int(0),
                Value::Int(0),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::Int(0),
                Value::Int(0),
                Value::Int(-2),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"x".to_vec()),
                Value::Int(0),
                Value::Int(0),
            ]),
        ];
        for value in bad {
            assert!(
                matches!(parse_reply(value.clone(), 1), Err(StoreError::Protocol(_))),
                "{value:?}"
            );
        }
    }
}
