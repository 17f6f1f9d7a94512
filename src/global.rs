//! Global limits: the glue between the configured policies and the gossip machinery.
//!
//! A global policy's quota is shared by every gateway of the deployment. Each one decides
//! locally, from the state gossip has brought so far ([`crate::gossip`]), and never waits for
//! another region:
//!
//! - `strict`: admit only with rights held here ([`crate::crdt::bounded`]); never over the
//!   quota in any window, whatever the network does. The price: a gateway short of rights asks
//!   its peers, and while it is cut off it can spend only what it holds.
//! - `eventual`: admit while the merged global count leaves headroom, spending at most a
//!   fair share of it on admissions the peers have not acknowledged
//!   ([`crate::crdt::eventual`]); about the quota, and a cut-off gateway keeps serving its
//!   share.
//!
//! This module turns policies into gossip policy ids (one per policy and tier, since a tier
//! has its own quota), computes the configuration digest every peer must share, and starts
//! and stops the QUIC driver.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::config::{GossipSettings, RegionConfig};
use crate::crdt::bounded::StrictPolicy;
use crate::crdt::{Actor, EventualPolicy, PolicyId, Slot, WindowSpec};
use crate::gossip::driver::{self, DriverTask, GossipHandle, PeerAddress};
use crate::gossip::proto::{self, Gossip, GossipError, PeerId, Policies};
use crate::gossip::quic::{self, GossipEndpoint, QuicError, TlsSwitch};
use crate::gossip::tls::{PeerTls, TlsError};
use crate::limit::policy::{GlobalMode, Limit, Policy, Scope};

pub mod admission;
mod certificates;
pub mod strict_wait;

pub use certificates::check_certificates;
pub use strict_wait::{StrictWaiting, WaitReason};

/// Why global limits could not start.
///
/// Each message embeds its cause, so no variant also returns it as `source()`: anyhow's report
/// in main would print the cause twice (and each level below it again).
#[derive(Debug, thiserror::Error)]
pub enum GlobalError {
    /// The certificates could not be loaded.
    #[error("gossip certificates: {0}")]
    Tls(TlsError),
    /// A certificate or key file is not there.
    #[error("gossip {what} {} does not exist: {make}", path.display())]
    MissingFile {
        /// Which file: "CA certificate", "certificate", "key".
        what: &'static str,
        path: std::path::PathBuf,
        /// The `tollgate certs` command that makes it, and what to mind.
        make: String,
    },
    /// The QUIC endpoint could not be bound or configured.
    #[error("gossip endpoint: {0}")]
    Quic(QuicError),
    /// The state machine refused the slot list or our actor.
    #[error("gossip state: {0}")]
    Gossip(GossipError),
    /// Our own certificate does not name this gateway.
    #[error("gossip certificate {}: {message}", path.display())]
    Certificate {
        /// The certificate file.
        path: std::path::PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl From<TlsError> for GlobalError {
    fn from(error: TlsError) -> Self {
        Self::Tls(error)
    }
}

impl From<QuicError> for GlobalError {
    fn from(error: QuicError) -> Self {
        Self::Quic(error)
    }
}

impl From<GossipError> for GlobalError {
    fn from(error: GossipError) -> Self {
        Self::Gossip(error)
    }
}

/// Loads the gossip certificates `settings` names and checks that ours names this gateway
/// (a start or a reload; a missing file's error names the `tollgate certs` command).
pub fn load_tls(config: &RegionConfig, settings: &GossipSettings) -> Result<PeerTls, GlobalError> {
    certificates::load(config, settings)
}

/// One global policy at one tier: what the gossip state knows it as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalEntry {
    /// The policy's name.
    pub policy: String,
    /// The tier (`None`: the policy's default limit).
    pub tier: Option<String>,
    /// Its id in the gossip state.
    pub id: PolicyId,
    /// Its mode.
    pub mode: GlobalMode,
    /// Admissions per window, deployment-wide.
    pub quota: u64,
    /// The sliding window.
    pub spec: WindowSpec,
    /// Eventual mode's local reserve, in thousandths of the quota (see [`Policy`]).
    pub local_reserve: u16,
}

/// Every global policy and tier of a configuration, in a deterministic order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlobalPolicies {
    entries: Vec<GlobalEntry>,
}

