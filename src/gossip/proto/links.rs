//! Connection lifecycle: whom to dial and when, backoff, idle peers, keep-alives and
//! handshake resends.
//!
//! Separate because it is the only part of the machine that changes [`LinkState`]; the
//! rest asks [`Gossip::ready_peers`] and sends.

use super::{ConnectionState, Gossip, LinkState, Message, PeerId};

impl Gossip {
    /// Draws a reconnect delay for the `attempts`-th failure: capped exponential with equal
    /// jitter (uniform in `[d/2, d]`).
    fn backoff(&mut self, attempts: u32) -> u64 {
        let base = self.config.backoff_base_us.max(1);
        let d = base
            .checked_shl(attempts.min(63))
            .filter(|d| d >> attempts.min(63) == base)
            .unwrap_or(u64::MAX)
            .min(self.config.backoff_cap_us.max(base));
        d / 2 + self.rng.up_to(d - d / 2)
    }

    /// The next peer to dial now, if any (the driver then reports [`Gossip::on_connected`] or
    /// [`Gossip::on_disconnected`]).
    pub fn poll_connect(&mut self, now_us: u64) -> Option<PeerId> {
        for (i, slot) in self.peers.iter_mut().enumerate() {
            let Some(p) = slot else { continue };
            if let LinkState::Down {
                retry_at_us: Some(at),
            } = p.link
                && at <= now_us
            {
                p.link = LinkState::Dialing { since_us: now_us };
                return u16::try_from(i).ok().map(PeerId);
            }
        }
        None
    }

    /// A connection the machine gave up on (idle), for the driver to close.
    pub fn poll_close(&mut self) -> Option<PeerId> {
        self.close.pop_front()
    }

    /// A connection with `peer` is up (dialled by us or accepted). Starts the handshake.
    pub fn on_connected(&mut self, peer: PeerId, now_us: u64) {
        let hello = self.hello();
        let Some(p) = self.peer_mut(peer) else {
            self.stats.unknown_peer += 1;
            return;
        };
        p.link = LinkState::Up { since_us: now_us };
        p.conn = ConnectionState::new(now_us);
        p.last_heard_us = Some(now_us);
        self.send(peer, hello, now_us);
    }

    /// The connection with `peer` is gone (or a dial failed): back off before redialling.
    pub fn on_disconnected(&mut self, peer: PeerId, now_us: u64) {
        let Some(p) = self.peer_mut(peer) else {
            self.stats.unknown_peer += 1;
            return;
        };
        if matches!(p.link, LinkState::Down { .. }) {
            return;
        }
        let attempts = p.attempts;
        let dialer = p.dialer;
        let delay = if dialer { self.backoff(attempts) } else { 0 };
        if let Some(p) = self.peer_mut(peer) {
            p.attempts = p.attempts.saturating_add(1);
            p.conn = ConnectionState::default();
            p.link = LinkState::Down {
                retry_at_us: dialer.then_some(now_us.saturating_add(delay)),
            };
        }
    }

    pub(super) fn check_links(&mut self, now_us: u64) {
        let cfg = self.config;
        let hello = self.hello();
        for i in 0..self.peers.len() {
            let Ok(id) = u16::try_from(i).map(PeerId) else {
                continue;
            };
            let Some(p) = self.peers[i].as_ref() else {
                continue;
            };
            match p.link {
                LinkState::Dialing { since_us }
                    if now_us >= since_us.saturating_add(cfg.idle_timeout_us) =>
                {
                    self.on_disconnected(id, now_us);
                }
                LinkState::Up { .. } => {
                    let heard = p.last_heard_us.unwrap_or(0);
                    if now_us >= heard.saturating_add(cfg.idle_timeout_us) {
                        self.on_disconnected(id, now_us);
                        self.close.push_back(id);
                    } else if !p.conn.hello_acked
                        && now_us >= p.conn.hello_sent_us.saturating_add(p.hello_every(&cfg))
                    {
                        if let Some(p) = self.peer_mut(id) {
                            p.conn.hello_sent_us = now_us;
                        }
                        self.send(id, hello.clone(), now_us);
                    } else if now_us >= p.last_sent_us.saturating_add(cfg.keepalive_us) {
                        self.send(id, Message::KeepAlive, now_us);
                    }
                }
                _ => {}
            }
        }
    }
}
