//! Eventual mode's admission rule and the acknowledgement bookkeeping it needs.
//!
//! # The rule
//!
//! Actor `i` of `N` sees a merged live count `M` for a `(policy, key)` (everyone's admissions
//! it has merged, its own included) and knows `U`, its own live admissions that are not yet
//! *settled* (see below). With `V = M − U`, it admits a request of cost `c` only if
//!
//! ```text
//! N · (U + c) ≤ limit − V
//! ```
//!
//! that is, its unsettled admissions stay within `1/N` of the headroom it sees. Integer
//! arithmetic, no rounding: the property test checks that `N` actors applying it against
//! stale views never admit more than `limit` in any interval of length `w`. The cost of exact
//! integers: once the headroom is below `N` nobody can take a whole unit, so a key served by
//! one actor tops out at `limit − (N − 1)`.
//!
//! # Settled admissions: acks must come with the acker's state
//!
//! An admission is settled once every peer has acknowledged it *and* we have merged each
//! peer's state as of that acknowledgement. The second half matters: a peer that has merged
//! our admissions (and says so) may itself have admitted, before that, against a headroom that
//! did not include them; if we counted our admissions as settled on its word alone, we would
//! take a fresh `1/N` of a headroom that the peer's unseen admissions already used (a random
//! schedule finds such an over-admission quickly). Requiring the acker's own state closes the
//! gap: every admission of a peer that we do not know was made knowing all of our settled
//! ones, so it fits in the headroom that we count.
//!
//! Concretely an [`Ack`] carries `heard_from_you` (the highest of our versions the peer has
//! merged, contiguously) and `my_version` (the peer's own version when it sent the ack). We
//! count it only once we have merged all of the peer's changes up to `my_version`, which the
//! [`AckBook`] tracks from the version ranges of the deltas we merge. Acks that arrive before
//! the deltas they depend on wait in a small per-peer queue.
//!
//! An ack is a peer's word about *our* versions, so it is bounded by what we sent that peer:
//! `heard_from_you` beyond the last version we sent it is clamped to it (counted in
//! [`AckBook::clamped_acks`]). Otherwise a peer could settle admissions we have not even made
//! yet, and we would take a fresh share of headroom for each. A lying peer can still settle
//! what we did send it without merging it: that only relaxes our pact with *it* (every
//! other peer must still settle each admission), so it buys the liar nothing beyond its own
//! share.
//!
//! # The local reserve: availability against a lying peer, for a bounded excess
//!
//! The rule believes every count a peer reports up to the quota per sub-window (more cannot
//! be honest, and less would let a client that spent its allowance in one region spend it
//! again in the next). So a peer that claims a key's whole quota makes every actor refuse
//! that key for a window, and no receiver can tell the claim from a client that really
//! spent its allowance there. A policy's *local reserve* (`reserve_permille` thousandths of
//! the key's limit, `R`) trades a bounded excess for availability: an actor also admits a
//! request the rule refuses while its own live admissions of the key, that one included,
//! stay within `R`. Only the actor's own cells count, which no peer can write, so no
//! count a peer reports can use the reserve up. The reserve is a part of the quota in force,
//! so a peer announcing a lower quota lowers it with everything else, for as long as such an
//! announcement is believed (the gossip layer's rollout window). The cost: `N` actors admit
//! at most `limit + N · R` in any window (the property test checks it), and since a
//! restarted actor is a new one with a fresh reserve, each restart within a window can add
//! `R` more. `R = 0`, the default, is the rule alone.
//!
//! # Peers
//!
//! `N` and the peer set are the gossip layer's decision: every configured actor that may
//! still hold live admissions must be in it, cut-off ones included (a cut-off peer keeps its
//! own `1/N` share, and we keep ours, as old admissions expire). A restarted peer is a new
//! actor; the gossip layer may drop the old incarnation once a window and a sub-window have
//! passed since it was last heard from.
//!
//! # Clocks
//!
//! Sub-windows are numbered by each actor's own clock and expire by the merging actor's clock,
//! so eventual mode assumes clocks within a small fraction of a sub-window of each other; a
//! skew of `δ` can over-admit what `δ` worth of traffic admits. Strict mode
//! ([`super::bounded`]) makes no such assumption.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::actor::{Actor, ActorIdx, Slot};
use super::usage::{
    Delta, EventualPolicy, MergeReport, PolicyId, UsageError, UsageLimits, UsageTable, clamp,
};

