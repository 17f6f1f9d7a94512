//! Strict mode: a bounded counter (escrow) per `(policy, key)`.
//!
//! The quota `q` of a key is split into *rights* among a fixed, ordered list of slots from the
//! configuration: `q / n` each, the first `q mod n` slots one more (100 over 3: 34/33/33).
//! A slot admits a request of cost `c` only if it holds `c` unused rights, and then records
//! the consumption in its own sub-window. Consumed rights come back to the slot when the
//! sub-window expires by the slot's *own* clock (the sliding rule of [`super::window`]): no
//! shared clock, so clock offsets between regions cannot over-admit.
//!
//! A slot with idle rights gives some to a slot that asks ([`Ask`] → [`Transfer`]). Each
//! ordered pair `(giver, receiver)` has one grow-only column, [`Col`], written only by the
//! giver: the cumulative rights it gave. The giver raises its column *before* the `Transfer`
//! leaves, and the message carries the cumulative value, which the receiver merges by maximum:
//! a lost transfer is repaired by any later one, and a duplicated or replayed one changes
//! nothing, so transfers neither create nor destroy rights.
//!
//! Rights of slot `i`, once it has *reclaimed* its share (below):
//!
//! ```text
//! available_i = share_i + Σ_x recv_i[x].total − Σ_y given_i[y].total − live_consumed_i(now_i)
//! ```
//!
//! # Restarts
//!
//! A new incarnation of a slot knows nothing of its predecessor: the predecessor may have
//! admitted requests, given rights away and accepted rights up to its last moment, and some of
//! its transfers may still be in flight. So it starts with **no usable rights of its own** and
//! serves only with rights given to *it* after it started: pre-reclaim, only columns
//! addressed to its incarnation count, and only for the part given after the giver addressed
//! it (`Col::to_inc`, `Col::base`). It reclaims the slot's whole standing
//! (`share + Σ recv − Σ given`) once **all** of these hold:
//!
//! 1. one window plus one sub-window (of the longest strict policy) has passed since it
//!    started, by its own clock: everything its predecessor admitted has expired;
//! 2. every other slot's current incarnation has sent it a complete *handover* ([`Handover`])
//!    after learning of it, in which it lists, per key, what it received from this slot (so
//!    the new incarnation subtracts its predecessor's gifts: `given ⊒ their recv`) and what it
//!    gave this slot;
//! 3. each of those handovers is *settled*: sent once the sender's own predecessors'
//!    admissions have expired (the sender is itself past step 1). A predecessor of the sender
//!    may have accepted, and consumed, rights from our predecessor that the sender never
//!    heard of; once they expire those rights are free again, and we may take them back.
//!
//! Every node rejects anything authored by an incarnation older than the newest it knows for
//! that slot, so once a peer has handed over to us, our predecessor's late or replayed
//! transfers can no longer raise its counts: what we subtracted stays an upper bound of what
//! it holds from us. A node that learns of a newer incarnation of its *own* slot is a zombie
//! and stops admitting and giving.
//!
//! Why a new incarnation must refuse, before it reclaims, columns addressed to an older
//! incarnation of itself: such a column can come from a dead giver whose successor already
//! reclaimed against our *predecessor's* handover; if we accepted it now we would count
//! rights that the giver's successor also counts. After we reclaim we know every slot's
//! current incarnation (from its handover), so anything we accept is authored by a live
//! giver that subtracted it.
//!
//! Waiting for every peer is the CP price: a new incarnation (including every node of a cold
//! start) cannot use its share while any peer is unreachable; it can still serve with rights
//! that reachable, reclaimed peers give it.
//!
//! # Giving policy
//!
//! The giver decides: asked for `want`, it gives `min(want, available / 2)`, keeping at least
//! half of its idle rights for its own traffic. A node gives only once reclaimed (before that
//! it does not know its own books).
//!
//! Pure and deterministic: no clock (every function takes the caller's own `now_us`, which is
//! assumed to run at the same rate everywhere, with any fixed offset), `BTreeMap`s only.
//! Clock readings that go backwards are ignored (the node keeps the largest it saw), so a
//! misbehaving clock can delay releases but never hasten them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::actor::{Actor, Slot};
use super::usage::PolicyId;
use super::window::WindowSpec;

/// Longest key accepted (as in [`super::usage::UsageLimits`]).
pub const MAX_KEY_LEN: usize = 512;

/// Default bound on the keys a [`BoundedTable`] holds.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Rights given by one slot to another: the giver's grow-only column.
///
/// `total` is cumulative over the giver's incarnations and the receiver's. `to_inc` is the
/// receiver incarnation the giver addressed last, and `base` the `total` at the moment it
/// started addressing it, so that a receiver incarnation that has not reclaimed yet can count
/// exactly what was given to *it*: `total − base`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Col {
    /// Cumulative rights given.
    pub total: u64,
    /// The receiver incarnation addressed by the latest gifts (0: none yet).
    pub to_inc: u64,
    /// `total` when the giver began addressing `to_inc`.
    pub base: u64,
}

impl Col {
    /// Joins `other` into `self` (maximum of `total`, lexicographic maximum of
    /// `(to_inc, base)`): a semilattice, so merges commute and repeat harmlessly. Returns
    /// whether anything rose.
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

    fn is_zero(&self) -> bool {
        *self == Col::default()
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
    /// Keys with a non-zero exchange between the two slots.
    pub entries: Vec<HandoverEntry>,
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

/// One strict policy: its quota per window and its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrictPolicy {
    /// Admissions allowed per window, summed over all slots.
    pub quota: u64,
    /// The sliding window.
    pub spec: WindowSpec,
}

/// Why a [`BoundedTable`] could not be built or an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BoundedError {
    /// The slot list is empty, too long, or names a slot twice.
    #[error("invalid slot list")]
    Slots,
    /// Our own actor's slot is not in the slot list.
    #[error("actor {0} is not in the slot list")]
    NotASlot(String),
    /// Incarnation 0 is reserved for "unknown".
    #[error("incarnation must be at least 1")]
    Incarnation,
    /// The policy is not a strict policy of this table.
    #[error("unknown policy {0}")]
    UnknownPolicy(PolicyId),
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("key too long")]
    KeyTooLong,
    /// The table holds its maximum number of keys.
    #[error("table full")]
    TableFull,
}

