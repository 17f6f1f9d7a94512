//! What the CRDT and gossip benchmarks share: one eventual policy and a 1,000-key delta.

use tollgate::crdt::{Actor, Delta, PolicyId, UsageTable, WindowSpec};

/// A realistic wall-clock instant (2025), so sub-window numbers are production-sized.
pub const NOW: u64 = 1_750_000_000_000_000;
/// The eventual policy every benchmark counts on.
pub const POLICY: PolicyId = 1;
/// Keys per delta: the figure issue 8 asks for.
pub const KEYS: usize = 1_000;

/// One minute in ten sub-windows, like `rate = "600/1m"`.
pub fn window() -> WindowSpec {
    WindowSpec::new(60_000_000, 10).expect("60 s divides into 10 sub-windows")
}

/// Client keys as the gateway writes them (`ip:` and an IPv4 address, 12 to 15 bytes).
pub fn keys() -> Vec<String> {
    (0..KEYS)
        .map(|i| format!("ip:10.0.{}.{}", i / 256, i % 256))
        .collect()
}

/// What `sender` gossips after admitting one request for each of [`KEYS`] keys at [`NOW`]:
/// one chunk, one changed cell per key.
pub fn delta_from(sender: &Actor) -> Delta {
    let mut table = UsageTable::new([(POLICY, window())]);
    let me = table.intern(sender).expect("a well-formed actor");
    for key in keys() {
        table
            .record(me, POLICY, &key, NOW, 1)
            .expect("a registered policy and a short key");
    }
    let mut chunks = table.deltas_since(0, KEYS, NOW);
    assert_eq!(chunks.len(), 1, "one chunk of {KEYS} entries");
    let delta = chunks.remove(0);
    assert_eq!(delta.entry_count(), KEYS);
    delta
}

/// Sets every count of `delta` to `p` admissions: a later delivery with a larger `p` raises
/// every cell, as the sender's next delta would after more admissions.
pub fn set_counts(delta: &mut Delta, p: u64) {
    for entry in delta
        .policies
        .iter_mut()
        .flat_map(|pd| pd.entries.iter_mut())
    {
        for count in &mut entry.counts {
            count.1 = p;
        }
    }
}
