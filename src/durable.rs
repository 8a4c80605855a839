//! The one durability rule of the agent's sled database, and its only owner.
//!
//! Everything that claims durability — the event log (`store.rs`), Raft's
//! vote and log and the lock snapshot (`leader/store.rs`), blob metadata
//! (`blob/store.rs`) — writes sled and then calls [`Durable::commit`] before
//! it answers or acts. A commit is: sled's `flush` (which on Linux ends in
//! `sync_file_range`: data written, but neither the file's metadata nor the
//! disk's write cache made stable), then `fdatasync` of sled's data file, then
//! `fdatasync` of any new file under sled's `blobs/` directory and of that
//! directory. Only when all three succeeded is the commit counted
//! (`riftmesh_store_syncs_total{what}`) and reported done.
//!
//! Disk space, two lines of defence:
//! - The event store keeps `min_free` bytes free ([`Durable::room`]): below
//!   it, appends are refused before sled ever meets ENOSPC, reads all work,
//!   and writes are accepted again as soon as space is back. Raft and blob
//!   records still write into that headroom.
//! - A commit (or sled write) that fails anyway makes the store read-only
//!   for good in this process: sled latches the first I/O error (every later
//!   write, and reads that touch the disk, fail the same way, also after
//!   space was freed). A commit that does not finish within the commit
//!   timeout counts as failed too (sled parks its flush forever after some
//!   failed writes). [`Durable::should_exit`] tells the agent when to exit so
//!   that its service manager restarts it: once the filesystem has room.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::{label, Labels};
use crate::util::lock;

/// Free bytes the data directory's filesystem needs before a read-only agent
/// exits to be restarted: more than one sled segment (512 KiB) and its blob
/// pages, so the restarted agent can write again.
pub const RESUME_FREE_BYTES: u64 = 4 << 20;

/// Who asked for a commit (the label of the sync counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum What {
    Events,
    Raft,
    Blob,
}

impl What {
    pub fn as_str(self) -> &'static str {
        match self {
            What::Events => "events",
            What::Raft => "raft",
            What::Blob => "blob",
        }
    }
}

/// A write that is not (or may not be) durable: the store is read-only.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the store at {path} is read-only: {reason}")]
pub struct DurableError {
    pub path: PathBuf,
    pub reason: String,
}

/// Why and since when the store refuses writes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReadOnly {
    pub reason: String,
    pub since_ms: u64,
}

/// Shared handle (cheap clone) on the durability rule of one sled database.
#[derive(Clone)]
pub struct Durable {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    dir: PathBuf,
    data_file: File,
    synced_large_values: Mutex<HashSet<OsString>>,
    syncs: Family<Labels, Counter>,
    /// Latched: a failed or stuck commit; only a restart clears it.
    read_only: Mutex<Option<ReadOnly>>,
    /// Since when free space is below `min_free` (0: it is not).
    low_since: AtomicU64,
    min_free: u64,
    in_flight: Mutex<HashMap<u64, (Instant, What)>>,
    next_id: AtomicU64,
    timeout: Duration,
}

/// Removes its commit from the in-flight set when the commit returns.
struct InFlight<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(&self.inner.in_flight).remove(&self.id);
    }
}

impl Durable {
    /// `dir` is sled's directory (its data file is `dir/db`); `timeout` bounds
    /// a commit before the store counts it as stuck.
    pub fn open(
        db: sled::Db,
        dir: &Path,
        timeout: Duration,
        min_free: u64,
    ) -> std::io::Result<Durable> {
        let data_file = File::open(dir.join("db"))?;
        Ok(Durable {
            inner: Arc::new(Inner {
                db,
                dir: dir.to_path_buf(),
                data_file,
                synced_large_values: Mutex::new(HashSet::new()),
                syncs: Family::default(),
                read_only: Mutex::new(None),
                low_since: AtomicU64::new(0),
                min_free,
                in_flight: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                timeout,
            }),
        })
    }

