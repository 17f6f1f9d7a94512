//! The byzantine gateway: a hook on one region's outgoing messages, and the strategies that
//! use it.
//!
//! The byzantine gateway runs the production machine like everyone else (its own books stay
//! honest), holds a valid identity (its messages arrive on an authenticated connection from
//! its own slot), and lies on the wire: [`World`](crate::world) hands every message it is
//! about to send to [`Adversary::rewrite`], and what comes back is what is encoded and
//! delivered. A strategy can change a message, drop it, or add forged ones after it; it can
//! also serve requests its machine refused ([`Adversary::admits_regardless`]). Forged
//! messages ride on the gateway's own traffic (it sends at least a keep-alive a second to
//! each peer), at most one batch per peer per [`INJECT_EVERY_US`].
//!
//! Deterministic: strategies keep no randomness and only see virtual time and the world's
//! identities.

use std::collections::BTreeMap;

use tollgate::crdt::bounded::{HandoverEntry, gift_bound, initial_share};
use tollgate::crdt::usage::{DeltaEntry, PolicyDelta};
use tollgate::crdt::{Actor, Announce, Ask, Col, Delta, Handover, Transfer};
use tollgate::gossip::proto::Message;

use crate::net::MS;
use crate::scenario::{EVENTUAL, LIMIT, STRICT, SUB_WINDOWS, WINDOW_US};
use crate::world::{CONFIG_DIGEST, GlobalMode};

/// Shortest time between two batches of forged messages to one peer.
pub const INJECT_EVERY_US: u64 = 100 * MS;

/// Fake actors named per `Delta` by [`Strategy::ForgeActors`]: new names every time, so the
/// receivers' actor tables (at most 65,535 actors) fill up within a run.
pub const FORGED_ACTORS_PER_DELTA: u64 = 128;

/// How far ahead of the truth forged incarnations claim to be.
pub const FUTURE_INCARNATIONS: u64 = 1_000;

/// One message the byzantine gateway is about to send, and what it knows of the world.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// Virtual time.
    pub now_us: u64,
    /// The sender's clock.
    pub local_us: u64,
    /// The sending (byzantine) region.
    pub from: usize,
    /// The receiving region.
    pub to: usize,
    /// Every gateway's current actor, by gateway index.
    pub actors: &'a [Actor],
    /// The client keys of the workload.
    pub keys: &'a [String],
}

/// What one gateway does instead of following the protocol.
pub trait Adversary {
    /// The messages that go on the wire in place of `msg` (empty: dropped).
    fn rewrite(&mut self, out: &Outgoing<'_>, msg: Message) -> Vec<Message>;

    /// Whether the gateway serves a request its machine refused.
    fn admits_regardless(&self) -> bool {
        false
    }
}

/// The byzantine strategies of the simulator, one per way of lying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strategy {
    /// Follows the protocol (the control row).
    Honest,
    /// Serves every request it gets, whatever its rights; its messages stay honest.
    Greedy,
    /// Its own cell claims `P = u64::MAX` in every sub-window it sends (blocks the key).
    InflateOwnMax,
    /// Its own cell claims `P = quota` in every sub-window it sends (as large as a cell may
    /// honestly be, yet the whole quota).
    InflateOwnQuota,
    /// Relayed cells of every other gateway (the receiver's own included) claim
    /// `P = u64::MAX`.
    InflateOthersMax,
    /// Relayed cells of the third gateway (neither sender nor receiver) claim `P = quota`:
    /// no larger than a cell may honestly be.
    InflateThirdQuota,
    /// Its own cell claims `N = u64::MAX`: the key's net count goes negative, read as 0.
    UnblockOwnN,
    /// Relayed cells of every other gateway claim `P = N = u64::MAX` (net 0, hides their
    /// admissions from the receiver; passes an `N <= P` check).
    UnblockOthers,
    /// Relayed cells of the third gateway claim `P = N = quota`: net 0, which hides its
    /// admissions from the receiver, and every cell passes `N <= P <= quota`.
    UnblockThirdQuota,
    /// Cells with `P = 1` for [`FORGED_ACTORS_PER_DELTA`] new actors per delta: made-up
    /// regions and future incarnations of the configured gateways.
    ForgeActors,
    /// Transfers whose column says it gave `u64::MAX` rights.
    TransferTotalMax,
    /// Gives every peer all a receiver believes of it (its gift bound: its whole share among
    /// three gateways) on top of what it really gave (every transfer's total raised by it,
    /// one forged transfer to start): a double spend, the most "its own share" can mean.
    TransferShareToEach,
    /// Transfers addressed to an incarnation of the receiver newer than the receiver.
    TransferFutureIncarnation,
    /// Handovers saying it gave the receiver `u64::MAX` rights.
    HandoverGaveHuge,
    /// Handovers saying the receiver gave it `u64::MAX` rights.
    HandoverTookHuge,
    /// Handovers addressed to an incarnation of the receiver newer than the receiver.
    HandoverFutureIncarnation,
    /// Asks every peer for the whole quota every [`INJECT_EVERY_US`], and spends what it gets.
    AskHoard,
    /// Announces an incarnation of itself [`FUTURE_INCARNATIONS`] ahead of the truth.
    AnnounceFutureIncarnation,
    /// Sends a `Hello` of a new, higher incarnation of itself every [`INJECT_EVERY_US`] (a
    /// restart storm from one authenticated slot).
    HelloRisingIncarnation,
}

