//! Decoding a peer's sequences without believing their length prefixes.
//!
//! A sequence on the wire starts with its element count, and serde's `Vec` visitor
//! preallocates that count up to 1 MiB of elements ("cautious") before a single element
//! has decoded. For a frame from a peer that is a claim nobody has checked: a 20-byte
//! frame could make its receiver allocate 1 MiB per sequence field. Every `Vec` a message
//! carries is therefore decoded with [`grown_vec`], which reserves at most
//! [`PREALLOC_BYTES`] up front and grows only as elements actually decode. A completed
//! sequence then holds at most about twice its decoded elements (each of which took at
//! least one byte of the frame), and a sequence that fails mid-way drops what it held, so a
//! frame costs memory proportional to its own length plus a constant per nesting level.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{Deserializer, SeqAccess, Visitor};

/// The most a sequence reserves before its elements arrive, in bytes.
pub const PREALLOC_BYTES: usize = 4096;

/// How many elements of `T` to reserve for a sequence that claims `claimed`.
pub fn prealloc_len<T>(claimed: Option<usize>) -> usize {
    let per_element = std::mem::size_of::<T>().max(1);
    claimed.unwrap_or(0).min(PREALLOC_BYTES / per_element)
}

/// `#[serde(deserialize_with = "grown_vec")]`: a `Vec<T>` whose claimed length reserves at
/// most [`PREALLOC_BYTES`] (see the module docs). Encoding is unchanged.
pub fn grown_vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Grown<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Grown<T> {
        type Value = Vec<T>;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a sequence")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut values = Vec::with_capacity(prealloc_len::<T>(seq.size_hint()));
            while let Some(value) = seq.next_element()? {
                values.push(value);
            }
            Ok(values)
        }
    }

    deserializer.deserialize_seq(Grown(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_length_reserves_at_most_the_prealloc_bound() {
        assert_eq!(prealloc_len::<u8>(Some(10)), 10);
        assert_eq!(prealloc_len::<u8>(None), 0);
        assert_eq!(prealloc_len::<u8>(Some(usize::MAX)), PREALLOC_BYTES);
        assert_eq!(
            prealloc_len::<(u16, u64, u64)>(Some(1 << 40)),
            PREALLOC_BYTES / 24
        );
        assert_eq!(prealloc_len::<()>(Some(usize::MAX)), PREALLOC_BYTES);
    }
}