/// The eventual-mode admission rule: may an actor that sees `merged_count` (everyone's live
/// admissions it has merged, its own included), of which `my_unacked` are its own unsettled
/// ones, admit `cost` more under `limit` with `n_actors` actors in total (itself included)?
///
/// `N · (my_unacked + cost) ≤ limit − (merged_count − my_unacked)`, computed without overflow
/// or rounding. `n_actors = 0` is treated as 1.
pub fn eventual_admit(
    limit: u64,
    merged_count: u64,
    my_unacked: u64,
    n_actors: u32,
    cost: u64,
) -> bool {
    let n = u128::from(n_actors.max(1));
    let seen = u128::from(merged_count.saturating_sub(my_unacked));
    let headroom = u128::from(limit).saturating_sub(seen);
    n * (u128::from(my_unacked) + u128::from(cost)) <= headroom
}

/// The local reserve of `limit` at `permille` thousandths, rounded down (see the module
/// docs); a `permille` above 1000 counts as 1000.
pub fn local_reserve(limit: u64, permille: u16) -> u64 {
    if permille == 0 {
        // The default, on every eventual decision: no 128-bit division for it.
        return 0;
    }
    let share = u128::from(limit) * u128::from(permille.min(1000)) / 1000;
    // At most `limit`, since the factor is at most one.
    u64::try_from(share).unwrap_or(limit)
}

/// What remains of `limit` with `merged` counted, given a local `reserve` of which `own`
/// is used: the larger of the two headrooms.
fn remains(limit: u64, merged: u64, reserve: u64, own: u64) -> u64 {
    limit
        .saturating_sub(merged)
        .max(reserve.saturating_sub(own))
}

/// What one actor tells a peer about what it has merged, sent with (or after) its deltas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The highest of the receiver's versions the sender has merged every change up to.
    pub heard_from_you: u64,
    /// The sender's own table version when it sent this ack: the receiver counts the ack only
    /// once it has merged the sender's changes up to here.
    pub my_version: u64,
}

/// Most acks kept waiting per peer for the deltas they depend on. Dropping one only delays
/// settlement (a later ack says more).
pub const MAX_PENDING_ACKS: usize = 8;

/// Progress through the chunks of one delta from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    from: u64,
    to: u64,
    next: u32,
    chunks: u32,
}

/// Everything we track about one peer.
#[derive(Debug, Clone, Default)]
struct PeerBook {
    /// The peer's version up to which we have merged all its changes.
    heard: u64,
    /// The delta we are part-way through, if any.
    progress: Option<Progress>,
    /// The highest `heard_from_you` the peer sent: where our next delta to it starts.
    confirmed: u64,
    /// The highest `heard_from_you` whose `my_version` we have heard: our admissions up to
    /// here are settled as far as this peer is concerned.
    settled: u64,
    pending: Vec<Ack>,
    /// The highest of our versions we sent it a delta up to: what its acks may claim.
    sent: u64,
}

impl PeerBook {
    fn promote(&mut self) {
        let heard = self.heard;
        let mut best = self.settled;
        self.pending.retain(|a| {
            if a.my_version <= heard {
                best = best.max(a.heard_from_you);
                false
            } else {
                true
            }
        });
        self.settled = best;
    }
}

/// Per-peer acknowledgement bookkeeping (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct AckBook {
    peers: BTreeMap<Actor, PeerBook>,
    clamped: u64,
}

