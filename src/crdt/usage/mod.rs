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
//! Peers are not trusted: [`UsageTable::merge_from`] judges every count of a peer's delta by
//! what its author could honestly have claimed (configured slots only, never our own actor,
//! `P` within the quota, `N ≤ P`, refunds only first-hand, a bounded number of incarnations
//! per relay; see [`writers`]). [`UsageTable::merge_delta`] is the trusted merge for input
//! the caller vouches for.
//!
//! Memory: GC drops what no clock can count any more, and at the key cap the table evicts
//! (see [`evict`]) instead of refusing new clients.
//!
//! Pure and deterministic: `BTreeMap`s everywhere, no clock (every function takes `now_us`),
//! no `RandomState`.

mod delta;
pub mod evict;
pub mod writers;

use std::collections::BTreeMap;

use thiserror::Error;

use self::delta::ChunkBuilder;
pub use self::delta::{Delta, DeltaEntry, PolicyDelta};
use self::evict::Eviction;
pub use self::evict::EvictionReport;
pub use self::writers::{MAX_INCARNATION_SKEW_US, MAX_RELAYED_INCARNATIONS};
use self::writers::{Mode, Refusal, Source, Writers};
use super::actor::{Actor, ActorIdx, ActorTable, ActorTableError, Slot};
use super::hash::{Fnv64, mix};
use super::window::WindowSpec;

/// A policy's identifier, as numbered by the configuration.
pub type PolicyId = u32;

/// A registered eventual-mode policy: its window and its deployment-wide quota. The quota
/// bounds what any actor can honestly have admitted in one sub-window, which is what merges
/// check peers' counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventualPolicy {
    /// Admissions allowed per window, summed over all actors.
    pub quota: u64,
    /// The sliding window.
    pub spec: WindowSpec,
    /// Thousandths of a key's limit that this actor admits per window whatever its peers
    /// report (0: none). The table only carries it; the admission rule reads it (see
    /// [`crate::crdt::eventual`], "The local reserve").
    pub reserve_permille: u16,
}

impl EventualPolicy {
    /// A policy of `quota` per window, without a local reserve.
    pub fn new(quota: u64, spec: WindowSpec) -> Self {
        Self {
            quota,
            spec,
            reserve_permille: 0,
        }
    }

    /// A policy whose counts are not bounded (for tables fed only trusted input).
    pub fn unbounded(spec: WindowSpec) -> Self {
        Self::new(u64::MAX, spec)
    }
}