/// Counts of refused peer input, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StrictStats {
    /// Messages from an incarnation older than the newest known for its slot.
    pub stale: u64,
    /// Transfers addressed to a predecessor of ours, refused before reclaiming.
    pub not_addressed: u64,
    /// Messages with a bad slot index, addressed elsewhere, or inconsistent.
    pub malformed: u64,
    /// Entries refused for an unknown policy, a long key or a full table.
    pub refused: u64,
}

/// What became of a [`Transfer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferOutcome {
    /// Merged (possibly changing nothing, for a duplicate).
    Accepted,
    /// From an incarnation older than the newest known for the giver's slot.
    Stale,
    /// Addressed to an older incarnation of our slot, and we have not reclaimed.
    NotAddressed,
    /// Addressed to a newer incarnation of our slot: we are a zombie from now on.
    Superseded,
    /// Malformed, misaddressed, or refused for size.
    Refused,
}

/// Our side of one key: our consumption and, once rights moved for it, the columns.
#[derive(Debug, Clone, Default)]
struct KeyRights {
    /// `(sub-window, rights consumed)` by our own clock, sorted.
    consumed: Vec<(u64, u64)>,
    /// Allocated on the first exchange: most keys never move rights, and two columns per
    /// slot would otherwise be most of a key's memory (measured with three slots and a
    /// million keys: 379 bytes per key with them, 167 without).
    cols: Option<Box<Columns>>,
}

/// The columns of one key, one per slot.
#[derive(Debug, Clone)]
struct Columns {
    /// `given[j]`: our column for slot `j` (we write it).
    given: Box<[Col]>,
    /// `recv[j]`: slot `j`'s column for us, as accepted.
    recv: Box<[Col]>,
}

impl KeyRights {
    /// Our column for slot `j` (zero if none).
    fn given(&self, j: usize) -> Col {
        self.given_all().get(j).copied().unwrap_or_default()
    }

    /// Slot `j`'s column for us (zero if none).
    fn recv(&self, j: usize) -> Col {
        self.recv_all().get(j).copied().unwrap_or_default()
    }

    fn given_all(&self) -> &[Col] {
        self.cols.as_deref().map_or(&[], |c| &c.given)
    }

    fn recv_all(&self) -> &[Col] {
        self.cols.as_deref().map_or(&[], |c| &c.recv)
    }

    /// The columns for `n` slots, allocated if need be. Callers index them with a slot
    /// index they checked against the slot list (`n` is its length).
    fn cols_mut(&mut self, n: usize) -> &mut Columns {
        self.cols.get_or_insert_with(|| {
            Box::new(Columns {
                given: vec![Col::default(); n].into_boxed_slice(),
                recv: vec![Col::default(); n].into_boxed_slice(),
            })
        })
    }

    fn live(&self, oldest: u64) -> u64 {
        self.consumed
            .iter()
            .filter(|(s, _)| *s >= oldest)
            .map(|(_, c)| *c)
            .fold(0, u64::saturating_add)
    }

    fn is_trivial(&self) -> bool {
        self.consumed.is_empty()
            && self.given_all().iter().all(Col::is_zero)
            && self.recv_all().iter().all(Col::is_zero)
    }
}

/// Progress through a handover from one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HandoverProgress {
    inc: u64,
    next: u32,
    chunks: u32,
    settled: bool,
}

/// How a message's author compares with what we know of its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Learn {
    Stale,
    Current,
}

/// One incarnation's strict-mode state for every `(policy, key)` (see the module docs).
#[derive(Debug, Clone)]
pub struct BoundedTable {
    slots: Vec<Slot>,
    me: u16,
    inc: u64,
    start_us: u64,
    clock_us: u64,
    /// One window plus one sub-window of the longest policy.
    wait_us: u64,
    /// Newest known incarnation per slot (0: unknown).
    incs: Vec<u64>,
    progress: Vec<Option<HandoverProgress>>,
    /// Incarnation per slot whose complete, settled handover we hold (0: none).
    done: Vec<u64>,
    reclaimed: bool,
    superseded: bool,
    /// Handed its rights back for a graceful shutdown.
    retired: bool,
    policies: BTreeMap<PolicyId, StrictPolicy>,
    keys: BTreeMap<PolicyId, BTreeMap<Box<str>, KeyRights>>,
    key_count: usize,
    max_keys: usize,
    stats: StrictStats,
}

/// Slot `i`'s initial share of `quota` over `n` slots: `quota / n`, plus one for the first
/// `quota mod n` slots.
pub fn initial_share(quota: u64, n: usize, i: usize) -> u64 {
    let n = n.max(1) as u64;
    let i = i as u64;
    quota / n + u64::from(i < quota % n)
}

impl BoundedTable {
    /// The state of `me` (whose slot must be in `slots`) started at `now_us` on its own clock.
    pub fn new(
        slots: Vec<Slot>,
        me: &Actor,
        policies: impl IntoIterator<Item = (PolicyId, StrictPolicy)>,
        now_us: u64,
    ) -> Result<Self, BoundedError> {
        if slots.is_empty() || slots.len() >= usize::from(u16::MAX) {
            return Err(BoundedError::Slots);
        }
        let mut sorted = slots.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != slots.len() {
            return Err(BoundedError::Slots);
        }
        let my_slot = me.slot();
        let idx = slots
            .iter()
            .position(|s| *s == my_slot)
            .ok_or_else(|| BoundedError::NotASlot(me.to_string()))?;
        if me.incarnation == 0 {
            return Err(BoundedError::Incarnation);
        }
        let policies: BTreeMap<PolicyId, StrictPolicy> = policies.into_iter().collect();
        let wait_us = policies
            .values()
            .map(|p| p.spec.window_us().saturating_add(p.spec.sub_len_us()))
            .max()
            .unwrap_or(0);
        let n = slots.len();
        let mut incs = vec![0; n];
        incs[idx] = me.incarnation;
        Ok(Self {
            slots,
            // Bounded above by the length check.
            me: u16::try_from(idx).map_err(|_| BoundedError::Slots)?,
            inc: me.incarnation,
            start_us: now_us,
            clock_us: now_us,
            wait_us,
            incs,
            progress: vec![None; n],
            done: vec![0; n],
            reclaimed: false,
            superseded: false,
            retired: false,
            policies,
            keys: BTreeMap::new(),
            key_count: 0,
            max_keys: DEFAULT_MAX_KEYS,
            stats: StrictStats::default(),
        })
    }

