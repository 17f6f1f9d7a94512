//! Changing global quotas at runtime (a config reload), while gateways run different
//! versions of the configuration.
//!
//! # The rule
//!
//! Every gateway tells each peer the quotas it is configured with ([`Message::Quotas`]: on
//! every accepted `Hello`, and to every ready peer when a reload changes them). The quota *in
//! force* for a policy is the smallest of our configured one and the last one each peer
//! announced. So during a rolling change from `old` to `new`:
//!
//! - a gateway that reloaded first keeps `min(old, new)` while any peer still announces
//!   `old`; an increase takes effect when the last gateway has reloaded, a decrease as soon
//!   as the first one's announcement arrives (one gossip message later);
//! - strict mode: every slot's share is `quota in force / n`; consumption and transferred
//!   rights stay (see [`crate::crdt::BoundedTable::set_quota`]), so once every gateway has
//!   heard of the change the rights of all slots together are at most `min(old, new)` minus
//!   what is live: no window starting then admits more. In the one message between a
//!   decrease and its arrival, a gateway that has not heard of it still spends its old share
//!   (at most `old` altogether, as before the change);
//! - eventual mode: the registered quota (the limit of the rule, and the bound on what a
//!   peer's count may claim) is the quota in force.
//!
//! A peer not heard from since we started counts with nothing (we cannot know what it runs);
//! one that went silent counts with what it last said, so a cut-off gateway holds an increase
//! back until it is heard again with the new quota. What a peer announces can only *lower*
//! the quota in force: a byzantine peer can cost availability, never admit more.
//!
//! # How long a lower quota is believed
//!
//! A peer's announcement below our own quota is believed for [`ROLLOUT_US`] from the first
//! such announcement of that peer for that policy since our own quota last changed, however
//! often it announces: the time a rolling change has to reach us. After that we run our own
//! quota again (the peer's is counted in `quota_overdue`) until our configuration changes.
//! Without the limit, one peer announcing 0 would stop the policy everywhere for as long as
//! it liked; with it, a liar costs availability for one rollout window per reload of ours.
//! The price is honest too: a gateway left on its old quota for longer than the window goes
//! back to spending its old share (at most `old` in all, as before the change started).
//!
//! Ids, modes and windows are not negotiable this way: they are in the `Hello` digest, and a
//! change to them is a restart.

use std::collections::BTreeMap;

use super::{Gossip, Message, PeerId};
use crate::crdt::PolicyId;

/// How long a peer's quota below ours is believed (see "How long a lower quota is believed").
pub const ROLLOUT_US: u64 = 10 * 60 * 1_000_000;

/// Our configured quotas and what each peer last announced of its own.
#[derive(Debug, Clone, Default)]
pub(super) struct Quotas {
    own: BTreeMap<PolicyId, u64>,
    announced: BTreeMap<PeerId, BTreeMap<PolicyId, Announced>>,
}

/// One peer's last announced quota for one policy.
#[derive(Debug, Clone, Copy)]
struct Announced {
    quota: u64,
    /// When it first announced a quota below ours since ours last changed: kept while it
    /// announces equal or higher ones, so toggling does not buy it a new window.
    lower_since_us: Option<u64>,
    /// Its lower quota outlived [`ROLLOUT_US`] (counted once).
    overdue: bool,
}

impl Quotas {
    pub(super) fn new(own: impl IntoIterator<Item = (PolicyId, u64)>) -> Self {
        Self {
            own: own.into_iter().collect(),
            announced: BTreeMap::new(),
        }
    }

    fn in_force(&self, policy: PolicyId, now_us: u64) -> Option<u64> {
        let own = *self.own.get(&policy)?;
        Some(
            self.announced
                .values()
                .filter_map(|quotas| quotas.get(&policy))
                .filter(|a| a.believed(now_us))
                .map(|a| a.quota)
                .fold(own, u64::min),
        )
    }

    /// Marks lower announcements that outlived the rollout window; returns how many did now.
    fn mark_overdue(&mut self, now_us: u64) -> u64 {
        let mut newly = 0;
        for a in self.announced.values_mut().flat_map(|q| q.values_mut()) {
            if !a.overdue && a.lower_since_us.is_some() && !a.believed(now_us) {
                a.overdue = true;
                newly += 1;
            }
        }
        newly
    }
}

