//! The durable local queue on sled: the event log, the dedup index, consumer
//! cursors and dead letters. One writer thread owns every mutation and group
//! commits: all requests waiting when a commit starts share one flush + fsync.
//!
//! Layout (one sled tree, one-byte key prefixes, so a batch is atomic):
//! - `l` seq:u64be                 → Stored (bincode)
//! - `h` digest:32                 → (seq, accepted_ms, ts_ms)   dedup index
//!   (digest: the idempotency key's, else the content hash; layout-1
//!   entries lack ts_ms)
//! - `x` accepted_ms:u64be digest:32 → ()          dedup expiry order, one per digest
//! - `i` event-id                  → seq
//! - `k` correlation 0x00 seq      → ()            trace index
//! - `o` len:u8 source seq:u64be   → log seq       per-source index (catch-up)
//! - `s` source                    → SourceMark    per-source version vector
//! - `c` consumer-name             → ConsumerRec
//! - `d` consumer 0x00 seq         → DeadLetter
//! - `m` name                      → counters (u64be)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::catchup::SourceMark;
use crate::codec;
use crate::durable::{Durable, DurableError, What};
use crate::event::{self, Draft, Event, Hash, TypePattern};

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

/// An event as the log holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stored {
    pub received_ms: u64,
    pub event: Event,
    /// Set when this envelope repeats a fact already in the log (same dedup
    /// digest within its window; another source or sequence): kept for
    /// catch-up, never delivered.
    pub dup_of: Option<u64>,
}

/// A log record written before envelope version 2 (store layout 1).
#[derive(Deserialize)]
struct StoredV1 {
    received_ms: u64,
    event: event::EventV1,
    dup_of: Option<u64>,
}

/// First bytes of a record of layout 2. A layout-1 record is bare bincode
/// of [`StoredV1`], whose first byte starts a varint: never 0xFF.
const RECORD_V2: [u8; 2] = [0xFF, 2];

impl Stored {
    /// Whether a consumer of `patterns` is given this entry (not a
    /// duplicate's envelope, and of a matching type).
    pub fn delivered_to(&self, patterns: &[TypePattern]) -> bool {
        self.dup_of.is_none() && event::matches_any(patterns, &self.event.event_type)
    }

    /// Layout 2: [`RECORD_V2`], then the bincode of [`Stored`] (its event in
    /// envelope version 2's field order, with `idem_key`).
    pub fn encode(&self) -> Result<Vec<u8>, codec::CodecError> {
        let body = codec::encode(self)?;
        let mut out = Vec::with_capacity(RECORD_V2.len() + body.len());
        out.extend_from_slice(&RECORD_V2);
        out.extend(body);
        Ok(out)
    }

    /// Either layout.
    pub fn decode(v: &[u8]) -> Result<Stored, codec::CodecError> {
        match v.strip_prefix(&RECORD_V2) {
            Some(body) => codec::decode(body, codec::MAX_DECODE),
            None => {
                let old: StoredV1 = codec::decode(v, codec::MAX_DECODE)?;
                Ok(Stored {
                    received_ms: old.received_ms,
                    event: old.event.into(),
                    dup_of: old.dup_of,
                })
            }
        }
    }
}

