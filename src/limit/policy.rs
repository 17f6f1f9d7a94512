//! Rate-limit policies: what they match, whom they key on, and how much they allow.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, Method};
use sha2::{Digest, Sha256};

use super::bucket::BucketSpec;
use super::identity::Identity;
use super::lease::LeaseSize;
use super::rate::Rate;
use crate::limit::bucket::BucketRequest;
use crate::limit::identity::IpText;

/// What a policy keys its buckets on. A policy lists several, tried in order; the first that
/// yields a value is used (`["api_key", "ip"]`: per key when one is sent, else per address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `ip`: the client address ([`Identity::ip`]); always yields a value.
    Ip,
    /// `api_key`: the name of the API key presented, if one was.
    ApiKey,
    /// `jwt_sub`: the verified token's `sub`, hashed, if a token was sent.
    JwtSub,
    /// `header:NAME`: that request header's value, hashed, if the header is present.
    Header(HeaderName),
}

impl KeySource {
    /// Parses one entry of a policy's `key` list: `ip`, `api_key`, `jwt_sub` or
    /// `header:NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "ip" => Ok(Self::Ip),
            "api_key" => Ok(Self::ApiKey),
            "jwt_sub" => Ok(Self::JwtSub),
            other => match other.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.as_bytes())
                    .map(Self::Header)
                    .map_err(|_| format!("{name:?} is not a valid header name")),
                None => Err(format!(
                    "unknown key {other:?}: use ip, api_key, jwt_sub or header:NAME"
                )),
            },
        }
    }
}

/// A rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The refill rate, also announced as the quota `q` per window `w` in `RateLimit-Policy`.
    pub rate: Rate,
    /// Bucket capacity: how many may be spent at once.
    pub burst: u64,
}

impl Limit {
    /// The token bucket of this limit: `burst` tokens, refilled at `rate`.
    pub fn spec(&self) -> BucketSpec {
        BucketSpec::new(self.rate.amount, self.rate.period_us(), self.burst)
    }
}

/// Where a policy is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// In this region's Redis only.
    Region,
    /// Across regions: the limit is a quota per sliding window summed over every region,
    /// decided locally from gossiped state ([`crate::global`]). The regional bucket still
    /// applies and shapes bursts within the region.
    Global(GlobalMode),
}

/// How a global policy trades accuracy for availability (see the README's "Global limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalMode {
    /// Never over the quota: admit only with rights held here (a bounded counter).
    Strict,
    /// About the quota: admit from the merged global count, within a fair share of the
    /// headroom for what peers have not acknowledged yet.
    Eventual,
}

impl GlobalMode {
    /// The name used in the config's `mode`, in metric labels and in the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Eventual => "eventual",
        }
    }
}

/// What to do with a request when the bucket store cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Admit (and count the admission as unlimited in metrics).
    Open,
    /// Refuse with 503.
    Closed,
    /// Decide with an in-process bucket of the same shape until the store is back.
    Local,
}

impl OnStoreError {
    /// The name used in the config's `on_store_error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
            Self::Local => "local",
        }
    }
}

/// One rate-limit policy (a `[policies.NAME]` section): which requests it matches, what it
/// keys on and how much it allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The section's `NAME`, used in bucket keys, headers, logs and metric labels (validated
    /// as a token: letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// Path prefixes (whole segments); empty matches every path.
    pub routes: Vec<String>,
    /// Methods; empty matches every method.
    pub methods: Vec<Method>,
    /// Key sources, tried in order; the first that yields a value keys the bucket (none
    /// does: the policy does not apply to the request).
    pub key: Vec<KeySource>,
    /// The default limit, for callers whose tier has no override in `tiers`.
    pub limit: Limit,
    /// Per-tier overrides of `limit`.
    pub tiers: BTreeMap<String, Limit>,
    /// Tokens per request.
    pub cost: u64,
    /// Whether the limit holds per region or across regions.
    pub scope: Scope,
    /// Global policies: the regional bucket's shape when it differs from the global limit
    /// (`regional_rate` / `regional_burst`); `None` uses the tier's limit.
    pub regional: Option<Limit>,
    /// Global policies: sub-windows of the sliding window (a sub-window's admissions are
    /// released once all of it is more than one window old).
    pub sub_windows: u32,
    /// Eventual global policies: thousandths of a key's limit each gateway admits per window
    /// whatever its peers report (`local_reserve`; 0: none). See
    /// [`crate::crdt::eventual`], "The local reserve".
    pub local_reserve: u16,
    /// What to do when the bucket store fails or the breaker skips it.
    pub on_store_error: OnStoreError,
    /// Also send `X-RateLimit-Limit/Remaining/Reset`.
    pub legacy_headers: bool,
    /// How many tokens a gateway takes from the store at once for a hot key
    /// ([`super::lease`]).
    pub lease: LeaseSize,
}

