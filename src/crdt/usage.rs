//! Eventual mode's state: sliding usage per `(policy, key)` as compact PN-counters.
//!
//! Every `(policy, key, sub-window)` holds a state-based PN-counter: per actor a pair
//! `(P, N)`, `P` its admissions and `N` its refunds. Merge is the pointwise maximum of `P`
//! and of `N` per actor; the value is `ΣP − ΣN`. That is exactly `crdts::PNCounter`'s
//! semantics (property-tested against it below), in a layout sized for the hot path: a
//! `crdts::PNCounter` is two `BTreeMap<Actor, BigUint>`, hundreds of bytes for one key, where
//! here a key with three actors in one sub-window costs one small allocation of three 32-byte
//! cells plus its map entry (measured below; under 200 bytes).
//!
//! Only the owner increments its own pair; everyone else only merges. Because a pair only
//! grows, merges are idempotent, commutative and associative: deltas may be lost, repeated or
//! reordered, and a full-state exchange repairs any loss.
//!
//! Deltas: every change to a cell (an own record or refund, or a merge that raised a value)
//! bumps the table's version and stamps the cell with it. [`UsageTable::deltas_since`]
//! returns the cells stamped after a version, in chunks of bounded size. A delta carries only
//! the changed cells of an entry (a join-decomposition of the state: each cell is itself a
//! valid state), so a key that only I touched costs one `(actor, P, N)` triple per peer.
//!
//! Pure and deterministic: `BTreeMap`s everywhere, no clock (every function takes `now_us`),
//! no `RandomState`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::actor::{Actor, ActorIdx, ActorTable, ActorTableError};
use super::hash::{Fnv64, mix};
use super::window::WindowSpec;

/// A policy's identifier, as numbered by the configuration.
pub type PolicyId = u32;

/// Bounds on what peers can make a table hold, so a malformed or hostile delta cannot
/// allocate without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageLimits {
    /// Most distinct `(policy, key)` pairs held at once. Past it, new keys from records and
    /// deltas are refused (and counted) until GC frees room: under-counting a few keys is
    /// better than running out of memory.
    pub max_keys: usize,
    /// Longest key accepted, in bytes (client keys are IPs, API keys, JWT subjects).
    pub max_key_len: usize,
}

impl Default for UsageLimits {
    fn default() -> Self {
        Self {
            max_keys: 4_000_000,
            max_key_len: 512,
        }
    }
}

/// Why a local operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum UsageError {
    /// The policy was never registered with the table.
    #[error("unknown policy {0}")]
    UnknownPolicy(PolicyId),
    /// The actor index is not in this table's actor table.
    #[error("unknown actor index {0}")]
    UnknownActor(u16),
    /// The key is longer than [`UsageLimits::max_key_len`].
    #[error("key longer than the limit")]
    KeyTooLong,
    /// The table holds [`UsageLimits::max_keys`] keys already.
    #[error("usage table is full")]
    TableFull,
    /// The sub-window cannot be stored next to the key's others (a clock jumped by years).
    #[error("sub-window out of range")]
    SubWindowOutOfRange,
    /// The actor table refused an actor.
    #[error(transparent)]
    Actor(#[from] ActorTableError),
}

/// One actor's pair in one sub-window of one key. 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cell {
    /// Admissions by `actor` (grow-only).
    p: u64,
    /// Refunds by `actor` (grow-only).
    n: u64,
    /// Table version of the last change, for deltas.
    version: u64,
    /// Sub-window, relative to the key's `base_sub`.
    sub_off: u32,
    actor: ActorIdx,
}

/// All cells of one key, sorted by `(sub_off, actor)`. One exact-size allocation per key (a
/// boxed slice rather than a `Vec`: no spare capacity, and 8 bytes less in every map slot).
#[derive(Debug, Clone, Default)]
struct KeyUsage {
    base_sub: u64,
    cells: Box<[Cell]>,
}

impl KeyUsage {
    fn sub(&self, c: &Cell) -> u64 {
        self.base_sub + u64::from(c.sub_off)
    }

    /// Drops cells of sub-windows below `horizon`; returns how many.
    fn prune(&mut self, horizon: u64) -> usize {
        let base = self.base_sub;
        let keep = self
            .cells
            .iter()
            .filter(|c| base + u64::from(c.sub_off) >= horizon)
            .count();
        let dropped = self.cells.len() - keep;
        if dropped > 0 {
            let mut cells = std::mem::take(&mut self.cells).into_vec();
            cells.retain(|c| base + u64::from(c.sub_off) >= horizon);
            self.cells = cells.into_boxed_slice();
        }
        dropped
    }

    /// The offset of `sub`, rebasing the key if `sub` is older than every stored cell.
    /// `None` if the cells would span more than `u32::MAX` sub-windows (only after a clock
    /// jump of years: callers prune garbage first, which keeps the span to about `3·k`).
    fn offset_of(&mut self, sub: u64) -> Option<u32> {
        if self.cells.is_empty() {
            self.base_sub = sub;
            return Some(0);
        }
        if sub >= self.base_sub {
            return u32::try_from(sub - self.base_sub).ok();
        }
        let shift = self.base_sub - sub;
        let max_off = self.cells.iter().map(|c| c.sub_off).max().unwrap_or(0);
        let shift32 = u32::try_from(shift).ok()?;
        max_off.checked_add(shift32)?;
        for c in self.cells.iter_mut() {
            c.sub_off += shift32;
        }
        self.base_sub = sub;
        Some(0)
    }

