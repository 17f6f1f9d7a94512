//! Region configuration: TOML file → parse → validate (every error at once) → typed config.
//!
//! A region file describes one gateway instance: where it listens, its Redis, and the upstream
//! services it routes to. See the README's "Configuration reference" for every key.
//!
//! Environment variables override the file, so one file can serve every instance of a
//! region (containers, the demo): `TOLLGATE_LISTEN`, `TOLLGATE_ADMIN_LISTEN`,
//! `TOLLGATE_REDIS_URL` (an empty `TOLLGATE_REDIS_URL` removes Redis) and, per service,
//! `TOLLGATE_SERVICE_<NAME>_INSTANCES` (see [`service_instances_env`]).

mod fields;
mod gossip;
mod limits;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};
use sha2::{Digest, Sha256};
use toml::Table;

pub use fields::{ByteSize, Errors, KeyError};
use fields::{Section, parse_socket_addr};
pub use gossip::{
    ENV_GOSSIP_CERTS, ENV_GOSSIP_LISTEN, ENV_GOSSIP_PEERS, ENV_INSTANCE, GossipSettings,
    PeerSettings,
};

use crate::limit::identity::IdentityConfig;
use crate::limit::policy::Policy;

/// Environment variable overriding `listen`.
pub const ENV_LISTEN: &str = "TOLLGATE_LISTEN";
/// Environment variable overriding `admin_listen`.
pub const ENV_ADMIN_LISTEN: &str = "TOLLGATE_ADMIN_LISTEN";
/// Environment variable overriding `redis_url`; empty means "no Redis".
pub const ENV_REDIS_URL: &str = "TOLLGATE_REDIS_URL";
/// Environment variable overriding `workers`.
pub const ENV_WORKERS: &str = "TOLLGATE_WORKERS";
/// Most proxy worker threads a config may ask for (a typo's guard, not a tuning limit).
pub const MAX_WORKERS: usize = 1024;

/// The environment variable replacing `services.<name>.instances`: `TOLLGATE_SERVICE_`, the
/// name in upper case with `-` as `_`, then `_INSTANCES`; its value is the instance URLs
/// separated by commas (`http://users-1:7001,http://users-2:7001`). Containers use it: the
/// shipped region files cannot know the services' host names.
pub fn service_instances_env(service: &str) -> String {
    let name: String = service
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    format!("TOLLGATE_SERVICE_{name}_INSTANCES")
}

/// Why a config could not be loaded. Displays as one line per problem, each naming the file
/// and key, so every mistake is fixed in one go.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid TOML: {message}", file.display())]
    Syntax { file: PathBuf, message: String },
    #[error("{}", render_invalid(file, problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<KeyError>,
    },
}

fn render_invalid(file: &Path, problems: &[KeyError]) -> String {
    let mut out = format!(
        "{}: {} error{} in config",
        file.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for problem in problems {
        out.push_str(&format!(
            "\n  {}: {}: {}",
            file.display(),
            problem.key,
            problem.message
        ));
    }
    out
}

/// One regional gateway's configuration, validated.
#[derive(Debug, Clone)]
pub struct RegionConfig {
    /// Region name, e.g. `us-east`; lowercase letters, digits and `-`.
    pub region: String,
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// Where the admin API (`/health`, `/ready`) listens; never shares the proxy's routes.
    pub admin_listen: SocketAddr,
    /// The region's Redis, if any.
    pub redis_url: Option<String>,
    /// Largest request body forwarded; larger ones get 413.
    pub max_request_body: u64,
    /// How long a graceful shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Threads serving the proxy listener, each with its own single-threaded runtime (`None`:
    /// one per CPU core). Read at start only.
    pub workers: Option<usize>,
    /// Log filter (`info`, `debug`, `tollgate=debug,info`, ...); `RUST_LOG` overrides it.
    pub log_level: Option<String>,
    /// Upstream services by name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// Seed nodes of a Redis Cluster holding the buckets (instead of `redis_url`).
    pub redis_cluster: Vec<String>,
    /// Deadline of one bucket-store decision; past it the policy's `on_store_error` decides.
    pub store_timeout: Duration,
    /// Consecutive store failures that open the store breaker.
    pub store_breaker_failures: u32,
    /// While the breaker is open, how often one request probes the store.
    pub store_probe_interval: Duration,
    /// API keys, JWT verification and trusted proxies.
    pub identity: IdentityConfig,
    /// Rate-limit policies, in name order; a request must pass every one that matches.
    pub policies: Vec<Policy>,
    /// `[gossip]`: how this gateway shares global limits with the others (required when a
    /// policy is global).
    pub gossip: Option<GossipSettings>,
}

/// One upstream service and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    /// Path prefixes routed here, matched on whole segments, longest first.
    pub routes: Vec<String>,
    /// Base URLs of the instances (`http://host:port`).
    pub instances: Vec<Instance>,
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response headers; the body may stream for longer.
    pub request_timeout: Duration,
    /// Requests forwarded at once; beyond it requests queue briefly, then get 503.
    pub concurrency_limit: usize,
    /// Requests allowed to wait for a concurrency slot; more are refused at once.
    pub queue_size: usize,
    /// Longest wait for a concurrency slot.
    pub queue_timeout: Duration,
    /// How long an instance is left out after it refused a connection (passive ejection).
    pub ejection_time: Duration,
    pub health_check: Option<HealthCheckConfig>,
}

