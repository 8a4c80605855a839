//! Blob transfer: content-addressed files moved between agents over
//! `/riftmesh/sync/1` (proto-notes/sync.md).
//!
//! - [`objects`]: the files and their records (blocking; used off the async threads).
//! - [`sched`]: the plan of a fetch: which chunk to ask of which source
//!   next, when to refresh sources, record progress, give up (sans-IO).
//! - `wire`: requests and answers; `ask`: asking peers; `serve`: answering them.
//! - `fetch`: one transfer, the shell around the plan; `place`: after it,
//!   placement and the completion events; `events`: the sync events.
//! - `names`: names from naming events (and their retractions), and the
//!   wants they raise;
//! - `gc`: garbage collection and room on disk; `repair`: damaged copies.
//! - `rate`: the byte-rate limits.
//! - this module: what transfer works with ([`Ctx`]), its state on one
//!   agent ([`Blobs`]), and [`start`].

mod ask;
mod events;
mod fetch;
mod gc;
mod names;
pub mod objects;
mod place;
mod rate;
mod repair;
mod room;
pub mod sched;
mod serve;
pub mod sha;
pub mod source;
pub mod whole;
mod wire;

pub(crate) use crate::util::{lock, now_ms};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};

use crate::membership::Membership;
use crate::metrics::label;
use crate::metrics::Metrics;
use crate::net::BlobInbound;
use crate::net::NetHandle;
use crate::publisher::Publisher;

pub use crate::config::{check_name, TransferConfig, Want};
pub use gc::gc_once;
pub use names::{
    add, check_naming_payload, ensure_held, forget, Forgetting, Naming, NamingLink,
    FORGET_MAX_AHEAD_MS, FORGET_TYPE, NAMING_TYPES,
};
pub use objects::{hex_id, parse_id, BlobId, BlobStore, Manifest, NameRecord, Retraction};
pub use rate::Limiter;
pub use repair::local_damage;
pub(crate) use room::check_room;
pub use serve::serve_peers;
pub use wire::{Held, Request, Response, MAX_HAVE_IDS};

use objects::BlobError;
use rate::limiter;

/// What blob transfer works with (handed over by the node at start).
pub struct Ctx {
    pub blobs: Blobs,
    pub store: crate::store::Store,
    pub net: NetHandle,
    pub metrics: Metrics,
    pub membership: Arc<Membership>,
    pub publisher: Publisher,
    /// This agent's name, in sync events.
    pub host: String,
    /// The data directory (free-space checks).
    pub data_dir: PathBuf,
    /// Owner of the long-lived tasks (stopped with the agent).
    pub tasks: crate::tasks::Tasks,
}

// ---- status (what the API shows) ----

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
    /// The latest chunk that failed (a source's refusal, timeout or a chunk
    /// failing verification): why a transfer is not progressing, while it
    /// still runs. A transfer with nothing usable for `sync_stall` gives up
    /// with this as its reason (proto-notes/sync.md, "Giving up").
    pub last_problem: Option<ProblemView>,
}

#[derive(Serialize, Clone, Debug)]
pub struct ProblemView {
    pub peer: String,
    pub chunk: u32,
    pub reason: String,
    pub at_ms: u64,
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
    /// This transfer among those of the same blob over time: a transfer
    /// called off ([`names::drop_name`]) leaves the table at once, and its
    /// task, ending later, must not take a newer transfer of the blob with it.
    gen: u64,
    /// Called off: every name it was for was forgotten.
    cancel: tokio_util::sync::CancellationToken,
}

/// Blob transfer on one agent.
pub struct Blobs {
    pub store: Arc<BlobStore>,
    pub cfg: TransferConfig,
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
    /// Held while names are changed (a naming recorded, a retraction
    /// applied) together with the wants that go with them, and while
    /// `resume_wants` reads the names and raises their wants: a name
    /// unbound by a retraction is then never wanted again from a reading
    /// of the names made before it.
    names_lock: tokio::sync::Mutex<()>,
    /// Blobs found damaged, waiting for their repair (see `repair`).
    damaged: tokio::sync::mpsc::Sender<BlobId>,
    damaged_rx: Mutex<Option<tokio::sync::mpsc::Receiver<BlobId>>>,
    /// Blobs in that queue: a copy reported again while it waits is not
    /// queued twice (a peer asking for its chunks reports it each time).
    damaged_queued: Mutex<std::collections::HashSet<BlobId>>,
}

/// Damaged blobs waiting for repair; beyond this a report is dropped (the
/// damage is found again the next time the copy is used).
const DAMAGED_QUEUE: usize = 256;

/// Most chunk uploads served at once; more get `Busy`.
const MAX_UPLOADS: usize = 32;

impl Blobs {
    pub fn open(
        dir: &Path,
        durable: &crate::durable::Durable,
        cfg: TransferConfig,
        tags: &[(String, String)],
    ) -> Result<Blobs, BlobError> {
        let store = Arc::new(BlobStore::open(dir, durable)?);
        let (damaged, damaged_rx) = tokio::sync::mpsc::channel(DAMAGED_QUEUE);
        Ok(Blobs {
            damaged,
            damaged_rx: Mutex::new(Some(damaged_rx)),
            damaged_queued: Mutex::new(Default::default()),
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
            names_lock: tokio::sync::Mutex::new(()),
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

/// Count bytes moved to or from `peer` (`direction`: "in" or "out").
fn count_bytes(ctx: &Ctx, peer: PeerId, direction: &str, n: u64) {
    ctx.metrics
        .transfer_bytes
        .get_or_create(&label("direction", direction))
        .inc_by(n);
    ctx.metrics
        .transfer_peer_bytes
        .get_or_create(&vec![
            ("peer", peer.to_base58()),
            ("direction", direction.to_string()),
        ])
        .inc_by(n);
}

/// Start blob transfer: serving peers, following naming events, garbage collection.
pub fn start(ctx: Arc<Ctx>, inbound: tokio::sync::mpsc::Receiver<BlobInbound>) {
    ctx.tasks.spawn(serve_peers(ctx.clone(), inbound));
    ctx.tasks.spawn(names::follow_names(ctx.clone()));
    if let Some(rx) = lock(&ctx.blobs.damaged_rx).take() {
        ctx.tasks.spawn(names::repair_loop(ctx.clone(), rx));
    }
    let tasks = ctx.tasks.clone();
    tasks.spawn(gc::gc_loop(ctx));
}
