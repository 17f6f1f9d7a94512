//! What a hostile gossip frame costs its receiver in memory while it decodes.
//!
//! A sequence's length prefix is a claim: before `crdt::wire`, serde preallocated up to
//! 1 MiB for each claimed sequence, so a 15-byte frame cost its receiver a megabyte per
//! sequence field. This test binary counts the bytes allocated on the decoding thread (its
//! own global allocator) and asserts that a frame's peak is bounded by its own length plus
//! a small constant, whatever it claims.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tollgate::crdt::{Ack, Delta};
use tollgate::gossip::codec::{self, CodecError, Decoder};
use tollgate::gossip::proto::Message;

/// Counts live and peak bytes of the threads that asked for it; other threads (the test
/// harness's) pass straight through.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn add(bytes: usize) {
    if COUNTING.with(Cell::get) {
        let live = LIVE.with(|l| {
            l.set(l.get() + bytes);
            l.get()
        });
        PEAK.with(|p| p.set(p.get().max(live)));
    }
}

fn sub(bytes: usize) {
    if COUNTING.with(Cell::get) {
        LIVE.with(|l| l.set(l.get().saturating_sub(bytes)));
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are thread-local
// `Cell`s with const initialisers, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        sub(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size);
        sub(layout.size());
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The peak of bytes allocated while `frame` decodes, and what the decoder said.
fn decode_peak(frame: &[u8]) -> (usize, Result<Option<Message>, CodecError>) {
    let mut decoder = Decoder::new(codec::DEFAULT_MAX_FRAME);
    decoder.extend(frame);
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    COUNTING.with(|c| c.set(true));
    let result = decoder.decode::<Message>();
    COUNTING.with(|c| c.set(false));
    (PEAK.with(Cell::get), result)
}

/// Replaces the payload byte at `at` (a length prefix of 0 in an honest encoding) by a
/// claim of 2^40 elements, and fixes the header's length.
fn claim_huge_sequence(honest: &Message, at: usize) -> Vec<u8> {
    let frame = codec::encode(honest, codec::DEFAULT_MAX_FRAME).unwrap();
    let mut payload = frame[codec::HEADER_LEN..].to_vec();
    assert_eq!(
        payload[at], 0,
        "byte {at} of {payload:?} is not an empty length"
    );
    // bincode's varint: 0xFD, then a little-endian u64.
    let mut claim = vec![0xFD];
    claim.extend_from_slice(&(1u64 << 40).to_le_bytes());
    payload.splice(at..=at, claim);
    let mut hostile = codec::MAGIC.to_vec();
    hostile.push(codec::VERSION);
    hostile.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    hostile.extend_from_slice(&payload);
    hostile
}

/// What a frame may cost beyond its own length: the decode's fixed allocations plus one
/// bounded reservation per nesting level.
const ALLOWANCE: usize = 16 * 1024;

/// `frame` is refused as an undecodable payload, and its decode peaked within the bound.
fn assert_refused_within_bound(name: &str, frame: &[u8]) {
    let (peak, result) = decode_peak(frame);
    println!("{name}: a {}-byte frame, peak {peak} bytes", frame.len());
    assert!(
        matches!(result, Err(CodecError::Payload(_))),
        "{name}: {result:?}"
    );
    assert!(
        peak <= frame.len() * 32 + ALLOWANCE,
        "{name}: a {}-byte frame claiming 2^40 elements allocated {peak} bytes",
        frame.len()
    );
}

#[test]
fn a_claimed_sequence_costs_what_arrived_not_what_it_claims() {
    let empty_delta = Delta {
        from_version: 0,
        to_version: 0,
        chunk: 0,
        chunks: 1,
        actors: Vec::new(),
        policies: Vec::new(),
    };
    let cases = [
        // Variant index, then the length: the last byte of the payload.
        ("quotas", Message::Quotas(Vec::new()), 1),
        // Variant, from_version, to_version, chunk, chunks, then the actors' length.
        (
            "delta actors",
            Message::Delta {
                delta: empty_delta.clone(),
                ack: Ack::default(),
            },
            5,
        ),
        (
            "delta policies",
            Message::FullState {
                delta: empty_delta,
                ack: Ack::default(),
            },
            6,
        ),
    ];
    for (name, honest, at) in cases {
        assert_refused_within_bound(name, &claim_huge_sequence(&honest, at));
    }
}

/// Frames that nest claimed sequences, from the fuzz corpus
/// (`fuzz/corpus/frame_decoder/regress-prealloc-*`, without the harness's first byte): a
/// `Delta` whose policies, a policy's entries and an entry's counts each claim 2^40, and a
/// `Handover` whose entries claim 2^40.
const NESTED_CLAIMS: [(&str, &[u8]); 2] = [
    (
        "delta policies, entries and counts",
        &[
            0x54, 0x47, 0x01, 0x00, 0x00, 0x00, 0x25, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0xfd,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x01, 0x00, 0xfd, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
            0x00, 0x00,
        ],
    ),
    (
        "handover entries",
        &[
            0x54, 0x47, 0x01, 0x00, 0x00, 0x00, 0x11, 0x07, 0x01, 0x01, 0x00, 0x01, 0x01, 0x00,
            0x01, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
        ],
    ),
];

#[test]
fn nested_claimed_sequences_cost_a_bounded_reservation_each() {
    for (name, frame) in NESTED_CLAIMS {
        assert_refused_within_bound(name, frame);
    }
}

#[test]
fn an_honest_frame_decodes_under_the_counting_allocator() {
    let honest = Message::Quotas(vec![(1, 10), (2, 20)]);
    let frame = codec::encode(&honest, codec::DEFAULT_MAX_FRAME).unwrap();
    let (peak, result) = decode_peak(&frame);
    assert_eq!(result.unwrap(), Some(honest));
    assert!(peak > 0, "the counter saw the decoded vector");
}
