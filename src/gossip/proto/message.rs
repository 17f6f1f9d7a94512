//! The protocol's vocabulary: peer ids and every message, as framed by [`super::super::codec`].
//!
//! Separate because the codec, the fuzz targets and the hostile-peer tests need the wire
//! types without the machine that acts on them.

use serde::{Deserialize, Serialize};

use crate::crdt::bounded::Settled;
use crate::crdt::{Ack, Actor, Announce, Ask, Delta, Handover, PolicyId, Transfer};

/// A peer: the index of its slot in the configured slot list (the same list, in the same
/// order, in every region, so the index means the same everywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerId(pub u16);

/// Every message of the gossip protocol. Framed by [`super::codec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message on a connection, both ways: who we are and which configuration we run.
    Hello {
        /// The sender's actor (its slot must be the one the transport authenticated).
        actor: Actor,
        /// A digest of the configuration that must agree between regions (policies, slots).
        config_digest: u64,
    },
    /// Usage cells changed since the version the receiver last confirmed (one chunk).
    Delta {
        /// The chunk; its version range is what the receiver's acks may claim.
        delta: Delta,
        /// What the sender has merged of the receiver's state, as of the sender's version.
        ack: Ack,
    },
    /// One chunk of the sender's whole usage state (a delta from version 0): sent on connect
    /// and when digests disagree.
    FullState {
        /// The chunk.
        delta: Delta,
        /// As in [`Message::Delta`].
        ack: Ack,
    },
    /// An acknowledgement on its own, when there are no changes to carry it.
    Ack(Ack),
    /// Strict mode: "I am this incarnation of my slot" (asks for handovers until reclaimed).
    Announce(Announce),
    /// Strict mode: a request for rights on one key.
    Ask(Ask),
    /// Strict mode: rights given (the giver's cumulative column).
    Transfer(Transfer),
    /// Strict mode: one chunk of what the sender knows of its exchanges with a new incarnation.
    Handover(Handover),
    /// Periodic anti-entropy: the sender's usage digest at its version.
    Digest {
        /// [`crate::crdt::UsageTable::digest`] of the sender's live state.
        digest: u64,
        /// The sender's table version when it computed the digest.
        version: u64,
    },
    /// Nothing to say, but still here (keeps the idle timer of the peer from firing).
    KeepAlive,
    /// The slots the sender has a working connection with (bit `i`: slot `i`; slots past 63
    /// are never claimed). A peer then leaves those slots' current counts out of its deltas
    /// to the sender, which hears them first-hand: in a full mesh each change travels once
    /// per peer instead of once per path.
    Links(u64),
    /// Strict mode: the sender settled its pair with the receiver on one key up to an epoch
    /// (see [`crate::crdt::bounded::Settled`]).
    Settled(Settled),
    /// The global quotas the sender is configured with (see [`super::reload`]).
    Quotas(#[serde(deserialize_with = "crate::crdt::wire::grown_vec")] Vec<(PolicyId, u64)>),
}
