//! Fuzz targets for the gossip input path (issue #13): the frame decoder and the gossip state
//! machine. The harnesses live here, so that `make_corpus` and the targets share them; the
//! targets in `fuzz_targets/` only hand libFuzzer's input over.
//!
//! Run with `cargo +nightly fuzz run frame_decoder` or `gossip_machine` from the repository
//! (see the README's "Fuzzing").

pub mod alloc_meter;
pub mod frames;
pub mod machine;
pub mod seeds;

#[global_allocator]
static METER: alloc_meter::Meter = alloc_meter::Meter;
