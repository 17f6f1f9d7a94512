//! Strict policies that cannot admit with this gateway's share yet, said once at warn and
//! shown in `/ready`.
//!
//! A new incarnation serves a strict policy with its own share only once every peer has
//! handed over to it ([`crate::crdt::bounded`], "Restarts"); until then it admits only with
//! rights that reachable peers give it. A lone gateway (its peers down) therefore refuses every
//! request of a strict policy for as long as they stay down: by design (the quota holds
//! whatever the network does), but it must not look like a healthy gateway that merely has
//! busy clients. The first window plus sub-window after a start is the expected wait and is
//! shown but not warned about.
//!
//! Read through [`GossipHandle`]'s inspection only: whether the share is reclaimed, and which
//! peers are connected. Which connected peers still owe a handover is not exposed there, so
//! while every peer is connected the report names them all.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use super::GlobalPolicies;
use crate::crdt::{PolicyId, Slot};
use crate::gossip::driver::GossipHandle;
use crate::gossip::proto::{LinkState, PeerReport, PeerStatus};
use crate::limit::policy::GlobalMode;

/// How often the warning task looks.
const POLL: Duration = Duration::from_secs(1);

/// Why a strict policy cannot admit with this gateway's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaitReason {
    /// Within one window plus one sub-window of the start: a predecessor's admissions may
    /// still be live (expected after every start).
    StartWindow,
    /// Some peers are not connected; their handovers cannot arrive.
    UnreachablePeers,
    /// Every peer is connected; their handovers have not all arrived (or settled) yet.
    Handovers,
}

/// One strict policy that cannot admit with this gateway's share (every tier of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StrictWaiting {
    pub policy: String,
    pub reason: WaitReason,
    /// The peers it waits for, `region/instance`: the unreachable ones, or every peer while
    /// all are connected.
    pub waiting_for: Vec<String>,
}

/// Whether a peer is connected and its `Hello` accepted (what `/ready` counts as connected).
pub fn is_connected(report: &PeerReport) -> bool {
    matches!(report.link, LinkState::Up { .. }) && report.status == PeerStatus::Ok
}

/// What the report and the warning task need: the handle, one gossip id per strict policy
/// name, the slot names and when this incarnation started.
#[derive(Clone)]
pub(super) struct StrictWatch {
    handle: GossipHandle,
    policies: Vec<(String, PolicyId)>,
    slots: Vec<Slot>,
    started_us: u64,
    wait_us: u64,
}

impl StrictWatch {
    pub(super) fn new(
        handle: GossipHandle,
        policies: &GlobalPolicies,
        slots: &[Slot],
        started_us: u64,
    ) -> Self {
        let strict = policies
            .entries()
            .iter()
            .filter(|e| e.mode == GlobalMode::Strict);
        let wait_us = strict
            .clone()
            .map(|e| e.spec.window_us().saturating_add(e.spec.sub_len_us()))
            .max()
            .unwrap_or(0);
        let mut names = BTreeSet::new();
        let policies = strict
            .filter(|e| names.insert(e.policy.clone()))
            .map(|e| (e.policy.clone(), e.id))
            .collect();
        Self {
            handle,
            policies,
            slots: slots.to_vec(),
            started_us,
            wait_us,
        }
    }

    /// Whether there is any strict policy to watch.
    pub(super) fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The strict policies that cannot admit with our share at `now_us` (empty once the
    /// share is reclaimed: then for good, in this incarnation).
    pub(super) fn waiting(&self, now_us: u64) -> Vec<StrictWaiting> {
        let Some((_, id)) = self.policies.first() else {
            return Vec::new();
        };
        // The share is reclaimed for every strict policy at once: one inspection says it.
        let reclaimed = self
            .handle
            .inspect(*id, "")
            .strict
            .is_none_or(|s| s.reclaimed);
        if reclaimed {
            return Vec::new();
        }
        let peers = self.handle.peer_status();
        let name = |report: &PeerReport| match self.slots.get(usize::from(report.peer.0)) {
            Some(slot) => slot.to_string(),
            None => format!("slot-{}", report.peer.0),
        };
        let unreachable: Vec<String> = peers
            .iter()
            .filter(|p| !is_connected(p))
            .map(name)
            .collect();
        let reason = if now_us < self.started_us.saturating_add(self.wait_us) {
            WaitReason::StartWindow
        } else if unreachable.is_empty() {
            WaitReason::Handovers
        } else {
            WaitReason::UnreachablePeers
        };
        let waiting_for = if unreachable.is_empty() {
            peers.iter().map(name).collect()
        } else {
            unreachable
        };
        self.policies
            .iter()
            .map(|(policy, _)| StrictWaiting {
                policy: policy.clone(),
                reason,
                waiting_for: waiting_for.clone(),
            })
            .collect()
    }

    /// Warns once per strict policy that still cannot admit after the start window, and says
    /// when the share is reclaimed; then ends.
    pub(super) async fn warn_while_waiting(self) {
        let mut warned = BTreeSet::new();
        let mut ticks = tokio::time::interval(POLL);
        loop {
            ticks.tick().await;
            let waiting = self.waiting(crate::clock::now_us());
            if waiting.is_empty() {
                if !warned.is_empty() {
                    tracing::info!("strict policies admit with this gateway's share now");
                }
                return;
            }
            for w in waiting {
                if w.reason == WaitReason::StartWindow || !warned.insert(w.policy.clone()) {
                    continue;
                }
                let peers = w.waiting_for.join(", ");
                let why = match w.reason {
                    WaitReason::UnreachablePeers => "unreachable",
                    _ => "connected, handover pending",
                };
                tracing::warn!(
                    policy = %w.policy,
                    waiting_for = %peers,
                    "strict policy {} cannot admit with this gateway's share until every peer \
                     has handed over ({why}: {peers}); until then it admits only with rights \
                     reachable peers give it",
                    w.policy,
                );
            }
        }
    }
}
