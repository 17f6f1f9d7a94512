//! The gossip protocol as a pure state machine, in the style of `quinn-proto`.
//!
//! # Why a state machine
//!
//! Everything that decides *what* to say to whom and *when* lives here, and nothing here does
//! IO, reads a clock or draws entropy: time is the `now_us` every method takes, and the only
//! randomness (reconnect jitter) comes from a [`SplitMix64`] seeded by the caller. The QUIC
//! driver (`driver.rs`, over the transport in `quic.rs`) and the deterministic simulator run
//! the very same code, so a schedule the simulator finds can be replayed exactly, and the
//! properties tested below (convergence, loss repair, partition healing, the global limits)
//! hold for the production driver too.
//!
//! # Driving it
//!
//! One [`Gossip`] per local actor. The driver:
//!
//! - feeds decoded messages to [`Gossip::handle`] and connection events to
//!   [`Gossip::on_connected`] / [`Gossip::on_disconnected`];
//! - after every call, drains [`Gossip::poll_transmit`] (messages to frame with
//!   [`super::codec::encode`] and send), [`Gossip::poll_connect`] (peers to dial) and
//!   [`Gossip::poll_close`] (connections the machine gave up on: idle);
//! - sleeps until [`Gossip::poll_timeout`] and then calls [`Gossip::handle_timeout`].
//!
//! # Connections
//!
//! Peers are the configured slots ([`PeerId`] is a slot's index in the configured list, which
//! every region shares, so it needs no negotiation). In each pair the slot with the smaller
//! index dials, so a pair has one connection; the other side waits to be dialled. Failed dials
//! and lost connections back off exponentially up to a cap, with "equal jitter" drawn from the
//! seeded RNG (half the delay fixed, half random), so that regions that lost each other at
//! the same instant do not redial in lockstep. A peer silent for `idle_timeout_us` is dropped
//! (and reported through [`Gossip::poll_close`]); `KeepAlive` keeps quiet links alive.
//!
//! # Handshake and anti-entropy
//!
//! Both ends send `Hello` on connect, and resend it every interval until the peer shows it
//! accepted ours (any other message from it). A `Hello` naming another slot than the one the
//! driver authenticated, an older incarnation than one already seen, or a different
//! configuration digest is refused and reported ([`Gossip::peer_status`]); nothing else from
//! that peer is merged, so for the eventual rule it stays *silent* (it keeps its `1/N` share,
//! and our admissions stay unsettled). On accepting a `Hello` we send our whole usage state in
//! chunks (`FullState`) and our strict-mode `Announce`.
//!
//! Then every `interval_us` (or sooner once `max_entries_per_frame` own changes wait) each
//! peer gets the usage cells changed since the version it last confirmed, in chunks, each with
//! our [`Ack`] of its state. Because a delta starts at what the peer *confirmed*, a lost delta
//! is simply included again: deltas are resent after two intervals without confirmation.
//! Every `anti_entropy_every_us` we send a `Digest`; a peer whose digest differs from ours
//! although we have merged everything it had when it sent the digest, and it has confirmed
//! everything we have, gets our full state (a divergence the deltas cannot explain).
//! Merges are idempotent, commutative and associative, so duplicates and reordering are
//! harmless.
//!
//! # Strict mode
//!
//! The bounded counter ([`BoundedTable`]) decides; this layer only carries its messages: an
//! `Announce` on connect and periodically until our slot has reclaimed its share (answered by
//! `Handover`s), an `Ask` to every ready peer when a request finds too few rights (at most one
//! per key and interval), and the `Transfer` a giver returns. A lost transfer is repaired by
//! the next one, which carries the giver's cumulative column.
//!
//! # Peer input
//!
//! Nothing a peer sends can panic this machine or make it allocate without bound: unknown
//! peer ids, messages before the handshake, misattributed strict messages and absurd values
//! are dropped and counted in [`GossipStats`]; the CRDT layer bounds what merges can store.

