//! The simulated geography. The network itself (per-message delay, loss, duplication and
//! cuts) is tollgate's in-memory network, [`tollgate::gossip::proto::net`], the one the
//! machine's own multi-node tests run on.

pub use tollgate::gossip::proto::net::{MAX_NODES as MAX_GATEWAYS, NetParams, Network, unit};

/// Microseconds per millisecond.
pub const MS: u64 = 1_000;
/// Microseconds per second.
pub const SEC: u64 = 1_000_000;

/// The simulated regions of the main tables, in slot order (the configured slot list every
/// region shares).
pub const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// Number of regions of the main tables.
pub const N_REGIONS: usize = REGIONS.len();

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

/// The geographic network of the main tables: [`DEFAULT_RTT_US`], 5% jitter, nothing lost.
pub fn geographic() -> NetParams {
    NetParams {
        rtt_us: DEFAULT_RTT_US,
        jitter: 0.05,
        reorder_us: 0,
        loss: 0.0,
        dup: 0.0,
    }
}
