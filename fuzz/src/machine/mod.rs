//! The `gossip_machine` target: one [`Gossip`] of three slots, with eventual and strict
//! policies, driven as the QUIC driver drives it, by a program of [`Step`]s read from the
//! fuzz input (its first byte picks our slot).
//!
//! The two other slots are played by the input: what they say may be anything a peer with a
//! valid certificate can send (raw messages), or what an honest peer would say (the
//! synthetic steps, which let the fuzzer past the handshake and into strict mode without
//! guessing names and incarnations). After every step the harness drains the machine as a
//! driver would and checks, always:
//!
//! - nothing panics;
//! - `poll_transmit` drains, and every message it yields is addressed to a configured peer
//!   and frames and decodes back to itself with the real codec;
//! - once drained, `has_output` is false; timers make progress (after `handle_timeout(t)`
//!   the next timeout is later than `t`);
//! - usage and strict keys never outnumber the keyed items fed plus our own calls, and the
//!   eventual rule counts at most the peers' current and few retired incarnations;
//! - refunds return at most what was asked; a retired machine holds and admits nothing;
//!
//! and the optional invariants of [`Checks`].

pub mod checks;
pub mod steps;

use std::collections::{BTreeMap, BTreeSet};

use tollgate::crdt::bounded::{HandoverEntry, StrictPolicy};
use tollgate::crdt::{
    Ack, ActorIdx, Announce, Ask, Col, Delta, DeltaEntry, EventualPolicy, Handover, PolicyDelta,
    PolicyId, Slot, Transfer, WindowSpec,
};
use tollgate::gossip::codec::{self, DEFAULT_MAX_FRAME, Decoder};
use tollgate::gossip::proto::{Gossip, GossipConfig, Message, PeerId, Policies};

pub use checks::Checks;
pub use steps::Step;

/// A realistic wall-clock start (2025), as in the proto tests.
pub const T0: u64 = 1_750_000_000_000_000;
const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;
/// Eventual, one minute.
pub const LONG: PolicyId = 1;
/// Strict, two seconds.
pub const STRICT: PolicyId = 2;
/// Eventual, two seconds.
pub const SHORT: PolicyId = 3;
/// Configured nowhere.
pub const UNKNOWN: PolicyId = 99;
/// What a policy operand names (`% 4`).
pub const POLICIES: [PolicyId; 4] = [LONG, STRICT, SHORT, UNKNOWN];
pub const STRICT_QUOTA: u64 = 30;
pub const DIGEST: u64 = 0xC0FF_EE00;
pub const SLOTS: usize = 3;
/// Our incarnation.
pub const MY_INCARNATION: u64 = 1;
/// Idle time after which no key may be left (four of the longest window: a peer may report
/// one window ahead, GC keeps two behind).
const BASELINE_IDLE_US: u64 = 300 * SEC;
/// Most messages one drain may yield before the harness calls it a flood.
const MAX_OUTPUT_PER_STEP: usize = 100_000;
/// Most timer firings within one `Advance` step before the harness calls it a stall.
const MAX_TIMEOUTS_PER_ADVANCE: usize = 10_000;
/// Keys the quota check follows beyond [`KEYS`] (those fed in raw strict messages).
const MAX_FOLLOWED_KEYS: usize = 64;

/// What a key operand names (`% 8`): short keys that steps share, the empty key, and the
/// longest accepted key and one byte past it.
pub fn key(index: u8) -> String {
    match index % 8 {
        0..=3 => format!("k{}", index % 8),
        4 => "203.0.113.7".into(),
        5 => String::new(),
        6 => "a".repeat(tollgate::crdt::bounded::MAX_KEY_LEN),
        _ => "a".repeat(tollgate::crdt::bounded::MAX_KEY_LEN + 1),
    }
}

pub fn slots() -> Vec<Slot> {
    (0..SLOTS)
        .map(|i| Slot::new(format!("r{i}"), "i0"))
        .collect()
}

pub fn config() -> GossipConfig {
    GossipConfig {
        interval_us: 50 * MS,
        max_entries_per_frame: 64,
        keepalive_us: 500 * MS,
        idle_timeout_us: 2 * SEC,
        backoff_base_us: 100 * MS,
        backoff_cap_us: SEC,
        anti_entropy_every_us: SEC,
        announce_every_us: 200 * MS,
        gc_every_us: SEC,
    }
}

