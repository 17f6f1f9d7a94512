//! The handshake: which `Hello`s are believed, and what a new incarnation of a peer changes.
//!
//! A `Hello` is the one message that says who the sender is, so it is judged by what the
//! sender could honestly have said:
//!
//! - its slot is the one the transport authenticated (the certificate names one gateway);
//! - its incarnation (a start time in microseconds, on the same clock as `now_us`) is not
//!   more than [`MAX_INCARNATION_SKEW_US`] in the future: a peer cannot claim to be a
//!   restart that has not happened yet and thereby shut its genuine process out for good;
//! - it is not older than the incarnation already known for the slot: a gateway that
//!   restarts gets a newer incarnation, so an older one still talking is a second process
//!   with the same identity (or a clock set back), and it is refused and counted as a
//!   duplicate ([`GossipStats::duplicate_identity`]);
//! - on a new connection it replaces a live, accepted link only if it is *newer*
//!   ([`Gossip::vet_hello`], called by the driver before it touches the live link): the same
//!   incarnation reconnecting waits until the old link times out, so a second connection
//!   cannot tear down the genuine one;
//! - new incarnations of one slot are accepted at most once per
//!   [`MIN_RESTART_INTERVAL_US`], and at most [`MAX_RETIRED`] older ones are remembered, so a
//!   flood of rising incarnations costs bounded memory and bounded work under the lock the
//!   request path takes (each change rebuilds the eventual peer set);
//! - within one connection the incarnation never changes.

use thiserror::Error;

use super::{Gossip, PeerId, PeerStatus};
use crate::crdt::{Ack, Actor};

/// How far in the future (by our clock) a peer's incarnation may lie: the clock skew
/// between gateways that is tolerated. Incarnations are start times, so a larger lead is a
/// forgery (or a clock that is wrong by more than the sub-window arithmetic tolerates).
pub const MAX_INCARNATION_SKEW_US: u64 = 60_000_000;

/// Older incarnations of one peer still counted by the eventual rule: a peer that restarts
/// more often than this within a window is served as if its oldest restarts were forgotten
/// (their admissions are still in the usage table; only the acknowledgement set shrinks).
pub const MAX_RETIRED: usize = 4;

/// Shortest interval between two new incarnations of one peer that are accepted: a real
/// restart takes longer, and a flood of rising incarnations is thereby one per second.
pub const MIN_RESTART_INTERVAL_US: u64 = 1_000_000;

/// Why a `Hello` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HelloRefusal {
    /// Names too long, or incarnation 0 (reserved for "unknown").
    #[error("malformed names or incarnation 0")]
    Malformed,
    /// It names another gateway than the one the connection authenticated.
    #[error("names another gateway than its certificate")]
    WrongSlot,
    /// Its incarnation lies too far in the future.
    #[error("incarnation {ahead_us} us in the future (more than the allowed skew)")]
    Future {
        /// How far ahead of our clock.
        ahead_us: u64,
    },
    /// Older than the incarnation already known: another process with the same identity.
    #[error(
        "incarnation {incarnation} is older than the known {known}: a second process with this identity?"
    )]
    Stale {
        /// The incarnation it announced.
        incarnation: u64,
        /// The newest known.
        known: u64,
    },
    /// A new connection for an incarnation whose link is up: the live link stays.
    #[error("already connected with this incarnation")]
    AlreadyConnected,
    /// Another incarnation on a connection that already had one.
    #[error("incarnation changed within a connection")]
    IncarnationChanged,
    /// A new incarnation too soon after the last one.
    #[error("a new incarnation less than {MIN_RESTART_INTERVAL_US} us after the last")]
    TooFrequent,
    /// Its configuration digest differs from ours.
    #[error("configuration digest {theirs:#x} differs from ours")]
    ConfigMismatch {
        /// The digest it announced.
        theirs: u64,
    },
}

impl Gossip {
    /// The configuration digest our `Hello` carries.
    pub fn config_digest(&self) -> u64 {
        self.config_digest
    }

    /// Whether a `Hello` that arrived as the first message of a *new* connection from `from`
    /// may take over the peer's link: the driver asks before it replaces (or even reports)
    /// anything, so a refused connection changes nothing about the live one. A refusal of
    /// an older incarnation is counted as a duplicate identity.
    pub fn vet_hello(
        &mut self,
        now_us: u64,
        from: PeerId,
        actor: &Actor,
        config_digest: u64,
    ) -> Result<(), HelloRefusal> {
        let result = self.check_hello(now_us, from, actor, config_digest, true);
        self.count_refusal(result);
        result
    }

