//! Reloading the configuration on SIGHUP, without dropping a connection or failing a request.
//!
//! The file is read and validated as `--check` does. An invalid file changes nothing: its
//! errors are logged as `--check` prints them. A valid one is applied:
//!
//! - routes, services and instances: a new [`Proxy`](crate::proxy::Proxy); a service whose
//!   settings did not change keeps its upstream (health, connections, concurrency queue);
//! - policies, API keys, JWT keys, identity settings: the limiter's rules
//!   ([`RateLimiter::set_rules`](crate::http::ratelimit::RateLimiter::set_rules)); buckets
//!   live in the store under the policy's name, so a policy keeps its buckets;
//! - `log_level`, `max_request_body`, `drain_timeout`, health checks;
//! - gossip certificates (CA, certificate, key): gossip connections made from then on.
//!
//! Settings a running process cannot change in place (addresses it listens on, its worker
//! threads, the store, the gossip slots, the global policies) make the reload
//! `restart_required`: nothing is applied, and the log names them.
//!
//! A request takes the snapshot in force when it starts and finishes on it; the swap is one
//! pointer store.

use std::path::PathBuf;
use std::sync::Arc;

use super::{Gateway, Running};
use crate::config::RegionConfig;
use crate::global::{self, GlobalPolicies};

/// The file a gateway was started from, and the digest of what it read.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// SHA-256 (hex) of the file's bytes.
    pub digest: String,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The file is in force now.
    Applied {
        /// SHA-256 (hex) of its bytes.
        digest: String,
    },
    /// The file did not validate; the running configuration stays.
    Invalid {
        /// Every problem, as `--check` prints them.
        errors: String,
    },
    /// The file changes settings only a restart applies; nothing was applied.
    RestartRequired {
        /// The keys that changed.
        keys: Vec<&'static str>,
    },
    /// The gateway was not started from a file.
    NoSource,
}

impl ReloadOutcome {
    /// The `result` label of `tollgate_config_reloads_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Self::Applied { .. } => "applied",
            Self::Invalid { .. } => "invalid",
            Self::RestartRequired { .. } => "restart_required",
            Self::NoSource => "no_source",
        }
    }
}

/// Reloads on every SIGHUP until the process ends (or no SIGHUP can come).
pub(super) async fn on_hangups(gateway: Arc<Gateway>, mut hangups: crate::shutdown::Hangups) {
    while hangups.recv().await {
        tracing::info!(region = %gateway.region, "SIGHUP received, reloading the config");
        let gateway = gateway.clone();
        // Reading files and hashing keys blocks: off the request workers.
        if let Err(error) = tokio::task::spawn_blocking(move || gateway.reload()).await {
            tracing::error!(%error, "config reload did not finish");
        }
    }
}

impl Gateway {
    /// Reads the config file again and applies it if it is valid (see the module docs).
    /// Counted in `tollgate_config_reloads_total` and logged either way.
    pub fn reload(&self) -> ReloadOutcome {
        let outcome = self.try_reload();
        metrics::counter!(crate::metrics::CONFIG_RELOADS_TOTAL, "result" => outcome.result())
            .increment(1);
        match &outcome {
            ReloadOutcome::Applied { digest } => {
                tracing::info!(region = %self.region, %digest, "config reloaded");
            }
            ReloadOutcome::Invalid { errors } => {
                for line in errors.lines() {
                    tracing::error!("{line}");
                }
                tracing::error!(region = %self.region, "config reload refused: the running config stays");
            }
            ReloadOutcome::RestartRequired { keys } => tracing::warn!(
                region = %self.region,
                keys = %keys.join(", "),
                "config reload refused: these settings change only with a restart; nothing applied"
            ),
            ReloadOutcome::NoSource => {
                tracing::warn!(region = %self.region, "config reload skipped: not started from a file");
            }
        }
        outcome
    }

    fn try_reload(&self) -> ReloadOutcome {
        let Some(path) = &self.source else {
            return ReloadOutcome::NoSource;
        };
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (config, digest) = match RegionConfig::load_digested(path) {
            Ok(loaded) => loaded,
            Err(error) => {
                return ReloadOutcome::Invalid {
                    errors: error.to_string(),
                };
            }
        };
        let running = self.running();
        let keys = restart_keys(&running.config, &config);
        if !keys.is_empty() {
            return ReloadOutcome::RestartRequired { keys };
        }
        // Everything that can still fail, before anything is swapped.
        let tls = match (&self.global, &config.gossip) {
            (Some(_), Some(settings)) => match global::load_tls(&config, settings) {
                Ok(tls) => Some(tls),
                Err(error) => {
                    return ReloadOutcome::Invalid {
                        errors: format!("{}: {error}", path.display()),
                    };
                }
            },
            _ => None,
        };
        if let (Some(global), Some(tls)) = (&self.global, &tls)
            && let Err(error) = global.set_tls(tls)
        {
            return ReloadOutcome::Invalid {
                errors: format!("{}: {error}", path.display()),
            };
        }
        let proxy = running.proxy.reconfigured(&config);
        self.limiter
            .set_rules(config.policies.clone(), config.identity.clone());
        if let Some(global) = &self.global {
            global.set_policies(GlobalPolicies::from_policies(&config.policies));
        }
        crate::telemetry::set_log_level(config.log_level.as_deref());
        self.running.replace(Running {
            config,
            proxy,
            digest: Some(digest.clone()),
        });
        self.follow_upstreams();
        ReloadOutcome::Applied { digest }
    }
}

/// The settings that differ between `old` and `new` and that only a restart applies.
fn restart_keys(old: &RegionConfig, new: &RegionConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key: &'static str, same: bool| {
        if !same {
            keys.push(key);
        }
    };
    check("region", old.region == new.region);
    check("listen", old.listen == new.listen);
    check("admin_listen", old.admin_listen == new.admin_listen);
    check("workers", old.workers == new.workers);
    check("redis_url", old.redis_url == new.redis_url);
    check("redis_cluster", old.redis_cluster == new.redis_cluster);
    check("store_timeout", old.store_timeout == new.store_timeout);
    check(
        "store_breaker_failures",
        old.store_breaker_failures == new.store_breaker_failures,
    );
    check(
        "store_probe_interval",
        old.store_probe_interval == new.store_probe_interval,
    );
    match (&old.gossip, &new.gossip) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            check("gossip.listen", a.listen == b.listen);
            check("gossip.instance", a.instance == b.instance);
            check("gossip.peers", a.peers == b.peers);
            check("gossip.interval", a.interval == b.interval);
            check("gossip.idle_timeout", a.idle_timeout == b.idle_timeout);
            check("gossip.backoff_cap", a.backoff_cap == b.backoff_cap);
            check("gossip.max_frame", a.max_frame == b.max_frame);
        }
        _ => check("gossip", false),
    }
    check(
        "policies (global, other than their rate's count)",
        GlobalPolicies::from_policies(&old.policies)
            .same_but_quotas(&GlobalPolicies::from_policies(&new.policies)),
    );
    keys
}