/// The window of each policy (the strict one's too, for usage steps naming it).
/// The eventual policies' registered quota: the largest limit a step can ask for (a byte),
/// so every admission the harness makes is one an honest gateway could make.
pub const EVENTUAL_QUOTA: u64 = 255;

pub fn spec(policy: PolicyId) -> WindowSpec {
    let (window, subs) = match policy {
        LONG => (60 * SEC, 10),
        _ => (2 * SEC, 10),
    };
    // Constant arguments that `WindowSpec::new` accepts (a window divisible into its subs).
    WindowSpec::new(window, subs).unwrap_or_else(|e| panic!("window spec: {e}"))
}

pub fn policies() -> Policies {
    Policies {
        eventual: vec![
            (LONG, EventualPolicy::new(EVENTUAL_QUOTA, spec(LONG))),
            // The short policy has a local reserve, so admissions past the rule are fuzzed too.
            (
                SHORT,
                EventualPolicy {
                    reserve_permille: 100,
                    ..EventualPolicy::new(EVENTUAL_QUOTA, spec(SHORT))
                },
            ),
        ],
        strict: vec![(
            STRICT,
            StrictPolicy {
                quota: STRICT_QUOTA,
                spec: spec(STRICT),
            },
        )],
    }
}

/// A machine for slot `me` with the harness's configuration, at [`T0`].
pub fn gossip(me: usize, incarnation: u64, seed: u64) -> Gossip {
    Gossip::new(
        slots()[me].actor(incarnation),
        slots(),
        config(),
        policies(),
        DIGEST,
        seed,
        T0,
    )
    .unwrap_or_else(|e| panic!("the harness configuration is valid: {e}"))
}

/// What the harness knows of an input-played peer, to make its synthetic steps honest.
#[derive(Debug, Default, Clone)]
struct PeerModel {
    /// Its incarnation (0: it never said `Hello`).
    incarnation: u64,
    /// Its usage table version (each usage step is one change).
    version: u64,
    /// Its own usage cells: `(policy, key, sub-window) → (P, N)`.
    usage: BTreeMap<(PolicyId, String, u64), (u64, u64)>,
    /// Its column for us, per strict key (cumulative rights it gave us).
    gave_us: BTreeMap<String, u64>,
    /// Our column for it, per strict key, as our transfers carried it.
    got_from_us: BTreeMap<String, Col>,
}

impl PeerModel {
    fn incarnation(&self) -> u64 {
        self.incarnation.max(1)
    }
}

/// The harness: the machine under test and what the checks need to know of its history.
pub struct Harness {
    gossip: Gossip,
    now: u64,
    me: usize,
    peers: [PeerModel; SLOTS],
    checks: Checks,
    /// Keyed items (delta entries, asks, transfers, handover entries) fed by peers.
    fed_keyed: usize,
    /// Our own calls that may create a key.
    own_keyed: usize,
    /// Everything we admitted per eventual `(policy, key)` (an upper bound of our cells).
    admitted: BTreeMap<(PolicyId, String), u64>,
    /// Strict keys the quota check follows.
    followed: BTreeSet<String>,
    /// When a key was last touched (by us or a peer).
    last_keyed_us: u64,
    retired: bool,
    /// Output kept for the caller (seed generation), if asked.
    keep_output: bool,
    output: Vec<(PeerId, Message)>,
}

impl Harness {
    /// A fresh machine for slot `me % 3`.
    pub fn new(me: u8, checks: Checks) -> Self {
        let me = usize::from(me) % SLOTS;
        Self {
            gossip: gossip(me, MY_INCARNATION, 0x5eed),
            now: T0,
            me,
            peers: Default::default(),
            checks,
            fed_keyed: 0,
            own_keyed: 0,
            admitted: BTreeMap::new(),
            followed: (0..8).map(key).collect(),
            last_keyed_us: T0,
            retired: false,
            keep_output: false,
            output: Vec::new(),
        }
    }

    /// Keeps what the machine sends, for [`Harness::take_output`].
    pub fn keep_output(&mut self) {
        self.keep_output = true;
    }

