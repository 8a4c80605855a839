//! Blob sync: content-addressed files moved between agents over
//! `/riftmesh/sync/1` (proto-notes/sync.md).
//!
//! - [`store`]: the files and their records (blocking; used off the async threads).
//! - [`sched`]: which chunk to ask of which source next (sans-IO).
//! - this module: names from events, wants, transfers, serving peers,
//!   placement, garbage collection.

pub mod objects;
pub use objects as store; // rename pending
pub mod sched;
pub mod sha;
pub mod source;
pub mod whole;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};

use crate::codec;
use crate::event::{Draft, TypePattern};
use crate::metrics::label;
use crate::net::{BlobInbound, MAX_BLOB_REQUEST, MAX_BLOB_RESPONSE};
use crate::node::Node;
use sched::Sched;
pub use store::{hex_id, parse_id, BlobId, BlobStore, Manifest, NameRecord};
use store::{Bitmap, BlobError};

/// Event types that point a name at a blob (payload [`Naming`]).
pub const NAMING_TYPES: [&str; 3] = ["BLOB_PUBLISHED", "MODEL_PROMOTED", "GAME_BATCH_READY"];

/// Payload of a naming event.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Naming {
    pub name: String,
    pub blob: String,
    pub size: u64,
    pub root: String,
    /// When this naming was made (ms since the epoch), set by `blob add`:
    /// each add is a new fact, so naming a version again (a rollback to an
    /// earlier model) publishes a new event instead of being answered as
    /// a duplicate of the first naming (proto-notes/events.md). Optional:
    /// by-reference naming events without it are read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_ms: Option<u64>,
}

/// What a local publish of `event_type` with `payload` means to blob
/// transfer: `Ok(None)` a naming event (or not a naming type), `Ok(Some(w))`
/// a naming type without a blob reference (no `blob` field: a plain event;
/// nothing will be transferred: `w` says so), `Err` a blob reference that
/// is malformed (naming the field, with an example).
pub fn check_naming_payload(
    event_type: &str,
    payload: &serde_json::Value,
) -> Result<Option<String>, String> {
    if !NAMING_TYPES.contains(&event_type) {
        return Ok(None);
    }
    let refers = payload.as_object().is_some_and(|o| o.contains_key("blob"));
    if !refers {
        return Ok(Some(format!(
            "{event_type} carries no blob reference (name, blob, size, root): it is delivered as a plain event and nothing is transferred; to distribute a file, use `riftmesh blob add FILE --name NAME --event {event_type}` (or POST /v1/blobs/upload)"
        )));
    }
    let example =
        r#"{"name": "models/hex8_2p", "blob": "<64 hex>", "size": 1048576, "root": "<64 hex>"}"#;
    let n: Naming = serde_json::from_value(payload.clone())
        .map_err(|e| format!("{event_type} blob reference: {e}; expected e.g. {example}"))?;
    for (field, v) in [("blob", &n.blob), ("root", &n.root)] {
        if parse_id(v).is_none() {
            return Err(format!(
                "{event_type} blob reference: {field} {v:?} is not 64 hex digits; expected e.g. {example}"
            ));
        }
    }
    check_name(&n.name).map_err(|e| format!("{event_type} blob reference: name: {e}"))?;
    Ok(None)
}

pub use crate::config::{check_name, SyncConfig, Want};

// ---- wire (`/riftmesh/sync/1`, bodies in raw frames, proto-notes/sync.md) ----

