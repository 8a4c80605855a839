//! The wire of blob transfer (`/riftmesh/sync/1`, bodies in raw frames,
//! proto-notes/sync.md): requests and answers, and the bounded decoding of
//! an answer that keeps a chunk in the buffer the transport read it into.

use serde::{Deserialize, Serialize};

use super::objects::{Bitmap, BlobId, Manifest};
use crate::codec;
use crate::net::MAX_BLOB_RESPONSE;

/// Most blob ids in one `Have` request.
pub const MAX_HAVE_IDS: usize = 256;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Request {
    /// Which of these blobs do you hold, and which chunks?
    Have {
        blobs: Vec<BlobId>,
    },
    Manifest {
        blob: BlobId,
    },
    Chunk {
        blob: BlobId,
        index: u32,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Held {
    pub blob: BlobId,
    /// None: the whole blob.
    pub chunks: Option<Bitmap>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Response {
    Have {
        held: Vec<Held>,
    },
    Manifest(Manifest),
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    NotFound,
    /// Too many uploads at once here: ask again later or elsewhere.
    Busy {
        retry_ms: u32,
    },
    Refused {
        reason: String,
    },
}

/// An answer as it came off the wire: a chunk stays in the buffer the
/// transport read it into (no copy of the megabyte), anything else decoded.
pub(super) enum Answer {
    Chunk(Vec<u8>, std::ops::Range<usize>),
    Other(Response),
}

/// `Response::Chunk`'s variant index, the first byte of its encoding.
const CHUNK_TAG: u8 = 2;

/// Decode an answer; a chunk answer is recognised by its tag and its bytes
/// are located inside `buf` rather than copied out. The result is exactly
/// what `codec::decode::<Response>` would give (unit-tested).
pub(super) fn decode_answer(buf: Vec<u8>) -> Result<Answer, codec::CodecError> {
    #[derive(Deserialize)]
    struct Data<'a>(#[serde(borrow)] &'a [u8]);
    if buf.first() == Some(&CHUNK_TAG) {
        let body = &buf[1..];
        let Data(data) = codec::decode_borrowed::<Data>(body, MAX_BLOB_RESPONSE)?;
        let start = data.as_ptr() as usize - buf.as_ptr() as usize;
        let range = start..start + data.len();
        return Ok(Answer::Chunk(buf, range));
    }
    codec::decode::<Response>(&buf, MAX_BLOB_RESPONSE).map(Answer::Other)
}

/// The encoding of `Response::Chunk` up to its data: the variant tag and
/// the data's varint length (unit-tested against `codec::encode`).
fn chunk_answer_header(len: usize) -> Vec<u8> {
    let mut h = vec![CHUNK_TAG];
    h.extend(codec::encode(&(len as u64)).unwrap_or_default());
    h
}

/// A buffer for a chunk answer of `len` data bytes, its header written:
/// (buffer, where the data goes).
pub(super) fn chunk_answer_buf(len: usize) -> (Vec<u8>, usize) {
    let h = chunk_answer_header(len);
    let mut b = crate::bufpool::CHUNKS.take_len(h.len() + len);
    b[..h.len()].copy_from_slice(&h);
    (b, h.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_answer_is_located_in_place_and_equals_the_decoded_value() {
        for len in [0usize, 1, 250, 251, 65_535, 65_536, 1 << 20, (1 << 20) + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let wire = codec::encode(&Response::Chunk(data.clone())).unwrap();
            // The header the server writes in front of the data is the
            // encoder's own.
            let h = chunk_answer_header(len);
            assert_eq!(&wire[..h.len()], &h[..], "header for {len} bytes");
            assert_eq!(wire.len(), h.len() + len);
            // The server's buffer: that header, then room for the data.
            let (b, at) = chunk_answer_buf(len);
            assert_eq!((&b[..at], b.len()), (&h[..], at + len));
            crate::bufpool::CHUNKS.give(b);
            match decode_answer(wire.clone()).unwrap() {
                Answer::Chunk(buf, range) => assert_eq!(&buf[range], &data[..]),
                Answer::Other(r) => panic!("chunk decoded as {r:?}"),
            }
            // Damaged framing fails the fast path exactly as the full decoder.
            let mut short = wire.clone();
            short.pop();
            if len > 0 {
                assert!(decode_answer(short.clone()).is_err());
                assert!(codec::decode::<Response>(&short, MAX_BLOB_RESPONSE).is_err());
            }
            let mut long = wire;
            long.push(0);
            assert!(decode_answer(long.clone()).is_err());
            assert!(codec::decode::<Response>(&long, MAX_BLOB_RESPONSE).is_err());
        }
    }

    #[test]
    fn other_answers_decode_as_before() {
        for r in [
            Response::NotFound,
            Response::Busy { retry_ms: 200 },
            Response::Refused {
                reason: "store error".into(),
            },
            Response::Have { held: vec![] },
        ] {
            let wire = codec::encode(&r).unwrap();
            assert_ne!(wire[0], CHUNK_TAG);
            match decode_answer(wire).unwrap() {
                Answer::Other(got) => assert_eq!(format!("{got:?}"), format!("{r:?}")),
                Answer::Chunk(..) => panic!("{r:?} decoded as a chunk"),
            }
        }
    }

    #[test]
    fn an_oversized_chunk_answer_is_refused_before_decoding() {
        let mut wire = chunk_answer_header(MAX_BLOB_RESPONSE);
        wire.resize(wire.len() + MAX_BLOB_RESPONSE, 0);
        assert!(matches!(
            decode_answer(wire),
            Err(codec::CodecError::TooLarge { .. })
        ));
    }
}
