//! The Redis bucket stores against real `redis-server` processes: exact admissions, atomicity
//! under concurrency, all-or-nothing, TTLs, script reloads, and the failure modes the gateway
//! must survive (Redis killed, frozen, not yet started), plus Redis Cluster.
//!
//! Every test starts its own server(s); none is skipped when Redis is missing (the support
//! module fails the test instead). Waits for recovery poll with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis::aio::MultiplexedConnection;
use tollgate::limit::bucket::{self, BucketSpec};
use tollgate::store::redis::{MAX_BATCH_REQUESTS, RedisClusterStore, RedisStore};
use tollgate::store::{BucketOutcome, BucketRequest, BucketStore, StoreError};

use support::{RedisCluster, RedisServer};

/// The store's deadline where a test checks answers: far beyond any stall of a loaded CI
/// machine (the first call also connects and loads the script within it).
const TIMEOUT: Duration = Duration::from_secs(5);
/// The deadline where a test checks that a dead or frozen Redis fails fast.
const SHORT_TIMEOUT: Duration = Duration::from_millis(50);
/// A refill so slow that the milliseconds a test takes do not change any count.
const HOUR_US: u64 = 3_600_000_000;
/// How long a recovery may take before the test fails.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(5);

fn request(key: &str, burst: u64, interval_us: u64, cost: u64) -> BucketRequest {
    BucketRequest {
        key: key.to_owned(),
        spec: BucketSpec { burst, interval_us },
        cost,
    }
}

/// One token per hour, capacity `burst`.
fn slow(key: &str, burst: u64) -> BucketRequest {
    request(key, burst, HOUR_US, 1)
}

async fn admin(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("valid url")
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection")
}

/// Redis `TIME` in microseconds.
async fn redis_now(conn: &mut MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    secs * 1_000_000 + micros
}

/// How many `EVALSHA` commands the server has run (`INFO commandstats`).
async fn evalsha_calls(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .map(|rest| {
            rest.split(',')
                .next()
                .and_then(|calls| calls.parse().ok())
                .expect("a call count")
        })
        .unwrap_or(0)
}

/// A small xorshift generator: the randomized tests replay the same cases on every run.
fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below.max(1)
    }
}

async fn one(store: &dyn BucketStore, request: &BucketRequest) -> BucketOutcome {
    let outcomes = store
        .acquire(vec![request.clone()])
        .await
        .expect("store answers");
    assert_eq!(outcomes.len(), 1);
    outcomes[0]
}

