//! Chunks of complete blobs this agent has verified itself and whose file
//! has not changed since: serving them again needs no second hash.
//!
//! A source checks every chunk against its manifest before serving it, so
//! that a copy damaged on disk is never served (and is found and repaired).
//! Most of those checks repeat what the agent already knows: `blob add`
//! hashed the very bytes it wrote, a fetch verified every chunk and the
//! whole file before the object was made complete, and a chunk checked once
//! when served is checked again for every other peer that asks for it. That
//! check was a quarter of a source's CPU during a transfer.
//!
//! What is remembered is tied to the file's [`Stamp`] (device, inode, size,
//! modification and change times). Any write, truncation, `chmod` or rename
//! sets the change time (ctime), which no user can set back, so a changed
//! file no longer matches and its chunks are hashed again. One trap: the
//! kernel stamps ctime from a coarse clock (one scheduler tick), and a
//! filesystem may keep only whole seconds; a write within the same tick as
//! the stamp would leave it unchanged. A stamp is therefore trusted only
//! once it is [`settled`](Stamp::settled): the coarse clock has moved past
//! its ctime (two seconds past, if the ctime has no sub-second part), so
//! every later change gets a later ctime.
//!
//! A file can still change without a stamp change (bits rotting on the
//! device): receivers catch that chunk by its hash, and every entry expires
//! after [`VOUCH_TTL`], after which the chunk is hashed again when served.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::manifest::{Bitmap, BlobId};

/// How long a verified chunk is served without being hashed again.
pub const VOUCH_TTL: Duration = Duration::from_secs(600);
/// Blobs remembered at once (oldest dropped first); each costs one bit per
/// chunk, at most 8 KiB.
const VOUCH_BLOBS: usize = 256;

/// What identifies a file's contents short of reading them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(md: &Metadata) -> Stamp {
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }

    /// Whether any later change to the file must give it a different
    /// ctime: the kernel's coarse clock, which stamps changes, has moved
    /// past this one.
    pub fn settled(&self) -> bool {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to fill.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) } != 0 {
            return false;
        }
        let now = (now.tv_sec, now.tv_nsec);
        if self.ctime.1 == 0 {
            // Likely a filesystem that keeps whole seconds (or coarser).
            now.0 >= self.ctime.0 + 2
        } else {
            now > self.ctime
        }
    }
}

struct Entry {
    stamp: Stamp,
    since: Instant,
    chunks: Bitmap,
}

/// The chunks vouched for, per blob.
#[derive(Default)]
pub struct Vouched {
    map: Mutex<HashMap<BlobId, Entry>>,
}

impl Vouched {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<BlobId, Entry>> {
        crate::util::lock(&self.map)
    }

    /// Whether chunk `index` of `id` was verified in the file as it is now.
    pub fn holds(&self, id: &BlobId, stamp: &Stamp, index: u32) -> bool {
        self.map().get(id).is_some_and(|e| {
            e.stamp == *stamp && e.since.elapsed() < VOUCH_TTL && e.chunks.get(index)
        })
    }

    /// Chunk `index` (of `chunks`) was read from the file with `stamp` and
    /// matched its manifest. Remembered only if the stamp is settled.
    pub fn record(&self, id: &BlobId, stamp: &Stamp, index: u32, chunks: usize) {
        if !stamp.settled() {
            return;
        }
        let mut map = self.map();
        let fresh = map.get(id).is_none_or(|e| {
            e.stamp != *stamp || e.since.elapsed() >= VOUCH_TTL || !e.chunks.fits(chunks)
        });
        if fresh {
            Self::put(&mut map, id, *stamp, Bitmap::new(chunks));
        }
        if let Some(e) = map.get_mut(id) {
            e.chunks.set(index);
        }
    }

    /// Every chunk of the file with `stamp` is known to match (the agent
    /// wrote the bytes it hashed, or verified each one and the whole).
    /// Returns whether it was remembered (the stamp settled in time).
    pub fn record_all(&self, id: &BlobId, path: &std::path::Path, chunks: usize) -> bool {
        // The stamp was just set by our own writes: wait out the tick that
        // made it (a few milliseconds), bounded.
        let deadline = Instant::now() + Duration::from_millis(50);
        loop {
            let Ok(md) = std::fs::metadata(path) else {
                return false;
            };
            let stamp = Stamp::of(&md);
            if stamp.settled() {
                Self::put(&mut self.map(), id, stamp, Bitmap::full(chunks));
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn forget(&self, id: &BlobId) {
        self.map().remove(id);
    }

    /// A fresh entry for `id`, making room for it (the oldest goes).
    fn put(map: &mut HashMap<BlobId, Entry>, id: &BlobId, stamp: Stamp, chunks: Bitmap) {
        if map.len() >= VOUCH_BLOBS && !map.contains_key(id) {
            if let Some(oldest) = map.iter().min_by_key(|(_, e)| e.since).map(|(id, _)| *id) {
                map.remove(&oldest);
            }
        }
        let since = Instant::now();
        map.insert(
            *id,
            Entry {
                stamp,
                since,
                chunks,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn stamp(p: &std::path::Path) -> Stamp {
        Stamp::of(&std::fs::metadata(p).unwrap())
    }

    fn wait_settled(p: &std::path::Path) -> Stamp {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = stamp(p);
            if s.settled() {
                return s;
            }
            assert!(Instant::now() < deadline, "stamp never settled");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn any_write_after_a_settled_stamp_changes_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        for round in 0..20u8 {
            let before = wait_settled(&p);
            // Same size, same bytes but one: only the times can tell.
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(&[round], 100).unwrap();
            assert_ne!(stamp(&p), before, "round {round}");
        }
    }

    #[test]
    fn a_vouch_holds_for_its_stamp_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&[1u8; 4096])
            .unwrap();
        let v = Vouched::default();
        let id = [3u8; 32];
        let s = wait_settled(&p);
        v.record(&id, &s, 1, 4);
        assert!(v.holds(&id, &s, 1));
        assert!(!v.holds(&[4u8; 32], &s, 1), "another blob");
        // A write changes the stamp: nothing is vouched for any more.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[9], 0).unwrap();
        let changed = stamp(&p);
        assert!(!v.holds(&id, &changed, 1));
        // Recording against the new stamp starts afresh: chunk 1 is gone.
        let changed = wait_settled(&p);
        v.record(&id, &changed, 2, 4);
        assert!(v.holds(&id, &changed, 2) && !v.holds(&id, &changed, 1));
        v.forget(&id);
        assert!(!v.holds(&id, &changed, 2));
    }

    #[test]
    fn an_unsettled_stamp_is_not_remembered() {
        let s = Stamp {
            dev: 1,
            ino: 1,
            size: 1,
            mtime: (i64::MAX / 2, 1),
            ctime: (i64::MAX / 2, 1),
        };
        assert!(!s.settled());
        let v = Vouched::default();
        v.record(&[1u8; 32], &s, 0, 1);
        assert!(!v.holds(&[1u8; 32], &s, 0));
    }

    #[test]
    fn record_all_vouches_for_every_chunk_and_the_map_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        wait_settled(&p);
        let v = Vouched::default();
        for i in 0..VOUCH_BLOBS as u32 + 10 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            assert!(v.record_all(&id, &p, 3));
            assert!((0..3).all(|c| v.holds(&id, &stamp(&p), c)));
        }
        assert_eq!(v.map().len(), VOUCH_BLOBS);
    }
}
