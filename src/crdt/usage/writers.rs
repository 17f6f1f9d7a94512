//! Who may write which cells: what a peer's delta must pass before it is merged.
//!
//! Authenticated is not honest. A delta arrives on the connection of one configured peer
//! (the *sender*), and each of its counts names an actor and claims `(P, N)` for it. A count
//! is judged by what its author could honestly have claimed:
//!
//! - Only actors of configured slots write, and never our own actor: our counts are ours
//!   alone, a peer echoing them back could only raise or refund what we did not do.
//! - An incarnation is its process's start time, on the clock `now_us` comes from: one more
//!   than [`MAX_INCARNATION_SKEW_US`] in our future cannot exist yet, nor can incarnation 0.
//! - `P` per `(actor, sub-window)` is at most the policy's quota (an honest actor never
//!   admits more in one sub-window, refunds included: see `EventualNode::try_admit`), and
//!   `N ≤ P`. A count beyond is *clamped* to the nearest honest claim rather than refused:
//!   clamping `P` keeps as much of what the author says it admitted as it could have admitted
//!   (erring towards counting), and `N` clamped to `P` is "refunded everything", which the
//!   author could have said.
//!
//! # First-hand and relayed counts
//!
//! A count for the sender's own actor is *first-hand*; a count for any other actor is
//! *relayed* (the sender heard it from that actor or from another relay). Max-merge means
//! nobody can lower a `P` or an `N`, so a liar can do two things with a relayed count: raise
//! `P` (we over-count: false refusals, bounded by the quota per actor and sub-window, which
//! is no more than the sender could cause with counts of its own actor) or raise `N` (we
//! under-count: it unblocks the key, the one thing that makes honest gateways over-admit).
//! So a relayed `P` is believed (within the bound) and a relayed `N` never: an actor's `N`
//! comes only from its own connection. Then what we count of an honest actor is always at
//! least what it truly has live, whoever relays it. The price: a refund that reaches us only
//! through relays is not applied until its author's own connection delivers it (its full
//! state on the next connection does); until then the key counts the refunded admission,
//! which errs on refusing, and digests disagree, which anti-entropy retries at its own pace.
//!
//! # Bounded incarnations
//!
//! Every actor costs a table entry, and cells name actors, so a relay inventing incarnations
//! could fill the actor table (genuine new incarnations then refused: an under-count). Each
//! relay may make us name at most [`MAX_RELAYED_INCARNATIONS`] incarnations per slot that
//! never reached us first-hand; past it, its new relayed incarnations are refused (only the
//! ones it introduces: an honest relay's or the actor's own are counted against their own
//! budgets, so a liar cannot crowd out genuine incarnations). An actor without cells is
//! forgotten by GC (or when its relay's budget is full), so budgets and the actor table
//! return to what the live state needs.

use super::super::actor::{Actor, ActorIdx, ActorTable, ActorTableError, Slot};

/// How far in the future (of our `now_us`) a peer's incarnation may lie: incarnations are
/// process start times in microseconds, and clocks of a deployment agree to well within a
/// minute (eventual mode needs far better anyway; see `crdt::eventual`).
pub const MAX_INCARNATION_SKEW_US: u64 = 60_000_000;

/// Most incarnations of one slot that one relay may make us hold without their reaching us
/// first-hand: the current one and a few retired ones whose admissions are still live.
pub const MAX_RELAYED_INCARNATIONS: usize = 4;

/// What the table knows of an actor it names, by [`ActorIdx`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ActorMeta {
    /// The index of its slot in the configured list (`u16::MAX` in a table that takes anyone).
    pub slot: u16,
    /// The slot of the peer whose delta made us name it (`u16::MAX`: ourselves or trusted).
    pub introducer: u16,
    /// It reached us first-hand at least once: not only a relay's claim.
    pub first_hand: bool,
    /// Named by the owner ([`super::UsageTable::intern`]): never released.
    pub pinned: bool,
    /// How many cells name it; at zero (and unpinned) it may be released.
    pub cells: u32,
}

/// Who may write cells in a table.
#[derive(Debug, Clone)]
pub(super) enum Mode {
    /// Any well-formed actor: a table fed only trusted input (tests, benchmarks, tools).
    Anyone,
    /// A deployment: the configured slots, and our own actor that no peer may write.
    Configured {
        /// The configured slot list, in the shared order.
        slots: Vec<Slot>,
        /// Our own actor.
        me: ActorIdx,
    },
}

/// Where a delta comes from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source<'a> {
    /// The caller vouches for every count (first-hand for all).
    Trusted,
    /// A peer's connection: `actor` is its authenticated current actor.
    Peer {
        /// The sender.
        actor: &'a Actor,
        /// The sender's slot index (`u16::MAX` in a table that takes anyone).
        slot: u16,
    },
}

impl Source<'_> {
    /// Whether a count for `who` is the sender's own.
    pub(super) fn is_first_hand(&self, who: &Actor) -> bool {
        match self {
            Source::Trusted => true,
            Source::Peer { actor, .. } => *actor == who,
        }
    }
}

/// Why a count's actor was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Our own actor.
    OwnActor,
    /// Not an actor of a configured slot.
    Foreign,
    /// Incarnation 0 or too far in the future.
    BadIncarnation,
    /// The relay's budget of incarnations for that slot is used up.
    TooManyIncarnations,
    /// The actor table refused it (full, or names too long).
    Table,
}

/// The actor table with what the table knows of each actor and who may write.
#[derive(Debug, Clone)]
pub(super) struct Writers {
    pub actors: ActorTable,
    pub meta: Vec<ActorMeta>,
    pub mode: Mode,
}