    /// The cell for `(off, actor)`, inserted as zero if missing (keeping the sort).
    fn cell_mut(&mut self, off: u32, actor: ActorIdx) -> &mut Cell {
        let pos = self
            .cells
            .binary_search_by(|c| (c.sub_off, c.actor).cmp(&(off, actor)));
        let i = match pos {
            Ok(i) => i,
            Err(i) => {
                // Exact growth: keys hold a handful of cells, and the default doubling would
                // waste up to half of each key's allocation.
                let mut cells = std::mem::take(&mut self.cells).into_vec();
                cells.reserve_exact(1);
                cells.insert(
                    i,
                    Cell {
                        p: 0,
                        n: 0,
                        version: 0,
                        sub_off: off,
                        actor,
                    },
                );
                self.cells = cells.into_boxed_slice();
                i
            }
        };
        &mut self.cells[i]
    }

    fn find(&self, off: u32, actor: ActorIdx) -> Option<&Cell> {
        self.cells
            .binary_search_by(|c| (c.sub_off, c.actor).cmp(&(off, actor)))
            .ok()
            .map(|i| &self.cells[i])
    }
}

/// One policy's keys and window.
#[derive(Debug, Clone)]
struct PolicyUsage {
    spec: WindowSpec,
    keys: BTreeMap<Box<str>, KeyUsage>,
}

/// Sliding usage for every `(policy, key)` this gateway has seen, from every actor.
///
/// See the module docs for the model. Memory is bounded by [`UsageTable::gc`], which drops
/// sub-windows more than two windows old and keys left empty, and by [`UsageLimits`].
#[derive(Debug, Clone)]
pub struct UsageTable {
    actors: ActorTable,
    policies: BTreeMap<PolicyId, PolicyUsage>,
    version: u64,
    key_count: usize,
    limits: UsageLimits,
}

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
    pub actors: Vec<Actor>,
    /// Entries grouped by policy.
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
    pub counts: Vec<(u16, u64, u64)>,
}

impl Delta {
    /// Number of `(key, sub-window)` entries in this chunk.
    pub fn entry_count(&self) -> usize {
        self.policies.iter().map(|p| p.entries.len()).sum()
    }
}

/// What a merge did, and what it refused. Refusals are not errors: a peer's malformed or
/// stale entries are skipped and counted so that one bad entry never blocks the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Cells whose `P` or `N` rose.
    pub cells_changed: u64,
    /// Entries for sub-windows that are already garbage here (normal with skew or delay).
    pub stale: u64,
    /// Entries for sub-windows more than one window ahead of our clock.
    pub future: u64,
    /// Entries for policies this table does not know (configuration mismatch).
    pub unknown_policy: u64,
    /// Counts naming an actor index outside the delta's actor list.
    pub bad_actor: u64,
    /// Entries or counts refused for size: key too long, table full, actor table full or
    /// malformed actor names.
    pub refused: u64,
}

impl MergeReport {
    /// Whether anything was refused as malformed or over a limit (stale entries are normal).
    pub fn has_refusals(&self) -> bool {
        self.future + self.unknown_policy + self.bad_actor + self.refused > 0
    }
}

/// What [`UsageTable::gc`] freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Cells dropped (garbage sub-windows).
    pub cells: usize,
    /// Keys dropped (no cells left).
    pub keys: usize,
}

impl UsageTable {
    /// An empty table counting the given policies, with default [`UsageLimits`].
    pub fn new(policies: impl IntoIterator<Item = (PolicyId, WindowSpec)>) -> Self {
        Self::with_limits(policies, UsageLimits::default())
    }

    /// An empty table with explicit limits.
    pub fn with_limits(
        policies: impl IntoIterator<Item = (PolicyId, WindowSpec)>,
        limits: UsageLimits,
    ) -> Self {
        let mut t = Self {
            actors: ActorTable::new(),
            policies: BTreeMap::new(),
            version: 0,
            key_count: 0,
            limits,
        };
        for (id, spec) in policies {
            t.add_policy(id, spec);
        }
        t
    }

    /// Registers (or re-registers) a policy's window. Changing the window of a policy that
    /// already holds usage drops that usage: sub-window numbers of different lengths do not
    /// mix.
    pub fn add_policy(&mut self, policy: PolicyId, spec: WindowSpec) {
        if let Some(p) = self.policies.get(&policy) {
            if p.spec == spec {
                return;
            }
            self.key_count -= p.keys.len();
        }
        self.policies.insert(
            policy,
            PolicyUsage {
                spec,
                keys: BTreeMap::new(),
            },
        );
    }

    /// The window of a registered policy.
    pub fn spec(&self, policy: PolicyId) -> Option<WindowSpec> {
        self.policies.get(&policy).map(|p| p.spec)
    }

    /// Names `actor` in this table (call once with our own actor to get `me`).
    pub fn intern(&mut self, actor: &Actor) -> Result<ActorIdx, UsageError> {
        Ok(self.actors.intern(actor)?)
    }

    /// The table's actors.
    pub fn actors(&self) -> &ActorTable {
        &self.actors
    }

    /// The current version: it grows by one per changed cell, never decreases.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of `(policy, key)` pairs held.
    pub fn key_count(&self) -> usize {
        self.key_count
    }

    fn check_actor(&self, me: ActorIdx) -> Result<(), UsageError> {
        if usize::from(me.0) < self.actors.len() {
            Ok(())
        } else {
            Err(UsageError::UnknownActor(me.0))
        }
    }

