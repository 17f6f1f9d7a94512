//! What strict-mode slots tell each other: columns and the messages that carry them.

use serde::{Deserialize, Serialize};

use crate::crdt::usage::PolicyId;

/// Rights given by one slot to another: the giver's grow-only column.
///
/// `total` is cumulative over the giver's incarnations and the receiver's. `to_inc` is the
/// receiver incarnation the giver addressed last, and `base` the `total` at the moment it
/// started addressing it, so that a receiver incarnation that has not reclaimed yet can count
/// exactly what was given to *it*: `total − base`.
///
/// `epoch` numbers the column's life between two settlements of the pair (see "Returning to
/// baseline" in the module docs): every count restarts at zero in a new epoch, and a column
/// of an older epoch than the receiver's is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Col {
    /// Cumulative rights given.
    pub total: u64,
    /// The receiver incarnation addressed by the latest gifts (0: none yet).
    pub to_inc: u64,
    /// `total` when the giver began addressing `to_inc`.
    pub base: u64,
    /// The pair's settlement epoch this column belongs to.
    pub epoch: u64,
}

impl Col {
    /// Joins `other` (of the same epoch: callers align epochs first) into `self` (maximum of
    /// `total`, lexicographic maximum of `(to_inc, base)`): a semilattice, so merges commute
    /// and repeat harmlessly. Returns whether anything rose.
    pub fn join(&mut self, other: &Col) -> bool {
        let before = *self;
        self.total = self.total.max(other.total);
        if (other.to_inc, other.base) > (self.to_inc, self.base) {
            self.to_inc = other.to_inc;
            self.base = other.base;
        }
        *self != before
    }

    /// The rights given to receiver incarnation `inc` specifically.
    pub fn addressed_to(&self, inc: u64) -> u64 {
        if self.to_inc == inc {
            self.total.saturating_sub(self.base)
        } else {
            0
        }
    }

    /// Nothing given in this epoch (the epoch itself aside).
    pub(crate) fn is_zero(&self) -> bool {
        self.total == 0 && self.to_inc == 0 && self.base == 0
    }

    /// An empty column of `epoch`.
    pub(crate) fn empty(epoch: u64) -> Col {
        Col {
            epoch,
            ..Col::default()
        }
    }
}

/// "I am incarnation `incarnation` of slot `slot`", sent on connect and periodically until
/// reclaimed. Peers learn the incarnation (and reject its predecessors from then on) and, if
/// asked, answer with a [`Handover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Index of the sender's slot in the configured list.
    pub slot: u16,
    /// The sender's incarnation.
    pub incarnation: u64,
    /// Whether the sender still needs handovers (it has not reclaimed).
    pub want_handover: bool,
}

/// A request for rights on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    /// The policy.
    pub policy: PolicyId,
    /// The client key.
    pub key: String,
    /// The asking slot.
    pub slot: u16,
    /// The asking incarnation (gifts are addressed to it).
    pub incarnation: u64,
    /// How many rights it would like.
    pub want: u64,
}

/// Rights given: the giver's whole column for the receiver, after the gift was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The policy.
    pub policy: PolicyId,
    /// The client key.
    pub key: String,
    /// The giving slot.
    pub from: u16,
    /// The giving incarnation: receivers that know a newer one reject the transfer.
    pub from_incarnation: u64,
    /// The receiving slot.
    pub to: u16,
    /// The giver's cumulative column for the receiver.
    pub given: Col,
}

/// What one slot's current incarnation knows of its exchanges with another slot, sent to a
/// new incarnation of that slot (in chunks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The sending slot.
    pub from: u16,
    /// The sending incarnation.
    pub from_incarnation: u64,
    /// The receiving slot.
    pub to: u16,
    /// The receiving (new) incarnation.
    pub to_incarnation: u64,
    /// Whether the sender's own predecessors' admissions have all expired (by its clock).
    pub settled: bool,
    /// This chunk's index, from 0.
    pub chunk: u32,
    /// Number of chunks (at least 1).
    pub chunks: u32,
    /// Keys with a non-zero exchange between the two slots, or whose pair epoch is past
    /// `floor`.
    #[serde(deserialize_with = "crate::crdt::wire::grown_vec")]
    pub entries: Vec<HandoverEntry>,
    /// The sender's epoch floor for the receiver's slot: every key it does not list is, at
    /// the sender, empty at that epoch (or unheld), so the receiver may refuse older epochs
    /// for keys it does not hold.
    pub floor: u64,
}

/// One key in a [`Handover`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverEntry {
    /// The policy.
    pub policy: PolicyId,
    /// The client key.
    pub key: String,
    /// The receiver's slot's column for the sender, as the sender accepted it.
    pub you_gave_me: Col,
    /// The sender's column for the receiver's slot.
    pub i_gave_you: Col,
}

/// "For `(policy, key)`, my pair with you is at `epoch`: I hold nothing of older epochs and
/// will refuse them." Sent when a pair is settled, when a key is evicted, and in answer to a
/// column of an older epoch. The receiver's older state for the pair is then void: the
/// sender settled it (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    /// The policy.
    pub policy: PolicyId,
    /// The client key.
    pub key: String,
    /// The sending slot.
    pub from: u16,
    /// The sending incarnation.
    pub from_incarnation: u64,
    /// The receiving slot.
    pub to: u16,
    /// The sender's epoch for the pair.
    pub epoch: u64,
}

/// A message the table wants sent (drained by the gossip layer with
/// [`super::BoundedTable::take_outgoing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Our announcement, to slot `0` (sent when we reclaim, so peers learn it).
    Announce(u16, Announce),
    /// Rights given back or a column resent while settling.
    Transfer(Transfer),
    /// A settlement certificate.
    Settled(Settled),
}

impl Outgoing {
    /// The slot to send it to.
    pub fn to(&self) -> u16 {
        match self {
            Outgoing::Announce(to, _) => *to,
            Outgoing::Transfer(t) => t.to,
            Outgoing::Settled(s) => s.to,
        }
    }
}