/// Polls `acquire` until it succeeds; returns how long that took. Fails after the deadline.
async fn wait_until_working(store: &dyn BucketStore, request: &BucketRequest) -> Duration {
    let start = Instant::now();
    loop {
        match store.acquire(vec![request.clone()]).await {
            Ok(_) => {
                eprintln!("store working after {:?}", start.elapsed());
                return start.elapsed();
            }
            Err(error) => assert!(
                start.elapsed() < RECOVERY_DEADLINE,
                "store still failing after {RECOVERY_DEADLINE:?}: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The acquire fails, and within `limit`.
async fn fails_within(
    store: &dyn BucketStore,
    request: &BucketRequest,
    limit: Duration,
) -> StoreError {
    let start = Instant::now();
    let result = store.acquire(vec![request.clone()]).await;
    let took = start.elapsed();
    eprintln!("failed in {took:?}: {result:?}");
    assert!(took < limit, "acquire took {took:?} (limit {limit:?})");
    match result {
        Ok(outcomes) => panic!("expected an error, got {outcomes:?}"),
        Err(error) => error,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_then_rejection_with_exact_remaining_and_retry_after() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), TIMEOUT).expect("store");
    assert_eq!(store.kind(), "redis");
    store.ping().await.expect("ping");
    let req = slow("tollgate:rl:{ip:203.0.113.7}:per-client", 3);

    let start = Instant::now();
    for expected in [2, 1, 0] {
        let o = one(&store, &req).await;
        assert!(o.admitted);
        assert_eq!((o.remaining, o.retry_after_us), (expected, 0));
        assert!(o.next_token_us <= HOUR_US && o.next_token_us > HOUR_US - 60_000_000);
    }
    let rejected = one(&store, &req).await;
    let elapsed_us = start.elapsed().as_micros() as u64 + 1_000;
    assert!(!rejected.admitted);
    assert_eq!(rejected.remaining, 0);
    // The first token comes back one interval after the first draw.
    assert!(
        rejected.retry_after_us <= HOUR_US && rejected.retry_after_us >= HOUR_US - elapsed_us,
        "retry_after {} µs",
        rejected.retry_after_us
    );
    assert_eq!(rejected.next_token_us, rejected.retry_after_us);

    // A cost above burst is never admitted.
    let huge = request(&req.key, 3, HOUR_US, 4);
    let never = one(&store, &huge).await;
    assert!(!never.admitted);
    assert_eq!(never.retry_after_us, u64::MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_independent() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), TIMEOUT).expect("store");
    let a = slow("tollgate:rl:{a}:p", 1);
    let b = slow("tollgate:rl:{b}:p", 1);
    assert!(one(&store, &a).await.admitted);
    assert!(!one(&store, &a).await.admitted);
    assert!(one(&store, &b).await.admitted, "a's bucket is not b's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_acquires_admit_exactly_burst() {
    let server = RedisServer::start();
    // A generous deadline: this measures atomicity, not latency on a loaded CI machine.
    let store = Arc::new(RedisStore::new(&server.url(), Duration::from_secs(10)).expect("store"));
    let req = Arc::new(slow("tollgate:rl:{hot}:p", 100));
    let tasks = (0..1000).map(|_| {
        let store = store.clone();
        let req = req.clone();
        tokio::spawn(async move { one(&*store, &req).await.admitted })
    });
    let admitted = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .filter(|&admitted| admitted)
        .count();
    assert_eq!(admitted, 100);
}

/// The batcher under a burst of concurrent acquires on one hot key: exactly `burst` admitted,
/// each remaining count handed out once, in fewer script runs than requests. How many fewer
/// depends on how fast the tasks are spawned against how fast Redis answers, so the test
/// after this one pins batching down with a frozen Redis instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquires_are_batched_and_still_exact() {
    let server = RedisServer::start();
    let store = Arc::new(RedisStore::new(&server.url(), Duration::from_secs(10)).expect("store"));
    let mut conn = admin(&server.url()).await;
    // Loads the script, so NOSCRIPT retries do not count below.
    one(&*store, &slow("tollgate:rl:{warm}:p", 1)).await;
    let req = Arc::new(slow("tollgate:rl:{hot}:p", 300));
    let before = evalsha_calls(&mut conn).await;
    let tasks = (0..2000).map(|_| {
        let store = store.clone();
        let req = req.clone();
        tokio::spawn(async move { one(&*store, &req).await })
    });
    let outcomes: Vec<BucketOutcome> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let calls = evalsha_calls(&mut conn).await - before;
    eprintln!("2000 concurrent acquires: {calls} script runs");
    assert_eq!(outcomes.iter().filter(|o| o.admitted).count(), 300);
    // Every remaining count from 299 down to 0 was handed out exactly once.
    let mut remaining: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.admitted)
        .map(|o| o.remaining)
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..300).collect::<Vec<u64>>());
    assert!(
        calls < 2000,
        "{calls} script runs for 2000 requests: batches did not form"
    );
    assert!(calls as usize >= 2000 / MAX_BATCH_REQUESTS, "the cap holds");
}