fn decode_stored(key: &[u8], v: &[u8]) -> Result<Stored, StoreError> {
    Stored::decode(v).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConsumerRec {
    pub name: String,
    pub types: Vec<String>,
    /// Every log entry at or below this sequence is acknowledged.
    pub cursor: u64,
    pub created_ms: u64,
    pub acked_ms: u64,
    pub dead_letters: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub reason: String,
    pub at_ms: u64,
}

/// Where a consumer (re)starts.
#[derive(Clone, Debug, PartialEq)]
pub enum StartAt {
    /// Only events appended after now.
    New,
    /// The oldest retained event.
    Start,
    /// The first event received at or after this time (ms since epoch).
    Since(u64),
    /// After this log sequence number.
    After(u64),
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

enum ConsumerChange {
    Upsert {
        types: Option<Vec<String>>,
        start: Option<StartAt>,
    },
    Ack(u64),
    Nack {
        seq: u64,
        reason: String,
    },
    Delete,
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
}

/// File beside sled's holding a committed head, to detect a store that lost data.
const HEAD_MARK: &str = "riftmesh.head";
const M_NEXT: &[u8] = b"mnext_seq";
/// On-disk layout version; a store of another version is refused by path.
const M_FORMAT: &[u8] = b"mformat";
/// Layout 2: log records of envelope version 2 ([`RECORD_V2`]); dedup
/// entries with the first copy's publication time. Layout 1 is read and
/// upgraded in place (its records stay as they are).
const STORE_FORMAT: u64 = 2;
const M_SRC: &[u8] = b"msource_seq";
const M_BYTES: &[u8] = b"mlog_bytes";
const M_DEDUP: &[u8] = b"mdedup_count";

fn key_l(seq: u64) -> [u8; 9] {
    let mut k = [b'l'; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}
fn key_h(h: &Hash) -> [u8; 33] {
    let mut k = [b'h'; 33];
    k[1..].copy_from_slice(h);
    k
}
fn key_x(ms: u64, h: &Hash) -> [u8; 41] {
    let mut k = [b'x'; 41];
    k[1..9].copy_from_slice(&ms.to_be_bytes());
    k[9..].copy_from_slice(h);
    k
}
fn key_i(id: &str) -> Vec<u8> {
    [b"i", id.as_bytes()].concat()
}
fn key_k(corr: &str, seq: u64) -> Vec<u8> {
    [b"k", corr.as_bytes(), b"\0", &seq.to_be_bytes()].concat()
}
fn key_o(source: &str, seq: u64) -> Vec<u8> {
    let b = source.as_bytes();
    let mut k = Vec::with_capacity(2 + b.len() + 8);
    k.push(b'o');
    k.push(b.len().min(255) as u8);
    k.extend_from_slice(&b[..b.len().min(255)]);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}
fn prefix_o(source: &str) -> Vec<u8> {
    let mut k = key_o(source, 0);
    k.truncate(k.len() - 8);
    k
}
fn key_s(source: &str) -> Vec<u8> {
    [b"s", source.as_bytes()].concat()
}
fn key_c(name: &str) -> Vec<u8> {
    [b"c", name.as_bytes()].concat()
}
fn key_d(name: &str, seq: u64) -> Vec<u8> {
    [b"d", name.as_bytes(), b"\0", &seq.to_be_bytes()].concat()
}
fn be(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[..n].copy_from_slice(&v[..n]);
    u64::from_be_bytes(b)
}
fn seq_of(key: &[u8]) -> u64 {
    be(&key[key.len().saturating_sub(8)..])
}

fn decode_at<T: serde::de::DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    codec::decode(v, codec::MAX_DECODE).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

impl Store {
    /// Open (or create) the store under `dir`. Starts the writer thread.
    pub fn open(dir: &Path, cfg: StoreConfig, key: Keypair) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.to_path_buf();
        let conf = sled::Config::new()
            .path(&path)
            .cache_capacity(cfg.cache_bytes)
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
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => {
                return Err(StoreError::Damaged {
                    path,
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(StoreError::Damaged {
                    path,
                    reason: "the storage engine panicked while recovering".into(),
                })
            }
        };
        // Every commit of this database (events, Raft, blobs) goes through
        // it: sled's flush plus fdatasync (durable.rs).
        let durable = Durable::open(db.clone(), &path, cfg.commit_timeout, cfg.min_free).map_err(
            |source| StoreError::Io {
                path: path.join("db"),
                source,
            },
        )?;
        let unversioned = match db.get(M_FORMAT)?.map(|v| be(&v)) {
            Some(STORE_FORMAT) => false,
            Some(1) => true,
            Some(other) => {
                return Err(StoreError::Damaged {
                    path,
                    reason: format!(
                        "store layout version {other}, this agent reads version {STORE_FORMAT}"
                    ),
                })
            }
            None => true,
        };
        let get =
            |k: &[u8]| -> Result<u64, StoreError> { Ok(db.get(k)?.map(|v| be(&v)).unwrap_or(0)) };
        let mut next_seq = get(M_NEXT)?.max(1);
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
                path: path.clone(),
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
                    path,
                    reason: format!(
                        "the log ends at sequence {} but sequence {mark} was committed before (recorded in {HEAD_MARK}): data was lost",
                        next_seq - 1
                    ),
                });
            }
        }
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
        let mut writer = Writer {
            db: db.clone(),
            durable: durable.clone(),
            source: key.public().to_peer_id().to_base58(),
            sources,
            key,
            cfg,
            next_seq,
            source_seq: get(M_SRC)?,
            log_bytes: get(M_BYTES)?,
            dedup_count: get(M_DEDUP)?,
            last_received,
            mark_path,
            mark_written: None,
            head: head_tx,
            first: first.clone(),
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
        })
    }

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

    pub async fn upsert_consumer(
        &self,
        name: &str,
        types: Option<Vec<String>>,
        start: Option<StartAt>,
    ) -> Result<ConsumerRec, StoreError> {
        let name = name.to_string();
        self.call(|reply| Op::Consumer {
            name,
            change: ConsumerChange::Upsert { types, start },
            reply,
        })
        .await
    }

    pub async fn ack(&self, name: &str, seq: u64) -> Result<ConsumerRec, StoreError> {
        let name = name.to_string();
        self.call(|reply| Op::Consumer {
            name,
            change: ConsumerChange::Ack(seq),
            reply,
        })
        .await
    }

    pub async fn nack(
        &self,
        name: &str,
        seq: u64,
        reason: String,
    ) -> Result<ConsumerRec, StoreError> {
        let name = name.to_string();
        self.call(|reply| Op::Consumer {
            name,
            change: ConsumerChange::Nack { seq, reason },
            reply,
        })
        .await
    }

    pub async fn delete_consumer(&self, name: &str) -> Result<ConsumerRec, StoreError> {
        let name = name.to_string();
        self.call(|reply| Op::Consumer {
            name,
            change: ConsumerChange::Delete,
            reply,
        })
        .await
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

    pub fn consumer(&self, name: &str) -> Result<Option<ConsumerRec>, StoreError> {
        let k = key_c(name);
        self.tree.get(&k)?.map(|v| decode_at(&k, &v)).transpose()
    }

    pub fn consumers(&self) -> Result<Vec<ConsumerRec>, StoreError> {
        self.tree
            .scan_prefix(b"c")
            .map(|r| {
                let (k, v) = r?;
                decode_at(&k, &v)
            })
            .collect()
    }

    pub fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let prefix = [b"d", name.as_bytes(), b"\0"].concat();
        self.tree
            .scan_prefix(prefix)
            .map(|r| {
                let (k, v) = r?;
                decode_at(&k, &v)
            })
            .collect()
    }

    pub fn get(&self, seq: u64) -> Result<Option<Stored>, StoreError> {
        let k = key_l(seq);
        self.tree.get(k)?.map(|v| decode_stored(&k, &v)).transpose()
    }

    pub fn get_by_id(&self, id: &str) -> Result<Option<(u64, Stored)>, StoreError> {
        let Some(v) = self.tree.get(key_i(id))? else {
            return Ok(None);
        };
        let seq = be(&v);
        Ok(self.get(seq)?.map(|s| (seq, s)))
    }

    /// Sequence number of the event already accepted with this content hash.
    pub fn seq_of_hash(&self, h: &Hash) -> Result<Option<u64>, StoreError> {
        Ok(self.tree.get(key_h(h))?.map(|v| be(&v)))
    }

    /// Every retained event with this correlation id, in log order.
    pub fn by_correlation(&self, corr: &str) -> Result<Vec<(u64, Stored)>, StoreError> {
        let prefix = [b"k", corr.as_bytes(), b"\0"].concat();
        let mut out = Vec::new();
        for r in self.tree.scan_prefix(&prefix) {
            let (k, _) = r?;
            if k.len() != prefix.len() + 8 {
                continue;
            }
            let seq = seq_of(&k);
            if let Some(s) = self.get(seq)? {
                out.push((seq, s));
            }
        }
        Ok(out)
    }

    /// Up to `limit` events after `after` whose type matches, scanning at most
    /// `max_scan` entries. Returns them and the last sequence scanned.
    pub fn read_after(
        &self,
        after: u64,
        limit: usize,
        max_scan: usize,
        patterns: &[TypePattern],
    ) -> Result<(Vec<(u64, Stored)>, u64), StoreError> {
        let mut out = Vec::new();
        let mut last = after;
        for (scanned, r) in self
            .tree
            .range(key_l(after.saturating_add(1))..key_l(u64::MAX))
            .enumerate()
        {
            if out.len() >= limit || scanned >= max_scan {
                break;
            }
            let (k, v) = r?;
            let seq = seq_of(&k);
            last = seq;
            let s = decode_stored(&k, &v)?;
            if s.delivered_to(patterns) {
                out.push((seq, s));
            }
        }
        Ok((out, last))
    }

    /// Up to `limit` events before `before` (exclusive) whose type matches,
    /// newest first, scanning at most `max_scan` entries backwards. Returns
    /// them and the lowest sequence scanned (`before` when none was).
    pub fn read_before(
        &self,
        before: u64,
        limit: usize,
        max_scan: usize,
        patterns: &[TypePattern],
    ) -> Result<(Vec<(u64, Stored)>, u64), StoreError> {
        let mut out = Vec::new();
        let mut lowest = before;
        for (scanned, r) in self.tree.range(key_l(0)..key_l(before)).rev().enumerate() {
            if out.len() >= limit || scanned >= max_scan {
                break;
            }
            let (k, v) = r?;
            let seq = seq_of(&k);
            lowest = seq;
            let s = decode_stored(&k, &v)?;
            if s.delivered_to(patterns) {
                out.push((seq, s));
            }
        }
        Ok((out, lowest))
    }

    /// How many events after `cursor` a consumer of `patterns` has still to
    /// see: delivered (not `dup_of`) entries whose type matches. Counts at
    /// most `max_scan` entries; the bool says whether the count is exact
    /// (false: at least this many).
    pub fn pending(
        &self,
        cursor: u64,
        max_scan: usize,
        patterns: &[TypePattern],
    ) -> Result<(u64, bool), StoreError> {
        let mut n = 0;
        for (scanned, r) in self
            .tree
            .range(key_l(cursor.saturating_add(1))..key_l(u64::MAX))
            .enumerate()
        {
            if scanned >= max_scan {
                return Ok((n, false));
            }
            let (k, v) = r?;
            let s = decode_stored(&k, &v)?;
            if s.delivered_to(patterns) {
                n += 1;
            }
        }
        Ok((n, true))
    }

    /// Sequence just before the first event received at or after `ms`.
    pub fn seq_before_time(&self, ms: u64) -> Result<u64, StoreError> {
        seq_before_time(&self.tree, self.first(), self.head() + 1, ms)
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

    /// The version vector: what this agent holds of every source it knows.
    pub fn version_vector(&self) -> Result<Vec<SourceMark>, StoreError> {
        self.tree
            .scan_prefix(b"s")
            .map(|r| {
                let (k, v) = r?;
                decode_at(&k, &v)
            })
            .collect()
    }

    /// Envelopes of `source` from sequence `from` on, in order, at most
    /// `max_events` of them or about `max_bytes`. Also returns the lowest
    /// sequence of this source still held (or None if none is).
    pub fn source_events(
        &self,
        source: &str,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Event>, Option<u64>), StoreError> {
        let prefix = prefix_o(source);
        let floor = self
            .tree
            .scan_prefix(&prefix)
            .next()
            .transpose()?
            .map(|(k, _)| seq_of(&k));
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let end = [prefix.as_slice(), &[0xff; 9]].concat();
        for r in self.tree.range(key_o(source, from)..end) {
            let (_, v) = r?;
            let k = key_l(be(&v));
            let Some(raw) = self.tree.get(k)? else {
                continue;
            };
            bytes += raw.len();
            let st = decode_stored(&k, &raw)?;
            out.push(st.event);
            if out.len() >= max_events || bytes >= max_bytes {
                break;
            }
        }
        Ok((out, floor))
    }

    /// Give up on `source`'s events up to `to` (they are gone past retention
    /// at the peers that could have had them).
    pub async fn skip_to(&self, source: &str, to: u64) -> Result<SourceMark, StoreError> {
        let source = source.to_string();
        self.call(|reply| Op::SkipTo { source, to, reply }).await
    }

    /// Source sequence numbers this agent has handed out.
    pub fn source_seq(&self) -> u64 {
        self.tree
            .get(M_SRC)
            .ok()
            .flatten()
            .map(|v| be(&v))
            .unwrap_or(0)
    }
}

