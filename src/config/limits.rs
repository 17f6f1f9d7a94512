//! The `[identity]` and `[policies.NAME]` sections: who callers are and what they may do.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, Method};
use ipnet::IpNet;
use jsonwebtoken::{Algorithm, DecodingKey};

use super::fields::{Errors, Permille, Section};
use crate::limit::identity::{ApiKey, IdentityConfig, JwtConfig, JwtKey};
use crate::limit::lease::LeaseSize;
use crate::limit::policy::{GlobalMode, KeySource, Limit, OnStoreError, Policy, Scope};
use crate::limit::rate::Rate;

/// Reads `[identity]`; absent means "no API keys, no JWT, trust no proxy".
pub fn read_identity(
    section: Option<Section<'_>>,
    env: &impl Fn(&str) -> Option<String>,
    base_dir: &Path,
    errors: &mut Errors,
) -> IdentityConfig {
    let mut config = IdentityConfig::default();
    let Some(mut section) = section else {
        return config;
    };
    if let Some(name) = section.optional::<String>("api_key_header", errors) {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(header) => config.api_key_header = header,
            Err(_) => errors.push(
                section.key("api_key_header"),
                format!("{name:?} is not a valid header name"),
            ),
        }
    }
    let proxies: Vec<String> = section.or("trusted_proxies", Vec::new(), errors);
    for (i, text) in proxies.iter().enumerate() {
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => config.trusted_proxies.push(net),
            Err(_) => errors.push(
                format!("{}[{i}]", section.key("trusted_proxies")),
                format!("{text:?} is not an IP address or CIDR such as 10.0.0.0/8"),
            ),
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for mut key in section.array_of_tables("api_keys", errors) {
        let name: Option<String> = key.required("name", errors);
        let hash: Option<String> = key.required("sha256", errors);
        let tier: Option<String> = key.optional("tier", errors);
        let digest = hash.and_then(|hex_text| {
            let mut digest = [0u8; 32];
            match hex::decode_to_slice(hex_text.trim(), &mut digest) {
                Ok(()) => Some(digest),
                Err(_) => {
                    errors.push(
                        key.key("sha256"),
                        "expected 64 hex characters (sha256sum of the key)",
                    );
                    None
                }
            }
        });
        if let Some(name) = &name {
            if !is_token(name) {
                errors.push(
                    key.key("name"),
                    format!("{name:?}: use letters, digits, '.', '_', '-'"),
                );
            } else if !names.insert(name.clone()) {
                errors.push(
                    key.key("name"),
                    format!("API key name {name:?} is used twice"),
                );
            }
        }
        key.finish(errors);
        if let (Some(name), Some(sha256)) = (name, digest) {
            config.api_keys.push(ApiKey { name, sha256, tier });
        }
    }
    if let Some(jwt) = section.table("jwt", errors) {
        config.jwt = read_jwt(jwt, env, base_dir, errors);
    }
    section.finish(errors);
    config
}