impl Writers {
    pub(super) fn anyone() -> Self {
        Self {
            actors: ActorTable::new(),
            meta: Vec::new(),
            mode: Mode::Anyone,
        }
    }

    /// The configured slot index of `who` (`u16::MAX` when anyone may write), or `None`.
    pub(super) fn slot_of(&self, who: &Actor) -> Option<u16> {
        match &self.mode {
            Mode::Anyone => Some(u16::MAX),
            Mode::Configured { slots, .. } => slots
                .iter()
                .position(|s| s.region == who.region && s.instance == who.instance)
                .and_then(|i| u16::try_from(i).ok()),
        }
    }

    /// Names `who` with `meta` if new; returns its index.
    fn name(&mut self, who: &Actor, meta: ActorMeta) -> Result<ActorIdx, ActorTableError> {
        if let Some(idx) = self.actors.get(who) {
            return Ok(idx);
        }
        let idx = self.actors.intern(who)?;
        let i = usize::from(idx.0);
        if self.meta.len() <= i {
            self.meta.resize(i + 1, ActorMeta::default());
        }
        self.meta[i] = meta;
        Ok(idx)
    }

    /// Names `who` for the owner (pinned: never released).
    pub(super) fn intern_pinned(&mut self, who: &Actor) -> Result<ActorIdx, ActorTableError> {
        let slot = self.slot_of(who).unwrap_or(u16::MAX);
        let idx = self.name(
            who,
            ActorMeta {
                slot,
                introducer: u16::MAX,
                first_hand: true,
                pinned: true,
                cells: 0,
            },
        )?;
        self.meta[usize::from(idx.0)].pinned = true;
        Ok(idx)
    }

    /// The index for a count of `who` from `source`, naming it if it passes the checks (see
    /// the module docs). Actors released to make room are appended to `released`.
    pub(super) fn resolve(
        &mut self,
        who: &Actor,
        source: Source<'_>,
        now_us: u64,
        released: &mut Vec<ActorIdx>,
    ) -> Result<ActorIdx, Refusal> {
        let first_hand = source.is_first_hand(who);
        let introducer = match source {
            Source::Trusted => u16::MAX,
            Source::Peer { slot, .. } => slot,
        };
        let slot = match &self.mode {
            Mode::Anyone => u16::MAX,
            Mode::Configured { me, .. } => {
                if self.actors.actor(*me) == Some(who) {
                    return Err(Refusal::OwnActor);
                }
                let slot = self.slot_of(who).ok_or(Refusal::Foreign)?;
                if who.incarnation == 0
                    || who.incarnation > now_us.saturating_add(MAX_INCARNATION_SKEW_US)
                {
                    return Err(Refusal::BadIncarnation);
                }
                slot
            }
        };
        if let Some(idx) = self.actors.get(who) {
            if first_hand && let Some(m) = self.meta.get_mut(usize::from(idx.0)) {
                // Its own word now: it no longer counts against the relay that introduced it.
                m.first_hand = true;
                m.introducer = introducer;
            }
            return Ok(idx);
        }
        if !first_hand && slot != u16::MAX {
            let budget_of =
                |m: &ActorMeta| m.slot == slot && m.introducer == introducer && !m.first_hand;
            if self.count_named(budget_of) >= MAX_RELAYED_INCARNATIONS {
                self.release_idle(budget_of, released);
                if self.count_named(budget_of) >= MAX_RELAYED_INCARNATIONS {
                    return Err(Refusal::TooManyIncarnations);
                }
            }
        }
        self.name(
            who,
            ActorMeta {
                slot,
                introducer,
                first_hand,
                pinned: false,
                cells: 0,
            },
        )
        .map_err(|_| Refusal::Table)
    }

    fn count_named(&self, pick: impl Fn(&ActorMeta) -> bool) -> usize {
        self.actors
            .iter()
            .filter(|(idx, _)| self.meta.get(usize::from(idx.0)).is_some_and(&pick))
            .count()
    }

    /// Releases every unpinned actor without cells for which `pick` holds.
    pub(super) fn release_idle(
        &mut self,
        pick: impl Fn(&ActorMeta) -> bool,
        released: &mut Vec<ActorIdx>,
    ) {
        let idle: Vec<ActorIdx> = self
            .actors
            .iter()
            .map(|(idx, _)| idx)
            .filter(|idx| {
                self.meta
                    .get(usize::from(idx.0))
                    .is_some_and(|m| !m.pinned && m.cells == 0 && pick(m))
            })
            .collect();
        for idx in idle {
            self.actors.release(idx);
            self.meta[usize::from(idx.0)] = ActorMeta::default();
            released.push(idx);
        }
    }

    /// One more cell names `idx`.
    pub(super) fn add_cell(&mut self, idx: ActorIdx) {
        if let Some(m) = self.meta.get_mut(usize::from(idx.0)) {
            m.cells = m.cells.saturating_add(1);
        }
    }

    /// One cell fewer names `idx`.
    pub(super) fn drop_cell(&mut self, idx: ActorIdx) {
        if let Some(m) = self.meta.get_mut(usize::from(idx.0)) {
            m.cells = m.cells.saturating_sub(1);
        }
    }

    pub(super) fn memory_bytes(&self) -> usize {
        let slots = match &self.mode {
            Mode::Anyone => 0,
            Mode::Configured { slots, .. } => slots
                .iter()
                .map(|s| size_of::<Slot>() + s.region.capacity() + s.instance.capacity())
                .sum(),
        };
        self.actors.memory_bytes() + self.meta.capacity() * size_of::<ActorMeta>() + slots
    }
}
