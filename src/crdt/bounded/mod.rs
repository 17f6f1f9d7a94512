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
//! and stops admitting and giving; it learns that only from the gossip layer
//! ([`BoundedTable::on_own_newer_incarnation`], on an authenticated `Hello` or `Announce` of
//! its own gateway), never from a peer's word (a transfer or handover addressed to our "next
//! incarnation", an announce in our slot's name): those are refused and counted.
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
//! Its net gift to one slot in one epoch (`given − recv` of the pair) never exceeds its
//! *gift bound* ([`gift_bound`]: its share among two or three slots, `2·share/(n − 1)`
//! among more), which is what receivers check (next section).
//!
//! # Peer input: what a slot could honestly have given
//!
//! Authenticated is not honest. A column from slot `j` is believed only as far as the pair
//! stays within `recv[j].total ≤ given[j].total + bound_j` (our net gain from `j` in this
//! epoch is at most `j`'s gift bound): one beyond it is clipped to it, and one with
//! `base > total` refused. Clipping rather than refusing matters because columns are
//! cumulative: a refused lie would make every later column of the pair a lie too, and what
//! we gave the liar would be lost to us for the epoch. A handover
//! entry only if each side is within the other plus its giver's bound, and before reclaiming
//! a slot's gifts count up to its bound. The check is sound for an honest giver (it cuts its
//! own gifts the same way, from its view of what we gave, which lags ours) and simple: no
//! rate, no clock, no message. With the honest slots' pairs conserving rights, a byzantine
//! slot `b` can raise each honest slot's rights by at most `bound_b` over its own, so the
//! honest slots together hold, and admit in any window, at most
//! `quota − share_b + (n − 1) · bound_b`. The bound is chosen so that this is at most
//! `quota + share_b` for every `n` (the property of #13: a liar obtains for the others at
//! most its own share beyond the quota), and exactly the quota for two slots:
//!
//! ```text
//! bound_b = min(share_b, ⌊2 · share_b / (n − 1)⌋)
//! honest slots hold ≤ quota − share_b + (n − 1) · bound_b ≤ quota + share_b
//! ```
//!
//! (`n = 3`: `bound = share`; `n = 4`: two thirds of it; `n = 5`: half.) Each receiver only
//! sees its own pair with `b`, and `b` can show each one the books of an honest `b` that
//! gave only to it; so without waiting for the other receivers, what the `n − 1` of them
//! accept from `b` at once is the sum of what each accepts alone, and holding that sum to
//! `2 · share_b` leaves each `2 · share_b / (n − 1)`. The price is honest: among four or more
//! slots one busy slot can gather at most `share_i + Σ_j bound_j` of a key's quota per window
//! (200 over four: 50 + 3 · 33 = 149), as long as its peers' rights reach it only through
//! gifts; two busy slots (two instances of a region) reach the whole quota. Lifting that
//! needs the receivers to agree (a round among them before rights beyond the bound count),
//! which this table does not do. Columns clipped for exceeding the bound are counted per
//! author ([`BoundedTable::unbounded_by_slot`]): a slot with a count there sent more than an
//! honest one of this configuration can.
//! A slot's incarnation is believed only for its own slot. What a byzantine peer *can* do is
//! lower: claim in a handover that we gave it more than we did (a new incarnation cannot
//! check that), which costs us rights on the keys it names, never the others any quota.
//!
//! Exchanges create state, so each peer may have something moved on at most
//! [`DEFAULT_MAX_OPEN_PER_PEER`] keys, and all peers together on half the key cap ("open
//! pairs"); past it its asks and transfers for new keys are refused and counted: an Ask flood
//! cannot fill the table. Keys where we gave a byzantine peer rights it never returns stay
//! open (settling them would raise us): that state is what this budget bounds.
//!
//! # Returning to baseline
//!
//! Columns only grow, so without more a key that ever moved rights would be held forever.
//! Each pair of a key has an *epoch* (carried in every [`Col`]); all counts of the pair
//! restart from zero in a new epoch, and a column of an older epoch than the receiver's is
//! refused and answered with a [`Settled`]. A settle pass ([`BoundedTable::settle`], run by
//! the gossip layer's GC) looks at keys without live consumption:
//!
//! 1. a net receiver of a pair (`recv > given`) gives the difference back, as far as it
//!    holds it (a normal [`Transfer`]): in a chain, the last receiver returns first;
//! 2. a pair whose columns are equal in our view is *settled*: we empty our side, move to
//!    the next epoch and tell the peer (a [`Settled`]). Equal columns make this no change of
//!    our rights; the other side's true standing in the old epoch is then `≤ 0` (what it
//!    gave is at least what we accepted, which equals what we gave), so it may empty its
//!    side too on hearing of it: it regains only rights we will never accept (we refuse the
//!    old epoch from now on) or that we counted as given back;
//! 3. a net giver resends its column (repairs a lost or refused transfer).
//!
//! Any column of a newer epoch than ours also tells us the sender settled everything older.
//! Every intermediate state lowers availability or keeps it. We settle only with a peer
//! incarnation known to have reclaimed (its announce, or a transfer from it): before that,
//! a settlement could void rights that its predecessor gave us and that it will count from
//! our handover. A key with no live consumption and every pair empty is then forgotten
//! ([`BoundedTable::gc`]); its pair epochs go into a per-peer *floor*: for any key we do not
//! hold, epochs below the floor are refused, so a late column of a settled epoch cannot come
//! back. A handover carries the sender's floor and lists every key it holds above it.
//!
//! At the key cap a new key of our own traffic evicts one whose state can go without raising
//! anyone: no live consumption, and in every pair we received at least what we gave. We drop
//! what we received (we hold it), raise our floors past the key's epochs and send
//! [`Settled`]s, on which the givers take back what they gave. Keys where we gave more, or
//! with live consumption, stay; if none can go, the new key is refused.
//!
//! Pure and deterministic: no clock (every function takes the caller's own `now_us`, which is
//! assumed to run at the same rate everywhere, with any fixed offset), `BTreeMap`s only.
//! Clock readings that go backwards are ignored (the node keeps the largest it saw), so a
//! misbehaving clock can delay releases but never hasten them.