fn read_jwt(
    mut section: Section<'_>,
    env: &impl Fn(&str) -> Option<String>,
    base_dir: &Path,
    errors: &mut Errors,
) -> Option<JwtConfig> {
    let issuer = section.optional("issuer", errors);
    let audience = section.optional("audience", errors);
    let tier_claim = section.or("tier_claim", "tier".to_owned(), errors);
    let leeway: Duration = section.or("leeway", Duration::from_secs(30), errors);
    let mut keys = Vec::new();
    let key_sections = section.array_of_tables("keys", errors);
    if key_sections.is_empty() {
        errors.push(
            section.key("keys"),
            "at least one [[identity.jwt.keys]] is required",
        );
    }
    for mut key in key_sections {
        let kid: Option<String> = key.optional("kid", errors);
        let algorithm: Option<String> = key.required("algorithm", errors);
        let secret: Option<String> = key.optional("secret", errors);
        let secret_env: Option<String> = key.optional("secret_env", errors);
        let pem: Option<String> = key.optional("public_key_pem", errors);
        let pem_file: Option<String> = key.optional("public_key_file", errors);
        let algorithm = algorithm.and_then(|a| match a.as_str() {
            "HS256" => Some(Algorithm::HS256),
            "RS256" => Some(Algorithm::RS256),
            "ES256" => Some(Algorithm::ES256),
            other => {
                errors.push(
                    key.key("algorithm"),
                    format!("{other:?}: use HS256, RS256 or ES256"),
                );
                None
            }
        });
        let decoding = match algorithm {
            Some(Algorithm::HS256) => {
                let secret = match (secret, secret_env) {
                    (Some(s), None) => Some(s),
                    (None, Some(var)) => match env(&var) {
                        Some(value) if !value.is_empty() => Some(value),
                        _ => {
                            errors.push(
                                key.key("secret_env"),
                                format!("environment variable {var} is not set"),
                            );
                            None
                        }
                    },
                    _ => {
                        errors.push(
                            key.key("secret"),
                            "HS256 needs exactly one of `secret` or `secret_env`",
                        );
                        None
                    }
                };
                secret.map(|s| DecodingKey::from_secret(s.as_bytes()))
            }
            Some(alg) => {
                let pem = match (pem, pem_file) {
                    (Some(text), None) => Some(text),
                    (None, Some(file)) => match std::fs::read_to_string(base_dir.join(&file)) {
                        Ok(text) => Some(text),
                        Err(e) => {
                            errors.push(
                                key.key("public_key_file"),
                                format!("cannot read {file:?}: {e}"),
                            );
                            None
                        }
                    },
                    _ => {
                        errors.push(
                            key.key("public_key_pem"),
                            "RS256/ES256 need exactly one of `public_key_pem` or `public_key_file`",
                        );
                        None
                    }
                };
                pem.and_then(|pem| {
                    let parsed = if alg == Algorithm::RS256 {
                        DecodingKey::from_rsa_pem(pem.as_bytes())
                    } else {
                        DecodingKey::from_ec_pem(pem.as_bytes())
                    };
                    parsed
                        .map_err(|e| {
                            errors.push(
                                key.key("public_key_pem"),
                                format!("invalid public key: {e}"),
                            )
                        })
                        .ok()
                })
            }
            None => None,
        };
        key.finish(errors);
        if let (Some(algorithm), Some(decoding)) = (algorithm, decoding) {
            keys.push(JwtKey {
                kid,
                algorithm,
                key: decoding,
            });
        }
    }
    section.finish(errors);
    Some(JwtConfig {
        keys,
        issuer,
        audience,
        tier_claim,
        leeway_secs: leeway.as_secs(),
    })
}

/// Reads `[policies.NAME]` tables, in name order.
pub fn read_policies(section: Option<Section<'_>>, errors: &mut Errors) -> Vec<Policy> {
    let Some(mut section) = section else {
        return Vec::new();
    };
    let mut policies = Vec::new();
    for name in section.sub_keys_of_self() {
        if let Some(policy_section) = section.table(&name, errors)
            && let Some(policy) = read_policy(&name, policy_section, errors)
        {
            policies.push(policy);
        }
    }
    section.finish(errors);
    policies
}