/// Most blob ids in one `Have` request.
pub const MAX_HAVE_IDS: usize = 256;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Request {
    /// Which of these blobs do you hold, and which chunks?
    Have {
        blobs: Vec<BlobId>,
    },
    Manifest {
        blob: BlobId,
    },
    Chunk {
        blob: BlobId,
        index: u32,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Held {
    pub blob: BlobId,
    /// None: the whole blob.
    pub chunks: Option<Bitmap>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Response {
    Have {
        held: Vec<Held>,
    },
    Manifest(Manifest),
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    NotFound,
    /// Too many uploads at once here: ask again later or elsewhere.
    Busy {
        retry_ms: u32,
    },
    Refused {
        reason: String,
    },
}

// ---- status ----

#[derive(Serialize, Clone, Debug)]
pub struct TransferView {
    pub blob: String,
    pub names: Vec<String>,
    pub size: u64,
    pub have_bytes: u64,
    pub chunks: usize,
    pub chunks_have: usize,
    pub rate_bytes_per_sec: f64,
    pub eta_secs: Option<f64>,
    pub sources: Vec<String>,
    pub state: String,
    pub started_ms: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct FailureView {
    pub blob: String,
    pub names: Vec<String>,
    pub reason: String,
    pub at_ms: u64,
}

struct Transfer {
    names: Vec<String>,
    size: u64,
    root: [u8; 32],
    view: TransferView,
    started: Instant,
    /// Someone waits for it (`blob get`), wanted or not.
    wake: Arc<Notify>,
    /// The id of the naming event that caused it ("" for a repair): the
    /// correlation and parent id of the sync events it leads to.
    cause: String,
}

/// The sync event types of a name (proto-notes/sync.md, "Events"): models
/// are distributed, everything else is data that is synced.
/// A model's distribution has no start event (the seeds have none).
fn sync_event(name: &str, what: SyncStep) -> Option<&'static str> {
    let model = name.starts_with("models/");
    Some(match (model, what) {
        (true, SyncStep::Started) => return None,
        (true, SyncStep::Completed) => "MODEL_DISTRIBUTED",
        (true, SyncStep::Failed) => "MODEL_DISTRIBUTION_FAILED",
        (false, SyncStep::Started) => "DATA_SYNC_STARTED",
        (false, SyncStep::Completed) => "DATA_SYNC_COMPLETED",
        (false, SyncStep::Failed) => "DATA_SYNC_FAILED",
    })
}

#[derive(Clone, Copy)]
enum SyncStep {
    Started,
    Completed,
    Failed,
}

/// Publish a sync event caused by the naming event `cause`.
async fn publish_sync(
    node: &Arc<Node>,
    ty: Option<&str>,
    payload: &serde_json::Value,
    cause: &str,
) {
    let Some(ty) = ty else {
        return;
    };
    let link = (!cause.is_empty()).then(|| cause.to_string());
    match Draft::new(
        ty,
        payload,
        Some("riftmesh/sync".into()),
        link.clone(),
        link,
    ) {
        Ok(d) => {
            if let Err(e) = node.publish(vec![d]).await {
                tracing::warn!(error = %e, "cannot publish {ty}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot build {ty}"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A byte-rate limit: a token bucket of 1 KiB cells holding one second.
pub struct Limiter {
    bucket: governor::DefaultDirectRateLimiter,
    burst: u32,
}

fn limiter(rate: u64) -> Option<Arc<Limiter>> {
    let kib = u32::try_from(rate / 1024).unwrap_or(u32::MAX);
    NonZeroU32::new(kib).map(|r| {
        Arc::new(Limiter {
            bucket: governor::RateLimiter::direct(governor::Quota::per_second(r)),
            burst: r.get(),
        })
    })
}

/// Wait until `bytes` may pass.
async fn take(l: &Option<Arc<Limiter>>, bytes: u64) {
    let Some(l) = l else { return };
    let mut kib = bytes.div_ceil(1024);
    while kib > 0 {
        let step = kib.min(u64::from(l.burst));
        if let Some(n) = NonZeroU32::new(step as u32) {
            if l.bucket.until_n_ready(n).await.is_err() {
                return;
            }
        }
        kib -= step;
    }
}

/// Blob sync on one agent.
pub struct Blobs {
    pub store: Arc<BlobStore>,
    pub cfg: SyncConfig,
    transfers: Mutex<HashMap<BlobId, Transfer>>,
    failures: Mutex<Vec<FailureView>>,
    slots: Arc<Semaphore>,
    uploads: Arc<Semaphore>,
    up: Option<Arc<Limiter>>,
    down: Option<Arc<Limiter>>,
    my_tags: Vec<(String, String)>,
    /// The log position up to which every naming event has been recorded
    /// as a name (the API waits on it, so that a name is known as soon as
    /// its event can be read).
    names_seen: tokio::sync::watch::Sender<u64>,
}

/// Most chunk uploads served at once; more get `Busy`.
const MAX_UPLOADS: usize = 32;
/// A chunk request not answered in this time counts as a failure of its source.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a transfer asks its peers who holds what.
const SOURCE_REFRESH: Duration = Duration::from_millis(500);
/// A transfer with no source and nothing in flight for this long fails.
const STALL: Duration = Duration::from_secs(60);
/// Longest time verified chunks wait to be made durable and recorded; also
/// how often the transfer's status is refreshed.
const CHECKPOINT: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Blobs {
    pub fn open(
        dir: &Path,
        durable: &crate::durable::Durable,
        cfg: SyncConfig,
        tags: &[(String, String)],
    ) -> Result<Blobs, BlobError> {
        let store = Arc::new(BlobStore::open(dir, durable)?);
        Ok(Blobs {
            store,
            slots: Arc::new(Semaphore::new(cfg.transfers.max(1))),
            uploads: Arc::new(Semaphore::new(MAX_UPLOADS)),
            up: limiter(cfg.upload_rate),
            down: limiter(cfg.download_rate),
            cfg,
            transfers: Mutex::new(HashMap::new()),
            failures: Mutex::new(Vec::new()),
            my_tags: tags.to_vec(),
            names_seen: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Does this want apply to this host (its tags)?
    pub fn want_applies(&self, w: &Want) -> bool {
        w.if_tags
            .iter()
            .all(|(k, v)| self.my_tags.iter().any(|(a, b)| a == k && b == v))
    }

    /// The first want that covers `name` on this host.
    pub fn want_for(&self, name: &str) -> Option<&Want> {
        self.cfg
            .wants
            .iter()
            .find(|w| w.matches(name).is_some() && self.want_applies(w))
    }

    /// Whether a transfer (a fetch or a repair) of `blob` is under way.
    pub fn fetching(&self, blob: &BlobId) -> bool {
        lock(&self.transfers).contains_key(blob)
    }

    pub fn transfers(&self) -> Vec<TransferView> {
        let mut v: Vec<TransferView> = lock(&self.transfers)
            .values()
            .map(|t| t.view.clone())
            .collect();
        v.sort_by_key(|t| t.started_ms);
        v
    }

    pub fn failures(&self) -> Vec<FailureView> {
        lock(&self.failures).clone()
    }

    /// Wait (at most `limit`) until every naming event up to log position
    /// `seq` has been recorded as a name.
    pub async fn names_caught_up(&self, seq: u64, limit: Duration) -> bool {
        let mut rx = self.names_seen.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|s| *s >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Resolve a blob id or a name.
    pub fn resolve(&self, r: &str) -> Result<Option<(BlobId, Option<NameRecord>)>, BlobError> {
        if let Some(id) = parse_id(r) {
            return Ok(Some((id, None)));
        }
        Ok(self.store.name(r)?.map(|n| (n.blob, Some(n))))
    }
}

// ---- serving peers ----

pub async fn serve_peers(node: Arc<Node>, mut inbound: tokio::sync::mpsc::Receiver<BlobInbound>) {
    while let Some(msg) = inbound.recv().await {
        let node = node.clone();
        tokio::spawn(async move {
            let body = match serve(&node, msg.peer, &msg.request).await {
                Served::Encoded(bytes) => bytes,
                Served::Value(resp) => codec::encode(&resp).unwrap_or_default(),
            };
            node.net.blob_respond(msg.channel, body).await;
        });
    }
}

/// An answer to a peer: a value to encode, or a chunk answer already in its
/// wire form (read from disk straight behind its header, so the megabyte is
/// not copied again to encode it).
enum Served {
    Value(Response),
    Encoded(Vec<u8>),
}

/// The encoding of `Response::Chunk` up to its data: the variant tag and
/// the data's varint length (unit-tested against `codec::encode`).
fn chunk_answer_header(len: usize) -> Vec<u8> {
    let mut h = vec![CHUNK_TAG];
    h.extend(codec::encode(&(len as u64)).unwrap_or_default());
    h
}

/// A buffer for a chunk answer of `len` data bytes, its header written:
/// (buffer, where the data goes).
fn chunk_answer_buf(len: usize) -> (Vec<u8>, usize) {
    let h = chunk_answer_header(len);
    let mut b = crate::bufpool::CHUNKS.take_len(h.len() + len);
    b[..h.len()].copy_from_slice(&h);
    (b, h.len())
}

async fn serve(node: &Arc<Node>, peer: PeerId, body: &[u8]) -> Served {
    let b = &node.blobs;
    let served = |kind: &str, result: &str| {
        node.metrics
            .sync_served
            .get_or_create(&vec![
                ("kind", kind.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
    };
    let req: Request = match codec::decode(body, MAX_BLOB_REQUEST) {
        Ok(r) => r,
        Err(e) => {
            node.metrics
                .events_rejected
                .get_or_create(&label("reason", "blob_decode"))
                .inc();
            tracing::warn!(%peer, error = %e, "blob sync request refused");
            return Served::Value(Response::Refused {
                reason: format!("undecodable request: {e}"),
            });
        }
    };
    Served::Value(match req {
        Request::Have { blobs } => {
            if blobs.len() > MAX_HAVE_IDS {
                served("have", "refused");
                return Served::Value(Response::Refused {
                    reason: format!("at most {MAX_HAVE_IDS} ids per request"),
                });
            }
            let store = b.store.clone();
            let held = tokio::task::spawn_blocking(move || {
                blobs
                    .into_iter()
                    .filter_map(|id| {
                        let meta = store.meta(&id).ok()??;
                        if meta.complete {
                            Some(Held {
                                blob: id,
                                chunks: None,
                            })
                        } else {
                            // Even with no chunk yet: the asker learns
                            // it is not the only receiver (its chunk order
                            // stays shuffled, see sched).
                            let have = store.have(&id).ok()??;
                            Some(Held {
                                blob: id,
                                chunks: Some(have),
                            })
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            served("have", "ok");
            Response::Have { held }
        }
        Request::Manifest { blob } => {
            let store = b.store.clone();
            match tokio::task::spawn_blocking(move || store.manifest(&blob)).await {
                Ok(Ok(Some(m))) => {
                    served("manifest", "ok");
                    Response::Manifest((*m).clone())
                }
                Ok(Ok(None)) => {
                    served("manifest", "not_found");
                    Response::NotFound
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read a manifest");
                    Response::Refused {
                        reason: "store error".into(),
                    }
                }
                Err(_) => Response::Refused {
                    reason: "store error".into(),
                },
            }
        }
        Request::Chunk { blob, index } => {
            let Ok(_permit) = b.uploads.clone().try_acquire_owned() else {
                served("chunk", "busy");
                return Served::Value(Response::Busy { retry_ms: 200 });
            };
            let store = b.store.clone();
            let res = tokio::task::spawn_blocking(move || {
                store.read_verified_chunk_after(&blob, index, chunk_answer_buf)
            })
            .await;
            match res {
                Ok(Ok((answer, data_len, hashed))) => {
                    node.metrics
                        .sync_serve_checks
                        .get_or_create(&label("check", if hashed { "hashed" } else { "vouched" }))
                        .inc();
                    take(&b.up, data_len as u64).await;
                    tracing::trace!(%peer, chunk = index, "chunk served");
                    count_bytes(node, peer, "out", data_len as u64);
                    served("chunk", "ok");
                    return Served::Encoded(answer);
                }
                Ok(Err(e @ BlobError::DamagedChunk { .. })) => {
                    local_damage(node, blob, &e, "serving it to a peer");
                    served("chunk", "damaged");
                    Response::NotFound
                }
                Ok(Err(BlobError::NotHeld(_))) | Ok(Err(BlobError::Invalid(_))) => {
                    served("chunk", "not_found");
                    Response::NotFound
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read a chunk to serve");
                    served("chunk", "error");
                    Response::Refused {
                        reason: "store error".into(),
                    }
                }
                Err(_) => Response::Refused {
                    reason: "store error".into(),
                },
            }
        }
    })
}

fn count_bytes(node: &Node, peer: PeerId, direction: &str, n: u64) {
    node.metrics
        .sync_bytes
        .get_or_create(&label("direction", direction))
        .inc_by(n);
    node.metrics
        .sync_peer_bytes
        .get_or_create(&vec![
            ("peer", peer.to_base58()),
            ("direction", direction.to_string()),
        ])
        .inc_by(n);
}

/// A stored copy failed verification while `doing` something with it:
/// counted (`riftmesh_sync_chunks_rejected_total{reason="local_damage"}`),
/// logged with the file's path, and repaired from peers.
pub fn local_damage(node: &Arc<Node>, blob: BlobId, e: &BlobError, doing: &str) {
    node.metrics
        .sync_chunks_rejected
        .get_or_create(&label("reason", "local_damage"))
        .inc();
    tracing::error!(error = %e, doing, "a stored blob is damaged; not using it, repairing it from peers");
    tokio::spawn(repair(node.clone(), blob));
}

/// A stored copy failed verification: find every damaged chunk, forget them,
/// and fetch them again from peers (checked against our manifest, whose root
/// was checked when the blob was stored).
pub async fn repair(node: Arc<Node>, blob: BlobId) {
    if lock(&node.blobs.transfers).contains_key(&blob) {
        return;
    }
    let store = node.blobs.store.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<_, BlobError> {
        let bad = store.scrub(&blob)?;
        if !bad.is_empty() {
            store.demote(&blob, &bad)?;
        }
        let meta = store.meta(&blob)?;
        let names: Vec<String> = store
            .names()?
            .into_iter()
            .filter(|(_, r)| r.blob == blob)
            .map(|(n, _)| n)
            .collect();
        Ok((bad, meta, names))
    })
    .await;
    match r {
        Ok(Ok((bad, Some(meta), names))) if !bad.is_empty() => {
            tracing::warn!(blob = %hex_id(&blob), chunks = ?bad, "damaged chunks forgotten; fetching them again");
            let rec = NameRecord {
                blob,
                size: meta.size,
                root: meta.root,
                ts_ms: 0,
                event_hash: [0; 32],
                event_id: String::new(),
                event_type: String::new(),
                origin: "riftmesh/repair".into(),
            };
            want(&node, blob, rec, names);
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(blob = %hex_id(&blob), error = %e, "cannot repair a damaged blob")
        }
        Err(e) => tracing::error!(error = %e, "repair task failed"),
    }
}

// ---- asking peers ----

async fn ask(node: &Node, peer: PeerId, req: &Request) -> Result<Response, String> {
    match ask_raw(node, peer, req).await? {
        Answer::Chunk(buf, range) => {
            let data = buf[range].to_vec();
            crate::bufpool::CHUNKS.give(buf);
            Ok(Response::Chunk(data))
        }
        Answer::Other(r) => Ok(r),
    }
}

/// An answer as it came off the wire: a chunk stays in the buffer the
/// transport read it into (no copy of the megabyte), anything else decoded.
enum Answer {
    Chunk(Vec<u8>, std::ops::Range<usize>),
    Other(Response),
}

/// `Response::Chunk`'s variant index, the first byte of its encoding.
const CHUNK_TAG: u8 = 2;

/// Decode an answer; a chunk answer is recognised by its tag and its bytes
/// are located inside `buf` rather than copied out. The result is exactly
/// what `codec::decode::<Response>` would give (unit-tested).
fn decode_answer(buf: Vec<u8>) -> Result<Answer, codec::CodecError> {
    #[derive(Deserialize)]
    struct Data<'a>(#[serde(borrow)] &'a [u8]);
    if buf.first() == Some(&CHUNK_TAG) {
        let body = &buf[1..];
        let Data(data) = codec::decode_borrowed::<Data>(body, MAX_BLOB_RESPONSE)?;
        let start = data.as_ptr() as usize - buf.as_ptr() as usize;
        let range = start..start + data.len();
        return Ok(Answer::Chunk(buf, range));
    }
    codec::decode::<Response>(&buf, MAX_BLOB_RESPONSE).map(Answer::Other)
}

async fn ask_raw(node: &Node, peer: PeerId, req: &Request) -> Result<Answer, String> {
    let body = codec::encode(req).map_err(|e| e.to_string())?;
    let resp = node
        .net
        .blob_request(peer, body)
        .await
        .map_err(|e| e.to_string())?;
    decode_answer(resp).map_err(|e| {
        node.metrics
            .events_rejected
            .get_or_create(&label("reason", "blob_decode"))
            .inc();
        format!("undecodable answer: {e}")
    })
}

/// Ask every connected peer which of `blobs` it holds.
async fn who_has(node: &Node, blob: BlobId) -> Vec<(PeerId, Option<Bitmap>)> {
    let peers = node.membership.connected_peers();
    let req = Request::Have { blobs: vec![blob] };
    let futs = peers.into_iter().map(|p| {
        let req = req.clone();
        async move {
            let r = tokio::time::timeout(Duration::from_secs(5), ask(node, p, &req)).await;
            match r {
                Ok(Ok(Response::Have { held })) => held
                    .into_iter()
                    .find(|h| h.blob == blob)
                    .map(|h| (p, h.chunks)),
                _ => None,
            }
        }
    });
    futures::future::join_all(futs)
        .await
        .into_iter()
        .flatten()
        .collect()
}

// ---- names from events, wants, fetches ----

/// Start blob sync: serving peers, following naming events, garbage collection.
pub fn start(node: Arc<Node>, inbound: tokio::sync::mpsc::Receiver<BlobInbound>) {
    tokio::spawn(serve_peers(node.clone(), inbound));
    tokio::spawn(follow_names(node.clone()));
    tokio::spawn(gc_loop(node));
}

async fn follow_names(node: Arc<Node>) {
    let patterns: Vec<TypePattern> = NAMING_TYPES
        .iter()
        .filter_map(|t| TypePattern::parse(t).ok())
        .collect();
    let mut head = node.store.watch_head();
    let mut cursor = 0;
    // Names already recorded whose blob is missing or not placed (a restart).
    resume_wants(&node).await;
    loop {
        let upto = *head.borrow_and_update();
        loop {
            let Ok((batch, last)) = node.store.read_after(cursor, 256, 20_000, &patterns) else {
                break;
            };
            for (_, s) in batch {
                let Ok(n) = serde_json::from_str::<Naming>(&s.event.payload) else {
                    continue;
                };
                let (Some(blob), Some(root)) = (parse_id(&n.blob), parse_id(&n.root)) else {
                    continue;
                };
                if check_name(&n.name).is_err() {
                    continue;
                }
                let rec = NameRecord {
                    blob,
                    size: n.size,
                    root,
                    ts_ms: s.event.ts_ms,
                    event_hash: s.event.hash,
                    event_id: s.event.id.clone(),
                    event_type: s.event.event_type.clone(),
                    origin: s.event.origin.clone().unwrap_or_default(),
                };
                let store = node.blobs.store.clone();
                let name = n.name.clone();
                let r2 = rec.clone();
                let changed = tokio::task::spawn_blocking(move || store.set_name(&name, &r2))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                if changed.is_some() {
                    tracing::info!(name = %n.name, blob = %n.blob, size = n.size, "name updated");
                    if node.blobs.want_for(&n.name).is_some() {
                        want(&node, blob, rec, vec![n.name.clone()]);
                    }
                }
            }
            if last == cursor {
                break;
            }
            cursor = last;
        }
        node.blobs.names_seen.send_if_modified(|s| {
            let grew = upto > *s;
            *s = (*s).max(upto);
            grew
        });
        if head.changed().await.is_err() {
            return;
        }
    }
}

async fn resume_wants(node: &Arc<Node>) {
    let store = node.blobs.store.clone();
    let Ok(Ok(names)) = tokio::task::spawn_blocking(move || store.names()).await else {
        return;
    };
    for (name, rec) in names {
        if node.blobs.want_for(&name).is_some() {
            want(node, rec.blob, rec, vec![name]);
        }
    }
}

/// Make sure `blob` is here and placed for `names`: fetch it if missing.
/// Returns a notifier that fires when the transfer ends.
pub fn want(node: &Arc<Node>, blob: BlobId, rec: NameRecord, names: Vec<String>) -> Arc<Notify> {
    let b = &node.blobs;
    let mut t = lock(&b.transfers);
    if let Some(tr) = t.get_mut(&blob) {
        for n in names {
            if !tr.names.contains(&n) {
                tr.names.push(n);
            }
        }
        tr.view.names = tr.names.clone();
        return tr.wake.clone();
    }
    let wake = Arc::new(Notify::new());
    t.insert(
        blob,
        Transfer {
            names: names.clone(),
            size: rec.size,
            root: rec.root,
            view: TransferView {
                blob: hex_id(&blob),
                names,
                size: rec.size,
                have_bytes: 0,
                chunks: 0,
                chunks_have: 0,
                rate_bytes_per_sec: 0.0,
                eta_secs: None,
                sources: Vec::new(),
                state: "queued".into(),
                started_ms: now_ms(),
            },
            started: Instant::now(),
            wake: wake.clone(),
            cause: rec.event_id.clone(),
        },
    );
    drop(t);
    let node = node.clone();
    tokio::spawn(async move {
        let result = run_transfer(&node, blob).await;
        finish(&node, blob, result).await;
    });
    wake
}

fn update_view(node: &Node, blob: &BlobId, f: impl FnOnce(&mut TransferView)) {
    if let Some(t) = lock(&node.blobs.transfers).get_mut(blob) {
        f(&mut t.view);
    }
}

/// Fetch one blob (if not held) under the transfer limit. `Ok(true)`: it was
/// fetched now; `Ok(false)`: it was here already (only placement is left).
async fn run_transfer(node: &Arc<Node>, blob: BlobId) -> Result<bool, String> {
    let b = &node.blobs;
    let store = b.store.clone();
    let complete = tokio::task::spawn_blocking(move || store.is_complete(&blob))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if complete {
        return Ok(false);
    }
    let _slot = b
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| "shutting down".to_string())?;
    let (size, root, names, cause) = {
        let t = lock(&b.transfers);
        let tr = t.get(&blob).ok_or("transfer vanished")?;
        (tr.size, tr.root, tr.names.clone(), tr.cause.clone())
    };
    for name in &names {
        let payload = json!({
            "name": name, "blob": hex_id(&blob), "size": size, "host": node.cfg.name,
        });
        publish_sync(node, sync_event(name, SyncStep::Started), &payload, &cause).await;
    }
    node.metrics.sync_active.inc();
    let r = fetch(node, blob, size, root).await;
    node.metrics.sync_active.dec();
    r.map(|()| true)
}

/// Check the disk budget and the free space for `size` more bytes.
async fn check_space(node: &Node, blob: &BlobId, size: u64) -> Result<(), String> {
    let store = node.blobs.store.clone();
    let id = *blob;
    let already =
        tokio::task::spawn_blocking(move || store.meta(&id).ok().flatten().map_or(0, |m| m.size))
            .await
            .map_err(|e| e.to_string())?;
    check_room(node, size.saturating_sub(already)).await
}

/// Check the disk budget and the free space for `need` more bytes (an
/// upload: bytes not in the store yet).
pub(crate) async fn check_room(node: &Node, need: u64) -> Result<(), String> {
    let b = &node.blobs;
    let store = b.store.clone();
    let used = tokio::task::spawn_blocking(move || store.used_bytes().unwrap_or(0))
        .await
        .map_err(|e| e.to_string())?;
    if b.cfg.budget > 0 && used + need > b.cfg.budget {
        return Err(format!(
            "disk budget: {} bytes held + {} needed > blob_budget {}",
            used, need, b.cfg.budget
        ));
    }
    let dir = node.cfg.data_dir.clone();
    let free = tokio::task::spawn_blocking(move || crate::membership::health::free_bytes(&dir))
        .await
        .ok()
        .flatten();
    if let Some(free) = free {
        if free < need + b.cfg.reserve {
            return Err(format!(
                "disk space: {free} bytes free on the data directory's filesystem, {need} needed plus {} kept free (blob_reserve)",
                b.cfg.reserve
            ));
        }
    }
    Ok(())
}

enum ChunkDone {
    Ok,
    Bad(&'static str),
    Failed(String),
    Busy,
    Missing,
}

async fn fetch(node: &Arc<Node>, blob: BlobId, size: u64, root: [u8; 32]) -> Result<(), String> {
    let b = &node.blobs;
    update_view(node, &blob, |v| v.state = "finding sources".into());
    // Sources and the manifest.
    let mut last_seen_source = Instant::now();
    let (manifest, mut sources) = loop {
        let found = who_has(node, blob).await;
        let mut got = None;
        for (p, _) in &found {
            if let Ok(Response::Manifest(m)) = ask(node, *p, &Request::Manifest { blob }).await {
                if m.root() == root && m.size == size && m.check().is_ok() {
                    got = Some(m);
                    break;
                }
                node.metrics
                    .sync_chunks_rejected
                    .get_or_create(&label("reason", "manifest"))
                    .inc();
                tracing::warn!(peer = %p, blob = %hex_id(&blob), "a peer served a manifest that does not match the signed root");
            }
        }
        if let Some(m) = got {
            break (m, found);
        }
        if !found.is_empty() {
            last_seen_source = Instant::now();
        }
        if last_seen_source.elapsed() > STALL {
            return Err(format!(
                "no connected peer holds blob {} (asked for {}s)",
                hex_id(&blob),
                STALL.as_secs()
            ));
        }
        tokio::time::sleep(SOURCE_REFRESH).await;
    };
    check_space(node, &blob, size).await?;
    let fetch_started = Instant::now();
    let store = b.store.clone();
    let m2 = manifest.clone();
    let have = tokio::task::spawn_blocking(move || store.begin_partial(&blob, &m2))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let n = manifest.chunks.len();
    let mut sched = Sched::new(have.clone(), b.cfg.per_source, rand::random());
    let mut durable = have;
    let now = Instant::now();
    // Whether another peer fetches this blob too: decided at the first
    // source refresh (every receiver of a fan-out has begun by then).
    let mut others = false;
    let mut order_decided = false;
    for (p, chunks) in sources.drain(..) {
        others |= chunks.is_some();
        sched.source(p, chunks, now);
    }
    if sched.have().count() > 0 {
        tracing::info!(blob = %hex_id(&blob), held = sched.have().count(), chunks = n, "resuming a fetch");
    }
    let manifest = Arc::new(manifest);
    // The whole-file hash follows the arrivals (see whole.rs).
    let whole = Arc::new(whole::WholeHash::new(
        b.store.partial_path(&blob),
        manifest.clone(),
        &durable,
    ));
    let mut inflight = FuturesUnordered::new();
    // A checkpoint (fsync + bitmap) and a source refresh run beside the
    // chunk pipeline, never in front of it.
    let mut ckpt: Option<(tokio::task::JoinHandle<Result<(), BlobError>>, Bitmap)> = None;
    let mut refresh: Option<tokio::task::JoinHandle<Sources>> = None;
    let mut last_refresh = Instant::now();
    let mut last_ckpt = Instant::now();
    let mut last_progress = Instant::now();
    let mut window: Vec<(Instant, u64)> = Vec::new();
    update_view(node, &blob, |v| {
        v.state = "fetching".into();
        v.chunks = n;
    });
    while !sched.have().is_full() {
        let now = Instant::now();
        for (peer, idx) in sched.assign(now) {
            let node = node.clone();
            let m = manifest.clone();
            let whole = whole.clone();
            inflight.push(async move {
                take(&node.blobs.down, m.chunk_len(idx)).await;
                let r = tokio::time::timeout(
                    CHUNK_TIMEOUT,
                    ask_raw(&node, peer, &Request::Chunk { blob, index: idx }),
                )
                .await;
                let done = match r {
                    Err(_) => ChunkDone::Failed("timed out".into()),
                    Ok(Err(e)) => ChunkDone::Failed(e),
                    Ok(Ok(Answer::Chunk(buf, range))) => {
                        if range.len() as u64 != m.chunk_len(idx) {
                            ChunkDone::Bad("size")
                        } else {
                            let store = node.blobs.store.clone();
                            let want = m.chunks[idx as usize];
                            let off = m.offset(idx);
                            tokio::task::spawn_blocking(move || {
                                let data = &buf[range.clone()];
                                let (ok, hashed) = whole.check(idx, data, &want);
                                if !ok {
                                    crate::bufpool::CHUNKS.give(buf);
                                    return ChunkDone::Bad("hash");
                                }
                                match store.write_chunk(&blob, off, data) {
                                    Ok(()) => {
                                        if hashed {
                                            crate::bufpool::CHUNKS.give(buf);
                                        } else {
                                            whole.offer(idx, buf, range.start);
                                        }
                                        ChunkDone::Ok
                                    }
                                    Err(e) => {
                                        crate::bufpool::CHUNKS.give(buf);
                                        ChunkDone::Failed(format!("local write: {e}"))
                                    }
                                }
                            })
                            .await
                            .unwrap_or_else(|e| ChunkDone::Failed(e.to_string()))
                        }
                    }
                    Ok(Ok(Answer::Other(Response::Busy { .. }))) => ChunkDone::Busy,
                    Ok(Ok(Answer::Other(Response::NotFound))) => ChunkDone::Missing,
                    Ok(Ok(Answer::Other(other))) => {
                        ChunkDone::Failed(format!("unexpected answer {other:?}"))
                    }
                };
                (peer, idx, done)
            });
        }
        let tick = tokio::time::sleep(Duration::from_millis(250));
        tokio::select! {
            Some((peer, idx, done)) = inflight.next(), if !inflight.is_empty() => {
                let now = Instant::now();
                match done {
                    ChunkDone::Ok => {
                        let len = manifest.chunk_len(idx);
                        sched.on_ok(peer, idx);
                        count_bytes(node, peer, "in", len);
                        window.push((now, len));
                        last_progress = now;
                    }
                    ChunkDone::Bad(reason) => {
                        node.metrics.sync_chunks_rejected.get_or_create(&label("reason", reason)).inc();
                        tracing::warn!(%peer, blob = %hex_id(&blob), chunk = idx, reason, "a peer served a chunk that fails verification; fetching it elsewhere");
                        sched.on_bad(peer, idx, now);
                    }
                    ChunkDone::Failed(e) => {
                        tracing::debug!(%peer, chunk = idx, error = %e, "chunk request failed");
                        sched.on_fail(peer, idx, now);
                    }
                    ChunkDone::Busy => sched.on_busy(peer, idx, now),
                    ChunkDone::Missing => sched.on_missing(peer, idx),
                }
            }
            r = join_opt(ckpt.as_mut().map(|c| &mut c.0)), if ckpt.is_some() => {
                let snap = ckpt.take().map(|c| c.1).unwrap_or_default();
                r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                durable = snap;
            }
            r = join_opt(refresh.as_mut()), if refresh.is_some() => {
                refresh = None;
                for (p, chunks) in r.unwrap_or_default() {
                    others |= chunks.is_some();
                    sched.source(p, chunks, Instant::now());
                }
                if !order_decided {
                    order_decided = true;
                    if !others {
                        tracing::debug!(blob = %hex_id(&blob), "no other receiver: chunks in index order");
                        sched.sequential();
                    }
                }
            }
            _ = tick => {}
        }
        let now = Instant::now();
        // Verified chunks are made durable and recorded once half a source
        // window has piled up (a crash loses about a window of received
        // work at most), or every second.
        let unrecorded = sched.have().count() - durable.count();
        if ckpt.is_none()
            && (unrecorded >= (b.cfg.per_source / 2).max(1)
                || (unrecorded > 0
                    && (now.duration_since(last_ckpt) >= CHECKPOINT || sched.have().is_full())))
        {
            let store = b.store.clone();
            let snap = sched.have().clone();
            let snap2 = snap.clone();
            ckpt = Some((
                tokio::task::spawn_blocking(move || store.checkpoint(&blob, &snap2)),
                snap,
            ));
        }
        if now.duration_since(last_ckpt) >= CHECKPOINT || sched.have().is_full() {
            last_ckpt = now;
            window.retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(5));
            let rate = window.iter().map(|(_, l)| *l).sum::<u64>() as f64 / 5.0;
            let have_bytes: u64 = (0..n as u32)
                .filter(|i| sched.have().get(*i))
                .map(|i| manifest.chunk_len(i))
                .sum();
            let srcs = sched.usable_sources(now);
            update_view(node, &blob, |v| {
                v.have_bytes = have_bytes;
                v.chunks_have = sched.have().count();
                v.rate_bytes_per_sec = rate;
                v.eta_secs = (rate > 0.0).then(|| (size - have_bytes) as f64 / rate);
                v.sources = srcs.iter().map(|p| p.to_base58()).collect();
            });
        }
        let starved = sched.usable_sources(now).is_empty() && inflight.is_empty();
        let since = now.duration_since(last_refresh);
        if refresh.is_none()
            && (since >= SOURCE_REFRESH || (starved && since >= Duration::from_millis(500)))
        {
            last_refresh = now;
            let n2 = node.clone();
            refresh = Some(tokio::spawn(async move { who_has(&n2, blob).await }));
        }
        if inflight.is_empty() && now.duration_since(last_progress) > STALL {
            return Err(format!(
                "no progress for {}s ({} of {} chunks; sources gone or failing)",
                STALL.as_secs(),
                sched.have().count(),
                n
            ));
        }
    }
    if let Some((h, _)) = ckpt.take() {
        h.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    if let Some(h) = refresh.take() {
        h.abort();
    }
    update_view(node, &blob, |v| v.state = "verifying".into());
    let received = fetch_started.elapsed();
    let store = b.store.clone();
    let m = manifest.clone();
    let left = n as u32 - whole.position();
    let one_pass = whole.one_pass();
    let ok =
        tokio::task::spawn_blocking(move || store.finish_partial(&blob, &m, |_| whole.finish()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    tracing::info!(
        blob = %hex_id(&blob),
        chunks = n,
        receive_secs = received.as_secs_f64(),
        verify_secs = (fetch_started.elapsed() - received).as_secs_f64(),
        hashed_at_the_end = left,
        one_pass,
        in_order = sched.is_sequential(),
        ok,
        "fetch finished"
    );
    if !ok {
        return Err("the whole file does not match the blob id (every chunk matched the manifest: the publisher's manifest is wrong)".into());
    }
    Ok(())
}

/// Who holds what: (peer, None for the whole blob or its chunks).
type Sources = Vec<(PeerId, Option<Bitmap>)>;

/// Await an optional task (pending forever when there is none; used behind
/// a `select!` guard).
async fn join_opt<T>(
    h: Option<&mut tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// After a transfer: place for every name that wants it, and report. Only a
/// blob fetched now counts as a completed fetch (wants of held blobs are
/// resumed every 30 s to retry their placement).
async fn finish(node: &Arc<Node>, blob: BlobId, result: Result<bool, String>) {
    let b = &node.blobs;
    let Some(tr) = lock(&b.transfers).remove(&blob) else {
        return;
    };
    let secs = tr.started.elapsed().as_secs_f64();
    if result == Ok(true) {
        node.metrics.sync_seconds.observe(secs);
    }
    let sources = tr.view.sources.clone();
    match result {
        Ok(fetched) => {
            if fetched {
                node.metrics
                    .sync_transfers
                    .get_or_create(&label("result", "completed"))
                    .inc();
            }
            for name in &tr.names {
                // Only if the name still points here.
                let store = b.store.clone();
                let nm = name.clone();
                let current = tokio::task::spawn_blocking(move || store.name(&nm))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                if current.as_ref().is_some_and(|c| c.blob != blob) {
                    continue;
                }
                let mut path = None;
                if let Some(p) = b.want_for(name).and_then(|w| w.path_for(name, &blob)) {
                    let store = b.store.clone();
                    let p2 = p.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        if store.placed(&p2)? == Some(blob) && p2.exists() {
                            return Ok(false);
                        }
                        store.place(&blob, &p2).map(|_| true)
                    })
                    .await;
                    match r {
                        Ok(Ok(false)) => continue,
                        Ok(Ok(true)) => path = Some(p),
                        Ok(Err(e @ BlobError::DamagedChunk { .. })) => {
                            // Placed once the repair completes the blob again.
                            node.metrics.sync_place_failed.inc();
                            local_damage(node, blob, &e, "placing it");
                            continue;
                        }
                        Ok(Err(e)) => {
                            node.metrics.sync_place_failed.inc();
                            report_failure(
                                node,
                                blob,
                                std::slice::from_ref(name),
                                &format!("cannot place: {e}"),
                                &tr.cause,
                            )
                            .await;
                            continue;
                        }
                        Err(e) => {
                            node.metrics.sync_place_failed.inc();
                            report_failure(
                                node,
                                blob,
                                std::slice::from_ref(name),
                                &e.to_string(),
                                &tr.cause,
                            )
                            .await;
                            continue;
                        }
                    }
                } else if b.want_for(name).is_none() {
                    continue;
                } else {
                    // Wanted with no place to put it: announced once per
                    // (name, blob), not at every restart.
                    let store = b.store.clone();
                    let nm = name.clone();
                    let r = tokio::task::spawn_blocking(move || store.announce(&nm, &blob)).await;
                    if !matches!(r, Ok(Ok(true))) {
                        continue;
                    }
                }
                let ty = sync_event(name, SyncStep::Completed);
                let payload = json!({
                    "name": name,
                    "blob": hex_id(&blob),
                    "size": tr.size,
                    "host": node.cfg.name,
                    "path": path.as_ref().map(|p| p.display().to_string()),
                    "seconds": (secs * 1000.0).round() / 1000.0,
                    "sources": sources.len(),
                });
                tracing::info!(%name, blob = %hex_id(&blob), path = ?path, secs, "blob arrived");
                publish_sync(node, ty, &payload, &tr.cause).await;
            }
        }
        Err(reason) => {
            node.metrics
                .sync_transfers
                .get_or_create(&label("result", "failed"))
                .inc();
            report_failure(node, blob, &tr.names, &reason, &tr.cause).await;
        }
    }
    tr.wake.notify_waiters();
    refresh_gauges(node).await;
}

async fn report_failure(
    node: &Arc<Node>,
    blob: BlobId,
    names: &[String],
    reason: &str,
    cause: &str,
) {
    tracing::warn!(blob = %hex_id(&blob), ?names, reason, "blob sync failed");
    {
        let mut f = lock(&node.blobs.failures);
        f.push(FailureView {
            blob: hex_id(&blob),
            names: names.to_vec(),
            reason: reason.to_string(),
            at_ms: now_ms(),
        });
        let len = f.len();
        if len > 100 {
            f.drain(..len - 100);
        }
    }
    for name in names {
        let payload = json!({
            "name": name,
            "blob": hex_id(&blob),
            "host": node.cfg.name,
            "reason": reason,
        });
        publish_sync(node, sync_event(name, SyncStep::Failed), &payload, cause).await;
    }
}

async fn refresh_gauges(node: &Node) {
    let store = node.blobs.store.clone();
    if let Ok(Ok(list)) = tokio::task::spawn_blocking(move || store.list()).await {
        node.metrics
            .blob_store_bytes
            .set(list.iter().map(|(_, m)| m.size as i64).sum());
        node.metrics.blob_store_blobs.set(list.len() as i64);
    }
}

// ---- garbage collection and retries ----

async fn gc_loop(node: Arc<Node>) {
    let every =
        (node.blobs.cfg.retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = gc_once(&node).await {
            tracing::warn!(error = %e, "blob garbage collection failed");
        }
        // Wanted names whose blob is still missing (a failed fetch): again.
        resume_wants(&node).await;
        refresh_gauges(&node).await;
    }
}

/// Remove blobs no name points at, unreferenced for longer than the
/// retention, and not being fetched. Returns how many were removed.
pub async fn gc_once(node: &Node) -> Result<usize, String> {
    let b = &node.blobs;
    let busy: HashSet<BlobId> = lock(&b.transfers).keys().copied().collect();
    let store = b.store.clone();
    let retention = b.cfg.retention;
    tokio::task::spawn_blocking(move || -> Result<usize, BlobError> {
        let named: HashSet<BlobId> = store.names()?.into_iter().map(|(_, r)| r.blob).collect();
        let now = now_ms();
        let mut removed = 0;
        for (id, meta) in store.list()? {
            if named.contains(&id) || busy.contains(&id) {
                store.set_released(&id, 0)?;
                continue;
            }
            if meta.released_ms == 0 {
                store.set_released(&id, now)?;
                continue;
            }
            if now.saturating_sub(meta.released_ms) >= retention.as_millis() as u64 {
                store.remove(&id)?;
                tracing::info!(blob = %hex_id(&id), size = meta.size, "removed a blob no name points at");
                removed += 1;
            }
        }
        Ok(removed)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Add a local file as a blob and publish `name` for it.
/// Add `len` bytes from `src` (an opened file, or an upload's body read
/// on this blocking thread as it arrives) under `name`, and publish the
/// naming event. `label` names the source in errors.
pub async fn add(
    node: &Arc<Node>,
    src: Box<dyn std::io::Read + Send>,
    len: u64,
    label: PathBuf,
    name: &str,
    event_type: &str,
) -> Result<(store::Added, crate::store::Appended), String> {
    check_name(name)?;
    let store = node.blobs.store.clone();
    let chunk = node.blobs.cfg.chunk_size;
    let added = tokio::task::spawn_blocking(move || store.add_reader(src, len, &label, chunk))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let payload = Naming {
        name: name.to_string(),
        blob: hex_id(&added.id),
        size: added.manifest.size,
        root: hex_id(&added.manifest.root()),
        named_ms: Some(crate::event::now_ms()),
    };
    let payload = serde_json::to_value(&payload).map_err(|e| e.to_string())?;
    let d = Draft::new(
        event_type,
        &payload,
        Some("riftmesh/blob".into()),
        None,
        None,
    )
    .map_err(|e| e.to_string())?;
    let mut out = node.publish(vec![d]).await.map_err(|e| e.to_string())?;
    refresh_gauges(node).await;
    Ok((added, out.remove(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_answer_is_located_in_place_and_equals_the_decoded_value() {
        for len in [0usize, 1, 250, 251, 65_535, 65_536, 1 << 20, (1 << 20) + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let wire = codec::encode(&Response::Chunk(data.clone())).unwrap();
            // The header the server writes in front of the data is the
            // encoder's own.
            let h = chunk_answer_header(len);
            assert_eq!(&wire[..h.len()], &h[..], "header for {len} bytes");
            assert_eq!(wire.len(), h.len() + len);
            // The server's buffer: that header, then room for the data.
            let (b, at) = chunk_answer_buf(len);
            assert_eq!((&b[..at], b.len()), (&h[..], at + len));
            crate::bufpool::CHUNKS.give(b);
            match decode_answer(wire.clone()).unwrap() {
                Answer::Chunk(buf, range) => assert_eq!(&buf[range], &data[..]),
                Answer::Other(r) => panic!("chunk decoded as {r:?}"),
            }
            // Damaged framing fails the fast path exactly as the full decoder.
            let mut short = wire.clone();
            short.pop();
            if len > 0 {
                assert!(decode_answer(short.clone()).is_err());
                assert!(codec::decode::<Response>(&short, MAX_BLOB_RESPONSE).is_err());
            }
            let mut long = wire;
            long.push(0);
            assert!(decode_answer(long.clone()).is_err());
            assert!(codec::decode::<Response>(&long, MAX_BLOB_RESPONSE).is_err());
        }
    }

    #[test]
    fn other_answers_decode_as_before() {
        for r in [
            Response::NotFound,
            Response::Busy { retry_ms: 200 },
            Response::Refused {
                reason: "store error".into(),
            },
            Response::Have { held: vec![] },
        ] {
            let wire = codec::encode(&r).unwrap();
            assert_ne!(wire[0], CHUNK_TAG);
            match decode_answer(wire).unwrap() {
                Answer::Other(got) => assert_eq!(format!("{got:?}"), format!("{r:?}")),
                Answer::Chunk(..) => panic!("{r:?} decoded as a chunk"),
            }
        }
    }

    #[test]
    fn an_oversized_chunk_answer_is_refused_before_decoding() {
        let mut wire = chunk_answer_header(MAX_BLOB_RESPONSE);
        wire.resize(wire.len() + MAX_BLOB_RESPONSE, 0);
        assert!(matches!(
            decode_answer(wire),
            Err(codec::CodecError::TooLarge { .. })
        ));
    }
}
