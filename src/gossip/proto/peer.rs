//! What the machine knows of one peer, and what it knows of the peer's current connection.
//!
//! Separate because the connection-scoped state is a value of its own
//! ([`ConnectionState`]): a new or lost connection replaces it whole, so no field of a
//! previous connection can survive by being forgotten in a reset.

use super::{GossipConfig, LinkState, PeerStatus};
use crate::crdt::{Ack, Actor, Slot};

/// Per-peer state.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pub(super) slot: Slot,
    /// Whether we dial it (our slot index is the smaller).
    pub(super) dialer: bool,
    pub(super) link: LinkState,
    pub(super) attempts: u32,
    /// What belongs to the current connection only (replaced on connect and disconnect).
    pub(super) conn: ConnectionState,
    pub(super) last_heard_us: Option<u64>,
    pub(super) last_sent_us: u64,
    /// Its current actor, from its accepted `Hello`.
    pub(super) actor: Option<Actor>,
    /// We merged a complete full state from it (once is enough: deltas follow).
    pub(super) learned: bool,
    /// When we last accepted a message from `actor` (what a retired incarnation is timed by).
    pub(super) actor_heard_us: Option<u64>,
    /// Older incarnations still counted by the eventual rule, with when last heard (at most
    /// [`super::MAX_RETIRED`]).
    pub(super) retired: Vec<(Actor, u64)>,
    /// When we last accepted a new incarnation of it (restarts are rate-limited).
    pub(super) new_incarnation_us: Option<u64>,
    /// When we last answered a repeated `Hello` (answers are rate-limited).
    pub(super) hello_answered_us: u64,
    pub(super) status: PeerStatus,
    /// Our table version when we last sent it a delta or full state.
    pub(super) sent_version: u64,
    /// The version it confirmed when we last looked, and since when.
    pub(super) confirmed_seen: u64,
    pub(super) confirmed_at_us: u64,
    /// The ack we last sent it.
    pub(super) sent_ack: Ack,
    pub(super) last_full_state_us: Option<u64>,
    pub(super) last_delta_rx_us: Option<u64>,
}

/// What is true of one connection with a peer and of no other: the handshake's progress and
/// the links it told us about. A new connection starts from [`ConnectionState::new`]; a lost
/// one leaves [`ConnectionState::default`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ConnectionState {
    /// We accepted its `Hello` on this connection.
    pub(super) accepted: bool,
    /// It accepted ours (we received something other than `Hello`).
    pub(super) hello_acked: bool,
    /// The slots it told us it hears directly ([`super::Message::Links`]).
    pub(super) their_links: u64,
    /// What we last told it of ours.
    pub(super) links_told: Option<u64>,
    /// When we last sent our `Hello` on this connection.
    pub(super) hello_sent_us: u64,
}

impl ConnectionState {
    /// A connection that came up at `now_us`, our `Hello` about to be sent on it.
    pub(super) fn new(now_us: u64) -> Self {
        Self {
            hello_sent_us: now_us,
            ..Self::default()
        }
    }
}

impl Peer {
    /// A configured peer we have not heard from, as of `now_us`; `dialer`: we dial it.
    pub(super) fn new(slot: Slot, dialer: bool, now_us: u64) -> Self {
        Self {
            slot,
            dialer,
            link: LinkState::Down {
                retry_at_us: dialer.then_some(now_us),
            },
            attempts: 0,
            conn: ConnectionState::default(),
            last_heard_us: None,
            last_sent_us: now_us,
            actor: None,
            learned: false,
            actor_heard_us: None,
            retired: Vec::new(),
            new_incarnation_us: None,
            hello_answered_us: 0,
            status: PeerStatus::Unknown,
            sent_version: 0,
            confirmed_seen: 0,
            confirmed_at_us: now_us,
            sent_ack: Ack::default(),
            last_full_state_us: None,
            last_delta_rx_us: None,
        }
    }

    pub(super) fn ready(&self) -> bool {
        matches!(self.link, LinkState::Up { .. }) && self.conn.accepted
    }

    /// How often our `Hello` is repeated until the peer accepts it: every interval while the
    /// handshake may just have lost a message, every keep-alive period once the peer refused
    /// ours or we refused its (a mismatched configuration changes only with a restart).
    pub(super) fn hello_every(&self, config: &GossipConfig) -> u64 {
        match self.status {
            PeerStatus::Unknown | PeerStatus::Ok => config.interval_us,
            PeerStatus::ConfigMismatch { .. } | PeerStatus::BadHello => config.keepalive_us,
        }
    }
}

/// The eventual rule's peer set: every configured peer's current actor (a placeholder of
/// incarnation 0, "unknown", before its `Hello`: it is silent, not absent), plus retired
/// incarnations whose admissions may still be live.
pub(super) fn eventual_peers(peers: &[Option<Peer>]) -> Vec<Actor> {
    let mut out = Vec::new();
    for p in peers.iter().flatten() {
        out.push(p.actor.clone().unwrap_or_else(|| p.slot.actor(0)));
        out.extend(p.retired.iter().map(|(a, _)| a.clone()));
    }
    out
}
