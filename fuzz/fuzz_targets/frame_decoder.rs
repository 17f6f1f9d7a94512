//! Arbitrary bytes in arbitrary chunks into the gossip frame decoder (see `frames.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_fuzz::frames::run(data));