    /// The checks every `Hello` passes (see the module docs); `new_connection` adds the rule
    /// that only a newer incarnation replaces a live link.
    fn check_hello(
        &self,
        now_us: u64,
        from: PeerId,
        actor: &Actor,
        config_digest: u64,
        new_connection: bool,
    ) -> Result<(), HelloRefusal> {
        let Some(p) = self.peers.get(usize::from(from.0)).and_then(Option::as_ref) else {
            return Err(HelloRefusal::WrongSlot);
        };
        if !actor.is_well_formed() || actor.incarnation == 0 {
            return Err(HelloRefusal::Malformed);
        }
        if actor.slot() != p.slot {
            return Err(HelloRefusal::WrongSlot);
        }
        let ahead_us = actor.incarnation.saturating_sub(now_us);
        if ahead_us > MAX_INCARNATION_SKEW_US {
            return Err(HelloRefusal::Future { ahead_us });
        }
        if let Some(known) = &p.actor {
            if actor.incarnation < known.incarnation {
                return Err(HelloRefusal::Stale {
                    incarnation: actor.incarnation,
                    known: known.incarnation,
                });
            }
            let newer = actor.incarnation > known.incarnation;
            let live = p.ready();
            if new_connection && live && !newer {
                return Err(HelloRefusal::AlreadyConnected);
            }
            if !new_connection && p.conn.accepted && newer {
                return Err(HelloRefusal::IncarnationChanged);
            }
            if newer
                && p.new_incarnation_us
                    .is_some_and(|t| now_us < t.saturating_add(MIN_RESTART_INTERVAL_US))
            {
                return Err(HelloRefusal::TooFrequent);
            }
        }
        if config_digest != self.config_digest {
            return Err(HelloRefusal::ConfigMismatch {
                theirs: config_digest,
            });
        }
        Ok(())
    }

    fn count_refusal(&mut self, result: Result<(), HelloRefusal>) {
        match result {
            Ok(()) => {}
            Err(HelloRefusal::Stale { .. }) => {
                self.stats.refused_hello += 1;
                self.stats.duplicate_identity += 1;
            }
            Err(_) => self.stats.refused_hello += 1,
        }
    }

    /// A `Hello` on an established connection (the acceptor's answer to ours, a resend, or
    /// the dialler's first message as the driver reports it after [`Gossip::vet_hello`]).
    pub(super) fn on_hello(&mut self, now_us: u64, from: PeerId, actor: Actor, digest: u64) {
        let result = self.check_hello(now_us, from, &actor, digest, false);
        self.count_refusal(result);
        let interval_us = self.config.interval_us;
        let Some(p) = self.peer_mut(from) else { return };
        if let Err(refusal) = result {
            // The live connection's state is left alone unless this connection was the one
            // speaking (an accepted peer does not lose its status to a refused resend).
            if !p.conn.accepted {
                p.status = match refusal {
                    HelloRefusal::ConfigMismatch { theirs } => {
                        PeerStatus::ConfigMismatch { theirs }
                    }
                    _ => PeerStatus::BadHello,
                };
            }
            return;
        }
        let mut peers_changed = false;
        match &p.actor {
            Some(known) if *known == actor => {}
            Some(known) => {
                // A restart: the old incarnation may still hold live admissions, so the
                // eventual rule keeps counting it until they expire (the newest few).
                let last = p.actor_heard_us.unwrap_or(now_us);
                p.retired.push((known.clone(), last));
                if p.retired.len() > MAX_RETIRED {
                    p.retired.remove(0);
                }
                p.actor = Some(actor);
                p.new_incarnation_us = Some(now_us);
                p.sent_version = 0;
                p.sent_ack = Ack::default();
                peers_changed = true;
            }
            None => {
                p.actor = Some(actor);
                p.new_incarnation_us = Some(now_us);
                peers_changed = true;
            }
        }
        p.status = PeerStatus::Ok;
        let first = !p.conn.accepted;
        p.conn.accepted = true;
        if peers_changed {
            self.node.set_peers(super::eventual_peers(&self.peers));
        }
        if first {
            if let Some(p) = self.peer_mut(from) {
                p.attempts = 0;
            }
            self.send_full_state(now_us, from);
            let announce = self.bounded.announce();
            self.send(from, super::Message::Announce(announce), now_us);
            self.send_quotas(from, now_us);
        } else if self
            .peer_mut(from)
            .is_some_and(|p| now_us >= p.hello_answered_us.saturating_add(interval_us))
        {
            // It resends its Hello: it has not heard from us since; prove we accepted it,
            // at most once per interval however often it repeats itself.
            if let Some(p) = self.peer_mut(from) {
                p.hello_answered_us = now_us;
            }
            self.send(from, super::Message::KeepAlive, now_us);
        }
    }
}