impl Announced {
    fn believed(&self, now_us: u64) -> bool {
        self.lower_since_us
            .is_none_or(|since| now_us < since.saturating_add(ROLLOUT_US))
    }
}

impl Gossip {
    /// A reload changed our configured quotas: `quotas` lists every global policy's (ids
    /// unknown here are ignored: ids and modes change only with a restart). Applies the
    /// quotas in force and tells every ready peer.
    pub fn set_quotas(&mut self, quotas: &[(PolicyId, u64)], now_us: u64) {
        for (policy, quota) in quotas {
            let Some(own) = self.quotas.own.get_mut(policy) else {
                continue;
            };
            if *own == *quota {
                continue;
            }
            *own = *quota;
            // A new configuration of ours: every peer's lower quota gets a new rollout
            // window, counted from now if it is still lower.
            for a in self
                .quotas
                .announced
                .values_mut()
                .filter_map(|q| q.get_mut(policy))
            {
                a.lower_since_us = (a.quota < *quota).then_some(now_us);
                a.overdue = false;
            }
        }
        self.apply_quotas(now_us);
        for peer in self.ready_peers() {
            self.send_quotas(peer, now_us);
        }
    }

    /// The quota in force for `policy` (see the module docs); `None` for an unknown policy.
    pub fn quota_in_force(&self, policy: PolicyId, now_us: u64) -> Option<u64> {
        self.quotas.in_force(policy, now_us)
    }

    /// Tells `to` our configured quotas.
    pub(super) fn send_quotas(&mut self, to: PeerId, now_us: u64) {
        let own = self.quotas.own.iter().map(|(p, q)| (*p, *q)).collect();
        self.send(to, Message::Quotas(own), now_us);
    }

    /// `from` announced its configured quotas. Policies we do not know are dropped (so what
    /// one peer makes us hold is bounded by our own policy count).
    pub(super) fn on_quotas(&mut self, now_us: u64, from: PeerId, quotas: Vec<(PolicyId, u64)>) {
        let previous = self.quotas.announced.remove(&from).unwrap_or_default();
        let mut known = BTreeMap::new();
        for (policy, quota) in quotas {
            let Some(&own) = self.quotas.own.get(&policy) else {
                continue;
            };
            let before = previous.get(&policy);
            let lower_since_us = before
                .and_then(|a| a.lower_since_us)
                .or((quota < own).then_some(now_us));
            let overdue = before.is_some_and(|a| a.overdue);
            known.insert(
                policy,
                Announced {
                    quota,
                    lower_since_us,
                    overdue,
                },
            );
        }
        self.quotas.announced.insert(from, known);
        self.apply_quotas(now_us);
    }