mod book;
mod messages;
mod settle;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use thiserror::Error;

use super::actor::{Actor, Slot};
use super::usage::PolicyId;
use super::window::WindowSpec;
use book::KeyRights;
pub use messages::{Announce, Ask, Col, Handover, HandoverEntry, Outgoing, Settled, Transfer};

/// Longest key accepted (as in [`super::usage::UsageLimits`]).
pub const MAX_KEY_LEN: usize = 512;

/// Default bound on the keys a [`BoundedTable`] holds.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Default bound on the keys one peer may have open pairs on with us (see "Peer input"):
/// what an Ask or transfer flood can make us hold, about 25 MB per peer.
pub const DEFAULT_MAX_OPEN_PER_PEER: usize = 65_536;

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
    /// Peer messages naming a future incarnation of our own slot (as author or receiver):
    /// only the gossip layer, from our own gateway's authenticated identity, may say that.
    pub future: u64,
    /// Columns beyond what their author could honestly have given (see "Peer input").
    pub unbounded: u64,
    /// Columns of a pair epoch older than ours (answered with a [`Settled`]).
    pub stale_epoch: u64,
    /// Exchanges refused because the peer has its whole budget of open pairs.
    pub over_budget: u64,
    /// Keys evicted at the key cap.
    pub evicted: u64,
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
    /// Of an older epoch of the pair than ours (settled since): refused and answered.
    StaleEpoch,
    /// Beyond what the giver could honestly have given: merged up to that bound only, and
    /// the giver counted in [`BoundedTable::unbounded_by_slot`].
    Clipped,
    /// Malformed, misaddressed, naming a future incarnation of ours, over the peer's budget,
    /// or refused for size.
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