    /// The entry of `key`, created if absent and allowed.
    fn key_entry<'a>(
        keys: &'a mut BTreeMap<Box<str>, KeyUsage>,
        key_count: &mut usize,
        limits: &UsageLimits,
        key: &str,
    ) -> Result<&'a mut KeyUsage, UsageError> {
        if key.len() > limits.max_key_len {
            return Err(UsageError::KeyTooLong);
        }
        if !keys.contains_key(key) {
            if *key_count >= limits.max_keys {
                return Err(UsageError::TableFull);
            }
            *key_count += 1;
            keys.insert(key.into(), KeyUsage::default());
        }
        // Present: found above or inserted just now.
        keys.get_mut(key).ok_or(UsageError::TableFull)
    }

    /// Records `n` admissions by `me` for `(policy, key)` at `now_us`. Returns the table
    /// version stamped on the change (the unchanged version when `n == 0`).
    pub fn record(
        &mut self,
        me: ActorIdx,
        policy: PolicyId,
        key: &str,
        now_us: u64,
        n: u64,
    ) -> Result<u64, UsageError> {
        self.check_actor(me)?;
        let pol = self
            .policies
            .get_mut(&policy)
            .ok_or(UsageError::UnknownPolicy(policy))?;
        if n == 0 {
            return Ok(self.version);
        }
        let spec = pol.spec;
        let ku = Self::key_entry(&mut pol.keys, &mut self.key_count, &self.limits, key)?;
        ku.prune(spec.gc_horizon(now_us));
        let off = ku
            .offset_of(spec.sub_window(now_us))
            .ok_or(UsageError::SubWindowOutOfRange)?;
        self.version += 1;
        let cell = ku.cell_mut(off, me);
        cell.p = cell.p.saturating_add(n);
        cell.version = self.version;
        Ok(self.version)
    }

    /// Refunds up to `n` of `me`'s admissions made at `admitted_at_us` (a request admitted but
    /// never forwarded). The refund goes into the admission's own sub-window so that both
    /// expire together, and never exceeds what `me` admitted there (a refund cannot create
    /// headroom that was never used). Returns how many were refunded: 0 if that sub-window is
    /// no longer counted at `now_us`.
    pub fn refund(
        &mut self,
        me: ActorIdx,
        policy: PolicyId,
        key: &str,
        admitted_at_us: u64,
        now_us: u64,
        n: u64,
    ) -> Result<u64, UsageError> {
        self.check_actor(me)?;
        let pol = self
            .policies
            .get_mut(&policy)
            .ok_or(UsageError::UnknownPolicy(policy))?;
        let spec = pol.spec;
        let sub = spec.sub_window(admitted_at_us);
        if n == 0 || !spec.is_live(sub, now_us) {
            return Ok(0);
        }
        let Some(ku) = pol.keys.get_mut(key) else {
            return Ok(0);
        };
        let Some(off) = sub
            .checked_sub(ku.base_sub)
            .and_then(|d| u32::try_from(d).ok())
        else {
            return Ok(0);
        };
        let Ok(i) = ku
            .cells
            .binary_search_by(|c| (c.sub_off, c.actor).cmp(&(off, me)))
        else {
            return Ok(0);
        };
        let cell = &mut ku.cells[i];
        let applied = n.min(cell.p.saturating_sub(cell.n));
        if applied > 0 {
            self.version += 1;
            cell.n += applied;
            cell.version = self.version;
        }
        Ok(applied)
    }

    /// Sums `P − N` over the live cells of `(policy, key)` for which `pick(actor)` holds.
    fn sum_live(
        &self,
        policy: PolicyId,
        key: &str,
        now_us: u64,
        pick: impl Fn(ActorIdx) -> bool,
    ) -> i128 {
        let Some(pol) = self.policies.get(&policy) else {
            return 0;
        };
        let Some(ku) = pol.keys.get(key) else {
            return 0;
        };
        let oldest = pol.spec.oldest_live(now_us);
        ku.cells
            .iter()
            .filter(|c| ku.sub(c) >= oldest && pick(c.actor))
            .map(|c| i128::from(c.p) - i128::from(c.n))
            .sum()
    }

    /// The exact merged value `ΣP − ΣN` of `(policy, key)` by the sliding rule, over all
    /// actors. Signed: it can only be negative if peers refunded more than they admitted.
    pub fn net(&self, policy: PolicyId, key: &str, now_us: u64) -> i128 {
        self.sum_live(policy, key, now_us, |_| true)
    }

    /// The merged live usage of `(policy, key)`: [`UsageTable::net`] clamped to `0..=u64::MAX`.
    pub fn count(&self, policy: PolicyId, key: &str, now_us: u64) -> u64 {
        clamp(self.net(policy, key, now_us))
    }

    /// `me`'s own live usage of `(policy, key)`.
    pub fn own_count(&self, me: ActorIdx, policy: PolicyId, key: &str, now_us: u64) -> u64 {
        clamp(self.sum_live(policy, key, now_us, |a| a == me))
    }

    /// Everyone else's live usage of `(policy, key)`, as far as merged here.
    pub fn count_excluding(&self, me: ActorIdx, policy: PolicyId, key: &str, now_us: u64) -> u64 {
        clamp(self.sum_live(policy, key, now_us, |a| a != me))
    }

    /// Merges a peer's delta (or full-state chunk). Idempotent, commutative and associative;
    /// never panics and never allocates beyond [`UsageLimits`] whatever the delta holds.
    pub fn merge_delta(&mut self, delta: &Delta, now_us: u64) -> MergeReport {
        let mut report = MergeReport::default();
        // The delta's actor positions mapped to ours, interned lazily: an actor is added to
        // our table only if an accepted entry references it, so a delta listing thousands of
        // unused actors costs nothing. `Some(None)`: refused.
        let mut remap: Vec<Option<Option<ActorIdx>>> = vec![None; delta.actors.len()];
        for pd in &delta.policies {
            let Some(pol) = self.policies.get_mut(&pd.policy) else {
                report.unknown_policy += pd.entries.len() as u64;
                continue;
            };
            let spec = pol.spec;
            let horizon = spec.gc_horizon(now_us);
            let newest = spec.max_accepted(now_us);
            for e in &pd.entries {
                let Some(sub) = pd.base_sub.checked_add(u64::from(e.sub_off)) else {
                    report.future += 1;
                    continue;
                };
                if sub < horizon {
                    report.stale += 1;
                    continue;
                }
                if sub > newest {
                    report.future += 1;
                    continue;
                }
                // Skip entries that carry nothing, so they cannot create empty keys.
                if e.counts.iter().all(|&(_, p, n)| p == 0 && n == 0) {
                    continue;
                }
                let Ok(ku) =
                    Self::key_entry(&mut pol.keys, &mut self.key_count, &self.limits, &e.key)
                else {
                    report.refused += 1;
                    continue;
                };
                ku.prune(horizon);
                let Some(off) = ku.offset_of(sub) else {
                    report.refused += 1;
                    continue;
                };
                for &(a, p, n) in &e.counts {
                    if p == 0 && n == 0 {
                        continue;
                    }
                    let Some(slot) = remap.get_mut(usize::from(a)) else {
                        report.bad_actor += 1;
                        continue;
                    };
                    let known = *slot.get_or_insert_with(|| {
                        delta
                            .actors
                            .get(usize::from(a))
                            .and_then(|who| self.actors.intern(who).ok())
                    });
                    let Some(actor) = known else {
                        report.refused += 1;
                        continue;
                    };
                    let cell = ku.cell_mut(off, actor);
                    if p > cell.p || n > cell.n {
                        cell.p = cell.p.max(p);
                        cell.n = cell.n.max(n);
                        self.version += 1;
                        cell.version = self.version;
                        report.cells_changed += 1;
                    }
                }
                if ku.cells.is_empty() {
                    pol.keys.remove(e.key.as_str());
                    self.key_count -= 1;
                }
            }
        }
        report
    }

    /// The cells changed after `since`, as deltas of at most `max_entries` entries each
    /// (always at least one chunk, possibly empty, so that the receiver learns that nothing
    /// changed up to [`Delta::to_version`]). Garbage sub-windows are left out.
    pub fn deltas_since(&self, since: u64, max_entries: usize, now_us: u64) -> Vec<Delta> {
        self.deltas_for_peer(since, max_entries, now_us, &[])
    }

    /// [`UsageTable::deltas_since`] without the cells of the actors in `skip`: the
    /// recipient's own (its counts only grow there, so an echo would only cost bandwidth) and
    /// those of actors it hears directly. Merges are idempotent, so leaving cells out never
    /// makes a state wrong, only possibly staler; anti-entropy repairs what a lost direct
    /// link did not deliver.
    pub fn deltas_for_peer(
        &self,
        since: u64,
        max_entries: usize,
        now_us: u64,
        skip: &[ActorIdx],
    ) -> Vec<Delta> {
        let wanted = |c: &Cell| c.version > since && !skip.contains(&c.actor);
        let max_entries = max_entries.max(1);
        let mut out = Vec::new();
        let mut b = ChunkBuilder::new(self.actors.len());
        for (&policy, pol) in &self.policies {
            let horizon = pol.spec.gc_horizon(now_us);
            for (key, ku) in &pol.keys {
                let cells = &ku.cells;
                let mut i = 0;
                while i < cells.len() {
                    let off = cells[i].sub_off;
                    let j = i + cells[i..].iter().take_while(|c| c.sub_off == off).count();
                    let group = &cells[i..j];
                    i = j;
                    let sub = ku.base_sub + u64::from(off);
                    if sub < horizon || !group.iter().any(wanted) {
                        continue;
                    }
                    let Ok(rel) = u32::try_from(sub - horizon) else {
                        continue;
                    };
                    if b.entries == max_entries {
                        out.push(b.finish());
                        b = ChunkBuilder::new(self.actors.len());
                    }
                    let counts = group
                        .iter()
                        .filter(|c| wanted(c))
                        .filter_map(|c| {
                            let actor = self.actors.actor(c.actor)?;
                            Some((b.actor_ref(c.actor, actor)?, c.p, c.n))
                        })
                        .collect();
                    b.push(policy, horizon, key, rel, counts);
                }
            }
        }
        out.push(b.finish());
        let chunks = u32::try_from(out.len()).unwrap_or(u32::MAX);
        for (i, d) in out.iter_mut().enumerate() {
            d.from_version = since;
            d.to_version = self.version;
            d.chunk = u32::try_from(i).unwrap_or(u32::MAX);
            d.chunks = chunks;
        }
        out
    }

    /// The whole non-garbage state in chunks, for anti-entropy (a delta since version 0).
    pub fn full_state_chunks(&self, max_entries: usize, now_us: u64) -> Vec<Delta> {
        self.deltas_since(0, max_entries, now_us)
    }

    /// A digest of the live state at `now_us`: equal on two replicas that merged the same
    /// cells (whatever their local actor numbering and merge order), different with
    /// overwhelming probability otherwise. The sum of one stable hash per live cell, so it
    /// needs no canonical ordering.
    pub fn digest(&self, now_us: u64) -> u64 {
        let mut sum = 0u64;
        for (&policy, pol) in &self.policies {
            let oldest = pol.spec.oldest_live(now_us);
            for (key, ku) in &pol.keys {
                let mut kh = Fnv64::new();
                kh.write_u64(u64::from(policy));
                kh.write_str(key);
                let kh = kh.finish();
                for c in ku.cells.iter().filter(|c| ku.sub(c) >= oldest) {
                    let mut h = Fnv64::new();
                    h.write_u64(kh);
                    h.write_u64(ku.sub(c));
                    h.write_u64(self.actors.hash_of(c.actor));
                    h.write_u64(c.p);
                    h.write_u64(c.n);
                    sum = sum.wrapping_add(h.finish());
                }
            }
        }
        mix(sum)
    }

    /// Drops sub-windows more than two windows old and keys left without any: memory is
    /// bounded by the keys active in the last two windows.
    pub fn gc(&mut self, now_us: u64) -> GcReport {
        let mut report = GcReport::default();
        for pol in self.policies.values_mut() {
            let horizon = pol.spec.gc_horizon(now_us);
            pol.keys.retain(|_, ku| {
                report.cells += ku.prune(horizon);
                let keep = !ku.cells.is_empty();
                if !keep {
                    report.keys += 1;
                }
                keep
            });
        }
        self.key_count -= report.keys;
        report
    }

    /// Approximate heap bytes held, by capacity accounting: per key its map slot (key and
    /// value, plus the `BTreeMap` node slack, counted as half again), its key bytes and its
    /// cells' capacity; plus the actor table. Allocator headers are not counted.
    pub fn memory_bytes(&self) -> usize {
        let slot = size_of::<Box<str>>() + size_of::<KeyUsage>();
        let mut total = self.actors.memory_bytes();
        for pol in self.policies.values() {
            total += size_of::<PolicyUsage>() + size_of::<PolicyId>();
            for (key, ku) in &pol.keys {
                total += slot * 3 / 2 + key.len() + ku.cells.len() * size_of::<Cell>();
            }
        }
        total
    }

    /// `(P, N)` of one cell, for tests and diagnostics.
    pub fn cell(
        &self,
        actor: ActorIdx,
        policy: PolicyId,
        key: &str,
        sub: u64,
    ) -> Option<(u64, u64)> {
        let ku = self.policies.get(&policy)?.keys.get(key)?;
        let off = u32::try_from(sub.checked_sub(ku.base_sub)?).ok()?;
        ku.find(off, actor).map(|c| (c.p, c.n))
    }
}