// The pure core is read as a library: every public item says what it is for.
#![warn(missing_docs)]

//!
//! # Where things are
//!
//! This file holds the machine's state and the helpers every part uses; each concern has
//! its own child module: [`message`] (the wire vocabulary), [`config`] (what the machine is
//! built from), `peer` (per-peer state, with the connection's as a value of its own),
//! `links` (connection lifecycle), `hello` (the handshake), `identity` (a second process
//! with our identity), `input` (what each message does), `sync` (deltas, full states,
//! anti-entropy), `admit` (the limiter-facing API), `timers` (output and periodic work),
//! `retire` (graceful shutdown), [`report`] (stats and inspection views) and [`rng`].

mod admit;
pub mod config;
mod hello;
mod identity;
mod input;
mod links;
pub mod message;
pub mod net;
mod peer;
mod reload;
pub mod report;
mod retire;
pub mod rng;
mod sync;
#[cfg(test)]
mod tests;
mod timers;

pub use admit::{GlobalCheck, GlobalOutcome};
pub use config::{GossipConfig, GossipError, Policies};
pub use hello::{HelloRefusal, MAX_INCARNATION_SKEW_US, MAX_RETIRED, MIN_RESTART_INTERVAL_US};
pub use identity::OwnIdentity;
pub use message::{Message, PeerId};
pub use report::{
    EventualInspection, GossipStats, Inspection, LinkState, PeerInspection, PeerReport, PeerStatus,
    StrictInspection,
};
pub use rng::SplitMix64;

use std::collections::{BTreeMap, VecDeque};

use crate::crdt::bounded::StrictPolicy;
use crate::crdt::{Actor, BoundedTable, EventualNode, PolicyId, Slot};
use peer::{ConnectionState, Peer, eventual_peers};

/// Longest a new incarnation waits for its peers' full states before deciding eventual
/// policies without them (a handshake and a full state take a round trip or two; a peer that
/// is not there by then is treated as cut off).
const LEARN_TIMEOUT_US: u64 = 1_000_000;

/// Strict keys one GC run looks at for settling (the next run resumes after them).
const SETTLE_KEYS_PER_GC: usize = 16_384;

/// Most strict-mode keys with an outstanding `Ask` remembered (asks past it are not sent).
const MAX_PENDING_ASKS: usize = 100_000;

/// One local actor's gossip state machine (see the module docs).
#[derive(Debug)]
pub struct Gossip {
    me: Actor,
    my_slot: u16,
    config: GossipConfig,
    config_digest: u64,
    node: EventualNode,
    bounded: BoundedTable,
    strict: BTreeMap<PolicyId, StrictPolicy>,
    /// How long a retired incarnation stays in the eventual peer set after last heard.
    retain_us: u64,
    peers: Vec<Option<Peer>>,
    rng: SplitMix64,
    out: VecDeque<(PeerId, Message)>,
    close: VecDeque<PeerId>,
    /// Own changes since the last flush (early flush past `max_entries_per_frame`).
    own_pending: usize,
    next_flush_us: u64,
    next_anti_entropy_us: u64,
    next_announce_us: u64,
    next_gc_us: u64,
    /// Last `Ask` per strict key.
    asks: BTreeMap<(PolicyId, Box<str>), u64>,
    /// Until then, eventual admissions wait for the peers' full states (see
    /// [`Gossip::is_learning`]).
    learn_until_us: u64,
    stats: GossipStats,
    /// A newer incarnation of our own gateway, authenticated as ours: we stood down (see
    /// [`Gossip::on_own_identity`]).
    identity_conflict: Option<u64>,
    /// Configured quotas, ours and our peers' (see [`reload`]).
    quotas: reload::Quotas,
}