impl Strategy {
    /// Every strategy, in table order.
    pub const ALL: [Strategy; 19] = [
        Strategy::Honest,
        Strategy::Greedy,
        Strategy::InflateOwnMax,
        Strategy::InflateOwnQuota,
        Strategy::InflateOthersMax,
        Strategy::InflateThirdQuota,
        Strategy::UnblockOwnN,
        Strategy::UnblockOthers,
        Strategy::UnblockThirdQuota,
        Strategy::ForgeActors,
        Strategy::TransferTotalMax,
        Strategy::TransferShareToEach,
        Strategy::TransferFutureIncarnation,
        Strategy::HandoverGaveHuge,
        Strategy::HandoverTookHuge,
        Strategy::HandoverFutureIncarnation,
        Strategy::AskHoard,
        Strategy::AnnounceFutureIncarnation,
        Strategy::HelloRisingIncarnation,
    ];

    /// The name in the table (`byz-*`).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Honest => "byz-honest",
            Strategy::Greedy => "byz-greedy",
            Strategy::InflateOwnMax => "byz-inflate-own-max",
            Strategy::InflateOwnQuota => "byz-inflate-own-quota",
            Strategy::InflateOthersMax => "byz-inflate-others-max",
            Strategy::InflateThirdQuota => "byz-inflate-third-quota",
            Strategy::UnblockOwnN => "byz-unblock-own-n-max",
            Strategy::UnblockOthers => "byz-unblock-others-max",
            Strategy::UnblockThirdQuota => "byz-unblock-third-quota",
            Strategy::ForgeActors => "byz-forge-actors",
            Strategy::TransferTotalMax => "byz-transfer-total-max",
            Strategy::TransferShareToEach => "byz-transfer-share-each",
            Strategy::TransferFutureIncarnation => "byz-transfer-future-inc",
            Strategy::HandoverGaveHuge => "byz-handover-gave-huge",
            Strategy::HandoverTookHuge => "byz-handover-took-huge",
            Strategy::HandoverFutureIncarnation => "byz-handover-future-inc",
            Strategy::AskHoard => "byz-ask-hoard",
            Strategy::AnnounceFutureIncarnation => "byz-announce-future-inc",
            Strategy::HelloRisingIncarnation => "byz-hello-rising-inc",
        }
    }

    /// One line on what it does.
    pub fn about(self) -> &'static str {
        match self {
            Strategy::Honest => "follows the protocol (control)",
            Strategy::Greedy => "serves every request it gets regardless of rights",
            Strategy::InflateOwnMax => "own cells claim P = u64::MAX",
            Strategy::InflateOwnQuota => "own cells claim P = quota in every sub-window",
            Strategy::InflateOthersMax => {
                "relayed cells of the other gateways (receiver's own too) claim P = u64::MAX"
            }
            Strategy::InflateThirdQuota => "relayed cells of the third gateway claim P = quota",
            Strategy::UnblockOwnN => "own cells claim N = u64::MAX",
            Strategy::UnblockOthers => "relayed cells of the other gateways claim P = N = u64::MAX",
            Strategy::UnblockThirdQuota => "relayed cells of the third gateway claim P = N = quota",
            Strategy::ForgeActors => {
                "128 new fake actors (made-up regions, future incarnations) per delta, P = 1"
            }
            Strategy::TransferTotalMax => "transfers with total = u64::MAX",
            Strategy::TransferShareToEach => {
                "gives every peer all it believes (its share among 3) on top of what it gave (double spend)"
            }
            Strategy::TransferFutureIncarnation => "transfers with to_inc = receiver's + 1",
            Strategy::HandoverGaveHuge => "handovers: i_gave_you.total = u64::MAX",
            Strategy::HandoverTookHuge => "handovers: you_gave_me.total = u64::MAX",
            Strategy::HandoverFutureIncarnation => "handovers with to_incarnation = receiver's + 1",
            Strategy::AskHoard => "asks every peer for the whole quota every 100 ms, spends it",
            Strategy::AnnounceFutureIncarnation => "announces its own incarnation + 1000",
            Strategy::HelloRisingIncarnation => {
                "a Hello of a new incarnation of itself every 100 ms"
            }
        }
    }

    /// The global modes the strategy means something in.
    pub fn modes(self) -> &'static [GlobalMode] {
        match self {
            Strategy::Honest | Strategy::Greedy | Strategy::HelloRisingIncarnation => {
                &[GlobalMode::Eventual, GlobalMode::Strict]
            }
            Strategy::InflateOwnMax
            | Strategy::InflateOwnQuota
            | Strategy::InflateOthersMax
            | Strategy::InflateThirdQuota
            | Strategy::UnblockOwnN
            | Strategy::UnblockOthers
            | Strategy::UnblockThirdQuota
            | Strategy::ForgeActors => &[GlobalMode::Eventual],
            Strategy::TransferTotalMax
            | Strategy::TransferShareToEach
            | Strategy::TransferFutureIncarnation
            | Strategy::HandoverGaveHuge
            | Strategy::HandoverTookHuge
            | Strategy::HandoverFutureIncarnation
            | Strategy::AskHoard
            | Strategy::AnnounceFutureIncarnation => &[GlobalMode::Strict],
        }
    }

    /// The strategy by table name.
    pub fn by_name(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A [`Strategy`] in action: lies from `start_us` (virtual time) on, honest before.
#[derive(Debug, Clone)]
pub struct Byzantine {
    strategy: Strategy,
    start_us: u64,
    /// Last forged batch per receiving region (virtual time).
    last_injection: BTreeMap<usize, u64>,
    /// Fake actors named so far ([`Strategy::ForgeActors`]).
    forged: u64,
    /// The latest column it really sent each receiving region
    /// ([`Strategy::TransferShareToEach`]).
    real_given: BTreeMap<usize, Col>,
    /// Forged `Hello`s sent per receiving region ([`Strategy::HelloRisingIncarnation`]).
    hellos: BTreeMap<usize, u64>,
}

impl Byzantine {
    /// `strategy`, active from virtual time `start_us`.
    pub fn new(strategy: Strategy, start_us: u64) -> Self {
        Self {
            strategy,
            start_us,
            last_injection: BTreeMap::new(),
            forged: 0,
            real_given: BTreeMap::new(),
            hellos: BTreeMap::new(),
        }
    }

    /// Whether a batch of forged messages to `to` is due, noting it if so.
    fn injection_due(&mut self, out: &Outgoing<'_>) -> bool {
        let due = self
            .last_injection
            .get(&out.to)
            .is_none_or(|t| out.now_us >= t.saturating_add(INJECT_EVERY_US));
        if due {
            self.last_injection.insert(out.to, out.now_us);
        }
        due
    }

    /// Plants the strategy's cells in a delta chunk for the current sub-window.
    fn tamper_delta(&mut self, out: &Outgoing<'_>, delta: &mut Delta) {
        let sub = out.local_us / (WINDOW_US / u64::from(SUB_WINDOWS));
        let me = &out.actors[out.from];
        let others: Vec<&Actor> = out
            .actors
            .iter()
            .enumerate()
            .filter(|(r, _)| *r != out.from)
            .map(|(_, a)| a)
            .collect();
        let third: Vec<&Actor> = out
            .actors
            .iter()
            .enumerate()
            .filter(|(r, _)| *r != out.from && *r != out.to)
            .map(|(_, a)| a)
            .collect();
        for key in out.keys {
            match self.strategy {
                Strategy::InflateOwnMax => plant(delta, key, sub, me, |c| c.0 = u64::MAX),
                Strategy::InflateOwnQuota => plant(delta, key, sub, me, |c| c.0 = c.0.max(LIMIT)),
                Strategy::UnblockOwnN => plant(delta, key, sub, me, |c| c.1 = u64::MAX),
                Strategy::InflateOthersMax => {
                    for a in &others {
                        plant(delta, key, sub, a, |c| c.0 = u64::MAX);
                    }
                }
                Strategy::UnblockOthers => {
                    for a in &others {
                        plant(delta, key, sub, a, |c| *c = (u64::MAX, u64::MAX));
                    }
                }
                Strategy::InflateThirdQuota => {
                    for a in &third {
                        plant(delta, key, sub, a, |c| c.0 = c.0.max(LIMIT));
                    }
                }
                Strategy::UnblockThirdQuota => {
                    for a in &third {
                        plant(delta, key, sub, a, |c| *c = (LIMIT, LIMIT));
                    }
                }
                Strategy::ForgeActors => {
                    for _ in 0..FORGED_ACTORS_PER_DELTA {
                        self.forged += 1;
                        let k = self.forged;
                        // Every fourth a future incarnation of a configured gateway, the rest
                        // made-up regions.
                        let fake = if k.is_multiple_of(4) {
                            let a = &out.actors[(k / 4) as usize % out.actors.len()];
                            Actor::new(
                                a.region.as_str(),
                                a.instance.as_str(),
                                a.incarnation.saturating_add(k),
                            )
                        } else {
                            Actor::new(format!("forged-{k}"), "i0", 1)
                        };
                        plant(delta, key, sub, &fake, |c| c.0 = c.0.max(1));
                    }
                }
                _ => {}
            }
        }
    }

    /// The forged messages of one batch to `out.to` (strict mode's, and `Hello`s).
    fn forge_strict(&self, out: &Outgoing<'_>) -> Vec<Message> {
        let (from, to) = (slot(out.from), slot(out.to));
        let my_inc = out.actors[out.from].incarnation;
        let their_inc = out.actors[out.to].incarnation;
        let mut msgs = Vec::new();
        for key in out.keys {
            let transfer = |given: Col| {
                Message::Transfer(Transfer {
                    policy: STRICT,
                    key: key.clone(),
                    from,
                    from_incarnation: my_inc,
                    to,
                    given,
                })
            };
            let handover = |to_incarnation: u64, entries: Vec<HandoverEntry>| {
                Message::Handover(Handover {
                    from,
                    from_incarnation: my_inc,
                    to,
                    to_incarnation,
                    settled: true,
                    chunk: 0,
                    chunks: 1,
                    // Claims nothing about closed epochs: the forgery is in the open one.
                    floor: 0,
                    entries,
                })
            };
            let huge = |to_inc: u64| Col {
                total: u64::MAX,
                to_inc,
                base: 0,
                epoch: 0,
            };
            match self.strategy {
                Strategy::TransferTotalMax => msgs.push(transfer(huge(their_inc))),
                Strategy::TransferShareToEach => {
                    let real = self.real_given.get(&out.to).copied().unwrap_or(Col {
                        total: 0,
                        to_inc: their_inc,
                        base: 0,
                        epoch: 0,
                    });
                    msgs.push(transfer(Col {
                        total: real.total.saturating_add(believed(out)),
                        ..real
                    }));
                }
                Strategy::TransferFutureIncarnation => msgs.push(transfer(Col {
                    total: 1,
                    to_inc: their_inc.saturating_add(1),
                    base: 0,
                    epoch: 0,
                })),
                Strategy::HandoverGaveHuge => msgs.push(handover(
                    their_inc,
                    vec![HandoverEntry {
                        policy: STRICT,
                        key: key.clone(),
                        you_gave_me: Col::default(),
                        i_gave_you: huge(their_inc),
                    }],
                )),
                Strategy::HandoverTookHuge => msgs.push(handover(
                    their_inc,
                    vec![HandoverEntry {
                        policy: STRICT,
                        key: key.clone(),
                        you_gave_me: huge(my_inc),
                        i_gave_you: Col::default(),
                    }],
                )),
                Strategy::HandoverFutureIncarnation => {
                    msgs.push(handover(their_inc.saturating_add(1), Vec::new()))
                }
                Strategy::AskHoard => msgs.push(Message::Ask(Ask {
                    policy: STRICT,
                    key: key.clone(),
                    slot: from,
                    incarnation: my_inc,
                    want: LIMIT,
                })),
                _ => {}
            }
        }
        if self.strategy == Strategy::HelloRisingIncarnation {
            // New every batch: the forged count of batches sent so far to this peer.
            let k = self.hellos.get(&out.to).copied().unwrap_or(0);
            msgs.push(Message::Hello {
                actor: Actor::new(
                    out.actors[out.from].region.as_str(),
                    out.actors[out.from].instance.as_str(),
                    my_inc.saturating_add(k),
                ),
                config_digest: CONFIG_DIGEST,
            });
        }
        if self.strategy == Strategy::AnnounceFutureIncarnation {
            msgs.push(Message::Announce(Announce {
                slot: from,
                incarnation: my_inc.saturating_add(FUTURE_INCARNATIONS),
                want_handover: true,
            }));
        }
        msgs
    }
}

impl Adversary for Byzantine {
    fn rewrite(&mut self, out: &Outgoing<'_>, mut msg: Message) -> Vec<Message> {
        if out.now_us < self.start_us {
            return vec![msg];
        }
        if let Message::Delta { delta, .. } | Message::FullState { delta, .. } = &mut msg {
            self.tamper_delta(out, delta);
        }
        if let Message::Transfer(t) = &mut msg
            && self.strategy == Strategy::TransferShareToEach
        {
            // Keeps the forged share on top of every real gift: a real column that
            // overtook the forged one would otherwise erase it.
            let seen = self.real_given.entry(out.to).or_default();
            seen.join(&t.given);
            t.given.total = t.given.total.saturating_add(believed(out));
        }
        let mut msgs = vec![msg];
        let forges = matches!(
            self.strategy,
            Strategy::TransferTotalMax
                | Strategy::TransferShareToEach
                | Strategy::TransferFutureIncarnation
                | Strategy::HandoverGaveHuge
                | Strategy::HandoverTookHuge
                | Strategy::HandoverFutureIncarnation
                | Strategy::AskHoard
                | Strategy::AnnounceFutureIncarnation
                | Strategy::HelloRisingIncarnation
        );
        if forges && self.injection_due(out) {
            *self.hellos.entry(out.to).or_default() += 1;
            msgs.extend(self.forge_strict(out));
        }
        msgs
    }

    fn admits_regardless(&self) -> bool {
        self.strategy == Strategy::Greedy
    }
}

/// Gateway `r`'s strict share of the quota among `n` (the first `quota mod n` slots get one
/// more).
pub fn share_of(n: usize, r: usize) -> u64 {
    initial_share(LIMIT, n, r)
}

/// The most a receiver believes the byzantine gateway gave it net: its gift bound (its
/// share among three gateways; see `tollgate::crdt::bounded`, "Peer input"). More would be
/// refused whole, so a double spend gives each peer exactly this.
fn believed(out: &Outgoing<'_>) -> u64 {
    gift_bound(LIMIT, out.actors.len(), out.from)
}

/// The slot index of gateway `r` (the world's slot list is its gateways, in order).
fn slot(r: usize) -> u16 {
    // At most MAX_GATEWAYS (5): every gateway index fits.
    r as u16
}

/// Sets `actor`'s `(P, N)` on `(EVENTUAL, key, sub)` in `delta` through `f`, adding the
/// actor, the policy and the entry if the chunk does not carry them yet.
fn plant(delta: &mut Delta, key: &str, sub: u64, actor: &Actor, f: impl FnOnce(&mut (u64, u64))) {
    let idx = match delta.actors.iter().position(|a| a == actor) {
        Some(i) => i,
        None => {
            delta.actors.push(actor.clone());
            delta.actors.len() - 1
        }
    };
    // A chunk carries at most 65,535 actors (the codec's index is a u16); past that the
    // forgery is simply not planted.
    let Ok(idx) = u16::try_from(idx) else {
        return;
    };
    let pi = match delta.policies.iter().position(|p| p.policy == EVENTUAL) {
        Some(i) => i,
        None => {
            delta.policies.push(PolicyDelta {
                policy: EVENTUAL,
                base_sub: sub,
                entries: Vec::new(),
            });
            delta.policies.len() - 1
        }
    };
    let pd = &mut delta.policies[pi];
    // The sender's base is its GC horizon, below the current sub-window.
    let Some(off) = sub
        .checked_sub(pd.base_sub)
        .and_then(|o| u32::try_from(o).ok())
    else {
        return;
    };
    let ei = match pd
        .entries
        .iter()
        .position(|e| e.key == key && e.sub_off == off)
    {
        Some(i) => i,
        None => {
            pd.entries.push(DeltaEntry {
                key: key.to_owned(),
                sub_off: off,
                counts: Vec::new(),
            });
            pd.entries.len() - 1
        }
    };
    let counts = &mut pd.entries[ei].counts;
    let ci = match counts.iter().position(|c| c.0 == idx) {
        Some(i) => i,
        None => {
            counts.push((idx, 0, 0));
            counts.len() - 1
        }
    };
    let (_, p, n) = &mut counts[ci];
    let mut cell = (*p, *n);
    f(&mut cell);
    (*p, *n) = cell;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate::crdt::Ack;

    fn actors() -> [Actor; 3] {
        [0, 1, 2].map(|r| Actor::new(crate::net::REGIONS[r], "i0", 1 + r as u64))
    }

    fn empty_delta() -> Message {
        Message::Delta {
            delta: Delta {
                from_version: 3,
                to_version: 4,
                chunk: 0,
                chunks: 1,
                actors: Vec::new(),
                policies: Vec::new(),
            },
            ack: Ack::default(),
        }
    }

    fn out<'a>(actors: &'a [Actor], keys: &'a [String], now_us: u64) -> Outgoing<'a> {
        Outgoing {
            now_us,
            local_us: 25 * WINDOW_US,
            from: 1,
            to: 2,
            actors,
            keys,
        }
    }

    #[test]
    fn honest_before_the_start_and_lying_after() {
        let (actors, keys) = (actors(), vec!["k".to_owned()]);
        let mut b = Byzantine::new(Strategy::InflateOwnMax, 1_000);
        assert_eq!(
            b.rewrite(&out(&actors, &keys, 999), empty_delta()),
            vec![empty_delta()]
        );
        let after = b.rewrite(&out(&actors, &keys, 1_000), empty_delta());
        let [Message::Delta { delta, .. }] = after.as_slice() else {
            panic!("one delta: {after:?}");
        };
        assert_eq!(delta.actors, vec![actors[1].clone()]);
        let pd = &delta.policies[0];
        assert_eq!(pd.base_sub, 250);
        assert_eq!(pd.entries[0].counts, vec![(0, u64::MAX, 0)]);
    }

    #[test]
    fn unblocking_keeps_the_true_admissions_and_raises_n() {
        let (actors, keys) = (actors(), vec!["k".to_owned()]);
        let mut msg = empty_delta();
        if let Message::Delta { delta, .. } = &mut msg {
            plant(delta, "k", 250, &actors[1], |c| c.0 = 7);
        }
        let mut b = Byzantine::new(Strategy::UnblockOwnN, 0);
        let after = b.rewrite(&out(&actors, &keys, 0), msg);
        let [Message::Delta { delta, .. }] = after.as_slice() else {
            panic!("one delta: {after:?}");
        };
        assert_eq!(delta.policies[0].entries[0].counts, vec![(0, 7, u64::MAX)]);
    }

    #[test]
    fn strict_forgeries_ride_on_traffic_at_most_once_per_interval() {
        let (actors, keys) = (actors(), vec!["k".to_owned()]);
        let mut b = Byzantine::new(Strategy::TransferFutureIncarnation, 0);
        let first = b.rewrite(&out(&actors, &keys, 0), Message::KeepAlive);
        assert_eq!(first.len(), 2, "{first:?}");
        let Message::Transfer(t) = &first[1] else {
            panic!("a transfer: {first:?}");
        };
        assert_eq!((t.from, t.to, t.given.to_inc), (1, 2, 4));
        let soon = b.rewrite(
            &out(&actors, &keys, INJECT_EVERY_US - 1),
            Message::KeepAlive,
        );
        assert_eq!(soon, vec![Message::KeepAlive]);
        let later = b.rewrite(&out(&actors, &keys, INJECT_EVERY_US), Message::KeepAlive);
        assert_eq!(later.len(), 2);
    }

    #[test]
    fn forged_actors_are_new_every_delta() {
        let (actors, keys) = (actors(), vec!["k".to_owned()]);
        let mut b = Byzantine::new(Strategy::ForgeActors, 0);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3 {
            for m in b.rewrite(&out(&actors, &keys, 0), empty_delta()) {
                if let Message::Delta { delta, .. } = m {
                    assert_eq!(delta.actors.len() as u64, FORGED_ACTORS_PER_DELTA);
                    seen.extend(delta.actors);
                }
            }
        }
        assert_eq!(seen.len() as u64, 3 * FORGED_ACTORS_PER_DELTA);
    }
}