    /// What the machine sent since the last call (if [`Harness::keep_output`]).
    pub fn take_output(&mut self) -> Vec<(PeerId, Message)> {
        std::mem::take(&mut self.output)
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn me(&self) -> usize {
        self.me
    }

    pub fn gossip(&self) -> &Gossip {
        &self.gossip
    }

    /// Runs one step, drains the machine and checks the invariants.
    pub fn execute(&mut self, step: &Step) {
        match step {
            Step::Advance { ticks } => self.advance((u64::from(*ticks) + 1) * 10 * MS),
            Step::Sleep { ticks } => self.sleep((u64::from(*ticks) + 1) * 10 * SEC),
            Step::Connect { peer } => {
                self.gossip.on_connected(peer_id(*peer), self.now);
                self.settle();
            }
            Step::Disconnect { peer } => {
                self.gossip.on_disconnected(peer_id(*peer), self.now);
                self.settle();
            }
            Step::Raw { peer, message } => self.deliver(peer_id(*peer), message.clone()),
            Step::Hello { peer, restart } => {
                let (from, hello) = self.peer_hello(*peer, *restart);
                self.deliver(from, hello);
            }
            Step::Accept { peer, restart } => {
                let (from, hello) = self.peer_hello(*peer, *restart);
                if let Message::Hello {
                    actor,
                    config_digest,
                } = &hello
                    && self
                        .gossip
                        .vet_hello(self.now, from, actor, *config_digest)
                        .is_ok()
                {
                    self.gossip.on_connected(from, self.now);
                    self.deliver(from, hello);
                } else {
                    self.settle();
                }
            }
            Step::HandOver { peer } => self.hand_over(*peer),
            Step::Ask { peer, key: k, want } => {
                let p = self.peer_slot(*peer);
                let ask = Ask {
                    policy: STRICT,
                    key: key(*k),
                    slot: slot_u16(p),
                    incarnation: self.peers[p].incarnation(),
                    want: u64::from(*want),
                };
                self.deliver(PeerId(slot_u16(p)), Message::Ask(ask));
            }
            Step::Give {
                peer,
                key: k,
                amount,
            } => self.give(*peer, key(*k), u64::from(*amount)),
            Step::Usage {
                peer,
                policy,
                key: k,
                p,
                n,
            } => self.usage(*peer, pick_policy(*policy), key(*k), *p, *n),
            Step::AdmitEventual {
                policy,
                key: k,
                cost,
                limit,
            } => {
                let (policy, key, cost) = (pick_policy(*policy), key(*k), u64::from(cost % 4));
                self.own_keyed += 1;
                self.last_keyed_us = self.now;
                let ok =
                    self.gossip
                        .try_admit_eventual(policy, &key, cost, u64::from(*limit), self.now);
                if ok && cost > 0 {
                    *self.admitted.entry((policy, key)).or_default() += cost;
                }
                self.settle();
            }
            Step::AdmitStrict {
                policy,
                key: k,
                cost,
            } => {
                let (policy, key, cost) = (pick_policy(*policy), key(*k), u64::from(cost % 4));
                self.own_keyed += 1;
                self.last_keyed_us = self.now;
                let ok = self.gossip.try_admit_strict(policy, &key, cost, self.now);
                assert!(
                    !(ok && self.retired && cost > 0),
                    "a retired machine admitted {cost} on {policy}/{key:?}"
                );
                self.settle();
            }
            Step::Refund {
                policy,
                key: k,
                ago,
                n,
            } => {
                let (policy, key, n) = (pick_policy(*policy), key(*k), u64::from(n % 4));
                let at = self.now.saturating_sub(u64::from(*ago) * 10 * MS);
                let back = self.gossip.refund(policy, &key, at, n, self.now);
                assert!(back <= n, "refunded {back} of {n}");
                let back = self.gossip.refund_strict(policy, &key, at, n, self.now);
                assert!(back <= n, "refunded {back} strict rights of {n}");
                self.settle();
            }
            Step::Timeout => {
                self.gossip.handle_timeout(self.now);
                self.gossip.gc(self.now);
                self.settle();
            }
            Step::Retire => {
                self.gossip.retire(self.now);
                self.retired = true;
                self.settle();
            }
            Step::Inspect { policy, key: k } => {
                let (policy, key) = (pick_policy(*policy), key(*k));
                let seen = self.gossip.inspect(policy, &key, self.now);
                if let Some(strict) = seen.strict {
                    assert_eq!(
                        strict.available,
                        self.gossip.remaining_strict(policy, &key, self.now)
                    );
                }
                if let Some(eventual) = seen.eventual {
                    assert_eq!(eventual.merged, self.gossip.count(policy, &key, self.now));
                }
            }
        }
    }

    fn peer_slot(&self, peer: u8) -> usize {
        usize::from(peer) % SLOTS
    }

    /// Time passes as a driver lets it: asleep until each timeout, which is then handled.
    fn advance(&mut self, by: u64) {
        let target = self.now.saturating_add(by);
        for _ in 0..MAX_TIMEOUTS_PER_ADVANCE {
            let due = self.gossip.poll_timeout().unwrap_or(u64::MAX);
            if due > target {
                self.now = target;
                return;
            }
            self.now = self.now.max(due);
            self.gossip.handle_timeout(self.now);
            self.settle();
            let next = self.gossip.poll_timeout().unwrap_or(u64::MAX);
            assert!(
                next > self.now,
                "handle_timeout({}) left a timeout due at {next}",
                self.now
            );
        }
        panic!("more than {MAX_TIMEOUTS_PER_ADVANCE} timeouts within {by} µs");
    }

    /// The process is stalled for `by` (a paused VM), then catches up.
    fn sleep(&mut self, by: u64) {
        self.now = self.now.saturating_add(by);
        self.gossip.handle_timeout(self.now);
        self.settle();
        if self.now.saturating_sub(self.last_keyed_us) >= BASELINE_IDLE_US {
            let eventual = self.gossip.eventual().table().key_count();
            let strict = self.gossip.strict().key_count();
            if self.checks.eventual_baseline {
                assert_eq!(eventual, 0, "usage keys left after every key was idle");
            }
            if self.checks.strict_baseline {
                assert_eq!(strict, 0, "strict keys left after every key was idle");
            }
        }
    }

    fn deliver(&mut self, from: PeerId, message: Message) {
        let keyed = keyed_items(&message);
        self.fed_keyed = self.fed_keyed.saturating_add(keyed);
        if keyed > 0 {
            self.last_keyed_us = self.now;
        }
        self.follow_keys(&message);
        self.gossip.handle(self.now, from, message);
        self.settle();
    }

    fn follow_keys(&mut self, message: &Message) {
        let keys: Vec<&str> = match message {
            Message::Ask(a) => vec![&a.key],
            Message::Transfer(t) => vec![&t.key],
            Message::Handover(h) => h.entries.iter().map(|e| e.key.as_str()).collect(),
            _ => Vec::new(),
        };
        for k in keys {
            if self.followed.len() < MAX_FOLLOWED_KEYS + 8 {
                self.followed.insert(k.to_owned());
            }
        }
    }

    /// `peer`'s `Hello`. Incarnations are start times: a restart is a newer one, now.
    fn peer_hello(&mut self, peer: u8, restart: u8) -> (PeerId, Message) {
        let p = self.peer_slot(peer);
        let now = self.now;
        let model = &mut self.peers[p];
        if model.incarnation == 0 || restart > 0 {
            // A new incarnation starts with an empty usage table.
            let started = now.saturating_sub(u64::from(restart) * 10 * MS);
            model.incarnation = started.max(model.incarnation.saturating_add(1));
            model.version = 0;
            model.usage.clear();
        }
        let actor = slots()[p].actor(model.incarnation);
        (
            PeerId(slot_u16(p)),
            Message::Hello {
                actor,
                config_digest: DIGEST,
            },
        )
    }

    /// An honest peer's announce and settled handover, listing what it exchanged with us.
    fn hand_over(&mut self, peer: u8) {
        let p = self.peer_slot(peer);
        let from = slot_u16(p);
        let inc = self.peers[p].incarnation();
        let model = &self.peers[p];
        let keys: BTreeSet<&String> = model
            .gave_us
            .keys()
            .chain(model.got_from_us.keys())
            .collect();
        let entries = keys
            .into_iter()
            .map(|k| HandoverEntry {
                policy: STRICT,
                key: k.clone(),
                you_gave_me: model.got_from_us.get(k).copied().unwrap_or_default(),
                i_gave_you: self.column_for_us(p, k),
            })
            .collect();
        self.deliver(
            PeerId(from),
            Message::Announce(Announce {
                slot: from,
                incarnation: inc,
                want_handover: false,
            }),
        );
        let handover = Handover {
            from,
            from_incarnation: inc,
            to: slot_u16(self.me),
            to_incarnation: MY_INCARNATION,
            settled: true,
            chunk: 0,
            chunks: 1,
            entries,
            floor: 0,
        };
        self.deliver(PeerId(from), Message::Handover(handover));
    }

    fn column_for_us(&self, p: usize, key: &str) -> Col {
        let total = self.peers[p].gave_us.get(key).copied().unwrap_or(0);
        Col {
            total,
            to_inc: if total > 0 { MY_INCARNATION } else { 0 },
            base: 0,
            epoch: 0,
        }
    }

    /// An honest gift: never more than the peer's standing (its share, plus what we gave it,
    /// less what it gave us), so the rights of the key still sum to its quota.
    fn give(&mut self, peer: u8, key: String, amount: u64) {
        let p = self.peer_slot(peer);
        let share = tollgate::crdt::bounded::initial_share(STRICT_QUOTA, SLOTS, p);
        let model = &self.peers[p];
        let got = model.got_from_us.get(&key).map_or(0, |c| c.total);
        let gave = model.gave_us.get(&key).copied().unwrap_or(0);
        let standing = (share + got).saturating_sub(gave);
        let amount = amount.min(standing);
        *self.peers[p].gave_us.entry(key.clone()).or_default() += amount;
        let transfer = Transfer {
            policy: STRICT,
            given: self.column_for_us(p, &key),
            key,
            from: slot_u16(p),
            from_incarnation: self.peers[p].incarnation(),
            to: slot_u16(self.me),
        };
        self.deliver(PeerId(slot_u16(p)), Message::Transfer(transfer));
    }

    /// An honest usage delta: the peer's own cells, cumulative, `N ≤ P`.
    fn usage(&mut self, peer: u8, policy: PolicyId, key: String, p: u8, n: u8) {
        let slot = self.peer_slot(peer);
        let sub = spec(policy).sub_window(self.now);
        let model = &mut self.peers[slot];
        let cell = model.usage.entry((policy, key.clone(), sub)).or_default();
        cell.0 = cell.0.saturating_add(u64::from(p));
        cell.1 = cell.1.saturating_add(u64::from(n)).min(cell.0);
        let (cp, cn) = *cell;
        model.version += 1;
        let version = model.version;
        let actor = slots()[slot].actor(model.incarnation());
        let delta = Delta {
            from_version: version - 1,
            to_version: version,
            chunk: 0,
            chunks: 1,
            actors: vec![actor],
            policies: vec![PolicyDelta {
                policy,
                base_sub: sub,
                entries: vec![DeltaEntry {
                    key,
                    sub_off: 0,
                    counts: vec![(0, cp, cn)],
                }],
            }],
        };
        let ack = Ack {
            heard_from_you: 0,
            my_version: version,
        };
        self.deliver(PeerId(slot_u16(slot)), Message::Delta { delta, ack });
    }

    /// Drains the machine as the driver does after every call, then checks the invariants.
    fn settle(&mut self) {
        let mut sent = 0usize;
        while let Some((to, message)) = self.gossip.poll_transmit(self.now) {
            sent += 1;
            assert!(sent <= MAX_OUTPUT_PER_STEP, "poll_transmit does not drain");
            self.observe(to, &message);
            if self.keep_output {
                self.output.push((to, message));
            }
        }
        for _ in 0..=SLOTS {
            if self.gossip.poll_close().is_none() {
                break;
            }
        }
        for _ in 0..=SLOTS {
            if self.gossip.poll_connect(self.now).is_none() {
                break;
            }
        }
        assert!(
            self.gossip.poll_close().is_none() && self.gossip.poll_connect(self.now).is_none(),
            "more closes or dials than peers"
        );
        assert!(!self.gossip.has_output(), "has_output after a full drain");
        self.check();
    }

    /// A message the machine sends: to a configured peer, and it frames.
    fn observe(&mut self, to: PeerId, message: &Message) {
        let to_slot = usize::from(to.0);
        assert!(
            to_slot < SLOTS && to_slot != self.me,
            "sent to {to:?}, which is no peer"
        );
        let frame = codec::encode(message, DEFAULT_MAX_FRAME)
            .unwrap_or_else(|e| panic!("a message the machine sent does not frame: {e}"));
        let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
        decoder.extend(&frame);
        assert_eq!(decoder.decode::<Message>(), Ok(Some(message.clone())));
        if let Message::Transfer(t) = message {
            assert_eq!(usize::from(t.from), self.me, "a transfer from another slot");
            assert_eq!(
                t.to, to.0,
                "a transfer addressed to another slot than its recipient"
            );
            self.peers[to_slot]
                .got_from_us
                .entry(t.key.clone())
                .or_default()
                .join(&t.given);
        }
    }

    fn check(&self) {
        let g = &self.gossip;
        let now = self.now;
        let bound = self.fed_keyed.saturating_add(self.own_keyed);
        let usage_keys = g.eventual().table().key_count();
        let strict_keys = g.strict().key_count();
        assert!(
            usage_keys <= bound && strict_keys <= bound,
            "{usage_keys} usage and {strict_keys} strict keys from {bound} keyed inputs"
        );
        // Our peers' current incarnations and the few retired ones each (finding 4: every
        // rising incarnation used to be kept).
        let most = 1 + (SLOTS - 1) * (1 + tollgate::gossip::proto::MAX_RETIRED);
        let actors = usize::try_from(g.eventual().acks().n_actors()).unwrap_or(usize::MAX);
        assert!(actors <= most, "the eventual rule counts {actors} actors");
        if self.retired {
            for k in &self.followed {
                assert_eq!(
                    g.remaining_strict(STRICT, k, now),
                    0,
                    "a retired machine holds rights"
                );
            }
        }
        if self.checks.superseded {
            assert!(!g.strict().is_superseded(), "a peer made us superseded");
        }
        if self.checks.quota || self.checks.quota_share {
            let others: u64 = (0..SLOTS)
                .filter(|&s| s != self.me)
                .map(|s| tollgate::crdt::bounded::initial_share(STRICT_QUOTA, SLOTS, s))
                .sum();
            let most = if self.checks.quota {
                STRICT_QUOTA
            } else {
                STRICT_QUOTA + others
            };
            for k in &self.followed {
                let available = g.remaining_strict(STRICT, k, now);
                let held = available.saturating_add(g.strict().live_consumed(STRICT, k, now));
                assert!(
                    held <= most,
                    "we hold {held} rights on {k:?} (available {available}), at most {most}"
                );
            }
        }
        if self.checks.actors {
            let configured = slots();
            let actors = g.eventual().table().actors();
            for i in 0..actors.len() {
                let Some(actor) = u16::try_from(i)
                    .ok()
                    .and_then(|i| actors.actor(ActorIdx(i)))
                else {
                    continue;
                };
                assert!(
                    configured.contains(&actor.slot()),
                    "the usage table names {actor}, of no configured slot"
                );
            }
        }
        if self.checks.own_cells {
            let me = g.eventual().me();
            for policy in [LONG, SHORT] {
                for k in (0..8).map(key) {
                    let ours = g.eventual().table().own_count(me, policy, &k, now);
                    let admitted = self
                        .admitted
                        .get(&(policy, k.clone()))
                        .copied()
                        .unwrap_or(0);
                    assert!(
                        ours <= admitted,
                        "our cells of {policy}/{k:?} count {ours}, we admitted {admitted}"
                    );
                }
            }
        }
    }
}

/// Runs one fuzz input: our slot, then a program.
pub fn run(data: &[u8]) {
    let Some((&me, program)) = data.split_first() else {
        return;
    };
    let mut harness = Harness::new(me, Checks::from_env());
    for step in steps::parse(program) {
        harness.execute(&step);
    }
}

fn peer_id(peer: u8) -> PeerId {
    PeerId(u16::from(peer % 4))
}

fn pick_policy(index: u8) -> PolicyId {
    POLICIES[usize::from(index % 4)]
}

fn slot_u16(slot: usize) -> u16 {
    // Slots are below `SLOTS`.
    u16::try_from(slot).unwrap_or(u16::MAX)
}

/// Keyed items a message carries (each may create at most one key).
fn keyed_items(message: &Message) -> usize {
    match message {
        Message::Delta { delta, .. } | Message::FullState { delta, .. } => delta.entry_count(),
        Message::Ask(_) | Message::Transfer(_) => 1,
        Message::Handover(h) => h.entries.len(),
        _ => 0,
    }
}
