//! The whole-file SHA-256 of a fetch, computed while its chunks arrive.
//!
//! Verified chunks are offered in any order; the hash takes them in index
//! order. A chunk that arrives a little ahead of its turn waits in memory
//! (within [`WholeHash::hold_bytes`] of the hash's position); one further
//! ahead, or beyond that budget, is left on disk and read back when its turn
//! comes, as are chunks held from before a restart. At the end whatever is
//! left is read from the file. A receiver fetching alone takes its chunks in
//! index order (see `sched`), so the hash keeps pace with the arrivals and
//! the end has next to nothing left to read: the whole-file check no longer
//! follows the transfer, it runs beside it.
//!
//! Every received chunk is hashed twice: its own check against the manifest
//! and its turn in the whole hash. The two go in one pass where they can
//! ([`WholeHash::check`]): the chunk that is the whole hash's next is
//! checked and hashed together; any other chunk's check carries the whole
//! hash's next waiting chunk beside it (two SHA-256 streams interleaved,
//! see `sha.rs`). So that there is a waiting chunk to carry, the hash does
//! not empty the memory eagerly: up to half the budget waits for checks.
//! Chunks are checked on several threads at once, and only one can step
//! the hash: a check that finds it out waits for it (a pass is well under a
//! millisecond) instead of hashing alone, and then usually finds its own
//! chunk next in turn.
//!
//! The bytes hashed are the verified bytes that were written; chunks read
//! back are read from the file. A disk read that fails stops the running
//! hash, and [`WholeHash::finish`] then hashes the whole file from the start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::objects::{hash_range, sha256, Bitmap, BlobId, Manifest};
use super::sha::{chunk_and_whole, chunk_beside, Running};

/// Bytes of chunks a fetch keeps in memory ahead of its hash (at least two
/// chunks).
pub const HOLD_BYTES: usize = 16 << 20;

/// Longest a check waits for the whole hash that another thread is
/// stepping (one pass is well under a millisecond) before hashing alone.
const SHARE_WAIT: Duration = Duration::from_millis(20);

pub struct WholeHash {
    path: PathBuf,
    manifest: Arc<Manifest>,
    hold: usize,
    st: Mutex<State>,
    /// Signalled whenever `sha` is put back.
    freed: Condvar,
    share_wait: Duration,
}

struct State {
    /// The next chunk to hash.
    next: u32,
    /// None while a thread hashes outside the lock.
    sha: Option<Running>,
    /// Verified chunks in memory: (pooled buffer, start of the chunk in it).
    mem: BTreeMap<u32, (Vec<u8>, usize)>,
    mem_bytes: usize,
    /// Verified chunks on disk only.
    disk: Bitmap,
    /// A read back failed: the end hashes the whole file instead.
    broken: bool,
    /// Chunks checked and hashed in one pass (see [`WholeHash::check`]).
    one_pass: u32,
    /// Checks waiting now for another thread's step of the hash.
    waiting: u32,
}

impl WholeHash {
    /// `held`: chunks already in the file (verified before a restart).
    pub fn new(path: PathBuf, manifest: Arc<Manifest>, held: &Bitmap) -> WholeHash {
        let hold = HOLD_BYTES.max(2 * manifest.chunk_size as usize);
        WholeHash {
            path,
            manifest,
            hold,
            freed: Condvar::new(),
            share_wait: SHARE_WAIT,
            st: Mutex::new(State {
                next: 0,
                sha: Some(Running::new()),
                one_pass: 0,
                waiting: 0,
                mem: BTreeMap::new(),
                mem_bytes: 0,
                disk: held.clone(),
                broken: false,
            }),
        }
    }

