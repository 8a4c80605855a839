//! The blob store: content-addressed files under `<data>/blobs/`, their
//! manifests and chunk bitmaps in sled. Everything here blocks (file I/O,
//! hashing): call it from `spawn_blocking`.
//!
//! Layout (proto-notes/sync.md):
//! - `objects/<hex id>`: complete blobs, verified, read-only.
//! - `partial/<hex id>`: blobs being fetched, full length, holes unfilled.
//! - `tmp/`: files being added.
//! - sled trees `blob_meta` (id → [`BlobMeta`]), `blob_manifest` (id →
//!   [`Manifest`]), `blob_have` (id → bitmap of durable verified chunks of a
//!   partial blob), `blob_names` (name → [`NameRecord`]), `blob_placed`
//!   (path → id last placed there).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::sha::{chunk_and_whole, Running};
use super::vouch::{Stamp, Vouched};

use crate::codec;
use crate::durable::{Durable, DurableError, What};

pub type BlobId = [u8; 32];

/// Smallest and largest chunk a manifest may use.
pub use crate::config::{MAX_CHUNK, MIN_CHUNK};
/// Most chunks in one manifest; the chunk size doubles until a blob fits.
pub const MAX_CHUNKS: usize = 65_536;
/// Largest manifest body (65,536 hashes plus framing).
pub const MAX_MANIFEST_BYTES: usize = MAX_CHUNKS * 33 + 64;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("blob store database: {0}")]
    Db(#[from] sled::Error),
    #[error("{0}")]
    ReadOnly(#[from] DurableError),
    #[error("damaged blob store record {tree}/{key}: {reason}")]
    Damaged {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("blob {0} is not held here")]
    NotHeld(String),
    #[error("chunk {index} of {path} does not match its manifest: the stored copy is damaged")]
    DamagedChunk { path: String, index: u32 },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

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

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlobMeta {
    pub size: u64,
    pub root: [u8; 32],
    pub complete: bool,
    pub added_ms: u64,
    /// When no name pointed at it any more (0: a name does); garbage
    /// collection counts retention from here.
    pub released_ms: u64,
}

/// What a name points at, from the newest event that named it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NameRecord {
    pub blob: BlobId,
    pub size: u64,
    pub root: [u8; 32],
    /// The naming event: its time (newest wins), id, type and source name.
    pub ts_ms: u64,
    pub event_hash: [u8; 32],
    pub event_id: String,
    pub event_type: String,
    pub origin: String,
}

/// Decoded manifests kept in memory.
const MANIFEST_CACHE: usize = 8;

pub struct BlobStore {
    cache: std::sync::Mutex<Vec<(BlobId, Arc<Manifest>)>>,
    /// Cleared the first time the filesystem refuses `O_DIRECT` (tmpfs,
    /// some network filesystems): chunks are then written through the page
    /// cache.
    direct: std::sync::atomic::AtomicBool,
    /// Chunks of complete objects known good since their file last changed
    /// (vouch.rs): served without hashing them again.
    vouched: Vouched,
    dir: PathBuf,
    meta: sled::Tree,
    manifests: sled::Tree,
    have: sled::Tree,
    names: sled::Tree,
    placed: sled::Tree,
    /// Every record above is made durable through it (durable.rs).
    durable: Durable,
}

pub fn hex_id(id: &BlobId) -> String {
    hex::encode(id)
}

pub fn parse_id(s: &str) -> Option<BlobId> {
    let v = hex::decode(s.trim()).ok()?;
    v.try_into().ok()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Offsets, lengths and buffer addresses of `O_DIRECT` writes are
/// multiples of this (the largest logical block size in common use).
const DIRECT_ALIGN: usize = 4096;

thread_local! {
    /// One aligned staging buffer per blocking thread, reused chunk after
    /// chunk (fresh pages are what made the page-cache copy slow).
    static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Likewise for a chunk read back by [`hash_range`].
    static READBACK: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn write_direct(p: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
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
fn read_range(
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
fn copy_direct(src: &Path, dst: &Path) -> std::io::Result<()> {
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
struct OutputFailed(std::io::Error);

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

fn decode_rec<T: serde::de::DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    v: &[u8],
) -> Result<T, BlobError> {
    codec::decode(v, MAX_MANIFEST_BYTES + 1024).map_err(|e| BlobError::Damaged {
        tree,
        key: String::from_utf8(key.to_vec()).unwrap_or_else(|_| hex::encode(key)),
        reason: e.to_string(),
    })
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, BlobError> {
    codec::encode(v).map_err(|e| BlobError::Invalid(e.to_string()))
}

/// A chunk read from the store.
struct ChunkRead {
    /// The buffer, the chunk in its last `len` bytes.
    buf: Vec<u8>,
    len: usize,
    /// Its hash in the manifest, and the manifest's chunk count.
    want: [u8; 32],
    chunks: usize,
    /// The object file's stamp before the read (complete blobs only).
    stamp: Option<Stamp>,
    path: PathBuf,
}

/// What [`BlobStore::add_file`] did.
pub struct Added {
    pub id: BlobId,
    pub manifest: Manifest,
    /// The store held this content already (nothing new stored).
    pub existing: bool,
}

impl BlobStore {
    pub fn open(dir: &Path, durable: &Durable) -> Result<BlobStore, BlobError> {
        let db = durable.db();
        for sub in ["objects", "partial", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io("cannot create blob directory", &p))?;
        }
        // Leftovers of adds interrupted by a crash.
        let tmp = dir.join("tmp");
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(BlobStore {
            cache: std::sync::Mutex::new(Vec::new()),
            direct: std::sync::atomic::AtomicBool::new(true),
            vouched: Vouched::default(),
            dir: dir.to_path_buf(),
            meta: db.open_tree("blob_meta")?,
            manifests: db.open_tree("blob_manifest")?,
            have: db.open_tree("blob_have")?,
            names: db.open_tree("blob_names")?,
            placed: db.open_tree("blob_placed")?,
            durable: durable.clone(),
        })
    }

    pub fn object_path(&self, id: &BlobId) -> PathBuf {
        self.dir.join("objects").join(hex_id(id))
    }

    pub fn partial_path(&self, id: &BlobId) -> PathBuf {
        self.dir.join("partial").join(hex_id(id))
    }

    /// Copy `src` into the store while hashing it (one pass, memory bounded
    /// by one chunk). The store's copy is its own: the producer may delete
    /// or rewrite its file afterwards.
    pub fn add_file(&self, src: &Path, preferred_chunk: u32) -> Result<Added, BlobError> {
        let f = File::open(src).map_err(io("cannot open", src))?;
        let md = f.metadata().map_err(io("cannot stat", src))?;
        if !md.is_file() {
            return Err(BlobError::Invalid(format!(
                "{} is not a regular file",
                src.display()
            )));
        }
        self.add_reader(f, md.len(), src, preferred_chunk)
    }

    /// Add `len` bytes read from `r` (`label` names the source in errors):
    /// hashed and copied into the store in one pass. Fewer or more bytes
    /// than `len` is an error and stores nothing. Content the store
    /// already holds replaces the held object with the bytes just hashed,
    /// so re-adding the original repairs a damaged copy.
    pub fn add_reader(
        &self,
        r: impl Read,
        len: u64,
        label: &Path,
        preferred_chunk: u32,
    ) -> Result<Added, BlobError> {
        let src = label;
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("add-{}", uuid::Uuid::now_v7()));
        let mut out = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        let res = hash_stream(
            std::io::BufReader::with_capacity(1 << 20, r.take(len.saturating_add(1))),
            len,
            preferred_chunk,
            Some(&mut out),
        )
        .map_err(|e| {
            // Name the file that failed: the store's copy (e.g. no space
            // left on the data directory's disk) or the source.
            if e.get_ref().is_some_and(|i| i.is::<OutputFailed>()) {
                io("cannot write the store's copy", &tmp)(e)
            } else {
                io("cannot read", src)(e)
            }
        })
        .and_then(|(id, m)| {
            if m.size != len {
                return Err(BlobError::Invalid(format!(
                    "{}: {} bytes read where {len} were announced",
                    src.display(),
                    m.size
                )));
            }
            out.sync_all().map_err(io("cannot sync", &tmp))?;
            Ok((id, m))
        });
        let (id, manifest) = match res {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // Held already or not, the bytes just hashed become the object:
        // re-adding held content replaces a copy that may have been damaged
        // on disk since.
        let existing = self.is_complete(&id)?;
        let dst = self.object_path(&id);
        set_readonly(&tmp);
        std::fs::rename(&tmp, &dst).map_err(io("cannot move into the store", &dst))?;
        sync_dir(&dst);
        if !existing {
            self.commit_complete(&id, &manifest)?;
            let _ = std::fs::remove_file(self.partial_path(&id));
        }
        // The object holds the bytes that were just hashed.
        self.vouched.record_all(&id, &dst, manifest.chunks.len());
        Ok(Added {
            id,
            manifest,
            existing,
        })
    }

    fn commit_complete(&self, id: &BlobId, m: &Manifest) -> Result<(), BlobError> {
        let prev = self.meta(id)?;
        let meta = BlobMeta {
            size: m.size,
            root: m.root(),
            complete: true,
            added_ms: now_ms(),
            released_ms: prev.map_or(0, |p| p.released_ms),
        };
        self.forget_manifest(id);
        self.manifests.insert(id, enc(m)?)?;
        self.meta.insert(id, enc(&meta)?)?;
        self.have.remove(id)?;
        self.durable.commit(What::Blob)?;
        Ok(())
    }

    pub fn meta(&self, id: &BlobId) -> Result<Option<BlobMeta>, BlobError> {
        self.meta
            .get(id)?
            .map(|v| decode_rec("blob_meta", id, &v))
            .transpose()
    }

    pub fn is_complete(&self, id: &BlobId) -> Result<bool, BlobError> {
        Ok(self.meta(id)?.is_some_and(|m| m.complete))
    }

    /// A blob's manifest; the last few used are kept decoded (a 50 GB blob's
    /// is 1.6 MB, and every chunk served or read needs it).
    pub fn manifest(&self, id: &BlobId) -> Result<Option<Arc<Manifest>>, BlobError> {
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = c.iter().position(|(i, _)| i == id) {
                let e = c.remove(k);
                let m = e.1.clone();
                c.insert(0, e);
                return Ok(Some(m));
            }
        }
        let Some(v) = self.manifests.get(id)? else {
            return Ok(None);
        };
        let m: Arc<Manifest> = Arc::new(decode_rec("blob_manifest", id, &v)?);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.insert(0, (*id, m.clone()));
        c.truncate(MANIFEST_CACHE);
        Ok(Some(m))
    }

    fn forget_manifest(&self, id: &BlobId) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _)| i != id);
    }

    /// Every blob record: (id, meta).
    pub fn list(&self) -> Result<Vec<(BlobId, BlobMeta)>, BlobError> {
        let mut out = Vec::new();
        for kv in self.meta.iter() {
            let (k, v) = kv?;
            let Ok(id) = <BlobId>::try_from(&k[..]) else {
                continue;
            };
            out.push((id, decode_rec("blob_meta", &k, &v)?));
        }
        Ok(out)
    }

    /// Chunks of a partial blob that are verified and durable.
    pub fn have(&self, id: &BlobId) -> Result<Option<Bitmap>, BlobError> {
        self.have
            .get(id)?
            .map(|v| decode_rec("blob_have", id, &v))
            .transpose()
    }

    /// Start (or resume) a partial blob: manifest recorded, file of full
    /// length. Returns the chunks already held.
    pub fn begin_partial(&self, id: &BlobId, m: &Manifest) -> Result<Bitmap, BlobError> {
        let p = self.partial_path(id);
        let obj = self.object_path(id);
        let mut have = self.have(id)?.filter(|b| b.fits(m.chunks.len()));
        if !p.exists() && obj.exists() {
            // A finish interrupted between moving the file into place and
            // recording the blob complete: the file goes back to being the
            // partial one, every chunk held, and is checked again.
            tracing::info!(path = %obj.display(), "an interrupted finish left the object unrecorded; checking it again");
            set_writable(&obj);
            std::fs::rename(&obj, &p).map_err(io("cannot move back", &obj))?;
            have = Some(Bitmap::full(m.chunks.len()));
        }
        let existed = p.exists();
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io("cannot create", &p))?;
        let len = f.metadata().map_err(io("cannot stat", &p))?.len();
        if !existed || len < m.size {
            // No file, or a shorter one than recorded: its chunks are not
            // here, whatever the bitmap says.
            have = None;
        }
        if len != m.size {
            f.set_len(m.size).map_err(io("cannot size", &p))?;
        }
        let have = have.unwrap_or_else(|| Bitmap::new(m.chunks.len()));
        if self.meta(id)?.is_none() {
            let meta = BlobMeta {
                size: m.size,
                root: m.root(),
                complete: false,
                added_ms: now_ms(),
                released_ms: 0,
            };
            self.manifests.insert(id, enc(m)?)?;
            self.meta.insert(id, enc(&meta)?)?;
        }
        self.have.insert(id, enc(&have)?)?;
        self.durable.commit(What::Blob)?;
        Ok(have)
    }

    /// Write a verified chunk of a partial blob (not yet durable).
    ///
    /// Whole aligned chunks go to the disk with `O_DIRECT`: on the receiving
    /// side the copy into fresh page-cache pages was the largest single cost
    /// of a transfer (see proto-notes/sync.md, "Throughput"). The tail
    /// chunk, and filesystems without `O_DIRECT`, go through the page cache.
    pub fn write_chunk(&self, id: &BlobId, offset: u64, data: &[u8]) -> Result<(), BlobError> {
        use std::sync::atomic::Ordering;
        let p = self.partial_path(id);
        if self.direct.load(Ordering::Relaxed)
            && offset % DIRECT_ALIGN as u64 == 0
            && data.len() % DIRECT_ALIGN == 0
            && !data.is_empty()
        {
            match write_direct(&p, offset, data) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %p.display(), "the filesystem refuses O_DIRECT; chunks go through the page cache");
                    self.direct.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(io("cannot write", &p)(e)),
            }
        }
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io("cannot open", &p))?;
        f.write_all_at(data, offset).map_err(io("cannot write", &p))
    }

    /// Make written chunks durable, then record them as held.
    pub fn checkpoint(&self, id: &BlobId, have: &Bitmap) -> Result<(), BlobError> {
        let p = self.partial_path(id);
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io("cannot open", &p))?;
        f.sync_data().map_err(io("cannot sync", &p))?;
        self.have.insert(id, enc(have)?)?;
        self.durable.commit(What::Blob)?;
        Ok(())
    }

    /// Check the whole partial file against the blob id, then make it a
    /// complete object. A mismatch discards the partial file.
    /// `whole` gives the file's hash, given its path: [`hash_file`], or a
    /// hash that ran beside the transfer.
    pub fn finish_partial(
        &self,
        id: &BlobId,
        m: &Manifest,
        whole: impl FnOnce(&Path) -> std::io::Result<BlobId>,
    ) -> Result<bool, BlobError> {
        let p = self.partial_path(id);
        let f = File::open(&p).map_err(io("cannot open", &p))?;
        f.sync_all().map_err(io("cannot sync", &p))?;
        drop(f);
        let got = whole(&p).map_err(io("cannot read", &p))?;
        if got != *id {
            let _ = std::fs::remove_file(&p);
            self.have.remove(id)?;
            return Ok(false);
        }
        let dst = self.object_path(id);
        set_readonly(&p);
        std::fs::rename(&p, &dst).map_err(io("cannot move into the store", &dst))?;
        sync_dir(&dst);
        self.commit_complete(id, m)?;
        // Every chunk was verified before it was written, and the whole.
        self.vouched.record_all(id, &dst, m.chunks.len());
        Ok(true)
    }

    /// Read a chunk of a complete blob, or of a partial one if held.
    pub fn read_chunk(&self, id: &BlobId, index: u32) -> Result<Vec<u8>, BlobError> {
        Ok(self
            .read_chunk_after(id, index, |len| (vec![0; len], 0))?
            .buf)
    }

    /// Read a chunk into the buffer `buffer(chunk_len)` gives, (buffer,
    /// where the chunk goes: behind a header).
    fn read_chunk_after(
        &self,
        id: &BlobId,
        index: u32,
        buffer: impl FnOnce(usize) -> (Vec<u8>, usize),
    ) -> Result<ChunkRead, BlobError> {
        let meta = self
            .meta(id)?
            .ok_or_else(|| BlobError::NotHeld(hex_id(id)))?;
        let m = self
            .manifest(id)?
            .ok_or_else(|| BlobError::NotHeld(hex_id(id)))?;
        if index as usize >= m.chunks.len() {
            return Err(BlobError::Invalid(format!("no chunk {index}")));
        }
        let path = if meta.complete {
            self.object_path(id)
        } else {
            if !self.have(id)?.is_some_and(|b| b.get(index)) {
                return Err(BlobError::NotHeld(format!("{} chunk {index}", hex_id(id))));
            }
            self.partial_path(id)
        };
        let f = File::open(&path).map_err(io("cannot open", &path))?;
        // Taken before the read: a change after it gives a new stamp.
        let stamp = if meta.complete {
            Some(Stamp::of(&f.metadata().map_err(io("cannot stat", &path))?))
        } else {
            None
        };
        let len = m.chunk_len(index) as usize;
        let (mut buf, start) = buffer(len);
        buf.resize(start + len, 0);
        f.read_exact_at(&mut buf[start..], m.offset(index))
            .map_err(io("cannot read", &path))?;
        Ok(ChunkRead {
            buf,
            len,
            want: m.chunks[index as usize],
            chunks: m.chunks.len(),
            stamp,
            path,
        })
    }

    /// Read a chunk and check it against the manifest: a stored copy that
    /// rotted on disk is never served.
    pub fn read_verified_chunk(&self, id: &BlobId, index: u32) -> Result<Vec<u8>, BlobError> {
        Ok(self
            .read_verified_chunk_after(id, index, |len| (vec![0; len], 0))?
            .0)
    }

    /// [`Self::read_verified_chunk`] into the buffer `buffer(chunk_len)`
    /// gives, behind a header (a peer answer's wire header); returns the
    /// buffer, the chunk's length, and whether it was hashed (false: the
    /// object is unchanged since the chunk was verified, see vouch.rs).
    pub fn read_verified_chunk_after(
        &self,
        id: &BlobId,
        index: u32,
        buffer: impl FnOnce(usize) -> (Vec<u8>, usize),
    ) -> Result<(Vec<u8>, usize, bool), BlobError> {
        // A held chunk that can't be read (a truncated or missing file) is
        // damage like one that reads wrong.
        let r = match self.read_chunk_after(id, index, buffer) {
            Err(BlobError::Io { path, .. }) => return Err(BlobError::DamagedChunk { path, index }),
            r => r?,
        };
        if let Some(stamp) = &r.stamp {
            if self.vouched.holds(id, stamp, index) {
                return Ok((r.buf, r.len, false));
            }
        }
        if sha256(&r.buf[r.buf.len() - r.len..]) != r.want {
            self.vouched.forget(id);
            return Err(BlobError::DamagedChunk {
                path: r.path.display().to_string(),
                index,
            });
        }
        if let Some(stamp) = &r.stamp {
            self.vouched.record(id, stamp, index, r.chunks);
        }
        Ok((r.buf, r.len, true))
    }

    /// Check a complete object against its manifest before it is placed:
    /// its length, then each chunk (chunks vouched for since the file last
    /// changed are not read again, see vouch.rs). A short file or a chunk
    /// that doesn't match is `DamagedChunk`.
    pub fn verify_object(&self, id: &BlobId) -> Result<(), BlobError> {
        let m = self
            .manifest(id)?
            .ok_or_else(|| BlobError::NotHeld(hex_id(id)))?;
        let path = self.object_path(id);
        let damaged = |index| BlobError::DamagedChunk {
            path: path.display().to_string(),
            index,
        };
        let md = std::fs::metadata(&path).map_err(io("cannot stat", &path))?;
        if md.len() != m.size {
            // The first chunk the file's length cuts or adds to.
            let index = (md.len().min(m.size) / u64::from(m.chunk_size.max(1))) as u32;
            return Err(damaged(index.min(m.chunks.len().saturating_sub(1) as u32)));
        }
        let stamp = Stamp::of(&md);
        for i in 0..m.chunks.len() as u32 {
            if self.vouched.holds(id, &stamp, i) {
                continue;
            }
            self.read_verified_chunk(id, i)?;
        }
        Ok(())
    }

    /// Check every held chunk of a blob; returns the damaged ones.
    pub fn scrub(&self, id: &BlobId) -> Result<Vec<u32>, BlobError> {
        let m = self
            .manifest(id)?
            .ok_or_else(|| BlobError::NotHeld(hex_id(id)))?;
        let mut bad = Vec::new();
        for i in 0..m.chunks.len() as u32 {
            match self.read_chunk(id, i) {
                Ok(d) if sha256(&d) == m.chunks[i as usize] => {}
                Ok(_) | Err(BlobError::Io { .. }) => bad.push(i),
                Err(BlobError::NotHeld(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // Bytes past the manifest's size: every chunk may match and the
        // object still be wrong. The last chunk is fetched again, and
        // `demote` cuts the file to its size.
        let longer = self.is_complete(id)?
            && std::fs::metadata(self.object_path(id)).is_ok_and(|md| md.len() > m.size);
        if longer {
            if let Some(last) = (m.chunks.len() as u32).checked_sub(1) {
                if !bad.contains(&last) {
                    bad.push(last);
                }
            }
        }
        Ok(bad)
    }

    /// Forget damaged chunks: a complete blob becomes a partial one holding
    /// every other chunk, to be fetched again (repaired).
    pub fn demote(&self, id: &BlobId, bad: &[u32]) -> Result<(), BlobError> {
        self.vouched.forget(id);
        let Some(mut meta) = self.meta(id)? else {
            return Err(BlobError::NotHeld(hex_id(id)));
        };
        let m = self
            .manifest(id)?
            .ok_or_else(|| BlobError::NotHeld(hex_id(id)))?;
        let mut have = if meta.complete {
            let obj = self.object_path(id);
            let part = self.partial_path(id);
            if let Ok(md) = std::fs::metadata(&obj) {
                let mut perm = md.permissions();
                std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
                let _ = std::fs::set_permissions(&obj, perm);
            }
            std::fs::rename(&obj, &part).map_err(io("cannot move for repair", &obj))?;
            // A file longer than the blob: the excess goes.
            if std::fs::metadata(&part).is_ok_and(|md| md.len() > m.size) {
                OpenOptions::new()
                    .write(true)
                    .open(&part)
                    .and_then(|f| f.set_len(m.size))
                    .map_err(io("cannot cut to size", &part))?;
            }
            Bitmap::full(m.chunks.len())
        } else {
            self.have(id)?
                .unwrap_or_else(|| Bitmap::new(m.chunks.len()))
        };
        for i in bad {
            if *i < have.len {
                have.bits[(*i / 8) as usize] &= !(1 << (*i % 8));
            }
        }
        meta.complete = false;
        self.have.insert(id, enc(&have)?)?;
        self.meta.insert(id, enc(&meta)?)?;
        self.durable.commit(What::Blob)?;
        Ok(())
    }

    /// Remove a blob (object or partial) and its records.
    pub fn remove(&self, id: &BlobId) -> Result<(), BlobError> {
        self.vouched.forget(id);
        for p in [self.object_path(id), self.partial_path(id)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(BlobError::Io {
                        what: "cannot remove",
                        path: p.display().to_string(),
                        source: e,
                    })
                }
            }
        }
        self.forget_manifest(id);
        self.meta.remove(id)?;
        self.manifests.remove(id)?;
        self.have.remove(id)?;
        self.durable.commit(What::Blob)?;
        Ok(())
    }

    pub fn set_released(&self, id: &BlobId, released_ms: u64) -> Result<(), BlobError> {
        if let Some(mut m) = self.meta(id)? {
            if m.released_ms != released_ms {
                m.released_ms = released_ms;
                self.meta.insert(id, enc(&m)?)?;
            }
        }
        Ok(())
    }

    /// Bytes the store holds on disk (complete and partial blobs at full size).
    pub fn used_bytes(&self) -> Result<u64, BlobError> {
        Ok(self.list()?.iter().map(|(_, m)| m.size).sum())
    }

    pub fn name(&self, name: &str) -> Result<Option<NameRecord>, BlobError> {
        self.names
            .get(name.as_bytes())?
            .map(|v| decode_rec("blob_names", name.as_bytes(), &v))
            .transpose()
    }

    /// Point `name` at a blob if `rec` is newer than what it points at
    /// (event time, then event hash). Returns the record it replaced, or
    /// None if nothing changed.
    pub fn set_name(
        &self,
        name: &str,
        rec: &NameRecord,
    ) -> Result<Option<Option<NameRecord>>, BlobError> {
        let old = self.name(name)?;
        if let Some(o) = &old {
            if (o.ts_ms, o.event_hash) >= (rec.ts_ms, rec.event_hash) {
                return Ok(None);
            }
        }
        self.names.insert(name.as_bytes(), enc(rec)?)?;
        self.durable.commit(What::Blob)?;
        Ok(Some(old))
    }

    pub fn names(&self) -> Result<Vec<(String, NameRecord)>, BlobError> {
        let mut out = Vec::new();
        for kv in self.names.iter() {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k).into_owned();
            out.push((name, decode_rec("blob_names", &k, &v)?));
        }
        Ok(out)
    }

    /// Record that the arrival of `blob` under `name` was announced; false
    /// if it already was. Kept in the placement tree under a key no path
    /// can have (paths are absolute).
    pub fn announce(&self, name: &str, blob: &BlobId) -> Result<bool, BlobError> {
        let key = [b"\0announced/".as_slice(), name.as_bytes()].concat();
        if self.placed.get(&key)?.as_deref() == Some(&blob[..]) {
            return Ok(false);
        }
        self.placed.insert(key, &blob[..])?;
        self.durable.commit(What::Blob)?;
        Ok(true)
    }

    pub fn placed(&self, path: &Path) -> Result<Option<BlobId>, BlobError> {
        Ok(self
            .placed
            .get(path.as_os_str().as_encoded_bytes())?
            .and_then(|v| <BlobId>::try_from(&v[..]).ok()))
    }

    /// Copy a complete blob to `dst` atomically: a temporary file in the
    /// same directory, fsync, rename, fsync of the directory.
    /// The object is verified first ([`Self::verify_object`]): a damaged
    /// copy is never placed.
    pub fn place(&self, id: &BlobId, dst: &Path) -> Result<(), BlobError> {
        self.verify_object(id)?;
        let src = self.object_path(id);
        let dir = dst
            .parent()
            .ok_or_else(|| BlobError::Invalid(format!("{} has no directory", dst.display())))?;
        std::fs::create_dir_all(dir).map_err(io("cannot create directory", dir))?;
        let fname = dst
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{fname}.riftmesh-{}", uuid::Uuid::now_v7()));
        let res = (|| {
            copy_direct(&src, &tmp).map_err(io("cannot copy to", &tmp))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io("cannot sync", &tmp))?;
            // The store's copy is read-only; the placed one belongs to its user.
            let mut perm = std::fs::metadata(&tmp)
                .map_err(io("cannot stat", &tmp))?
                .permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
            let _ = std::fs::set_permissions(&tmp, perm);
            std::fs::rename(&tmp, dst).map_err(io("cannot rename to", dst))
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res?;
        sync_dir(dst);
        self.placed
            .insert(dst.as_os_str().as_encoded_bytes(), id.to_vec())?;
        Ok(())
    }

    /// Copy a complete blob to any path (for `blob get --out`).
    pub fn open_object(&self, id: &BlobId) -> Result<File, BlobError> {
        if !self.is_complete(id)? {
            return Err(BlobError::NotHeld(hex_id(id)));
        }
        let p = self.object_path(id);
        File::open(&p).map_err(io("cannot open", &p))
    }
}

fn set_readonly(p: &Path) {
    if let Ok(md) = std::fs::metadata(p) {
        let mut perm = md.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o444);
        let _ = std::fs::set_permissions(p, perm);
    }
}