/// Requests that arrive while a batch is out are sent together, in arrival order, as soon as
/// it answers. Redis is frozen so that the first batch stays out while the others queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_behind_a_batch_go_in_one_script_run() {
    let server = RedisServer::start();
    let store = Arc::new(RedisStore::new(&server.url(), Duration::from_secs(10)).expect("store"));
    let mut conn = admin(&server.url()).await;
    one(&*store, &slow("tollgate:rl:{warm}:p", 1)).await;
    let before = evalsha_calls(&mut conn).await;

    let pid = Pid::from_raw(i32::try_from(server.pid()).expect("pid fits i32"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let queued = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let store = store.clone();
            let queued = queued.clone();
            tokio::spawn(async move {
                let req = slow("tollgate:rl:{q}:p", 60);
                let acquire = store.acquire(vec![req.clone()]);
                tokio::pin!(acquire);
                // The first poll hands the request to the batcher.
                assert!(futures_util::poll!(&mut acquire).is_pending());
                queued.fetch_add(1, Ordering::SeqCst);
                (i, acquire.await.expect("answered after SIGCONT")[0])
            })
        })
        .collect();
    let start = Instant::now();
    while queued.load(Ordering::SeqCst) < 100 {
        assert!(start.elapsed() < RECOVERY_DEADLINE, "tasks did not start");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let outcomes: Vec<(usize, BucketOutcome)> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let calls = evalsha_calls(&mut conn).await - before;
    assert_eq!(outcomes.iter().filter(|(_, o)| o.admitted).count(), 60);
    // One batch was out when Redis froze (two if another was sent before the first came
    // back; none if the batcher woke only after all had queued); everything else waited for
    // it and went in one more.
    assert!((1..=3).contains(&calls), "{calls} script runs");
}

/// In one batch, an earlier request drains a key; a later request on that key and another
/// is refused as a whole and takes nothing from the other key, which the next request sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_drained_by_an_earlier_one_in_its_batch_takes_nothing() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), Duration::from_secs(5)).expect("store");
    let mut conn = admin(&server.url()).await;
    let hot = request("tollgate:rl:{b}:hot", 2, HOUR_US, 2);
    let other = slow("tollgate:rl:{b}:other", 5);
    let drain = [hot.clone()];
    let both = [request(&hot.key, 2, HOUR_US, 1), other.clone()];
    let after = [other.clone()];
    let decision = store
        .acquire_batch(&[&drain, &both, &after])
        .await
        .expect("batch");
    let [drained, refused, next] = &decision.outcomes[..] else {
        panic!("three answers expected: {decision:?}");
    };
    assert!(drained[0].admitted);
    assert_eq!(drained[0].remaining, 0);
    assert!(!refused[0].admitted, "hot was drained by the first request");
    assert_eq!(refused[0].retry_after_us, HOUR_US);
    assert!(refused[1].admitted, "other had room...");
    assert_eq!(
        refused[1].remaining, 5,
        "...and reports its untouched level"
    );
    assert!(next[0].admitted);
    assert_eq!(next[0].remaining, 4, "the refused request consumed nothing");
    let stored: u64 = redis::cmd("GET")
        .arg(&other.key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(stored, decision.now_us + HOUR_US, "exactly one draw");
}

/// What `acquire` decides for one request at `now`, by `bucket::decide` per bucket, all or
/// nothing, given every key's TAT in `state` (absent: full); updates `state` when admitted.
fn model_request(
    state: &mut HashMap<String, u64>,
    requests: &[BucketRequest],
    now: u64,
) -> Vec<BucketOutcome> {
    let mut draws: HashMap<&str, u64> = HashMap::new();
    let decided: Vec<(bucket::BucketDecision, u64)> = requests
        .iter()
        .map(|r| {
            let before = state.get(&r.key).copied().unwrap_or(0);
            let tat = draws.get(r.key.as_str()).copied().unwrap_or(before);
            let d = bucket::decide(r.spec, tat, now, r.cost);
            if d.admitted {
                draws.insert(&r.key, d.tat_us);
            }
            (d, before)
        })
        .collect();
    let all = decided.iter().all(|(d, _)| d.admitted);
    if all {
        for (key, tat) in draws {
            state.insert(key.to_owned(), tat);
        }
    }
    decided
        .into_iter()
        .zip(requests)
        .map(|((d, before), r)| {
            if all || !d.admitted {
                BucketOutcome {
                    admitted: d.admitted,
                    remaining: d.remaining,
                    next_token_us: d.next_token_us,
                    retry_after_us: d.retry_after_us,
                }
            } else {
                // Had room, but the request was refused: the bucket as it is.
                let level = bucket::decide(r.spec, before, now, 0);
                BucketOutcome {
                    admitted: true,
                    remaining: level.remaining,
                    next_token_us: level.next_token_us,
                    retry_after_us: 0,
                }
            }
        })
        .collect()
}

