//! A deterministic discrete-event simulator of tollgate's global rate limits.
//!
//! It drives three regions' **production** state machines, [`tollgate::gossip::proto::Gossip`]
//! and the [`tollgate::crdt`] types inside it, over an in-memory network with virtual time:
//! a latency matrix from real inter-region round trips, jitter, loss, duplication and
//! reordering, scheduled partitions (full, one region cut off, asymmetric) and heals, region
//! crashes and restarts (a new incarnation with fresh state), and per-region clock offsets.
//! Nothing is re-implemented: every admission decision is a call into the production code,
//! and every gossip message goes through the production codec.
//!
//! The same seeds give byte-identical output: virtual time only (no wall clock), seeded
//! [`tollgate::gossip::proto::SplitMix64`] generators only, and `BTreeMap`/`Vec` everywhere
//! (no hash-order iteration), ties in the event queue broken by a sequence number.
//!
//! # Layout
//!
//! - [`net`]: geography (regions, round trips) and the per-message network model.
//! - [`scenario`]: the policies, the timeline, the workloads and the named scenarios.
//! - [`world`]: the event loop that runs the production machines for `eventual` and `strict`.
//! - [`baseline`]: `none` (each region alone), `central` (one store in us-east) and the exact
//!   reference false rejections are measured against, each a single-slot production machine.
//! - [`metrics`]: over-admission on sliding intervals, false rejections, and the bounds.
//! - [`runner`]: scenarios × modes × seeds, aggregation into rows, bound checks.
//! - [`adversary`]: the byzantine gateway's hook on its outgoing messages and its strategies.
//! - [`byzantine`]: the byzantine scenario family, its measures, bounds and table.
//! - [`report`]: the stdout table, the CSV and the SVG plot.
//! - `main.rs`: the command line.

pub mod adversary;
pub mod baseline;
pub mod byzantine;
pub mod metrics;
pub mod net;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod world;
