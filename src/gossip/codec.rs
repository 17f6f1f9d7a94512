//! Gossip frames: `magic (2) | version (1) | length (4, big-endian) | bincode 2 payload`.
//!
//! A peer can send anything, so decoding never trusts it: the length is bounded before any
//! allocation, a frame of an unknown version or with a payload that does not decode is
//! dropped and counted, and garbage where a header should be (wrong magic, a length above the
//! bound) ends the stream, since there is no way to find the next frame boundary in it.
//! Nothing here panics on input (property-tested with random bytes, and fuzzed).
//!
//! # Memory a frame can cost
//!
//! The buffer grows only as bytes arrive: a header announcing a large frame reserves
//! nothing. Inside a payload, every length prefix is a claim the decoder cannot check until
//! it has read that many bytes, and bincode allocates a string's or byte buffer's claimed
//! length *before* reading it; without a limit a 17-byte frame claiming a 2^50-byte string
//! aborts the process. So the payload is decoded with a bincode limit derived from its own
//! length ([`claim_limit`]): what all values of a frame may claim is at most 32 times the
//! payload, and a claim beyond that is an error before anything is allocated.
//! Bincode does not check a sequence's claimed length against that limit, and serde would
//! preallocate up to 1 MiB for it; every sequence a message holds is decoded with
//! [`crate::crdt::wire::grown_vec`], which reserves at most 4 KiB and grows as elements
//! decode. So a frame of `n` bytes costs at most a constant factor of `n` (varints expand: a
//! one-byte `u64` is eight bytes in memory) plus a few KiB per nesting level, whatever its
//! length prefixes say (`tests/codec_memory.rs` measures it with a counting allocator).
//!
//! Pure: bytes in, messages out; the QUIC driver feeds it.

// The pure core is read as a library: every public item says what it is for.
#![warn(missing_docs)]

use bincode::error::DecodeError;
use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// First two bytes of every frame: "TG".
pub const MAGIC: [u8; 2] = *b"TG";
/// The wire format version this build speaks.
pub const VERSION: u8 = 1;
/// Header length: magic, version, length.
pub const HEADER_LEN: usize = 7;
/// Default bound on a frame's payload.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// What went wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Not a gossip stream, or lost framing: the stream must be closed.
    #[error("bad magic {0:02x?}: not a tollgate gossip stream")]
    BadMagic([u8; 2]),
    /// A length above the bound: the stream must be closed (the frame is not read).
    #[error("frame of {len} bytes exceeds the {max}-byte bound")]
    TooLarge {
        /// Payload length the header announced, in bytes.
        len: usize,
        /// The decoder's bound in bytes (its `max_frame`, capped at [`MAX_FRAME_LIMIT`]).
        max: usize,
    },
    /// A frame from a newer or older protocol: skipped.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// The payload does not decode as a message: skipped.
    #[error("undecodable payload: {0}")]
    Payload(String),
    /// Encoding failed (a message over the bound, or a serializer error).
    #[error("cannot encode: {0}")]
    Encode(String),
}

impl CodecError {
    /// Whether the stream can go on after this error (the bad frame was skipped whole).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, Self::UnsupportedVersion(_) | Self::Payload(_))
    }
}

/// The encoding: bincode 2's standard configuration (varints, little endian). Decoding
/// adds a claim limit per payload ([`decode_limited`]), which does not change the format.
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// How many bytes bincode may claim per payload byte. Bincode counts every value it decodes
/// at its size in memory (a `u64` claims 8 bytes, though a small one is encoded in 1) and
/// a string or byte buffer at its length, so an honest payload claims at most 8 times its
/// length (16 only for `u128`, which no message holds).
const CLAIM_PER_BYTE: usize = 8;

/// The largest payload [`Decoder`] accepts whatever `max_frame` says (the configuration's
/// bound too).
pub const MAX_FRAME_LIMIT: usize = 64 << 20;

