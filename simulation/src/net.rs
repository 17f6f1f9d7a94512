//! The in-memory network: geography, per-message delay, loss, duplication and cuts.
//!
//! Latency is drawn per message (so two messages on one link can overtake each other: that
//! is the reordering), from half the configured round trip plus a symmetric jitter and an
//! optional extra reordering delay. Loss and duplication apply per message. This is harsher
//! than production, where QUIC retransmits lost packets and keeps a stream in order: the
//! gossip machine is built to survive message-level loss, duplication and reordering, so the
//! simulator exercises exactly that.

use std::collections::BTreeSet;

use tollgate::gossip::proto::SplitMix64;

/// Microseconds per millisecond.
pub const MS: u64 = 1_000;
/// Microseconds per second.
pub const SEC: u64 = 1_000_000;

/// The simulated regions of the main tables, in slot order (the configured slot list every
/// region shares).
pub const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// Number of regions of the main tables.
pub const N_REGIONS: usize = REGIONS.len();

/// The most gateways a world can have: the main tables' three regions, then a second
/// instance in us-east (the shipped deployment has two there, four gateways in all) and
/// sa-east, for the byzantine family's larger meshes.
pub const MAX_GATEWAYS: usize = 5;

/// Every gateway a world may have, as `(region, instance)`, in slot order: a world of `n`
/// gateways runs the first `n`.
pub const GATEWAYS: [(&str, &str); MAX_GATEWAYS] = [
    ("us-east", "i0"),
    ("eu-west", "i0"),
    ("ap-south", "i0"),
    ("us-east", "i1"),
    ("sa-east", "i0"),
];

/// Gateway `g`'s name as tables print it: its region, with the instance when the region
/// has several.
pub fn gateway_name(g: usize) -> String {
    match GATEWAYS.get(g) {
        Some((region, "i0")) => (*region).to_owned(),
        Some((region, instance)) => format!("{region}/{instance}"),
        None => format!("gateway-{g}"),
    }
}

/// Default round trips between gateways, from real inter-region measurements: us-east to
/// eu-west about 75 ms, eu-west to ap-south about 120 ms, us-east to ap-south about 200 ms;
/// the two us-east instances 1 ms apart; sa-east 115 ms from us-east, 190 ms from eu-west and
/// 300 ms from ap-south.
pub const DEFAULT_RTT_US: [[u64; MAX_GATEWAYS]; MAX_GATEWAYS] = [
    [0, 75 * MS, 200 * MS, MS, 115 * MS],
    [75 * MS, 0, 120 * MS, 75 * MS, 190 * MS],
    [200 * MS, 120 * MS, 0, 200 * MS, 300 * MS],
    [MS, 75 * MS, 200 * MS, 0, 115 * MS],
    [115 * MS, 190 * MS, 300 * MS, 115 * MS, 0],
];

/// The largest round trip between the main tables' regions.
pub const MAX_RTT_US: u64 = 200 * MS;

/// How a network behaves, per message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetParams {
    /// Round trip per pair of gateways (a world of `n` uses the first `n` rows).
    pub rtt_us: [[u64; MAX_GATEWAYS]; MAX_GATEWAYS],
    /// Jitter as a fraction of the one-way delay, drawn uniformly in `[-j, +j]`.
    pub jitter: f64,
    /// Extra delay drawn uniformly in `[0, reorder_us]` (lets messages overtake each other).
    pub reorder_us: u64,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub dup: f64,
}

impl Default for NetParams {
    fn default() -> Self {
        Self {
            rtt_us: DEFAULT_RTT_US,
            jitter: 0.05,
            reorder_us: 0,
            loss: 0.0,
            dup: 0.0,
        }
    }
}

/// A uniform float in `[0, 1)` from 53 random bits.
pub fn unit(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The network state: parameters, the directed links currently cut, and its own RNG.
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
