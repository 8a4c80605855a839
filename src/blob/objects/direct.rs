//! File I/O past the page cache: `O_DIRECT` writes, reads and copies with
//! their aligned staging buffers, and the hashing passes over files and
//! streams built on them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::manifest::*;
use crate::blob::sha::{chunk_and_whole, Running};

/// Offsets, lengths and buffer addresses of `O_DIRECT` writes are
/// multiples of this (the largest logical block size in common use).
pub(super) const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// One aligned staging buffer per blocking thread, reused chunk after
    /// chunk (fresh pages are what made the page-cache copy slow).
    static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Likewise for a chunk read back by [`hash_range`].
    static READBACK: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub(super) fn write_direct(p: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)?;
    STAGING.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < data.len() + DIRECT_ALIGN {
            *buf = vec![0u8; data.len() + DIRECT_ALIGN];
        }
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let staged = &mut buf[start..start + data.len()];
        staged.copy_from_slice(data);
        f.write_all_at(staged, offset)
    })
}

/// SHA-256 of a whole file. One thread reads (with `O_DIRECT` where the
/// filesystem has it: the bytes were just written past the page cache, and
/// reading them back through it cost a copy into fresh pages), the caller
/// hashes, two buffers of 4 MiB between them.
pub fn hash_file(p: &Path) -> std::io::Result<BlobId> {
    Ok(hash_range(p, Running::new(), 0, u64::MAX)?.finalize())
}

/// Feed bytes `start..end` of a file (or up to its end) to `h`, read as
/// [`hash_file`] reads. `start` is a multiple of 4096, and so is `end`
/// unless it is the file's end or beyond.
pub fn hash_range(p: &Path, mut h: Running, start: u64, end: u64) -> std::io::Result<Running> {
    read_range(p, start, end, |b| {
        h.update(b);
        Ok(())
    })?;
    Ok(h)
}

/// Hand bytes `start..end` of a file (or up to its end) to `f` in order,
/// read with `O_DIRECT` where the filesystem has it (`start` a multiple of
/// 4096, and `end` too unless it is the file's end or beyond). Every slice
/// but the last is a multiple of 4096 bytes at a 4096-aligned address.
pub(super) fn read_range(
    p: &Path,
    start: u64,
    end: u64,
    mut f: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    const BUF: usize = 4 << 20;
    let direct = start % DIRECT_ALIGN as u64 == 0;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(p)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => File::open(p)?,
        Err(e) => return Err(e),
    };
    let want = end.saturating_sub(start);
    if want == 0 {
        return Ok(());
    }
    // One buffer when the range fits in it (a chunk read back), read here;
    // two otherwise: a reader thread fills one while this one consumes the
    // other.
    let buf_len = (want.min(BUF as u64) as usize).next_multiple_of(DIRECT_ALIGN);
    // Fill the buffer unless the file or the range ends: a short read in
    // the middle would misalign the next direct read. Reads stay multiples
    // of the alignment; the range's end cuts what is handed on.
    let fill = |buf: &mut [u8], at: usize, off: u64| -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf_len && off + (n as u64) < end {
            let r = file.read_at(&mut buf[at + n..at + buf_len], off + n as u64)?;
            if r == 0 {
                break;
            }
            n += r;
        }
        Ok(n.min(end.saturating_sub(off) as usize))
    };
    if want as usize <= buf_len {
        return READBACK.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < buf_len + DIRECT_ALIGN {
                *buf = vec![0u8; buf_len + DIRECT_ALIGN];
            }
            let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
            let n = fill(&mut buf, at, start)?;
            f(&buf[at..at + n])
        });
    }
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize, usize)>(2);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
    for _ in 0..2 {
        let _ = free_tx.send(vec![0u8; buf_len + DIRECT_ALIGN]);
    }
    std::thread::scope(|sc| {
        let reader = sc.spawn(move || -> std::io::Result<()> {
            let mut off = start;
            while let Ok(mut buf) = free_rx.recv() {
                let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
                let n = fill(&mut buf, at, off)?;
                off += n as u64;
                let last = n < buf_len || off >= end;
                if full_tx.send((buf, at, n)).is_err() || last {
                    break;
                }
            }
            Ok(())
        });
        let mut res = Ok(());
        while let Ok((buf, at, n)) = full_rx.recv() {
            if let Err(e) = f(&buf[at..at + n]) {
                res = Err(e);
                break;
            }
            let _ = free_tx.send(buf);
        }
        // Unblocks the reader if `f` stopped early.
        drop(free_tx);
        drop(full_rx);
        let read = reader
            .join()
            .map_err(|_| std::io::Error::other("reader thread panicked"))?;
        res.and(read)
    })
}

/// Copy a file to a new file `dst` past the page cache: `O_DIRECT` reads
/// and writes where both filesystems have it, the last partial block
/// through the cache; else `std::fs::copy`. Through the page cache the
/// copy and its fsync ran at the disk's buffered rate (a 1 GiB model took
/// longer to place than to fetch).
pub(super) fn copy_direct(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let einval = |e: &std::io::Error| e.raw_os_error() == Some(libc::EINVAL);
    let out = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(dst)
    {
        Ok(f) => f,
        Err(e) if einval(&e) => return std::fs::copy(src, dst).map(|_| ()),
        Err(e) => return Err(e),
    };
    let mut buffered: Option<File> = None;
    let mut off = 0u64;
    read_range(src, 0, u64::MAX, |b| {
        let aligned = b.len() % DIRECT_ALIGN == 0 && b.as_ptr() as usize % DIRECT_ALIGN == 0;
        if aligned && buffered.is_none() {
            match out.write_all_at(b, off) {
                Ok(()) => {
                    off += b.len() as u64;
                    return Ok(());
                }
                Err(e) if einval(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let w = match &buffered {
            Some(w) => w,
            None => buffered.insert(OpenOptions::new().write(true).open(dst)?),
        };
        w.write_all_at(b, off)?;
        off += b.len() as u64;
        Ok(())
    })
}

/// A write to [`hash_stream`]'s output failed (not a read of its input).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct OutputFailed(std::io::Error);

/// One pass over a reader: the whole-content hash and the chunk hashes,
/// optionally writing the bytes to `out`.
pub fn hash_stream(
    mut r: impl Read,
    size_hint: u64,
    preferred_chunk: u32,
    mut out: Option<&mut File>,
) -> std::io::Result<(BlobId, Manifest)> {
    let chunk_size = chunk_size_for(size_hint, preferred_chunk);
    let mut whole = Running::new();
    // The hint may come from a request: never trusted beyond MAX_CHUNKS.
    let mut chunks = Vec::with_capacity(chunk_count(size_hint, chunk_size).min(MAX_CHUNKS));
    let mut buf = vec![0u8; chunk_size as usize];
    let mut size = 0u64;
    loop {
        // Fill one chunk (short reads are allowed by Read).
        let mut n = 0;
        while n < buf.len() {
            let k = r.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        // Both hashes in one pass over the chunk (see sha.rs).
        chunks.push(chunk_and_whole(data, &mut whole));
        if let Some(f) = out.as_deref_mut() {
            f.write_all(data)
                .map_err(|e| std::io::Error::new(e.kind(), OutputFailed(e)))?;
        }
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    let m = Manifest {
        size,
        chunk_size,
        chunks,
    };
    if m.check().is_err() {
        return Err(std::io::Error::other(format!(
            "file of {size} bytes is too large for one blob ({MAX_CHUNKS} chunks of at most {MAX_CHUNK} bytes)"
        )));
    }
    Ok((whole.finalize(), m))
}
