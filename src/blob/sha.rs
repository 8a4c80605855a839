//! SHA-256 with its state in our hands, so that one pass over a chunk can
//! give both hashes the blob store needs of it: the chunk's own (checked
//! against the manifest) and the whole file's (the blob id), which runs on
//! across chunks.
//!
//! Why: a receiver hashes every byte twice and a `blob add` too; with the
//! x86 SHA extensions one SHA-256 stream is bound by the latency of its
//! round instruction, so two streams with their rounds interleaved cost
//! little more than one: 1.8x the throughput of two passes (`cargo bench
//! --bench blob`, "SHA-256" rows). No maintained crate offers two states over one
//! message; `sha2` offers the single-stream compression (`compress256`),
//! which every other path here uses, and the reference the tests compare
//! against.

use sha2::digest::generic_array::{typenum::U64, GenericArray};

const BLOCK: usize = 64;

const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A SHA-256 in progress.
#[derive(Clone)]
pub struct Running {
    state: [u32; 8],
    /// Bytes fed so far.
    len: u64,
    /// Bytes of an incomplete block, waiting for the rest of it.
    tail: [u8; BLOCK],
    tail_len: usize,
}

impl Default for Running {
    fn default() -> Self {
        Running::new()
    }
}

impl Running {
    pub fn new() -> Running {
        Running {
            state: IV,
            len: 0,
            tail: [0; BLOCK],
            tail_len: 0,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.tail_len > 0 {
            let take = (BLOCK - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < BLOCK {
                return;
            }
            let t = self.tail;
            compress(&mut self.state, &t);
            self.tail_len = 0;
        }
        let whole = data.len() / BLOCK * BLOCK;
        compress(&mut self.state, &data[..whole]);
        let rest = &data[whole..];
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut last = [0u8; 2 * BLOCK];
        last[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        last[self.tail_len] = 0x80;
        let n = if self.tail_len < BLOCK - 8 {
            BLOCK
        } else {
            2 * BLOCK
        };
        last[n - 8..n].copy_from_slice(&bits.to_be_bytes());
        compress(&mut self.state, &last[..n]);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

/// SHA-256 of `chunk`, and `whole` fed the same bytes, in one pass.
pub fn chunk_and_whole(chunk: &[u8], whole: &mut Running) -> [u8; 32] {
    chunk_beside(chunk, whole, chunk)
}

/// SHA-256 of `chunk`, while `other` is fed `more`: the two streams in
/// one pass where `other` is on a block boundary (the chunk hash always
/// is), over as many whole blocks as both have; the rest one after the
/// other.
pub fn chunk_beside(chunk: &[u8], other: &mut Running, more: &[u8]) -> [u8; 32] {
    let mut c = Running::new();
    let (mut rest, mut more_rest) = (chunk, more);
    if other.tail_len == 0 {
        let n = chunk.len().min(more.len()) / BLOCK * BLOCK;
        compress_two(&mut c.state, &chunk[..n], &mut other.state, &more[..n]);
        c.len = n as u64;
        other.len += n as u64;
        rest = &chunk[n..];
        more_rest = &more[n..];
    }
    c.update(rest);
    other.update(more_rest);
    c.finalize()
}

/// `blocks` (whole 64-byte blocks) into one state.
fn compress(state: &mut [u32; 8], blocks: &[u8]) {
    debug_assert_eq!(blocks.len() % BLOCK, 0);
    if blocks.is_empty() {
        return;
    }
    // SAFETY: `GenericArray<u8, U64>` is `#[repr(transparent)]` over
    // `[u8; 64]` (alignment 1), and `blocks` holds exactly `len / 64` of them.
    let arr = unsafe {
        std::slice::from_raw_parts(
            blocks.as_ptr() as *const GenericArray<u8, U64>,
            blocks.len() / BLOCK,
        )
    };
    sha2::compress256(state, arr);
}

/// Two streams of whole blocks, as many in each, into their states.
fn compress_two(a: &mut [u32; 8], a_blocks: &[u8], b: &mut [u32; 8], b_blocks: &[u8]) {
    debug_assert_eq!(a_blocks.len(), b_blocks.len());
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { x86::compress_two(a, a_blocks, b, b_blocks) };
        return;
    }
    compress(a, a_blocks);
    compress(b, b_blocks);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    pub fn available() -> bool {
        is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse2")
            && is_x86_feature_detected!("ssse3")
            && is_x86_feature_detected!("sse4.1")
    }

    /// The state as the SHA instructions hold it: (ABEF, CDGH).
    #[inline(always)]
    unsafe fn load(s: &[u32; 8]) -> (__m128i, __m128i) {
        let p = s.as_ptr() as *const __m128i;
        let dcba = _mm_shuffle_epi32(_mm_loadu_si128(p), 0xB1);
        let hgfe = _mm_shuffle_epi32(_mm_loadu_si128(p.add(1)), 0x1B);
        (
            _mm_alignr_epi8(dcba, hgfe, 8),
            _mm_blend_epi16(hgfe, dcba, 0xF0),
        )
    }

    #[inline(always)]
    unsafe fn store(s: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        let p = s.as_mut_ptr() as *mut __m128i;
        _mm_storeu_si128(p, _mm_blend_epi16(feba, dchg, 0xF0));
        _mm_storeu_si128(p.add(1), _mm_alignr_epi8(dchg, feba, 8));
    }

    /// Message words 4(i)..4(i)+3 from the four before them.
    #[inline(always)]
    unsafe fn schedule(w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
        let t = _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8(w3, w2, 4));
        _mm_sha256msg2_epu32(t, w3)
    }

    /// Block i of `a_blocks` into `a` and block i of `b_blocks` into `b`,
    /// for every i: two chains of rounds interleaved, so that each fills
    /// the other's wait on the round instruction.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn compress_two(
        a: &mut [u32; 8],
        a_blocks: &[u8],
        b: &mut [u32; 8],
        b_blocks: &[u8],
    ) {
        let bswap = _mm_set_epi64x(
            0x0C0D_0E0F_0809_0A0Bu64 as i64,
            0x0405_0607_0001_0203u64 as i64,
        );
        let (mut xa, mut ya) = load(a);
        let (mut xb, mut yb) = load(b);
        for (ba, bb) in a_blocks.chunks_exact(64).zip(b_blocks.chunks_exact(64)) {
            let (xa0, ya0, xb0, yb0) = (xa, ya, xb, yb);
            let pa = ba.as_ptr() as *const __m128i;
            let pb = bb.as_ptr() as *const __m128i;
            let mut a0 = _mm_shuffle_epi8(_mm_loadu_si128(pa), bswap);
            let mut a1 = _mm_shuffle_epi8(_mm_loadu_si128(pa.add(1)), bswap);
            let mut a2 = _mm_shuffle_epi8(_mm_loadu_si128(pa.add(2)), bswap);
            let mut a3 = _mm_shuffle_epi8(_mm_loadu_si128(pa.add(3)), bswap);
            let mut b0 = _mm_shuffle_epi8(_mm_loadu_si128(pb), bswap);
            let mut b1 = _mm_shuffle_epi8(_mm_loadu_si128(pb.add(1)), bswap);
            let mut b2 = _mm_shuffle_epi8(_mm_loadu_si128(pb.add(2)), bswap);
            let mut b3 = _mm_shuffle_epi8(_mm_loadu_si128(pb.add(3)), bswap);
            // Four rounds of each chain, with message words `wa` and `wb`
            // and constants K[4i..4i+4].
            macro_rules! rounds {
                ($wa:expr, $wb:expr, $i:expr) => {{
                    let k = _mm_loadu_si128(K.as_ptr().add(4 * $i) as *const __m128i);
                    let ta = _mm_add_epi32($wa, k);
                    let tb = _mm_add_epi32($wb, k);
                    ya = _mm_sha256rnds2_epu32(ya, xa, ta);
                    yb = _mm_sha256rnds2_epu32(yb, xb, tb);
                    xa = _mm_sha256rnds2_epu32(xa, ya, _mm_shuffle_epi32(ta, 0x0E));
                    xb = _mm_sha256rnds2_epu32(xb, yb, _mm_shuffle_epi32(tb, 0x0E));
                }};
            }
            // Rounds 16..64: the next four message words of each stream
            // from its last sixteen (w0 is replaced by w16, and so on).
            macro_rules! next {
                ($w0:ident, $w1:ident, $w2:ident, $w3:ident, $v0:ident, $v1:ident, $v2:ident, $v3:ident, $i:expr) => {{
                    $w0 = schedule($w0, $w1, $w2, $w3);
                    $v0 = schedule($v0, $v1, $v2, $v3);
                    rounds!($w0, $v0, $i);
                }};
            }
            rounds!(a0, b0, 0);
            rounds!(a1, b1, 1);
            rounds!(a2, b2, 2);
            rounds!(a3, b3, 3);
            // Sixteen rounds from `$i` on: each group of four message
            // words replaces the oldest of the last sixteen.
            macro_rules! sixteen {
                ($i:expr) => {{
                    next!(a0, a1, a2, a3, b0, b1, b2, b3, $i);
                    next!(a1, a2, a3, a0, b1, b2, b3, b0, $i + 1);
                    next!(a2, a3, a0, a1, b2, b3, b0, b1, $i + 2);
                    next!(a3, a0, a1, a2, b3, b0, b1, b2, $i + 3);
                }};
            }
            sixteen!(4);
            sixteen!(8);
            sixteen!(12);
            xa = _mm_add_epi32(xa, xa0);
            ya = _mm_add_epi32(ya, ya0);
            xb = _mm_add_epi32(xb, xb0);
            yb = _mm_add_epi32(yb, yb0);
        }
        store(a, xa, ya);
        store(b, xb, yb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn sha256(data: &[u8]) -> [u8; 32] {
        let mut h = Running::new();
        h.update(data);
        h.finalize()
    }

    fn reference(parts: &[&[u8]]) -> [u8; 32] {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }

    #[test]
    fn every_length_across_the_padding_boundaries_matches_sha2() {
        let data = bytes(300, 1);
        for n in 0..=data.len() {
            assert_eq!(sha256(&data[..n]), reference(&[&data[..n]]), "{n} bytes");
        }
    }

    #[test]
    fn updates_in_any_split_match_one_update() {
        let data = bytes(1000, 2);
        for cut in [0, 1, 63, 64, 65, 127, 128, 500, 999, 1000] {
            for cut2 in [cut, (cut + 1).min(1000), (cut + 64).min(1000), 1000] {
                let mut h = Running::new();
                h.update(&data[..cut]);
                h.update(&data[cut..cut2]);
                h.update(&data[cut2..]);
                assert_eq!(h.finalize(), reference(&[&data]), "cuts {cut} {cut2}");
            }
        }
    }

    #[test]
    fn chunk_and_whole_give_both_hashes_on_and_off_block_boundaries() {
        // Chunks of whole blocks (the usual case: both lanes at once), and
        // of odd sizes, which leave the whole hash off a block boundary.
        for sizes in [
            vec![65536, 65536, 4096, 100],
            vec![64, 0, 128, 1],
            vec![1000, 65536, 64, 63],
            vec![3, 61, 64, 129, 4096],
        ] {
            let chunks: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| bytes(n, 10 + i as u64))
                .collect();
            let mut whole = Running::new();
            for c in &chunks {
                assert_eq!(chunk_and_whole(c, &mut whole), reference(&[c]), "{sizes:?}");
            }
            let all: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
            assert_eq!(whole.finalize(), reference(&all), "{sizes:?}");
        }
    }

    #[test]
    fn a_chunk_beside_other_bytes_gives_both_hashes() {
        for (n, m, pre) in [
            (65536, 65536, 0),
            (4096, 100, 0),
            (100, 4096, 64),
            (4096, 4096, 3),
            (0, 64, 0),
        ] {
            let chunk = bytes(n, 5);
            let more = bytes(m, 6);
            let before = bytes(pre, 7);
            let mut other = Running::new();
            other.update(&before);
            assert_eq!(
                chunk_beside(&chunk, &mut other, &more),
                reference(&[&chunk])
            );
            assert_eq!(
                other.finalize(),
                reference(&[&before, &more]),
                "{n} {m} {pre}"
            );
        }
    }

    #[test]
    fn a_whole_hash_continues_after_a_chunk_pass_like_any_other() {
        let a = bytes(4096, 3);
        let b = bytes(777, 4);
        let mut w = Running::new();
        chunk_and_whole(&a, &mut w);
        w.update(&b);
        assert_eq!(w.finalize(), reference(&[&a, &b]));
    }
}