impl AckBook {
    /// No peers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the peer set (everyone but ourselves). Known peers keep their state; peers no
    /// longer listed are forgotten.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = Actor>) {
        let mut next = BTreeMap::new();
        for p in peers {
            let book = self.peers.remove(&p).unwrap_or_default();
            next.insert(p, book);
        }
        self.peers = next;
    }

    /// The peers, in order.
    pub fn peers(&self) -> impl Iterator<Item = &Actor> {
        self.peers.keys()
    }

    /// `N` for the admission rule: the peers and ourselves.
    pub fn n_actors(&self) -> u32 {
        u32::try_from(self.peers.len() + 1).unwrap_or(u32::MAX)
    }

    /// Notes that we merged `delta` from `peer`: advances what we have heard from it once all
    /// chunks of a delta starting at or before it arrived in order. Returns whether it did.
    /// Chunks out of order or from an unknown peer move nothing (the data is still merged by
    /// the caller; only the claim "I have everything up to" waits for a later delta).
    pub fn on_delta(&mut self, peer: &Actor, delta: &Delta) -> bool {
        let Some(book) = self.peers.get_mut(peer) else {
            return false;
        };
        if delta.chunks == 0 || delta.chunk >= delta.chunks || delta.to_version < delta.from_version
        {
            return false;
        }
        let this = Progress {
            from: delta.from_version,
            to: delta.to_version,
            next: delta.chunk + 1,
            chunks: delta.chunks,
        };
        let progress = if delta.chunk == 0 {
            this
        } else {
            match book.progress {
                Some(p)
                    if (p.from, p.to, p.chunks) == (this.from, this.to, this.chunks)
                        && p.next == delta.chunk =>
                {
                    this
                }
                _ => return false,
            }
        };
        if progress.next < progress.chunks {
            book.progress = Some(progress);
            return false;
        }
        book.progress = None;
        if progress.from > book.heard || progress.to <= book.heard {
            return false;
        }
        book.heard = progress.to;
        book.promote();
        true
    }

    /// Notes that every change up to our `version` was sent to `peer` (in deltas or a full
    /// state): its acks may claim up to here.
    pub fn note_sent(&mut self, peer: &Actor, version: u64) {
        if let Some(book) = self.peers.get_mut(peer) {
            book.sent = book.sent.max(version);
        }
    }

    /// Acks whose `heard_from_you` claimed more than we had sent, clamped (see the module
    /// docs).
    pub fn clamped_acks(&self) -> u64 {
        self.clamped
    }

    /// Takes an ack from `peer`; `heard_from_you` is clamped to what we sent it.
    pub fn on_ack(&mut self, peer: &Actor, mut ack: Ack) {
        let Some(book) = self.peers.get_mut(peer) else {
            return;
        };
        if ack.heard_from_you > book.sent {
            ack.heard_from_you = book.sent;
            self.clamped += 1;
        }
        book.confirmed = book.confirmed.max(ack.heard_from_you);
        if ack.heard_from_you <= book.settled {
            return;
        }
        if ack.my_version <= book.heard {
            book.settled = ack.heard_from_you;
            return;
        }
        if book.pending.len() == MAX_PENDING_ACKS {
            book.pending.remove(0);
        }
        book.pending.push(ack);
    }

    /// The ack to send `peer`, given our current version.
    pub fn ack_for(&self, peer: &Actor, my_version: u64) -> Ack {
        Ack {
            heard_from_you: self.peers.get(peer).map_or(0, |b| b.heard),
            my_version,
        }
    }

    /// Where our next delta to `peer` should start: the highest version it has confirmed.
    pub fn confirmed_by(&self, peer: &Actor) -> u64 {
        self.peers.get(peer).map_or(0, |b| b.confirmed)
    }

    /// The peer's version up to which we have merged everything.
    pub fn heard_from(&self, peer: &Actor) -> u64 {
        self.peers.get(peer).map_or(0, |b| b.heard)
    }

    /// Our version up to which every admission is settled: the minimum over peers of what
    /// each has acknowledged with its state merged here. `u64::MAX` without peers.
    pub fn settled_version(&self) -> u64 {
        self.peers
            .values()
            .map(|b| b.settled)
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// A run of own admissions in one sub-window, up to a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    sub: u64,
    first: u64,
    last: u64,
    amount: u64,
}

/// Most buckets kept per key; past it the two oldest are merged (which only delays their
/// settlement).
pub const MAX_BUCKETS: usize = 8;

