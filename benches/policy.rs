//! Policy matching (`tollgate::limit::policy::plan`): which policies apply to a request and
//! with which bucket keys, run once per request before any store is asked.
//!
//! The policies are those of `regions/us-east.toml` (a regional per-client policy with a
//! premium tier, a strict global policy on bookings, an eventual global one on reads) plus
//! one keyed on a header that most requests do not match.
//!
//! `cargo bench --bench policy -- --warm-up-time 1 --measurement-time 3`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tollgate::limit::identity::Identity;
use tollgate::limit::policy::{GlobalMode, KeySource, Limit, OnStoreError, Policy, Scope, plan};
use tollgate::limit::rate::Rate;

fn limit(rate: &str, burst: u64) -> Limit {
    Limit {
        rate: Rate::parse(rate).expect("a valid rate"),
        burst,
    }
}

fn policy(name: &str, routes: &[&str], methods: &[Method], key: Vec<KeySource>) -> Policy {
    Policy {
        name: name.to_owned(),
        routes: routes.iter().map(|r| (*r).to_owned()).collect(),
        methods: methods.to_vec(),
        key,
        limit: limit("20/10s", 20),
        tiers: BTreeMap::new(),
        cost: 1,
        scope: Scope::Region,
        regional: None,
        sub_windows: 10,
        local_reserve: 0,
        on_store_error: OnStoreError::Local,
        legacy_headers: false,
        lease: Default::default(),
    }
}

fn policies() -> Vec<Policy> {
    let mut per_client = policy(
        "per-client",
        &["/api"],
        &[],
        vec![KeySource::ApiKey, KeySource::Ip],
    );
    per_client
        .tiers
        .insert("premium".to_owned(), limit("200/10s", 200));
    let mut bookings = policy(
        "bookings-global",
        &["/api/v1/bookings"],
        &[Method::POST],
        vec![KeySource::ApiKey, KeySource::Ip],
    );
    bookings.limit = limit("10/10s", 10);
    bookings.scope = Scope::Global(GlobalMode::Strict);
    let mut reads = policy(
        "reads-global",
        &["/api/v1"],
        &[Method::GET],
        vec![KeySource::ApiKey, KeySource::Ip],
    );
    reads.limit = limit("600/1m", 600);
    reads.scope = Scope::Global(GlobalMode::Eventual);
    let partner = policy(
        "per-partner",
        &["/api/v1/partners"],
        &[],
        vec![KeySource::Header(HeaderName::from_static("x-partner"))],
    );
    vec![per_client, bookings, reads, partner]
}

fn bench(c: &mut Criterion) {
    let policies = policies();
    let with_key = Identity {
        ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        api_key: Some(("demo-premium".to_owned(), Some("premium".to_owned()))),
        jwt: None,
    };
    let anonymous = Identity {
        ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
        api_key: None,
        jwt: None,
    };
    let headers = HeaderMap::new();
    let mut partner_headers = HeaderMap::new();
    partner_headers.insert("x-partner", HeaderValue::from_static("acme-travel"));

    let mut group = c.benchmark_group("policy::plan");
    group.bench_function(
        "GET /api/v1/users/42, API key with tier (2 of 4 apply)",
        |b| {
            b.iter(|| {
                plan(
                    black_box(&policies),
                    &Method::GET,
                    black_box("/api/v1/users/42"),
                    black_box(&with_key),
                    &headers,
                )
            })
        },
    );
    group.bench_function("POST /api/v1/bookings, by address (2 of 4 apply)", |b| {
        b.iter(|| {
            plan(
                black_box(&policies),
                &Method::POST,
                black_box("/api/v1/bookings"),
                black_box(&anonymous),
                &headers,
            )
        })
    });
    group.bench_function(
        "GET /api/v1/partners/9, header key hashed (3 of 4 apply)",
        |b| {
            b.iter(|| {
                plan(
                    black_box(&policies),
                    &Method::GET,
                    black_box("/api/v1/partners/9"),
                    black_box(&anonymous),
                    &partner_headers,
                )
            })
        },
    );
    group.bench_function("GET /health (none apply)", |b| {
        b.iter(|| {
            plan(
                black_box(&policies),
                &Method::GET,
                black_box("/health"),
                black_box(&anonymous),
                &headers,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
