//! The usage stream: deltas since what each peer confirmed, full states, and anti-entropy
//! digests (see the parent module's "Handshake and anti-entropy").
//!
//! Separate because it is the eventual mode's replication, with its own resend and
//! repair rules, independent of how links come and go.

use super::{Gossip, Message, PeerId};
use crate::crdt::{Actor, ActorIdx};

impl Gossip {
    pub(super) fn send_full_state(&mut self, now_us: u64, to: PeerId) {
        let Some(actor) = self.peer_mut(to).and_then(|p| p.actor.clone()) else {
            return;
        };
        let ack = self.node.ack_for(&actor);
        let table = self.node.table();
        // Only its own counts are left out: a full state repairs what direct links missed.
        let own: Vec<ActorIdx> = table.actors().get(&actor).into_iter().collect();
        let chunks = table.deltas_for_peer(0, self.config.max_entries_per_frame, now_us, &own);
        let version = self.node.table().version();
        for delta in chunks {
            self.send(to, Message::FullState { delta, ack }, now_us);
        }
        self.node.note_sent(&actor, version);
        if let Some(p) = self.peer_mut(to) {
            p.sent_version = version;
            p.sent_ack = ack;
            p.last_full_state_us = Some(now_us);
        }
    }

    pub(super) fn on_digest(
        &mut self,
        now_us: u64,
        from: PeerId,
        actor: &Actor,
        digest: u64,
        version: u64,
    ) {
        let every = self.config.anti_entropy_every_us;
        // Only a difference that deltas cannot explain is repaired: we have merged everything
        // the peer had when it computed its digest, and it has confirmed everything we have.
        // While changes are in flight the digests differ anyway, and deltas (resent until
        // confirmed) repair loss on their own; a full state then would only cost bandwidth.
        let caught_up = self.node.acks().heard_from(actor) >= version
            && self.node.acks().confirmed_by(actor) >= self.node.table().version();
        let recent = self
            .peer_mut(from)
            .and_then(|p| p.last_full_state_us)
            .is_some_and(|t| now_us.saturating_sub(t) < every / 2);
        if caught_up && !recent && digest != self.node.table().digest(now_us) {
            self.stats.anti_entropy_repairs += 1;
            self.send_full_state(now_us, from);
        }
    }

    /// Sends every ready peer what changed since it last confirmed (see the module docs).
    pub(super) fn flush(&mut self, now_us: u64) {
        let interval = self.config.interval_us.max(1);
        self.next_flush_us = now_us.saturating_add(interval);
        self.own_pending = 0;
        let version = self.node.table().version();
        let resend_after = interval.saturating_mul(2);
        let ready = self.ready_peers();
        let links = ready
            .iter()
            .filter(|p| p.0 < 64)
            .fold(0u64, |bits, p| bits | (1 << p.0));
        for &peer in &ready {
            if self
                .peer_mut(peer)
                .is_some_and(|p| p.conn.links_told != Some(links))
            {
                self.send(peer, Message::Links(links), now_us);
                if let Some(p) = self.peer_mut(peer) {
                    p.conn.links_told = Some(links);
                }
            }
        }
        for peer in ready {
            let Some(p) = self.peer_mut(peer) else {
                continue;
            };
            let Some(actor) = p.actor.clone() else {
                continue;
            };
            let (sent_version, sent_ack) = (p.sent_version, p.sent_ack);
            let confirmed = self.node.acks().confirmed_by(&actor);
            let Some(p) = self.peer_mut(peer) else {
                continue;
            };
            // Progress in what the peer confirms restarts the resend clock.
            if confirmed != p.confirmed_seen {
                p.confirmed_seen = confirmed;
                p.confirmed_at_us = now_us;
            }
            let stalled = confirmed < sent_version
                && now_us >= p.confirmed_at_us.saturating_add(resend_after);
            let ack = self.node.ack_for(&actor);
            let fresh = version > sent_version;
            if fresh || stalled {
                // Normally only what is new since the last delta: the stream is reliable, so
                // what was sent arrives unless the driver dropped it (a full queue). Then the
                // peer's acks stop advancing (a delta starting past what it has is merged
                // but not acknowledged), and after two intervals we resend everything it has
                // not confirmed.
                let since = if stalled { confirmed } else { sent_version };
                let skip = self.skip_for(peer);
                for delta in self.node.table().deltas_for_peer(
                    since,
                    self.config.max_entries_per_frame,
                    now_us,
                    &skip,
                ) {
                    self.send(peer, Message::Delta { delta, ack }, now_us);
                }
                // Its acks may claim up to here, no further.
                self.node.note_sent(&actor, version);
                if let Some(p) = self.peer_mut(peer) {
                    p.sent_version = version;
                    p.sent_ack = ack;
                    if stalled {
                        p.confirmed_at_us = now_us;
                    }
                }
            } else if ack.heard_from_you != sent_ack.heard_from_you {
                self.send(peer, Message::Ack(ack), now_us);
                if let Some(p) = self.peer_mut(peer) {
                    p.sent_ack = ack;
                }
            }
        }
        self.node.mark_sent();
    }

    /// The actors whose cells deltas to `to` leave out: its own, and the current actor of
    /// every slot it says it hears directly (never ours: we are its direct source of ours).
    fn skip_for(&self, to: PeerId) -> Vec<ActorIdx> {
        let table = self.node.table();
        let Some(recipient) = self.peers.get(usize::from(to.0)).and_then(Option::as_ref) else {
            return Vec::new();
        };
        let mut skip: Vec<ActorIdx> = recipient
            .actor
            .as_ref()
            .and_then(|a| table.actors().get(a))
            .into_iter()
            .collect();
        for (i, p) in self.peers.iter().enumerate() {
            let Some(p) = p else { continue };
            let heard_directly = i < 64 && recipient.conn.their_links & (1 << i) != 0;
            if heard_directly
                && i != usize::from(to.0)
                && let Some(idx) = p.actor.as_ref().and_then(|a| table.actors().get(a))
            {
                skip.push(idx);
            }
        }
        skip
    }
}
