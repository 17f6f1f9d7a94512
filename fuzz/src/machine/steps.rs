//! The `gossip_machine` input language: a sequence of steps, each an opcode byte and its
//! operands. Parsing is total (every byte string is a program; it ends where the bytes do
//! or where a raw message fails to decode), and [`Step::write`] is its inverse, so the seed
//! corpus is written as steps.

use tollgate::gossip::proto::Message;

/// The bincode configuration of `codec.rs`, with a limit: a raw message in the input may not
/// make the harness itself allocate what its length fields claim.
pub fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<65536>()
}

/// One step. Peers are slot indices (`% 4`: 3 names no slot, and our own slot names no
/// peer either); keys are indices into a small set (see `machine::KEYS`) so that steps meet
/// on the same keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Time passes by `(ticks + 1) × 10 ms`, with every timer handled as a driver would.
    Advance { ticks: u8 },
    /// The process sleeps `(ticks + 1) × 10 s` (a stalled VM) and then handles its timers once.
    Sleep { ticks: u8 },
    /// A connection with `peer` comes up.
    Connect { peer: u8 },
    /// The connection with `peer` goes away (or a dial failed).
    Disconnect { peer: u8 },
    /// `peer` sends `message` (in the input: bincode, as in a frame's payload).
    Raw { peer: u8, message: Message },
    /// `peer` sends a valid `Hello` on the current connection; `restart > 0` makes it a
    /// newer incarnation (which a live connection refuses: a restart comes on a new one).
    Hello { peer: u8, restart: u8 },
    /// `peer` dials us: a new connection whose first message is its valid `Hello`, vetted
    /// before it replaces the live link, as the driver does; `restart` as in `Hello`.
    Accept { peer: u8, restart: u8 },
    /// `peer` announces itself (no handover wanted) and hands over to us, settled and empty,
    /// as a peer that never exchanged rights with our slot does.
    HandOver { peer: u8 },
    /// `peer` asks for `want` rights on a key.
    Ask { peer: u8, key: u8, want: u8 },
    /// `peer` gives us up to `amount` rights on a key, no more than it can honestly hold.
    Give { peer: u8, key: u8, amount: u8 },
    /// `peer` reports `p` admissions (and `n` refunds) of its own on a key, this sub-window.
    Usage {
        peer: u8,
        policy: u8,
        key: u8,
        p: u8,
        n: u8,
    },
    /// We admit `cost` on a key under an eventual policy with `limit`.
    AdmitEventual {
        policy: u8,
        key: u8,
        cost: u8,
        limit: u8,
    },
    /// We admit `cost` on a key under a strict policy.
    AdmitStrict { policy: u8, key: u8, cost: u8 },
    /// We refund `n` admissions made `ago × 10 ms` ago (eventual and strict).
    Refund { policy: u8, key: u8, ago: u8, n: u8 },
    /// `handle_timeout` and `gc` now, whatever is due.
    Timeout,
    /// Graceful shutdown.
    Retire,
    /// The admin endpoint's view of a key.
    Inspect { policy: u8, key: u8 },
}

const OPCODES: u8 = 17;

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(b)
    }
}

/// Parses `bytes` into steps (see the module docs).
pub fn parse(bytes: &[u8]) -> Vec<Step> {
    let mut r = Reader { bytes };
    let mut steps = Vec::new();
    while let Some(step) = next(&mut r) {
        steps.push(step);
    }
    steps
}

fn next(r: &mut Reader<'_>) -> Option<Step> {
    let op = r.byte()? % OPCODES;
    let step = match op {
        0 => Step::Advance { ticks: r.byte()? },
        1 => Step::Sleep { ticks: r.byte()? },
        2 => Step::Connect { peer: r.byte()? },
        3 => Step::Disconnect { peer: r.byte()? },
        4 => {
            let peer = r.byte()?;
            let (message, used) =
                bincode::serde::decode_from_slice::<Message, _>(r.bytes, bincode_config()).ok()?;
            r.bytes = r.bytes.get(used..)?;
            Step::Raw { peer, message }
        }
        5 => Step::Hello {
            peer: r.byte()?,
            restart: r.byte()?,
        },
        6 => Step::HandOver { peer: r.byte()? },
        7 => Step::Ask {
            peer: r.byte()?,
            key: r.byte()?,
            want: r.byte()?,
        },
        8 => Step::Give {
            peer: r.byte()?,
            key: r.byte()?,
            amount: r.byte()?,
        },
        9 => Step::Usage {
            peer: r.byte()?,
            policy: r.byte()?,
            key: r.byte()?,
            p: r.byte()?,
            n: r.byte()?,
        },
        10 => Step::AdmitEventual {
            policy: r.byte()?,
            key: r.byte()?,
            cost: r.byte()?,
            limit: r.byte()?,
        },
        11 => Step::AdmitStrict {
            policy: r.byte()?,
            key: r.byte()?,
            cost: r.byte()?,
        },
        12 => Step::Refund {
            policy: r.byte()?,
            key: r.byte()?,
            ago: r.byte()?,
            n: r.byte()?,
        },
        13 => Step::Timeout,
        14 => Step::Retire,
        15 => Step::Inspect {
            policy: r.byte()?,
            key: r.byte()?,
        },
        _ => Step::Accept {
            peer: r.byte()?,
            restart: r.byte()?,
        },
    };
    Some(step)
}

impl Step {
    /// Appends this step's bytes to `out` (the inverse of [`parse`]).
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Step::Advance { ticks } => out.extend([0, *ticks]),
            Step::Sleep { ticks } => out.extend([1, *ticks]),
            Step::Connect { peer } => out.extend([2, *peer]),
            Step::Disconnect { peer } => out.extend([3, *peer]),
            Step::Raw { peer, message } => {
                out.extend([4, *peer]);
                let bytes = bincode::serde::encode_to_vec(message, bincode_config())
                    .unwrap_or_else(|e| panic!("a seed message does not encode: {e}"));
                out.extend(bytes);
            }
            Step::Hello { peer, restart } => out.extend([5, *peer, *restart]),
            Step::HandOver { peer } => out.extend([6, *peer]),
            Step::Ask { peer, key, want } => out.extend([7, *peer, *key, *want]),
            Step::Give { peer, key, amount } => out.extend([8, *peer, *key, *amount]),
            Step::Usage {
                peer,
                policy,
                key,
                p,
                n,
            } => out.extend([9, *peer, *policy, *key, *p, *n]),
            Step::AdmitEventual {
                policy,
                key,
                cost,
                limit,
            } => out.extend([10, *policy, *key, *cost, *limit]),
            Step::AdmitStrict { policy, key, cost } => out.extend([11, *policy, *key, *cost]),
            Step::Refund {
                policy,
                key,
                ago,
                n,
            } => out.extend([12, *policy, *key, *ago, *n]),
            Step::Timeout => out.push(13),
            Step::Retire => out.push(14),
            Step::Inspect { policy, key } => out.extend([15, *policy, *key]),
            Step::Accept { peer, restart } => out.extend([16, *peer, *restart]),
        }
    }
}

/// The bytes of a program.
pub fn write_all(steps: &[Step]) -> Vec<u8> {
    let mut out = Vec::new();
    for step in steps {
        step.write(&mut out);
    }
    out
}