fn read_policy(name: &str, mut section: Section<'_>, errors: &mut Errors) -> Option<Policy> {
    if !is_token(name) {
        errors.push(
            section.path().to_owned(),
            format!("policy name {name:?}: use letters, digits, '.', '_', '-'"),
        );
    }
    let routes: Vec<String> = section.or("routes", Vec::new(), errors);
    for (i, route) in routes.iter().enumerate() {
        if !route.starts_with('/') {
            errors.push(
                format!("{}[{i}]", section.key("routes")),
                format!("{route:?} must start with '/'"),
            );
        }
    }
    let method_names: Vec<String> = section.or("methods", Vec::new(), errors);
    let mut methods = Vec::new();
    for (i, text) in method_names.iter().enumerate() {
        match Method::from_bytes(text.to_ascii_uppercase().as_bytes()) {
            Ok(method) => methods.push(method),
            Err(_) => errors.push(
                format!("{}[{i}]", section.key("methods")),
                format!("{text:?} is not an HTTP method"),
            ),
        }
    }
    let key_names: Option<Vec<String>> = section.required("key", errors);
    let mut key = Vec::new();
    if let Some(names) = &key_names {
        if names.is_empty() {
            errors.push(section.key("key"), "at least one key source is required");
        }
        for (i, text) in names.iter().enumerate() {
            match KeySource::parse(text) {
                Ok(source) => key.push(source),
                Err(message) => errors.push(format!("{}[{i}]", section.key("key")), message),
            }
        }
    }
    let cost: u64 = section.or("cost", 1, errors);
    if cost == 0 {
        errors.push(section.key("cost"), "must be at least 1");
    }
    let limit = read_limit(&mut section, cost, errors);
    let mut tiers = BTreeMap::new();
    if let Some(mut tier_section) = section.table("tiers", errors) {
        for tier in tier_section.sub_keys_of_self() {
            if let Some(mut one) = tier_section.table(&tier, errors) {
                if let Some(tier_limit) = read_limit(&mut one, cost, errors) {
                    tiers.insert(tier, tier_limit);
                }
                one.finish(errors);
            }
        }
        tier_section.finish(errors);
    }
    let scope_name: String = section.or("scope", "region".to_owned(), errors);
    let mode_name: Option<String> = section.optional("mode", errors);
    let scope = match (scope_name.as_str(), mode_name.as_deref()) {
        ("region", None) => Some(Scope::Region),
        ("region", Some(_)) => {
            errors.push(section.key("mode"), "only global policies have a mode");
            None
        }
        ("global", None | Some("eventual")) => Some(Scope::Global(GlobalMode::Eventual)),
        ("global", Some("strict")) => Some(Scope::Global(GlobalMode::Strict)),
        ("global", Some(other)) => {
            errors.push(
                section.key("mode"),
                format!("{other:?}: use strict or eventual"),
            );
            None
        }
        (other, _) => {
            errors.push(
                section.key("scope"),
                format!("{other:?}: use region or global"),
            );
            None
        }
    };
    let on_store_error = match section
        .or("on_store_error", "local".to_owned(), errors)
        .as_str()
    {
        "open" => Some(OnStoreError::Open),
        "closed" => Some(OnStoreError::Closed),
        "local" => Some(OnStoreError::Local),
        other => {
            errors.push(
                section.key("on_store_error"),
                format!("{other:?}: use open, closed or local"),
            );
            None
        }
    };
    let legacy_headers = section.or("legacy_headers", false, errors);
    // Absent: automatic (a sixty-fourth of the burst); 0 turns leasing off.
    let lease = section
        .optional::<u64>("lease", errors)
        .map_or(LeaseSize::Auto, LeaseSize::Tokens);
    let global = matches!(scope, Some(Scope::Global(_)));
    let regional_rate: Option<String> = section.optional("regional_rate", errors);
    let regional_burst: Option<u64> = section.optional("regional_burst", errors);
    let sub_windows: u32 = section.or(
        "sub_windows",
        crate::crdt::window::DEFAULT_SUB_WINDOWS,
        errors,
    );
    let local_reserve = read_local_reserve(&mut section, scope, errors);
    let mut regional = None;
    if !global {
        for key in ["regional_rate", "regional_burst", "sub_windows"] {
            if section.has(key) {
                errors.push(section.key(key), "only global policies take this key");
            }
        }
    } else {
        if regional_rate.is_some() || regional_burst.is_some() {
            let rate = match regional_rate {
                Some(text) => match Rate::parse(&text) {
                    Ok(rate) => Some(rate),
                    Err(message) => {
                        errors.push(section.key("regional_rate"), message);
                        None
                    }
                },
                None => limit.map(|l| l.rate),
            };
            if let Some(rate) = rate {
                let burst = regional_burst.unwrap_or(rate.amount);
                if burst == 0 || burst < cost {
                    errors.push(
                        section.key("regional_burst"),
                        format!("must be at least 1 and at least the policy's cost {cost}"),
                    );
                }
                regional = Some(Limit { rate, burst });
            }
        }
        if let Some(limit) = &limit {
            let periods = std::iter::once(limit)
                .chain(tiers.values())
                .map(|l| l.rate.period_us());
            for period in periods {
                if let Err(e) = crate::crdt::WindowSpec::new(period, sub_windows) {
                    errors.push(
                        section.key("sub_windows"),
                        format!("window of {period} us in {sub_windows} sub-windows: {e}"),
                    );
                    break;
                }
            }
        }
    }
    section.finish(errors);
    Some(Policy {
        name: name.to_owned(),
        routes,
        methods,
        key,
        limit: limit?,
        tiers,
        cost,
        scope: scope?,
        regional,
        sub_windows,
        local_reserve,
        on_store_error: on_store_error?,
        legacy_headers,
        lease,
    })
}

