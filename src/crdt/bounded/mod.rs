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


mod book;
mod messages;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use thiserror::Error;

use super::actor::{Actor, Slot};
use super::usage::PolicyId;
use super::window::WindowSpec;
use book::KeyRights;
pub use messages::{Announce, Ask, Col, Handover, HandoverEntry, Transfer};

/// Longest key accepted (as in [`super::usage::UsageLimits`]).
pub const MAX_KEY_LEN: usize = 512;

/// Default bound on the keys a [`BoundedTable`] holds.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

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