    /// Changes the bound on held keys (default [`DEFAULT_MAX_KEYS`]).
    pub fn set_max_keys(&mut self, max_keys: usize) {
        self.max_keys = max_keys;
    }

    /// The configured slots, in order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Our slot's index.
    pub fn my_slot(&self) -> u16 {
        self.me
    }

    /// Our incarnation.
    pub fn incarnation(&self) -> u64 {
        self.inc
    }

    /// Whether we hold our slot's share (see the module docs).
    pub fn is_reclaimed(&self) -> bool {
        self.reclaimed
    }

    /// Whether a newer incarnation of our slot exists: we admit and give nothing any more.
    pub fn is_superseded(&self) -> bool {
        self.superseded
    }

    /// The newest incarnation known for each slot (0: unknown).
    pub fn known_incarnations(&self) -> &[u64] {
        &self.incs
    }

    /// Refusal counters.
    pub fn stats(&self) -> StrictStats {
        self.stats
    }

    /// Number of keys held.
    pub fn key_count(&self) -> usize {
        self.key_count
    }

    /// Advances our clock (never backwards) and reclaims our share if the conditions hold.
    pub fn tick(&mut self, now_us: u64) {
        self.clock_us = self.clock_us.max(now_us);
        if self.reclaimed || self.superseded {
            return;
        }
        if !self.predecessors_expired() {
            return;
        }
        let me = usize::from(self.me);
        let all_handed_over = (0..self.slots.len())
            .all(|s| s == me || (self.incs[s] != 0 && self.done[s] == self.incs[s]));
        if all_handed_over {
            self.reclaimed = true;
        }
    }

    fn predecessors_expired(&self) -> bool {
        self.clock_us >= self.start_us.saturating_add(self.wait_us)
    }

    fn now(&self, now_us: u64) -> u64 {
        self.clock_us.max(now_us)
    }

    fn rights(&self, policy: PolicyId, key: &str) -> Option<&KeyRights> {
        self.keys.get(&policy)?.get(key)
    }

    fn rights_mut(&mut self, policy: PolicyId, key: &str) -> Result<&mut KeyRights, BoundedError> {
        if !self.policies.contains_key(&policy) {
            return Err(BoundedError::UnknownPolicy(policy));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(BoundedError::KeyTooLong);
        }
        let keys = self.keys.entry(policy).or_default();
        if !keys.contains_key(key) {
            if self.key_count >= self.max_keys {
                return Err(BoundedError::TableFull);
            }
            self.key_count += 1;
            keys.insert(key.into(), KeyRights::default());
        }
        // Present: found above or inserted just now.
        keys.get_mut(key).ok_or(BoundedError::TableFull)
    }

    /// Our live consumption of `(policy, key)` at `now_us` (our clock).
    pub fn live_consumed(&self, policy: PolicyId, key: &str, now_us: u64) -> u64 {
        let (Some(p), Some(kr)) = (self.policies.get(&policy), self.rights(policy, key)) else {
            return 0;
        };
        kr.live(p.spec.oldest_live(self.now(now_us)))
    }

    /// Rights we can use now for `(policy, key)`: 0 for an unknown policy or a zombie.
    pub fn available(&self, policy: PolicyId, key: &str, now_us: u64) -> u64 {
        let Some(p) = self.policies.get(&policy) else {
            return 0;
        };
        if self.superseded || self.retired {
            return 0;
        }
        let me = usize::from(self.me);
        let share = if self.reclaimed {
            initial_share(p.quota, self.slots.len(), me)
        } else {
            0
        };
        let Some(kr) = self.rights(policy, key) else {
            return share;
        };
        let live = kr.live(p.spec.oldest_live(self.now(now_us)));
        let held: i128 = if self.reclaimed {
            i128::from(share)
                + kr.recv_all()
                    .iter()
                    .map(|c| i128::from(c.total))
                    .sum::<i128>()
                - kr.given_all()
                    .iter()
                    .map(|c| i128::from(c.total))
                    .sum::<i128>()
        } else {
            kr.recv_all()
                .iter()
                .map(|c| i128::from(c.addressed_to(self.inc)))
                .sum()
        };
        u64::try_from((held - i128::from(live)).max(0)).unwrap_or(u64::MAX)
    }

    /// Admits `cost` on `(policy, key)` if we hold the rights, recording the consumption.
    pub fn try_admit(
        &mut self,
        policy: PolicyId,
        key: &str,
        now_us: u64,
        cost: u64,
    ) -> Result<bool, BoundedError> {
        self.tick(now_us);
        let spec = self
            .policies
            .get(&policy)
            .ok_or(BoundedError::UnknownPolicy(policy))?
            .spec;
        if cost == 0 {
            return Ok(true);
        }
        if self.available(policy, key, now_us) < cost {
            return Ok(false);
        }
        let now = self.clock_us;
        let kr = self.rights_mut(policy, key)?;
        let oldest = spec.oldest_live(now);
        kr.consumed.retain(|(s, _)| *s >= oldest);
        let sub = spec.sub_window(now);
        match kr.consumed.last_mut() {
            Some((s, c)) if *s == sub => *c = c.saturating_add(cost),
            _ => kr.consumed.push((sub, cost)),
        }
        Ok(true)
    }

    /// Our announcement (send on connect and periodically until reclaimed).
    pub fn announce(&self) -> Announce {
        Announce {
            slot: self.me,
            incarnation: self.inc,
            want_handover: !self.reclaimed,
        }
    }

    /// A request for `want` rights on `(policy, key)`.
    pub fn ask(&self, policy: PolicyId, key: &str, want: u64) -> Ask {
        Ask {
            policy,
            key: key.to_owned(),
            slot: self.me,
            incarnation: self.inc,
            want,
        }
    }

    /// Compares a message's author with the newest incarnation we know of its slot, learning
    /// a newer one. A newer incarnation of our own slot makes us a zombie.
    fn learn(&mut self, slot: u16, inc: u64) -> Learn {
        let s = usize::from(slot);
        if slot == self.me {
            if inc > self.inc {
                self.superseded = true;
            }
            return Learn::Stale;
        }
        if inc < self.incs[s] || inc == 0 {
            self.stats.stale += 1;
            return Learn::Stale;
        }
        if inc > self.incs[s] {
            self.incs[s] = inc;
            self.progress[s] = None;
        }
        Learn::Current
    }

    fn valid_peer(&self, slot: u16) -> bool {
        usize::from(slot) < self.slots.len() && slot != self.me
    }