    /// Bytes this hash may keep in memory ahead of its position.
    pub fn hold_bytes(&self) -> usize {
        self.hold
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The chunks hashed so far (all below this index).
    pub fn position(&self) -> u32 {
        self.lock().next
    }

    /// Chunks whose check against the manifest was also the whole hash's
    /// pass over them.
    pub fn one_pass(&self) -> u32 {
        self.lock().one_pass
    }

    /// Check a received chunk `index` against its manifest hash `want`,
    /// beside a step of the whole hash where one is ready: when the chunk
    /// is the whole hash's next (the usual case of a fetch in index order)
    /// both hashes take it in one pass, and the whole hash keeps it only if
    /// it matched; otherwise, when the whole hash's next chunk waits in
    /// memory, that chunk is hashed beside this one's check (see sha.rs).
    /// Returns (matched, taken by the whole hash); a chunk not taken is
    /// [`offer`](Self::offer)ed once written. Blocking.
    ///
    /// While another thread steps the whole hash, the check waits for it
    /// (up to [`SHARE_WAIT`]) rather than hash alone: chunks checked on
    /// several threads at once then still each share their pass, the one
    /// that is next in turn with its own step.
    pub fn check(&self, index: u32, data: &[u8], want: &[u8; 32]) -> (bool, bool) {
        let mut st = self.lock();
        let deadline = Instant::now() + self.share_wait;
        while st.sha.is_none() && !st.broken && index >= st.next {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st.waiting += 1;
            st = self
                .freed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.waiting -= 1;
        }
        let next = st.next;
        let own = index == next
            && !st.mem.contains_key(&index)
            && !st.disk.get(index)
            && data.len() as u64 == self.manifest.chunk_len(index);
        let waiting = !own && st.mem.contains_key(&next);
        let sha = if !st.broken && (own || waiting) {
            st.sha.take()
        } else {
            None
        };
        let Some(mut sha) = sha else {
            drop(st);
            return (sha256(data) == *want, false);
        };
        let held = if waiting { st.mem.remove(&next) } else { None };
        let len = self.manifest.chunk_len(next) as usize;
        if held.is_some() {
            st.mem_bytes -= len;
        }
        drop(st);
        let before = own.then(|| sha.clone());
        let ok = match &held {
            Some((buf, start)) => chunk_beside(data, &mut sha, &buf[*start..*start + len]),
            None => chunk_and_whole(data, &mut sha),
        } == *want;
        if let Some((buf, _)) = held {
            crate::bufpool::CHUNKS.give(buf);
        }
        let mut st = self.lock();
        if let (Some(before), false) = (before, ok) {
            // Its own bytes did not match: the hash stays as it was, and
            // chunks that came in meanwhile wait for the good copy.
            self.put_back(&mut st, before);
            return (false, false);
        }
        self.put_back(&mut st, sha);
        st.next += 1;
        st.one_pass += 1;
        self.settle(st);
        (ok, own)
    }

    /// Return the hash a thread took out to step it, and wake the checks
    /// waiting for it.
    fn put_back(&self, st: &mut State, sha: Running) {
        st.sha = Some(sha);
        self.freed.notify_all();
    }

    /// Chunk `index`, verified and written, is `buf[start..start + len]`.
    /// The buffer goes back to the chunk pool once hashed or not kept.
    /// Blocking: may hash and read back chunks; call it off the async
    /// threads.
    pub fn offer(&self, index: u32, buf: Vec<u8>, start: usize) {
        let len = self.manifest.chunk_len(index) as usize;
        if index as usize >= self.manifest.chunks.len() || buf.len() < start + len {
            crate::bufpool::CHUNKS.give(buf);
            return;
        }
        let mut st = self.lock();
        // Hashed, being hashed (`sha` is out while `next` is), or waiting.
        let known = index < st.next
            || (index == st.next && st.sha.is_none())
            || st.mem.contains_key(&index)
            || st.disk.get(index);
        if known {
            drop(st);
            crate::bufpool::CHUNKS.give(buf);
            return;
        }
        // Within reach of the hash and of the budget: kept in memory.
        let ahead = (index - st.next) as u64 * self.manifest.chunk_size as u64;
        if index == st.next || (st.mem_bytes + len <= self.hold && ahead < self.hold as u64) {
            st.mem_bytes += len;
            st.mem.insert(index, (buf, start));
        } else {
            st.disk.set(index);
            drop(st);
            crate::bufpool::CHUNKS.give(buf);
            st = self.lock();
        }
        self.settle(st);
    }

    /// Chunks waiting in memory are left for later checks to hash beside
    /// theirs ([`check`](Self::check)), up to half the memory budget; past
    /// that, or when the next chunk is on disk, the hash moves on here.
    fn settle<'a>(&'a self, st: MutexGuard<'a, State>) {
        self.advance(st, self.hold / 2);
    }

