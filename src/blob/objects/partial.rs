//! Partial blobs: a fetch in progress, its file of full length with holes,
//! the bitmap of chunks durable and verified, the finish that checks the
//! whole and makes the object complete, and the demotion of a damaged
//! complete blob back to partial.

use super::*;

impl BlobStore {
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
}