/// Most messages waiting in the outbox; past it, answers are dropped (they are repeated:
/// a settle pass sends again whatever is still due).
const MAX_OUTGOING: usize = 4_096;

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
    /// Incarnation per slot known to have reclaimed (0: none): we settle a pair only with a
    /// reclaimed incarnation (see "Returning to baseline").
    peer_reclaimed: Vec<u64>,
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
    /// Per slot: the epoch below which we hold nothing, for any key we do not hold.
    floor: Vec<u64>,
    /// Per slot: keys whose pair with it is open (something moved in the current epoch).
    open: Vec<usize>,
    /// Most open pairs per peer (see [`max_open_for`]).
    max_open: usize,
    /// Where the next settle pass and eviction scan resume.
    cursor: Option<(PolicyId, Box<str>)>,
    outbox: Vec<Outgoing>,
    stats: StrictStats,
    /// Per slot: its columns refused for exceeding its gift bound (see "Peer input").
    unbounded_by_slot: Vec<u64>,
}

/// Slot `i`'s initial share of `quota` over `n` slots: `quota / n`, plus one for the first
/// `quota mod n` slots.
pub fn initial_share(quota: u64, n: usize, i: usize) -> u64 {
    let n = n.max(1) as u64;
    let i = i as u64;
    quota / n + u64::from(i < quota % n)
}

/// The most rights slot `i` of `n` may give one other slot net in one pair epoch, and so the
/// most a receiver believes of it: `min(share_i, ⌊2 · share_i / (n − 1)⌋)`, its share among
/// two or three slots. Among `n` slots the others then hold at most the quota plus `i`'s
/// share however `i` lies (see "Peer input" in the module docs).
pub fn gift_bound(quota: u64, n: usize, i: usize) -> u64 {
    let share = initial_share(quota, n, i);
    let receivers = n.saturating_sub(1).max(1) as u64;
    share.min(share.saturating_mul(2) / receivers)
}

