//! An in-memory network for driving several gossip machines: per-message delay, loss,
//! duplication and cuts, all drawn from one seeded PRNG, so a run is a function of its seed.
//!
//! Shared by the machine's multi-node tests (`proto/tests.rs`) and the simulator
//! (`simulation/`): both exercise the machine on the same model of a network, and a
//! behaviour seen in one can be reproduced in the other.
//!
//! Latency is drawn per message (so two messages on one link can overtake each other: that
//! is the reordering), from half the configured round trip plus a symmetric jitter and an
//! optional extra reordering delay. Loss and duplication apply per message. This is harsher
//! than production, where QUIC retransmits lost packets and keeps a stream in order: the
//! machine is built to survive message-level loss, duplication and reordering, so the
//! network exercises exactly that.
//!
//! Pure: it decides what happens to a message; the caller's event queue delivers it.

use std::collections::BTreeSet;

use super::rng::SplitMix64;

/// The most nodes a network connects.
pub const MAX_NODES: usize = 5;

/// How a network behaves, per message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetParams {
    /// Round trip (µs) per pair of nodes (a network of `n` nodes uses the first `n` rows).
    pub rtt_us: [[u64; MAX_NODES]; MAX_NODES],
    /// Jitter as a fraction of the one-way delay, drawn uniformly in `[-j, +j]`.
    pub jitter: f64,
    /// Extra delay drawn uniformly in `[0, reorder_us]` (lets messages overtake each other).
    pub reorder_us: u64,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub dup: f64,
}

impl NetParams {
    /// The same round trip between every two nodes, no loss, no duplication.
    pub fn uniform(rtt_us: u64, jitter: f64) -> Self {
        let mut rtt = [[rtt_us; MAX_NODES]; MAX_NODES];
        for (i, row) in rtt.iter_mut().enumerate() {
            row[i] = 0;
        }
        Self {
            rtt_us: rtt,
            jitter,
            reorder_us: 0,
            loss: 0.0,
            dup: 0.0,
        }
    }

    /// The longest one-way delay a message between `from` and `to` can take.
    pub fn max_delay_us(&self, from: usize, to: usize) -> u64 {
        let base = self.rtt_us[from][to] / 2;
        let jitter = (self.jitter * base as f64).ceil() as u64;
        base.saturating_add(jitter).saturating_add(self.reorder_us)
    }
}

/// A uniform float in `[0, 1)` from 53 random bits.
pub fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The network state: parameters, the directed links currently cut, and its own PRNG.
#[derive(Debug, Clone)]
pub struct Network {
    params: NetParams,
    /// Directed `(from, to)` pairs whose messages are dropped.
    blocked: BTreeSet<(usize, usize)>,
    rng: SplitMix64,
}

impl Network {
    /// A network with nothing cut.
    pub fn new(params: NetParams, seed: u64) -> Self {
        Self {
            params,
            blocked: BTreeSet::new(),
            rng: SplitMix64::new(seed),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// Changes how messages fare from now on (a lossy phase ends, say).
    pub fn set_params(&mut self, params: NetParams) {
        self.params = params;
    }

    /// Whether `from` can currently reach `to`.
    pub fn open(&self, from: usize, to: usize) -> bool {
        !self.blocked.contains(&(from, to))
    }

    /// Whether both directions between `a` and `b` are open (what a handshake needs).
    pub fn both_open(&self, a: usize, b: usize) -> bool {
        self.open(a, b) && self.open(b, a)
    }

    /// Cuts the directed link `from → to`.
    pub fn cut_one_way(&mut self, from: usize, to: usize) {
        self.blocked.insert((from, to));
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut(&mut self, a: usize, b: usize) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Cuts `island` off from every other of `nodes` nodes.
    pub fn isolate(&mut self, island: usize, nodes: usize) {
        for other in (0..nodes).filter(|&o| o != island) {
            self.cut(island, other);
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// A one-way delay for a message from `from` to `to`.
    pub fn delay(&mut self, from: usize, to: usize) -> u64 {
        let base = self.params.rtt_us[from][to] / 2;
        let jitter = (2.0 * unit(&mut self.rng) - 1.0) * self.params.jitter * base as f64;
        let extra = if self.params.reorder_us > 0 {
            self.rng.up_to(self.params.reorder_us)
        } else {
            0
        };
        // Never below 1 µs: a message cannot arrive at the instant it was sent.
        ((base as f64 + jitter).max(1.0) as u64).saturating_add(extra)
    }

    /// How many copies of a message arrive: 0 (lost), 1, or 2 (duplicated).
    pub fn copies(&mut self) -> u32 {
        if self.rng.chance(self.params.loss) {
            0
        } else if self.rng.chance(self.params.dup) {
            2
        } else {
            1
        }
    }
}