impl GlobalPolicies {
    /// The global policies among `policies`. Ids are assigned in (name, tier) order so every
    /// gateway with the same policies agrees on them. A window the configuration check would
    /// have refused is skipped.
    pub fn from_policies(policies: &[Policy]) -> Self {
        let mut found: Vec<(String, Option<String>, GlobalMode, Limit, u32, u16)> = Vec::new();
        for policy in policies {
            let Scope::Global(mode) = policy.scope else {
                continue;
            };
            found.push((
                policy.name.clone(),
                None,
                mode,
                policy.limit,
                policy.sub_windows,
                policy.local_reserve,
            ));
            for (tier, limit) in &policy.tiers {
                found.push((
                    policy.name.clone(),
                    Some(tier.clone()),
                    mode,
                    *limit,
                    policy.sub_windows,
                    policy.local_reserve,
                ));
            }
        }
        found.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let entries = found
            .into_iter()
            .zip(1..)
            .filter_map(|((policy, tier, mode, limit, k, local_reserve), id)| {
                let spec = WindowSpec::new(limit.rate.period_us(), k).ok()?;
                Some(GlobalEntry {
                    policy,
                    tier,
                    id,
                    mode,
                    quota: limit.rate.amount,
                    spec,
                    local_reserve,
                })
            })
            .collect();
        Self { entries }
    }

    /// Whether there is no global policy.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, in id order.
    pub fn entries(&self) -> &[GlobalEntry] {
        &self.entries
    }

    /// The entry of `policy` at `tier` (a linear scan: a handful of entries, no allocation
    /// on the request path).
    pub fn find(&self, policy: &str, tier: Option<&str>) -> Option<&GlobalEntry> {
        self.entries
            .iter()
            .find(|e| e.policy == policy && e.tier.as_deref() == tier)
    }

    /// What the state machine needs to know of them.
    pub fn proto_policies(&self) -> Policies {
        let mut policies = Policies::default();
        for e in &self.entries {
            match e.mode {
                GlobalMode::Eventual => policies.eventual.push((
                    e.id,
                    EventualPolicy {
                        reserve_permille: e.local_reserve,
                        ..EventualPolicy::new(e.quota, e.spec)
                    },
                )),
                GlobalMode::Strict => policies.strict.push((
                    e.id,
                    StrictPolicy {
                        quota: e.quota,
                        spec: e.spec,
                    },
                )),
            }
        }
        policies
    }

    /// Every entry's id and quota.
    pub fn quotas(&self) -> Vec<(PolicyId, u64)> {
        self.entries.iter().map(|e| (e.id, e.quota)).collect()
    }

    /// Whether `other` differs from these in quotas at most (what a reload can change).
    pub fn same_but_quotas(&self, other: &Self) -> bool {
        self.entries.len() == other.entries.len()
            && self.entries.iter().zip(&other.entries).all(|(a, b)| {
                GlobalEntry {
                    quota: b.quota,
                    ..a.clone()
                } == *b
            })
    }

    /// The digest peers compare in their `Hello`: everything that must agree for their
    /// states to mean the same (ids, modes, windows, the slot list). A peer with another
    /// digest is reported and not merged. Quotas are not in it: gateways tell each other
    /// theirs and enforce the smallest until they agree (see [`crate::gossip::proto`]'s
    /// `reload` module), so a quota can change one gateway at a time.
    pub fn digest(&self, slots: &[Slot]) -> u64 {
        let mut hasher = Sha256::new();
        for e in &self.entries {
            hasher.update(format!(
                "policy {} {} {} {} {} {}\n",
                e.id,
                e.policy,
                e.tier.as_deref().unwrap_or("-"),
                e.mode.as_str(),
                e.spec.window_us(),
                e.spec.sub_windows()
            ));
        }
        for slot in slots {
            hasher.update(format!("slot {} {}\n", slot.region, slot.instance));
        }
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    }
}

