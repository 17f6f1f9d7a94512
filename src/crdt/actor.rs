//! Who writes: actors, slots and a compact actor table.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::hash::Fnv64;

/// Longest region or instance name accepted from a peer: names come from configuration and
/// are short; a longer one is a malformed frame, refused before it is stored.
pub const MAX_NAME_LEN: usize = 128;

/// Most actors one table can name. Indices are `u16` so that a counter cell and a delta entry
/// stay small; `u16::MAX` itself is never handed out.
pub const MAX_ACTORS: usize = u16::MAX as usize;

/// One gateway process lifetime: the writer of CRDT state.
///
/// A restart is a new incarnation and therefore a new actor: the dead process's unsent
/// admissions are unknown, so its state must never be continued by someone who does not know
/// it. Incarnations of one slot must grow across restarts (a start timestamp or a persisted
/// counter); `0` is reserved for "unknown".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Actor {
    /// The region the process runs in, as named in the configuration.
    pub region: String,
    /// The instance within the region (several instances of one region are peers like any
    /// other).
    pub instance: String,
    /// Which lifetime of the `(region, instance)` slot this is; larger is newer.
    pub incarnation: u64,
}

impl Actor {
    /// An actor from its parts.
    pub fn new(region: impl Into<String>, instance: impl Into<String>, incarnation: u64) -> Self {
        Self {
            region: region.into(),
            instance: instance.into(),
            incarnation,
        }
    }

    /// The seat this actor occupies.
    pub fn slot(&self) -> Slot {
        Slot {
            region: self.region.clone(),
            instance: self.instance.clone(),
        }
    }

    /// Whether names are short enough to be stored (peers are checked with this).
    pub fn is_well_formed(&self) -> bool {
        self.region.len() <= MAX_NAME_LEN && self.instance.len() <= MAX_NAME_LEN
    }

    /// A stable 64-bit hash of the actor (FNV-1a, not `RandomState`), so digests computed on
    /// different machines agree.
    pub fn stable_hash(&self) -> u64 {
        let mut h = Fnv64::new();
        h.write_str(&self.region);
        h.write_str(&self.instance);
        h.write_u64(self.incarnation);
        h.finish()
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}#{}", self.region, self.instance, self.incarnation)
    }
}

/// A seat in the deployment: `(region, instance)` without the incarnation. Strict-mode rights
/// belong to slots (the configured list), and successive incarnations inherit them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Slot {
    /// The region, as named in the configuration.
    pub region: String,
    /// The instance within the region.
    pub instance: String,
}

impl Slot {
    /// A slot from its parts.
    pub fn new(region: impl Into<String>, instance: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            instance: instance.into(),
        }
    }

    /// The actor occupying this slot in its `incarnation`-th lifetime.
    pub fn actor(&self, incarnation: u64) -> Actor {
        Actor {
            region: self.region.clone(),
            instance: self.instance.clone(),
            incarnation,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.region, self.instance)
    }
}

/// A small local name for an actor in one [`ActorTable`]. Meaningless outside that table:
/// every replica numbers actors in its own order, and deltas carry their own table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ActorIdx(pub u16);

/// Refused to name one more actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ActorTableError {
    /// The table already names [`MAX_ACTORS`] actors.
    #[error("actor table is full ({MAX_ACTORS} actors)")]
    Full,
    /// The actor's names are longer than [`MAX_NAME_LEN`].
    #[error("actor names longer than {MAX_NAME_LEN} bytes")]
    Malformed,
}

/// Interns actors as [`ActorIdx`]: counters store a `u16` instead of two strings and a `u64`.
///
/// Deterministic: indices are handed out in first-seen order, so replaying the same operations
/// gives the same table. The table only grows (one entry per incarnation ever seen, tens of
/// bytes each); a process that sees more than [`MAX_ACTORS`] incarnations refuses new ones.
#[derive(Debug, Clone, Default)]
pub struct ActorTable {
    actors: Vec<Actor>,
    hashes: Vec<u64>,
    index: BTreeMap<Actor, ActorIdx>,
}

impl ActorTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The index of `actor`, adding it if new.
    pub fn intern(&mut self, actor: &Actor) -> Result<ActorIdx, ActorTableError> {
        if let Some(&idx) = self.index.get(actor) {
            return Ok(idx);
        }
        if !actor.is_well_formed() {
            return Err(ActorTableError::Malformed);
        }
        let idx = u16::try_from(self.actors.len())
            .ok()
            .filter(|&i| usize::from(i) < MAX_ACTORS)
            .ok_or(ActorTableError::Full)?;
        self.actors.push(actor.clone());
        self.hashes.push(actor.stable_hash());
        self.index.insert(actor.clone(), ActorIdx(idx));
        Ok(ActorIdx(idx))
    }

    /// The index of `actor`, if known.
    pub fn get(&self, actor: &Actor) -> Option<ActorIdx> {
        self.index.get(actor).copied()
    }

    /// The actor named by `idx`, if any.
    pub fn actor(&self, idx: ActorIdx) -> Option<&Actor> {
        self.actors.get(usize::from(idx.0))
    }

    /// The cached [`Actor::stable_hash`] of `idx` (0 for an unknown index).
    pub(crate) fn hash_of(&self, idx: ActorIdx) -> u64 {
        self.hashes.get(usize::from(idx.0)).copied().unwrap_or(0)
    }

    /// How many actors are named.
    pub fn len(&self) -> usize {
        self.actors.len()
    }

    /// Whether no actor is named yet.
    pub fn is_empty(&self) -> bool {
        self.actors.is_empty()
    }

    /// Approximate heap bytes held (capacity accounting).
    pub fn memory_bytes(&self) -> usize {
        let names: usize = self
            .actors
            .iter()
            .map(|a| a.region.capacity() + a.instance.capacity())
            .sum();
        self.actors.capacity() * size_of::<Actor>()
            + self.hashes.capacity() * size_of::<u64>()
            // A BTreeMap entry costs its key and value plus about half again in node slack.
            + self.index.len() * (size_of::<Actor>() + size_of::<ActorIdx>()) * 3 / 2
            + names * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_deterministic_and_bounded() {
        let mut t = ActorTable::new();
        let a = Actor::new("us-east", "i1", 1);
        let b = Actor::new("eu-west", "i1", 1);
        assert_eq!(t.intern(&a), Ok(ActorIdx(0)));
        assert_eq!(t.intern(&b), Ok(ActorIdx(1)));
        assert_eq!(t.intern(&a), Ok(ActorIdx(0)));
        assert_eq!(t.get(&b), Some(ActorIdx(1)));
        assert_eq!(t.actor(ActorIdx(1)), Some(&b));
        assert_eq!(t.actor(ActorIdx(7)), None);
        assert_eq!(t.len(), 2);
        let long = Actor::new("x".repeat(MAX_NAME_LEN + 1), "i", 1);
        assert_eq!(t.intern(&long), Err(ActorTableError::Malformed));
        assert_eq!(a.slot().actor(1), a);
        assert_eq!(a.to_string(), "us-east/i1#1");
        assert_ne!(a.stable_hash(), b.stable_hash());
    }

    #[test]
    fn table_refuses_past_capacity() {
        let mut t = ActorTable::new();
        for i in 0..MAX_ACTORS as u64 {
            t.intern(&Actor::new("r", "i", i + 1)).unwrap();
        }
        assert_eq!(
            t.intern(&Actor::new("r", "i", u64::MAX)),
            Err(ActorTableError::Full)
        );
    }
}
