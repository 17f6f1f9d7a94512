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

use super::actor::{Actor, ActorIdx};
use super::usage::{Delta, MergeReport, PolicyId, UsageError, UsageTable};
use super::window::WindowSpec;

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

    /// Takes an ack from `peer`.
    pub fn on_ack(&mut self, peer: &Actor, ack: Ack) {
        let Some(book) = self.peers.get_mut(peer) else {
            return;
        };
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
    /// A node for `actor` counting `policies`, with no peers yet.
    pub fn new(
        actor: Actor,
        policies: impl IntoIterator<Item = (PolicyId, WindowSpec)>,
    ) -> Result<Self, UsageError> {
        let mut table = UsageTable::new(policies);
        let me = table.intern(&actor)?;
        Ok(Self {
            actor,
            me,
            table,
            acks: AckBook::new(),
            log: UnackedLog::new(),
        })
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

    /// Applies the rule for `cost` under `limit` and records the admission if allowed.
    pub fn try_admit(
        &mut self,
        policy: PolicyId,
        key: &str,
        now_us: u64,
        cost: u64,
        limit: u64,
    ) -> Result<bool, UsageError> {
        let spec = self
            .table
            .spec(policy)
            .ok_or(UsageError::UnknownPolicy(policy))?;
        let merged = self.table.count(policy, key, now_us);
        let unacked = self.unacked(policy, key, now_us);
        if !eventual_admit(limit, merged, unacked, self.acks.n_actors(), cost) {
            return Ok(false);
        }
        let version = self.table.record(self.me, policy, key, now_us, cost)?;
        self.log
            .on_admit(policy, key, spec.sub_window(now_us), version, cost);
        Ok(true)
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

    /// The delta chunks to send `peer`: everything changed since it last confirmed.
    pub fn deltas_for(&self, peer: &Actor, max_entries: usize, now_us: u64) -> Vec<Delta> {
        self.table
            .deltas_since(self.acks.confirmed_by(peer), max_entries, now_us)
    }

    /// Notes that the deltas just produced were sent (starts new unsettled buckets).
    pub fn mark_sent(&mut self) {
        self.log.on_sent(self.table.version());
    }

    /// The ack to send `peer` with our deltas.
    pub fn ack_for(&self, peer: &Actor) -> Ack {
        self.acks.ack_for(peer, self.table.version())
    }

    /// Merges a delta chunk from `peer`.
    pub fn on_delta(&mut self, peer: &Actor, delta: &Delta, now_us: u64) -> MergeReport {
        let report = self.table.merge_delta(delta, now_us);
        self.acks.on_delta(peer, delta);
        report
    }

    /// Takes an ack from `peer`.
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rule_arithmetic() {
        // Alone: the whole limit.
        assert!(eventual_admit(10, 9, 9, 1, 1));
        assert!(!eventual_admit(10, 10, 10, 1, 1));
        // Three actors, nothing seen: a third each.
        assert!(eventual_admit(9, 0, 0, 3, 3));
        assert!(!eventual_admit(9, 0, 0, 3, 4));
        assert!(!eventual_admit(9, 3, 3, 3, 1));
        // Settled admissions are headroom used, not a share.
        assert!(eventual_admit(9, 3, 0, 3, 2));
        assert!(!eventual_admit(9, 3, 0, 3, 3));
        assert!(!eventual_admit(5, 50, 0, 3, 1));
        assert!(eventual_admit(u64::MAX, u64::MAX - 1, 0, u32::MAX, 0));
        assert!(!eventual_admit(u64::MAX, 0, u64::MAX, u32::MAX, u64::MAX));
        assert!(eventual_admit(1, 0, 0, 0, 1));
    }

    fn actor(i: usize) -> Actor {
        Actor::new(format!("r{i}"), "i0", 1)
    }

    #[test]
    fn acks_count_only_with_the_ackers_state() {
        let mut book = AckBook::new();
        book.set_peers([actor(1)]);
        assert_eq!(book.n_actors(), 2);
        // The peer says it merged our version 5, as of its version 3, which we do not have.
        book.on_ack(
            &actor(1),
            Ack {
                heard_from_you: 5,
                my_version: 3,
            },
        );
        assert_eq!(book.confirmed_by(&actor(1)), 5);
        assert_eq!(book.settled_version(), 0);
        let delta = |from, to, chunk, chunks| Delta {
            from_version: from,
            to_version: to,
            chunk,
            chunks,
            actors: vec![],
            policies: vec![],
        };
        // Chunk 1 of 2 alone proves nothing; in order, both do.
        assert!(!book.on_delta(&actor(1), &delta(0, 3, 1, 2)));
        assert!(!book.on_delta(&actor(1), &delta(0, 3, 0, 2)));
        assert!(book.on_delta(&actor(1), &delta(0, 3, 1, 2)));
        assert_eq!(book.heard_from(&actor(1)), 3);
        assert_eq!(book.settled_version(), 5);
        // A gap (from 4 > heard 3) does not advance.
        assert!(!book.on_delta(&actor(1), &delta(4, 9, 0, 1)));
        assert!(!book.on_delta(&actor(1), &delta(0, 0, 1, 1)));
        assert_eq!(
            book.ack_for(&actor(1), 7),
            Ack {
                heard_from_you: 3,
                my_version: 7
            }
        );
        // Unknown peers are ignored.
        book.on_ack(
            &actor(9),
            Ack {
                heard_from_you: 99,
                my_version: 0,
            },
        );
        assert_eq!(book.confirmed_by(&actor(9)), 0);
        book.set_peers([]);
        assert_eq!(book.settled_version(), u64::MAX);
    }

    #[test]
    fn pending_acks_are_bounded() {
        let mut book = AckBook::new();
        book.set_peers([actor(1)]);
        for v in 1..=20 {
            book.on_ack(
                &actor(1),
                Ack {
                    heard_from_you: v,
                    my_version: v,
                },
            );
        }
        assert_eq!(book.peers[&actor(1)].pending.len(), MAX_PENDING_ACKS);
    }

    #[test]
    fn unacked_log_buckets_and_prunes() {
        let mut log = UnackedLog::new();
        log.on_admit(1, "k", 10, 1, 2);
        log.on_admit(1, "k", 10, 2, 1);
        log.on_sent(2);
        log.on_admit(1, "k", 10, 3, 4);
        assert_eq!(log.unacked(1, "k", 0, 0), 7);
        assert_eq!(log.unacked(1, "k", 0, 2), 4);
        assert_eq!(log.unacked(1, "k", 11, 0), 0);
        for v in 4..40 {
            log.on_sent(v);
            log.on_admit(1, "k", 10 + v, v + 1, 1);
        }
        assert!(log.policies[&1]["k"].len() <= MAX_BUCKETS);
        assert_eq!(log.unacked(1, "k", 0, 0), 7 + 36);
        log.prune(40, |_| 0);
        assert!(log.is_empty());
    }

    /// A message in flight between eventual nodes.
    #[derive(Debug, Clone)]
    enum Msg {
        Delta(Delta),
        Ack(Ack),
    }

    #[derive(Debug, Clone)]
    enum Step {
        Advance(u64),
        Admit(usize, u64),
        Send(usize, usize),
        Deliver(prop::sample::Index, bool),
        Drop(prop::sample::Index),
        Gc(usize),
    }

    fn step(n: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            2 => (0u64..150).prop_map(Step::Advance),
            4 => (0..n, 1u64..4).prop_map(|(a, c)| Step::Admit(a, c)),
            3 => (0..n, 0..n).prop_map(|(a, b)| Step::Send(a, b)),
            4 => (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(i, d)| Step::Deliver(i, d)),
            1 => any::<prop::sample::Index>().prop_map(Step::Drop),
            1 => (0..n).prop_map(Step::Gc),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// N actors apply the rule against their own stale views, with deltas and acks lost,
        /// duplicated, reordered and chunked: no interval of length w ever holds more than the
        /// limit.
        #[test]
        fn never_over_admits(
            n in 2usize..5,
            limit in 1u64..40,
            steps in proptest::collection::vec(step(4), 1..400),
        ) {
            let spec = WindowSpec::new(1_000, 5).unwrap();
            let mut nodes: Vec<EventualNode> =
                (0..n).map(|i| EventualNode::new(actor(i), [(1, spec)]).unwrap()).collect();
            for node in &mut nodes {
                node.set_peers((0..n).map(actor));
            }
            let mut now = 1_000_000u64;
            let mut net: Vec<(usize, usize, Msg)> = Vec::new();
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for s in steps {
                match s {
                    Step::Advance(dt) => now += dt,
                    Step::Admit(a, cost) => {
                        let a = a % n;
                        if nodes[a].try_admit(1, "k", now, cost, limit).unwrap() {
                            admitted.push((now, cost));
                        }
                    }
                    Step::Send(a, b) => {
                        let (a, b) = (a % n, b % n);
                        if a == b { continue; }
                        let peer = actor(b);
                        for d in nodes[a].deltas_for(&peer, 1, now) {
                            net.push((a, b, Msg::Delta(d)));
                        }
                        net.push((a, b, Msg::Ack(nodes[a].ack_for(&peer))));
                        nodes[a].mark_sent();
                    }
                    Step::Deliver(i, dup) => {
                        if net.is_empty() { continue; }
                        let i = i.index(net.len());
                        let (from, to, msg) = if dup { net[i].clone() } else { net.remove(i) };
                        match msg {
                            Msg::Delta(d) => { nodes[to].on_delta(&actor(from), &d, now); }
                            Msg::Ack(ack) => nodes[to].on_ack(&actor(from), ack),
                        }
                    }
                    Step::Drop(i) => {
                        if !net.is_empty() {
                            let i = i.index(net.len());
                            net.remove(i);
                        }
                    }
                    Step::Gc(a) => nodes[a % n].gc(now),
                }
            }
            let w = spec.window_us();
            for (i, &(start, _)) in admitted.iter().enumerate() {
                let total: u64 = admitted[i..].iter().take_while(|(t, _)| *t <= start + w).map(|(_, c)| c).sum();
                prop_assert!(total <= limit, "{} admitted in [{}, {}] with limit {}", total, start, start + w, limit);
            }
        }
    }

    /// With prompt gossip, one actor serving a key alone gets the whole limit but the last
    /// `N − 1`: the rule only holds back admissions not yet acknowledged, and a headroom
    /// below `N` gives nobody a whole unit.
    #[test]
    fn a_lone_busy_actor_gets_the_limit() {
        let spec = WindowSpec::new(10_000, 10).unwrap();
        let mut nodes: Vec<EventualNode> = (0..3)
            .map(|i| EventualNode::new(actor(i), [(1, spec)]).unwrap())
            .collect();
        for node in &mut nodes {
            node.set_peers((0..3).map(actor));
        }
        let mut now = 1_000_000;
        let mut admitted = 0;
        for _ in 0..200 {
            now += 10;
            if nodes[0].try_admit(1, "k", now, 1, 100).unwrap() {
                admitted += 1;
            }
            // A full gossip round: 0 -> peers, peers -> 0 (deltas then acks).
            for p in 1..3 {
                for d in nodes[0].deltas_for(&actor(p), 100, now) {
                    nodes[p].on_delta(&actor(0), &d, now);
                }
                let ack0 = nodes[0].ack_for(&actor(p));
                nodes[p].on_ack(&actor(0), ack0);
                for d in nodes[p].deltas_for(&actor(0), 100, now) {
                    nodes[0].on_delta(&actor(p), &d, now);
                }
                let ack = nodes[p].ack_for(&actor(0));
                nodes[0].on_ack(&actor(p), ack);
            }
            nodes[0].mark_sent();
        }
        assert_eq!(admitted, 100 - 2);
        assert_eq!(nodes[1].table().count(1, "k", now), 98);
        assert_eq!(nodes[0].unacked(1, "k", now), 0);
        nodes[0].gc(now);
        assert!(nodes[0].log.is_empty());
    }
}
