//! The one place that knows bincode. Everything persisted or sent to a peer is
//! encoded here; every decode of bytes we did not produce ourselves carries a
//! size limit, so a 9-byte message cannot make us allocate gigabytes.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// bincode 2 `standard()` (varint) configuration with a decode limit.
fn config<const N: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<N>()
}

/// Upper bound for anything we decode: 16 MiB. Callers also bound the frame
/// before decoding (gossipsub's transmit limit, the request-response frame limit).
pub const MAX_DECODE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(
        value,
        config::<MAX_DECODE>(),
    )?)
}

/// Decode bytes that may come from anywhere. `limit` bounds the frame; the
/// bincode limit bounds what the decoder may allocate.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    decode_borrowed(bytes, limit)
}

/// [`decode`] for values that borrow from `bytes` (a `&[u8]` field is
/// handed out as a slice of the input, not copied), with the same limits.
pub fn decode_borrowed<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    limit: usize,
) -> Result<T, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let (value, used) = bincode::serde::borrow_decode_from_slice(bytes, config::<MAX_DECODE>())?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_length_prefix_is_refused_without_allocating() {
        // A varint length of u64::MAX followed by nothing: a Vec<u8> claiming 2^64 bytes.
        let bytes = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let r: Result<Vec<u8>, _> = decode(&bytes, 1024);
        assert!(r.is_err());
        let bytes = [0xfc, 0x00, 0x00, 0x00, 0x40]; // claims 1 GiB
        let r: Result<Vec<u8>, _> = decode(&bytes, 1024);
        assert!(r.is_err());
    }

    #[test]
    fn roundtrip_and_trailing() {
        let v = (7u64, "abc".to_string(), vec![1u8, 2, 3]);
        let mut b = encode(&v).unwrap();
        let back: (u64, String, Vec<u8>) = decode(&b, 1024).unwrap();
        assert_eq!(back, v);
        b.push(0);
        assert!(matches!(
            decode::<(u64, String, Vec<u8>)>(&b, 1024),
            Err(CodecError::Trailing(1))
        ));
        assert!(matches!(
            decode::<(u64, String, Vec<u8>)>(&b, 3),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