impl Policy {
    /// Whether this policy covers a request: its method is in `methods` and its path lies
    /// under one of `routes` by whole segments ([`path_has_prefix`]), an empty list matching
    /// all.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.routes.is_empty() || self.routes.iter().any(|r| path_has_prefix(path, r)))
    }

    /// The limit for a tier (the default when the tier has no override).
    pub fn limit_for(&self, tier: Option<&str>) -> Limit {
        tier.and_then(|t| self.tiers.get(t))
            .copied()
            .unwrap_or(self.limit)
    }

    /// The bucket key value for this caller, or `None` if no key source applies (the
    /// policy then does not apply to the request).
    pub fn key_for(&self, identity: &Identity, headers: &HeaderMap) -> Option<String> {
        self.key.iter().find_map(|source| match source {
            KeySource::Ip => {
                let mut text = IpText::default();
                Some(["ip:", text.format(identity.ip)].concat())
            }
            KeySource::ApiKey => identity
                .api_key
                .as_ref()
                .map(|(name, _)| format!("key:{name}")),
            KeySource::JwtSub => identity
                .jwt
                .as_ref()
                .map(|(sub, _)| format!("sub:{}", short_hash(sub.as_bytes()))),
            KeySource::Header(name) => headers
                .get(name)
                .map(|value| format!("h:{name}:{}", short_hash(value.as_bytes()))),
        })
    }
}

/// `/api/v1/users` is a prefix of `/api/v1/users/x` but not of `/api/v1/usersx`; `/` of all.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Caller-controlled text (subjects, header values) goes into Redis keys hashed: bounded
/// length, no `{`/`}` to break hash tags, and no raw identifiers in Redis or logs.
fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..12])
}

/// One policy applied to one request.
#[derive(Debug, Clone)]
pub struct Applied<'p> {
    /// The policy that matched the request's method and path.
    pub policy: &'p Policy,
    /// The limit for the caller's tier: what the headers announce and, for a global policy,
    /// the global quota (its regional bucket may use `regional` instead).
    pub limit: Limit,
    /// The tier whose override set `limit` (`None`: the policy's default limit).
    pub tier: Option<&'p str>,
    /// The bucket key value (`ip:...`, `key:NAME`, ...), hashed where caller-controlled.
    pub key: String,
    /// The regional bucket to draw `cost` from: its storage key ([`bucket_key`]) and shape.
    pub bucket: BucketRequest,
}

impl Applied<'_> {
    /// Tokens one lease of this bucket takes (0: it never leases).
    pub fn lease_tokens(&self) -> u64 {
        self.policy.lease.tokens(self.bucket.spec)
    }
}

/// Storage key of a bucket. The key value is the hash tag, so every policy keyed on the same
/// identity lands in one Redis Cluster slot and is decided by one script.
pub fn bucket_key(policy: &str, key: &str) -> String {
    // `concat` sizes the string once; `format!` would grow it through the formatter.
    ["tollgate:rl:{", key, "}:", policy].concat()
}

