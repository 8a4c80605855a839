//! Names (from the newest event naming each), arrival announcements, and
//! placing a complete blob at a path.

use super::*;

/// What a retraction covers: the namings at or before `(at_ms,
/// naming_hash)` in naming order (event time, then event hash), that is
/// the binding it retracts and every older naming. A retraction that names
/// no naming covers every naming of time `at_ms` (hash all ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retraction {
    pub at_ms: u64,
    pub naming_hash: [u8; 32],
}

impl Retraction {
    /// Up to `at_ms` inclusive, whatever the hash.
    pub fn up_to(at_ms: u64) -> Self {
        Self {
            at_ms,
            naming_hash: [0xff; 32],
        }
    }

    fn key(&self) -> (u64, [u8; 32]) {
        (self.at_ms, self.naming_hash)
    }

    pub fn covers(&self, rec: &NameRecord) -> bool {
        (rec.ts_ms, rec.event_hash) <= self.key()
    }

    /// 8 bytes of time, then the hash; 8 bytes alone (as stored before
    /// the hash was kept) read as [`Self::up_to`].
    fn encode(&self) -> Vec<u8> {
        [&self.at_ms.to_be_bytes()[..], &self.naming_hash[..]].concat()
    }

    fn decode(v: &[u8]) -> Option<Self> {
        let at_ms = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
        match v.len() {
            8 => Some(Self::up_to(at_ms)),
            40 => Some(Self {
                at_ms,
                naming_hash: v[8..].try_into().ok()?,
            }),
            _ => None,
        }
    }
}

impl BlobStore {
    pub fn name(&self, name: &str) -> Result<Option<NameRecord>, BlobError> {
        self.names
            .get(name.as_bytes())?
            .map(|v| decode_rec("blob_names", name.as_bytes(), &v))
            .transpose()
    }

    /// Point `name` at a blob if `rec` is newer than what it points at
    /// (event time, then event hash) and is not covered by the name's last
    /// retraction ([`Self::forget`]: a covered naming stays retracted, in
    /// whatever order the two arrive). Returns the record it replaced, or
    /// None if nothing changed.
    pub fn set_name(
        &self,
        name: &str,
        rec: &NameRecord,
    ) -> Result<Option<Option<NameRecord>>, BlobError> {
        if self.forgotten(name)?.is_some_and(|r| r.covers(rec)) {
            return Ok(None);
        }
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

    /// The name's last retraction, if it was ever forgotten (and the
    /// retraction is not yet pruned, [`Self::prune_forgotten`]).
    pub fn forgotten(&self, name: &str) -> Result<Option<Retraction>, BlobError> {
        Ok(self
            .forgotten
            .get(name.as_bytes())?
            .and_then(|v| Retraction::decode(&v)))
    }

    /// Retract the namings of `name` that `r` covers: the retraction is
    /// kept (the latest one, in naming order), so that such a naming
    /// arriving later binds nothing, and the name's binding is removed if
    /// it is one of them. Returns the binding removed, if any.
    pub fn forget(&self, name: &str, r: Retraction) -> Result<Option<NameRecord>, BlobError> {
        let before = self.forgotten(name)?;
        if before.is_none_or(|b| b.key() < r.key()) {
            self.forgotten.insert(name.as_bytes(), r.encode())?;
        }
        let removed = match self.name(name)? {
            Some(rec) if r.covers(&rec) => {
                self.names.remove(name.as_bytes())?;
                Some(rec)
            }
            _ => None,
        };
        self.durable.commit(What::Blob)?;
        Ok(removed)
    }

    /// Drop the retractions up to `before_ms` (a naming they cover can no
    /// longer arrive). Returns how many were dropped.
    pub fn prune_forgotten(&self, before_ms: u64) -> Result<usize, BlobError> {
        let mut n = 0;
        for (name, r) in self.forgotten_names()? {
            if r.at_ms < before_ms {
                self.forgotten.remove(name.as_bytes())?;
                n += 1;
            }
        }
        if n > 0 {
            self.durable.commit(What::Blob)?;
        }
        Ok(n)
    }

    /// Every retraction kept: (name, retraction).
    pub fn forgotten_names(&self) -> Result<Vec<(String, Retraction)>, BlobError> {
        let mut out = Vec::new();
        for kv in self.forgotten.iter() {
            let (k, v) = kv?;
            if let Some(r) = Retraction::decode(&v) {
                out.push((String::from_utf8_lossy(&k).into_owned(), r));
            }
        }
        Ok(out)
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
}