/// Bounds on what peers can make a table hold, so a malformed or hostile delta cannot
/// allocate without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageLimits {
    /// Most distinct `(policy, key)` pairs held at once. At the cap the table evicts (see
    /// [`evict`]): released keys for anyone, the soonest-released live key for a local
    /// admission; a peer's new key that finds only live keys is refused and counted.
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
    /// No room for a key (only with a key cap of 0: otherwise the table evicts).
    #[error("usage table is full")]
    TableFull,
    /// Recording would take an actor's admissions in one sub-window past the policy's quota
    /// (peers would clamp such a count: no honest actor can have admitted that much).
    #[error("over the policy's quota in one sub-window")]
    OverQuota,
    /// Our actor is not one of the configured slots.
    #[error("our actor is not in the slot list")]
    NotASlot,
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
    fn prune(&mut self, horizon: u64, writers: &mut Writers) -> usize {
        let base = self.base_sub;
        let keep = self
            .cells
            .iter()
            .filter(|c| base + u64::from(c.sub_off) >= horizon)
            .count();
        let dropped = self.cells.len() - keep;
        if dropped > 0 {
            let mut cells = std::mem::take(&mut self.cells).into_vec();
            cells.retain(|c| {
                let keep = base + u64::from(c.sub_off) >= horizon;
                if !keep {
                    writers.drop_cell(c.actor);
                }
                keep
            });
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
    fn cell_mut(&mut self, off: u32, actor: ActorIdx, writers: &mut Writers) -> &mut Cell {
        let pos = self
            .cells
            .binary_search_by(|c| (c.sub_off, c.actor).cmp(&(off, actor)));
        let i = match pos {
            Ok(i) => i,
            Err(i) => {
                writers.add_cell(actor);
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
    policy: EventualPolicy,
    keys: BTreeMap<Box<str>, KeyUsage>,
}

/// Sliding usage for every `(policy, key)` this gateway has seen, from every actor.
///
/// See the module docs for the model. Memory is bounded by [`UsageTable::gc`], which drops
/// sub-windows more than two windows old, keys left empty and actors without cells, and by
/// [`UsageLimits`] (eviction at the key cap).
#[derive(Debug, Clone)]
pub struct UsageTable {
    writers: Writers,
    policies: BTreeMap<PolicyId, PolicyUsage>,
    version: u64,
    key_count: usize,
    limits: UsageLimits,
    eviction: Eviction,
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
    /// Entries or counts refused for size: key too long, table full of live keys, actor
    /// table full or malformed actor names.
    pub refused: u64,
    /// Counts for our own actor (nobody else writes ours).
    pub own_actor: u64,
    /// Counts for actors of slots that are not configured, or from a sender that is not.
    pub foreign_actor: u64,
    /// Counts for incarnation 0 or one more than [`MAX_INCARNATION_SKEW_US`] ahead.
    pub bad_incarnation: u64,
    /// Counts for a new incarnation past the sender's [`MAX_RELAYED_INCARNATIONS`] budget.
    pub too_many_incarnations: u64,
    /// Counts clamped to an honest claim: `P` above the quota or `N` above `P`.
    pub clamped: u64,
    /// Relayed refunds left out (refunds are believed first-hand only; normal traffic).
    pub relayed_refunds_ignored: u64,
}

impl MergeReport {
    /// Everything refused as malformed, impossible or over a limit (stale entries, clamped
    /// counts and relayed refunds are not refusals).
    pub fn refusals(&self) -> u64 {
        self.future
            + self.unknown_policy
            + self.bad_actor
            + self.refused
            + self.own_actor
            + self.foreign_actor
            + self.bad_incarnation
            + self.too_many_incarnations
    }

    /// Whether anything was refused (see [`MergeReport::refusals`]).
    pub fn has_refusals(&self) -> bool {
        self.refusals() > 0
    }
}

/// What [`UsageTable::gc`] freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Cells dropped (garbage sub-windows).
    pub cells: usize,
    /// Keys dropped (no cells left).
    pub keys: usize,
    /// Actors forgotten (no cell names them).
    pub actors: usize,
}

impl UsageTable {
    /// An empty table counting the given policies, with default [`UsageLimits`], that takes
    /// counts of any actor and does not bound them: for input the caller trusts (tests,
    /// benchmarks, tools). A gateway uses [`UsageTable::for_deployment`].
    pub fn new(policies: impl IntoIterator<Item = (PolicyId, WindowSpec)>) -> Self {
        Self::with_limits(policies, UsageLimits::default())
    }

    /// [`UsageTable::new`] with explicit limits.
    pub fn with_limits(
        policies: impl IntoIterator<Item = (PolicyId, WindowSpec)>,
        limits: UsageLimits,
    ) -> Self {
        let mut t = Self::empty(Writers::anyone(), limits);
        for (id, spec) in policies {
            t.add_policy(id, EventualPolicy::unbounded(spec));
        }
        t
    }

    /// A gateway's table: `me` is one of the configured `slots` (the shared list), and
    /// [`UsageTable::merge_from`] checks peers' counts against the slots and each policy's
    /// quota. Returns the table and our own index in it.
    pub fn for_deployment(
        me: &Actor,
        slots: Vec<Slot>,
        policies: impl IntoIterator<Item = (PolicyId, EventualPolicy)>,
        limits: UsageLimits,
    ) -> Result<(Self, ActorIdx), UsageError> {
        if !slots.contains(&me.slot()) {
            return Err(UsageError::NotASlot);
        }
        let mut writers = Writers::anyone();
        writers.mode = Mode::Configured {
            slots,
            me: ActorIdx(0),
        };
        let idx = writers.intern_pinned(me)?;
        if let Mode::Configured { me, .. } = &mut writers.mode {
            *me = idx;
        }
        let mut t = Self::empty(writers, limits);
        for (id, policy) in policies {
            t.add_policy(id, policy);
        }
        Ok((t, idx))
    }

    fn empty(writers: Writers, limits: UsageLimits) -> Self {
        Self {
            writers,
            policies: BTreeMap::new(),
            version: 0,
            key_count: 0,
            limits,
            eviction: Eviction::default(),
        }
    }

    /// Registers (or re-registers) a policy. Changing the window of a policy that already
    /// holds usage drops that usage: sub-window numbers of different lengths do not mix.
    pub fn add_policy(&mut self, id: PolicyId, policy: EventualPolicy) {
        if let Some(p) = self.policies.get_mut(&id) {
            if p.policy.spec == policy.spec {
                p.policy = policy;
                return;
            }
            self.key_count -= p.keys.len();
            for ku in p.keys.values() {
                for c in ku.cells.iter() {
                    self.writers.drop_cell(c.actor);
                }
            }
            self.eviction.clear();
        }
        self.policies.insert(
            id,
            PolicyUsage {
                policy,
                keys: BTreeMap::new(),
            },
        );
    }

    /// The window of a registered policy.
    pub fn spec(&self, policy: PolicyId) -> Option<WindowSpec> {
        self.policies.get(&policy).map(|p| p.policy.spec)
    }

    /// A registered policy (window and quota).
    pub fn policy(&self, policy: PolicyId) -> Option<EventualPolicy> {
        self.policies.get(&policy).map(|p| p.policy)
    }

    /// Names `actor` in this table for the owner (call once with our own actor to get
    /// `me`). Actors named here are never released by GC.
    pub fn intern(&mut self, actor: &Actor) -> Result<ActorIdx, UsageError> {
        Ok(self.writers.intern_pinned(actor)?)
    }

    /// The table's actors.
    pub fn actors(&self) -> &ActorTable {
        &self.writers.actors
    }

    /// The current version: it grows by one per changed cell, never decreases.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of `(policy, key)` pairs held.
    pub fn key_count(&self) -> usize {
        self.key_count
    }

    /// What eviction at the key cap did so far.
    pub fn evictions(&self) -> EvictionReport {
        self.eviction.report
    }

    fn check_actor(&self, me: ActorIdx) -> Result<(), UsageError> {
        if self.writers.actors.actor(me).is_some() {
            Ok(())
        } else {
            Err(UsageError::UnknownActor(me.0))
        }
    }

    /// The entry of `key`, created if absent (the caller made room). `None` cannot happen
    /// (the key is found or inserted just before), but is not worth a panic.
    fn key_entry<'a>(
        keys: &'a mut BTreeMap<Box<str>, KeyUsage>,
        key_count: &mut usize,
        key: &str,
    ) -> Option<&'a mut KeyUsage> {
        if !keys.contains_key(key) {
            *key_count += 1;
            keys.insert(key.into(), KeyUsage::default());
        }
        keys.get_mut(key)
    }

    /// Whether a new `key` of `policy` needs room made first.
    fn needs_room(&self, policy: PolicyId, key: &str) -> bool {
        self.key_count >= self.limits.max_keys
            && self
                .policies
                .get(&policy)
                .is_some_and(|p| !p.keys.contains_key(key))
    }

    /// Records `n` admissions by `me` for `(policy, key)` at `now_us`. Returns the table
    /// version stamped on the change (the unchanged version when `n == 0`). A new key at the
    /// cap evicts another (see [`evict`]). Refuses to take `me`'s admissions in one
    /// sub-window past the policy's quota ([`UsageError::OverQuota`]): peers would not
    /// believe it.
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
            .get(&policy)
            .ok_or(UsageError::UnknownPolicy(policy))?;
        if n == 0 {
            return Ok(self.version);
        }
        let EventualPolicy { quota, spec, .. } = pol.policy;
        if n > quota {
            return Err(UsageError::OverQuota);
        }
        if key.len() > self.limits.max_key_len {
            return Err(UsageError::KeyTooLong);
        }
        if self.needs_room(policy, key) && !self.make_room(now_us, true) {
            return Err(UsageError::TableFull);
        }
        let pol = self
            .policies
            .get_mut(&policy)
            .ok_or(UsageError::UnknownPolicy(policy))?;
        let ku = Self::key_entry(&mut pol.keys, &mut self.key_count, key)
            .ok_or(UsageError::TableFull)?;
        ku.prune(spec.gc_horizon(now_us), &mut self.writers);
        let Some(off) = ku.offset_of(spec.sub_window(now_us)) else {
            if ku.cells.is_empty() {
                pol.keys.remove(key);
                self.key_count -= 1;
            }
            return Err(UsageError::SubWindowOutOfRange);
        };
        // A key without our cell here has room for `n ≤ quota` (checked above).
        if ku
            .find(off, me)
            .is_some_and(|c| c.p.saturating_add(n) > quota)
        {
            return Err(UsageError::OverQuota);
        }
        self.version += 1;
        let cell = ku.cell_mut(off, me, &mut self.writers);
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
        let spec = pol.policy.spec;
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
        let oldest = pol.policy.spec.oldest_live(now_us);
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

    /// Merges a delta (or full-state chunk) the caller vouches for: every count is taken as
    /// first-hand and bounded only by the quotas. Idempotent, commutative and associative;
    /// never panics and never allocates beyond [`UsageLimits`] whatever the delta holds. A
    /// gateway merges its peers' deltas with [`UsageTable::merge_from`].
    pub fn merge_delta(&mut self, delta: &Delta, now_us: u64) -> MergeReport {
        self.merge(delta, Source::Trusted, now_us)
    }

    /// Merges a delta received on the connection of `sender` (its authenticated current
    /// actor), judging every count by what its author could honestly have claimed (see
    /// [`writers`]): refused for our own actor, unconfigured slots and impossible
    /// incarnations; `P` clamped to the quota and `N` to `P`; `N` of any actor but the
    /// sender left out. Still idempotent and commutative for any one sender; never lowers
    /// a count, so a liar can only make us over-count.
    pub fn merge_from(&mut self, delta: &Delta, sender: &Actor, now_us: u64) -> MergeReport {
        let slot = match (&self.writers.mode, self.writers.slot_of(sender)) {
            (_, None) => None,
            (Mode::Configured { me, .. }, Some(_))
                if self.writers.actors.actor(*me) == Some(sender) =>
            {
                None
            }
            (_, Some(slot)) => Some(slot),
        };
        let Some(slot) = slot else {
            return MergeReport {
                foreign_actor: delta.entry_count() as u64,
                ..MergeReport::default()
            };
        };
        self.merge(
            delta,
            Source::Peer {
                actor: sender,
                slot,
            },
            now_us,
        )
    }

    fn merge(&mut self, delta: &Delta, source: Source<'_>, now_us: u64) -> MergeReport {
        let mut report = MergeReport::default();
        // The delta's actor positions mapped to ours, resolved lazily: an actor is named here
        // only if an accepted count references it, so a delta listing thousands of unused
        // actors costs nothing. `Some(Err(_))`: refused.
        let mut remap: Vec<Option<Result<ActorIdx, Refusal>>> = vec![None; delta.actors.len()];
        let mut released = Vec::new();
        for pd in &delta.policies {
            let Some(pol) = self.policies.get(&pd.policy) else {
                report.unknown_policy += pd.entries.len() as u64;
                continue;
            };
            let EventualPolicy { quota, spec, .. } = pol.policy;
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
                if e.key.len() > self.limits.max_key_len {
                    report.refused += 1;
                    continue;
                }
                if self.needs_room(pd.policy, &e.key) && !self.make_room(now_us, false) {
                    report.refused += 1;
                    continue;
                }
                let Some(pol) = self.policies.get_mut(&pd.policy) else {
                    continue;
                };
                let Some(ku) = Self::key_entry(&mut pol.keys, &mut self.key_count, &e.key) else {
                    report.refused += 1;
                    continue;
                };
                ku.prune(horizon, &mut self.writers);
                let Some(off) = ku.offset_of(sub) else {
                    report.refused += 1;
                    if ku.cells.is_empty() {
                        pol.keys.remove(e.key.as_str());
                        self.key_count -= 1;
                    }
                    continue;
                };
                for &(a, p, n) in &e.counts {
                    let Some(who) = delta.actors.get(usize::from(a)) else {
                        report.bad_actor += 1;
                        continue;
                    };
                    // The nearest honest claim: P within the quota, N within P, and N only
                    // from its own author (a relayed refund could unblock a key).
                    let first_hand = source.is_first_hand(who);
                    let p_ok = p.min(quota);
                    let n_ok = if first_hand { n.min(p_ok) } else { 0 };
                    if p > quota || (first_hand && n > p_ok) {
                        report.clamped += 1;
                    }
                    let resolved = *remap[usize::from(a)].get_or_insert_with(|| {
                        self.writers.resolve(who, source, now_us, &mut released)
                    });
                    if !released.is_empty() {
                        // Released indices may be handed out again: forget what named them.
                        for r in remap.iter_mut() {
                            if matches!(r, Some(Ok(idx)) if released.contains(idx)) {
                                *r = None;
                            }
                        }
                        released.clear();
                    }
                    let actor = match resolved {
                        Ok(actor) => actor,
                        Err(why) => {
                            match why {
                                Refusal::OwnActor => report.own_actor += 1,
                                Refusal::Foreign => report.foreign_actor += 1,
                                Refusal::BadIncarnation => report.bad_incarnation += 1,
                                Refusal::TooManyIncarnations => report.too_many_incarnations += 1,
                                Refusal::Table => report.refused += 1,
                            }
                            continue;
                        }
                    };
                    if p_ok == 0 && n_ok == 0 {
                        // Nothing believable left: no cell (an actor named for nothing is
                        // released by GC or when its relay's budget is needed).
                        if n > 0 {
                            report.relayed_refunds_ignored += 1;
                        }
                        continue;
                    }
                    let cell = ku.cell_mut(off, actor, &mut self.writers);
                    if !first_hand && n > cell.n {
                        report.relayed_refunds_ignored += 1;
                    }
                    if p_ok > cell.p || n_ok > cell.n {
                        cell.p = cell.p.max(p_ok);
                        cell.n = cell.n.max(n_ok);
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
        let actors = &self.writers.actors;
        let mut b = ChunkBuilder::new(actors.len());
        for (&policy, pol) in &self.policies {
            let horizon = pol.policy.spec.gc_horizon(now_us);
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
                        b = ChunkBuilder::new(actors.len());
                    }
                    let counts = group
                        .iter()
                        .filter(|c| wanted(c))
                        .filter_map(|c| {
                            let actor = actors.actor(c.actor)?;
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
            let oldest = pol.policy.spec.oldest_live(now_us);
            for (key, ku) in &pol.keys {
                let mut kh = Fnv64::new();
                kh.write_u64(u64::from(policy));
                kh.write_str(key);
                let kh = kh.finish();
                for c in ku.cells.iter().filter(|c| ku.sub(c) >= oldest) {
                    let mut h = Fnv64::new();
                    h.write_u64(kh);
                    h.write_u64(ku.sub(c));
                    h.write_u64(self.writers.actors.hash_of(c.actor));
                    h.write_u64(c.p);
                    h.write_u64(c.n);
                    sum = sum.wrapping_add(h.finish());
                }
            }
        }
        mix(sum)
    }

    /// Drops sub-windows more than two windows old, keys left without any, and actors no
    /// cell names any more (ours and those named by [`UsageTable::intern`] excepted): memory
    /// is bounded by the keys active in the last two windows and the actors writing them.
    pub fn gc(&mut self, now_us: u64) -> GcReport {
        let mut report = GcReport::default();
        let writers = &mut self.writers;
        for pol in self.policies.values_mut() {
            let horizon = pol.policy.spec.gc_horizon(now_us);
            pol.keys.retain(|_, ku| {
                report.cells += ku.prune(horizon, writers);
                let keep = !ku.cells.is_empty();
                if !keep {
                    report.keys += 1;
                }
                keep
            });
        }
        self.key_count -= report.keys;
        let mut released = Vec::new();
        self.writers.release_idle(|_| true, &mut released);
        report.actors = released.len();
        // Candidates are hints for a full table; after GC they may be gone, and they hold
        // copies of keys.
        self.eviction.clear();
        report
    }

    /// Approximate heap bytes held, by capacity accounting: per key its map slot (key and
    /// value, plus the `BTreeMap` node slack, counted as half again), its key bytes and its
    /// cells' capacity; plus the actor table and eviction candidates. Allocator headers are
    /// not counted.
    pub fn memory_bytes(&self) -> usize {
        let slot = size_of::<Box<str>>() + size_of::<KeyUsage>();
        let mut total = self.writers.memory_bytes() + self.eviction.memory_bytes();
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

pub(super) fn clamp(v: i128) -> u64 {
    u64::try_from(v.max(0)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