/// An upstream instance address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

impl Instance {
    /// Parses `http://host:port` (an optional trailing `/` is allowed, nothing else).
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("invalid URL {text:?}: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("{text:?} has no scheme: write http://host:port"))?;
        if scheme != Scheme::HTTP {
            return Err(format!(
                "{text:?}: only http:// upstreams are supported (terminate TLS upstream of the instance)"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{text:?} has no host"))?;
        if authority.port_u16().is_none() {
            return Err(format!("{text:?} has no port"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "{text:?}: an instance is scheme://host:port, without a path or query"
            ));
        }
        Ok(Self { scheme, authority })
    }
}

/// Active health checking of a service's instances.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// Path requested with GET; any 2xx is healthy.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring an instance back.
    pub healthy_threshold: u32,
    /// Consecutive failures that take an instance out.
    pub unhealthy_threshold: u32,
}

impl RegionConfig {
    /// Reads, parses and validates a region file, applying the `TOLLGATE_*` overrides from
    /// the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// [`RegionConfig::load`], with the SHA-256 (hex) of the very bytes it parsed: what
    /// `/ready` reports as the configuration in force.
    pub fn load_digested(path: &Path) -> Result<(Self, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let config = Self::parse(path, &text, |name| std::env::var(name).ok())?;
        Ok((config, hex::encode(Sha256::digest(text.as_bytes()))))
    }

    /// [`RegionConfig::load`] with an injected environment, for tests.
    pub fn load_with_env(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, env)
    }

    /// Parses and validates config text; `file` is only used in messages.
    pub fn parse(
        file: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let table: Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        let mut errors = Errors::default();
        let base_dir = file.parent().unwrap_or(Path::new("."));
        let config = read_region(&table, &env, base_dir, &mut errors);
        match config {
            Some(config) if errors.0.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                file: file.to_owned(),
                problems: errors.0,
            }),
        }
    }
}