/// Bisect the log in [first, end) for the first entry received at or after
/// `ms` (receipt times never decrease along the log) and return the sequence
/// just before it.
fn seq_before_time(tree: &sled::Tree, first: u64, end: u64, ms: u64) -> Result<u64, StoreError> {
    let (mut lo, mut hi) = (first, end);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match tree.range(key_l(mid)..key_l(u64::MAX)).next().transpose()? {
            Some((k, v)) if seq_of(&k) < hi => {
                let s = decode_stored(&k, &v)?;
                if s.received_ms < ms {
                    lo = seq_of(&k) + 1;
                } else {
                    hi = mid;
                }
            }
            _ => hi = mid,
        }
    }
    Ok(lo.saturating_sub(1))
}

struct Writer {
    db: sled::Db,
    durable: Durable,
    key: Keypair,
    /// This agent's peer id text, the `source` of its events.
    source: String,
    /// Per-source marks (the version vector), persisted under `s`.
    sources: HashMap<String, SourceMark>,
    cfg: StoreConfig,
    next_seq: u64,
    source_seq: u64,
    log_bytes: u64,
    dedup_count: u64,
    last_received: u64,
    mark_path: PathBuf,
    mark_written: Option<std::time::Instant>,
    head: watch::Sender<u64>,
    first: Arc<AtomicU64>,
}