/// Random batches against the sequential model at the `now` the script reports: every
/// outcome and every stored TAT must be what deciding the requests one by one at that instant
/// gives. Keys come from a small pool, so requests in a batch collide, drain each other, list
/// a key twice, and cost more than the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_matches_sequential_decide_to_the_microsecond() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), Duration::from_secs(5)).expect("store");
    let mut conn = admin(&server.url()).await;
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let mut refused_as_a_whole = 0;
    for case in 0..200 {
        let keys: Vec<String> = (0..1 + next(5))
            .map(|k| format!("tollgate:rl:{{batch}}:{case}:{k}"))
            .collect();
        let specs: Vec<BucketSpec> = keys
            .iter()
            .map(|_| {
                let burst_below = if next(4) == 0 { 1 << 20 } else { 6 };
                let interval_below = if next(2) == 0 { 1 << 32 } else { 5_000 };
                let burst = 1 + next(burst_below);
                let interval_us = 1 + next(interval_below);
                BucketSpec { burst, interval_us }
            })
            .filter(|s| {
                s.burst
                    .checked_mul(s.interval_us)
                    .is_some_and(|c| c <= 1 << 52)
            })
            .collect();
        if specs.is_empty() {
            continue;
        }
        let before = redis_now(&mut conn).await;
        let mut state: HashMap<String, u64> = HashMap::new();
        for (key, spec) in keys.iter().zip(&specs) {
            if next(3) == 0 {
                continue; // absent: a full bucket
            }
            let capacity = spec.full_refill_us();
            let offset = next(capacity * 2 + 2) as i64 - (capacity / 2) as i64;
            let tat = before.saturating_add_signed(offset);
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg(tat)
                .query_async(&mut conn)
                .await
                .expect("SET");
            state.insert(key.clone(), tat);
        }
        let batch: Vec<Vec<BucketRequest>> = (0..1 + next(12))
            .map(|_| {
                (0..1 + next(3))
                    .map(|_| {
                        let k = next(specs.len() as u64) as usize;
                        let spec = specs[k];
                        BucketRequest {
                            key: keys[k].clone(),
                            spec,
                            cost: next(spec.burst.min(4) + 2),
                        }
                    })
                    .collect()
            })
            .collect();
        let slices: Vec<&[BucketRequest]> = batch.iter().map(Vec::as_slice).collect();
        let decision = store.acquire_batch(&slices).await.expect("batch");
        let after = redis_now(&mut conn).await;
        let now = decision.now_us;
        assert!((before..=after).contains(&now), "case {case}: TIME {now}");

        let initial = state.clone();
        let mut written: HashSet<&str> = HashSet::new();
        for (i, (requests, got)) in batch.iter().zip(&decision.outcomes).enumerate() {
            let expected = model_request(&mut state, requests, now);
            assert_eq!(
                got, &expected,
                "case {case}, request {i} of {batch:?} at {now} from {initial:?}"
            );
            if got.iter().all(|o| o.admitted) {
                written.extend(requests.iter().map(|r| r.key.as_str()));
            } else if got.iter().any(|o| o.admitted) {
                refused_as_a_whole += 1;
            }
        }
        for key in &keys {
            let stored: Option<u64> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("GET");
            let model = state.get(key).copied();
            if !written.contains(key.as_str()) {
                assert_eq!(stored, model, "case {case}: {key} was not to be written");
            } else if let Some(tat) = model.filter(|&tat| tat > now) {
                // Written with PX: it may have expired since if it was almost full.
                assert!(
                    stored == Some(tat) || (stored.is_none() && tat <= redis_now(&mut conn).await),
                    "case {case}: {key} stored {stored:?}, model {tat}"
                );
            } else {
                assert_eq!(stored, None, "case {case}: {key} is full again: deleted");
            }
        }
    }
    assert!(
        refused_as_a_whole > 10,
        "the cases exercise all-or-nothing ({refused_as_a_whole})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_batch_arguments_are_a_script_error() {
    let server = RedisServer::start();
    let mut conn = admin(&server.url()).await;
    let script = redis::Script::new(include_str!("../src/store/bucket.lua"));
    let cases: [&[&str]; 5] = [
        &["batch"],
        &["batch", "10", "5", "2", "1", "1", "1"], // one request announced twice
        &["batch", "10", "5", "1", "1", "2", "1"], // kind beyond KEYS
        &["batch", "10", "5", "1", "1", "1", "1", "7"], // trailing argument
        &["batches"],
    ];
    let mut valid = script.key("tollgate:rl:{m}:p");
    valid.arg(&["batch", "10", "5", "1", "1", "1", "1"]);
    let reply: Vec<i64> = valid.invoke_async(&mut conn).await.expect("a valid batch");
    assert_eq!(reply[1..], [1, 4, 10, 0]);
    for args in cases {
        let mut invocation = script.key("tollgate:rl:{m}:p");
        for arg in args {
            invocation.arg(*arg);
        }
        let result = invocation.invoke_async::<redis::Value>(&mut conn).await;
        assert!(result.is_err(), "{args:?} answered {result:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_by_one_bucket_consumes_nothing_from_the_other() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), TIMEOUT).expect("store");
    let wide = slow("tollgate:rl:{c}:wide", 5);
    let narrow = slow("tollgate:rl:{c}:narrow", 1);
    let both = [wide.clone(), narrow.clone()];

    let first = store.acquire(both.to_vec()).await.expect("ok");
    assert!(first.iter().all(|o| o.admitted));
    assert_eq!((first[0].remaining, first[1].remaining), (4, 0));

    let mut conn = admin(&server.url()).await;
    let tat_before: u64 = redis::cmd("GET")
        .arg(&wide.key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    let second = store.acquire(both.to_vec()).await.expect("ok");
    assert!(!second[1].admitted, "narrow is empty");
    assert!(second[0].admitted, "wide had room");
    assert_eq!(second[0].remaining, 4, "wide reports its untouched level");
    let tat_after: u64 = redis::cmd("GET")
        .arg(&wide.key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(tat_before, tat_after, "nothing was written");
    assert_eq!(one(&store, &wide).await.remaining, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_written_key_expires_within_one_refill() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), TIMEOUT).expect("store");
    let mut conn = admin(&server.url()).await;
    let requests = [
        request("tollgate:rl:{t}:a", 10, 1_000_000, 3), // 3 s to refill what it takes
        request("tollgate:rl:{t}:b", 2, HOUR_US, 1),
        request("tollgate:rl:{t}:c", 1, 1_500, 1), // 1.5 ms: PX rounds up
    ];
    assert!(
        store
            .acquire(requests.to_vec())
            .await
            .expect("ok")
            .iter()
            .all(|o| o.admitted)
    );
    for req in &requests {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&req.key)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        let full_ms = req.spec.full_refill_us().div_ceil(1000) as i64 + 1;
        // `c` may already have expired (full again) by the time PTTL runs: -2, never -1.
        assert!(pttl != -1, "{} has no TTL", req.key);
        if req.key.ends_with(":c") && pttl == -2 {
            continue;
        }
        assert!(
            pttl > 0 && pttl <= full_ms,
            "{}: PTTL {pttl}, full refill {full_ms} ms",
            req.key
        );
    }
}

/// The script against `decide` with the same TAT and a `now` between the Redis `TIME` before
/// and after the call: for random specs (up to the exactness bound), costs and stored TATs,
/// the outcome and the stored TAT must equal `decide` at one of those instants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_matches_decide_to_the_microsecond() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), Duration::from_secs(5)).expect("store");
    let mut conn = admin(&server.url()).await;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below.max(1)
    };
    for case in 0..300 {
        let burst = 1 + next(if case % 3 == 0 { 1 << 20 } else { 20 });
        let interval_us = 1 + next(if case % 2 == 0 { 1 << 32 } else { 5_000 });
        if burst.checked_mul(interval_us).is_none_or(|c| c > 1 << 52) {
            continue;
        }
        let capacity = burst * interval_us;
        let cost = next(burst + 3);
        let key = format!("tollgate:rl:{{prop}}:{case}");
        let req = request(&key, burst, interval_us, cost);

        let before = redis_now(&mut conn).await;
        // A stored TAT anywhere from long past to beyond capacity (as after a shrunk burst).
        let offset = next(capacity * 2 + 2) as i64 - (capacity / 2) as i64;
        let tat = before.saturating_add_signed(offset);
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(tat)
            .query_async(&mut conn)
            .await
            .expect("SET");
        let outcome = one(&store, &req).await;
        let after = redis_now(&mut conn).await;
        let stored: Option<u64> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("GET");

        let matches = (before..=after).any(|now| {
            let d = bucket::decide(req.spec, tat, now, cost);
            let expected_stored = if !d.admitted {
                Some(tat)
            } else if d.tat_us > now {
                Some(d.tat_us)
            } else {
                None
            };
            let same_outcome = d.admitted == outcome.admitted
                && d.remaining == outcome.remaining
                && d.next_token_us == outcome.next_token_us
                && d.retry_after_us == outcome.retry_after_us;
            // An admitted write may have expired already if the bucket was almost full.
            same_outcome && (stored == expected_stored || (stored.is_none() && d.admitted))
        });
        assert!(
            matches,
            "case {case}: burst {burst} interval {interval_us} cost {cost} tat {tat} \
             now {before}..={after}: got {outcome:?}, stored {stored:?}, decide at start {:?}",
            bucket::decide(req.spec, tat, before, cost)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_is_recovered_by_reloading() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), TIMEOUT).expect("store");
    let req = slow("tollgate:rl:{s}:p", 5);
    assert_eq!(one(&store, &req).await.remaining, 4);
    let mut conn = admin(&server.url()).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("SCRIPT FLUSH");
    assert_eq!(
        one(&store, &req).await.remaining,
        3,
        "NOSCRIPT → SCRIPT LOAD → retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_fails_fast_and_a_restart_on_the_same_port_is_used_within_a_second() {
    let server = RedisServer::start();
    let port = server.port();
    let store = RedisStore::new(&server.url(), SHORT_TIMEOUT).expect("store");
    let req = slow("tollgate:rl:{k}:p", 1000);
    // Connected and the script loaded (retried: a stall may exceed the short deadline once).
    wait_until_working(&store, &req).await;

    drop(server); // SIGKILL and reap
    for _ in 0..5 {
        let error = fails_within(&store, &req, Duration::from_millis(300)).await;
        assert!(
            matches!(error, StoreError::Unavailable(_) | StoreError::Timeout(_)),
            "{error:?}"
        );
    }
    assert!(store.ping().await.is_err());

    let _server = RedisServer::start_on(port);
    let took = wait_until_working(&store, &req).await;
    assert!(took < Duration::from_secs(1), "recovered after {took:?}");
    store.ping().await.expect("ping after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_times_out_within_the_deadline_and_recovers_after_sigcont() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), SHORT_TIMEOUT).expect("store");
    let req = slow("tollgate:rl:{f}:p", 1000);
    wait_until_working(&store, &req).await;

    let pid = Pid::from_raw(i32::try_from(server.pid()).expect("pid fits i32"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    // Long enough for the store to give up on the silent connection and open another one
    // (which the frozen server's kernel accepts but never answers).
    let frozen = Instant::now();
    let mut calls = 0;
    while frozen.elapsed() < Duration::from_millis(1500) {
        let error = fails_within(&store, &req, Duration::from_millis(200)).await;
        assert!(matches!(error, StoreError::Timeout(_)), "{error:?}");
        calls += 1;
    }
    assert!(calls >= 5);
    assert!(matches!(store.ping().await, Err(StoreError::Timeout(_))));
    // Concurrent waiters share batches: each still gets its Timeout within its deadline.
    let waiters = (0..20).map(|_| fails_within(&store, &req, Duration::from_millis(200)));
    for error in join_all(waiters).await {
        assert!(matches!(error, StoreError::Timeout(_)), "{error:?}");
    }

    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let took = wait_until_working(&store, &req).await;
    assert!(took < Duration::from_secs(1), "recovered after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_made_while_redis_is_down_is_unavailable_then_works() {
    let port = support::free_port();
    let store = RedisStore::new(&format!("redis://127.0.0.1:{port}/"), SHORT_TIMEOUT)
        .expect("construction needs no server");
    let req = slow("tollgate:rl:{d}:p", 5);
    for _ in 0..3 {
        let error = fails_within(&store, &req, Duration::from_millis(300)).await;
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    }

    let _server = RedisServer::start_on(port);
    let took = wait_until_working(&store, &req).await;
    assert!(took < Duration::from_secs(1), "usable after {took:?}");
}

/// The batcher task dies with the runtime it was started on; the store starts a new one on
/// the next call instead of staying dead.
#[test]
fn a_store_outlives_the_runtime_that_started_its_batcher() {
    let server = RedisServer::start();
    let req = slow("tollgate:rl:{rt}:p", 5);
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let first = runtime();
    let store = first.block_on(async {
        let store = RedisStore::new(&server.url(), TIMEOUT).expect("store");
        assert_eq!(one(&store, &req).await.remaining, 4);
        store
    });
    drop(first);
    runtime().block_on(async {
        wait_until_working(&store, &req).await;
        assert!(one(&store, &req).await.remaining <= 2);
    });
}

#[test]
fn construction_outside_a_runtime_does_not_panic_and_bad_urls_fail() {
    assert!(RedisStore::new("redis://127.0.0.1:1/", TIMEOUT).is_ok());
    assert!(RedisStore::new("not a url", TIMEOUT).is_err());
    assert!(RedisStore::new("http://127.0.0.1/", TIMEOUT).is_err());
}

/// Many acquires on one connection, one after another and then 4,000 at once: every one is
/// answered and counted exactly. (How fast is `cargo bench`'s business; the times printed
/// here are only for the log.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_and_concurrent_acquires_on_one_connection_are_all_counted() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), TIMEOUT).expect("store");
    let burst = 1 << 20;
    let reqs = [
        slow("tollgate:rl:{ip:203.0.113.7}:per-client", burst),
        slow("tollgate:rl:{ip:203.0.113.7}:per-route", burst),
    ];
    let start = Instant::now();
    for taken in 1..=2000 {
        let outcomes = store.acquire(reqs.to_vec()).await.expect("acquire");
        for outcome in outcomes {
            assert!(outcome.admitted);
            assert_eq!(outcome.remaining, burst - taken);
        }
    }
    eprintln!(
        "2000 sequential acquires (2 buckets each): {:?}",
        start.elapsed()
    );

    let store = Arc::new(store);
    let start = Instant::now();
    let tasks = (0..4000).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let req = slow(&format!("tollgate:rl:{{c{}}}:p", i % 50), burst);
            one(&*store, &req).await
        })
    });
    let mut remaining: Vec<u64> = join_all(tasks)
        .await
        .into_iter()
        .map(|task| task.expect("task"))
        .inspect(|outcome| assert!(outcome.admitted))
        .map(|outcome| outcome.remaining)
        .collect();
    eprintln!("4000 concurrent acquires: {:?}", start.elapsed());
    // 50 keys, 80 acquires each: every key handed out each of its top 80 counts once.
    remaining.sort_unstable();
    let expected: Vec<u64> = (burst - 80..burst)
        .flat_map(|count| std::iter::repeat_n(count, 50))
        .collect();
    assert_eq!(remaining, expected);
}

