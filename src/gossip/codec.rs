//! Gossip frames: `magic (2) | version (1) | length (4, big-endian) | bincode 2 payload`.
//!
//! A peer can send anything, so decoding never trusts it: the length is bounded before any
//! allocation, a frame of an unknown version or with a payload that does not decode is
//! dropped and counted, and garbage where a header should be (wrong magic, a length above the
//! bound) ends the stream, since there is no way to find the next frame boundary in it.
//! Nothing here panics on input (property-tested with random bytes).
//!
//! Pure: bytes in, messages out; the QUIC driver feeds it.

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
    TooLarge { len: usize, max: usize },
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

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
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
    pub fn new(max_frame: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            max_frame,
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
            // Reserve once for the whole frame (bounded above) instead of growing repeatedly.
            self.buffer.reserve(HEADER_LEN + len - self.buffer.len());
            return Ok(None);
        }
        self.buffer.advance(HEADER_LEN);
        let payload = self.buffer.split_to(len);
        if version != VERSION {
            return Err(CodecError::UnsupportedVersion(version));
        }
        match bincode::serde::decode_from_slice::<T, _>(&payload, bincode_config()) {
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