fn read_region(
    table: &Table,
    env: &impl Fn(&str) -> Option<String>,
    base_dir: &Path,
    errors: &mut Errors,
) -> Option<RegionConfig> {
    let mut root = Section::root(table);
    let region: Option<String> = root.required("region", errors);
    // The file's values are read even when the environment overrides them, so they are
    // still checked and not reported as unknown keys.
    let file_listen = root.optional("listen", errors);
    let file_admin_listen = root.optional("admin_listen", errors);
    let listen = env_or(env, ENV_LISTEN, errors).or(file_listen);
    let admin_listen = env_or(env, ENV_ADMIN_LISTEN, errors).or(file_admin_listen);
    for (key, value, var) in [
        ("listen", listen, ENV_LISTEN),
        ("admin_listen", admin_listen, ENV_ADMIN_LISTEN),
    ] {
        if value.is_none() && !table.contains_key(key) && env(var).is_none() {
            errors.push(key, "missing required key");
        }
    }
    let file_redis: Option<String> = root.optional("redis_url", errors);
    let redis_url = match env(ENV_REDIS_URL) {
        Some(value) if value.is_empty() => None,
        Some(value) => Some(value),
        None => file_redis,
    };
    let max_request_body = root.or("max_request_body", ByteSize(10 << 20), errors).0;
    let drain_timeout = root.or("drain_timeout", Duration::from_secs(30), errors);
    let workers = read_workers(&mut root, env, errors);
    let log_level: Option<String> = root.optional("log_level", errors);
    if let Some(level) = &log_level
        && let Err(error) = crate::telemetry::parse_log_filter(level)
    {
        errors.push("log_level", format!("{level:?}: {error}"));
    }
    let redis_cluster: Vec<String> = root.or("redis_cluster", Vec::new(), errors);
    let store_timeout = root.or("store_timeout", Duration::from_millis(50), errors);
    let store_breaker_failures = root.or("store_breaker_failures", 3u32, errors);
    let store_probe_interval = root.or("store_probe_interval", Duration::from_millis(250), errors);
    let identity_section = root.table("identity", errors);
    let identity = limits::read_identity(identity_section, env, base_dir, errors);
    let policies_section = root.table("policies", errors);
    let policies = limits::read_policies(policies_section, errors);
    let gossip = root
        .table("gossip", errors)
        .and_then(|section| gossip::read_gossip(section, region.as_deref(), env, base_dir, errors));
    if gossip.is_none() && !table.contains_key("gossip") {
        for policy in &policies {
            if matches!(policy.scope, crate::limit::policy::Scope::Global(_)) {
                errors.push(
                    format!("policies.{}.scope", policy.name),
                    "a global policy needs a [gossip] section (the gateways to share it with)",
                );
            }
        }
    }
    if redis_url.is_some() && !redis_cluster.is_empty() {
        errors.push(
            "redis_cluster",
            "set either redis_url or redis_cluster, not both",
        );
    }
    if store_timeout.is_zero() {
        errors.push("store_timeout", "must be greater than zero");
    }
    if store_probe_interval.is_zero() {
        errors.push("store_probe_interval", "must be greater than zero");
    }

    let mut services = BTreeMap::new();
    match root.table("services", errors) {
        Some(mut section) => {
            let names = section.sub_keys_of_self();
            for name in names {
                if let Some(service) = section.table(&name, errors)
                    && let Some(config) = read_service(&name, service, env, errors)
                {
                    services.insert(name, config);
                }
            }
            section.finish(errors);
        }
        None => errors.push(
            "services",
            "missing: at least one upstream service is required",
        ),
    }
    root.finish(errors);

    if let Some(region) = &region
        && (region.is_empty()
            || !region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    {
        errors.push(
            "region",
            format!("{region:?}: use lowercase letters, digits and '-'"),
        );
    }
    if let (Some(a), Some(b)) = (listen, admin_listen)
        && a == b
    {
        errors.push(
            "admin_listen",
            format!("{b} is also `listen`: the admin API needs its own port"),
        );
    }
    if let Some(url) = &redis_url
        && !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://")
            || url.starts_with("unix://"))
    {
        errors.push(
            "redis_url",
            format!("{url:?}: expected redis://host:port[/db]"),
        );
    }
    check_route_overlaps(&services, errors);

    Some(RegionConfig {
        region: region?,
        listen: listen?,
        admin_listen: admin_listen?,
        redis_url,
        max_request_body,
        drain_timeout,
        workers,
        log_level,
        services,
        redis_cluster,
        store_timeout,
        store_breaker_failures,
        store_probe_interval,
        identity,
        policies,
        gossip,
    })
}

/// `workers`: a number of threads or `"auto"` (one per core, the default); `TOLLGATE_WORKERS`
/// overrides the file.
fn read_workers(
    root: &mut Section<'_>,
    env: &impl Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> Option<usize> {
    // Read even when the environment overrides it, so it is still checked.
    let file: Option<WorkerCount> = root.optional("workers", errors);
    match env(ENV_WORKERS) {
        Some(text) => parse_workers(text.trim()).unwrap_or_else(|message| {
            errors.push(format!("(environment) {ENV_WORKERS}"), message);
            None
        }),
        None => file.and_then(|WorkerCount(n)| n),
    }
}

/// The value of `workers`: `None` for `"auto"`.
struct WorkerCount(Option<usize>);

impl fields::FromToml for WorkerCount {
    fn from_toml(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Integer(n) => parse_workers(&n.to_string()).map(WorkerCount),
            toml::Value::String(text) => parse_workers(text).map(WorkerCount),
            other => Err(format!(
                "expected \"auto\" or a number of threads, found {}",
                other.type_str()
            )),
        }
    }
}

