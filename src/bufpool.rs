//! Chunk-sized byte buffers reused across blob transfers.
//!
//! Every chunk a peer serves or receives needs a buffer of about a chunk
//! (1 MiB by default). Allocated and freed per chunk, jemalloc returns the
//! freed pages to the system and the next chunk faults them in again: in
//! the 1 GiB bench that cost the receiver about 2 CPU-s (page faults and
//! zeroing were a fifth of its samples). The pool keeps a few such buffers
//! instead, bounded in bytes, and lets them go once transfers stop.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buffers smaller than this are not worth pooling.
pub const MIN_POOLED: usize = 64 * 1024;
/// At most this many bytes of capacity wait in the pool.
pub const MAX_POOLED_BYTES: usize = 16 << 20;
/// A buffer not taken again within this long is freed (by [`BufPool::trim`]).
pub const IDLE: Duration = Duration::from_secs(10);

struct Inner {
    bufs: Vec<(Vec<u8>, Instant)>,
    bytes: usize,
}

pub struct BufPool(Mutex<Inner>);

/// The pool the blob protocol's codec and store share.
pub static CHUNKS: BufPool = BufPool::new();

impl BufPool {
    pub const fn new() -> BufPool {
        BufPool(Mutex::new(Inner {
            bufs: Vec::new(),
            bytes: 0,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer with room for at least `cap` bytes: a pooled one
    /// when one is large enough, else a new one.
    pub fn take(&self, cap: usize) -> Vec<u8> {
        let mut b = self.take_any(cap);
        b.clear();
        b
    }

    /// A buffer of exactly `len` bytes to be overwritten: what a pooled
    /// buffer held before (only bytes it never held are zeroed), or zeros.
    /// Zeroing a chunk-sized buffer per chunk was 3-4 % of each end's CPU in
    /// a transfer.
    pub fn take_len(&self, len: usize) -> Vec<u8> {
        let mut b = self.take_any(len);
        if b.len() >= len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    /// A pooled buffer with room for `cap` bytes, as it was given back.
    fn take_any(&self, cap: usize) -> Vec<u8> {
        if cap >= MIN_POOLED {
            let mut p = self.lock();
            // The most recently given back first: its pages are the warmest.
            if let Some(i) = p.bufs.iter().rposition(|(b, _)| b.capacity() >= cap) {
                let (b, _) = p.bufs.swap_remove(i);
                p.bytes -= b.capacity();
                return b;
            }
        }
        Vec::with_capacity(cap)
    }

    /// Hand a buffer back; it is kept if it is chunk-sized and the pool has
    /// room, else freed. Its bytes stay (see [`BufPool::take_len`]).
    pub fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < MIN_POOLED {
            return;
        }
        let mut p = self.lock();
        if p.bytes + cap > MAX_POOLED_BYTES {
            return;
        }
        p.bytes += cap;
        p.bufs.push((buf, Instant::now()));
    }

    /// Free the buffers given back more than [`IDLE`] before `now`; returns
    /// the bytes of capacity still pooled.
    pub fn trim(&self, now: Instant) -> usize {
        let mut p = self.lock();
        let before = p.bufs.len();
        p.bufs
            .retain(|(_, at)| now.saturating_duration_since(*at) < IDLE);
        if p.bufs.len() != before {
            p.bytes = p.bufs.iter().map(|(b, _)| b.capacity()).sum();
        }
        p.bytes
    }
}

impl Default for BufPool {
    fn default() -> Self {
        BufPool::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_bounded_in_bytes_and_freed_when_idle() {
        let pool = BufPool::new();
        // Small buffers are neither pooled nor taken from the pool.
        pool.give(Vec::with_capacity(100));
        assert_eq!(pool.trim(Instant::now()), 0);

        // A chunk-sized buffer comes back, emptied, with its allocation.
        let mut b = pool.take(1 << 20);
        assert!(b.capacity() >= 1 << 20);
        b.extend_from_slice(&[7; 1000]);
        let ptr = b.as_ptr();
        pool.give(b);
        let again = pool.take(1 << 20);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
        // A request larger than any pooled buffer gets a new one.
        pool.give(again);
        let bigger = pool.take(2 << 20);
        assert_ne!(bigger.as_ptr(), ptr);
        assert!(bigger.capacity() >= 2 << 20);

        // Never more than MAX_POOLED_BYTES of capacity wait.
        for _ in 0..40 {
            pool.give(Vec::with_capacity(1 << 20));
        }
        let held = pool.trim(Instant::now());
        assert!(held <= MAX_POOLED_BYTES, "{held}");
        assert!(held >= MAX_POOLED_BYTES - (2 << 20), "{held}");

        // take_len: exactly that long, from a pooled buffer without zeroing
        // what it held; zeros past that.
        let mut b = pool.take(1 << 20);
        b.resize(1000, 9);
        pool.give(b);
        let b = pool.take_len(1 << 20);
        assert_eq!(b.len(), 1 << 20);
        assert_eq!(&b[..1000], &[9; 1000][..]);
        assert!(b[1000..].iter().all(|x| *x == 0));
        pool.give(b);
        let b = pool.take_len(100_000);
        assert_eq!(b.len(), 100_000);
        assert_eq!(b[0], 9);
        drop(b);

        // Idle buffers go.
        assert_eq!(pool.trim(Instant::now() + IDLE), 0);
        drop(bigger);
    }
}
