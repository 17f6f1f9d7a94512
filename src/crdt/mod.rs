//! PURE data structures for global rate limits: what the regions tell each other, and the
//! rules that keep N actors together under one limit.
//!
//! Nothing here does IO, reads a clock, draws a random number or depends on `HashMap`
//! iteration order: every function that needs time takes `now_us` (microseconds on the
//! caller's clock), and every output is a function of the inputs, so the simulator replays a
//! run exactly. The gossip layer (`gossip::proto`) drives these types and ships their messages
//! (all `serde` structs meant for bincode 2).
//!
//! - [`window`]: the sliding window cut into sub-windows, and the rule that makes "never more
//!   than `q` in any interval of length `w`" hold.
//! - [`actor`]: [`Actor`] (region, instance, incarnation: one process lifetime), [`Slot`]
//!   (the seat), and the compact [`ActorTable`].
//! - [`usage`]: eventual mode's state, sliding usage per `(policy, key)` as compact
//!   PN-counters in a [`UsageTable`], with versioned, chunked [`Delta`]s, full-state chunks
//!   for anti-entropy, a digest, GC and eviction at the key cap; peers' counts are judged
//!   by what their authors could honestly have claimed. Property-tested against
//!   `crdts::PNCounter`.
//! - [`eventual`]: eventual mode's admission rule ([`eventual_admit`]) and the acknowledgement
//!   bookkeeping it needs ([`AckBook`], [`UnackedLog`]), bundled in [`EventualNode`].
//! - [`bounded`]: strict mode, a bounded counter (escrow) per `(policy, key)` with rights
//!   transfers and safe restarts ([`BoundedTable`]).
//! - [`wire`]: decoding a peer's sequences without preallocating what their length prefixes
//!   claim.
//!
//! # Guarantees (each property-tested in its module)
//!
//! - Eventual: `N` actors, each applying [`eventual_admit`] against its own stale merged view,
//!   with deltas and acks lost, duplicated, reordered and chunked, never admit more than the
//!   limit in any interval of length `w` (clocks assumed in step); one of them sending
//!   arbitrary forged deltas and acks cannot make the others admit more than the limit plus
//!   its own share.
//! - Strict: with skewed clocks, loss, duplication, reordering, delay, partitions and restarts,
//!   never more than the quota in any interval of length `w` on a reference timeline, and the
//!   rights held plus live consumption never exceed the quota.
//! - Usage merges are idempotent, commutative and associative; a full-state exchange repairs
//!   any loss; counts equal `crdts::PNCounter`'s.

#![deny(missing_docs)]

pub mod actor;
pub mod bounded;
pub mod eventual;
mod hash;
pub mod usage;
pub mod window;
pub mod wire;

pub use actor::{Actor, ActorIdx, ActorTable, Slot};
pub use bounded::{
    Announce, Ask, BoundedTable, Col, Handover, Outgoing, Settled, StrictPolicy, Transfer,
};
pub use eventual::{Ack, AckBook, EventualNode, UnackedLog, eventual_admit};
pub use usage::{
    Delta, DeltaEntry, EventualPolicy, MergeReport, PolicyDelta, PolicyId, UsageLimits, UsageTable,
};
pub use window::WindowSpec;