fn parse_workers(text: &str) -> Result<Option<usize>, String> {
    if text == "auto" {
        return Ok(None);
    }
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "{text:?}: expected \"auto\" or a number of threads from 1 to {MAX_WORKERS}"
        )),
    }
}

fn env_or(
    env: &impl Fn(&str) -> Option<String>,
    name: &str,
    errors: &mut Errors,
) -> Option<SocketAddr> {
    let value = env(name)?;
    match parse_socket_addr(&value) {
        Ok(addr) => Some(addr),
        Err(message) => {
            errors.push(format!("(environment) {name}"), message);
            None
        }
    }
}

fn read_service(
    name: &str,
    mut section: Section<'_>,
    env: &impl Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> Option<ServiceConfig> {
    let routes: Option<Vec<String>> = section.required("routes", errors);
    // The file's list is still read (and type-checked) when the environment replaces it.
    let file_instances: Option<Vec<String>> = section.required("instances", errors);
    let instances_var = service_instances_env(name);
    let (instance_urls, instances_key) = match env(&instances_var) {
        Some(text) => (
            Some(
                text.split(',')
                    .map(|url| url.trim().to_owned())
                    .filter(|url| !url.is_empty())
                    .collect(),
            ),
            format!("(environment) {instances_var}"),
        ),
        None => (file_instances, section.key("instances")),
    };
    let connect_timeout = section.or("connect_timeout", Duration::from_secs(1), errors);
    let request_timeout = section.or("request_timeout", Duration::from_secs(30), errors);
    let concurrency_limit = section.or("concurrency_limit", 1024usize, errors);
    let queue_size = section.or("queue_size", 256usize, errors);
    let queue_timeout = section.or("queue_timeout", Duration::from_millis(100), errors);
    let ejection_time = section.or("ejection_time", Duration::from_secs(10), errors);
    let health_check = section
        .table("health_check", errors)
        .and_then(|hc| read_health_check(hc, errors));

    let mut ok = true;
    if let Some(routes) = &routes {
        if routes.is_empty() {
            errors.push(
                section.key("routes"),
                "at least one route prefix is required",
            );
        }
        for (i, route) in routes.iter().enumerate() {
            if !route.starts_with('/') {
                errors.push(
                    format!("{}[{i}]", section.key("routes")),
                    format!("{route:?} must start with '/'"),
                );
            }
        }
    }
    let mut instances = Vec::new();
    if let Some(urls) = &instance_urls {
        if urls.is_empty() {
            errors.push(instances_key.clone(), "at least one instance is required");
        }
        for (i, url) in urls.iter().enumerate() {
            match Instance::parse(url) {
                Ok(instance) => instances.push(instance),
                Err(message) => {
                    ok = false;
                    errors.push(format!("{instances_key}[{i}]"), message);
                }
            }
        }
    }
    for (key, value) in [
        ("connect_timeout", connect_timeout),
        ("request_timeout", request_timeout),
        ("queue_timeout", queue_timeout),
        ("ejection_time", ejection_time),
    ] {
        if value.is_zero() {
            errors.push(section.key(key), "must be greater than zero");
        }
    }
    if concurrency_limit == 0 {
        errors.push(section.key("concurrency_limit"), "must be at least 1");
    }
    section.finish(errors);
    if !ok {
        return None;
    }
    Some(ServiceConfig {
        name: name.to_owned(),
        routes: routes?.iter().map(|r| normalize_prefix(r)).collect(),
        instances,
        connect_timeout,
        request_timeout,
        concurrency_limit,
        queue_size,
        queue_timeout,
        ejection_time,
        health_check,
    })
}

/// `/api/v1/users/` and `/api/v1/users` route the same paths.
fn normalize_prefix(route: &str) -> String {
    let trimmed = route.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn read_health_check(mut section: Section<'_>, errors: &mut Errors) -> Option<HealthCheckConfig> {
    let path: String = section.or("path", "/health".to_owned(), errors);
    let interval = section.or("interval", Duration::from_secs(2), errors);
    let timeout = section.or("timeout", Duration::from_secs(1), errors);
    let healthy_threshold = section.or("healthy_threshold", 1u32, errors);
    let unhealthy_threshold = section.or("unhealthy_threshold", 2u32, errors);
    if !path.starts_with('/') {
        errors.push(section.key("path"), format!("{path:?} must start with '/'"));
    }
    if interval.is_zero() {
        errors.push(section.key("interval"), "must be greater than zero");
    }
    if timeout.is_zero() || timeout > interval {
        errors.push(
            section.key("timeout"),
            "must be greater than zero and at most `interval`",
        );
    }
    if healthy_threshold == 0 {
        errors.push(section.key("healthy_threshold"), "must be at least 1");
    }
    if unhealthy_threshold == 0 {
        errors.push(section.key("unhealthy_threshold"), "must be at least 1");
    }
    section.finish(errors);
    Some(HealthCheckConfig {
        path,
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
    })
}

/// Two services claiming the same prefix would make routing depend on file order.
fn check_route_overlaps(services: &BTreeMap<String, ServiceConfig>, errors: &mut Errors) {
    let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, service) in services {
        for route in &service.routes {
            if let Some(previous) = owners.insert(route, name)
                && previous != name
            {
                errors.push(
                    format!("services.{name}.routes"),
                    format!("{route:?} is also routed to service {previous:?}"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
region = "us-east"
listen = "127.0.0.1:8081"
admin_listen = "127.0.0.1:9081"

[services.users]
routes = ["/api/v1/users/"]
instances = ["http://127.0.0.1:7001"]
"#;

    fn parse(text: &str) -> Result<RegionConfig, ConfigError> {
        RegionConfig::parse(Path::new("test.toml"), text, |_| None)
    }

    fn problems(text: &str) -> Vec<KeyError> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        let users = &config.services["users"];
        assert_eq!(users.routes, ["/api/v1/users"]);
        assert_eq!(users.instances[0].to_string(), "http://127.0.0.1:7001");
        assert_eq!(users.request_timeout, Duration::from_secs(30));
        assert_eq!(config.max_request_body, 10 << 20);
        assert!(config.redis_url.is_none());
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let text = r#"
region = "US East"
listen = "not an address"
admin_listen = 9081
colour = "blue"

[services.users]
routes = ["api/v1/users"]
instances = ["https://users:7001", "http://users"]
request_timeout = "soon"
concurrency_limit = 0
health_check = { interval = "1s", timeout = "2s", bogus = 1 }

[services.bookings]
routes = ["/api/v1/users"]
instances = ["http://127.0.0.1:7101"]
"#;
        let keys: Vec<String> = problems(text).into_iter().map(|p| p.key).collect();
        for expected in [
            "region",
            "listen",
            "admin_listen",
            "colour",
            "services.users.routes[0]",
            "services.users.instances[0]",
            "services.users.instances[1]",
            "services.users.request_timeout",
            "services.users.concurrency_limit",
            "services.users.health_check.timeout",
            "services.users.health_check.bogus",
        ] {
            assert!(
                keys.iter().any(|k| k == expected),
                "{expected} missing from {keys:?}"
            );
        }
    }

    #[test]
    fn message_names_file_and_key_on_each_line() {
        let err = parse(
            "region = \"x\"\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:1\"\nfoo = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("test.toml: 3 errors"), "{err}");
        assert!(err.contains("test.toml: foo: unknown key"), "{err}");
        assert!(err.contains("test.toml: admin_listen:"), "{err}");
        assert!(err.contains("test.toml: services:"), "{err}");
    }

    #[test]
    fn overlapping_routes_are_refused() {
        let text = format!(
            "{MINIMAL}\n[services.other]\nroutes = [\"/api/v1/users\"]\ninstances = [\"http://127.0.0.1:1\"]\n"
        );
        let problems = problems(&text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "services.users.routes");
    }

    #[test]
    fn environment_overrides_addresses_and_redis() {
        let env = |name: &str| match name {
            ENV_LISTEN => Some("0.0.0.0:18081".to_owned()),
            ENV_REDIS_URL => Some("redis://10.0.0.1:6379/2".to_owned()),
            _ => None,
        };
        let config = RegionConfig::parse(Path::new("t.toml"), MINIMAL, env).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:18081");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:9081");
        assert_eq!(config.redis_url.as_deref(), Some("redis://10.0.0.1:6379/2"));
    }

    #[test]
    fn environment_replaces_service_instances() {
        assert_eq!(
            service_instances_env("users"),
            "TOLLGATE_SERVICE_USERS_INSTANCES"
        );
        assert_eq!(
            service_instances_env("seat-maps"),
            "TOLLGATE_SERVICE_SEAT_MAPS_INSTANCES"
        );
        let env = |name: &str| {
            (name == "TOLLGATE_SERVICE_USERS_INSTANCES")
                .then(|| "http://users-1:7001, http://users-2:7001,".to_owned())
        };
        let config = RegionConfig::parse(Path::new("t.toml"), MINIMAL, env).unwrap();
        let urls: Vec<String> = config.services["users"]
            .instances
            .iter()
            .map(|instance| instance.to_string())
            .collect();
        assert_eq!(urls, ["http://users-1:7001", "http://users-2:7001"]);

        let bad = |name: &str| {
            (name == "TOLLGATE_SERVICE_USERS_INSTANCES").then(|| "ftp://x:1".to_owned())
        };
        let err = RegionConfig::parse(Path::new("t.toml"), MINIMAL, bad).unwrap_err();
        assert!(
            err.to_string()
                .contains("(environment) TOLLGATE_SERVICE_USERS_INSTANCES[0]"),
            "{err}"
        );
        let empty = |name: &str| (name == "TOLLGATE_SERVICE_USERS_INSTANCES").then(String::new);
        let err = RegionConfig::parse(Path::new("t.toml"), MINIMAL, empty).unwrap_err();
        assert!(
            err.to_string()
                .contains("(environment) TOLLGATE_SERVICE_USERS_INSTANCES: at least one"),
            "{err}"
        );
    }

    #[test]
    fn workers_are_a_count_or_auto_and_the_environment_overrides_them() {
        let with = |line: &str| MINIMAL.replacen("\n[services", &format!("{line}\n\n[services"), 1);
        assert_eq!(parse(MINIMAL).unwrap().workers, None);
        assert_eq!(parse(&with("workers = 3")).unwrap().workers, Some(3));
        assert_eq!(parse(&with("workers = \"auto\"")).unwrap().workers, None);
        for bad in [
            "workers = 0",
            "workers = -1",
            "workers = 100000",
            "workers = \"many\"",
            "workers = 1.5",
        ] {
            let found = problems(&with(bad));
            assert!(found.iter().any(|p| p.key == "workers"), "{bad}: {found:?}");
        }
        let env =
            |value: &'static str| move |name: &str| (name == ENV_WORKERS).then(|| value.to_owned());
        let config =
            RegionConfig::parse(Path::new("t.toml"), &with("workers = 3"), env("1")).unwrap();
        assert_eq!(config.workers, Some(1));
        let err = RegionConfig::parse(Path::new("t.toml"), MINIMAL, env("zero")).unwrap_err();
        assert!(
            err.to_string().contains("(environment) TOLLGATE_WORKERS"),
            "{err}"
        );
    }

    #[test]
    fn gossip_instances_are_the_names_tollgate_certs_issues() {
        let gossip = |instance: &str| {
            format!(
                "{MINIMAL}\n[gossip]\nlisten = \"127.0.0.1:7400\"\n{instance}ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\n[[gossip.peers]]\nregion = \"us-east\"\n{instance}addr = \"127.0.0.1:7400\"\n"
            )
        };
        let config = parse(&gossip("")).unwrap();
        assert_eq!(
            config.gossip.unwrap().instance,
            "a",
            "the default is the one `certs --regions` issues"
        );
        let config = parse(&gossip("instance = \"b-2\"\n")).unwrap();
        assert_eq!(config.gossip.unwrap().instance, "b-2");
        for bad in ["0", "-a", "A", "a_b"] {
            let found = problems(&gossip(&format!("instance = \"{bad}\"\n")));
            assert!(
                found.iter().any(|p| p.key == "gossip.instance"),
                "{bad}: {found:?}"
            );
        }
    }

    #[test]
    fn invalid_environment_override_is_reported() {
        let env = |name: &str| (name == ENV_ADMIN_LISTEN).then(|| "nope".to_owned());
        let err = RegionConfig::parse(Path::new("t.toml"), MINIMAL, env).unwrap_err();
        assert!(
            err.to_string()
                .contains("(environment) TOLLGATE_ADMIN_LISTEN"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = parse("region = ").unwrap_err().to_string();
        assert!(err.starts_with("test.toml: invalid TOML"), "{err}");
    }

    #[test]
    fn identity_and_policies_parse_with_keys_from_files() {
        let text = format!(
            r#"{MINIMAL}
[identity]
trusted_proxies = ["10.0.0.0/8", "192.0.2.1"]

[[identity.api_keys]]
name = "partner"
sha256 = "{hash}"
tier = "premium"

[identity.jwt]
issuer = "https://issuer.example"

[[identity.jwt.keys]]
algorithm = "RS256"
public_key_file = "rs256-public.pem"

[policies.per-client]
routes = ["/api"]
methods = ["get", "POST"]
key = ["api_key", "ip"]
rate = "100/10s"

[policies.per-client.tiers.premium]
rate = "1000/10s"
burst = 500
"#,
            hash = "ab".repeat(32)
        );
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/limit/testdata/region.toml");
        let config = RegionConfig::parse(&file, &text, |_| None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.identity.trusted_proxies.len(), 2);
        assert_eq!(config.identity.api_keys[0].name, "partner");
        assert_eq!(config.identity.jwt.as_ref().unwrap().keys.len(), 1);
        let policy = &config.policies[0];
        assert_eq!(
            policy.limit.burst, 100,
            "burst defaults to the rate's amount"
        );
        assert_eq!(policy.tiers["premium"].burst, 500);
        assert_eq!(policy.methods, [http::Method::GET, http::Method::POST]);
    }

    #[test]
    fn policy_and_identity_errors_are_all_reported() {
        let text = format!(
            r#"{MINIMAL}
[identity]
trusted_proxies = ["not-a-net"]

[[identity.api_keys]]
name = "k"
sha256 = "zz"

[[identity.jwt.keys]]
algorithm = "none"

[policies.regional]
key = ["cookie"]
rate = "ten per second"
mode = "strict"

[policies.costly]
key = ["ip"]
rate = "10/1s"
burst = 2
cost = 3
"#
        );
        let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
        for expected in [
            "identity.trusted_proxies[0]",
            "identity.api_keys[0].sha256",
            "identity.jwt.keys",
            "policies.regional.key[0]",
            "policies.regional.rate",
            "policies.regional.mode",
            "policies.costly.burst",
        ] {
            assert!(
                keys.iter().any(|k| k.starts_with(expected)),
                "{expected} missing from {keys:?}"
            );
        }
    }

    #[test]
    fn a_local_reserve_is_for_eventual_policies_up_to_half() {
        let policy = |name: &str, extra: &str| {
            format!("[policies.{name}]\nkey = [\"ip\"]\nrate = \"100/10s\"\n{extra}\n")
        };
        let gossip = "[gossip]\nlisten = \"127.0.0.1:7400\"\nca = \"ca.pem\"\ncert = \"c.pem\"\n\
                      key = \"k.pem\"\n\n[[gossip.peers]]\nregion = \"us-east\"\n\
                      addr = \"127.0.0.1:7400\"\n";
        let text = [
            MINIMAL.to_owned(),
            gossip.to_owned(),
            policy("ok", "scope = \"global\"\nlocal_reserve = \"12.5%\""),
            policy(
                "strict",
                "scope = \"global\"\nmode = \"strict\"\nlocal_reserve = \"5%\"",
            ),
            policy("regional", "local_reserve = \"5%\""),
            policy("greedy", "scope = \"global\"\nlocal_reserve = \"50.1%\""),
            policy("fraction", "scope = \"global\"\nlocal_reserve = 0.1"),
        ]
        .concat();
        let found = problems(&text);
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "policies.fraction.local_reserve",
                "policies.greedy.local_reserve",
                "policies.regional.local_reserve",
                "policies.strict.local_reserve",
            ],
            "{found:?}"
        );
        assert!(found[0].message.contains("percentage"), "{found:?}");
        assert!(found[1].message.contains("at most 50%"), "{found:?}");
        assert!(found[3].message.contains("only eventual"), "{found:?}");
        let valid = [
            MINIMAL.to_owned(),
            gossip.to_owned(),
            policy("ok", "scope = \"global\"\nlocal_reserve = \"12.5%\""),
        ]
        .concat();
        let config = parse(&valid).unwrap();
        assert_eq!(config.policies[0].local_reserve, 125);
    }

    #[test]
    fn shipped_region_files_are_valid() {
        for region in ["us-east", "eu-west", "ap-south"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("regions")
                .join(format!("{region}.toml"));
            let config = RegionConfig::load_with_env(&path, |_| None).unwrap();
            assert_eq!(config.region, region);
        }
    }
}