/// The first copy of a fact, as the dedup index holds it.
#[derive(Clone)]
struct FirstCopy {
    seq: u64,
    received_ms: u64,
    /// Its publication time (layout-1 entries: its receipt time).
    ts_ms: u64,
    /// Known when staged in this group; read from the log when needed.
    id: Option<String>,
}

/// What earlier requests of the same group staged.
struct Group<'a> {
    batch: &'a mut sled::Batch,
    hashes: &'a mut HashMap<Hash, FirstCopy>,
    held: &'a mut std::collections::HashSet<(String, u64)>,
    touched: &'a mut std::collections::HashSet<String>,
}

/// Outcome of one group before it is durable.
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(op) = rx.blocking_recv() {
            let mut ops = vec![op];
            let mut n_items = 0usize;
            while n_items < self.cfg.max_group {
                match rx.try_recv() {
                    Ok(op) => {
                        if let Op::Append { items, .. } = &op {
                            n_items += items.len();
                        } else {
                            n_items += 1;
                        }
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(ops);
            if self
                .mark_written
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.write_mark();
            }
        }
        if self.db.flush().is_ok() {
            self.write_mark();
        }
    }

    fn write_mark(&mut self) {
        let tmp = self.mark_path.with_extension("tmp");
        let head = self.next_seq - 1;
        if std::fs::write(&tmp, head.to_string())
            .and_then(|_| std::fs::rename(&tmp, &self.mark_path))
            .is_ok()
        {
            self.mark_written = Some(std::time::Instant::now());
        }
    }

    /// Returns false when the group could not be made durable.
    fn commit_group(&mut self, ops: Vec<Op>) -> bool {
        let mut batch = sled::Batch::default();
        let mut replies: Vec<Reply> = Vec::new();
        // Hashes and consumers written earlier in this same group.
        let mut hashes: HashMap<Hash, FirstCopy> = HashMap::new();
        let mut held: std::collections::HashSet<(String, u64)> = Default::default();
        let mut touched: std::collections::HashSet<String> = Default::default();
        let mut consumers: HashMap<String, Option<ConsumerRec>> = HashMap::new();
        let saved_sources = self.sources.clone();
        let (saved_next, saved_src, saved_bytes, saved_dedup) = (
            self.next_seq,
            self.source_seq,
            self.log_bytes,
            self.dedup_count,
        );
        let mut prune = false;
        let mut durable = true;
        let mut dirty = false;
        for op in ops {
            match op {
                Op::Append { items, reply } => {
                    let mut g = Group {
                        batch: &mut batch,
                        hashes: &mut hashes,
                        held: &mut held,
                        touched: &mut touched,
                    };
                    let r = self.stage_append(items, &mut g);
                    dirty = true;
                    match r {
                        Ok(out) => replies.push(Box::new(move |err| {
                            let _ = reply.send(match err {
                                None => Ok(out),
                                Some(e) => Err(e.duplicate()),
                            });
                        })),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Op::Consumer {
                    name,
                    change,
                    reply,
                } => {
                    let r = self.stage_consumer(&name, change, &mut batch, &mut consumers);
                    dirty = true;
                    match r {
                        Ok(rec) => replies.push(Box::new(move |err| {
                            let _ = reply.send(match err {
                                None => Ok(rec),
                                Some(e) => Err(e.duplicate()),
                            });
                        })),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Op::Prune => prune = true,
                Op::SkipTo { source, to, reply } => {
                    dirty = true;
                    let r = self.advance_source(&source, to, true, &held).map(|()| {
                        touched.insert(source.clone());
                        self.sources.get(&source).cloned().unwrap_or_default()
                    });
                    match r {
                        Ok(m) => replies.push(Box::new(move |err| {
                            let _ = reply.send(match err {
                                None => Ok(m),
                                Some(e) => Err(e.duplicate()),
                            });
                        })),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            }
        }
        if dirty {
            for src in &touched {
                if let Some(m) = self.sources.get(src) {
                    if let Ok(v) = codec::encode(m) {
                        batch.insert(key_s(src), v);
                    }
                }
            }
            batch.insert(M_NEXT, &self.next_seq.to_be_bytes());
            batch.insert(M_SRC, &self.source_seq.to_be_bytes());
            batch.insert(M_BYTES, &self.log_bytes.to_be_bytes());
            batch.insert(M_DEDUP, &self.dedup_count.to_be_bytes());
            let res = match self
                .durable
                .room()
                .map_err(StoreError::from)
                .and_then(|()| {
                    self.db.apply_batch(batch).map_err(|e| {
                        self.durable.write_failed(&e);
                        StoreError::from(e)
                    })
                }) {
                Err(e) => {
                    // Nothing applied: the sequence numbers are free again.
                    self.next_seq = saved_next;
                    self.source_seq = saved_src;
                    self.log_bytes = saved_bytes;
                    self.dedup_count = saved_dedup;
                    self.sources = saved_sources;
                    Err(e)
                }
                // Applied in memory: keep the counters so no sequence is reused,
                // even if making it durable failed.
                Ok(()) => {
                    let r = self.sync();
                    if r.is_ok() {
                        // Wake long-polls only when the log grew (not on acks).
                        let head = self.next_seq - 1;
                        self.head
                            .send_if_modified(|h| std::mem::replace(h, head) != head);
                    }
                    r
                }
            };
            let err = res.err().map(|e| {
                tracing::error!(error = %e, path = %self.mark_path.display(), "store commit failed");
                StoreError::CommitFailed {
                    path: self.mark_path.with_file_name(""),
                    reason: e.to_string(),
                }
            });
            durable = err.is_none();
            for r in replies {
                r(err.as_ref());
            }
        }
        if prune {
            if let Err(e) = self.prune() {
                tracing::warn!(error = %e, "retention pass failed");
            }
        }
        durable
    }

    /// The durability point of a group: nothing is answered before it.
    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(self.durable.commit(What::Events)?)
    }

    fn stage_append(
        &mut self,
        items: Vec<Item>,
        g: &mut Group,
    ) -> Result<Vec<Appended>, StoreError> {
        let now = event::now_ms();
        // Receipt times never go backwards along the log, so time seeks can bisect.
        let received_ms = now.max(self.last_received);
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Item::Remote(e) = &item {
                let k = (e.source.clone(), e.seq);
                if g.held.contains(&k) || self.db.contains_key(key_o(&e.source, e.seq))? {
                    out.push(Appended::Held);
                    continue;
                }
            }
            // The dedup digest: the idempotency key's when there is one
            // (one fact whatever its age within the index), else the
            // content hash, a duplicate only within the type's window of
            // publication times (proto-notes/events.md §13).
            let (h, keyed, event_type, ts_ms) = match &item {
                Item::Local(d) => (d.dedup_digest(), d.idem_key.is_some(), &d.event_type, now),
                Item::Remote(e) => (
                    e.dedup_digest(),
                    e.idem_key.is_some(),
                    &e.event_type,
                    e.ts_ms,
                ),
            };
            let earlier = match g.hashes.get(&h) {
                Some(f) => Some(f.clone()),
                None => self.db.get(key_h(&h))?.map(|v| FirstCopy {
                    seq: be(&v),
                    received_ms: be(&v[8..]),
                    ts_ms: if v.len() >= 24 {
                        be(&v[16..])
                    } else {
                        be(&v[8..])
                    },
                    id: None,
                }),
            };
            let window = self.cfg.repeat_window_ms(event_type);
            let first_copy = match earlier.clone() {
                // A window of 0 means never, also within one millisecond.
                Some(f) if keyed || (window > 0 && f.ts_ms.abs_diff(ts_ms) <= window) => {
                    let id = match f.id {
                        Some(id) => id,
                        None => self
                            .db
                            .get(key_l(f.seq))?
                            .and_then(|v| Stored::decode(&v).ok())
                            .map(|s| s.event.id)
                            .unwrap_or_default(),
                    };
                    Some((f.seq, id, f.ts_ms))
                }
                // Outside the window: a new fact (it takes over the entry
                // below when it is the later one).
                _ => None,
            };
            let event = match (item, &first_copy) {
                // A local duplicate gets no sequence number: nothing to store.
                (Item::Local(_), Some((seq, id, ts))) => {
                    out.push(Appended::Duplicate {
                        seq: *seq,
                        id: id.clone(),
                        ts_ms: *ts,
                        by_key: keyed,
                    });
                    continue;
                }
                (Item::Local(d), None) => {
                    let ev = d.seal_as(&self.key, &self.source, self.source_seq + 1, now)?;
                    self.source_seq += 1;
                    ev
                }
                (Item::Remote(e), _) => e,
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            let (source, source_seq) = (event.source.clone(), event.seq);
            let stored = Stored {
                received_ms,
                event,
                dup_of: first_copy.as_ref().map(|(s, _, _)| *s),
            };
            let bytes = stored.encode().map_err(|source| StoreError::Corrupt {
                key: format!("l{seq}"),
                source,
            })?;
            self.log_bytes += bytes.len() as u64;
            g.batch.insert(&key_l(seq), bytes);
            g.batch
                .insert(key_o(&source, source_seq), &seq.to_be_bytes());
            g.held.insert((source.clone(), source_seq));
            self.advance_source(&source, source_seq, false, g.held)?;
            if let Some(m) = self.sources.get_mut(&source) {
                m.last_ms = received_ms;
            }
            g.touched.insert(source);
            if let Some((first, id, ts)) = first_copy {
                // Another envelope of a fact we hold: kept for catch-up only.
                out.push(Appended::Duplicate {
                    seq: first,
                    id,
                    ts_ms: ts,
                    by_key: keyed,
                });
                continue;
            }
            let ev_ts = stored.event.ts_ms;
            // The entry holds the latest publication of the digest: a new
            // fact published later takes it over; an older one (a late
            // catch-up copy) leaves it, so later repeats are judged against
            // the newest fact.
            let take_over = earlier.as_ref().is_none_or(|f| ev_ts > f.ts_ms);
            if take_over {
                let mut hv = seq.to_be_bytes().to_vec();
                hv.extend(received_ms.to_be_bytes());
                hv.extend(ev_ts.to_be_bytes());
                g.batch.insert(key_h(&h).as_slice(), hv);
                match &earlier {
                    // One expiry entry per digest, the count unchanged.
                    Some(f) => {
                        if f.received_ms != received_ms {
                            g.batch.remove(key_x(f.received_ms, &h).as_slice());
                        }
                    }
                    None => self.dedup_count += 1,
                }
                g.batch.insert(key_x(received_ms, &h).as_slice(), &[]);
                g.hashes.insert(
                    h,
                    FirstCopy {
                        seq,
                        received_ms,
                        ts_ms: ev_ts,
                        id: Some(stored.event.id.clone()),
                    },
                );
            }
            g.batch.insert(key_i(&stored.event.id), &seq.to_be_bytes());
            if let Some(c) = &stored.event.correlation_id {
                g.batch.insert(key_k(c, seq), &[]);
            }
            out.push(Appended::New {
                seq,
                event: Arc::new(stored.event),
            });
        }
        self.last_received = received_ms;
        Ok(out)
    }

    /// Record that `seq` of `source` is now held (`skip`: or given up, with
    /// everything before it), then move the contiguous mark over every
    /// sequence held after it.
    fn advance_source(
        &mut self,
        source: &str,
        seq: u64,
        skip: bool,
        held: &std::collections::HashSet<(String, u64)>,
    ) -> Result<(), StoreError> {
        let m = self
            .sources
            .entry(source.to_string())
            .or_insert_with(|| SourceMark {
                source: source.to_string(),
                ..Default::default()
            });
        m.max_seen = m.max_seen.max(seq);
        if seq == m.contiguous + 1 || (skip && seq > m.contiguous) {
            m.contiguous = seq;
        } else {
            return Ok(());
        }
        loop {
            let next = m.contiguous + 1;
            if held.contains(&(source.to_string(), next))
                || self.db.contains_key(key_o(source, next))?
            {
                m.contiguous = next;
                m.max_seen = m.max_seen.max(next);
            } else {
                return Ok(());
            }
        }
    }

    fn stage_consumer(
        &mut self,
        name: &str,
        change: ConsumerChange,
        batch: &mut sled::Batch,
        consumers: &mut HashMap<String, Option<ConsumerRec>>,
    ) -> Result<ConsumerRec, StoreError> {
        let current = match consumers.get(name) {
            Some(c) => c.clone(),
            None => {
                let k = key_c(name);
                self.db.get(&k)?.map(|v| decode_at(&k, &v)).transpose()?
            }
        };
        let head = self.next_seq - 1;
        let now = event::now_ms();
        let check = |seq: u64| {
            if seq > head {
                Err(StoreError::BeyondHead { seq, head })
            } else {
                Ok(())
            }
        };
        let rec = match change {
            ConsumerChange::Upsert { types, start } => {
                let mut rec = current.unwrap_or_else(|| ConsumerRec {
                    name: name.to_string(),
                    types: Vec::new(),
                    cursor: head,
                    created_ms: now,
                    acked_ms: 0,
                    dead_letters: 0,
                });
                if let Some(t) = types {
                    rec.types = t;
                }
                match start {
                    None => {}
                    Some(StartAt::New) => rec.cursor = head,
                    Some(StartAt::Start) => {
                        rec.cursor = self.first.load(Ordering::Acquire).saturating_sub(1)
                    }
                    Some(StartAt::After(s)) => {
                        check(s)?;
                        rec.cursor = s;
                    }
                    Some(StartAt::Since(ms)) => {
                        rec.cursor = seq_before_time(
                            &self.db,
                            self.first.load(Ordering::Acquire),
                            self.next_seq,
                            ms,
                        )?
                    }
                }
                rec
            }
            ConsumerChange::Ack(seq) => {
                let mut rec = current.ok_or_else(|| StoreError::UnknownConsumer(name.into()))?;
                check(seq)?;
                rec.cursor = rec.cursor.max(seq);
                rec.acked_ms = now;
                rec
            }
            ConsumerChange::Nack { seq, reason } => {
                let mut rec = current.ok_or_else(|| StoreError::UnknownConsumer(name.into()))?;
                check(seq)?;
                let dl = DeadLetter {
                    seq,
                    reason,
                    at_ms: now,
                };
                let v = codec::encode(&dl).map_err(|source| StoreError::Corrupt {
                    key: format!("d{name}"),
                    source,
                })?;
                batch.insert(key_d(name, seq), v);
                rec.dead_letters += 1;
                rec.cursor = rec.cursor.max(seq);
                rec.acked_ms = now;
                rec
            }
            ConsumerChange::Delete => {
                let rec = current.ok_or_else(|| StoreError::UnknownConsumer(name.into()))?;
                batch.remove(key_c(name));
                for r in self.db.scan_prefix([b"d", name.as_bytes(), b"\0"].concat()) {
                    batch.remove(r?.0);
                }
                consumers.insert(name.to_string(), None);
                return Ok(rec);
            }
        };
        let v = codec::encode(&rec).map_err(|source| StoreError::Corrupt {
            key: format!("c{name}"),
            source,
        })?;
        batch.insert(key_c(name), v);
        consumers.insert(name.to_string(), Some(rec.clone()));
        Ok(rec)
    }

    /// Retention by age, count and bytes; dedup expiry by window and count.
    /// Bounded work per pass; each pass is one durable batch.
    fn prune(&mut self) -> Result<(), StoreError> {
        const MAX_WORK: usize = 20_000;
        let now = event::now_ms();
        let age_cut = now.saturating_sub(self.cfg.retention_age.as_millis() as u64);
        let mut batch = sled::Batch::default();
        let mut first = self.first.load(Ordering::Acquire);
        let mut work = 0;
        let saved = (self.log_bytes, self.dedup_count);
        for r in self.db.scan_prefix(b"l") {
            if work >= MAX_WORK {
                break;
            }
            let (k, v) = r?;
            let count = self.next_seq - first;
            let s = decode_stored(&k, &v)?;
            let over = s.received_ms < age_cut
                || count > self.cfg.retention_max_events
                || self.log_bytes > self.cfg.retention_max_bytes;
            if !over {
                break;
            }
            let seq = seq_of(&k);
            batch.remove(&*k);
            batch.remove(key_o(&s.event.source, s.event.seq));
            batch.remove(key_i(&s.event.id));
            if let Some(c) = &s.event.correlation_id {
                batch.remove(key_k(c, seq));
            }
            self.log_bytes = self.log_bytes.saturating_sub(v.len() as u64);
            first = seq + 1;
            work += 1;
        }
        let dedup_cut = now.saturating_sub(self.cfg.dedup_window.as_millis() as u64);
        for r in self.db.scan_prefix(b"x") {
            if work >= MAX_WORK {
                break;
            }
            let (k, _) = r?;
            let ms = be(&k[1..9]);
            if ms >= dedup_cut && self.dedup_count <= self.cfg.dedup_max_entries {
                break;
            }
            let mut h = [0u8; 32];
            h.copy_from_slice(&k[9..41]);
            batch.remove(&*k);
            batch.remove(key_h(&h).as_slice());
            self.dedup_count = self.dedup_count.saturating_sub(1);
            work += 1;
        }
        // A source not heard from within retention, with nothing left in the
        // log, is forgotten.
        let forget: Vec<String> = self
            .sources
            .values()
            .filter(|m| m.last_ms < age_cut && m.source != self.source)
            .map(|m| m.source.clone())
            .collect();
        for src in forget {
            if self.db.scan_prefix(prefix_o(&src)).next().is_none() {
                batch.remove(key_s(&src));
                self.sources.remove(&src);
                work += 1;
            }
        }
        if work == 0 {
            return Ok(());
        }
        batch.insert(M_BYTES, &self.log_bytes.to_be_bytes());
        batch.insert(M_DEDUP, &self.dedup_count.to_be_bytes());
        if let Err(e) = self.db.apply_batch(batch) {
            (self.log_bytes, self.dedup_count) = saved;
            return Err(e.into());
        }
        self.sync()?;
        self.first.store(first, Ordering::Release);
        tracing::debug!(removed = work, first, "retention pass");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(key: Option<&str>) -> Event {
        let k = Keypair::generate_ed25519();
        Draft::new("CUSTOM_T", &serde_json::json!({"n": 1}), None, None, None)
            .unwrap()
            .with_idem_key(key.map(str::to_string))
            .unwrap()
            .seal(&k, 3, 1_700_000_000_000)
            .unwrap()
    }

    /// A record written before envelope version 2 (bare bincode of the
    /// layout-1 struct) still reads, whatever its receipt time; records of
    /// layout 2 read back with their key.
    #[test]
    fn records_of_both_layouts_read() {
        #[derive(Serialize)]
        struct OldStored<'a> {
            received_ms: u64,
            event: event::EventV1Ref<'a>,
            dup_of: Option<u64>,
        }
        let ev = sealed(None);
        for received_ms in [0, 1, 250, 1 << 20, 1_700_000_000_123, u64::MAX] {
            let old = codec::encode(&OldStored {
                received_ms,
                event: ev.as_v1().unwrap(),
                dup_of: Some(9),
            })
            .unwrap();
            assert_ne!(old[0], RECORD_V2[0]);
            let got = Stored::decode(&old).unwrap();
            assert_eq!((got.received_ms, got.dup_of), (received_ms, Some(9)));
            assert_eq!(got.event, ev);
            got.event.verify().unwrap();
        }
        let keyed = sealed(Some("job-1"));
        let rec = Stored {
            received_ms: 5,
            event: keyed.clone(),
            dup_of: None,
        };
        let got = Stored::decode(&rec.encode().unwrap()).unwrap();
        assert_eq!(got.event, keyed);
        assert_eq!(got.event.idem_key.as_deref(), Some("job-1"));
        got.event.verify().unwrap();
    }
}
