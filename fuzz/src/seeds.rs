//! The checked-in seed corpora, generated (`cargo run --release --example make_corpus`).
//!
//! `gossip_machine` seeds are recorded, not written by hand: the harness's machine runs
//! against two real [`Gossip`] peers, and every step it took (time, connections, each
//! message a peer sent it, its own admissions) is written out, so a seed replays a real
//! exchange exactly. A few hand-made ones add the synthetic steps and the hostile messages of
//! issue #13. `frame_decoder` seeds are frames of every message variant those runs produced,
//! alone, concatenated and cut in chunks, plus broken streams.

use std::collections::BTreeMap;

use tollgate::crdt::{Actor, Col, Delta, DeltaEntry, Handover, PolicyDelta, Transfer};
use tollgate::gossip::codec::{self, DEFAULT_MAX_FRAME, HEADER_LEN, MAGIC, VERSION};
use tollgate::gossip::proto::{Gossip, Message, PeerId};

use crate::machine::{
    Checks, Harness, LONG, MY_INCARNATION, SHORT, SLOTS, STRICT, Step, T0, gossip, key, steps,
};

const MS: u64 = 1_000;
/// The incarnation of the peers of the written seeds: their synthetic `Hello`s, sent at
/// [`T0`], make them processes started then.
const PEER_INCARNATION: u64 = T0;

/// A recorded exchange between the harness (slot `me`) and real peers in the other slots.
struct Recorder {
    harness: Harness,
    me: u8,
    others: BTreeMap<usize, Gossip>,
    steps: Vec<Step>,
    /// Every message the harness received or sent, for the frame corpus.
    seen: Vec<Message>,
}

