//! A second process with our own identity: what a `Hello` authenticated as our own gateway
//! (the driver's self-probe, see `driver/identity.rs`) makes of this machine.
//!
//! Separate because it is the one input that can make the machine stand down for good, and
//! it comes from our own certificate, never from a peer's word (the peer-facing handshake
//! is in `hello.rs`).

use super::{Gossip, MAX_INCARNATION_SKEW_US};

/// What a `Hello` of our own gateway, from a process presenting our certificate, told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnIdentity {
    /// Our own incarnation: we reached ourselves.
    Ourselves,
    /// An older process with our identity: it stands down when it learns of us.
    OlderProcess,
    /// A newer process with our identity: we stopped serving global policies.
    StoodDown,
    /// Malformed, or an incarnation beyond the allowed skew: ignored.
    Refused,
}

impl Gossip {
    /// A process that presented our own certificate (authenticated by the transport as our
    /// gateway, so not a peer's word) announced `incarnation`. If it is newer, that process
    /// is our slot's current incarnation and we are the stale one: we stop admitting global
    /// requests for good (both would otherwise spend the slot's share), and strict rights
    /// are left to it.
    pub fn on_own_identity(&mut self, incarnation: u64, now_us: u64) -> OwnIdentity {
        let mine = self.me.incarnation;
        if incarnation == 0 || incarnation.saturating_sub(now_us) > MAX_INCARNATION_SKEW_US {
            return OwnIdentity::Refused;
        }
        if incarnation == mine {
            return OwnIdentity::Ourselves;
        }
        if incarnation < mine {
            self.stats.duplicate_identity += 1;
            return OwnIdentity::OlderProcess;
        }
        self.stats.duplicate_identity += 1;
        self.identity_conflict = Some(self.identity_conflict.unwrap_or(0).max(incarnation));
        // The newer process holds our slot's strict share from now on: we give nothing and
        // admit nothing more (the bounded counter's zombie state).
        self.bounded.on_own_newer_incarnation(incarnation);
        OwnIdentity::StoodDown
    }

    /// The newer incarnation of our own gateway that made us stand down, if any: while set,
    /// nothing global is admitted here.
    pub fn identity_conflict(&self) -> Option<u64> {
        self.identity_conflict
    }
}
