//! What the machine shows of itself: peer and link states, counters, and the admin API's
//! inspection of one key.
//!
//! Separate because these are read-only views for metrics and the admin API: nothing in
//! them decides anything.

use super::{Gossip, PeerId};
use crate::crdt::{Actor, ActorIdx, PolicyId, Slot};

/// What we make of a peer's `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    /// No `Hello` accepted yet.
    Unknown,
    /// Handshake done: its messages are merged.
    Ok,
    /// Its configuration digest differs from ours: nothing it says is merged.
    ConfigMismatch {
        /// The digest it announced.
        theirs: u64,
    },
    /// Its `Hello` named another slot than the connection's, an incarnation older than one
    /// already seen, or malformed names.
    BadHello,
}

/// The connection state of a peer, as the machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No connection; we dial it at `retry_at_us` (`None`: it dials us).
    Down {
        /// When [`Gossip::poll_connect`] will ask to dial it again.
        retry_at_us: Option<u64>,
    },
    /// [`Gossip::poll_connect`] asked the driver to dial it at `since_us`.
    Dialing {
        /// When the dial started.
        since_us: u64,
    },
    /// Connected since `since_us`.
    Up {
        /// When the connection came up.
        since_us: u64,
    },
}

/// One peer as reported to the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReport {
    /// The peer.
    pub peer: PeerId,
    /// Its configured slot.
    pub slot: Slot,
    /// The incarnation it announced, once a `Hello` was accepted or seen.
    pub actor: Option<Actor>,
    /// What we made of its `Hello`.
    pub status: PeerStatus,
    /// The connection.
    pub link: LinkState,
    /// Consecutive failed connection attempts (reset by a completed handshake).
    pub failed_attempts: u32,
    /// When we last received anything from it.
    pub last_heard_us: Option<u64>,
    /// When we last merged a delta or full-state chunk from it (gossip lag).
    pub last_delta_us: Option<u64>,
    /// Strict columns it sent beyond what it could honestly have given (transfers clipped
    /// to the bound, handover entries refused; see
    /// [`crate::crdt::bounded::BoundedTable::unbounded_by_slot`]): never for an honest peer
    /// of the same configuration, so a rising count names a liar or a misconfigured peer.
    pub impossible_gifts: u64,
}

/// Counters of dropped or refused peer input and of traffic, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GossipStats {
    /// Messages from a peer id that is not a configured peer (or is ourselves).
    pub unknown_peer: u64,
    /// Messages from a peer whose connection we consider closed (in flight at the close).
    pub no_connection: u64,
    /// Messages other than `Hello` from a peer whose `Hello` we have not accepted.
    pub before_hello: u64,
    /// `Hello`s refused (wrong slot, stale or future incarnation, bad names, configuration
    /// mismatch, too frequent restarts; see [`super::HelloRefusal`]).
    pub refused_hello: u64,
    /// `Hello`s of an incarnation older than the one known for the slot: a second process
    /// with the peer's identity, or its clock set back.
    pub duplicate_identity: u64,
    /// Peers' quotas below ours that outlived the rollout window and stopped counting (see
    /// `proto/reload.rs`): a rolling change left unfinished, or a peer lying to stop a policy.
    pub quota_overdue: u64,
    /// Strict-mode messages whose claimed sender (slot and incarnation) is not the
    /// connection's peer as its vetted `Hello` named it.
    pub misattributed: u64,
    /// Usage entries or counts the CRDT refused (malformed, impossible or over a limit: see
    /// [`crate::crdt::usage::MergeReport::refusals`]).
    pub merge_refusals: u64,
    /// Usage counts clamped to what their author could honestly have claimed.
    pub merge_clamped: u64,
    /// Usage entries for sub-windows already garbage here (normal under delay).
    pub merge_stale: u64,
    /// Transfers refused by the bounded counter (stale, misaddressed, malformed).
    pub transfers_refused: u64,
    /// Full-state exchanges started because digests disagreed.
    pub anti_entropy_repairs: u64,
    /// Messages queued for sending.
    pub sent: u64,
}

