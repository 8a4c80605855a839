//! Reading chunks back: plain, and verified against the manifest (or
//! vouched for, vouch.rs) before they are served; whole-object checks and
//! scrubbing.

use super::*;

impl BlobStore {
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
}