/// Open pairs allowed per peer: at most the default, and together at most half the key cap.
fn max_open_for(max_keys: usize, n: usize) -> usize {
    (max_keys / 2 / n.saturating_sub(1).max(1)).clamp(1, DEFAULT_MAX_OPEN_PER_PEER)
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
            peer_reclaimed: vec![0; n],
            progress: vec![None; n],
            done: vec![0; n],
            reclaimed: false,
            superseded: false,
            retired: false,
            policies,
            keys: BTreeMap::new(),
            key_count: 0,
            max_keys: DEFAULT_MAX_KEYS,
            floor: vec![0; n],
            open: vec![0; n],
            max_open: max_open_for(DEFAULT_MAX_KEYS, n),
            cursor: None,
            outbox: Vec::new(),
            stats: StrictStats::default(),
            unbounded_by_slot: vec![0; n],
        })
    }

    /// Changes the bound on held keys (default [`DEFAULT_MAX_KEYS`]); each peer may open
    /// pairs on at most half of them over the number of peers, and at most
    /// [`DEFAULT_MAX_OPEN_PER_PEER`].
    pub fn set_max_keys(&mut self, max_keys: usize) {
        self.max_keys = max_keys;
        self.max_open = max_open_for(max_keys, self.slots.len());
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

    /// The gossip layer saw an authenticated `Hello` or `Announce` of our own gateway with
    /// incarnation `inc`: if newer than ours we are a zombie from now on. Peers' messages
    /// never make us one (a peer naming our next incarnation is refused and counted in
    /// [`StrictStats::future`]): a peer could otherwise stop every strict key of ours.
    pub fn on_own_newer_incarnation(&mut self, inc: u64) {
        if inc > self.inc {
            self.superseded = true;
        }
    }

    /// The newest incarnation known for each slot (0: unknown).
    pub fn known_incarnations(&self) -> &[u64] {
        &self.incs
    }

    /// Refusal counters.
    pub fn stats(&self) -> StrictStats {
        self.stats
    }

    /// Per slot, in slot order: columns it authored that claimed more than its gift bound
    /// allows ([`StrictStats::unbounded`], split by author). An honest slot of the same
    /// configuration never gets here; a non-zero entry names a peer whose gifts exceed what
    /// it could hold: byzantine, or configured with other policies or another slot list.
    pub fn unbounded_by_slot(&self) -> &[u64] {
        &self.unbounded_by_slot
    }

    fn count_unbounded(&mut self, slot: usize) {
        self.stats.unbounded += 1;
        if let Some(c) = self.unbounded_by_slot.get_mut(slot) {
            *c = c.saturating_add(1);
        }
    }

    /// Number of keys held.
    pub fn key_count(&self) -> usize {
        self.key_count
    }

    /// Messages to send (see [`Outgoing`]); drain after every call that handles peer input,
    /// admits, or settles.
    pub fn take_outgoing(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    fn push_out(&mut self, out: Outgoing) {
        if self.outbox.len() < MAX_OUTGOING {
            self.outbox.push(out);
        }
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
            // Peers settle pairs with us only once they know we reclaimed.
            let a = self.announce();
            for to in 0..self.slots.len() {
                if to != me
                    && let Ok(to) = u16::try_from(to)
                {
                    self.push_out(Outgoing::Announce(to, a));
                }
            }
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

    fn holds(&self, policy: PolicyId, key: &str) -> bool {
        self.rights(policy, key).is_some()
    }

    /// The key's entry, created if need be. At the key cap a new key first tries to evict
    /// one whose state can go safely (see [`BoundedTable::evict_one`]) when `evict` (our own
    /// admissions); peers' exchanges never evict.
    fn rights_mut(
        &mut self,
        policy: PolicyId,
        key: &str,
        evict: bool,
    ) -> Result<&mut KeyRights, BoundedError> {
        if !self.policies.contains_key(&policy) {
            return Err(BoundedError::UnknownPolicy(policy));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(BoundedError::KeyTooLong);
        }
        if !self.holds(policy, key) {
            if self.key_count >= self.max_keys && !(evict && self.evict_one()) {
                return Err(BoundedError::TableFull);
            }
            self.key_count += 1;
            self.keys
                .entry(policy)
                .or_default()
                .insert(key.into(), KeyRights::default());
        }
        // Present: found above or inserted just now.
        self.keys
            .get_mut(&policy)
            .and_then(|k| k.get_mut(key))
            .ok_or(BoundedError::TableFull)
    }

    /// Sets the quota of a known strict policy (a config reload; the caller decides which
    /// quota is safe to use while gateways disagree, see `gossip::proto::reload`). Every
    /// slot's share follows `quota`; consumption and columns stay, so a lower quota leaves
    /// fewer rights (none while the live consumption is above the new share), never more.
    /// Returns whether the policy is known.
    pub fn set_quota(&mut self, policy: PolicyId, quota: u64) -> bool {
        match self.policies.get_mut(&policy) {
            Some(p) => {
                p.quota = quota;
                true
            }
            None => false,
        }
    }

    /// The quota a strict policy's shares are split from now.
    pub fn policy_quota(&self, policy: PolicyId) -> Option<u64> {
        self.policies.get(&policy).map(|p| p.quota)
    }

    /// Slot `slot`'s [`gift_bound`] on `policy` (0 for an unknown policy).
    fn bound_of(&self, policy: PolicyId, slot: usize) -> u64 {
        self.policies
            .get(&policy)
            .map_or(0, |p| gift_bound(p.quota, self.slots.len(), slot))
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
        u64::try_from((self.held(kr, share, p.quota) - i128::from(live)).max(0)).unwrap_or(u64::MAX)
    }

    /// Rights held before consumption: see the module docs' formula.
    fn held(&self, kr: &KeyRights, share: u64, quota: u64) -> i128 {
        if self.reclaimed {
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
            // Before we know our books, what a slot gave us is bounded by its gift bound alone
            // (we gave nothing yet): a byzantine slot cannot claim to have given us more.
            kr.recv_all()
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    let bound = gift_bound(quota, self.slots.len(), j);
                    i128::from(c.addressed_to(self.inc).min(bound))
                })
                .sum()
        }
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
        let kr = self.rights_mut(policy, key, true)?;
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
    /// a newer one. A peer's message in our own slot's name is refused and counted: only
    /// [`BoundedTable::on_own_newer_incarnation`] may make us a zombie.
    fn learn(&mut self, slot: u16, inc: u64) -> Learn {
        let s = usize::from(slot);
        if slot == self.me {
            self.stats.future += 1;
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

    /// Whether opening the pair with `j` on a key (something moving in its current epoch)
    /// is within the peer's budget; counts a refusal.
    fn may_open(&mut self, policy: PolicyId, key: &str, j: usize) -> bool {
        let open = self.rights(policy, key).is_some_and(|kr| kr.is_open(j));
        if open || self.open[j] < self.max_open {
            return true;
        }
        self.stats.over_budget += 1;
        false
    }

    /// Records a gift of up to `amount` rights to incarnation `to_inc` of slot `to` in our
    /// column (before anything is sent, as the module docs require) and returns the
    /// transfer. The gift is cut so that our net gift to the slot in this epoch stays within
    /// our [`gift_bound`]: what receivers believe of us (see "Peer input").
    fn give(
        &mut self,
        policy: PolicyId,
        key: &str,
        to: u16,
        to_inc: u64,
        amount: u64,
    ) -> Option<Transfer> {
        let (me, inc, j) = (self.me, self.inc, usize::from(to));
        let bound = self.bound_of(policy, usize::from(me));
        if !self.may_open(policy, key, j) {
            return None;
        }
        let floors = self.floor.clone();
        let Ok(kr) = self.rights_mut(policy, key, false) else {
            self.stats.refused += 1;
            return None;
        };
        let was_open = kr.is_open(j);
        let cols = kr.cols_mut(&floors);
        let recv = cols.recv[j].total;
        let col = &mut cols.given[j];
        let room = recv.saturating_add(bound).saturating_sub(col.total);
        let amount = amount.min(room);
        if col.to_inc > to_inc || amount == 0 {
            return None;
        }
        if col.to_inc < to_inc {
            col.base = col.total;
            col.to_inc = to_inc;
        }
        col.total = col.total.saturating_add(amount);
        let given = *col;
        if !was_open {
            self.open[j] += 1;
        }
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
    /// (repairs lost transfers; idempotent). `None` if we gave it nothing in this epoch.
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

    /// Brings our pair with slot `j` on `(policy, key)` to epoch `e` of an incoming column:
    /// an older `e` is refused (answered with our epoch, so the sender settles its side);
    /// a newer one means the sender settled every older epoch, so ours is void and emptied.
    fn align_epoch(&mut self, policy: PolicyId, key: &str, j: usize, e: u64) -> bool {
        let floor = self.floor[j];
        let ours = self
            .rights(policy, key)
            .map_or(floor, |kr| kr.epoch(j, floor));
        if e < ours {
            self.stats.stale_epoch += 1;
            self.certify(policy, key, j, ours);
            return false;
        }
        if e > ours {
            self.reset_pair(policy, key, j, e);
        }
        true
    }

    /// Empties our pair with slot `j` on a held key and moves it to `epoch` (no-op for a key
    /// we do not hold: its pairs are empty at the floor).
    fn reset_pair(&mut self, policy: PolicyId, key: &str, j: usize, epoch: u64) {
        let floors = self.floor.clone();
        let Some(kr) = self.keys.get_mut(&policy).and_then(|k| k.get_mut(key)) else {
            return;
        };
        if kr.is_open(j) {
            self.open[j] = self.open[j].saturating_sub(1);
        }
        kr.cols_mut(&floors).reset(j, epoch);
    }

    fn certify(&mut self, policy: PolicyId, key: &str, j: usize, epoch: u64) {
        let Ok(to) = u16::try_from(j) else { return };
        self.push_out(Outgoing::Settled(Settled {
            policy,
            key: key.to_owned(),
            from: self.me,
            from_incarnation: self.inc,
            to,
            epoch,
        }));
    }

    /// Merges slot `j`'s column for us (already aligned to our epoch) as far as `j` could
    /// honestly have given: its gift bound plus what we gave it in this epoch (see "Peer
    /// input"). A column beyond that is a lie, but one believed up to the bound costs no one
    /// more than an honest column could, while refusing it whole would leave every later
    /// (cumulative) column of the pair refused too, and what we gave the liar lost to us for
    /// the epoch: the double spend among five starved an honest slot that way.
    /// The caller has refused a column with `base > total` as malformed.
    fn accept_recv(&mut self, policy: PolicyId, key: &str, j: usize, col: &Col) -> TransferOutcome {
        let bound = self.bound_of(policy, j);
        let given = self.rights(policy, key).map_or(0, |kr| kr.given(j).total);
        let most = given.saturating_add(bound);
        let (col, outcome) = if col.total > most {
            self.count_unbounded(j);
            let clipped = Col {
                total: most,
                base: col.base.min(most),
                ..*col
            };
            (clipped, TransferOutcome::Clipped)
        } else {
            (*col, TransferOutcome::Accepted)
        };
        if !self.may_open(policy, key, j) {
            return TransferOutcome::Refused;
        }
        let floors = self.floor.clone();
        let Ok(kr) = self.rights_mut(policy, key, false) else {
            self.stats.refused += 1;
            return TransferOutcome::Refused;
        };
        let was_open = kr.is_open(j);
        let cols = kr.cols_mut(&floors);
        if !was_open {
            // An empty pair (perhaps just allocated at the floor) takes the column's epoch,
            // which alignment made at least ours: nothing of an older epoch is voided.
            cols.reset(j, col.epoch);
        }
        cols.recv[j].join(&col);
        if !was_open && kr.is_open(j) {
            self.open[j] += 1;
        }
        outcome
    }

    /// Merges a [`Transfer`] addressed to our slot.
    pub fn on_transfer(&mut self, t: &Transfer, now_us: u64) -> TransferOutcome {
        self.tick(now_us);
        if t.to != self.me || !self.valid_peer(t.from) || t.given.base > t.given.total {
            self.stats.malformed += 1;
            return TransferOutcome::Refused;
        }
        if t.given.to_inc > self.inc {
            self.stats.future += 1;
            return TransferOutcome::Refused;
        }
        if self.learn(t.from, t.from_incarnation) == Learn::Stale {
            return TransferOutcome::Stale;
        }
        let from = usize::from(t.from);
        if t.from_incarnation == self.incs[from] {
            // An honest slot gives only once reclaimed.
            self.peer_reclaimed[from] = t.from_incarnation;
        }
        if !self.reclaimed && t.given.to_inc != self.inc {
            self.stats.not_addressed += 1;
            return TransferOutcome::NotAddressed;
        }
        if !self.policies.contains_key(&t.policy) || t.key.len() > MAX_KEY_LEN {
            self.stats.refused += 1;
            return TransferOutcome::Refused;
        }
        if !self.align_epoch(t.policy, &t.key, from, t.given.epoch) {
            return TransferOutcome::StaleEpoch;
        }
        self.accept_recv(t.policy, &t.key, from, &t.given)
    }

    /// Handles a [`Settled`]: the sender holds nothing of our pair's older epochs and will
    /// refuse them, so our side of those epochs is void (see "Returning to baseline").
    pub fn on_settled(&mut self, s: &Settled, now_us: u64) {
        self.tick(now_us);
        if s.to != self.me || !self.valid_peer(s.from) {
            self.stats.malformed += 1;
            return;
        }
        if self.learn(s.from, s.from_incarnation) == Learn::Stale {
            return;
        }
        let j = usize::from(s.from);
        let floor = self.floor[j];
        if let Some(ours) = self.rights(s.policy, &s.key).map(|kr| kr.epoch(j, floor))
            && ours < s.epoch
        {
            self.reset_pair(s.policy, &s.key, j, s.epoch);
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
        if self.learn(a.slot, a.incarnation) == Learn::Stale {
            return Vec::new();
        }
        let to = usize::from(a.slot);
        if !a.want_handover {
            if a.incarnation == self.incs[to] {
                self.peer_reclaimed[to] = a.incarnation;
            }
            return Vec::new();
        }
        if self.superseded {
            return Vec::new();
        }
        let floor = self.floor[to];
        let mut entries = Vec::new();
        for (&policy, keys) in &self.keys {
            for (key, kr) in keys {
                if kr.is_open(to) || kr.epoch(to, floor) > floor {
                    let epoch = kr.epoch(to, floor);
                    let (mut you_gave_me, mut i_gave_you) = (kr.recv(to), kr.given(to));
                    you_gave_me.epoch = epoch;
                    i_gave_you.epoch = epoch;
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
                floor,
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
                self.stats.future += 1;
            } else {
                self.stats.stale += 1;
            }
            return;
        }
        if self.learn(h.from, h.from_incarnation) == Learn::Stale {
            return;
        }
        let from = usize::from(h.from);
        // Raising a floor only refuses more: always safe.
        self.floor[from] = self.floor[from].max(h.floor);
        for e in &h.entries {
            self.merge_entry(from, e);
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

    /// Merges one handover entry from slot `j`: what it says we gave it (our column, as it
    /// accepted it) and what it gave us. Each side is bounded by what its giver could
    /// honestly have given: the other side plus the giver's gift bound.
    fn merge_entry(&mut self, j: usize, e: &HandoverEntry) {
        let (ygm, igy) = (&e.you_gave_me, &e.i_gave_you);
        let me = usize::from(self.me);
        if ygm.base > ygm.total || igy.base > igy.total || ygm.epoch != igy.epoch {
            self.stats.malformed += 1;
            return;
        }
        if !self.policies.contains_key(&e.policy) || e.key.len() > MAX_KEY_LEN {
            self.stats.refused += 1;
            return;
        }
        let (their_bound, my_bound) = (self.bound_of(e.policy, j), self.bound_of(e.policy, me));
        if igy.total > ygm.total.saturating_add(their_bound)
            || ygm.total > igy.total.saturating_add(my_bound)
        {
            self.count_unbounded(j);
            return;
        }
        if !self.align_epoch(e.policy, &e.key, j, igy.epoch) {
            return;
        }
        let accept_recv = self.reclaimed || igy.to_inc == self.inc;
        let given = self
            .rights(e.policy, &e.key)
            .map_or(0, |kr| kr.given(j).total);
        // Checked on the column as it will stand once our side is joined.
        let given_after = given.max(ygm.total);
        if accept_recv && igy.total > given_after.saturating_add(their_bound) {
            self.count_unbounded(j);
            return;
        }
        if !self.may_open(e.policy, &e.key, j) {
            return;
        }
        let floors = self.floor.clone();
        let Ok(kr) = self.rights_mut(e.policy, &e.key, false) else {
            self.stats.refused += 1;
            return;
        };
        let was_open = kr.is_open(j);
        let cols = kr.cols_mut(&floors);
        if !was_open {
            cols.reset(j, igy.epoch);
        }
        cols.given[j].join(ygm);
        if accept_recv {
            cols.recv[j].join(igy);
        }
        if !was_open && kr.is_open(j) {
            self.open[j] += 1;
        }
    }
}
