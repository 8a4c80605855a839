//! Opening a store: sled's lock (waited for briefly), the layout version,
//! the counters recovered from the log, the head mark that detects lost
//! data, and the writer thread started.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use tokio::sync::{mpsc, watch};

use super::layout::*;
use super::writer::Writer;
use super::{Store, StoreConfig, StoreError};
use crate::catchup::SourceMark;
use crate::durable::Durable;

impl Store {
    /// Open (or create) the store under `dir`. Starts the writer thread.
    pub fn open(dir: &Path, cfg: StoreConfig, key: Keypair) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.to_path_buf();
        let db = open_sled(&path, cfg.cache_bytes)?;
        // Every commit of this database (events, Raft, blobs) goes through
        // it: sled's flush plus fdatasync (durable.rs).
        let durable = Durable::open(db.clone(), &path, cfg.commit_timeout, cfg.min_free).map_err(
            |source| StoreError::Io {
                path: path.join("db"),
                source,
            },
        )?;
        let unversioned = layout_is_old(&db, &path)?;
        let Recovered {
            next_seq,
            first_seq,
            last_received,
            mark_path,
        } = recover(&db, &path)?;
        if unversioned {
            db.insert(M_FORMAT, &STORE_FORMAT.to_be_bytes())?;
        }
        let (head_tx, head_rx) = watch::channel(next_seq - 1);
        let first = Arc::new(AtomicU64::new(first_seq));
        let mut sources = HashMap::new();
        for r in db.scan_prefix(b"s") {
            let (k, v) = r?;
            let m: SourceMark = decode_at(&k, &v)?;
            sources.insert(m.source.clone(), m);
        }
        let (tx, rx) = mpsc::channel(cfg.max_group * 2);
        let steps = super::new_commit_steps();
        let mut writer = Writer {
            db: db.clone(),
            durable: durable.clone(),
            source: key.public().to_peer_id().to_base58(),
            sources,
            key,
            cfg,
            next_seq,
            source_seq: counter(&db, M_SRC)?,
            log_bytes: counter(&db, M_BYTES)?,
            dedup_count: counter(&db, M_DEDUP)?,
            last_received,
            mark_path,
            mark_written: None,
            head: head_tx,
            first: first.clone(),
            steps: super::StepTimers::new(&steps),
        };
        let handle = std::thread::Builder::new()
            .name("riftmesh-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Store {
            tree: db,
            path,
            tx,
            head: head_rx,
            first,
            writer: Arc::new(std::sync::Mutex::new(Some(handle))),
            durable,
            steps,
        })
    }
}

/// Open sled at `path`, waiting briefly for a lock a closing store still
/// holds; a panic in sled's recovery is reported as a damaged store.
pub(crate) fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let path = path.to_path_buf();
    let conf = sled::Config::new()
        .path(&path)
        .cache_capacity(cache_bytes)
        .flush_every_ms(Some(1000));
    let locked = |r: &std::thread::Result<sled::Result<sled::Db>>| {
        matches!(r, Ok(Err(sled::Error::Io(e)))
            if e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("lock"))
    };
    // The lock of a store closed a moment ago (a restart in the same
    // process, the previous agent still exiting) can outlive the close
    // by a little: sled's threads let go of the file last. Seen once in
    // the property tests' reopen loop. Wait up to 3 s before saying
    // another agent holds it.
    let waited = std::time::Instant::now();
    let opened = loop {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conf.open()));
        if !locked(&r) || waited.elapsed() >= Duration::from_secs(3) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if locked(&opened) {
        return Err(StoreError::Locked { path });
    }
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(StoreError::Damaged {
            path,
            reason: e.to_string(),
        }),
        Err(_) => Err(StoreError::Damaged {
            path,
            reason: "the storage engine panicked while recovering".into(),
        }),
    }
}

/// Whether the store is of layout 1 (or new) and is to be marked as of
/// this layout; a store of an unknown layout is refused.
fn layout_is_old(db: &sled::Db, path: &Path) -> Result<bool, StoreError> {
    match db.get(M_FORMAT)?.map(|v| be(&v)) {
        Some(STORE_FORMAT) => Ok(false),
        Some(1) => Ok(true),
        Some(other) => Err(StoreError::Damaged {
            path: path.to_path_buf(),
            reason: format!(
                "store layout version {other}, this agent reads version {STORE_FORMAT}"
            ),
        }),
        None => Ok(true),
    }
}

/// The counters a store opens with.
struct Recovered {
    next_seq: u64,
    first_seq: u64,
    last_received: u64,
    mark_path: PathBuf,
}

/// Read the log's ends, check that its last record decodes and that it
/// holds everything the head mark says was committed.
fn recover(db: &sled::Db, path: &Path) -> Result<Recovered, StoreError> {
    let mut next_seq = counter(db, M_NEXT)?.max(1);
    // The counter is written in the same batch as the entries; trust the log too.
    if let Some((k, _)) = db.scan_prefix(b"l").next_back().transpose()? {
        next_seq = next_seq.max(seq_of(&k) + 1);
    }
    let first_seq = match db.scan_prefix(b"l").next().transpose()? {
        Some((k, _)) => seq_of(&k),
        None => next_seq,
    };
    // Make sure the latest record decodes: a store that opens but whose tail is
    // garbage is reported now, not on the first read.
    let mut last_received = 0;
    if let Some((k, v)) = db.scan_prefix(b"l").next_back().transpose()? {
        let last = decode_stored(&k, &v).map_err(|e| StoreError::Damaged {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        last_received = last.received_ms;
    }
    // The head mark is written after commits, so it never exceeds what was
    // durable. A store that opens with less than it lost data.
    let mark_path = path.join(HEAD_MARK);
    if let Some(mark) = std::fs::read_to_string(&mark_path)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
    {
        if next_seq - 1 < mark {
            return Err(StoreError::Damaged {
                path: path.to_path_buf(),
                reason: format!(
                    "the log ends at sequence {} but sequence {mark} was committed before (recorded in {HEAD_MARK}): data was lost",
                    next_seq - 1
                ),
            });
        }
    }
    Ok(Recovered {
        next_seq,
        first_seq,
        last_received,
        mark_path,
    })
}