/// Our own recent admissions per `(policy, key)`, by version, to compute what is unsettled.
///
/// Admissions are grouped into buckets: a new bucket starts when the current one has been
/// (partly) sent ([`UnackedLog::on_sent`]) or the sub-window changes, so a bucket settles as a
/// whole about one gossip round after its admissions. Keys leave the log when all their
/// buckets are settled or expired: it holds only keys admitted in the last round trip or so.
#[derive(Debug, Clone, Default)]
pub struct UnackedLog {
    policies: BTreeMap<PolicyId, BTreeMap<Box<str>, Vec<Bucket>>>,
    sent: u64,
}

impl UnackedLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `n` own admissions in `sub` stamped with table version `version`.
    pub fn on_admit(&mut self, policy: PolicyId, key: &str, sub: u64, version: u64, n: u64) {
        if n == 0 {
            return;
        }
        let keys = self.policies.entry(policy).or_default();
        if !keys.contains_key(key) {
            keys.insert(key.into(), Vec::new());
        }
        let Some(buckets) = keys.get_mut(key) else {
            return;
        };
        if let Some(b) = buckets.last_mut()
            && b.sub == sub
            && b.first > self.sent
        {
            b.last = b.last.max(version);
            b.amount = b.amount.saturating_add(n);
            return;
        }
        if buckets.len() == MAX_BUCKETS {
            let second = buckets.remove(1);
            let first = &mut buckets[0];
            first.sub = first.sub.max(second.sub);
            first.first = first.first.min(second.first);
            first.last = first.last.max(second.last);
            first.amount = first.amount.saturating_add(second.amount);
        }
        buckets.push(Bucket {
            sub,
            first: version,
            last: version,
            amount: n,
        });
    }

    /// Notes that every change up to `version` has been sent to the peers: later admissions
    /// start new buckets.
    pub fn on_sent(&mut self, version: u64) {
        self.sent = self.sent.max(version);
    }

    /// Own admissions of `(policy, key)` in sub-windows `≥ oldest_live` stamped after
    /// `settled`.
    pub fn unacked(&self, policy: PolicyId, key: &str, oldest_live: u64, settled: u64) -> u64 {
        self.policies
            .get(&policy)
            .and_then(|k| k.get(key))
            .map_or(0, |bs| {
                bs.iter()
                    .filter(|b| b.last > settled && b.sub >= oldest_live)
                    .map(|b| b.amount)
                    .fold(0u64, u64::saturating_add)
            })
    }

    /// Drops settled and expired buckets, and keys left empty. `oldest_live(policy)` gives the
    /// oldest live sub-window of a policy now.
    pub fn prune(&mut self, settled: u64, oldest_live: impl Fn(PolicyId) -> u64) {
        self.policies.retain(|&policy, keys| {
            let oldest = oldest_live(policy);
            keys.retain(|_, bs| {
                bs.retain(|b| b.last > settled && b.sub >= oldest);
                !bs.is_empty()
            });
            !keys.is_empty()
        });
    }

    /// Number of keys with unsettled admissions.
    pub fn len(&self) -> usize {
        self.policies.values().map(BTreeMap::len).sum()
    }

    /// Whether no admission is unsettled.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

/// One actor's eventual-mode state: its usage table, its acks and its unsettled admissions,
/// with the rule applied. The gossip layer drives it: [`EventualNode::deltas_for`] and
/// [`EventualNode::ack_for`] to send, [`EventualNode::on_delta`] and
/// [`EventualNode::on_ack`] on receipt.
#[derive(Debug, Clone)]
pub struct EventualNode {
    actor: Actor,
    me: ActorIdx,
    table: UsageTable,
    acks: AckBook,
    log: UnackedLog,
}

impl EventualNode {
    /// A node for `actor`, one of the configured `slots`, counting `policies`, with no peers
    /// yet and default [`UsageLimits`].
    pub fn new(
        actor: Actor,
        slots: Vec<Slot>,
        policies: impl IntoIterator<Item = (PolicyId, EventualPolicy)>,
    ) -> Result<Self, UsageError> {
        Self::with_limits(actor, slots, policies, UsageLimits::default())
    }