fn clamp(v: i128) -> u64 {
    u64::try_from(v.max(0)).unwrap_or(u64::MAX)
}

/// Builds one delta chunk with its own actor numbering.
struct ChunkBuilder {
    delta: Delta,
    /// Our actor index → position in `delta.actors` (`u16::MAX`: not yet referenced).
    refs: Vec<u16>,
    entries: usize,
}

impl ChunkBuilder {
    fn new(n_actors: usize) -> Self {
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
    fn actor_ref(&mut self, idx: ActorIdx, actor: &Actor) -> Option<u16> {
        let slot = self.refs.get_mut(usize::from(idx.0))?;
        if *slot == u16::MAX {
            // At most MAX_ACTORS (< u16::MAX) actors exist, so the position fits.
            *slot = u16::try_from(self.delta.actors.len()).ok()?;
            self.delta.actors.push(actor.clone());
        }
        Some(*slot)
    }

    fn push(
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

    fn finish(self) -> Delta {
        self.delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdts::{CmRDT, CvRDT, PNCounter};
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000;
    /// A plausible wall-clock "now" (2025), so sub-window numbers are realistic.
    const T0: u64 = 1_750_000_000 * SEC;

    fn spec() -> WindowSpec {
        WindowSpec::new(10 * SEC, 10).unwrap()
    }

    fn actor(i: usize) -> Actor {
        let regions = ["us-east", "eu-west", "ap-south", "us-west"];
        Actor::new(regions[i % 4], format!("i{}", i / 4), 1 + (i / 8) as u64)
    }

    fn table_for(i: usize) -> (UsageTable, ActorIdx) {
        let mut t = UsageTable::new([(1, spec()), (2, WindowSpec::new(SEC, 4).unwrap())]);
        let me = t.intern(&actor(i)).unwrap();
        (t, me)
    }

    #[test]
    fn sliding_count_releases_whole_sub_windows() {
        let (mut t, me) = table_for(0);
        t.record(me, 1, "k", T0, 3).unwrap();
        t.record(me, 1, "k", T0 + 5 * SEC, 2).unwrap();
        assert_eq!(t.count(1, "k", T0 + 5 * SEC), 5);
        // Sub-window of T0 is [T0, T0+1s); counted while now < T0 + 1s + 10s.
        assert_eq!(t.count(1, "k", T0 + 11 * SEC - 1), 5);
        assert_eq!(t.count(1, "k", T0 + 11 * SEC), 2);
        assert_eq!(t.count(1, "k", T0 + 16 * SEC), 0);
        assert_eq!(t.count(1, "other", T0), 0);
        assert_eq!(t.count(9, "k", T0), 0);
    }

    #[test]
    fn refunds_stay_in_the_admission_sub_window_and_are_capped() {
        let (mut t, me) = table_for(0);
        t.record(me, 1, "k", T0, 3).unwrap();
        let now = T0 + 2 * SEC;
        t.record(me, 1, "k", now, 1).unwrap();
        assert_eq!(t.refund(me, 1, "k", T0, now, 5).unwrap(), 3);
        assert_eq!(t.count(1, "k", now), 1);
        assert_eq!(t.refund(me, 1, "k", T0, now, 1).unwrap(), 0);
        assert_eq!(t.cell(me, 1, "k", spec().sub_window(T0)), Some((3, 3)));
        // Too late: the admission's sub-window is no longer counted.
        assert_eq!(t.refund(me, 1, "k", now, now + 20 * SEC, 1).unwrap(), 0);
    }

    #[test]
    fn local_errors() {
        let (mut t, me) = table_for(0);
        assert_eq!(
            t.record(me, 7, "k", T0, 1),
            Err(UsageError::UnknownPolicy(7))
        );
        assert_eq!(
            t.record(ActorIdx(9), 1, "k", T0, 1),
            Err(UsageError::UnknownActor(9))
        );
        let long = "x".repeat(513);
        assert_eq!(t.record(me, 1, &long, T0, 1), Err(UsageError::KeyTooLong));
        let mut small = UsageTable::with_limits(
            [(1, spec())],
            UsageLimits {
                max_keys: 2,
                max_key_len: 16,
            },
        );
        let me = small.intern(&actor(0)).unwrap();
        small.record(me, 1, "a", T0, 1).unwrap();
        small.record(me, 1, "b", T0, 1).unwrap();
        assert_eq!(small.record(me, 1, "c", T0, 1), Err(UsageError::TableFull));
        assert_eq!(small.gc(T0 + 30 * SEC), GcReport { cells: 2, keys: 2 });
        assert_eq!(small.key_count(), 0);
        small.record(me, 1, "c", T0 + 30 * SEC, 1).unwrap();
    }

    #[test]
    fn deltas_carry_only_changes_and_chunk() {
        let (mut a, ma) = table_for(0);
        let (mut b, _) = table_for(1);
        for k in 0..25 {
            a.record(ma, 1, &format!("k{k}"), T0, 1).unwrap();
        }
        let v = a.version();
        a.record(ma, 1, "k3", T0, 2).unwrap();
        let d = a.deltas_since(v, 10, T0);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].entry_count(), 1);
        assert_eq!(d[0].policies[0].entries[0].counts, vec![(0, 3, 0)]);
        let full = a.full_state_chunks(10, T0);
        assert_eq!(full.len(), 3);
        assert!(
            full.iter()
                .all(|c| c.chunks == 3 && c.to_version == a.version())
        );
        assert_eq!(full.iter().map(Delta::entry_count).sum::<usize>(), 25);
        for c in &full {
            b.merge_delta(c, T0);
        }
        assert_eq!(b.digest(T0), a.digest(T0));
        assert_eq!(b.count(1, "k3", T0), 3);
        // Nothing changed: one empty chunk that still moves the receiver's version on.
        let none = a.deltas_since(a.version(), 10, T0);
        assert_eq!((none.len(), none[0].entry_count()), (1, 0));
    }

    #[test]
    fn malformed_deltas_are_refused_and_counted() {
        let (mut t, _) = table_for(0);
        let sub = spec().sub_window(T0);
        let entry = |key: &str, off: u32, counts: Vec<(u16, u64, u64)>| DeltaEntry {
            key: key.into(),
            sub_off: off,
            counts,
        };
        let d = Delta {
            from_version: 0,
            to_version: 5,
            chunk: 0,
            chunks: 1,
            actors: vec![actor(1), Actor::new("x".repeat(500), "i", 1), actor(3)],
            policies: vec![
                PolicyDelta {
                    policy: 1,
                    base_sub: sub,
                    entries: vec![
                        entry("ok", 0, vec![(0, 4, 1), (7, 1, 1), (1, 9, 0)]),
                        entry("future", 1_000_000, vec![(0, 1, 0)]),
                        entry(&"y".repeat(600), 0, vec![(0, 1, 0)]),
                        entry("zero", 0, vec![(0, 0, 0)]),
                    ],
                },
                PolicyDelta {
                    policy: 1,
                    base_sub: u64::MAX,
                    entries: vec![entry("overflow", 5, vec![(0, 1, 0)])],
                },
                PolicyDelta {
                    policy: 1,
                    base_sub: 0,
                    entries: vec![entry("stale", 0, vec![(0, 1, 0)])],
                },
                PolicyDelta {
                    policy: 42,
                    base_sub: sub,
                    entries: vec![entry("k", 0, vec![(0, 1, 0)])],
                },
            ],
        };
        let r = t.merge_delta(&d, T0);
        assert_eq!(r.cells_changed, 1);
        assert_eq!(r.bad_actor, 1);
        assert_eq!(r.refused, 2); // long key, malformed actor
        assert_eq!(r.future, 2); // far future, base + off overflow
        assert_eq!(r.stale, 1);
        assert_eq!(r.unknown_policy, 1);
        assert!(r.has_refusals());
        assert_eq!(t.count(1, "ok", T0), 3);
        assert_eq!(t.key_count(), 1);
        // Only referenced, well-formed actors are interned (ourselves and actor 1).
        assert_eq!(t.actors().len(), 2);
    }

    /// Operations for the oracle test.
    #[derive(Debug, Clone)]
    enum Op {
        Inc {
            replica: usize,
            n: u64,
        },
        Refund {
            replica: usize,
            n: u64,
        },
        /// `to` merges everything `from` has changed since `to` last heard from it.
        Sync {
            from: usize,
            to: usize,
        },
        /// Replays an old delta (duplicate or reordered delivery).
        Replay {
            idx: usize,
            to: usize,
        },
    }

    fn op(n: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..n, 1u64..5).prop_map(|(replica, n)| Op::Inc { replica, n }),
            (0..n, 1u64..3).prop_map(|(replica, n)| Op::Refund { replica, n }),
            (0..n, 0..n).prop_map(|(from, to)| Op::Sync { from, to }),
            (0..64usize, 0..n).prop_map(|(idx, to)| Op::Replay { idx, to }),
        ]
    }

    /// The oracle's view of a delta: a fresh `crdts::PNCounter` holding the same pairs.
    fn to_oracle(chunks: &[Delta]) -> PNCounter<Actor> {
        let mut c = PNCounter::new();
        for d in chunks {
            for pd in &d.policies {
                for e in &pd.entries {
                    for &(a, p, n) in &e.counts {
                        let who = d.actors[usize::from(a)].clone();
                        let mut one = PNCounter::new();
                        one.apply(one.inc_many(who.clone(), p));
                        one.apply(one.dec_many(who, n));
                        c.merge(one);
                    }
                }
            }
        }
        c
    }

    proptest! {
        /// Same answers as `crdts::PNCounter` for one (policy, key, sub-window): each replica
        /// and its oracle apply the same increments and refunds and merge the same deltas
        /// (syncs, duplicates and reorderings, into any replica); after a final full exchange
        /// every replica holds the true total of all operations.
        #[test]
        fn matches_crdts_pncounter(ops in proptest::collection::vec(op(3), 1..120)) {
            let n = 3;
            let mut ours: Vec<(UsageTable, ActorIdx)> = (0..n).map(table_for).collect();
            let mut oracle: Vec<PNCounter<Actor>> = (0..n).map(|_| PNCounter::new()).collect();
            let mut truth: i128 = 0;
            // Per (from, to): the version `to` has merged from `from`.
            let mut heard = vec![vec![0u64; n]; n];
            let mut sent: Vec<Vec<Delta>> = Vec::new();
            for op in ops {
                match op {
                    Op::Inc { replica, n: k } => {
                        let (t, me) = &mut ours[replica];
                        t.record(*me, 1, "k", T0, k).unwrap();
                        let o = &mut oracle[replica];
                        o.apply(o.inc_many(actor(replica), k));
                        truth += i128::from(k);
                    }
                    Op::Refund { replica, n: k } => {
                        let (t, me) = &mut ours[replica];
                        let applied = t.refund(*me, 1, "k", T0, T0, k).unwrap();
                        if applied > 0 {
                            let o = &mut oracle[replica];
                            o.apply(o.dec_many(actor(replica), applied));
                        }
                        truth -= i128::from(applied);
                    }
                    Op::Sync { from, to } => {
                        if from == to { continue; }
                        let chunks = ours[from].0.deltas_since(heard[from][to], 1, T0);
                        for c in &chunks {
                            ours[to].0.merge_delta(c, T0);
                        }
                        heard[from][to] = chunks[0].to_version;
                        oracle[to].merge(to_oracle(&chunks));
                        sent.push(chunks);
                    }
                    Op::Replay { idx, to } => {
                        if sent.is_empty() { continue; }
                        let chunks = &sent[idx % sent.len()];
                        for c in chunks.iter().rev() {
                            ours[to].0.merge_delta(c, T0);
                        }
                        oracle[to].merge(to_oracle(chunks));
                    }
                }
                for (i, (t, _)) in ours.iter().enumerate() {
                    prop_assert_eq!(BigValue(t.net(1, "k", T0)), BigValue::of(&oracle[i]));
                }
            }
            // Anti-entropy: everyone sends its full state to everyone.
            for from in 0..n {
                let chunks = ours[from].0.full_state_chunks(2, T0);
                for to in 0..n {
                    for c in &chunks {
                        ours[to].0.merge_delta(c, T0);
                    }
                    oracle[to].merge(to_oracle(&chunks));
                }
            }
            let d0 = ours[0].0.digest(T0);
            for (i, (t, _)) in ours.iter().enumerate() {
                prop_assert_eq!(BigValue(t.net(1, "k", T0)), BigValue::of(&oracle[i]));
                prop_assert_eq!(t.net(1, "k", T0), truth);
                prop_assert_eq!(t.digest(T0), d0);
            }
        }

        /// Merge laws on whole tables: any delivery order of the same deltas, with duplicates,
        /// gives the same counts and digest; losses are repaired by a full-state merge.
        #[test]
        fn merge_is_commutative_associative_idempotent(
            writes in proptest::collection::vec((0usize..3, 0usize..4, 0u64..30, 1u64..4, any::<bool>()), 1..60),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
            lose in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let n = 3;
            let mut src: Vec<(UsageTable, ActorIdx)> = (0..n).map(table_for).collect();
            let mut deltas = Vec::new();
            let mut last = vec![0u64; n];
            for (r, key, dt, k, refund) in writes {
                let now = T0 + dt * SEC / 3;
                let (t, me) = &mut src[r];
                let key = format!("key{key}");
                if refund {
                    t.refund(*me, 1, &key, now, now, k).unwrap();
                } else {
                    t.record(*me, 1, &key, now, k).unwrap();
                }
                t.record(*me, 2, &key, now, 1).unwrap();
                deltas.extend(t.deltas_since(last[r], 3, T0 + 10 * SEC));
                last[r] = t.version();
            }
            let now = T0 + 10 * SEC;
            // Replica A: in production order. Replica B: shuffled with duplicates.
            let (mut a, _) = table_for(3);
            for d in &deltas {
                a.merge_delta(d, now);
            }
            let (mut b, _) = table_for(3);
            for idx in &order {
                b.merge_delta(&deltas[idx.index(deltas.len())], now);
            }
            for d in deltas.iter().rev() {
                b.merge_delta(d, now);
            }
            // Replica C: loses some deltas, then anti-entropy from every source.
            let (mut c, _) = table_for(3);
            for (i, d) in deltas.iter().enumerate() {
                if !lose[i % lose.len()] {
                    c.merge_delta(d, now);
                }
            }
            for (t, _) in &src {
                for chunk in t.full_state_chunks(4, now) {
                    c.merge_delta(&chunk, now);
                }
            }
            // The sources merged into one table (associativity: merge of merges).
            let (mut all, _) = table_for(3);
            for (t, _) in &src {
                let mut copy = all.clone();
                for chunk in t.full_state_chunks(1000, now) {
                    copy.merge_delta(&chunk, now);
                }
                all = copy;
            }
            for t in [&b, &c, &all] {
                prop_assert_eq!(t.digest(now), a.digest(now));
                for key in 0..4 {
                    let key = format!("key{key}");
                    for p in [1, 2] {
                        prop_assert_eq!(t.net(p, &key, now), a.net(p, &key, now));
                        let expect: i128 = src.iter().map(|(s, me)| i128::from(s.own_count(*me, p, &key, now))).sum();
                        prop_assert_eq!(t.net(p, &key, now), expect);
                    }
                }
            }
            // Idempotence: merging everything again changes nothing.
            let before = (a.digest(now), a.version());
            for d in &deltas {
                prop_assert_eq!(a.merge_delta(d, now).cells_changed, 0);
            }
            prop_assert_eq!((a.digest(now), a.version()), before);
        }
    }

    /// Compares our i128 with the oracle's BigInt through their decimal strings.
    #[derive(Debug, PartialEq, Eq)]
    struct BigValue(i128);

    impl BigValue {
        fn of(c: &PNCounter<Actor>) -> Self {
            Self(c.read().to_string().parse().unwrap())
        }
    }

    fn build(keys: usize, actors: usize) -> (UsageTable, Vec<ActorIdx>) {
        build_in_order(keys, actors, 1)
    }

    /// Keys inserted in the order `k · stride mod keys` (a permutation when coprime): sorted
    /// insertion leaves B-tree nodes about half full, arrival order in production is random.
    fn build_in_order(keys: usize, actors: usize, stride: usize) -> (UsageTable, Vec<ActorIdx>) {
        let mut t = UsageTable::new([(1, spec())]);
        let ids: Vec<ActorIdx> = (0..actors).map(|i| t.intern(&actor(i)).unwrap()).collect();
        for k in (0..keys).map(|i| i * stride % keys) {
            let key = format!("client-{k:06}");
            for &a in &ids {
                t.record(a, 1, &key, T0, 1 + (k % 7) as u64).unwrap();
            }
        }
        (t, ids)
    }

    /// Bytes per active key by capacity accounting, and the bincode size of a delta of changed
    /// keys. Budget: ≤ 200 bytes of memory per key (3 actors, one sub-window) and ≤ 32 bytes
    /// of gossip per changed key once the per-delta actor table is amortized.
    #[test]
    fn memory_and_delta_size_budgets() {
        let (mut t, ids) = build(10_000, 3);
        let per_key = t.memory_bytes() / t.key_count();
        assert!(per_key <= 200, "{per_key} bytes per key");
        let v = t.version();
        for k in (0..10_000).step_by(10) {
            t.record(ids[0], 1, &format!("client-{k:06}"), T0 + SEC / 2, 1)
                .unwrap();
        }
        let chunks = t.deltas_since(v, 1_000, T0 + SEC / 2);
        assert_eq!((chunks.len(), chunks[0].entry_count()), (1, 1_000));
        let bytes = bincode::serde::encode_to_vec(&chunks[0], bincode::config::standard()).unwrap();
        let per_changed = bytes.len() / 1_000;
        assert!(per_changed <= 32, "{per_changed} bytes per changed key");
        let (back, _): (Delta, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, chunks[0]);
    }

    /// `cargo test --release --lib crdt::usage::tests::report_sizes -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn report_sizes() {
        let rss = || -> usize {
            let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
            let pages: usize = s
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            pages * 4096
        };
        let before = rss();
        let (mut t, ids) = build(100_000, 3);
        let after = rss();
        println!(
            "100000 keys x 3 actors, 1 sub-window, sorted inserts: {} B/key by capacity, {} B/key by RSS",
            t.memory_bytes() / t.key_count(),
            (after - before) / t.key_count()
        );
        let before = rss();
        let (shuffled, _) = build_in_order(100_000, 3, 7_919);
        let after = rss();
        println!(
            "100000 keys x 3 actors, 1 sub-window, shuffled inserts: {} B/key by RSS",
            (after - before) / shuffled.key_count()
        );
        // Same keys, each actor admitting in every one of the 10 sub-windows of a window.
        let (mut spread, sids) = build(10_000, 3);
        for s in 1..10 {
            for k in 0..10_000 {
                for &a in &sids {
                    spread
                        .record(a, 1, &format!("client-{k:06}"), T0 + s * SEC, 1)
                        .unwrap();
                }
            }
        }
        println!(
            "10000 keys x 3 actors x 10 sub-windows: {} B/key by capacity",
            spread.memory_bytes() / spread.key_count()
        );
        for (changed_actors, label) in [(1usize, "1 actor"), (3, "3 actors")] {
            let v = t.version();
            for k in 0..1_000 {
                for &a in &ids[..changed_actors] {
                    t.record(a, 1, &format!("client-{k:06}"), T0 + SEC / 2, 1)
                        .unwrap();
                }
            }
            let chunks = t.deltas_since(v, 1_000, T0 + SEC / 2);
            let bytes =
                bincode::serde::encode_to_vec(&chunks[0], bincode::config::standard()).unwrap();
            println!(
                "delta of 1000 changed keys ({label} changed each): {} bytes, {} B/changed key",
                bytes.len(),
                bytes.len() / 1_000
            );
        }
    }
}
