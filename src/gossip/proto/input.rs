//! Input: what each message from an authenticated peer does to the machine.
//!
//! Separate because it is the surface a hostile peer reaches: every check that drops or
//! counts peer input before it is merged is here (the `Hello` ones are in `hello.rs`).

use super::{Gossip, LinkState, Message, PeerId};
use crate::crdt::bounded::TransferOutcome;
use crate::crdt::usage::MergeReport;

impl Gossip {
    /// Handles a message received from `from` (authenticated by the transport).
    pub fn handle(&mut self, now_us: u64, from: PeerId, msg: Message) {
        let Some(p) = self.peer_mut(from) else {
            self.stats.unknown_peer += 1;
            return;
        };
        if !matches!(p.link, LinkState::Up { .. }) {
            // In flight when the connection closed: the next handshake resynchronises.
            self.stats.no_connection += 1;
            return;
        }
        p.last_heard_us = Some(now_us);
        if let Message::Hello {
            actor,
            config_digest,
        } = msg
        {
            self.on_hello(now_us, from, actor, config_digest);
            return;
        }
        if !p.conn.accepted {
            self.stats.before_hello += 1;
            return;
        }
        p.conn.hello_acked = true;
        p.actor_heard_us = Some(now_us);
        let Some(actor) = p.actor.clone() else {
            // Accepted implies a known actor; treat the impossible as input to drop.
            self.stats.before_hello += 1;
            return;
        };
        match msg {
            Message::Hello { .. } | Message::KeepAlive => {}
            Message::Delta { delta, ack } | Message::FullState { delta, ack } => {
                // A delta from version 0 (a full state, or a resend from scratch) ends, with
                // its last chunk, the peer's whole state: the stream is ordered.
                let whole =
                    delta.from_version == 0 && delta.chunk.saturating_add(1) == delta.chunks;
                let report = self.node.on_delta(&actor, &delta, now_us);
                self.count_merge(report);
                self.node.on_ack(&actor, ack);
                if let Some(p) = self.peer_mut(from) {
                    p.last_delta_rx_us = Some(now_us);
                    p.learned |= whole;
                }
            }
            Message::Ack(ack) => self.node.on_ack(&actor, ack),
            Message::Links(bits) => {
                if let Some(p) = self.peer_mut(from) {
                    p.conn.their_links = bits;
                }
            }
            Message::Digest { digest, version } => {
                self.on_digest(now_us, from, &actor, digest, version)
            }
            Message::Announce(a) => {
                if (a.slot, a.incarnation) != (from.0, actor.incarnation) {
                    self.stats.misattributed += 1;
                    return;
                }
                let max = self.config.max_entries_per_frame;
                for h in self.bounded.on_announce(&a, now_us, max) {
                    self.send(from, Message::Handover(h), now_us);
                }
                self.send_strict_outgoing(now_us);
            }
            Message::Ask(ask) => {
                if (ask.slot, ask.incarnation) != (from.0, actor.incarnation) {
                    self.stats.misattributed += 1;
                    return;
                }
                if let Some(t) = self.bounded.on_ask(&ask, now_us) {
                    self.send(from, Message::Transfer(t), now_us);
                }
                self.send_strict_outgoing(now_us);
            }
            Message::Transfer(t) => {
                if (t.from, t.from_incarnation) != (from.0, actor.incarnation) {
                    self.stats.misattributed += 1;
                    return;
                }
                // A clipped transfer was merged (up to the bound); its excess is counted per
                // author in the bounded table, not here.
                if !matches!(
                    self.bounded.on_transfer(&t, now_us),
                    TransferOutcome::Accepted | TransferOutcome::Clipped
                ) {
                    self.stats.transfers_refused += 1;
                }
                self.send_strict_outgoing(now_us);
            }
            Message::Handover(h) => {
                if (h.from, h.from_incarnation) != (from.0, actor.incarnation) {
                    self.stats.misattributed += 1;
                    return;
                }
                self.bounded.on_handover(&h, now_us);
                self.send_strict_outgoing(now_us);
            }
            Message::Settled(s) => {
                if (s.from, s.from_incarnation) != (from.0, actor.incarnation) {
                    self.stats.misattributed += 1;
                    return;
                }
                self.bounded.on_settled(&s, now_us);
                self.send_strict_outgoing(now_us);
            }
            Message::Quotas(quotas) => self.on_quotas(now_us, from, quotas),
        }
    }

    fn count_merge(&mut self, r: MergeReport) {
        self.stats.merge_refusals = self.stats.merge_refusals.saturating_add(r.refusals());
        self.stats.merge_clamped = self.stats.merge_clamped.saturating_add(r.clamped);
        self.stats.merge_stale = self.stats.merge_stale.saturating_add(r.stale);
    }
}
