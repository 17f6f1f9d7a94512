//! The Lua side of the Redis stores: the script, its arguments, and its reply.
//!
//! Everything here is pure (no IO), so the checks that keep Lua's doubles exact and the
//! parsing that turns any unexpected reply into [`StoreError::Protocol`] are unit-tested
//! without a server.

use std::sync::LazyLock;

use ::redis::{Script, ScriptInvocation, Value};

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

/// What the script does with its buckets.
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
        // A cost above burst is rejected whatever its size; clamping keeps it exact in Lua.
        // `check` bounds burst by 2^52, so `burst + 1` cannot overflow.
        let cost = request.cost.min(spec.burst.saturating_add(1));
        invocation
            .key(request.key.as_str())
            .arg(spec.interval_us)
            .arg(spec.burst)
            .arg(cost);
    }
    invocation
}

/// Parses the script's reply: 4 integers per bucket. Any other shape is a protocol error.
pub(crate) fn parse_reply(value: Value, buckets: usize) -> Result<Vec<BucketOutcome>, StoreError> {
    let Value::Array(items) = value else {
        return Err(StoreError::Protocol(format!(
            "bucket script replied {value:?}, expected an array"
        )));
    };
    if items.len() != buckets * 4 {
        return Err(StoreError::Protocol(format!(
            "bucket script replied {} values for {buckets} buckets, expected {}",
            items.len(),
            buckets * 4
        )));
    }
    let mut numbers = Vec::with_capacity(items.len());
    for item in &items {
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
    use crate::limit::bucket::BucketSpec;

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
