//! The `frame_decoder` target: arbitrary bytes, cut into arbitrary chunks, fed to the gossip
//! [`Decoder`] as a QUIC stream would deliver them.
//!
//! Input layout: the first byte chooses the chunking (0: everything at once; `s > 0`: chunks
//! of pseudo-random sizes in `1..=s`, drawn from a generator seeded with `s`), the rest is
//! the stream. Checked after every call:
//!
//! - nothing panics or aborts (an allocation the system refuses aborts the process, which
//!   libFuzzer reports as a crash);
//! - the decoder never buffers more than it was fed, and a broken stream stays broken;
//! - the heap the decoder and its output hold at their peak stays within
//!   [`MemoryBound`] of the bytes fed: a frame costs its own size (times the in-memory
//!   expansion of a decoded message) plus a constant, never what a length field claims;
//! - every message decoded re-encodes to a frame that decodes to the same message.

use std::sync::OnceLock;

use tollgate::gossip::codec::{self, DEFAULT_MAX_FRAME, Decoder};
use tollgate::gossip::proto::Message;

use crate::alloc_meter;

/// What the decoder may hold at its peak for `fed` bytes: `expansion × fed + slack`.
///
/// `expansion` covers the buffer (a `BytesMut` doubles as it grows, and a split frame keeps
/// the old allocation alive next to the new one) and a decoded message's in-memory size
/// against its varint encoding (an `Actor` or a `DeltaEntry` is ~19 times its smallest
/// encoding). `slack` is the constant of "its own size plus a constant": a sequence
/// reserves at most 4 KiB from its claimed length before its elements decode
/// (`tollgate::crdt::wire`), and a `Delta` nests three sequences, so a 44-byte frame holds
/// 12 KiB for a moment (`corpus/frame_decoder/regress-prealloc-delta-3mib`; 3 MiB before
/// the claims stopped being preallocated, which this slack would catch).
#[derive(Debug, Clone, Copy)]
pub struct MemoryBound {
    pub expansion: usize,
    pub slack: usize,
}

impl MemoryBound {
    /// 48 × fed + 256 KiB, or the slack from `TOLLGATE_FUZZ_FRAME_SLACK` (bytes).
    pub fn from_env() -> Self {
        let slack = std::env::var("TOLLGATE_FUZZ_FRAME_SLACK")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(256 << 10);
        Self {
            expansion: 48,
            slack,
        }
    }

    fn allows(&self, fed: usize) -> usize {
        fed.saturating_mul(self.expansion)
            .saturating_add(self.slack)
    }
}

fn bound() -> MemoryBound {
    static BOUND: OnceLock<MemoryBound> = OnceLock::new();
    *BOUND.get_or_init(MemoryBound::from_env)
}

/// The chunk sizes for a chunking byte: a small xorshift, so one byte names a whole shape.
struct Chunks {
    state: u32,
    max: u32,
}

impl Chunks {
    fn new(shape: u8) -> Self {
        Self {
            state: u32::from(shape).wrapping_mul(0x9e37_79b9) | 1,
            max: u32::from(shape),
        }
    }

    fn next_len(&mut self, rest: usize) -> usize {
        if self.max == 0 {
            return rest;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        let len = 1 + self.state % self.max;
        usize::try_from(len).map_or(rest, |len| len.min(rest))
    }
}

/// One fuzz input (see the module docs).
pub fn run(data: &[u8]) {
    let Some((&shape, mut stream)) = data.split_first() else {
        return;
    };
    let bound = bound();
    let base = alloc_meter::live();
    let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
    let mut chunks = Chunks::new(shape);
    let mut fed = 0usize;
    let mut broken = None;
    while !stream.is_empty() {
        let (chunk, rest) = stream.split_at(chunks.next_len(stream.len()));
        stream = rest;
        let before = decoder.buffered();
        alloc_meter::reset_peak();
        decoder.extend(chunk);
        fed += chunk.len();
        check_memory(base, fed, bound, "extend");
        if broken.is_some() {
            assert_eq!(
                decoder.buffered(),
                before,
                "a broken stream buffered more bytes"
            );
        }
        loop {
            alloc_meter::reset_peak();
            let result = decoder.decode::<Message>();
            check_memory(base, fed, bound, "decode");
            assert!(
                decoder.buffered() <= fed,
                "buffered {} bytes of {fed} fed",
                decoder.buffered()
            );
            match result {
                Ok(Some(message)) => {
                    assert!(broken.is_none(), "a message decoded after {broken:?}");
                    round_trip(&message);
                }
                Ok(None) => {
                    assert!(broken.is_none(), "a broken stream waits for more bytes");
                    break;
                }
                Err(e) if e.is_recoverable() => {
                    assert!(broken.is_none(), "{e} after {broken:?}");
                }
                Err(e) => {
                    if let Some(first) = &broken {
                        assert_eq!(&e, first, "a broken stream changed its error");
                    }
                    broken = Some(e);
                    break;
                }
            }
        }
    }
}

fn check_memory(base: usize, fed: usize, bound: MemoryBound, call: &str) {
    let held = alloc_meter::peak().saturating_sub(base);
    assert!(
        held <= bound.allows(fed),
        "{call} held {held} heap bytes at its peak after {fed} bytes fed (bound {bound:?})"
    );
}

/// A decoded message frames and decodes back to itself.
fn round_trip(message: &Message) {
    let frame = codec::encode(message, DEFAULT_MAX_FRAME)
        .unwrap_or_else(|e| panic!("a decoded message does not re-encode: {e}"));
    let mut again = Decoder::new(DEFAULT_MAX_FRAME);
    again.extend(&frame);
    assert_eq!(again.decode::<Message>(), Ok(Some(message.clone())));
}