    /// Hash forward while the next chunk is on disk, or in memory with
    /// more than `keep` bytes waiting there. One thread at a time hashes (it
    /// takes `sha`); the others leave their chunk for it.
    fn advance<'a>(&'a self, mut st: MutexGuard<'a, State>, keep: usize) {
        loop {
            if st.broken {
                return;
            }
            let next = st.next;
            let due = st.mem.contains_key(&next) && st.mem_bytes > keep;
            if !due && !st.disk.get(next) {
                return;
            }
            let Some(mut sha) = st.sha.take() else {
                return;
            };
            let mem = st.mem.remove(&next);
            if mem.is_some() {
                st.mem_bytes -= self.manifest.chunk_len(next) as usize;
            }
            drop(st);
            let ok = match mem {
                Some(held) => {
                    self.hash_held(&mut sha, next, held);
                    true
                }
                None => {
                    let off = self.manifest.offset(next);
                    let end = off + self.manifest.chunk_len(next);
                    match hash_range(&self.path, sha.clone(), off, end) {
                        Ok(h) => {
                            sha = h;
                            true
                        }
                        Err(e) => {
                            tracing::warn!(path = %self.path.display(), chunk = next, error = %e, "cannot read a chunk back for the whole-file hash; it will hash the whole file at the end");
                            false
                        }
                    }
                }
            };
            st = self.lock();
            self.put_back(&mut st, sha);
            if !ok {
                st.broken = true;
                return;
            }
            st.next += 1;
        }
    }

    /// Hash chunk `i` from its buffer, and give the buffer back.
    fn hash_held(&self, sha: &mut Running, i: u32, (buf, start): (Vec<u8>, usize)) {
        let len = self.manifest.chunk_len(i) as usize;
        sha.update(&buf[start..start + len]);
        crate::bufpool::CHUNKS.give(buf);
    }

    /// The whole file's SHA-256, once every chunk has been offered (or was
    /// held at the start). Reads what is left from the file.
    pub fn finish(&self) -> std::io::Result<BlobId> {
        let n = self.manifest.chunks.len() as u32;
        let mut st = self.lock();
        let sha = st.sha.take();
        let (Some(mut sha), false) = (sha, st.broken) else {
            drop(st);
            return super::objects::hash_file(&self.path);
        };
        let mut i = st.next;
        while i < n {
            if let Some(held) = st.mem.remove(&i) {
                self.hash_held(&mut sha, i, held);
                i += 1;
                continue;
            }
            // A run of chunks on disk (or never offered: then the hash
            // comes out wrong and the caller discards the file), read in
            // one stream.
            let mut j = i;
            while j < n && !st.mem.contains_key(&j) {
                j += 1;
            }
            let off = self.manifest.offset(i);
            let end = if j == n {
                self.manifest.size
            } else {
                self.manifest.offset(j)
            };
            sha = hash_range(&self.path, sha, off, end)?;
            i = j;
        }
        st.next = n;
        st.mem_bytes = 0;
        Ok(sha.finalize())
    }
}