    /// The counter family `store_syncs` (register it once in the registry).
    pub fn syncs_family(&self) -> Family<Labels, Counter> {
        self.inner.syncs.clone()
    }

    /// Completed commits of `what` so far.
    pub fn syncs(&self, what: What) -> u64 {
        self.inner
            .syncs
            .get_or_create(&label("what", what.as_str()))
            .get()
    }

    /// The bound on one commit.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// The database whose writes this handle makes durable.
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// Refuse at once when the store is read-only for good (latched).
    pub fn writable(&self) -> Result<(), DurableError> {
        match &*lock(&self.inner.read_only) {
            None => Ok(()),
            Some(r) => Err(self.error(&r.reason)),
        }
    }

    /// [`Durable::writable`], and room for the event store: refused while
    /// the filesystem has less than `min_free` bytes free.
    pub fn room(&self) -> Result<(), DurableError> {
        self.writable()?;
        match self.low_space() {
            None => Ok(()),
            Some(r) => Err(self.error(&r.reason)),
        }
    }

    /// Why the store refuses writes, if it does: latched, or low on space.
    pub fn read_only(&self) -> Option<ReadOnly> {
        lock(&self.inner.read_only)
            .clone()
            .or_else(|| self.low_space())
    }

    /// Free space below `min_free`, checked now (one fstatvfs).
    fn low_space(&self) -> Option<ReadOnly> {
        let min = self.inner.min_free;
        let free = match fs_free(&self.inner.data_file) {
            Ok(f) if min > 0 && f < min => f,
            // Room (or unknown: sled's own errors still count).
            _ => {
                self.inner.low_since.store(0, Ordering::Relaxed);
                return None;
            }
        };
        let now = crate::util::now_ms();
        let since = match self.inner.low_since.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                tracing::warn!(path = %self.inner.dir.display(), free, min_free = min, "the store's filesystem is almost full: publishes are refused until space is freed");
                now
            }
            Err(t) => t,
        };
        Some(ReadOnly {
            reason: format!(
                "{free} bytes free on its filesystem, below store_min_free ({min}): writes are refused until space is freed, then resume by themselves; reads work"
            ),
            since_ms: since,
        })
    }

    fn error(&self, reason: &str) -> DurableError {
        DurableError {
            path: self.inner.dir.clone(),
            reason: reason.to_string(),
        }
    }

    /// Make every write to the database so far durable: sled flush, then
    /// fdatasync of its files. Blocks; counted only when it succeeded.
    pub fn commit(&self, what: What) -> Result<(), DurableError> {
        self.writable()?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.in_flight).insert(id, (Instant::now(), what));
        let guard = InFlight {
            inner: &self.inner,
            id,
        };
        let res = self.sync_files();
        drop(guard);
        match res {
            Ok(()) => {
                // A commit that outlived the timeout was already reported stuck.
                self.writable()?;
                self.inner
                    .syncs
                    .get_or_create(&label("what", what.as_str()))
                    .inc();
                Ok(())
            }
            Err(e) => Err(self.fail(format!("a {} commit failed: {e}", what.as_str()))),
        }
    }

    /// [`Durable::commit`] off the async runtime.
    pub async fn commit_async(&self, what: What) -> Result<(), DurableError> {
        let d = self.clone();
        match tokio::task::spawn_blocking(move || d.commit(what)).await {
            Ok(r) => r,
            Err(e) => Err(self.fail(format!("the {} commit task failed: {e}", what.as_str()))),
        }
    }

    fn sync_files(&self) -> std::io::Result<()> {
        self.inner.db.flush().map_err(std::io::Error::other)?;
        self.inner.data_file.sync_data()?;
        self.sync_large_values()
    }

    /// sled writes large values to files under `blobs/` without fsync; sync
    /// the ones not synced yet, and the directory.
    fn sync_large_values(&self) -> std::io::Result<()> {
        let dir = self.inner.dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut synced = lock(&self.inner.synced_large_values);
        let mut present = HashSet::new();
        let mut new = false;
        for e in entries {
            let name = e?.file_name();
            if !synced.contains(&name) {
                match File::open(dir.join(&name)) {
                    Ok(f) => f.sync_data()?,
                    // Collected by sled between listing and opening.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            File::open(&dir)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }

    /// A write to sled itself failed (before any commit): an I/O error is
    /// latched by sled, so the store becomes read-only.
    pub fn write_failed(&self, e: &sled::Error) {
        if matches!(e, sled::Error::Io(_)) {
            self.fail(format!("a write failed: {e}"));
        }
    }

    /// Enter the read-only state (the first reason is kept).
    fn fail(&self, cause: String) -> DurableError {
        let reason = format!("{cause}. The storage engine keeps this error: writes are refused, and reads may fail, until the agent restarts; it exits by itself (status 75) once the disk has room");
        let mut ro = lock(&self.inner.read_only);
        match &*ro {
            Some(r) => self.error(&r.reason),
            None => {
                tracing::error!(path = %self.inner.dir.display(), %reason, "the store is read-only from now on");
                *ro = Some(ReadOnly {
                    reason: reason.clone(),
                    since_ms: crate::util::now_ms(),
                });
                self.error(&reason)
            }
        }
    }

    /// The longest-running commit, if one outlived the timeout.
    pub fn stuck(&self) -> Option<(Duration, What)> {
        lock(&self.inner.in_flight)
            .values()
            .map(|(t, w)| (t.elapsed(), *w))
            .max_by_key(|(d, _)| *d)
            .filter(|(d, _)| *d >= self.inner.timeout)
    }

    /// Called periodically by the agent. Marks a stuck commit as a failure;
    /// returns the message to exit with when the store is read-only for good
    /// and the filesystem has room again (sled cannot resume in this
    /// process).
    pub fn should_exit(&self) -> Option<String> {
        if let Some((d, what)) = self.stuck() {
            self.fail(format!(
                "a {} commit has not finished after {:.1} s: the storage engine is stuck (sled parks its flush for good after some failed writes, e.g. on a full disk)",
                what.as_str(),
                d.as_secs_f64()
            ));
        }
        let ro = lock(&self.inner.read_only).clone()?;
        let free = fs_free(&self.inner.data_file).ok()?;
        (free >= RESUME_FREE_BYTES.max(self.inner.min_free)).then(|| {
            format!(
                "the store at {} is read-only since {} ms ({}); the filesystem has {free} bytes free again, but the storage engine cannot write again in this process: exiting so that the service manager restarts the agent and writes resume",
                self.inner.dir.display(),
                ro.since_ms,
                ro.reason
            )
        })
    }
}

impl Durable {
    /// Watch the store from a thread of its own (it works while the async
    /// runtime or the store's writer are blocked): every 250 ms, detect a
    /// stuck commit, and call `on_exit` once the agent should exit
    /// ([`Durable::should_exit`]). Ends when the store is dropped.
    pub fn spawn_watchdog(
        &self,
        on_exit: impl FnOnce(String) + Send + 'static,
    ) -> std::io::Result<()> {
        let weak = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("riftmesh-durable".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                if let Some(msg) = (Durable { inner }).should_exit() {
                    on_exit(msg);
                    return;
                }
            })?;
        Ok(())
    }
}

/// Bytes available to an unprivileged writer on the filesystem of `f`.
fn fs_free(f: &File) -> std::io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid open descriptor and a writable statvfs.
    if unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_is_counted_only_after_it_synced() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let d = Durable::open(db.clone(), dir.path(), Duration::from_secs(10), 0).unwrap();
        db.insert("k", "v").unwrap();
        assert_eq!(d.syncs(What::Events), 0);
        d.commit(What::Events).unwrap();
        assert_eq!(d.syncs(What::Events), 1);
        assert_eq!(d.syncs(What::Raft), 0);
        assert!(d.read_only().is_none());
    }
}
