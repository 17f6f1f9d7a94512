//! What tables send each other: deltas (and full-state chunks, deltas from version 0), and
//! the builder that cuts them into chunks with their own actor numbering.

use serde::{Deserialize, Serialize};

use super::super::actor::{Actor, ActorIdx};
use super::PolicyId;

/// A state delta: the cells of a table changed within a version range, or one chunk of them.
///
/// Designed for bincode 2's varint encoding: actors are named once per delta and referenced
/// by `u16` index, the policy id and a base sub-window are written once per policy group, and
/// each entry's sub-window is a small offset from that base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The sender's version this delta starts after (exclusive); 0 for a full state.
    pub from_version: u64,
    /// The sender's version this delta is complete up to (inclusive). A receiver that has all
    /// chunks of a delta whose `from_version` it had already reached has merged every change
    /// the sender made up to `to_version`: that is what its acks may claim.
    pub to_version: u64,
    /// This chunk's index within the delta, from 0.
    pub chunk: u32,
    /// How many chunks the delta has (at least 1).
    pub chunks: u32,
    /// The actors referenced by this chunk's counts, by position.
    #[serde(deserialize_with = "crate::crdt::wire::grown_vec")]
    pub actors: Vec<Actor>,
    /// Entries grouped by policy.
    #[serde(deserialize_with = "crate::crdt::wire::grown_vec")]
    pub policies: Vec<PolicyDelta>,
}

/// One policy's entries in a [`Delta`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDelta {
    /// The policy.
    pub policy: PolicyId,
    /// Sub-window that entry offsets are relative to (the sender's GC horizon).
    pub base_sub: u64,
    /// The changed `(key, sub-window)` entries.
    #[serde(deserialize_with = "crate::crdt::wire::grown_vec")]
    pub entries: Vec<DeltaEntry>,
}

/// The changed cells of one `(key, sub-window)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaEntry {
    /// The client key.
    pub key: String,
    /// Sub-window, as an offset from [`PolicyDelta::base_sub`].
    pub sub_off: u32,
    /// `(actor index in Delta::actors, P, N)` for each changed cell.
    #[serde(deserialize_with = "crate::crdt::wire::grown_vec")]
    pub counts: Vec<(u16, u64, u64)>,
}

impl Delta {
    /// Number of `(key, sub-window)` entries in this chunk.
    pub fn entry_count(&self) -> usize {
        self.policies.iter().map(|p| p.entries.len()).sum()
    }
}

/// Builds one delta chunk with its own actor numbering.
pub(super) struct ChunkBuilder {
    delta: Delta,
    /// Our actor index → position in `delta.actors` (`u16::MAX`: not yet referenced).
    refs: Vec<u16>,
    pub(super) entries: usize,
}

impl ChunkBuilder {
    pub(super) fn new(n_actors: usize) -> Self {
        Self {
            delta: Delta {
                from_version: 0,
                to_version: 0,
                chunk: 0,
                chunks: 1,
                actors: Vec::new(),
                policies: Vec::new(),
            },
            refs: vec![u16::MAX; n_actors],
            entries: 0,
        }
    }

    /// The position of our actor `idx` in this chunk's actor list, adding it if new. `None`
    /// only for an index outside the table this builder was sized for (cannot happen: cells
    /// only name interned actors).
    pub(super) fn actor_ref(&mut self, idx: ActorIdx, actor: &Actor) -> Option<u16> {
        let slot = self.refs.get_mut(usize::from(idx.0))?;
        if *slot == u16::MAX {
            // At most MAX_ACTORS (< u16::MAX) actors exist, so the position fits.
            *slot = u16::try_from(self.delta.actors.len()).ok()?;
            self.delta.actors.push(actor.clone());
        }
        Some(*slot)
    }

    pub(super) fn push(
        &mut self,
        policy: PolicyId,
        base_sub: u64,
        key: &str,
        sub_off: u32,
        counts: Vec<(u16, u64, u64)>,
    ) {
        let same = self
            .delta
            .policies
            .last()
            .is_some_and(|p| p.policy == policy && p.base_sub == base_sub);
        if !same {
            self.delta.policies.push(PolicyDelta {
                policy,
                base_sub,
                entries: Vec::new(),
            });
        }
        if let Some(p) = self.delta.policies.last_mut() {
            p.entries.push(DeltaEntry {
                key: key.to_owned(),
                sub_off,
                counts,
            });
        }
        self.entries += 1;
    }

    pub(super) fn finish(self) -> Delta {
        self.delta
    }
}