impl Recorder {
    fn new(me: u8) -> Self {
        let mut harness = Harness::new(me, Checks::default());
        harness.keep_output();
        let me_slot = harness.me();
        let others = (0..SLOTS)
            .filter(|&s| s != me_slot)
            .map(|s| (s, gossip(s, 1, 0x1000 + s as u64)))
            .collect();
        Self {
            harness,
            me,
            others,
            steps: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn my_slot(&self) -> usize {
        self.harness.me()
    }

    fn step(&mut self, step: Step) {
        self.harness.execute(&step);
        self.steps.push(step);
        self.exchange();
    }

    /// Delivers everything in flight until all are quiet: among the peers directly, to the
    /// harness as recorded `Raw` steps.
    fn exchange(&mut self) {
        let me = self.my_slot();
        for _ in 0..10_000 {
            let now = self.harness.now();
            let mut moved = false;
            for (to, message) in self.harness.take_output() {
                moved = true;
                self.seen.push(message.clone());
                if let Some(peer) = self.others.get_mut(&usize::from(to.0)) {
                    peer.handle(now, PeerId(me as u16), message);
                }
            }
            let mut to_me = Vec::new();
            let mut between = Vec::new();
            for (&slot, peer) in &mut self.others {
                while let Some((to, message)) = peer.poll_transmit(now) {
                    moved = true;
                    if usize::from(to.0) == me {
                        to_me.push((slot, message));
                    } else {
                        between.push((slot, to, message));
                    }
                }
                while peer.poll_close().is_some() {}
                while peer.poll_connect(now).is_some() {}
            }
            for (from, to, message) in between {
                if let Some(peer) = self.others.get_mut(&usize::from(to.0)) {
                    peer.handle(now, PeerId(from as u16), message);
                }
            }
            for (from, message) in to_me {
                self.seen.push(message.clone());
                let step = Step::Raw {
                    peer: from as u8,
                    message,
                };
                self.harness.execute(&step);
                self.steps.push(step);
            }
            if !moved {
                return;
            }
        }
        panic!("the seed exchange does not quiesce");
    }

    /// Every link up, both ways.
    fn connect_all(&mut self) {
        let me = self.my_slot();
        let now = self.harness.now();
        let slots: Vec<usize> = self.others.keys().copied().collect();
        for &a in &slots {
            for &b in &slots {
                if a != b
                    && let Some(peer) = self.others.get_mut(&a)
                {
                    peer.on_connected(PeerId(b as u16), now);
                }
            }
            if let Some(peer) = self.others.get_mut(&a) {
                peer.on_connected(PeerId(me as u16), now);
            }
        }
        for a in slots {
            self.step(Step::Connect { peer: a as u8 });
        }
    }

    /// `ms` milliseconds in steps of 50, every peer's timers handled on the way.
    fn run_for(&mut self, ms: u64) {
        for _ in 0..ms.div_ceil(50) {
            let target = self.harness.now() + 50 * MS;
            for peer in self.others.values_mut() {
                while let Some(due) = peer.poll_timeout().filter(|&d| d <= target) {
                    peer.handle_timeout(due.max(T0));
                    if peer.poll_timeout() == Some(due) {
                        break;
                    }
                }
            }
            self.step(Step::Advance { ticks: 4 });
        }
    }

    fn peer(&mut self, slot: usize) -> Option<&mut Gossip> {
        self.others.get_mut(&slot)
    }

    fn other_slots(&self) -> Vec<usize> {
        self.others.keys().copied().collect()
    }

    fn program(&self) -> Vec<u8> {
        let mut bytes = vec![self.me];
        bytes.extend(steps::write_all(&self.steps));
        bytes
    }
}

/// One seed file: its name and bytes.
pub type Seed = (String, Vec<u8>);

/// Recorded runs, and every message they carried.
fn recorded() -> (Vec<Seed>, Vec<Message>) {
    let mut seeds = Vec::new();
    let mut messages = Vec::new();
    let mut keep = |name: &str, r: Recorder, seeds: &mut Vec<Seed>| {
        seeds.push((format!("rec-{name}"), r.program()));
        messages.extend(r.seen);
    };

    for me in 0..3u8 {
        let mut r = Recorder::new(me);
        r.connect_all();
        r.run_for(300);
        keep(&format!("handshake-me{me}"), r, &mut seeds);
    }

    let mut r = Recorder::new(0);
    r.connect_all();
    r.run_for(1200);
    for round in 0..12u8 {
        let now = r.harness.now();
        for slot in r.other_slots() {
            if let Some(peer) = r.peer(slot) {
                peer.try_admit_eventual(LONG, &key(round % 4), 1, 50, now);
                peer.try_admit_eventual(SHORT, &key(round % 3), 2, 20, now);
            }
        }
        r.step(Step::AdmitEventual {
            policy: 0,
            key: round % 4,
            cost: 1,
            limit: 50,
        });
        r.step(Step::AdmitEventual {
            policy: 2,
            key: round % 2,
            cost: 3,
            limit: 20,
        });
        r.run_for(100);
    }
    r.step(Step::Refund {
        policy: 0,
        key: 1,
        ago: 5,
        n: 1,
    });
    keep("eventual", r, &mut seeds);

    for me in [0u8, 1] {
        let mut r = Recorder::new(me);
        r.connect_all();
        r.run_for(2600);
        for round in 0..10u8 {
            let now = r.harness.now();
            let hot = r.other_slots()[0];
            if let Some(peer) = r.peer(hot) {
                for _ in 0..4 {
                    peer.try_admit_strict(STRICT, &key(0), 1, now);
                }
            }
            r.step(Step::AdmitStrict {
                policy: 1,
                key: 1,
                cost: 3,
            });
            if round % 3 == 0 {
                r.step(Step::Inspect { policy: 1, key: 1 });
            }
            r.run_for(100);
        }
        keep(&format!("strict-me{me}"), r, &mut seeds);
    }

    // A peer restarts: its connections drop, a new incarnation says Hello and asks for
    // handovers.
    let mut r = Recorder::new(0);
    r.connect_all();
    r.run_for(2600);
    r.step(Step::AdmitStrict {
        policy: 1,
        key: 0,
        cost: 2,
    });
    r.run_for(100);
    let slot = r.other_slots()[0];
    let now = r.harness.now();
    let mut fresh = gossip(slot, 2, 0x2000);
    for other in r.other_slots() {
        if other != slot
            && let Some(peer) = r.peer(other)
        {
            peer.on_disconnected(PeerId(slot as u16), now);
            peer.on_connected(PeerId(slot as u16), now);
            fresh.on_connected(PeerId(other as u16), now);
        }
    }
    fresh.on_connected(PeerId(r.my_slot() as u16), now);
    r.others.insert(slot, fresh);
    r.step(Step::Disconnect { peer: slot as u8 });
    r.step(Step::Connect { peer: slot as u8 });
    r.run_for(600);
    keep("restart", r, &mut seeds);

    // A peer retires gracefully (hands its rights over), then we do.
    let mut r = Recorder::new(2);
    r.connect_all();
    r.run_for(2600);
    let slot = r.other_slots()[1];
    let now = r.harness.now();
    if let Some(peer) = r.peer(slot) {
        peer.try_admit_strict(STRICT, &key(2), 1, now);
        peer.retire(now);
    }
    r.exchange();
    r.run_for(200);
    r.step(Step::Retire);
    r.run_for(100);
    keep("retire", r, &mut seeds);

    (seeds, messages)
}

/// Programs of synthetic steps and hostile messages.
fn written() -> Vec<Seed> {
    let handshake = |me: u8| -> Vec<Step> {
        let mut s = Vec::new();
        for p in 0..SLOTS as u8 {
            if p != me {
                s.push(Step::Connect { peer: p });
                s.push(Step::Hello {
                    peer: p,
                    restart: 0,
                });
                s.push(Step::HandOver { peer: p });
            }
        }
        s
    };
    let reclaimed = |me: u8| -> Vec<Step> {
        let mut s = handshake(me);
        // Past one window and a sub-window (2.2 s), re-announcing as peers do.
        for _ in 0..12 {
            s.push(Step::Advance { ticks: 19 });
            for p in 0..SLOTS as u8 {
                if p != me {
                    s.push(Step::HandOver { peer: p });
                }
            }
        }
        s
    };
    let program = |me: u8, steps: Vec<Step>| -> Vec<u8> {
        let mut bytes = vec![me];
        bytes.extend(steps::write_all(&steps));
        bytes
    };
    let victim = Actor::new("r0", "i0", MY_INCARNATION);
    let mut seeds = Vec::new();

    let mut s = reclaimed(0);
    s.extend([
        Step::AdmitStrict {
            policy: 1,
            key: 0,
            cost: 3,
        },
        Step::Ask {
            peer: 1,
            key: 0,
            want: 5,
        },
        Step::Give {
            peer: 2,
            key: 1,
            amount: 4,
        },
        Step::AdmitStrict {
            policy: 1,
            key: 1,
            cost: 2,
        },
        Step::Usage {
            peer: 1,
            policy: 0,
            key: 2,
            p: 3,
            n: 1,
        },
        Step::Usage {
            peer: 2,
            policy: 2,
            key: 2,
            p: 5,
            n: 0,
        },
        Step::AdmitEventual {
            policy: 0,
            key: 2,
            cost: 1,
            limit: 20,
        },
        Step::Refund {
            policy: 1,
            key: 0,
            ago: 0,
            n: 1,
        },
        Step::Inspect { policy: 0, key: 2 },
        Step::Timeout,
        Step::Advance { ticks: 200 },
        Step::Sleep { ticks: 40 },
    ]);
    seeds.push(("syn-reclaimed-traffic".into(), program(0, s)));

    let mut s = handshake(1);
    s.extend([
        Step::Disconnect { peer: 0 },
        Step::Advance { ticks: 30 },
        Step::Connect { peer: 0 },
        Step::Hello {
            peer: 0,
            restart: 1,
        },
        Step::Advance { ticks: 250 },
        Step::Advance { ticks: 250 },
    ]);
    seeds.push(("syn-restart-idle".into(), program(1, s)));

    // Finding 2: any incarnation is accepted, u64::MAX included.
    let mut s = handshake(0);
    s.push(Step::Raw {
        peer: 1,
        message: Message::Hello {
            actor: Actor::new("r1", "i0", u64::MAX),
            config_digest: crate::machine::DIGEST,
        },
    });
    s.push(Step::Advance { ticks: 10 });
    seeds.push(("hostile-hello-max-incarnation".into(), program(0, s)));

    // Finding 4: Hellos with rising incarnations.
    let mut s = handshake(0);
    for _ in 0..40 {
        s.push(Step::Hello {
            peer: 1,
            restart: 1,
        });
    }
    s.push(Step::Advance { ticks: 10 });
    seeds.push(("hostile-hello-flood".into(), program(0, s)));

    // Finding 3: a transfer or a handover naming a future incarnation of ours.
    let mut s = handshake(0);
    s.push(Step::Raw {
        peer: 1,
        message: Message::Transfer(Transfer {
            policy: STRICT,
            key: key(0),
            from: 1,
            from_incarnation: PEER_INCARNATION,
            to: 0,
            given: Col {
                total: 1,
                to_inc: MY_INCARNATION + 1,
                base: 0,
                epoch: 0,
            },
        }),
    });
    s.push(Step::AdmitStrict {
        policy: 1,
        key: 0,
        cost: 1,
    });
    seeds.push(("hostile-transfer-supersedes".into(), program(0, s)));
    let mut s = handshake(0);
    s.push(Step::Raw {
        peer: 2,
        message: Message::Handover(Handover {
            from: 2,
            from_incarnation: PEER_INCARNATION,
            to: 0,
            to_incarnation: MY_INCARNATION + 1,
            settled: true,
            chunk: 0,
            chunks: 1,
            entries: Vec::new(),
            floor: 0,
        }),
    });
    seeds.push(("hostile-handover-supersedes".into(), program(0, s)));

    // Finding 5: a column of u64::MAX, fake actors, the receiver's own cells, P = u64::MAX.
    let mut s = reclaimed(0);
    s.push(Step::Raw {
        peer: 1,
        message: Message::Transfer(Transfer {
            policy: STRICT,
            key: key(0),
            from: 1,
            from_incarnation: PEER_INCARNATION,
            to: 0,
            given: Col {
                total: u64::MAX,
                to_inc: MY_INCARNATION,
                base: 0,
                epoch: 0,
            },
        }),
    });
    s.push(Step::AdmitStrict {
        policy: 1,
        key: 0,
        cost: 3,
    });
    seeds.push(("hostile-transfer-max-total".into(), program(0, s)));
    let forged = |actors: Vec<Actor>, p: u64| -> Message {
        let counts = (0..actors.len() as u16).map(|a| (a, p, 0)).collect();
        Message::Delta {
            delta: Delta {
                from_version: 0,
                to_version: 1,
                chunk: 0,
                chunks: 1,
                actors,
                policies: vec![PolicyDelta {
                    policy: LONG,
                    base_sub: T0 / 6_000_000,
                    entries: vec![DeltaEntry {
                        key: key(0),
                        sub_off: 0,
                        counts,
                    }],
                }],
            },
            ack: Default::default(),
        }
    };
    let mut s = handshake(0);
    s.push(Step::Raw {
        peer: 1,
        message: forged(
            (0..8)
                .map(|i| Actor::new(format!("fake{i}"), "x", 1))
                .collect(),
            1,
        ),
    });
    seeds.push(("hostile-delta-fake-actors".into(), program(0, s)));
    let mut s = handshake(0);
    s.push(Step::Raw {
        peer: 2,
        message: forged(vec![victim.clone()], 7),
    });
    s.push(Step::AdmitEventual {
        policy: 0,
        key: 0,
        cost: 1,
        limit: 10,
    });
    seeds.push(("hostile-delta-own-cells".into(), program(0, s)));
    let mut s = handshake(0);
    s.push(Step::Raw {
        peer: 1,
        message: forged(vec![Actor::new("r1", "i0", PEER_INCARNATION)], u64::MAX),
    });
    s.push(Step::Advance { ticks: 10 });
    s.push(Step::AdmitEventual {
        policy: 0,
        key: 0,
        cost: 1,
        limit: 10,
    });
    seeds.push(("hostile-delta-max-count".into(), program(0, s)));

    // Finding 6: strict state stays once rights moved.
    let mut s = reclaimed(0);
    s.extend([
        Step::Give {
            peer: 1,
            key: 3,
            amount: 5,
        },
        Step::AdmitStrict {
            policy: 1,
            key: 3,
            cost: 2,
        },
        Step::Ask {
            peer: 2,
            key: 3,
            want: 4,
        },
        Step::Advance { ticks: 50 },
        Step::Sleep { ticks: 40 },
    ]);
    seeds.push(("hostile-strict-state-stays".into(), program(0, s)));

    // Peer input for slots that are not peers: ours and one past the list.
    let s = vec![
        Step::Connect { peer: 0 },
        Step::Connect { peer: 3 },
        Step::Raw {
            peer: 3,
            message: Message::KeepAlive,
        },
        Step::Raw {
            peer: 0,
            message: Message::Links(u64::MAX),
        },
        Step::Disconnect { peer: 3 },
    ];
    seeds.push(("edge-not-peers".into(), program(0, s)));
    seeds
}

/// `gossip_machine` seeds, and the messages of the recorded runs.
pub fn machine() -> (Vec<Seed>, Vec<Message>) {
    let (mut seeds, messages) = recorded();
    seeds.extend(written());
    (seeds, messages)
}

/// `frame_decoder` seeds from `messages`: one of each variant alone, every variant in one
/// stream cut in several ways, and broken streams.
pub fn frames(messages: &[Message]) -> Vec<Seed> {
    let frame = |m: &Message| {
        codec::encode(m, DEFAULT_MAX_FRAME).unwrap_or_else(|e| panic!("seed frame: {e}"))
    };
    // The largest message of each variant, so the seeds carry non-trivial payloads.
    let mut by_variant: BTreeMap<&'static str, &Message> = BTreeMap::new();
    for m in messages {
        let variant = variant(m);
        let bigger = by_variant
            .get(variant)
            .is_none_or(|old| frame(old).len() < frame(m).len());
        if bigger && frame(m).len() <= 4096 {
            by_variant.insert(variant, m);
        }
    }
    let mut seeds = Vec::new();
    for (variant, m) in &by_variant {
        let mut bytes = vec![0];
        bytes.extend(frame(m));
        seeds.push((format!("frame-{variant}"), bytes));
    }
    let stream: Vec<u8> = by_variant.values().flat_map(|m| frame(m)).collect();
    for shape in [1u8, 3, 7, 64, 255] {
        let mut bytes = vec![shape];
        bytes.extend(&stream);
        seeds.push((format!("stream-chunks-{shape}"), bytes));
    }
    let ack = frame(&Message::KeepAlive);
    let mut wrong_version = ack.clone();
    wrong_version[2] = VERSION + 1;
    wrong_version.extend(&ack);
    seeds.push((
        "broken-version-then-frame".into(),
        [vec![0], wrong_version].concat(),
    ));
    let mut garbage = MAGIC.to_vec();
    garbage.push(VERSION);
    garbage.extend(3u32.to_be_bytes());
    garbage.extend([0xff, 0xff, 0xff]);
    garbage.extend(&ack);
    seeds.push((
        "broken-payload-then-frame".into(),
        [vec![2], garbage].concat(),
    ));
    let mut trailing = frame(&Message::Links(5));
    trailing[HEADER_LEN - 1] += 1;
    trailing.push(0);
    seeds.push(("broken-trailing-byte".into(), [vec![0], trailing].concat()));
    seeds.push((
        "broken-magic".into(),
        [vec![0], b"GET / HTTP/1.1\r\n".to_vec()].concat(),
    ));
    let mut too_large = MAGIC.to_vec();
    too_large.push(VERSION);
    too_large.extend(u32::MAX.to_be_bytes());
    seeds.push(("broken-too-large".into(), [vec![1], too_large].concat()));
    let mut truncated = frame(
        by_variant
            .get("FullState")
            .copied()
            .unwrap_or(&Message::KeepAlive),
    );
    truncated.truncate(truncated.len() / 2);
    seeds.push(("broken-truncated".into(), [vec![5], truncated].concat()));
    seeds
}

fn variant(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Delta { .. } => "Delta",
        Message::FullState { .. } => "FullState",
        Message::Ack(_) => "Ack",
        Message::Announce(_) => "Announce",
        Message::Ask(_) => "Ask",
        Message::Transfer(_) => "Transfer",
        Message::Handover(_) => "Handover",
        Message::Digest { .. } => "Digest",
        Message::KeepAlive => "KeepAlive",
        Message::Links(_) => "Links",
        Message::Settled(_) => "Settled",
        Message::Quotas(_) => "Quotas",
    }
}

/// Every message variant, for the frame corpus when a recorded run lacks one.
pub fn every_variant() -> Vec<Message> {
    let actor = Actor::new("r1", "i0", 1);
    vec![
        Message::Hello {
            actor: actor.clone(),
            config_digest: crate::machine::DIGEST,
        },
        Message::Ack(Default::default()),
        Message::Digest {
            digest: 0x1234_5678,
            version: 9,
        },
        Message::KeepAlive,
        Message::Links(0b101),
        Message::Quotas(vec![(STRICT, 10)]),
        Message::Settled(tollgate::crdt::bounded::Settled {
            policy: STRICT,
            key: "ip:10.0.0.1".into(),
            from: 1,
            from_incarnation: 1,
            to: 0,
            epoch: 1,
        }),
        Message::Handover(Handover {
            from: 1,
            from_incarnation: 1,
            to: 0,
            to_incarnation: 1,
            settled: true,
            chunk: 0,
            chunks: 1,
            entries: vec![tollgate::crdt::bounded::HandoverEntry {
                policy: STRICT,
                key: key(0),
                you_gave_me: Col::default(),
                i_gave_you: Col {
                    total: 3,
                    to_inc: 1,
                    base: 0,
                    epoch: 0,
                },
            }],
            floor: 0,
        }),
    ]
}