impl Drop for WholeHash {
    fn drop(&mut self) {
        let st = self.st.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, (buf, _)) in std::mem::take(&mut st.mem) {
            crate::bufpool::CHUNKS.give(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::objects::{chunk_count, sha256};
    use std::os::unix::fs::FileExt;

    /// A partial file (zeros) for `chunks` chunks of 64 KiB plus a short
    /// tail, its manifest, its content and whole hash.
    struct Fx {
        _dir: tempfile::TempDir,
        p: PathBuf,
        m: Arc<Manifest>,
        data: Vec<u8>,
        id: BlobId,
        n: u32,
    }

    fn fixture(chunks: u32) -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let cs = 64 * 1024u32;
        let size = chunks as u64 * cs as u64 + 1000;
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let m = Manifest {
            size,
            chunk_size: cs,
            chunks: data.chunks(cs as usize).map(sha256).collect(),
        };
        assert_eq!(m.chunks.len(), chunk_count(size, cs));
        let p = dir.path().join("partial");
        std::fs::write(&p, vec![0u8; size as usize]).unwrap();
        let id = sha256(&data);
        let n = m.chunks.len() as u32;
        Fx {
            _dir: dir,
            p,
            m: Arc::new(m),
            data,
            id,
            n,
        }
    }

    impl Fx {
        /// A hash of a fetch holding `held` (none: nothing).
        fn hash(&self, held: Option<&Bitmap>) -> WholeHash {
            let none = Bitmap::new(self.n as usize);
            WholeHash::new(self.p.clone(), self.m.clone(), held.unwrap_or(&none))
        }

        fn write(&self, i: u32) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.p)
                .unwrap();
            let off = self.m.offset(i) as usize;
            let len = self.m.chunk_len(i) as usize;
            f.write_all_at(&self.data[off..off + len], off as u64)
                .unwrap();
        }

