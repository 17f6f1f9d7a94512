//! Graceful shutdown: handing idle strict rights to an heir and our last usage to every
//! peer before the process goes.
//!
//! Separate because it is the one path that ends the machine; the next incarnation's side
//! (retired incarnations, handovers on its `Announce`) is in `hello.rs` and the bounded
//! counter.

use super::{Gossip, Message};

impl Gossip {
    /// Graceful shutdown: hands every idle strict right to one ready peer (one of our own
    /// region's instances if any is ready, so the rights stay where the region's clients
    /// are), stops admitting, and sends every ready peer our latest usage at once, so what we
    /// admitted is not lost with us. Drain [`Gossip::poll_transmit`] afterwards.
    ///
    /// Returns whether any peer was ready to take the rights (if none, they come back to our
    /// slot's next incarnation when it reclaims).
    pub fn retire(&mut self, now_us: u64) -> bool {
        let ready = self.ready_peers();
        let heir = ready
            .iter()
            .copied()
            .find(|&p| {
                self.peers[usize::from(p.0)]
                    .as_ref()
                    .is_some_and(|peer| peer.slot.region == self.me.region)
            })
            .or_else(|| ready.first().copied());
        let transfers = match heir {
            Some(heir) => self.bounded.retire(heir.0, now_us),
            None => self.bounded.retire(self.my_slot, now_us),
        };
        if let Some(heir) = heir {
            for t in transfers {
                self.send(heir, Message::Transfer(t), now_us);
            }
        }
        // Resend now whatever a peer has not confirmed, not two intervals from now.
        for p in self.peers.iter_mut().flatten() {
            p.confirmed_at_us = 0;
        }
        self.flush(now_us);
        heir.is_some()
    }
}
