//! What a blob is, independent of where it is kept: its id (the SHA-256 of
//! its bytes), its manifest (how it is cut into chunks, with each chunk's
//! hash) and sets of chunks (bitmaps). The store, the vouch cache, transfer
//! and the whole-file check all use these.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::BlobError;
use crate::codec;

pub type BlobId = [u8; 32];

/// Smallest and largest chunk a manifest may use.
pub use crate::config::{MAX_CHUNK, MIN_CHUNK};
/// Most chunks in one manifest; the chunk size doubles until a blob fits.
pub const MAX_CHUNKS: usize = 65_536;
/// Largest manifest body (65,536 hashes plus framing).
pub const MAX_MANIFEST_BYTES: usize = MAX_CHUNKS * 33 + 64;

/// How a blob is cut into chunks, with the SHA-256 of each. Its own hash
/// (the root, [`Manifest::root`]) travels signed in the event that names the
/// blob, so every chunk is checked against data the publisher signed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<[u8; 32]>,
}

impl Manifest {
    /// SHA-256 over a domain tag and the bincode of the manifest.
    pub fn root(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"riftmesh/manifest/1\0");
        h.update(codec::encode(self).unwrap_or_default());
        h.finalize().into()
    }

    /// Is it well formed: a chunk size within bounds, and exactly as many
    /// chunk hashes as the size needs?
    pub fn check(&self) -> Result<(), BlobError> {
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) {
            return Err(BlobError::Invalid(format!(
                "chunk size {} outside {MIN_CHUNK}..={MAX_CHUNK}",
                self.chunk_size
            )));
        }
        let want = chunk_count(self.size, self.chunk_size);
        if self.chunks.len() != want || want > MAX_CHUNKS {
            return Err(BlobError::Invalid(format!(
                "{} chunk hashes for {} bytes in chunks of {} (want {want}, at most {MAX_CHUNKS})",
                self.chunks.len(),
                self.size,
                self.chunk_size
            )));
        }
        Ok(())
    }

    pub fn chunk_len(&self, i: u32) -> u64 {
        let start = u64::from(i) * u64::from(self.chunk_size);
        self.size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size))
    }

    pub fn offset(&self, i: u32) -> u64 {
        u64::from(i) * u64::from(self.chunk_size)
    }
}

pub fn chunk_count(size: u64, chunk: u32) -> usize {
    size.div_ceil(u64::from(chunk.max(1))) as usize
}

/// The chunk size for a blob of `size` bytes: `preferred`, doubled until the
/// blob fits in [`MAX_CHUNKS`] chunks.
pub fn chunk_size_for(size: u64, preferred: u32) -> u32 {
    let mut c = preferred.clamp(MIN_CHUNK, MAX_CHUNK);
    while chunk_count(size, c) > MAX_CHUNKS && c < MAX_CHUNK {
        c *= 2;
    }
    c
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A set of chunk indexes, one bit each.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Bitmap {
    pub len: u32,
    #[serde(with = "serde_bytes")]
    pub bits: Vec<u8>,
}

impl Bitmap {
    pub fn new(len: usize) -> Bitmap {
        Bitmap {
            len: len as u32,
            bits: vec![0; len.div_ceil(8)],
        }
    }
    pub fn full(len: usize) -> Bitmap {
        let mut b = Bitmap::new(len);
        for i in 0..len {
            b.set(i as u32);
        }
        b
    }
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }
    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }
    pub fn count(&self) -> usize {
        self.bits.iter().map(|b| b.count_ones() as usize).sum()
    }
    pub fn is_full(&self) -> bool {
        self.count() == self.len as usize
    }
    /// Well formed for `len` chunks (from a peer: checked before use).
    pub fn fits(&self, len: usize) -> bool {
        self.len as usize == len && self.bits.len() == len.div_ceil(8)
    }
}

pub fn hex_id(id: &BlobId) -> String {
    hex::encode(id)
}

pub fn parse_id(s: &str) -> Option<BlobId> {
    let v = hex::decode(s.trim()).ok()?;
    v.try_into().ok()
}