    /// Puts the quotas in force into the strict and eventual state (also run from the GC
    /// timer, so a lower quota whose rollout window ended stops counting).
    pub(super) fn apply_quotas(&mut self, now_us: u64) {
        self.stats.quota_overdue = self
            .stats
            .quota_overdue
            .saturating_add(self.quotas.mark_overdue(now_us));
        let policies: Vec<PolicyId> = self.quotas.own.keys().copied().collect();
        for policy in policies {
            let Some(quota) = self.quotas.in_force(policy, now_us) else {
                continue;
            };
            if let Some(strict) = self.strict.get_mut(&policy) {
                if strict.quota != quota {
                    strict.quota = quota;
                    self.bounded.set_quota(policy, quota);
                }
            } else if self
                .node
                .table()
                .policy(policy)
                .is_some_and(|p| p.quota != quota)
            {
                self.node.set_quota(policy, quota);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{GossipConfig, Policies};
    use super::*;
    use crate::crdt::bounded::StrictPolicy;
    use crate::crdt::{Actor, EventualPolicy, Slot, WindowSpec};

    const T0: u64 = 1_750_000_000_000_000;
    const STRICT: PolicyId = 1;
    const EVENTUAL: PolicyId = 2;
    const DIGEST: u64 = 7;
    const PEER: PeerId = PeerId(1);

    fn machine() -> Gossip {
        let spec = WindowSpec::new(2_000_000, 10).unwrap();
        let policies = Policies {
            strict: vec![(STRICT, StrictPolicy { quota: 10, spec })],
            eventual: vec![(EVENTUAL, EventualPolicy::new(100, spec))],
        };
        let slots = vec![Slot::new("r0", "a"), Slot::new("r1", "a")];
        let me = Actor::new("r0", "a", T0);
        let mut g =
            Gossip::new(me, slots, GossipConfig::default(), policies, DIGEST, 1, T0).unwrap();
        g.on_connected(PEER, T0);
        let hello = Message::Hello {
            actor: Actor::new("r1", "a", T0 - 10_000_000),
            config_digest: DIGEST,
        };
        g.handle(T0, PEER, hello);
        g
    }

    /// The quotas `g` announced to the peer, in order.
    fn announced(g: &mut Gossip) -> Vec<Vec<(PolicyId, u64)>> {
        std::iter::from_fn(|| g.poll_transmit(T0))
            .filter_map(|(to, m)| match m {
                Message::Quotas(q) if to == PEER => Some(q),
                _ => None,
            })
            .collect()
    }

    fn in_force(g: &Gossip) -> (u64, u64, u64) {
        (
            g.quota_in_force(STRICT, T0).unwrap(),
            g.strict().policy_quota(STRICT).unwrap(),
            g.eventual().table().policy(EVENTUAL).unwrap().quota,
        )
    }

    #[test]
    fn the_smallest_quota_announced_is_in_force_and_changes_are_announced() {
        let mut g = machine();
        assert_eq!(announced(&mut g), vec![vec![(STRICT, 10), (EVENTUAL, 100)]]);

        // The peer runs a larger strict and a smaller eventual quota; 99 is not ours.
        let theirs = vec![(STRICT, 20), (EVENTUAL, 50), (99, 1)];
        g.handle(T0, PEER, Message::Quotas(theirs));
        assert_eq!(in_force(&g), (10, 10, 50));
        assert_eq!(g.quota_in_force(99, T0), None);

        // We reload to 30: the peer's 20 holds it back, and the peer is told.
        g.set_quotas(&[(STRICT, 30), (EVENTUAL, 100)], T0);
        assert_eq!(in_force(&g), (20, 20, 50));
        assert_eq!(announced(&mut g), vec![vec![(STRICT, 30), (EVENTUAL, 100)]]);

        // The peer reloads too: the new quotas are in force.
        g.handle(
            T0,
            PEER,
            Message::Quotas(vec![(STRICT, 30), (EVENTUAL, 100)]),
        );
        assert_eq!(in_force(&g), (30, 30, 100));
    }

    #[test]
    fn a_lower_quota_is_believed_for_one_rollout_window_per_change_of_ours() {
        let mut g = machine();
        let strict_in_force = |g: &Gossip, now| g.quota_in_force(STRICT, now).unwrap();

        // A peer announcing 0 (a liar, or an operator's first step) is believed at once...
        g.handle(T0, PEER, Message::Quotas(vec![(STRICT, 0)]));
        assert_eq!(strict_in_force(&g, T0), 0);
        assert_eq!(g.strict().policy_quota(STRICT), Some(0));

        // ...and toggling does not buy it a new window.
        let later = T0 + ROLLOUT_US / 2;
        g.handle(later, PEER, Message::Quotas(vec![(STRICT, 10)]));
        g.handle(later, PEER, Message::Quotas(vec![(STRICT, 0)]));
        assert_eq!(strict_in_force(&g, later), 0);

        // When the window ends, the GC timer puts our own quota back, once counted.
        let ended = T0 + ROLLOUT_US;
        g.gc(ended);
        assert_eq!(strict_in_force(&g, ended), 10);
        assert_eq!(g.strict().policy_quota(STRICT), Some(10));
        assert_eq!(g.stats().quota_overdue, 1);
        g.handle(ended, PEER, Message::Quotas(vec![(STRICT, 0)]));
        g.gc(ended + 1);
        assert_eq!(strict_in_force(&g, ended + 1), 10);
        assert_eq!(g.stats().quota_overdue, 1);

        // Our own reload opens a new window for a peer still lower than the new quota.
        g.set_quotas(&[(STRICT, 8), (EVENTUAL, 100)], ended + 2);
        assert_eq!(strict_in_force(&g, ended + 2), 0);
        g.gc(ended + 2 + ROLLOUT_US);
        assert_eq!(strict_in_force(&g, ended + 2 + ROLLOUT_US), 8);
    }
}