/// Most local reserve accepted: beyond half, two gateways alone could admit twice a key's
/// limit, and the policy would no longer be global in any useful sense.
const MAX_LOCAL_RESERVE_PERMILLE: u16 = 500;

/// `local_reserve`: eventual global policies only, at most [`MAX_LOCAL_RESERVE_PERMILLE`].
fn read_local_reserve(section: &mut Section<'_>, scope: Option<Scope>, errors: &mut Errors) -> u16 {
    let Some(Permille(permille)) = section.optional::<Permille>("local_reserve", errors) else {
        return 0;
    };
    let key = section.key("local_reserve");
    match scope {
        Some(Scope::Global(GlobalMode::Eventual)) if permille > MAX_LOCAL_RESERVE_PERMILLE => {
            errors.push(
                key,
                "at most 50%: each gateway's reserve is admitted beyond the limit",
            );
            0
        }
        Some(Scope::Global(GlobalMode::Eventual)) => permille,
        Some(Scope::Global(GlobalMode::Strict)) => {
            errors.push(
                key,
                "only eventual policies take a local reserve: strict mode never lets a peer's \
                 report take a gateway's own share",
            );
            0
        }
        Some(Scope::Region) => {
            errors.push(key, "only global policies take this key");
            0
        }
        None => 0,
    }
}

/// `rate` and `burst` (default: the rate's amount) of a policy or tier.
fn read_limit(section: &mut Section<'_>, cost: u64, errors: &mut Errors) -> Option<Limit> {
    let rate_text: Option<String> = section.required("rate", errors);
    let rate = rate_text.and_then(|text| match Rate::parse(&text) {
        Ok(rate) => Some(rate),
        Err(message) => {
            errors.push(section.key("rate"), message);
            None
        }
    })?;
    let burst: u64 = section.or("burst", rate.amount, errors);
    if burst == 0 {
        errors.push(section.key("burst"), "must be at least 1");
    } else if cost > burst {
        errors.push(
            section.key("burst"),
            format!(
                "burst {burst} is below the policy's cost {cost}: no request could ever be admitted"
            ),
        );
    }
    let limit = Limit { rate, burst };
    // Redis evaluates the bucket in Lua, whose numbers are doubles: exact only below 2^52.
    if limit.spec().full_refill_us() > 1 << 52 {
        errors.push(
            section.key("burst"),
            format!(
                "burst {burst} at {} takes too long to refill (over 142 years)",
                rate
            ),
        );
    }
    Some(limit)
}

/// Names that are safe inside quoted header strings, Redis keys and metric labels.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
