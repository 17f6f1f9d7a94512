//! Output and timers: what the driver drains after every call, when it must call again, and
//! the periodic work (deltas, digests, announces, GC) done then.
//!
//! Separate because it is the machine's whole contract with a driver's event loop: a
//! driver needs to read only this file and `links.rs` to run the machine.

use super::{Gossip, LinkState, Message, PeerId, SETTLE_KEYS_PER_GC, eventual_peers};

impl Gossip {
    /// The next message to send, if any. Drain until `None` after every call.
    pub fn poll_transmit(&mut self, now_us: u64) -> Option<(PeerId, Message)> {
        if self.out.is_empty() && self.own_pending >= self.config.max_entries_per_frame.max(1) {
            self.flush(now_us);
        }
        self.out.pop_front()
    }

    /// Whether [`Gossip::poll_transmit`] or [`Gossip::poll_close`] has something now, without
    /// taking it: a driver that is asleep until [`Gossip::poll_timeout`] need not wake for
    /// a change unless this or an earlier timeout says so.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
            || !self.close.is_empty()
            || self.own_pending >= self.config.max_entries_per_frame.max(1)
    }

    /// The next instant at which [`Gossip::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t = self
            .next_flush_us
            .min(self.next_anti_entropy_us)
            .min(self.next_gc_us);
        if !self.bounded.is_reclaimed() && !self.bounded.is_superseded() {
            t = t.min(self.next_announce_us);
        }
        if self.own_pending >= self.config.max_entries_per_frame.max(1) {
            // Due now: the last flush already happened, so any past instant will do.
            t = t.min(self.next_flush_us.saturating_sub(self.config.interval_us));
        }
        for p in self.peers.iter().flatten() {
            let due = match p.link {
                LinkState::Down { retry_at_us } => retry_at_us,
                LinkState::Dialing { since_us } => {
                    Some(since_us.saturating_add(self.config.idle_timeout_us))
                }
                LinkState::Up { .. } => {
                    let idle = p
                        .last_heard_us
                        .unwrap_or(0)
                        .saturating_add(self.config.idle_timeout_us);
                    let keep = p.last_sent_us.saturating_add(self.config.keepalive_us);
                    let hello = if p.conn.hello_acked {
                        u64::MAX
                    } else {
                        p.conn
                            .hello_sent_us
                            .saturating_add(p.hello_every(&self.config))
                    };
                    Some(idle.min(keep).min(hello))
                }
            };
            if let Some(d) = due {
                t = t.min(d);
            }
        }
        Some(t)
    }

    /// Does whatever is due at `now_us`: links (idle, keep-alive, handshake resends, dial
    /// timeouts), deltas, anti-entropy digests, announces and GC.
    pub fn handle_timeout(&mut self, now_us: u64) {
        self.check_links(now_us);
        if now_us >= self.next_flush_us
            || self.own_pending >= self.config.max_entries_per_frame.max(1)
        {
            self.flush(now_us);
        }
        if now_us >= self.next_anti_entropy_us {
            self.next_anti_entropy_us =
                now_us.saturating_add(self.config.anti_entropy_every_us.max(1));
            let msg = Message::Digest {
                digest: self.node.table().digest(now_us),
                version: self.node.table().version(),
            };
            for peer in self.ready_peers() {
                self.send(peer, msg.clone(), now_us);
            }
        }
        if now_us >= self.next_announce_us {
            self.next_announce_us = now_us.saturating_add(self.config.announce_every_us.max(1));
            self.bounded.tick(now_us);
            if !self.bounded.is_reclaimed() && !self.bounded.is_superseded() {
                let a = self.bounded.announce();
                for peer in self.ready_peers() {
                    self.send(peer, Message::Announce(a), now_us);
                }
            }
        }
        if now_us >= self.next_gc_us {
            self.next_gc_us = now_us.saturating_add(self.config.gc_every_us.max(1));
            self.gc(now_us);
        }
    }

    /// Drops expired usage, rights, asks and retired incarnations (run by
    /// [`Gossip::handle_timeout`] every `gc_every_us`; callable directly).
    pub fn gc(&mut self, now_us: u64) {
        self.node.gc(now_us);
        self.apply_quotas(now_us);
        // Idle strict keys settle with their peers and are then forgotten.
        self.bounded.settle(now_us, SETTLE_KEYS_PER_GC);
        self.send_strict_outgoing(now_us);
        self.bounded.gc(now_us);
        let interval = self.config.interval_us;
        self.asks
            .retain(|_, at| now_us < at.saturating_add(interval));
        let retain = self.retain_us;
        let mut changed = false;
        for p in self.peers.iter_mut().flatten() {
            let before = p.retired.len();
            p.retired
                .retain(|(_, last)| now_us < last.saturating_add(retain));
            changed |= p.retired.len() != before;
        }
        if changed {
            self.node.set_peers(eventual_peers(&self.peers));
        }
    }
}