fn set_writable(p: &Path) {
    if let Ok(md) = std::fs::metadata(p) {
        let mut perm = md.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
        let _ = std::fs::set_permissions(p, perm);
    }
}

fn sync_dir(p: &Path) {
    if let Some(d) = p.parent() {
        if let Ok(f) = File::open(d) {
            let _ = f.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Durable, BlobStore) {
        let d = tempfile::tempdir().unwrap();
        let sled = sled::Config::new()
            .path(d.path().join("db"))
            .open()
            .unwrap();
        let db = Durable::open(
            sled,
            &d.path().join("db"),
            std::time::Duration::from_secs(10),
            0,
        )
        .unwrap();
        let s = BlobStore::open(&d.path().join("blobs"), &db).unwrap();
        (d, db, s)
    }

    #[test]
    fn chunk_size_grows_to_fit() {
        assert_eq!(chunk_size_for(10, 1 << 20), 1 << 20);
        assert_eq!(chunk_size_for(64 << 30, 1 << 20), 1 << 20);
        assert_eq!(chunk_size_for(65 << 30, 1 << 20), 2 << 20);
        assert_eq!(chunk_size_for(10, 1), MIN_CHUNK);
    }

    #[test]
    fn add_hashes_copies_and_dedups() {
        let (d, _db, s) = store();
        let src = d.path().join("f.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let a = s.add_file(&src, MIN_CHUNK).unwrap();
        assert!(!a.existing);
        assert_eq!(a.id, sha256(&data));
        assert_eq!(a.manifest.chunks.len(), 4);
        assert_eq!(a.manifest.chunks[3], sha256(&data[3 * 65536..]));
        a.manifest.check().unwrap();
        // The producer rewrites its file: the store's copy is untouched.
        std::fs::write(&src, b"other").unwrap();
        assert_eq!(std::fs::read(s.object_path(&a.id)).unwrap(), data);
        std::fs::write(&src, &data).unwrap();
        let b = s.add_file(&src, MIN_CHUNK).unwrap();
        assert!(b.existing);
        assert_eq!(s.read_chunk(&a.id, 1).unwrap(), &data[65536..131072]);
        assert!(s.read_chunk(&a.id, 4).is_err());
    }

    #[test]
    fn partial_resumes_from_durable_chunks_and_verifies_the_whole() {
        let (d, db, s) = store();
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        let (id, m) = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, None).unwrap();
        let mut have = s.begin_partial(&id, &m).unwrap();
        assert_eq!(have.count(), 0);
        s.write_chunk(&id, m.offset(0), &data[..65536]).unwrap();
        have.set(0);
        s.checkpoint(&id, &have).unwrap();
        s.write_chunk(&id, m.offset(2), &data[131072..]).unwrap();
        drop(s);
        // Restart: only the checkpointed chunk counts.
        let s = BlobStore::open(&d.path().join("blobs"), &db).unwrap();
        let mut have = s.begin_partial(&id, &m).unwrap();
        assert!(have.get(0) && !have.get(2));
        assert_eq!(s.read_chunk(&id, 0).unwrap(), &data[..65536]);
        assert!(matches!(s.read_chunk(&id, 2), Err(BlobError::NotHeld(_))));
        for i in 1..3u32 {
            let a = m.offset(i) as usize;
            let b = a + m.chunk_len(i) as usize;
            s.write_chunk(&id, m.offset(i), &data[a..b]).unwrap();
            have.set(i);
        }
        s.checkpoint(&id, &have).unwrap();
        assert!(s.finish_partial(&id, &m, hash_file).unwrap());
        assert!(s.is_complete(&id).unwrap());
        assert_eq!(std::fs::read(s.object_path(&id)).unwrap(), data);
        let out = d.path().join("placed/x.bin");
        s.place(&id, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        assert_eq!(s.placed(&out).unwrap(), Some(id));
    }

    #[test]
    fn damage_is_found_never_served_and_demotes_to_partial() {
        let (d, _db, s) = store();
        let src = d.path().join("f.bin");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let a = s.add_file(&src, MIN_CHUNK).unwrap();
        let hashed = |i| {
            s.read_verified_chunk_after(&a.id, i, |len| (vec![0; len], 0))
                .map(|r| r.2)
        };
        // The add hashed what it stored: serving needs no second hash...
        assert!(!hashed(2).unwrap() && !hashed(1).unwrap());
        let obj = s.object_path(&a.id);
        let mut perm = std::fs::metadata(&obj).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
        std::fs::set_permissions(&obj, perm).unwrap();
        let f = OpenOptions::new().write(true).open(&obj).unwrap();
        f.write_all_at(&[0xff; 10], 65_536 * 2 + 5).unwrap();
        // ...until the file changes: then every chunk is hashed again.
        assert!(hashed(1).unwrap());
        assert!(matches!(
            s.read_verified_chunk(&a.id, 2),
            Err(BlobError::DamagedChunk { index: 2, .. })
        ));
        assert_eq!(s.scrub(&a.id).unwrap(), vec![2]);
        s.demote(&a.id, &[2]).unwrap();
        assert!(!s.is_complete(&a.id).unwrap());
        let have = s.have(&a.id).unwrap().unwrap();
        assert!(have.get(1) && !have.get(2) && have.count() == a.manifest.chunks.len() - 1);
        assert!(s.partial_path(&a.id).exists() && !obj.exists());
        // Repaired: the good bytes written back, the whole checks out again.
        s.write_chunk(&a.id, 65_536 * 2, &data[65_536 * 2..65_536 * 3])
            .unwrap();
        assert!(s.finish_partial(&a.id, &a.manifest, hash_file).unwrap());
        assert_eq!(std::fs::read(&obj).unwrap(), data);
        assert!(!hashed(2).unwrap(), "a verified finish vouches again");
    }

    #[test]
    fn a_damaged_or_truncated_object_is_never_placed_and_re_adding_repairs_it() {
        let (d, _db, s) = store();
        let src = d.path().join("f.bin");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let a = s.add_file(&src, MIN_CHUNK).unwrap();
        let obj = s.object_path(&a.id);
        let out = d.path().join("placed/m.bin");
        let rot = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = std::fs::read(&obj).unwrap();
            f(&mut b);
            let mut perm = std::fs::metadata(&obj).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
            std::fs::set_permissions(&obj, perm).unwrap();
            std::fs::write(&obj, &b).unwrap();
        };
        // A flipped byte in the last chunk; then a truncation.
        rot(&|b| b[299_000] ^= 0xff);
        assert!(matches!(
            s.place(&a.id, &out),
            Err(BlobError::DamagedChunk { .. })
        ));
        assert!(!out.exists());
        // Adding the original again replaces the damaged object.
        let again = s.add_file(&src, MIN_CHUNK).unwrap();
        assert!(again.existing);
        assert_eq!(std::fs::read(&obj).unwrap(), data);
        s.place(&a.id, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        // Bytes appended: found by scrub too (it cuts and refetches the last chunk).
        rot(&|b| b.extend_from_slice(b"tail"));
        assert!(matches!(
            s.place(&a.id, &out),
            Err(BlobError::DamagedChunk { .. })
        ));
        let bad = s.scrub(&a.id).unwrap();
        assert_eq!(bad, vec![a.manifest.chunks.len() as u32 - 1]);
        s.demote(&a.id, &bad).unwrap();
        assert_eq!(
            std::fs::metadata(s.partial_path(&a.id)).unwrap().len(),
            data.len() as u64
        );
        let again = s.add_file(&src, MIN_CHUNK).unwrap();
        assert!(!again.existing, "a demoted copy is not complete");
        rot(&|b| b.truncate(100_000));
        let out2 = d.path().join("placed/m2.bin");
        assert!(matches!(
            s.place(&a.id, &out2),
            Err(BlobError::DamagedChunk { .. })
        ));
        assert!(!out2.exists());
    }

    #[test]
    fn an_interrupted_finish_is_checked_again_and_recorded() {
        let (d, db, s) = store();
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 241) as u8).collect();
        let (id, m) = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, None).unwrap();
        s.begin_partial(&id, &m).unwrap();
        s.write_chunk(&id, 0, &data).unwrap();
        s.checkpoint(&id, &Bitmap::full(m.chunks.len())).unwrap();
        // The crash: moved into place, never recorded complete.
        set_readonly(&s.partial_path(&id));
        std::fs::rename(s.partial_path(&id), s.object_path(&id)).unwrap();
        drop(s);
        let s = BlobStore::open(&d.path().join("blobs"), &db).unwrap();
        assert!(!s.is_complete(&id).unwrap());
        let have = s.begin_partial(&id, &m).unwrap();
        assert!(have.is_full(), "the moved file holds every chunk");
        assert!(s.finish_partial(&id, &m, hash_file).unwrap());
        assert!(s.is_complete(&id).unwrap());
        assert_eq!(std::fs::read(s.object_path(&id)).unwrap(), data);
    }

    #[test]
    fn a_recorded_bitmap_without_its_file_counts_nothing() {
        let (d, db, s) = store();
        let data = vec![9u8; 150_000];
        let (id, m) = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, None).unwrap();
        let mut have = s.begin_partial(&id, &m).unwrap();
        s.write_chunk(&id, 0, &data[..65536]).unwrap();
        have.set(0);
        s.checkpoint(&id, &have).unwrap();
        std::fs::remove_file(s.partial_path(&id)).unwrap();
        drop(s);
        let s = BlobStore::open(&d.path().join("blobs"), &db).unwrap();
        assert_eq!(s.begin_partial(&id, &m).unwrap().count(), 0);
    }

    /// A failed write of the store's copy is told apart from a failed read
    /// of the source (add_reader names the file that failed by it).
    #[test]
    fn a_failed_copy_is_not_reported_as_a_failed_read() {
        let data = vec![7u8; 200_000];
        let mut full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let e = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, Some(&mut full)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
        assert!(e.get_ref().is_some_and(|i| i.is::<OutputFailed>()), "{e:?}");
        let (d, _db, s) = store();
        let src = d.path().join("model.bin");
        // A source that fails to read (a directory) is named as the source.
        let dir = File::open(d.path()).unwrap();
        match s.add_reader(dir, 10, &src, MIN_CHUNK) {
            Err(BlobError::Io { what, path, .. }) => {
                assert_eq!((what, path), ("cannot read", src.display().to_string()))
            }
            other => panic!("{:?}", other.map(|a| a.id)),
        }
    }

    #[test]
    fn arrival_is_announced_once_per_name_and_blob() {
        let (_d, _db, s) = store();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert!(s.announce("games/x/1", &a).unwrap());
        assert!(!s.announce("games/x/1", &a).unwrap());
        assert!(s.announce("games/x/2", &a).unwrap());
        assert!(s.announce("games/x/1", &b).unwrap());
    }

    /// The filesystems of the build directory and the temp directory
    /// (O_DIRECT where they have it) and tmpfs where there is one (no
    /// O_DIRECT: the buffered fallback).
    fn direct_and_buffered_dirs() -> Vec<tempfile::TempDir> {
        let in_target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let _ = std::fs::create_dir_all(&in_target);
        let mut dirs = vec![
            tempfile::tempdir_in(&in_target).unwrap(),
            tempfile::tempdir().unwrap(),
        ];
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(shm);
        }
        dirs
    }

    /// A placement copy at the reader's buffer boundaries, between each
    /// pair of those filesystems: same bytes, and a new file only.
    #[test]
    fn a_direct_copy_gives_the_same_bytes_on_any_filesystem() {
        let dirs = direct_and_buffered_dirs();
        for len in [
            0usize,
            1,
            4096,
            4 << 20,
            (4 << 20) + 1,
            (8 << 20) + 4096 + 7,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 17 % 251) as u8).collect();
            for from in &dirs {
                let src = from.path().join(format!("src-{len}"));
                std::fs::write(&src, &data).unwrap();
                for to in &dirs {
                    let dst = to.path().join(format!("dst-{len}"));
                    let _ = std::fs::remove_file(&dst);
                    copy_direct(&src, &dst).unwrap();
                    assert!(std::fs::read(&dst).unwrap() == data, "{len} bytes");
                    assert!(copy_direct(&src, &dst).is_err(), "an existing file is kept");
                }
            }
        }
    }

    /// The whole-file hash at the reader's buffer boundaries, on each of
    /// those filesystems.
    #[test]
    fn whole_file_hash_at_buffer_boundaries() {
        for dir in direct_and_buffered_dirs() {
            for len in [0usize, 1, 4095, 4 << 20, (4 << 20) + 1, (8 << 20) + 4096] {
                let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
                let p = dir.path().join("f");
                std::fs::write(&p, &data).unwrap();
                assert_eq!(hash_file(&p).unwrap(), sha256(&data), "{len} bytes");
            }
        }
    }

    #[test]
    fn a_wrong_whole_is_discarded() {
        let (_d, _db, s) = store();
        let data = vec![5u8; 70_000];
        let (id, m) = hash_stream(&data[..], data.len() as u64, MIN_CHUNK, None).unwrap();
        s.begin_partial(&id, &m).unwrap();
        s.write_chunk(&id, 0, &vec![6u8; 70_000]).unwrap();
        assert!(!s.finish_partial(&id, &m, hash_file).unwrap());
        assert!(!s.is_complete(&id).unwrap());
        assert!(s.have(&id).unwrap().is_none());
    }

    #[test]
    fn names_keep_the_newest_event() {
        let (_d, _db, s) = store();
        let rec = |ts, b: u8| NameRecord {
            blob: [b; 32],
            size: 1,
            root: [0; 32],
            ts_ms: ts,
            event_hash: [b; 32],
            event_id: String::new(),
            event_type: "BLOB_PUBLISHED".into(),
            origin: String::new(),
        };
        assert_eq!(s.set_name("models/a", &rec(10, 1)).unwrap(), Some(None));
        assert_eq!(s.set_name("models/a", &rec(5, 2)).unwrap(), None);
        assert_eq!(
            s.set_name("models/a", &rec(20, 3)).unwrap(),
            Some(Some(rec(10, 1)))
        );
        assert_eq!(s.name("models/a").unwrap().unwrap().blob, [3; 32]);
    }

    #[test]
    fn bitmaps() {
        let mut b = Bitmap::new(10);
        b.set(0);
        b.set(9);
        b.set(10);
        assert!(b.get(0) && b.get(9) && !b.get(5) && !b.get(10));
        assert_eq!(b.count(), 2);
        assert!(Bitmap::full(10).is_full());
        assert!(b.fits(10) && !b.fits(11));
    }
}
