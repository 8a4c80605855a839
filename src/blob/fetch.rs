//! Fetching one blob: the I/O shell around the plan in `sched`. Find a
//! peer serving a manifest that matches the signed root, receive the
//! missing chunks (each checked against the manifest and written as it
//! comes, the whole-file hash following them, see `whole`), record them
//! durably as they pile up, then check the whole file.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use serde_json::json;
use tokio::task::JoinHandle;

use super::ask::{ask, ask_raw, who_has, Sources};
use super::events::{event_type, publish_event, TransferStep};
use super::objects::{hex_id, Bitmap, BlobError, BlobId, BlobStore, Manifest};
use super::rate::take;
use super::room::check_space;
use super::sched::{Pace, Sched, Search};
use super::whole::WholeHash;
use super::wire::{Answer, Request, Response};
use super::{count_bytes, lock, Ctx, TransferView};
use crate::metrics::label;

/// A chunk request not answered in this time counts as a failure of its source.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(20);

pub(super) fn update_view(ctx: &Ctx, blob: &BlobId, f: impl FnOnce(&mut TransferView)) {
    if let Some(t) = lock(&ctx.blobs.transfers).get_mut(blob) {
        f(&mut t.view);
    }
}

/// Fetch one blob (if not held) under the transfer limit. `Ok(true)`: it was
/// fetched now; `Ok(false)`: it was here already (only placement is left).
pub(super) async fn run_transfer(ctx: &Arc<Ctx>, blob: BlobId) -> Result<bool, String> {
    let b = &ctx.blobs;
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
            "name": name, "blob": hex_id(&blob), "size": size, "host": ctx.host,
        });
        publish_event(
            ctx,
            event_type(name, TransferStep::Started),
            &payload,
            &cause,
        )
        .await;
    }
    let _active = Active::new(&ctx.metrics.transfer_active);
    fetch(ctx, blob, size, root).await.map(|()| true)
}

/// `riftmesh_sync_active` counts a fetch while this lives: down again
/// however the fetch ends, returned or dropped (called off).
struct Active(prometheus_client::metrics::gauge::Gauge);