    /// Answers an [`Ask`]: gives `min(want, available / 2)` if reclaimed and able, recording
    /// the gift in our column before returning the [`Transfer`] to send.
    pub fn on_ask(&mut self, ask: &Ask, now_us: u64) -> Option<Transfer> {
        self.tick(now_us);
        if !self.valid_peer(ask.slot) {
            self.stats.malformed += 1;
            return None;
        }
        if self.learn(ask.slot, ask.incarnation) == Learn::Stale
            || !self.reclaimed
            || self.superseded
            || self.retired
        {
            return None;
        }
        let give = ask
            .want
            .min(self.available(ask.policy, &ask.key, now_us) / 2);
        if give == 0 {
            return None;
        }
        self.give(ask.policy, &ask.key, ask.slot, ask.incarnation, give)
    }

    /// Records a gift of `amount` rights to incarnation `to_inc` of slot `to` in our column
    /// (before anything is sent, as the module docs require) and returns the transfer.
    fn give(
        &mut self,
        policy: PolicyId,
        key: &str,
        to: u16,
        to_inc: u64,
        amount: u64,
    ) -> Option<Transfer> {
        let (me, inc, n) = (self.me, self.inc, self.slots.len());
        let Ok(kr) = self.rights_mut(policy, key) else {
            self.stats.refused += 1;
            return None;
        };
        let col = &mut kr.cols_mut(n).given[usize::from(to)];
        if col.to_inc > to_inc {
            return None;
        }
        if col.to_inc < to_inc {
            col.base = col.total;
            col.to_inc = to_inc;
        }
        col.total = col.total.saturating_add(amount);
        let given = *col;
        Some(Transfer {
            policy,
            key: key.to_owned(),
            from: me,
            from_incarnation: inc,
            to,
            given,
        })
    }

    /// Gives back `cost` rights consumed at `admitted_at_us` (our clock, as passed to
    /// [`BoundedTable::try_admit`]) by a request that was then not served (another policy
    /// refused it). Returns how many came back.
    ///
    /// Safe because consumption only has to bound what was *served*: lowering it by exactly
    /// what was not served keeps it an upper bound. A refund for a sub-window already
    /// released (or never charged) finds nothing and returns 0.
    pub fn refund(
        &mut self,
        policy: PolicyId,
        key: &str,
        admitted_at_us: u64,
        cost: u64,
        now_us: u64,
    ) -> u64 {
        self.tick(now_us);
        let Some(p) = self.policies.get(&policy) else {
            return 0;
        };
        let sub = p.spec.sub_window(admitted_at_us);
        let Some(kr) = self.keys.get_mut(&policy).and_then(|k| k.get_mut(key)) else {
            return 0;
        };
        match kr.consumed.iter_mut().find(|(s, _)| *s == sub) {
            Some((_, consumed)) => {
                let back = (*consumed).min(cost);
                *consumed -= back;
                back
            }
            None => 0,
        }
    }

    /// Graceful shutdown: gives every idle right of every key we hold state for to slot `to`
    /// (its newest known incarnation), then stops admitting and giving. Returns the
    /// transfers to send. Rights whose transfer is lost are not lost: the slot's next
    /// incarnation reclaims them (the receiver's handover does not list them).
    ///
    /// Keys we never touched hold only our initial share, which our next incarnation
    /// reclaims anyway; handing those back would mean enumerating every possible key.
    pub fn retire(&mut self, to: u16, now_us: u64) -> Vec<Transfer> {
        self.tick(now_us);
        let to_inc = self.incs.get(usize::from(to)).copied().unwrap_or(0);
        if self.superseded || self.retired || !self.valid_peer(to) || to_inc == 0 {
            self.retired = true;
            return Vec::new();
        }
        let mut idle = Vec::new();
        for (&policy, keys) in &self.keys {
            for key in keys.keys() {
                let available = self.available(policy, key, now_us);
                if available > 0 {
                    idle.push((policy, key.clone(), available));
                }
            }
        }
        let transfers = idle
            .into_iter()
            .filter_map(|(policy, key, amount)| self.give(policy, &key, to, to_inc, amount))
            .collect();
        self.retired = true;
        transfers
    }

    /// Whether [`BoundedTable::retire`] was called: we admit and give nothing any more.
    pub fn is_retired(&self) -> bool {
        self.retired
    }

    /// Our current column for slot `to` on `(policy, key)` as a [`Transfer`], to resend
    /// (repairs lost transfers; idempotent). `None` if we never gave it anything.
    pub fn transfer_to(&self, policy: PolicyId, key: &str, to: u16) -> Option<Transfer> {
        if self.superseded || !self.valid_peer(to) {
            return None;
        }
        let given = self.rights(policy, key)?.given(usize::from(to));
        (!given.is_zero()).then(|| Transfer {
            policy,
            key: key.to_owned(),
            from: self.me,
            from_incarnation: self.inc,
            to,
            given,
        })
    }

    /// Merges a [`Transfer`] addressed to our slot.
    pub fn on_transfer(&mut self, t: &Transfer, now_us: u64) -> TransferOutcome {
        self.tick(now_us);
        if t.to != self.me || !self.valid_peer(t.from) || t.given.base > t.given.total {
            self.stats.malformed += 1;
            return TransferOutcome::Refused;
        }
        if t.given.to_inc > self.inc {
            self.superseded = true;
            return TransferOutcome::Superseded;
        }
        if self.learn(t.from, t.from_incarnation) == Learn::Stale {
            return TransferOutcome::Stale;
        }
        if !self.reclaimed && t.given.to_inc != self.inc {
            self.stats.not_addressed += 1;
            return TransferOutcome::NotAddressed;
        }
        let (from, n) = (usize::from(t.from), self.slots.len());
        match self.rights_mut(t.policy, &t.key) {
            Ok(kr) => {
                kr.cols_mut(n).recv[from].join(&t.given);
                TransferOutcome::Accepted
            }
            Err(_) => {
                self.stats.refused += 1;
                TransferOutcome::Refused
            }
        }
    }