    /// [`EventualNode::new`] with explicit limits.
    pub fn with_limits(
        actor: Actor,
        slots: Vec<Slot>,
        policies: impl IntoIterator<Item = (PolicyId, EventualPolicy)>,
        limits: UsageLimits,
    ) -> Result<Self, UsageError> {
        let (table, me) = UsageTable::for_deployment(&actor, slots, policies, limits)?;
        Ok(Self {
            actor,
            me,
            table,
            acks: AckBook::new(),
            log: UnackedLog::new(),
        })
    }

    /// Sets the quota of a registered policy (a config reload), keeping its usage: the
    /// window is unchanged. Returns whether the policy is registered.
    pub fn set_quota(&mut self, policy: PolicyId, quota: u64) -> bool {
        match self.table.policy(policy) {
            Some(registered) => {
                self.table.add_policy(
                    policy,
                    EventualPolicy {
                        quota,
                        ..registered
                    },
                );
                true
            }
            None => false,
        }
    }

    /// Our actor.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// Our index in our table.
    pub fn me(&self) -> ActorIdx {
        self.me
    }

    /// The usage table (counts, digests, full state).
    pub fn table(&self) -> &UsageTable {
        &self.table
    }

    /// The acknowledgement bookkeeping.
    pub fn acks(&self) -> &AckBook {
        &self.acks
    }

    /// Number of `(policy, key)` pairs held (the `tollgate_global_keys{mode="eventual"}`
    /// gauge).
    pub fn key_count(&self) -> usize {
        self.table.key_count()
    }

    /// Approximate heap bytes of the usage table (see [`UsageTable::memory_bytes`]).
    pub fn memory_bytes(&self) -> usize {
        self.table.memory_bytes()
    }