impl Active {
    fn new(g: &prometheus_client::metrics::gauge::Gauge) -> Active {
        g.inc();
        Active(g.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The steps of a fetch: sources and the manifest, room on disk, the
/// chunks, the whole file.
async fn fetch(ctx: &Arc<Ctx>, blob: BlobId, size: u64, root: [u8; 32]) -> Result<(), String> {
    update_view(ctx, &blob, |v| v.state = "finding sources".into());
    let (manifest, sources) = find_manifest(ctx, blob, size, root).await?;
    check_space(ctx, &blob, size).await?;
    let fetch_started = Instant::now();
    let mut run = Run::begin(ctx, blob, manifest, sources).await?;
    run.receive().await?;
    run.verify(fetch_started).await
}

/// Ask peers who holds the blob until one serves a manifest matching
/// `root` and `size` (or the search gives up, see [`Search`]).
async fn find_manifest(
    ctx: &Ctx,
    blob: BlobId,
    size: u64,
    root: [u8; 32],
) -> Result<(Manifest, Sources), String> {
    let stall = ctx.blobs.cfg.stall;
    let mut search = Search::new(Instant::now(), stall);
    loop {
        let found = who_has(ctx, blob).await;
        if let Some(m) = matching_manifest(ctx, blob, size, root, &found).await {
            return Ok((m, found));
        }
        let Some(wait) = search.next_round(!found.is_empty(), Instant::now()) else {
            return Err(format!(
                "no connected peer holds blob {} (asked for {}s)",
                hex_id(&blob),
                stall.as_secs_f64()
            ));
        };
        tokio::time::sleep(wait).await;
    }
}

/// The first manifest one of `found` serves that matches the signed root
/// (the others are counted and logged).
async fn matching_manifest(
    ctx: &Ctx,
    blob: BlobId,
    size: u64,
    root: [u8; 32],
    found: &Sources,
) -> Option<Manifest> {
    for (p, _) in found {
        if let Ok(Response::Manifest(m)) = ask(ctx, *p, &Request::Manifest { blob }).await {
            if m.root() == root && m.size == size && m.check().is_ok() {
                return Some(m);
            }
            ctx.metrics
                .transfer_chunks_rejected
                .get_or_create(&label("reason", "manifest"))
                .inc();
            tracing::warn!(peer = %p, blob = %hex_id(&blob), "a peer served a manifest that does not match the signed root");
        }
    }
    None
}

/// How one chunk request ended.
enum ChunkDone {
    Ok,
    Bad(&'static str),
    Failed(String),
    Busy,
    Missing,
}

/// A fetch after its manifest: the plan, and what runs beside the chunk
/// pipeline.
struct Run {
    ctx: Arc<Ctx>,
    blob: BlobId,
    manifest: Arc<Manifest>,
    sched: Sched,
    pace: Pace,
    whole: Arc<WholeHash>,
    /// The chunks the last checkpoint recorded.
    durable: Bitmap,
    // A checkpoint (fsync + bitmap) and a source refresh run beside the
    // chunk pipeline, never in front of it.
    ckpt: Option<(JoinHandle<Result<(), BlobError>>, Bitmap)>,
    refresh: Option<JoinHandle<Sources>>,
    /// The latest chunk problem, for the reason if the transfer gives up.
    last_problem: Option<String>,
}

impl Run {
    /// Open the partial file (resuming what it holds) and plan with the
    /// first sources.
    async fn begin(
        ctx: &Arc<Ctx>,
        blob: BlobId,
        manifest: Manifest,
        sources: Sources,
    ) -> Result<Run, String> {
        let b = &ctx.blobs;
        let store = b.store.clone();
        let m2 = manifest.clone();
        let have = tokio::task::spawn_blocking(move || store.begin_partial(&blob, &m2))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let n = manifest.chunks.len();
        let mut sched = Sched::new(have.clone(), b.cfg.per_source, rand::random());
        let now = Instant::now();
        let mut partial = false;
        for (p, chunks) in sources {
            partial |= chunks.is_some();
            sched.source(p, chunks, now);
        }
        if sched.have().count() > 0 {
            tracing::info!(blob = %hex_id(&blob), held = sched.have().count(), chunks = n, "resuming a fetch");
        }
        let manifest = Arc::new(manifest);
        // The whole-file hash follows the arrivals (see whole.rs).
        let whole = Arc::new(WholeHash::new(
            b.store.partial_path(&blob),
            manifest.clone(),
            &have,
        ));
        let mut pace = Pace::new(Instant::now(), b.cfg.stall);
        pace.on_sources(partial);
        update_view(ctx, &blob, |v| {
            v.state = "fetching".into();
            v.chunks = n;
        });
        Ok(Run {
            ctx: ctx.clone(),
            blob,
            manifest,
            sched,
            pace,
            whole,
            durable: have,
            ckpt: None,
            refresh: None,
            last_problem: None,
        })
    }

    /// Receive every missing chunk: requests as the plan assigns them, their
    /// answers, checkpoints and source refreshes as they end.
    async fn receive(&mut self) -> Result<(), String> {
        let mut inflight = FuturesUnordered::new();
        while !self.sched.have().is_full() {
            for (peer, idx) in self.sched.assign(Instant::now()) {
                inflight.push(request_chunk(
                    self.ctx.clone(),
                    self.blob,
                    self.manifest.clone(),
                    self.whole.clone(),
                    peer,
                    idx,
                ));
            }
            let tick = tokio::time::sleep(Duration::from_millis(250));
            tokio::select! {
                Some((peer, idx, done)) = inflight.next(), if !inflight.is_empty() => {
                    self.on_chunk(peer, idx, done, Instant::now());
                }
                r = join_opt(self.ckpt.as_mut().map(|c| &mut c.0)), if self.ckpt.is_some() => {
                    let snap = self.ckpt.take().map(|c| c.1).unwrap_or_default();
                    r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                    self.durable = snap;
                }
                r = join_opt(self.refresh.as_mut()), if self.refresh.is_some() => {
                    self.refresh = None;
                    self.on_refreshed(r.unwrap_or_default());
                }
                _ = tick => {}
            }
            self.after_step(inflight.is_empty(), Instant::now())?;
        }
        if let Some((h, _)) = self.ckpt.take() {
            h.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        if let Some(h) = self.refresh.take() {
            h.abort();
        }
        Ok(())
    }

    fn on_chunk(&mut self, peer: PeerId, idx: u32, done: ChunkDone, now: Instant) {
        let sched = &mut self.sched;
        match done {
            ChunkDone::Ok => {
                let len = self.manifest.chunk_len(idx);
                sched.on_ok(peer, idx);
                count_bytes(&self.ctx, peer, "in", len);
                self.pace.on_chunk(len, now);
                // Progress: an earlier problem no longer explains anything.
                if self.last_problem.take().is_some() {
                    update_view(&self.ctx, &self.blob, |v| v.last_problem = None);
                }
            }
            ChunkDone::Bad(reason) => {
                self.ctx
                    .metrics
                    .transfer_chunks_rejected
                    .get_or_create(&label("reason", reason))
                    .inc();
                tracing::warn!(%peer, blob = %hex_id(&self.blob), chunk = idx, reason, "a peer served a chunk that fails verification; fetching it elsewhere");
                sched.on_bad(peer, idx, now);
                let dropped = sched.is_dropped(&peer);
                self.problem(
                    peer,
                    idx,
                    format!(
                        "the chunk failed verification ({reason}){}",
                        if dropped {
                            "; source dropped for this transfer"
                        } else {
                            ""
                        }
                    ),
                );
            }
            ChunkDone::Failed(e) => {
                tracing::debug!(%peer, chunk = idx, error = %e, "chunk request failed");
                sched.on_fail(peer, idx, now);
                self.problem(peer, idx, format!("request failed: {e}"));
            }
            ChunkDone::Busy => sched.on_busy(peer, idx, now),
            ChunkDone::Missing => sched.on_missing(peer, idx),
        }
    }

    /// Record why chunk `idx` from `peer` did not arrive: shown with the
    /// transfer, and the reason if the transfer gives up.
    fn problem(&mut self, peer: PeerId, idx: u32, reason: String) {
        let text = format!("chunk {idx} from {peer}: {reason}");
        update_view(&self.ctx, &self.blob, |v| {
            v.last_problem = Some(super::ProblemView {
                peer: peer.to_base58(),
                chunk: idx,
                reason,
                at_ms: crate::event::now_ms(),
            });
        });
        self.last_problem = Some(text);
    }

    /// A source refresh came back with `found`.
    fn on_refreshed(&mut self, found: Sources) {
        for (p, chunks) in found {
            self.pace.on_sources(chunks.is_some());
            self.sched.source(p, chunks, Instant::now());
        }
        if self.pace.on_refreshed() {
            tracing::debug!(blob = %hex_id(&self.blob), "no other receiver: chunks in index order");
            self.sched.sequential();
        }
    }

    /// After each wake-up: start a checkpoint, refresh the status, ask for
    /// sources, or give up, as the plan says; `idle`: nothing in flight.
    fn after_step(&mut self, idle: bool, now: Instant) -> Result<(), String> {
        let full = self.sched.have().is_full();
        let unrecorded = self.sched.have().count() - self.durable.count();
        let per_source = self.ctx.blobs.cfg.per_source;
        if self
            .pace
            .checkpoint_due(self.ckpt.is_some(), unrecorded, per_source, full, now)
        {
            let store = self.ctx.blobs.store.clone();
            let blob = self.blob;
            let snap = self.sched.have().clone();
            let snap2 = snap.clone();
            self.ckpt = Some((
                tokio::task::spawn_blocking(move || store.checkpoint(&blob, &snap2)),
                snap,
            ));
        }
        if let Some(rate) = self.pace.status_due(full, now) {
            self.show_status(rate, now);
        }
        let starved = self.sched.usable_sources(now).is_empty() && idle;
        if self.pace.refresh_due(self.refresh.is_some(), starved, now) {
            let (ctx, blob) = (self.ctx.clone(), self.blob);
            self.refresh = Some(tokio::spawn(async move { who_has(&ctx, blob).await }));
        }
        if self.pace.stalled(idle, now) {
            return Err(format!(
                "no progress for {}s ({} of {} chunks); {}",
                self.ctx.blobs.cfg.stall.as_secs_f64(),
                self.sched.have().count(),
                self.manifest.chunks.len(),
                match &self.last_problem {
                    Some(p) => format!("last problem: {p}"),
                    None => "no source offered the missing chunks".into(),
                }
            ));
        }
        Ok(())
    }

    /// The transfer's status (`/v1/blobs/transfers`) at `rate` bytes a second.
    fn show_status(&self, rate: f64, now: Instant) {
        let (sched, manifest) = (&self.sched, &self.manifest);
        let have_bytes: u64 = (0..manifest.chunks.len() as u32)
            .filter(|i| sched.have().get(*i))
            .map(|i| manifest.chunk_len(i))
            .sum();
        let srcs = sched.usable_sources(now);
        let size = manifest.size;
        update_view(&self.ctx, &self.blob, |v| {
            v.have_bytes = have_bytes;
            v.chunks_have = sched.have().count();
            v.rate_bytes_per_sec = rate;
            v.eta_secs = (rate > 0.0).then(|| (size - have_bytes) as f64 / rate);
            v.sources = srcs.iter().map(|p| p.to_base58()).collect();
        });
    }

    /// Every chunk is here: finish the whole-file hash and check it against
    /// the blob id.
    async fn verify(self, fetch_started: Instant) -> Result<(), String> {
        let (ctx, blob) = (&self.ctx, self.blob);
        update_view(ctx, &blob, |v| v.state = "verifying".into());
        let received = fetch_started.elapsed();
        let store = ctx.blobs.store.clone();
        let m = self.manifest.clone();
        let n = m.chunks.len();
        let whole = self.whole;
        let left = n as u32 - whole.position();
        let one_pass = whole.one_pass();
        let ok = tokio::task::spawn_blocking(move || {
            store.finish_partial(&blob, &m, |_| whole.finish())
        })
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
            in_order = self.sched.is_sequential(),
            ok,
            "fetch finished"
        );
        if !ok {
            return Err("the whole file does not match the blob id (every chunk matched the manifest: the publisher's manifest is wrong)".into());
        }
        Ok(())
    }
}

/// Ask `peer` for chunk `idx` (within the download rate); check and write
/// what comes back.
async fn request_chunk(
    ctx: Arc<Ctx>,
    blob: BlobId,
    m: Arc<Manifest>,
    whole: Arc<WholeHash>,
    peer: PeerId,
    idx: u32,
) -> (PeerId, u32, ChunkDone) {
    take(&ctx.blobs.down, m.chunk_len(idx)).await;
    let r = tokio::time::timeout(
        CHUNK_TIMEOUT,
        ask_raw(&ctx, peer, &Request::Chunk { blob, index: idx }),
    )
    .await;
    let done = match r {
        Err(_) => ChunkDone::Failed("timed out".into()),
        Ok(Err(e)) => ChunkDone::Failed(e),
        Ok(Ok(Answer::Chunk(buf, range))) => {
            if range.len() as u64 != m.chunk_len(idx) {
                ChunkDone::Bad("size")
            } else {
                let store = ctx.blobs.store.clone();
                tokio::task::spawn_blocking(move || {
                    keep_chunk(&store, &whole, blob, &m, idx, buf, range)
                })
                .await
                .unwrap_or_else(|e| ChunkDone::Failed(e.to_string()))
            }
        }
        Ok(Ok(Answer::Other(Response::Busy { .. }))) => ChunkDone::Busy,
        Ok(Ok(Answer::Other(Response::NotFound))) => ChunkDone::Missing,
        Ok(Ok(Answer::Other(other))) => ChunkDone::Failed(format!("unexpected answer {other:?}")),
    };
    (peer, idx, done)
}

/// Check a received chunk (`buf[range]`) against the manifest and write
/// it; the buffer goes to the whole-file hash if it still needs it, else
/// back to the pool. Blocking.
fn keep_chunk(
    store: &BlobStore,
    whole: &WholeHash,
    blob: BlobId,
    m: &Manifest,
    idx: u32,
    buf: Vec<u8>,
    range: std::ops::Range<usize>,
) -> ChunkDone {
    let data = &buf[range.clone()];
    let (ok, hashed) = whole.check(idx, data, &m.chunks[idx as usize]);
    if !ok {
        crate::bufpool::CHUNKS.give(buf);
        return ChunkDone::Bad("hash");
    }
    match store.write_chunk(&blob, m.offset(idx), data) {
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
}

/// Await an optional task (pending forever when there is none; used behind
/// a `select!` guard).
async fn join_opt<T>(h: Option<&mut JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}