/// A running gateway's share in the global limits.
pub struct GlobalLimits {
    /// The limiter's (and admin API's) handle on the state.
    pub handle: GossipHandle,
    /// The policies, with their ids (a reload may change their quotas).
    policies: ArcSwap<GlobalPolicies>,
    /// The configured gateways, in slot order.
    pub slots: Vec<Slot>,
    /// Our slot.
    pub me: PeerId,
    /// Replaces the certificates of new gossip connections (a reload).
    tls: TlsSwitch,
    driver: Mutex<Option<DriverTask>>,
    strict: strict_wait::StrictWatch,
    /// The task that warns about strict policies that cannot admit (none without any).
    strict_warning: Option<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for GlobalLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalLimits")
            .field("policies", &self.policies.load())
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl GlobalLimits {
    /// Loads the certificates, binds the QUIC endpoint and starts gossiping, as a new
    /// incarnation (numbered by the wall clock in microseconds, so a restart is always newer
    /// as long as the clock is not set back by more than the restart takes). Must run inside
    /// a Tokio runtime.
    pub fn start(config: &RegionConfig, settings: &GossipSettings) -> Result<Self, GlobalError> {
        let policies = GlobalPolicies::from_policies(&config.policies);
        let slots = settings.slots();
        let tls = load_tls(config, settings)?;
        let transport = quic::GossipConfig {
            keep_alive: Duration::from_secs(1).min(settings.idle_timeout / 2),
            idle_timeout: settings.idle_timeout,
            max_frame: settings.max_frame,
        };
        let endpoint = GossipEndpoint::bind_with(settings.listen, tls, slots.clone(), transport)?;
        let now = crate::clock::now_us();
        let me = Actor::new(config.region.clone(), settings.instance.clone(), now.max(1));
        let proto_config = proto::GossipConfig {
            interval_us: micros(settings.interval),
            idle_timeout_us: micros(settings.idle_timeout),
            backoff_cap_us: micros(settings.backoff_cap),
            ..proto::GossipConfig::default()
        };
        let gossip = Gossip::new(
            me.clone(),
            slots.clone(),
            proto_config,
            policies.proto_policies(),
            policies.digest(&slots),
            now ^ me.stable_hash(),
            now,
        )?;
        let my_id = gossip.id();
        let peers = settings
            .peers
            .iter()
            .zip(0u16..)
            .map(|(p, i)| PeerAddress {
                peer: PeerId(i),
                addr: p.addr.clone(),
                region: p.region.clone(),
                instance: p.instance.clone(),
            })
            .collect();
        let tls = endpoint.tls_switch();
        let (handle, task) = driver::spawn_driver(gossip, endpoint, peers);
        let strict = strict_wait::StrictWatch::new(handle.clone(), &policies, &slots, now);
        let strict_warning = (!strict.is_empty())
            .then(|| tokio::spawn(strict.clone().warn_while_waiting()).abort_handle());
        tracing::info!(
            actor = %me,
            listen = %settings.listen,
            gateways = slots.len(),
            global_policies = policies.entries().len(),
            "gossip started"
        );
        Ok(Self {
            handle,
            policies: ArcSwap::from_pointee(policies),
            slots,
            me: my_id,
            tls,
            driver: Mutex::new(Some(task)),
            strict,
            strict_warning,
        })
    }

    /// The policies in force, with their ids.
    pub fn policies(&self) -> Arc<GlobalPolicies> {
        self.policies.load_full()
    }

    /// A reload changed the quotas (only: see [`GlobalPolicies::same_but_quotas`]). Each
    /// takes effect as far as the peers' allow (the smallest announced is in force).
    pub fn set_policies(&self, policies: GlobalPolicies) {
        let quotas = policies.quotas();
        self.policies.store(Arc::new(policies));
        self.handle
            .with_machine(|gossip, now| gossip.set_quotas(&quotas, now));
    }

    /// The quota in force for gossip policy `id`.
    pub fn quota_in_force(&self, id: PolicyId) -> Option<u64> {
        self.handle
            .with_machine(|gossip, now| gossip.quota_in_force(id, now))
    }

    /// Gossip connections made from now on use `tls` (see [`load_tls`]).
    pub fn set_tls(&self, tls: &PeerTls) -> Result<(), GlobalError> {
        Ok(self.tls.set(tls)?)
    }

    /// The strict policies that cannot admit with this gateway's share yet, and the peers
    /// they wait for (empty once it holds its share).
    pub fn strict_waiting(&self) -> Vec<StrictWaiting> {
        self.strict.waiting(crate::clock::now_us())
    }

    /// `region/instance` of a peer, for reports.
    pub fn peer_name(&self, peer: PeerId) -> String {
        match self.slots.get(usize::from(peer.0)) {
            Some(slot) => format!("{}/{}", slot.region, slot.instance),
            None => format!("slot-{}", peer.0),
        }
    }

    /// Hands idle strict rights to a peer, sends the last usage, waits up to `grace` for the
    /// peers to have it, and stops gossiping. Later calls do nothing.
    pub async fn shutdown(&self, grace: Duration) {
        if let Some(warning) = &self.strict_warning {
            warning.abort();
        }
        let task = self
            .driver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task
            && let Err(error) = task.shutdown(grace).await
        {
            tracing::warn!(%error, "gossip driver did not stop cleanly");
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Drop for GlobalLimits {
    fn drop(&mut self) {
        if let Some(warning) = &self.strict_warning {
            warning.abort();
        }
    }
}