    /// Sets the peers (everyone else that may hold live admissions). Our own actor is ignored.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = Actor>) {
        let me = self.actor.clone();
        self.acks.set_peers(peers.into_iter().filter(|p| *p != me));
    }

    /// Our live admissions of `(policy, key)` not yet settled.
    pub fn unacked(&self, policy: PolicyId, key: &str, now_us: u64) -> u64 {
        let oldest = self.table.spec(policy).map_or(0, |s| s.oldest_live(now_us));
        self.log
            .unacked(policy, key, oldest, self.acks.settled_version())
    }

    /// Applies the rule for `cost` under `limit` (at most the policy's registered quota) and
    /// records the admission if allowed.
    ///
    /// Also refuses what would take our admissions in the current sub-window past the quota,
    /// refunded ones included: peers clamp any actor's `P` there to the quota (more cannot be
    /// honest), so more would not be counted. Only a key whose admissions were refunded
    /// a whole quota's worth within one sub-window meets it, until the next sub-window.
    pub fn try_admit(
        &mut self,
        policy: PolicyId,
        key: &str,
        now_us: u64,
        cost: u64,
        limit: u64,
    ) -> Result<bool, UsageError> {
        self.try_admit_counted(policy, key, now_us, cost, limit)
            .map(|(admitted, _)| admitted)
    }

    /// [`EventualNode::try_admit`], with what remains of `limit` for `(policy, key)` after
    /// the decision: what [`EventualNode::remaining`] would say next, without reading the
    /// cells again (the request path reports what remains after every admission).
    pub fn try_admit_counted(
        &mut self,
        policy: PolicyId,
        key: &str,
        now_us: u64,
        cost: u64,
        limit: u64,
    ) -> Result<(bool, u64), UsageError> {
        let registered = self
            .table
            .policy(policy)
            .ok_or(UsageError::UnknownPolicy(policy))?;
        let spec = registered.spec;
        let in_force = limit.min(registered.quota);
        let net = self.table.net(policy, key, now_us);
        let merged = clamp(net);
        let unacked = self.unacked(policy, key, now_us);
        let reserve = local_reserve(in_force, registered.reserve_permille);
        if !eventual_admit(in_force, merged, unacked, self.acks.n_actors(), cost) {
            let own = self.reserve_used(reserve, policy, key, now_us);
            if reserve == 0 || own.saturating_add(cost) > reserve {
                return Ok((false, remains(limit, merged, reserve, own)));
            }
        }
        let version = match self.table.record(self.me, policy, key, now_us, cost) {
            Ok(v) => v,
            Err(UsageError::OverQuota) => {
                let own = self.reserve_used(reserve, policy, key, now_us);
                return Ok((false, remains(limit, merged, reserve, own)));
            }
            Err(e) => return Err(e),
        };
        self.log
            .on_admit(policy, key, spec.sub_window(now_us), version, cost);
        // The record added `cost` to our own cell of the current sub-window and dropped
        // only cells past the GC horizon, which the sliding sum does not count.
        let after = clamp(net.saturating_add(i128::from(cost)));
        let own = self.reserve_used(reserve, policy, key, now_us);
        Ok((true, remains(limit, after, reserve, own)))
    }

    /// Our own live admissions of `(policy, key)`, what uses a local `reserve` up: read only
    /// when there is a reserve (0 otherwise, which is all [`remains`] needs then).
    fn reserve_used(&self, reserve: u64, policy: PolicyId, key: &str, now_us: u64) -> u64 {
        if reserve == 0 {
            0
        } else {
            self.table.own_count(self.me, policy, key, now_us)
        }
    }

    /// What remains of `limit` for `(policy, key)`: the headroom the merged count leaves, or
    /// what is left of our local reserve if that is more (a client told `0` while the
    /// reserve would admit it would back off from what the policy grants it).
    pub fn remaining(&self, policy: PolicyId, key: &str, limit: u64, now_us: u64) -> u64 {
        let merged = self.table.count(policy, key, now_us);
        let Some(registered) = self.table.policy(policy) else {
            return limit.saturating_sub(merged);
        };
        let reserve = local_reserve(limit.min(registered.quota), registered.reserve_permille);
        remains(
            limit,
            merged,
            reserve,
            self.reserve_used(reserve, policy, key, now_us),
        )
    }

    /// Refunds own admissions (see [`UsageTable::refund`]).
    pub fn refund(
        &mut self,
        policy: PolicyId,
        key: &str,
        admitted_at_us: u64,
        now_us: u64,
        n: u64,
    ) -> Result<u64, UsageError> {
        self.table
            .refund(self.me, policy, key, admitted_at_us, now_us, n)
    }

    /// The delta chunks to send `peer`: everything changed since it last confirmed (noted
    /// as sent: its acks may claim them).
    pub fn deltas_for(&mut self, peer: &Actor, max_entries: usize, now_us: u64) -> Vec<Delta> {
        let chunks = self
            .table
            .deltas_since(self.acks.confirmed_by(peer), max_entries, now_us);
        self.acks.note_sent(peer, self.table.version());
        chunks
    }

    /// Notes that every change up to our `version` was sent to `peer` (for a caller that
    /// builds its own deltas, see [`AckBook::note_sent`]).
    pub fn note_sent(&mut self, peer: &Actor, version: u64) {
        self.acks.note_sent(peer, version);
    }

    /// Notes that the deltas just produced were sent (starts new unsettled buckets).
    pub fn mark_sent(&mut self) {
        self.log.on_sent(self.table.version());
    }

    /// The ack to send `peer` with our deltas.
    pub fn ack_for(&self, peer: &Actor) -> Ack {
        self.acks.ack_for(peer, self.table.version())
    }

    /// Merges a delta chunk received from `peer` (its authenticated current actor), judged
    /// by [`UsageTable::merge_from`].
    pub fn on_delta(&mut self, peer: &Actor, delta: &Delta, now_us: u64) -> MergeReport {
        let report = self.table.merge_from(delta, peer, now_us);
        self.acks.on_delta(peer, delta);
        report
    }

    /// Takes an ack from `peer` (clamped to what we sent it).
    pub fn on_ack(&mut self, peer: &Actor, ack: Ack) {
        self.acks.on_ack(peer, ack);
    }

    /// Garbage-collects the table and the unsettled log.
    pub fn gc(&mut self, now_us: u64) {
        self.table.gc(now_us);
        let table = &self.table;
        self.log.prune(self.acks.settled_version(), |p| {
            table.spec(p).map_or(0, |s| s.oldest_live(now_us))
        });
    }
}

#[cfg(test)]
mod hostile;
#[cfg(test)]
mod tests;
