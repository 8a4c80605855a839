//! Raft's persistent state in our sled database (openraft storage-v2): the log
//! (`raft2_log`: big-endian index → bincode entry), vote / committed / purged
//! (`raft2_meta`), and the lock table, applied in memory and snapshotted to
//! `raft2_snapshot`. The `2` is the format: openraft with one leader per term
//! (feature `single-term-leader`), whose votes and log ids encode differently
//! from the earlier trees `raft_log`, `raft_meta`, `raft_snapshot`; those are
//! dropped at open (their leases are short-lived; the voters form again).
//!
//! Every write that openraft must find after a crash (vote, committed, log
//! entries, truncation, purge, snapshot) is made durable through
//! [`Durable::commit`] before the call returns or the log callback fires:
//! sled's flush (on Linux only `sync_file_range`, which leaves the file's
//! metadata and the disk's write cache) followed by an `fdatasync` of sled's
//! files. openraft sends a vote, or acknowledges entries, only after that.
// openraft's traits fix the error type (StorageError, over 200 bytes).
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{LockRequest, LockResponse, NodeId, PeerNode, TypeConfig};
use crate::codec::{self, CodecError};
use crate::durable::{Durable, What};
use crate::util::lock;

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    codec::encode(v)
}
/// Only our own bytes are decoded here; the limit is the codec's ceiling.
fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    codec::decode(b, codec::MAX_DECODE)
}

type SErr = StorageError<NodeId>;

fn rd<E: std::error::Error + 'static>(e: E) -> SErr {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}
fn wr<E: std::error::Error + 'static>(e: E) -> SErr {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}
fn key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

// ----------------------------------------------------------------------------------------- log

/// Log tree: key = big-endian index, value = bincode(Entry). Meta tree: "vote", "committed", "purged".
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    durable: Durable,
}

/// Trees of the current format (see the module comment).
pub const LOG_TREE: &str = "raft2_log";
pub const META_TREE: &str = "raft2_meta";
pub const SNAPSHOT_TREE: &str = "raft2_snapshot";
/// Trees of the earlier format (openraft's default leader id), dropped at open.
const OLD_TREES: [&str; 3] = ["raft_log", "raft_meta", "raft_snapshot"];

impl LogStore {
    pub fn open(durable: &Durable) -> sled::Result<Self> {
        let db = durable.db();
        let names = db.tree_names();
        for old in OLD_TREES {
            if names.iter().any(|n| n.as_ref() == old.as_bytes()) {
                db.drop_tree(old)?;
                tracing::warn!(
                    tree = old,
                    "dropped Raft state of the earlier format (before one leader per term); \
                     this voter rejoins with the current one"
                );
            }
        }
        Ok(Self {
            log: db.open_tree(LOG_TREE)?,
            meta: db.open_tree(META_TREE)?,
            durable: durable.clone(),
        })
    }
    fn get_meta<T: DeserializeOwned>(&self, k: &str) -> Result<Option<T>, SErr> {
        match self.meta.get(k).map_err(rd)? {
            Some(v) => Ok(Some(decode(&v).map_err(rd)?)),
            None => Ok(None),
        }
    }
    async fn put_meta<T: Serialize>(&self, k: &str, v: &T) -> Result<(), SErr> {
        self.meta.insert(k, encode(v).map_err(wr)?).map_err(wr)?;
        // Durable before returning: openraft sends a vote only after this.
        self.commit().await
    }
    async fn commit(&self) -> Result<(), SErr> {
        self.durable.commit_async(What::Raft).await.map_err(wr)
    }
}

