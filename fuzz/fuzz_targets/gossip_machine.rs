//! Programs of peer messages, time and admissions against one gossip machine (see
//! `machine/mod.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::machine::run(data));