/// Decodes a payload with a bincode claim limit derived from its own length
/// ([`claim_limit`]): a string claiming more than the payload could honestly hold is an
/// error before its buffer is allocated. Bincode takes its limit as a const generic, so a
/// ladder of powers of four gives each payload a limit within 4x of `8 * len` without one
/// instantiation per length.
fn decode_limited<T: DeserializeOwned>(payload: &[u8]) -> Result<(T, usize), DecodeError> {
    use bincode::serde::decode_from_slice as decode;
    let standard = bincode::config::standard();
    let Some(limit) = claim_limit(payload.len()) else {
        return Err(DecodeError::LimitExceeded);
    };
    macro_rules! ladder {
        ($($rung:literal),*) => {
            $(if limit == $rung {
                return decode(payload, standard.with_limit::<$rung>());
            })*
        };
    }
    ladder!(
        256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864, 268435456,
        1073741824
    );
    Err(DecodeError::LimitExceeded)
}

/// The claim limit for a payload of `len` bytes: the smallest power of four from 256 that
/// is at least `8 * len` (so at most `32 * len`, or 256 bytes); `None` above
/// [`MAX_FRAME_LIMIT`].
pub fn claim_limit(len: usize) -> Option<usize> {
    if len > MAX_FRAME_LIMIT {
        return None;
    }
    let want = len.saturating_mul(CLAIM_PER_BYTE);
    (0..12)
        .map(|rung| 256usize << (2 * rung))
        .find(|&limit| want <= limit)
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(message: &T, max_frame: usize) -> Result<Vec<u8>, CodecError> {
    let payload = bincode::serde::encode_to_vec(message, bincode_config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if payload.len() > max_frame {
        return Err(CodecError::Encode(format!(
            "payload of {} bytes exceeds the {max_frame}-byte bound",
            payload.len()
        )));
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.push(VERSION);
    // The bound is at most u32::MAX in practice; a larger `max_frame` was refused above
    // only if the payload exceeded it, so saturate rather than truncate silently.
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct Decoder {
    buffer: BytesMut,
    max_frame: usize,
    /// Set after an unrecoverable error: everything after it is ignored.
    broken: bool,
}

impl Decoder {
    /// A decoder refusing payloads over `max_frame` (capped at [`MAX_FRAME_LIMIT`]).
    pub fn new(max_frame: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            max_frame: max_frame.min(MAX_FRAME_LIMIT),
            broken: false,
        }
    }

    /// Appends bytes received from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        if !self.broken {
            self.buffer.extend_from_slice(bytes);
        }
    }

    /// The next complete frame's message, `Ok(None)` if more bytes are needed. After an
    /// unrecoverable error (see [`CodecError::is_recoverable`]) it keeps returning that error.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        if self.buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        let magic = [self.buffer[0], self.buffer[1]];
        if magic != MAGIC {
            self.broken = true;
            return Err(CodecError::BadMagic(magic));
        }
        let version = self.buffer[2];
        let len = u32::from_be_bytes([
            self.buffer[3],
            self.buffer[4],
            self.buffer[5],
            self.buffer[6],
        ]) as usize;
        if len > self.max_frame {
            self.broken = true;
            return Err(CodecError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if self.buffer.len() < HEADER_LEN + len {
            // Nothing is reserved for the announced length: the buffer grows as bytes arrive,
            // so a header alone costs nothing.
            return Ok(None);
        }
        self.buffer.advance(HEADER_LEN);
        let payload = self.buffer.split_to(len);
        if version != VERSION {
            return Err(CodecError::UnsupportedVersion(version));
        }
        match decode_limited::<T>(&payload) {
            Ok((message, used)) if used == payload.len() => Ok(Some(message)),
            Ok((_, used)) => Err(CodecError::Payload(format!(
                "{} trailing bytes after the message",
                payload.len() - used
            ))),
            Err(e) => Err(CodecError::Payload(e.to_string())),
        }
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Bytes of memory the buffer holds (its capacity), which grows with the bytes received,
    /// not with the lengths announced.
    pub fn reserved(&self) -> usize {
        self.buffer.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Message {
        Hello { region: String, digest: u64 },
        Delta { entries: Vec<(u32, String, u64)> },
        Ack(u64),
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            ("[a-z-]{0,12}", any::<u64>())
                .prop_map(|(region, digest)| Message::Hello { region, digest }),
            proptest::collection::vec((any::<u32>(), "[a-z0-9:.]{0,20}", any::<u64>()), 0..20)
                .prop_map(|entries| Message::Delta { entries }),
            any::<u64>().prop_map(Message::Ack),
        ]
    }

    proptest! {
        /// Any sequence of messages survives encoding and arbitrary re-chunking.
        #[test]
        fn round_trip_through_any_chunking(
            messages in proptest::collection::vec(message(), 1..10),
            cuts in proptest::collection::vec(1usize..64, 1..50),
        ) {
            let stream: Vec<u8> = messages.iter().flat_map(|m| encode(m, DEFAULT_MAX_FRAME).unwrap()).collect();
            let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
            let mut decoded = Vec::new();
            let mut rest = &stream[..];
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let n = (*cut.next().unwrap()).min(rest.len());
                decoder.extend(&rest[..n]);
                rest = &rest[n..];
                while let Some(message) = decoder.decode::<Message>().unwrap() {
                    decoded.push(message);
                }
            }
            prop_assert_eq!(decoded, messages);
            prop_assert_eq!(decoder.buffered(), 0);
        }

        /// Random bytes never panic, never allocate past the bound, and end in an error or
        /// a wait for more bytes.
        #[test]
        fn random_bytes_are_rejected_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut decoder = Decoder::new(1024);
            decoder.extend(&bytes);
            for _ in 0..64 {
                match decoder.decode::<Message>() {
                    Ok(Some(_)) | Err(CodecError::Payload(_)) | Err(CodecError::UnsupportedVersion(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
            prop_assert!(decoder.buffered() <= bytes.len());
        }

        /// A valid header followed by garbage payload is skipped, and the next frame decodes.
        #[test]
        fn garbage_payload_is_skipped(garbage in proptest::collection::vec(any::<u8>(), 1..200)) {
            let mut stream = MAGIC.to_vec();
            stream.push(VERSION);
            stream.extend_from_slice(&(garbage.len() as u32).to_be_bytes());
            stream.extend_from_slice(&garbage);
            stream.extend(encode(&Message::Ack(7), DEFAULT_MAX_FRAME).unwrap());
            let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
            decoder.extend(&stream);
            let mut last = None;
            for _ in 0..3 {
                match decoder.decode::<Message>() {
                    Ok(Some(m)) => { last = Some(m); break; }
                    Ok(None) => break,
                    Err(e) => prop_assert!(e.is_recoverable(), "{e}"),
                }
            }
            // Garbage may happen to decode as a message; either way the Ack follows.
            if last != Some(Message::Ack(7)) {
                prop_assert_eq!(decoder.decode::<Message>().unwrap(), Some(Message::Ack(7)));
            }
        }
    }

    /// Finding 1 of issue #13: a 17-byte frame, a `Hello` whose region claims 2^50 bytes,
    /// made bincode allocate the claim before reading and aborted the process.
    #[test]
    fn a_hello_claiming_a_huge_string_is_refused_without_allocating() {
        use crate::gossip::proto::Message as Gossip;
        let mut payload = vec![0x00]; // variant 0: Hello; its actor's region comes first
        payload.push(0xfd); // varint marker: a u64 follows
        payload.extend_from_slice(&(1u64 << 50).to_le_bytes());
        let mut frame = MAGIC.to_vec();
        frame.push(VERSION);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        assert_eq!(frame.len(), 17);
        let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
        decoder.extend(&frame);
        let error = decoder.decode::<Gossip>().unwrap_err();
        assert!(
            matches!(error, CodecError::Payload(_)) && error.is_recoverable(),
            "{error}"
        );
        // The stream goes on: the next frame decodes.
        decoder.extend(&encode(&Gossip::KeepAlive, DEFAULT_MAX_FRAME).unwrap());
        assert_eq!(decoder.decode::<Gossip>(), Ok(Some(Gossip::KeepAlive)));
    }

    /// Finding 7 of issue #13: a 7-byte header made the decoder reserve `max_frame` bytes.
    #[test]
    fn a_header_alone_reserves_nothing() {
        let mut frame = MAGIC.to_vec();
        frame.push(VERSION);
        frame.extend_from_slice(&(DEFAULT_MAX_FRAME as u32).to_be_bytes());
        let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
        decoder.extend(&frame);
        assert_eq!(decoder.decode::<Message>(), Ok(None));
        assert!(decoder.reserved() < 4096, "reserved {}", decoder.reserved());
    }

    #[test]
    fn claim_limits_stay_within_a_constant_factor_of_the_payload() {
        for len in [
            0,
            1,
            255,
            256,
            257,
            5000,
            1 << 20,
            (1 << 20) + 1,
            MAX_FRAME_LIMIT,
        ] {
            let limit = claim_limit(len).unwrap();
            assert!(
                limit >= 8 * len && limit <= (32 * len).max(256),
                "{len} -> {limit}"
            );
        }
        assert_eq!(claim_limit(MAX_FRAME_LIMIT + 1), None);
    }

    /// Every string a payload holds fits its claim limit: the largest frames the gossip
    /// layer sends still decode.
    #[test]
    fn a_payload_made_of_one_string_decodes_at_every_rung() {
        for len in [10, 250, 1000, 70_000, 1 << 20] {
            let message = Message::Hello {
                region: "r".repeat(len),
                digest: 1,
            };
            let frame = encode(&message, 2 << 20).unwrap();
            let mut decoder = Decoder::new(2 << 20);
            decoder.extend(&frame);
            assert_eq!(decoder.decode::<Message>(), Ok(Some(message)));
        }
    }

    #[test]
    fn oversized_length_closes_the_stream_before_allocating() {
        let mut frame = MAGIC.to_vec();
        frame.push(VERSION);
        frame.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
        decoder.extend(&frame);
        assert_eq!(
            decoder.decode::<Message>(),
            Err(CodecError::TooLarge {
                len: u32::MAX as usize,
                max: DEFAULT_MAX_FRAME
            })
        );
        decoder.extend(&encode(&Message::Ack(1), DEFAULT_MAX_FRAME).unwrap());
        assert!(
            decoder.decode::<Message>().is_err(),
            "a broken stream stays broken"
        );
    }

    #[test]
    fn wrong_magic_and_version() {
        let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
        decoder.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            decoder.decode::<Message>(),
            Err(CodecError::BadMagic(*b"GE"))
        );

        let mut frame = encode(&Message::Ack(1), DEFAULT_MAX_FRAME).unwrap();
        frame[2] = 9;
        frame.extend(encode(&Message::Ack(2), DEFAULT_MAX_FRAME).unwrap());
        let mut decoder = Decoder::new(DEFAULT_MAX_FRAME);
        decoder.extend(&frame);
        assert_eq!(
            decoder.decode::<Message>(),
            Err(CodecError::UnsupportedVersion(9))
        );
        assert_eq!(decoder.decode::<Message>(), Ok(Some(Message::Ack(2))));
    }

    #[test]
    fn encoding_refuses_messages_over_the_bound() {
        let big = Message::Delta {
            entries: vec![(1, "k".repeat(100), 1); 100],
        };
        assert!(matches!(encode(&big, 1000), Err(CodecError::Encode(_))));
    }
}