/// What an admin endpoint shows for one `(policy, key)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// The policy inspected.
    pub policy: PolicyId,
    /// The key inspected.
    pub key: String,
    /// Eventual mode, if `policy` is an eventual policy.
    pub eventual: Option<EventualInspection>,
    /// Strict mode, if `policy` is a strict policy.
    pub strict: Option<StrictInspection>,
    /// Every peer, with the age of the last delta merged from it.
    pub peers: Vec<PeerInspection>,
}

/// Eventual-mode view of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventualInspection {
    /// The merged live count (everyone's admissions as far as merged here).
    pub merged: u64,
    /// Our own live admissions not yet settled by every peer.
    pub unsettled: u64,
    /// `N` in the admission rule (peers, silent ones included, plus ourselves).
    pub n_actors: u32,
    /// Live usage per actor with any, ourselves always included.
    pub per_actor: Vec<(Actor, u64)>,
}

/// Strict-mode view of one key (our own books: other slots' rights are theirs to know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrictInspection {
    /// Rights we can use now.
    pub available: u64,
    /// Rights we consumed that are still live.
    pub live_consumed: u64,
    /// Whether our slot holds its share yet.
    pub reclaimed: bool,
}

/// A peer in an [`Inspection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInspection {
    /// The peer.
    pub peer: PeerId,
    /// Its actor, if known.
    pub actor: Option<Actor>,
    /// What we made of its `Hello`.
    pub status: PeerStatus,
    /// Microseconds since we last merged a delta from it (`None`: never).
    pub last_delta_age_us: Option<u64>,
}

impl Gossip {
    /// Every peer's state, in slot order.
    pub fn peer_status(&self) -> Vec<PeerReport> {
        self.peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let p = p.as_ref()?;
                Some(PeerReport {
                    peer: PeerId(u16::try_from(i).ok()?),
                    slot: p.slot.clone(),
                    actor: p.actor.clone(),
                    status: p.status,
                    link: p.link,
                    failed_attempts: p.attempts,
                    last_heard_us: p.last_heard_us,
                    last_delta_us: p.last_delta_rx_us,
                    impossible_gifts: self
                        .bounded
                        .unbounded_by_slot()
                        .get(i)
                        .copied()
                        .unwrap_or(0),
                })
            })
            .collect()
    }

    /// Everything known about `(policy, key)`, for the admin endpoint.
    pub fn inspect(&self, policy: PolicyId, key: &str, now_us: u64) -> Inspection {
        let table = self.node.table();
        let eventual = table.spec(policy).map(|_| {
            let actors = table.actors();
            let per_actor = (0..actors.len())
                .filter_map(|i| {
                    let idx = ActorIdx(u16::try_from(i).ok()?);
                    let actor = actors.actor(idx)?;
                    let used = table.own_count(idx, policy, key, now_us);
                    (used > 0 || idx == self.node.me()).then(|| (actor.clone(), used))
                })
                .collect();
            EventualInspection {
                merged: table.count(policy, key, now_us),
                unsettled: self.node.unacked(policy, key, now_us),
                n_actors: self.node.acks().n_actors(),
                per_actor,
            }
        });
        let strict = self.strict.contains_key(&policy).then(|| StrictInspection {
            available: self.bounded.available(policy, key, now_us),
            live_consumed: self.bounded.live_consumed(policy, key, now_us),
            reclaimed: self.bounded.is_reclaimed(),
        });
        let peers = self
            .peer_status()
            .into_iter()
            .map(|r| PeerInspection {
                peer: r.peer,
                actor: r.actor,
                status: r.status,
                last_delta_age_us: r.last_delta_us.map(|t| now_us.saturating_sub(t)),
            })
            .collect();
        Inspection {
            policy,
            key: key.to_owned(),
            eventual,
            strict,
            peers,
        }
    }
}
