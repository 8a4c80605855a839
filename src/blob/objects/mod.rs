//! The blob object store: content-addressed files under `<data>/blobs/`, their
//! manifests and chunk bitmaps in sled. Everything here blocks (file I/O,
//! hashing): call it from `spawn_blocking`.
//!
//! Layout (proto-notes/sync.md):
//! - `objects/<hex id>`: complete blobs, verified, read-only.
//! - `partial/<hex id>`: blobs being fetched, full length, holes unfilled.
//! - `tmp/`: files being added.
//! - sled trees `blob_meta` (id → [`BlobMeta`]), `blob_manifest` (id →
//!   [`Manifest`]), `blob_have` (id → bitmap of durable verified chunks of a
//!   partial blob), `blob_names` (name → [`NameRecord`]), `blob_forgotten`
//!   (name → time up to which its namings are retracted), `blob_placed`
//!   (path → id last placed there).
//!
//! By concept: `manifest` (ids, manifests, bitmaps), `direct` (I/O past
//! the page cache and hashing passes), `partial` (fetches in progress),
//! `read` (chunks read back and checked), `names` (names and placement),
//! `vouch` (chunks already verified), `error`.

mod direct;
mod error;
pub mod manifest;
mod names;
mod partial;
mod read;
#[cfg(test)]
mod tests;
mod vouch;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::durable::{Durable, What};
use crate::util::{lock, now_ms};
use direct::*;
use vouch::{Stamp, Vouched};

pub use direct::{hash_file, hash_range, hash_stream};
pub(crate) use error::io;
pub use error::BlobError;
pub use manifest::*;
pub use names::Retraction;

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
    /// Retractions: name → the time (ms) up to which its namings are
    /// forgotten (`BLOB_FORGOTTEN`, proto-notes/sync.md).
    forgotten: sled::Tree,
    placed: sled::Tree,
    /// Every record above is made durable through it (durable.rs).
    durable: Durable,
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
            forgotten: db.open_tree("blob_forgotten")?,
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
            let mut c = lock(&self.cache);
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
        let mut c = lock(&self.cache);
        c.insert(0, (*id, m.clone()));
        c.truncate(MANIFEST_CACHE);
        Ok(Some(m))
    }

    fn forget_manifest(&self, id: &BlobId) {
        lock(&self.cache).retain(|(i, _)| i != id);
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