// ----- Redis Cluster -----

async fn cluster_admin(cluster: &RedisCluster) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.urls())
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("cluster admin connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_exact_burst_on_one_tagged_key() {
    let cluster = RedisCluster::start();
    let store = RedisClusterStore::new(&cluster.urls(), TIMEOUT).expect("store");
    assert_eq!(store.kind(), "redis-cluster");
    let req = slow("tollgate:rl:{ip:198.51.100.1}:per-client", 3);
    wait_until_working(&store, &slow("tollgate:rl:{warm}:p", 1)).await;
    store.ping().await.expect("ping");
    for expected in [2, 1, 0] {
        let o = one(&store, &req).await;
        assert!(o.admitted);
        assert_eq!(o.remaining, expected);
    }
    let rejected = one(&store, &req).await;
    assert!(!rejected.admitted);
    assert!(rejected.retry_after_us <= HOUR_US && rejected.retry_after_us > HOUR_US - 60_000_000);

    // Two buckets with one tag: one script call, atomic.
    let pair = [
        slow("tollgate:rl:{u:1}:a", 2),
        slow("tollgate:rl:{u:1}:b", 1),
    ];
    assert!(
        store
            .acquire(pair.to_vec())
            .await
            .expect("ok")
            .iter()
            .all(|o| o.admitted)
    );
    let second = store.acquire(pair.to_vec()).await.expect("ok");
    assert!(second[0].admitted && !second[1].admitted);
    assert_eq!(second[0].remaining, 1, "untouched");

    // NOSCRIPT on the key's node: the script is loaded again (on every primary) and retried.
    for port in cluster.ports() {
        support::redis_cli(port, &["SCRIPT", "FLUSH"]).expect("SCRIPT FLUSH");
    }
    let fresh = slow("tollgate:rl:{after-flush}:p", 2);
    assert_eq!(one(&store, &fresh).await.remaining, 1);
    assert_eq!(one(&store, &pair[0]).await.remaining, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refunds_the_admitted_slot_when_another_rejects() {
    let cluster = RedisCluster::start();
    let store = RedisClusterStore::new(&cluster.urls(), TIMEOUT).expect("store");
    let wide = slow("tollgate:rl:{alpha}:wide", 5);
    let narrow = slow("tollgate:rl:{beta}:narrow", 1);
    let slots: Vec<i64> = [&wide.key, &narrow.key]
        .iter()
        .map(|key| {
            support::redis_cli(cluster.node(0).port(), &["CLUSTER", "KEYSLOT", key])
                .expect("CLUSTER KEYSLOT")
                .trim()
                .parse()
                .expect("slot number")
        })
        .collect();
    assert_ne!(
        slots[0], slots[1],
        "the two keys must live in different slots"
    );

    wait_until_working(&store, &slow("tollgate:rl:{warm}:p", 1)).await;
    let both = [wide.clone(), narrow.clone()];
    let first = store.acquire(both.to_vec()).await.expect("ok");
    assert!(first.iter().all(|o| o.admitted));
    assert_eq!((first[0].remaining, first[1].remaining), (4, 0));

    let mut conn = cluster_admin(&cluster).await;
    let tat_before: u64 = redis::cmd("GET")
        .arg(&wide.key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    let second = store.acquire(both.to_vec()).await.expect("ok");
    assert!(!second[1].admitted, "narrow rejects");
    assert!(second[0].admitted, "wide had room");
    assert_eq!(second[0].remaining, 4, "wide is reported after its refund");
    let tat_after: u64 = redis::cmd("GET")
        .arg(&wide.key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(
        tat_before, tat_after,
        "the refund restored wide's TAT exactly"
    );
    assert_eq!(one(&store, &wide).await.remaining, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_thousand_concurrent_acquires_admit_exactly_burst() {
    let cluster = RedisCluster::start();
    let store =
        Arc::new(RedisClusterStore::new(&cluster.urls(), Duration::from_secs(10)).expect("store"));
    let req = Arc::new(slow("tollgate:rl:{hot}:p", 100));
    wait_until_working(&*store, &slow("tollgate:rl:{warm}:p", 1)).await;
    let tasks = (0..1000).map(|_| {
        let store = store.clone();
        let req = req.clone();
        tokio::spawn(async move { one(&*store, &req).await.admitted })
    });
    let admitted = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .filter(|&admitted| admitted)
        .count();
    assert_eq!(admitted, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_store_without_a_cluster_fails_fast() {
    let ports: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", support::free_port()))
        .collect();
    let store =
        RedisClusterStore::new(&ports, SHORT_TIMEOUT).expect("construction needs no server");
    let req = slow("tollgate:rl:{e}:p", 5);
    let error = fails_within(&store, &req, Duration::from_millis(300)).await;
    assert!(
        matches!(error, StoreError::Unavailable(_) | StoreError::Timeout(_)),
        "{error:?}"
    );
    assert!(store.ping().await.is_err());
}