        /// Chunk `i` behind `pad` bytes (a wire header), as a buffer.
        fn buf(&self, i: u32, pad: usize) -> Vec<u8> {
            let off = self.m.offset(i) as usize;
            let len = self.m.chunk_len(i) as usize;
            let mut b = vec![0xEE; pad];
            b.extend_from_slice(&self.data[off..off + len]);
            b
        }
    }

    #[test]
    fn any_arrival_order_gives_the_whole_hash() {
        let f = fixture(600);
        // Reversed: everything but the last few waits on disk, past the
        // memory budget (600 chunks of 64 KiB is more than 16 MiB).
        let w = f.hash(None);
        for i in (0..f.n).rev() {
            f.write(i);
            w.offer(i, f.buf(i, 10), 10);
            assert!(w.lock().mem_bytes <= w.hold_bytes() + f.m.chunk_size as usize);
        }
        // Chunk 0 came last: the hash moved on until at most half the
        // budget waits in memory (for checks to hash beside theirs).
        assert!(w.position() > 0);
        assert!(w.lock().mem_bytes <= w.hold_bytes() / 2);
        assert_eq!(w.finish().unwrap(), f.id);

        // In order: the hash keeps within half the budget of the arrivals.
        let w = f.hash(None);
        for i in 0..f.n {
            w.offer(i, f.buf(i, 0), 0);
            let st = w.lock();
            assert!(st.mem_bytes <= w.hold_bytes() / 2);
            assert_eq!(st.next as usize + st.mem.len(), i as usize + 1);
        }
        assert_eq!(w.finish().unwrap(), f.id);
    }

    #[test]
    fn a_check_in_turn_feeds_the_whole_hash_and_a_bad_chunk_does_not() {
        let f = fixture(12);
        let w = f.hash(None);
        let check = |i: u32, bytes: &[u8]| w.check(i, bytes, &f.m.chunks[i as usize]);
        let chunk = |i: u32| f.buf(i, 0);
        // In turn: checked and hashed in one pass.
        assert_eq!(check(0, &chunk(0)), (true, true));
        assert_eq!(check(1, &chunk(1)), (true, true));
        // Out of turn: checked alone, then offered as before.
        assert_eq!(check(3, &chunk(3)), (true, false));
        f.write(3);
        w.offer(3, chunk(3), 0);
        // A damaged chunk in turn is refused and leaves the hash as it was.
        let mut bad = chunk(2);
        bad[100] ^= 1;
        assert_eq!(check(2, &bad), (false, false));
        assert_eq!(w.position(), 2);
        // Its good copy goes on; chunk 3 waits in memory.
        assert_eq!(check(2, &chunk(2)), (true, true));
        assert_eq!(w.position(), 3);
        // Any other check takes the waiting chunk 3 beside it: here a
        // damaged duplicate of chunk 0, refused; the hash still moves on.
        let mut bad = chunk(0);
        bad[5] ^= 1;
        assert_eq!(check(0, &bad), (false, false));
        assert_eq!(w.position(), 4);
        for i in 4..f.n {
            assert_eq!(check(i, &chunk(i)), (true, true));
        }
        assert_eq!(w.one_pass(), f.n);
        assert_eq!(w.finish().unwrap(), f.id);
    }

    #[test]
    fn a_check_waits_for_the_hash_another_thread_steps_and_shares_its_pass() {
        let f = fixture(4);
        let mut h = f.hash(None);
        h.share_wait = Duration::from_secs(600);
        let h = Arc::new(h);
        // Another thread is hashing chunk 0: the whole hash is out.
        let mut sha = h.lock().sha.take().unwrap();
        let late = {
            let (h, b, want) = (h.clone(), f.buf(1, 0), f.m.chunks[1]);
            std::thread::spawn(move || h.check(1, &b, &want))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while h.lock().waiting == 0 {
            assert!(
                Instant::now() < deadline,
                "the check of chunk 1 never waited"
            );
            std::thread::yield_now();
        }
        // Chunk 0 done: the hash comes back, and chunk 1 is next in turn.
        sha.update(&f.buf(0, 0));
        {
            let mut st = h.lock();
            st.next = 1;
            h.put_back(&mut st, sha);
        }
        assert_eq!(
            late.join().unwrap(),
            (true, true),
            "checked and hashed in one pass"
        );
        assert_eq!((h.position(), h.one_pass()), (2, 1));
        for i in 2..f.n {
            assert_eq!(
                h.check(i, &f.buf(i, 0), &f.m.chunks[i as usize]),
                (true, true)
            );
        }
        assert_eq!(h.finish().unwrap(), f.id);
    }

    #[test]
    fn chunks_held_before_a_restart_are_read_back() {
        let f = fixture(40);
        let mut held = Bitmap::new(f.n as usize);
        for i in (0..f.n).filter(|i| i % 3 == 0) {
            f.write(i);
            held.set(i);
        }
        let w = f.hash(Some(&held));
        // Duplicates of held chunks are ignored; the rest arrive out of order.
        w.offer(0, f.buf(0, 0), 0);
        let mut rest: Vec<u32> = (0..f.n).filter(|i| i % 3 != 0).collect();
        rest.reverse();
        rest.rotate_left(5);
        for i in rest {
            f.write(i);
            w.offer(i, f.buf(i, 3), 3);
        }
        assert_eq!(w.finish().unwrap(), f.id);
    }

    #[test]
    fn a_wrong_or_missing_chunk_gives_a_wrong_hash() {
        let f = fixture(8);
        let w = f.hash(None);
        for i in 0..f.n {
            let mut b = f.buf(i, 0);
            if i == 4 {
                b[7] ^= 1;
            }
            w.offer(i, b, 0);
        }
        assert_ne!(w.finish().unwrap(), f.id);
        // Chunk 2 never offered nor written (zeros in the file).
        let w = f.hash(None);
        for i in (0..f.n).filter(|i| *i != 2) {
            f.write(i);
            w.offer(i, f.buf(i, 0), 0);
        }
        assert!(w.position() <= 2);
        assert_ne!(w.finish().unwrap(), f.id);
    }

    #[test]
    fn a_failed_read_back_falls_back_to_the_whole_file() {
        let f = fixture(600);
        for i in 0..f.n {
            f.write(i);
        }
        let w = f.hash(None);
        // Far ahead (17.5 MiB): left on disk. Then the file is briefly gone
        // when its turn comes.
        let far = 280;
        w.offer(far, f.buf(far, 0), 0);
        assert!(w.lock().disk.get(far));
        let moved = f.p.with_file_name("moved");
        std::fs::rename(&f.p, &moved).unwrap();
        for i in (0..f.n).filter(|i| *i != far) {
            w.offer(i, f.buf(i, 0), 0);
        }
        assert!(w.lock().broken);
        std::fs::rename(&moved, &f.p).unwrap();
        assert_eq!(w.finish().unwrap(), f.id);
    }
}