/// The policies that apply to a request, with their buckets.
pub fn plan<'p>(
    policies: &'p [Policy],
    method: &Method,
    path: &str,
    identity: &Identity,
    headers: &HeaderMap,
) -> Vec<Applied<'p>> {
    policies
        .iter()
        .filter(|policy| policy.matches(method, path))
        .filter_map(|policy| {
            let key = policy.key_for(identity, headers)?;
            let limit = policy.limit_for(identity.tier());
            let tier = identity
                .tier()
                .and_then(|t| policy.tiers.get_key_value(t))
                .map(|(name, _)| name.as_str());
            let bucket = BucketRequest {
                key: bucket_key(&policy.name, &key),
                spec: policy.regional.unwrap_or(limit).spec(),
                cost: policy.cost,
            };
            Some(Applied {
                policy,
                limit,
                tier,
                key,
                bucket,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(name: &str, key: Vec<KeySource>) -> Policy {
        Policy {
            name: name.into(),
            routes: vec!["/api".into()],
            methods: vec![],
            key,
            limit: Limit {
                rate: Rate {
                    amount: 10,
                    period: Duration::from_secs(10),
                },
                burst: 10,
            },
            tiers: BTreeMap::from([(
                "premium".to_owned(),
                Limit {
                    rate: Rate {
                        amount: 100,
                        period: Duration::from_secs(10),
                    },
                    burst: 100,
                },
            )]),
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

    fn identity(api_key: Option<(&str, &str)>) -> Identity {
        Identity {
            ip: "203.0.113.7".parse().unwrap(),
            api_key: api_key.map(|(n, t)| (n.to_owned(), Some(t.to_owned()))),
            jwt: None,
        }
    }

    #[test]
    fn key_falls_back_in_order() {
        let p = policy("p", vec![KeySource::ApiKey, KeySource::Ip]);
        let headers = HeaderMap::new();
        assert_eq!(
            p.key_for(&identity(Some(("demo", "free"))), &headers)
                .unwrap(),
            "key:demo"
        );
        assert_eq!(
            p.key_for(&identity(None), &headers).unwrap(),
            "ip:203.0.113.7"
        );
        let only_key = policy("p", vec![KeySource::ApiKey]);
        assert_eq!(only_key.key_for(&identity(None), &headers), None);
    }

    #[test]
    fn tiers_override_the_default_limit() {
        let p = policy("p", vec![KeySource::Ip]);
        assert_eq!(p.limit_for(Some("premium")).burst, 100);
        assert_eq!(p.limit_for(Some("unknown")).burst, 10);
        assert_eq!(p.limit_for(None).burst, 10);
    }

    #[test]
    fn plan_selects_matching_policies_with_tagged_keys() {
        let mut reads = policy("reads", vec![KeySource::Ip]);
        reads.methods = vec![Method::GET];
        let policies = vec![reads, policy("all", vec![KeySource::Ip])];
        let headers = HeaderMap::new();
        let id = identity(None);
        let get = plan(&policies, &Method::GET, "/api/x", &id, &headers);
        assert_eq!(get.len(), 2);
        assert_eq!(get[0].bucket.key, "tollgate:rl:{ip:203.0.113.7}:reads");
        assert_eq!(get[0].bucket.hash_tag(), get[1].bucket.hash_tag());
        assert_eq!(
            plan(&policies, &Method::POST, "/api/x", &id, &headers).len(),
            1
        );
        assert!(plan(&policies, &Method::GET, "/apix", &id, &headers).is_empty());
    }

    #[test]
    fn header_keys_are_hashed() {
        let p = policy("p", vec![KeySource::parse("header:x-tenant").unwrap()]);
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", "{evil}".parse().unwrap());
        let key = p.key_for(&identity(None), &headers).unwrap();
        assert!(
            !key.contains('{') && key.starts_with("h:x-tenant:"),
            "{key}"
        );
    }

    #[test]
    fn key_sources_parse() {
        assert_eq!(KeySource::parse("jwt_sub"), Ok(KeySource::JwtSub));
        assert!(KeySource::parse("cookie").is_err());
        assert!(KeySource::parse("header:bad header").is_err());
    }
}
