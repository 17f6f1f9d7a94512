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
/// Deterministic: indices are handed out in first-seen order, and a released index is reused
/// (most recently released first) before a new one is handed out, so replaying the same
/// operations gives the same table. The owner releases an actor once nothing refers to it
/// any more ([`ActorTable::release`]), so the table holds the actors that still have state,
/// not every incarnation ever seen; at most [`MAX_ACTORS`] are named at once.
#[derive(Debug, Clone, Default)]
pub struct ActorTable {
    /// By index; `None`: released, its index waiting in `free`.
    actors: Vec<Option<Actor>>,
    hashes: Vec<u64>,
    index: BTreeMap<Actor, ActorIdx>,
    free: Vec<ActorIdx>,
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
        let idx = match self.free.pop() {
            Some(idx) => idx,
            None => {
                let idx = u16::try_from(self.actors.len())
                    .ok()
                    .filter(|&i| usize::from(i) < MAX_ACTORS)
                    .ok_or(ActorTableError::Full)?;
                self.actors.push(None);
                self.hashes.push(0);
                ActorIdx(idx)
            }
        };
        let i = usize::from(idx.0);
        self.actors[i] = Some(actor.clone());
        self.hashes[i] = actor.stable_hash();
        self.index.insert(actor.clone(), idx);
        Ok(idx)
    }

    /// Forgets the actor at `idx` and frees the index for reuse. The caller guarantees that
    /// nothing refers to `idx` any more (a reused index names another actor). Returns the
    /// actor, or `None` if `idx` named nobody.
    pub fn release(&mut self, idx: ActorIdx) -> Option<Actor> {
        let actor = self.actors.get_mut(usize::from(idx.0))?.take()?;
        self.index.remove(&actor);
        self.hashes[usize::from(idx.0)] = 0;
        self.free.push(idx);
        Some(actor)
    }

    /// The index of `actor`, if known.
    pub fn get(&self, actor: &Actor) -> Option<ActorIdx> {
        self.index.get(actor).copied()
    }

    /// The actor named by `idx`, if any.
    pub fn actor(&self, idx: ActorIdx) -> Option<&Actor> {
        self.actors.get(usize::from(idx.0))?.as_ref()
    }

    /// The named actors, by index.
    pub fn iter(&self) -> impl Iterator<Item = (ActorIdx, &Actor)> {
        self.index.iter().map(|(a, &i)| (i, a))
    }

    /// The cached [`Actor::stable_hash`] of `idx` (0 for an unknown index).
    pub(crate) fn hash_of(&self, idx: ActorIdx) -> u64 {
        self.hashes.get(usize::from(idx.0)).copied().unwrap_or(0)
    }

    /// One past the highest index handed out (released indices included): every index in
    /// use is below it, so `0..len()` with [`ActorTable::actor`] visits every actor.
    pub fn len(&self) -> usize {
        self.actors.len()
    }

    /// How many actors are named now.
    pub fn named(&self) -> usize {
        self.index.len()
    }

    /// Whether no actor is named.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Approximate heap bytes held (capacity accounting).
    pub fn memory_bytes(&self) -> usize {
        let names: usize = self
            .actors
            .iter()
            .flatten()
            .map(|a| a.region.capacity() + a.instance.capacity())
            .sum();
        self.actors.capacity() * size_of::<Option<Actor>>()
            + self.hashes.capacity() * size_of::<u64>()
            + self.free.capacity() * size_of::<ActorIdx>()
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
        // A released index is reused: the table bounds the actors named at once.
        let gone = t.release(ActorIdx(7)).unwrap();
        assert_eq!(t.get(&gone), None);
        assert_eq!(t.actor(ActorIdx(7)), None);
        assert_eq!(t.named(), MAX_ACTORS - 1);
        assert_eq!(t.release(ActorIdx(7)), None);
        let fresh = Actor::new("r", "i", u64::MAX);
        assert_eq!(t.intern(&fresh), Ok(ActorIdx(7)));
        assert_eq!(t.actor(ActorIdx(7)), Some(&fresh));
        assert_eq!(t.hash_of(ActorIdx(7)), fresh.stable_hash());
        assert_eq!(t.len(), MAX_ACTORS);
    }
}