impl LogStore {
    /// Write entries and make them durable. The outer error: nothing was
    /// written; the inner one: written but not durable (openraft learns it
    /// through `append`'s callback).
    async fn write_entries(
        &mut self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<std::io::Result<()>, SErr> {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&key(e.log_id.index), encode(&e).map_err(wr)?);
        }
        self.log.apply_batch(batch).map_err(wr)?; // readable now
        Ok(self
            .durable
            .commit_async(What::Raft)
            .await
            .map_err(std::io::Error::other))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.log.range(key(start)..) {
            let (k, v) = kv.map_err(rd)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
            if !range.contains(&idx) {
                break;
            }
            out.push(decode(&v).map_err(rd)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore; // cheap clone of sled::Tree handles

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("purged")?;
        let last = match self.log.last().map_err(rd)? {
            Some((_, v)) => Some(decode::<Entry<TypeConfig>>(&v).map_err(rd)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        self.put_meta("committed", &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Only once durable is openraft told (it acknowledges AppendEntries,
        // or counts the leader's own entries, after the callback fires).
        let res = self.write_entries(entries).await?;
        callback.log_io_completed(res);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        // delete [log_id.index, +inf)
        let keys: Vec<_> = self
            .log
            .range(key(log_id.index)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(wr)?;
        for k in keys {
            self.log.remove(k).map_err(wr)?;
        }
        self.commit().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        // record purged pointer first so get_log_state never sees a hole
        self.put_meta("purged", &log_id).await?;
        let keys: Vec<_> = self
            .log
            .range(..=key(log_id.index))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(wr)?;
        for k in keys {
            self.log.remove(k).map_err(wr)?;
        }
        self.commit().await
    }
}

// ------------------------------------------------------------------------------ state machine

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub holder: String,
    pub token: u64,
    pub ttl_ms: u64,
    /// The proposing leader's wall clock at the last grant or renewal, plus
    /// the TTL: for display, and the expiry of version-2 entries only.
    /// Whether a grant runs is decided by [`Leases`], never by this.
    pub expires_ms: u64,
    /// The log index of the last `Grant` or `Extend` of this lock (0 when
    /// its last change was a version-2 entry, or it came from a version-2
    /// snapshot). With the token and `expires_ms` it is the lock's version
    /// ([`Lock::version`]), what a [`LockRequest::Grant`] compares: a
    /// function of the log alone, so every replica agrees on it however it
    /// got its state (a snapshot of either version, or a replay).
    pub generation: u64,
}

impl Lock {
    /// What a `Grant` judged on this grant expects to find: any grant or
    /// renewal since changes it (a version-2 `Renew` changes `expires_ms`,
    /// a version-3 `Extend` the generation).
    pub fn version(&self) -> (u64, u64, u64) {
        (self.token, self.generation, self.expires_ms)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LockState {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, PeerNode>,
    pub locks: BTreeMap<String, Lock>,
}

/// The lock table as the previous release snapshotted it (no generation).
#[derive(Deserialize)]
struct LockStateV2 {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, PeerNode>,
    locks: BTreeMap<String, LockV2>,
}

#[derive(Deserialize)]
struct LockV2 {
    holder: String,
    token: u64,
    ttl_ms: u64,
    expires_ms: u64,
}

/// Prefix of a snapshot of this version of the table. A version-2 snapshot
/// starts with bincode's `Option` tag (0 or 1), never with this.
const SNAPSHOT_V3: &[u8; 8] = b"RMLOCK3\0";

impl LockState {
    fn encode_snapshot(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = SNAPSHOT_V3.to_vec();
        out.extend(encode(self)?);
        Ok(out)
    }

    fn decode_snapshot(b: &[u8]) -> Result<Self, CodecError> {
        if let Some(rest) = b.strip_prefix(SNAPSHOT_V3.as_slice()) {
            return decode(rest);
        }
        let old: LockStateV2 = decode(b)?;
        Ok(LockState {
            last_applied: old.last_applied,
            last_membership: old.last_membership,
            locks: old
                .locks
                .into_iter()
                .map(|(k, l)| {
                    let l = Lock {
                        holder: l.holder,
                        token: l.token,
                        ttl_ms: l.ttl_ms,
                        expires_ms: l.expires_ms,
                        generation: 0,
                    };
                    (k, l)
                })
                .collect(),
        })
    }

    /// Deterministic: no clock is read. The fencing token is the log index
    /// of the granting entry, so tokens strictly increase across all locks
    /// and terms. `Grant` and `Extend` carry the leader's judgement (made on
    /// its monotonic clock, [`Leases`]); `Acquire` and `Renew` (version 2)
    /// compare the wall time the proposing leader stamped, as they did.
    pub fn apply(&mut self, index: u64, req: &LockRequest) -> LockResponse {
        let denied = |l: &Lock, remaining_ms: u64| LockResponse::Denied {
            holder: l.holder.clone(),
            token: l.token,
            remaining_ms,
        };
        match req {
            LockRequest::Acquire {
                name,
                holder,
                ttl_ms,
                now_ms,
            } => {
                let mut expired = false;
                if let Some(l) = self.locks.get(name) {
                    if l.expires_ms > *now_ms {
                        return denied(l, l.expires_ms - now_ms);
                    }
                    expired = true;
                }
                let l = Lock {
                    holder: holder.clone(),
                    token: index,
                    ttl_ms: *ttl_ms,
                    expires_ms: now_ms.saturating_add(*ttl_ms),
                    generation: 0,
                };
                self.locks.insert(name.clone(), l);
                LockResponse::Granted {
                    token: index,
                    ttl_ms: *ttl_ms,
                    replaced_expired: expired,
                }
            }
            LockRequest::Renew {
                name,
                token,
                now_ms,
            } => match self.locks.get_mut(name) {
                Some(l) if l.token == *token && l.expires_ms > *now_ms => {
                    l.expires_ms = now_ms.saturating_add(l.ttl_ms);
                    l.generation = 0;
                    LockResponse::Granted {
                        token: l.token,
                        ttl_ms: l.ttl_ms,
                        replaced_expired: false,
                    }
                }
                _ => LockResponse::NotHolder,
            },
            LockRequest::Release { name, token } => match self.locks.get(name) {
                Some(l) if l.token == *token => {
                    self.locks.remove(name);
                    LockResponse::Released
                }
                _ => LockResponse::NotHolder,
            },
            LockRequest::Grant {
                name,
                holder,
                ttl_ms,
                expect,
                stamp_ms,
            } => {
                let current = self.locks.get(name);
                if current.map(Lock::version) != *expect {
                    // Renewed, released or granted since the leader judged:
                    // the caller retries and is judged again. (The remaining
                    // time is the leader's to fill in, from its leases.)
                    return match current {
                        Some(l) => denied(l, l.ttl_ms),
                        None => LockResponse::NotHolder,
                    };
                }
                let l = Lock {
                    holder: holder.clone(),
                    token: index,
                    ttl_ms: *ttl_ms,
                    expires_ms: stamp_ms.saturating_add(*ttl_ms),
                    generation: index,
                };
                self.locks.insert(name.clone(), l);
                LockResponse::Granted {
                    token: index,
                    ttl_ms: *ttl_ms,
                    replaced_expired: expect.is_some(),
                }
            }
            LockRequest::Extend {
                name,
                token,
                stamp_ms,
            } => match self.locks.get_mut(name) {
                Some(l) if l.token == *token => {
                    l.expires_ms = stamp_ms.saturating_add(l.ttl_ms);
                    l.generation = index;
                    LockResponse::Granted {
                        token: l.token,
                        ttl_ms: l.ttl_ms,
                        replaced_expired: false,
                    }
                }
                _ => LockResponse::NotHolder,
            },
        }
    }
}

/// When this agent applied each lock's last grant or renewal, on its
/// monotonic clock: the only time a lease is measured from
/// (proto-notes/leader.md, "Lock lifetimes"). Node-local, never replicated
/// or persisted. An entry is applied only after the holder sent the call
/// that made it, so on every agent `applied + ttl` comes after the holder's
/// own deadline (`sent + ttl`, minus its margin), whatever the wall clocks
/// say. Grants found in a snapshot or replayed at start count from then: a
/// restarted leader waits one whole TTL before taking a lock from anyone.
#[derive(Debug, Default)]
pub struct Leases {
    applied: BTreeMap<String, std::time::Instant>,
}

impl Leases {
    /// Record what an applied entry did to `name`'s lease.
    pub fn on_applied(&mut self, name: &str, resp: &LockResponse, now: std::time::Instant) {
        match resp {
            LockResponse::Granted { .. } => {
                self.applied.insert(name.to_string(), now);
            }
            LockResponse::Released => {
                self.applied.remove(name);
            }
            _ => {}
        }
    }

    /// Every lock of `state` counts from `now` (a snapshot installed or
    /// loaded: when its grants were made is not known here).
    pub fn reset(&mut self, state: &LockState, now: std::time::Instant) {
        self.applied = state.locks.keys().map(|k| (k.clone(), now)).collect();
    }

    /// What `l` (the grant in force for `name`) has left at `now`. A lock
    /// with no record counts as granted just now.
    pub fn remaining(&self, name: &str, l: &Lock, now: std::time::Instant) -> std::time::Duration {
        let from = self.applied.get(name).copied().unwrap_or(now);
        (from + std::time::Duration::from_millis(l.ttl_ms)).saturating_duration_since(now)
    }
}

fn lock_name(req: &LockRequest) -> &str {
    match req {
        LockRequest::Acquire { name, .. }
        | LockRequest::Renew { name, .. }
        | LockRequest::Release { name, .. }
        | LockRequest::Grant { name, .. }
        | LockRequest::Extend { name, .. } => name,
    }
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, PeerNode>,
    data: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct PersistedSnapshot {
    meta: SnapshotMeta<NodeId, PeerNode>,
    data: Vec<u8>,
}

/// In-memory state machine. Clone = shared handle (also used as the snapshot builder).
#[derive(Clone)]
pub struct LockStateMachine {
    pub state: Arc<Mutex<LockState>>,
    /// This agent's monotonic record of the leases ([`Leases`]).
    pub leases: Arc<Mutex<Leases>>,
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    snap_tree: sled::Tree,
    durable: Durable,
}

impl LockStateMachine {
    pub fn open(durable: &Durable) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let snap_tree = durable.db().open_tree(SNAPSHOT_TREE)?;
        let mut state = LockState::default();
        let mut snapshot = None;
        if let Some(b) = snap_tree.get("current")? {
            let p: PersistedSnapshot = decode(&b)?;
            state = LockState::decode_snapshot(&p.data)?;
            snapshot = Some(StoredSnapshot {
                meta: p.meta,
                data: p.data,
            });
        }
        let mut leases = Leases::default();
        leases.reset(&state, std::time::Instant::now());
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
            leases: Arc::new(Mutex::new(leases)),
            snapshot: Arc::new(Mutex::new(snapshot)),
            snap_tree,
            durable: durable.clone(),
        })
    }

    /// The lock table as applied here.
    pub fn locks(&self) -> Vec<(String, Lock)> {
        lock(&self.state)
            .locks
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    async fn persist_snapshot(&self, s: &StoredSnapshot) -> Result<(), SErr> {
        let sig = Some(s.meta.signature());
        let bytes = encode(&PersistedSnapshot {
            meta: s.meta.clone(),
            data: s.data.clone(),
        })
        .map_err(|e| StorageIOError::write_snapshot(sig.clone(), AnyError::new(&e)))?;
        self.snap_tree
            .insert("current", bytes)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), AnyError::new(&e)))?;
        self.durable
            .commit_async(What::Raft)
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig, AnyError::new(&e)))?;
        *lock(&self.snapshot) = Some(s.clone());
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for LockStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (data, last_log_id, last_membership) = {
            let st = lock(&self.state);
            let data = st
                .encode_snapshot()
                .map_err(|e| StorageIOError::read_state_machine(AnyError::new(&e)))?;
            (data, st.last_applied, st.last_membership.clone())
        };
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let s = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.persist_snapshot(&s).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for LockStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, PeerNode>), SErr> {
        let st = lock(&self.state);
        Ok((st.last_applied, st.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<LockResponse>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut st = lock(&self.state);
        let mut leases = lock(&self.leases);
        let mut out = Vec::new();
        for e in entries {
            st.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => LockResponse::Noop,
                EntryPayload::Normal(ref req) => {
                    let now = std::time::Instant::now();
                    let mut r = st.apply(e.log_id.index, req);
                    let name = lock_name(req);
                    leases.on_applied(name, &r, now);
                    if let (LockResponse::Denied { remaining_ms, .. }, Some(l)) =
                        (&mut r, st.locks.get(name))
                    {
                        if matches!(req, LockRequest::Grant { .. }) {
                            *remaining_ms =
                                (leases.remaining(name, l, now).as_millis() as u64).max(1);
                        }
                    }
                    r
                }
                EntryPayload::Membership(m) => {
                    st.last_membership = StoredMembership::new(Some(e.log_id), m);
                    LockResponse::Noop
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, PeerNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let new_state = LockState::decode_snapshot(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        let s = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.persist_snapshot(&s).await?;
        lock(&self.leases).reset(&new_state, std::time::Instant::now());
        *lock(&self.state) = new_state;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        Ok(lock(&self.snapshot).clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{blank_ent, log_id};
    use std::time::Duration;

    fn open() -> (tempfile::TempDir, Durable) {
        let d = tempfile::tempdir().unwrap();
        let db = sled::open(d.path()).unwrap();
        let dur = Durable::open(db, d.path(), Duration::from_secs(10), 0).unwrap();
        (d, dur)
    }

    /// Runs `f` and checks that exactly one Raft commit (flush + fdatasync)
    /// completed before it returned.
    async fn synced<T>(dur: &Durable, what: &str, f: impl std::future::Future<Output = T>) -> T {
        let before = dur.syncs(What::Raft);
        let out = f.await;
        assert_eq!(
            dur.syncs(What::Raft),
            before + 1,
            "{what} returned without a durable commit (sled flush + fdatasync) first"
        );
        out
    }

    #[tokio::test]
    async fn every_raft_write_is_synced_before_it_returns() {
        let (d, dur) = open();
        let mut log = LogStore::open(&dur).unwrap();
        for term in 1..=3 {
            let vote = Vote::new(term, 2);
            synced(&dur, "save_vote", log.save_vote(&vote))
                .await
                .unwrap();
            assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        }
        let entries: Vec<Entry<TypeConfig>> = (1..=5).map(|i| blank_ent(3, 2, i)).collect();
        synced(&dur, "append", log.write_entries(entries))
            .await
            .unwrap()
            .unwrap();
        synced(
            &dur,
            "save_committed",
            log.save_committed(Some(log_id(3, 2, 4))),
        )
        .await
        .unwrap();
        synced(&dur, "truncate", log.truncate(log_id(3, 2, 5)))
            .await
            .unwrap();
        // purge: its pointer, then the removal.
        let before = dur.syncs(What::Raft);
        log.purge(log_id(3, 2, 2)).await.unwrap();
        assert_eq!(
            dur.syncs(What::Raft),
            before + 2,
            "purge without its two commits"
        );
        let mut sm = LockStateMachine::open(&dur).unwrap();
        synced(&dur, "build_snapshot", sm.build_snapshot())
            .await
            .unwrap();
        // What was acknowledged is what a reopened store reads.
        drop((log, sm, dur));
        // The same open as the agent's: it waits for the lock sled's threads
        // let go of a moment after the last handle drops.
        let db = crate::store::open_sled(d.path(), 32 << 20).unwrap();
        let dur = Durable::open(db, d.path(), Duration::from_secs(10), 0).unwrap();
        let mut log = LogStore::open(&dur).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(3, 2, 4)));
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(3, 2, 2)));
        assert_eq!(st.last_log_id, Some(log_id(3, 2, 4)));
    }

    /// A snapshot written by the previous release (no generation, no
    /// prefix) still loads; this release's snapshots carry their prefix.
    #[test]
    fn a_version_2_snapshot_loads_and_version_3_round_trips() {
        #[derive(Serialize)]
        struct V2Lock {
            holder: String,
            token: u64,
            ttl_ms: u64,
            expires_ms: u64,
        }
        #[derive(Serialize)]
        struct V2 {
            last_applied: Option<LogId<NodeId>>,
            last_membership: StoredMembership<NodeId, PeerNode>,
            locks: BTreeMap<String, V2Lock>,
        }
        let old = V2 {
            last_applied: Some(log_id(4, 1, 9)),
            last_membership: StoredMembership::default(),
            locks: [(
                "promote".to_string(),
                V2Lock {
                    holder: "gpu-01".into(),
                    token: 7,
                    ttl_ms: 30_000,
                    expires_ms: 123,
                },
            )]
            .into(),
        };
        let st = LockState::decode_snapshot(&encode(&old).unwrap()).unwrap();
        assert_eq!(st.last_applied, Some(log_id(4, 1, 9)));
        let l = &st.locks["promote"];
        assert_eq!(
            (
                l.holder.as_str(),
                l.token,
                l.ttl_ms,
                l.expires_ms,
                l.generation
            ),
            ("gpu-01", 7, 30_000, 123, 0)
        );
        let mut st2 = st.clone();
        st2.locks.get_mut("promote").unwrap().generation = 5;
        let b = st2.encode_snapshot().unwrap();
        assert!(b.starts_with(SNAPSHOT_V3));
        assert_eq!(
            LockState::decode_snapshot(&b).unwrap().locks["promote"],
            st2.locks["promote"]
        );
    }
}