impl Gossip {
    /// A machine for `me`, one of `slots` (the configured list, in the shared order), started
    /// at `now_us`. `config_digest` must agree with every peer's; `seed` drives the jitter.
    pub fn new(
        me: Actor,
        slots: Vec<Slot>,
        config: GossipConfig,
        policies: Policies,
        config_digest: u64,
        seed: u64,
        now_us: u64,
    ) -> Result<Self, GossipError> {
        let quotas = reload::Quotas::new(
            (policies.strict.iter().map(|(id, p)| (*id, p.quota)))
                .chain(policies.eventual.iter().map(|(id, p)| (*id, p.quota))),
        );
        let bounded = BoundedTable::new(slots.clone(), &me, policies.strict.clone(), now_us)?;
        let my_slot = bounded.my_slot();
        let mut node = EventualNode::new(me.clone(), slots.clone(), policies.eventual.clone())?;
        let retain_us = policies
            .eventual
            .iter()
            .map(|(_, p)| p.spec.window_us().saturating_add(p.spec.sub_len_us()))
            .max()
            .unwrap_or(0);
        let peers: Vec<Option<Peer>> = slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                (i != usize::from(my_slot))
                    .then(|| Peer::new(slot.clone(), i > usize::from(my_slot), now_us))
            })
            .collect();
        node.set_peers(eventual_peers(&peers));
        let interval = config.interval_us.max(1);
        Ok(Self {
            me,
            my_slot,
            config,
            config_digest,
            node,
            bounded,
            strict: policies.strict.into_iter().collect(),
            retain_us,
            peers,
            rng: SplitMix64::new(seed),
            out: VecDeque::new(),
            close: VecDeque::new(),
            own_pending: 0,
            next_flush_us: now_us.saturating_add(interval),
            next_anti_entropy_us: now_us.saturating_add(config.anti_entropy_every_us.max(1)),
            next_announce_us: now_us,
            next_gc_us: now_us.saturating_add(config.gc_every_us.max(1)),
            asks: BTreeMap::new(),
            learn_until_us: now_us.saturating_add(LEARN_TIMEOUT_US.min(config.idle_timeout_us)),
            stats: GossipStats::default(),
            identity_conflict: None,
            quotas,
        })
    }

    /// Our actor.
    pub fn actor(&self) -> &Actor {
        &self.me
    }

    /// Our peer id (our slot's index).
    pub fn id(&self) -> PeerId {
        PeerId(self.my_slot)
    }

    /// The eventual-mode state (usage table, acks).
    pub fn eventual(&self) -> &EventualNode {
        &self.node
    }

    /// The strict-mode state (rights).
    pub fn strict(&self) -> &BoundedTable {
        &self.bounded
    }

    /// Counters of dropped input and traffic.
    pub fn stats(&self) -> GossipStats {
        self.stats
    }

    /// The merged live eventual-mode count of `(policy, key)`.
    pub fn count(&self, policy: PolicyId, key: &str, now_us: u64) -> u64 {
        self.node.table().count(policy, key, now_us)
    }

    /// Eventual-mode `(policy, key)` pairs held (`tollgate_global_keys{mode="eventual"}`).
    pub fn eventual_key_count(&self) -> usize {
        self.node.key_count()
    }

    fn peer_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        self.peers.get_mut(usize::from(id.0))?.as_mut()
    }

    /// Queues `msg` for `to` if a connection is up (without one there is nothing to send on:
    /// the handshake on the next connection resynchronises).
    fn send(&mut self, to: PeerId, msg: Message, now_us: u64) {
        if let Some(p) = self.peer_mut(to)
            && matches!(p.link, LinkState::Up { .. })
        {
            p.last_sent_us = now_us;
            self.out.push_back((to, msg));
            self.stats.sent += 1;
        }
    }

    fn hello(&self) -> Message {
        Message::Hello {
            actor: self.me.clone(),
            config_digest: self.config_digest,
        }
    }

    /// Peers that completed the handshake, in order.
    fn ready_peers(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.as_ref().is_some_and(Peer::ready))
            .filter_map(|(i, _)| u16::try_from(i).ok().map(PeerId))
            .collect()
    }
}