    /// Handles an [`Announce`]: learns the incarnation and, if it wants one, returns our
    /// handover to it in chunks of at most `max_entries` keys.
    pub fn on_announce(&mut self, a: &Announce, now_us: u64, max_entries: usize) -> Vec<Handover> {
        self.tick(now_us);
        if usize::from(a.slot) >= self.slots.len() {
            self.stats.malformed += 1;
            return Vec::new();
        }
        if self.learn(a.slot, a.incarnation) == Learn::Stale || !a.want_handover || self.superseded
        {
            return Vec::new();
        }
        let to = usize::from(a.slot);
        let mut entries = Vec::new();
        for (&policy, keys) in &self.keys {
            for (key, kr) in keys {
                let (you_gave_me, i_gave_you) = (kr.recv(to), kr.given(to));
                if !you_gave_me.is_zero() || !i_gave_you.is_zero() {
                    entries.push(HandoverEntry {
                        policy,
                        key: key.to_string(),
                        you_gave_me,
                        i_gave_you,
                    });
                }
            }
        }
        let settled = self.predecessors_expired();
        let max_entries = max_entries.max(1);
        let mut chunks: Vec<Vec<HandoverEntry>> = Vec::new();
        let mut rest = entries.into_iter().peekable();
        loop {
            chunks.push(rest.by_ref().take(max_entries).collect());
            if rest.peek().is_none() {
                break;
            }
        }
        let n = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, entries)| Handover {
                from: self.me,
                from_incarnation: self.inc,
                to: a.slot,
                to_incarnation: a.incarnation,
                settled,
                chunk: u32::try_from(i).unwrap_or(u32::MAX),
                chunks: n,
                entries,
            })
            .collect()
    }

    /// Merges a [`Handover`] chunk addressed to us; reclaims once the conditions hold.
    pub fn on_handover(&mut self, h: &Handover, now_us: u64) {
        self.tick(now_us);
        if h.to != self.me || !self.valid_peer(h.from) || h.chunks == 0 || h.chunk >= h.chunks {
            self.stats.malformed += 1;
            return;
        }
        if h.to_incarnation != self.inc {
            if h.to_incarnation > self.inc {
                self.superseded = true;
            } else {
                self.stats.stale += 1;
            }
            return;
        }
        if self.learn(h.from, h.from_incarnation) == Learn::Stale {
            return;
        }
        let (from, n) = (usize::from(h.from), self.slots.len());
        for e in &h.entries {
            if e.you_gave_me.base > e.you_gave_me.total || e.i_gave_you.base > e.i_gave_you.total {
                self.stats.malformed += 1;
                continue;
            }
            let accept_recv = self.reclaimed || e.i_gave_you.to_inc == self.inc;
            match self.rights_mut(e.policy, &e.key) {
                Ok(kr) => {
                    let cols = kr.cols_mut(n);
                    cols.given[from].join(&e.you_gave_me);
                    if accept_recv {
                        cols.recv[from].join(&e.i_gave_you);
                    }
                }
                Err(_) => self.stats.refused += 1,
            }
        }
        let this = HandoverProgress {
            inc: h.from_incarnation,
            next: h.chunk + 1,
            chunks: h.chunks,
            settled: h.settled,
        };
        let progress = if h.chunk == 0 {
            Some(this)
        } else {
            match self.progress[from] {
                Some(p)
                    if (p.inc, p.chunks, p.settled) == (this.inc, this.chunks, this.settled)
                        && p.next == h.chunk =>
                {
                    Some(this)
                }
                other => other,
            }
        };
        self.progress[from] = progress;
        if let Some(p) = progress
            && p.next == p.chunks
        {
            self.progress[from] = None;
            if p.settled && p.inc == self.incs[from] {
                self.done[from] = p.inc;
            }
        }
        self.tick(now_us);
    }

    /// Drops expired consumption and keys left in their initial state.
    pub fn gc(&mut self, now_us: u64) {
        self.tick(now_us);
        let now = self.clock_us;
        let mut dropped = 0;
        for (policy, keys) in &mut self.keys {
            let Some(p) = self.policies.get(policy) else {
                continue;
            };
            let oldest = p.spec.oldest_live(now);
            keys.retain(|_, kr| {
                kr.consumed.retain(|(s, _)| *s >= oldest);
                let keep = !kr.is_trivial();
                if !keep {
                    dropped += 1;
                }
                keep
            });
        }
        self.keys.retain(|_, k| !k.is_empty());
        self.key_count -= dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: u64 = 10_000;

    fn spec() -> WindowSpec {
        WindowSpec::new(W, 5).unwrap()
    }

    fn slots(n: usize) -> Vec<Slot> {
        (0..n).map(|i| Slot::new(format!("r{i}"), "i0")).collect()
    }

    fn node(n: usize, i: usize, inc: u64, quota: u64, now: u64) -> BoundedTable {
        BoundedTable::new(
            slots(n),
            &slots(n)[i].actor(inc),
            [(
                1,
                StrictPolicy {
                    quota,
                    spec: spec(),
                },
            )],
            now,
        )
        .unwrap()
    }

    /// Delivers announces both ways between every pair until everyone has reclaimed.
    fn handshake(nodes: &mut [BoundedTable], now: u64) {
        let n = nodes.len();
        for a in 0..n {
            let ann = nodes[a].announce();
            for b in 0..n {
                if a != b {
                    for h in nodes[b].on_announce(&ann, now, 2) {
                        nodes[a].on_handover(&h, now);
                    }
                }
            }
        }
    }

    #[test]
    fn shares_are_split_deterministically() {
        assert_eq!(
            (0..3).map(|i| initial_share(100, 3, i)).collect::<Vec<_>>(),
            vec![34, 33, 33]
        );
        assert_eq!(initial_share(2, 3, 2), 0);
        assert_eq!(initial_share(7, 0, 0), 7);
    }

    #[test]
    fn construction_is_validated() {
        let me = slots(2)[0].actor(1);
        let pol = [(
            1,
            StrictPolicy {
                quota: 5,
                spec: spec(),
            },
        )];
        assert_eq!(
            BoundedTable::new(vec![], &me, pol, 0).unwrap_err(),
            BoundedError::Slots
        );
        let dup = vec![slots(1)[0].clone(), slots(1)[0].clone()];
        assert_eq!(
            BoundedTable::new(dup, &me, pol, 0).unwrap_err(),
            BoundedError::Slots
        );
        let stranger = Actor::new("zz", "i0", 1);
        assert!(matches!(
            BoundedTable::new(slots(2), &stranger, pol, 0),
            Err(BoundedError::NotASlot(_))
        ));
        assert_eq!(
            BoundedTable::new(slots(2), &slots(2)[0].actor(0), pol, 0).unwrap_err(),
            BoundedError::Incarnation
        );
    }

    #[test]
    fn cold_start_waits_then_reclaims_and_transfers() {
        let t0 = 1_000_000;
        let mut nodes: Vec<BoundedTable> = (0..3).map(|i| node(3, i, 1, 100, t0)).collect();
        assert!(!nodes[0].try_admit(1, "k", t0, 1).unwrap());
        // Handovers before the wait are not settled: no reclaim yet.
        handshake(&mut nodes, t0 + 10);
        assert!(!nodes[0].is_reclaimed());
        let later = t0 + W + W / 5;
        handshake(&mut nodes, later);
        assert!(nodes.iter().all(BoundedTable::is_reclaimed));
        assert_eq!(nodes[0].available(1, "k", later), 34);
        assert_eq!(nodes[2].available(1, "k", later), 33);
        for _ in 0..34 {
            assert!(nodes[0].try_admit(1, "k", later, 1).unwrap());
        }
        assert!(!nodes[0].try_admit(1, "k", later, 1).unwrap());
        // Ask slot 1 for 20: it gives half its idle rights at most.
        let ask = nodes[0].ask(1, "k", 20);
        let t = nodes[1].on_ask(&ask, later).unwrap();
        assert_eq!(t.given.total, 16);
        assert_eq!(nodes[1].available(1, "k", later), 17);
        assert_eq!(nodes[0].on_transfer(&t, later), TransferOutcome::Accepted);
        assert_eq!(nodes[0].on_transfer(&t, later), TransferOutcome::Accepted);
        assert_eq!(nodes[0].available(1, "k", later), 16);
        // Consumption returns by our own clock after w + L at most.
        let release = later + W + W / 5;
        assert_eq!(nodes[0].available(1, "k", release), 50);
        assert_eq!(nodes[0].live_consumed(1, "k", release), 0);
        nodes[0].gc(release);
        assert_eq!(nodes[0].key_count(), 1, "transfers keep the key");
        assert_eq!(nodes[1].transfer_to(1, "k", 0), Some(t));
    }

    #[test]
    fn a_restarted_slot_starts_empty_and_rejects_its_predecessor() {
        let t0 = 1_000_000;
        let ready = t0 + W + W / 5;
        let mut nodes: Vec<BoundedTable> = (0..2).map(|i| node(2, i, 1, 10, t0)).collect();
        handshake(&mut nodes, ready);
        // Slot 0 gives 2 to slot 1, but the transfer is delayed; then slot 0 restarts.
        let ask = nodes[1].ask(1, "k", 4);
        let late = nodes[0].on_ask(&ask, ready).unwrap();
        assert_eq!(late.given.total, 2);
        let mut fresh = node(2, 0, 2, 10, ready + 5);
        assert_eq!(fresh.available(1, "k", ready + 5), 0);
        // Slot 1 learns of the new incarnation and hands over (already settled).
        let hs = nodes[1].on_announce(&fresh.announce(), ready + 6, 10);
        assert_eq!(
            nodes[1].on_transfer(&late, ready + 7),
            TransferOutcome::Stale
        );
        for h in &hs {
            fresh.on_handover(h, ready + 8);
        }
        assert!(
            !fresh.is_reclaimed(),
            "must wait a window plus a sub-window"
        );
        let after = ready + 5 + W + W / 5;
        fresh.tick(after);
        assert!(fresh.is_reclaimed());
        // The lost gift of 2 was never counted by slot 1, so the slot gets its whole share.
        assert_eq!(fresh.available(1, "k", after), 5);
        assert_eq!(nodes[1].available(1, "k", after), 5);
        // The old incarnation is a zombie once it hears of its successor.
        let ann = fresh.announce();
        nodes[0].on_announce(&ann, after, 10);
        assert!(nodes[0].is_superseded());
        assert!(!nodes[0].try_admit(1, "k", after, 1).unwrap());
        assert_eq!(nodes[1].stats().stale, 1);
    }

    /// Sends `to`'s announce to `from` and delivers the handover back.
    fn hand_over(from: &mut BoundedTable, to: &mut BoundedTable, now_from: u64, now_to: u64) {
        for h in from.on_announce(&to.announce(), now_from, 10) {
            to.on_handover(&h, now_to);
        }
    }

    /// Why handovers must be *settled*: B's old incarnation consumes rights that A's old
    /// incarnation gave it, after A restarted, then dies itself. B's new incarnation knows
    /// nothing of those rights; if A's new incarnation took its share back on B's word before
    /// B's predecessor's admissions expired, both would be live at once.
    #[test]
    fn a_handover_counts_only_once_the_senders_predecessor_expired() {
        let l = W / 5;
        let t0 = 1_000_000;
        let ready = t0 + W + l;
        let mut a1 = node(2, 0, 1, 20, t0);
        let mut b1 = node(2, 1, 1, 20, t0);
        hand_over(&mut a1, &mut b1, ready, ready);
        hand_over(&mut b1, &mut a1, ready, ready);
        let gift = a1.on_ask(&b1.ask(1, "k", 10), ready).unwrap();
        assert_eq!(b1.on_transfer(&gift, ready), TransferOutcome::Accepted);
        // A restarts; a sub-window later B, not yet aware, uses all 15 rights, then dies.
        let t1 = ready + 100;
        let mut a2 = node(2, 0, 2, 20, t1);
        let mut admitted = 0;
        while b1.try_admit(1, "k", t1 + l + 100, 1).unwrap() {
            admitted += 1;
        }
        assert_eq!(admitted, 15);
        let t2 = t1 + l + 200;
        let mut b2 = node(2, 1, 2, 20, t2);
        // B2 hands over at once, but its handover is not settled.
        hand_over(&mut b2, &mut a2, t2, t2);
        hand_over(&mut a2, &mut b2, t2, t2);
        let a2_ready = t1 + W + l;
        a2.tick(a2_ready);
        assert!(!a2.is_reclaimed());
        assert!(!a2.try_admit(1, "k", a2_ready, 1).unwrap());
        // Once B2's own wait is over its handover settles, B1's admissions have expired,
        // and A2 gets back the whole share, the lost gift included.
        let b2_ready = t2 + W + l;
        assert!(b1.live_consumed(1, "k", b2_ready) == 0);
        hand_over(&mut b2, &mut a2, b2_ready, b2_ready);
        hand_over(&mut a2, &mut b2, b2_ready, b2_ready);
        assert!(a2.is_reclaimed() && b2.is_reclaimed());
        assert_eq!(
            a2.available(1, "k", b2_ready) + b2.available(1, "k", b2_ready),
            20
        );
    }

    /// Why a new incarnation refuses, before it reclaims, gifts addressed to its predecessor:
    /// such a gift may come from a dead giver whose successor already reclaimed without
    /// counting it.
    #[test]
    fn a_fresh_incarnation_refuses_gifts_addressed_to_its_predecessor() {
        let l = W / 5;
        let t0 = 1_000_000;
        let ready = t0 + W + l;
        let mut a1 = node(2, 0, 1, 20, t0);
        let mut b1 = node(2, 1, 1, 20, t0);
        hand_over(&mut a1, &mut b1, ready, ready);
        hand_over(&mut b1, &mut a1, ready, ready);
        // A1 gives 5 to B1, but the transfer is delayed; A1 dies.
        let late = a1.on_ask(&b1.ask(1, "k", 10), ready).unwrap();
        let t1 = ready + 10;
        let mut a2 = node(2, 0, 2, 20, t1);
        // B1 (settled) hands over to A2, which reclaims its whole share: the gift is lost.
        hand_over(&mut b1, &mut a2, t1, t1);
        a2.tick(t1 + W + l);
        assert!(a2.is_reclaimed());
        assert_eq!(a2.available(1, "k", t1 + W + l), 10);
        // B restarts; the late gift reaches B2, which has never heard of A2.
        let t2 = t1 + W + l + 10;
        let mut b2 = node(2, 1, 2, 20, t2);
        assert_eq!(b2.on_transfer(&late, t2), TransferOutcome::NotAddressed);
        hand_over(&mut a2, &mut b2, t2, t2);
        hand_over(&mut b2, &mut a2, t2 + W + l, t2 + W + l);
        b2.tick(t2 + W + l);
        assert!(b2.is_reclaimed());
        let now = t2 + W + l;
        assert_eq!(a2.available(1, "k", now) + b2.available(1, "k", now), 20);
        // After reclaiming, B2 knows A2 and rejects A1's transfer as stale.
        assert_eq!(b2.on_transfer(&late, now), TransferOutcome::Stale);
    }

    #[test]
    fn malformed_input_is_refused() {
        let mut a = node(2, 0, 1, 10, 0);
        let bad = Transfer {
            policy: 1,
            key: "k".into(),
            from: 9,
            from_incarnation: 1,
            to: 0,
            given: Col {
                total: 1,
                to_inc: 1,
                base: 0,
            },
        };
        assert_eq!(a.on_transfer(&bad, 0), TransferOutcome::Refused);
        let inverted = Transfer {
            from: 1,
            given: Col {
                total: 1,
                to_inc: 1,
                base: 5,
            },
            ..bad.clone()
        };
        assert_eq!(a.on_transfer(&inverted, 0), TransferOutcome::Refused);
        let long = Transfer {
            from: 1,
            key: "x".repeat(MAX_KEY_LEN + 1),
            ..bad.clone()
        };
        assert_eq!(a.on_transfer(&long, 0), TransferOutcome::Refused);
        let unknown = Transfer {
            from: 1,
            policy: 77,
            ..bad.clone()
        };
        assert_eq!(a.on_transfer(&unknown, 0), TransferOutcome::Refused);
        let ok = Transfer {
            from: 1,
            ..bad.clone()
        };
        assert_eq!(a.on_transfer(&ok, 0), TransferOutcome::Accepted);
        assert_eq!(
            a.available(1, "k", 0),
            1,
            "addressed rights are usable at once"
        );
        let elsewhere = Transfer {
            from: 1,
            given: Col {
                total: 3,
                to_inc: 0,
                base: 0,
            },
            ..bad.clone()
        };
        assert_eq!(a.on_transfer(&elsewhere, 0), TransferOutcome::NotAddressed);
        a.on_handover(
            &Handover {
                from: 1,
                from_incarnation: 1,
                to: 0,
                to_incarnation: 1,
                settled: true,
                chunk: 3,
                chunks: 1,
                entries: vec![],
            },
            0,
        );
        assert!(
            a.on_announce(
                &Announce {
                    slot: 40,
                    incarnation: 1,
                    want_handover: true
                },
                0,
                1
            )
            .is_empty()
        );
        let s = a.stats();
        assert_eq!((s.malformed, s.refused, s.not_addressed), (4, 2, 1));
        let newer = Transfer {
            from: 1,
            given: Col {
                total: 1,
                to_inc: 2,
                base: 0,
            },
            ..bad
        };
        assert_eq!(a.on_transfer(&newer, 0), TransferOutcome::Superseded);
        assert!(a.is_superseded());
    }

    /// A message in flight, addressed to a slot (delivered to its current incarnation).
    #[derive(Debug, Clone)]
    enum Msg {
        Announce(Announce),
        Ask(Ask),
        Transfer(Transfer),
        Handover(Handover),
    }

    #[derive(Debug, Clone)]
    enum Step {
        Advance(u64),
        Admit(usize, u64),
        Ask(usize, usize, u64),
        Announce(usize),
        Resend(usize, usize),
        Deliver(prop::sample::Index, bool),
        Drop(prop::sample::Index),
        Restart(usize, u64),
        Partition(usize, usize),
        Gc(usize),
        /// Refund a past admission (the request was refused by another policy).
        Refund(prop::sample::Index),
        /// Graceful shutdown of a slot, handing its rights to another.
        Retire(usize, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0u64..3_000).prop_map(Step::Advance),
            12 => (0usize..4, 1u64..4).prop_map(|(a, c)| Step::Admit(a, c)),
            6 => (0usize..4, 0usize..4, 1u64..30).prop_map(|(a, b, w)| Step::Ask(a, b, w)),
            4 => (0usize..4).prop_map(Step::Announce),
            2 => (0usize..4, 0usize..4).prop_map(|(a, b)| Step::Resend(a, b)),
            20 => (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(i, d)| Step::Deliver(i, d)),
            2 => any::<prop::sample::Index>().prop_map(Step::Drop),
            // Rare enough that slots usually get to reclaim between restarts.
            1 => (0usize..16, 0u64..50_000).prop_map(|(a, o)| Step::Restart(a, o)),
            1 => (0usize..4, 0usize..4).prop_map(|(a, b)| Step::Partition(a, b)),
            1 => (0usize..4).prop_map(Step::Gc),
            2 => any::<prop::sample::Index>().prop_map(Step::Refund),
            1 => (0usize..4, 0usize..4).prop_map(|(a, b)| Step::Retire(a, b)),
        ]
    }

    /// One simulated slot: its current incarnation and that incarnation's clock offset.
    struct Sim {
        node: BoundedTable,
        offset: u64,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// THE property: random admissions on actors with skewed clocks, asks, transfers,
        /// resends, loss, duplication, reordering, delay, partitions and restarts never admit
        /// more than the quota in any interval of length w on the reference timeline, and the
        /// rights held plus live consumption (dead incarnations' included) never exceed the
        /// quota.
        #[test]
        fn strict_never_exceeds_quota(
            n in 1usize..5,
            quota in 1u64..30,
            offsets in proptest::collection::vec(0u64..50_000, 4),
            steps in proptest::collection::vec(step(), 50..600),
        ) {
            const BASE: u64 = 1_000_000_000;
            let mut now = 0u64; // reference time
            let mut sims: Vec<Sim> = (0..n)
                .map(|i| Sim { node: node(n, i, 1, quota, BASE + offsets[i]), offset: offsets[i] })
                .collect();
            let mut dead: Vec<Sim> = Vec::new();
            let mut cut = vec![vec![false; n]; n];
            let mut net: Vec<(usize, usize, Msg)> = Vec::new();
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            // (slot, incarnation, its clock at admission, index in `admitted`)
            let mut admissions: Vec<(usize, u64, u64, usize)> = Vec::new();
            let own = |s: &Sim, now: u64| BASE + s.offset + now;
            for st in steps {
                match st {
                    Step::Advance(dt) => now += dt,
                    Step::Admit(a, cost) => {
                        let s = &mut sims[a % n];
                        let t = own(s, now);
                        if s.node.try_admit(1, "k", t, cost).unwrap() {
                            admissions.push((a % n, s.node.incarnation(), t, admitted.len()));
                            admitted.push((now, cost));
                        }
                    }
                    Step::Ask(a, b, want) => {
                        let (a, b) = (a % n, b % n);
                        if a != b && !cut[a][b] {
                            net.push((a, b, Msg::Ask(sims[a].node.ask(1, "k", want))));
                        }
                    }
                    Step::Announce(a) => {
                        let a = a % n;
                        let ann = sims[a].node.announce();
                        for (b, &cut_off) in cut[a].iter().enumerate() {
                            if b != a && !cut_off {
                                net.push((a, b, Msg::Announce(ann)));
                            }
                        }
                    }
                    Step::Resend(a, b) => {
                        let (a, b) = (a % n, b % n);
                        if a != b && !cut[a][b]
                            && let Some(t) = sims[a].node.transfer_to(1, "k", b as u16) {
                                net.push((a, b, Msg::Transfer(t)));
                            }
                    }
                    Step::Deliver(i, dup) => {
                        if net.is_empty() { continue; }
                        let i = i.index(net.len());
                        let (from, to, msg) = if dup { net[i].clone() } else { net.remove(i) };
                        let s = &mut sims[to];
                        let t = own(s, now);
                        let mut replies = Vec::new();
                        match msg {
                            Msg::Announce(a) => {
                                for h in s.node.on_announce(&a, t, 1) {
                                    replies.push(Msg::Handover(h));
                                }
                            }
                            Msg::Ask(a) => {
                                if let Some(tr) = s.node.on_ask(&a, t) {
                                    replies.push(Msg::Transfer(tr));
                                }
                            }
                            Msg::Transfer(tr) => { s.node.on_transfer(&tr, t); }
                            Msg::Handover(h) => s.node.on_handover(&h, t),
                        }
                        if !cut[to][from] {
                            net.extend(replies.into_iter().map(|m| (to, from, m)));
                        }
                    }
                    Step::Drop(i) => {
                        if !net.is_empty() {
                            let i = i.index(net.len());
                            net.remove(i);
                        }
                    }
                    Step::Restart(a, offset) => {
                        // Four in five restart draws do nothing.
                        if a >= 4 { continue; }
                        let a = a % n;
                        let inc = sims[a].node.incarnation() + 1;
                        let fresh = Sim { node: node(n, a, inc, quota, BASE + offset + now), offset };
                        dead.push(std::mem::replace(&mut sims[a], fresh));
                    }
                    Step::Partition(a, b) => {
                        let (a, b) = (a % n, b % n);
                        cut[a][b] = !cut[a][b];
                        cut[b][a] = cut[a][b];
                    }
                    Step::Gc(a) => {
                        let s = &mut sims[a % n];
                        let t = own(s, now);
                        s.node.gc(t);
                    }
                    Step::Refund(i) => {
                        if admissions.is_empty() { continue; }
                        let (a, inc, at, idx) = admissions.remove(i.index(admissions.len()));
                        let s = &mut sims[a];
                        if s.node.incarnation() == inc {
                            let t = own(s, now);
                            let back = s.node.refund(1, "k", at, admitted[idx].1, t);
                            prop_assert!(back <= admitted[idx].1);
                            admitted[idx].1 -= back;
                        }
                    }
                    Step::Retire(a, b) => {
                        let (a, b) = (a % n, b % n);
                        let t = own(&sims[a], now);
                        for tr in sims[a].node.retire(b as u16, t) {
                            if a != b && !cut[a][b] {
                                net.push((a, b, Msg::Transfer(tr)));
                            }
                        }
                        prop_assert!(!sims[a].node.try_admit(1, "k", t, 1).unwrap());
                    }
                }
                // Conservation, on the reference timeline.
                let held: u64 = sims.iter().map(|s| {
                    let t = own(s, now);
                    s.node.available(1, "k", t) + s.node.live_consumed(1, "k", t)
                }).sum::<u64>()
                    + dead.iter().map(|s| s.node.live_consumed(1, "k", own(s, now))).sum::<u64>();
                prop_assert!(held <= quota, "{} rights held or live with quota {}", held, quota);
            }
            for (i, &(start, _)) in admitted.iter().enumerate() {
                let total: u64 = admitted[i..].iter().take_while(|(t, _)| *t <= start + W).map(|(_, c)| c).sum();
                prop_assert!(total <= quota, "{} admitted in [{}, {}] with quota {}", total, start, start + W, quota);
            }
        }
    }
}
