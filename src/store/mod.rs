//! The durable local queue on sled: the event log, the dedup index, consumer
//! cursors and dead letters. One writer thread owns every mutation and group
//! commits: all requests waiting when a commit starts share one flush + fsync.
//!
//! This file owns the handle ([`Store`]), its errors and configuration, and
//! the write requests it sends to the writer. The rest, by concept:
//! - `layout`: the key layout in sled, record encoding and layout versions;
//! - `open`: opening a store, checking its layout and recovering counters;
//! - `read`: reads of the log and the per-source index (no writer involved);
//! - `writer`: the writer thread, its group commit and appends;
//! - `dedup`: the dedup index (first copies, takeover, expiry);
//! - `consumer`: consumer cursors and dead letters;
//! - `retention`: removing old events and forgotten sources.

mod consumer;
mod dedup;
mod layout;
mod open;
#[cfg(test)]
pub(crate) use open::open_sled;
mod read;
mod retention;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::catchup::SourceMark;
use crate::codec;
use crate::durable::{Durable, DurableError};
use crate::event::{self, Draft, Event};
use crate::metrics::Labels;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use consumer::ConsumerChange;
pub use consumer::{ConsumerRec, DeadLetter, StartAt, LAG_SCAN};
pub use layout::Stored;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {path} is in use by another process (is another riftmesh agent running with this data directory?)")]
    Locked { path: PathBuf },
    #[error("the store at {path} cannot be opened: {reason}. It may be damaged; stop the agent, move the directory aside (mv {path} {path}.damaged) and start again: the agent starts with an empty log (events published from now on arrive; older ones are not fetched again yet) and consumer cursors start over")]
    Damaged { path: PathBuf, reason: String },
    #[error("store I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("record {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        source: codec::CodecError,
    },
    #[error("unknown consumer {0:?}")]
    UnknownConsumer(String),
    #[error("sequence {seq} is beyond the end of the log ({head})")]
    BeyondHead { seq: u64, head: u64 },
    #[error("{0}")]
    Event(#[from] event::EventError),
    #[error("the store writer has stopped")]
    Closed,
    #[error("writing the store at {path} failed: {reason}; nothing of this request is guaranteed durable")]
    CommitFailed { path: PathBuf, reason: String },
    #[error("{0}")]
    ReadOnly(#[from] DurableError),
    #[error("the store at {path} did not commit within {after:?}; this request may or may not be durable (retry: publishing is idempotent by content)")]
    Timeout { path: PathBuf, after: Duration },
}

impl StoreError {
    /// A copy of a commit failure for each waiting request.
    fn duplicate(&self) -> StoreError {
        match self {
            StoreError::CommitFailed { path, reason } => StoreError::CommitFailed {
                path: path.clone(),
                reason: reason.clone(),
            },
            other => StoreError::CommitFailed {
                path: PathBuf::new(),
                reason: other.to_string(),
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// How long the dedup index remembers a fact (by receipt): an
    /// idempotency key seen within it is a duplicate; a key-less content hash
    /// only within it *and* its type's repeat window.
    pub dedup_window: Duration,
    /// Most dedup entries kept; the oldest go first beyond it.
    pub dedup_max_entries: u64,
    /// Without an idempotency key, the same content is a duplicate only
    /// when the two publication times are at most this far apart (0: never).
    pub repeat_window: Duration,
    /// Per canonical type, instead of `repeat_window`.
    pub repeat_windows: HashMap<String, Duration>,
    /// Events older than this (by receipt) are removed.
    pub retention_age: Duration,
    /// Most events kept in the log.
    pub retention_max_events: u64,
    /// Most bytes of encoded events kept in the log.
    pub retention_max_bytes: u64,
    /// sled page cache.
    pub cache_bytes: u64,
    /// Most requests folded into one group commit.
    pub max_group: usize,
    /// Longest a request waits for its commit; a commit running longer
    /// counts as stuck and makes the store read-only (durable.rs).
    pub commit_timeout: Duration,
    /// Free bytes kept on the store's filesystem (0: no guard): below it,
    /// appends and consumer changes are refused before sled can run out of
    /// space (which it cannot recover from in-process), and accepted again
    /// as soon as space is back.
    pub min_free: u64,
}

/// Default of [`StoreConfig::min_free`] (config `store_min_free`).
pub const DEFAULT_MIN_FREE: u64 = 64 << 20;

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            dedup_window: Duration::from_secs(24 * 3600),
            dedup_max_entries: 5_000_000,
            repeat_window: Duration::from_secs(30),
            repeat_windows: HashMap::new(),
            retention_age: Duration::from_secs(7 * 24 * 3600),
            retention_max_events: 10_000_000,
            retention_max_bytes: 4 << 30,
            cache_bytes: 32 << 20,
            max_group: 4096,
            commit_timeout: Duration::from_secs(10),
            min_free: DEFAULT_MIN_FREE,
        }
    }
}

impl StoreConfig {
    /// The key-less repeat window of `event_type`, in ms.
    pub fn repeat_window_ms(&self, event_type: &str) -> u64 {
        self.repeat_windows
            .get(event_type)
            .unwrap_or(&self.repeat_window)
            .as_millis() as u64
    }
}

#[derive(Clone, Debug)]
pub enum Appended {
    New {
        seq: u64,
        event: Arc<Event>,
    },
    /// The same fact was already accepted (the same idempotency key, or the
    /// same content within its type's window): `seq`, `id` and `ts_ms` (its
    /// publication time) are the first copy's.
    Duplicate {
        seq: u64,
        id: String,
        ts_ms: u64,
        by_key: bool,
    },
    /// This very envelope (source, sequence) is already held.
    Held,
}

enum Item {
    Local(Draft),
    Remote(Event),
}

enum Op {
    Append {
        items: Vec<Item>,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    },
    Consumer {
        name: String,
        change: ConsumerChange,
        reply: oneshot::Sender<Result<ConsumerRec, StoreError>>,
    },
    Prune,
    /// Give up on a source's events up to `to` (gone past retention at peers).
    SkipTo {
        source: String,
        to: u64,
        reply: oneshot::Sender<Result<SourceMark, StoreError>>,
    },
}

/// Time a group commit spends in each step (`riftmesh_store_commit_seconds`),
/// labelled `step`: `prepare` (on the writer thread: dedup lookups, sealing
/// and signing local drafts, building the batch; drafts are built and
/// hashed before, by the API), `apply` (sled's `apply_batch`), `sync` (the
/// durable commit: sled's flush and the fdatasyncs). One observation per
/// step per group applied to the database (a group refused before that is
/// not timed; retention passes are not timed).
pub type CommitSteps = Family<Labels, Histogram, fn() -> Histogram>;

fn commit_step_histogram() -> Histogram {
    // 10 µs .. ~10.5 s: a commit may take up to the commit timeout (10 s).
    Histogram::new(exponential_buckets(1e-5, 2.0, 21))
}

pub(crate) fn new_commit_steps() -> CommitSteps {
    Family::new_with_constructor(commit_step_histogram)
}

/// The three histograms of [`CommitSteps`], looked up once: the writer
/// observes them without building labels or locking the family.
pub(crate) struct StepTimers {
    prepare: Histogram,
    apply: Histogram,
    sync: Histogram,
}

impl StepTimers {
    pub(crate) fn new(family: &CommitSteps) -> Self {
        let get = |step: &str| {
            family
                .get_or_create(&crate::metrics::label("step", step))
                .clone()
        };
        StepTimers {
            prepare: get("prepare"),
            apply: get("apply"),
            sync: get("sync"),
        }
    }

    pub(crate) fn observe(&self, prepare: Duration, apply: Duration, sync: Duration) {
        self.prepare.observe(prepare.as_secs_f64());
        self.apply.observe(apply.as_secs_f64());
        self.sync.observe(sync.as_secs_f64());
    }
}

#[derive(Clone)]
pub struct Store {
    tree: sled::Db,
    path: PathBuf,
    tx: mpsc::Sender<Op>,
    head: watch::Receiver<u64>,
    first: Arc<AtomicU64>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    durable: Durable,
    steps: CommitSteps,
}

impl Store {
    /// Stop the writer and release the store's lock. Waits for pending writes.
    /// Every other clone of this Store must be dropped first.
    pub fn close(self) {
        let Store {
            tx, tree, writer, ..
        } = self;
        drop(tx);
        drop(tree);
        let handle = writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// The sled database, for state kept beside the log in trees of its own
    /// (the leader's Raft log and lock table).
    pub fn sled_db(&self) -> &sled::Db {
        &self.tree
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The histogram family `store_commit_seconds` (register it once).
    pub fn commit_steps(&self) -> CommitSteps {
        self.steps.clone()
    }

    /// The durability rule of this database, shared with the Raft and blob
    /// stores that keep their trees in it.
    pub fn durable(&self) -> &Durable {
        &self.durable
    }

    /// A write request: refused at once while the store is read-only, and
    /// answered within the commit timeout in any case.
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        self.durable.room()?;
        let after = self.durable.timeout();
        let done = async {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(make(reply))
                .await
                .map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        };
        match tokio::time::timeout(after, done).await {
            Ok(r) => r,
            // Stuck past the bound: the watchdog marks it read-only too.
            Err(_) => Err(match self.durable.writable() {
                Err(e) => StoreError::ReadOnly(e),
                Ok(()) => StoreError::Timeout {
                    path: self.path.clone(),
                    after,
                },
            }),
        }
    }

    /// Seal, dedup and durably append local drafts. Returns once on disk.
    pub async fn append_local(&self, drafts: Vec<Draft>) -> Result<Vec<Appended>, StoreError> {
        let items = drafts.into_iter().map(Item::Local).collect();
        self.call(|reply| Op::Append { items, reply }).await
    }

    /// Dedup and durably append verified events from peers.
    pub async fn append_remote(&self, events: Vec<Event>) -> Result<Vec<Appended>, StoreError> {
        let items = events.into_iter().map(Item::Remote).collect();
        self.call(|reply| Op::Append { items, reply }).await
    }

    /// Queue an append of peers' events and return at once with a receiver of
    /// its outcome. Appends are committed in the order they are queued.
    pub async fn append_remote_queued(
        &self,
        events: Vec<Event>,
    ) -> Result<oneshot::Receiver<Result<Vec<Appended>, StoreError>>, StoreError> {
        let items = events.into_iter().map(Item::Remote).collect();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Append { items, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Ask the writer to apply retention and expire dedup entries.
    pub async fn prune(&self) {
        let _ = self.tx.send(Op::Prune).await;
    }

    /// Highest sequence number in the log (0 when empty).
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Lowest retained sequence number (head + 1 when empty).
    pub fn first(&self) -> u64 {
        self.first.load(Ordering::Acquire)
    }

    /// Changes of the head, for long-polling readers.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.tree.size_on_disk().unwrap_or(0)
    }

    /// Number of retained events.
    pub fn len(&self) -> u64 {
        (self.head() + 1).saturating_sub(self.first())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Give up on `source`'s events up to `to` (they are gone past retention
    /// at the peers that could have had them).
    pub async fn skip_to(&self, source: &str, to: u64) -> Result<SourceMark, StoreError> {
        let source = source.to_string();
        self.call(|reply| Op::SkipTo { source, to, reply }).await
    }
}
