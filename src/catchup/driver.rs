//! The catch-up shell: feeds gossip, catch-up answers and a one-second tick
//! into the reorder buffer and fetch queues, runs the fetches and summary
//! exchanges the network asks for, and commits what is released to the
//! store. The decisions (what to ask, in which order) are in the planner
//! types of this module's parent; this file holds the I/O around them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::mpsc;

use super::{Released, Reorder, ReorderConfig, SourceMark};
use crate::event::{self, Event, EventError};
use crate::membership::Membership;
use crate::metrics::{label, Metrics};
use crate::net::{self, wire, Inbound, NetHandle};
use crate::store::{Appended, Store};

/// What the catch-up shell works with.
pub struct Ctx {
    pub store: Store,
    pub net: NetHandle,
    pub metrics: Metrics,
    pub membership: Arc<Membership>,
    pub order: ReorderConfig,
    /// Every this many seconds, a digest exchange with a random peer.
    pub summary_every_secs: u64,
}

/// Events from peers → the store: gossip and catch-up both pass through the
/// reorder buffer, so each source's events are appended in sequence order.
struct Ingest {
    ctx: Arc<Ctx>,
    reorder: Reorder,
    /// Peers with a fetch in flight (one at a time per peer: pacing).
    busy: HashSet<PeerId>,
    /// What to fetch from each peer next: (source, from).
    queue: HashMap<PeerId, VecDeque<(String, u64)>>,
    done_tx: mpsc::Sender<Done>,
    /// Sources being fetched, and from which peer (one peer per source).
    fetching: HashMap<String, PeerId>,
    /// Released catch-up events waiting for the store, committed a chunk at a
    /// time so live events are never queued behind a whole catch-up.
    bulk: VecDeque<Event>,
    /// Per source, how many of its events are in `bulk` (its later events queue behind).
    bulk_sources: HashMap<String, usize>,
    bulk_inflight: bool,
    /// (peer, source) fetches that failed lately: a gap is then asked of
    /// another peer (a fetch to one peer can hang after a connection was
    /// cut and re-made; root cause not found).
    fetch_failed: HashMap<(PeerId, String), Instant>,
}

/// Catch-up events per store commit.
const BULK_CHUNK: usize = 128;
/// Stop fetching while this many fetched events wait for the store.
const BULK_HIGH: usize = 8 * FETCH_BATCH as usize;

enum Done {
    Summary(PeerId, Vec<wire::Mark>),
    BulkCommitted,
    Fetch {
        peer: PeerId,
        source: String,
        from: u64,
        result: Result<Fetched, String>,
    },
}

struct Fetched {
    events: Vec<Event>,
    floor: Option<u64>,
    rejected: Vec<&'static str>,
    bytes: usize,
    full: bool,
}

/// A fetch not answered in this time is given up (and asked again elsewhere).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed fetch, that peer is not asked for that source for this long.
const FETCH_AVOID: Duration = Duration::from_secs(30);

/// Events asked for in one fetch.
pub const FETCH_BATCH: u32 = 1000;
/// Bytes of envelopes answered in one fetch, about.
pub const FETCH_BYTES: usize = 4 << 20;

fn marks(vv: Vec<SourceMark>) -> Vec<wire::Mark> {
    vv.into_iter()
        .map(|m| wire::Mark {
            source: m.source,
            contiguous: m.contiguous,
            max_seen: m.max_seen,
        })
        .collect()
}

/// Bytes of a digest request or a `Same` answer on the wire, about.
const DIGEST_BYTES: u64 = 38;

/// Bytes of a summary on the wire (frame header included).
fn summary_size(m: &[wire::Mark]) -> u64 {
    wire::encode_frame(&wire::SyncRequest::Summary { marks: m.to_vec() })
        .map(|f| f.len() as u64)
        .unwrap_or(0)
}

fn from_wire(m: &[wire::Mark]) -> Vec<SourceMark> {
    m.iter()
        .map(|m| SourceMark {
            source: m.source.clone(),
            contiguous: m.contiguous,
            max_seen: m.max_seen,
            last_ms: 0,
        })
        .collect()
}

pub async fn run(ctx: Arc<Ctx>, mut rx: mpsc::Receiver<Inbound>) {
    let (done_tx, mut done_rx) = mpsc::channel(256);
    let mut ing = Ingest {
        reorder: Reorder::new(ctx.order.clone()),
        ctx,
        busy: HashSet::new(),
        queue: HashMap::new(),
        done_tx,
        fetching: HashMap::new(),
        bulk: VecDeque::new(),
        bulk_sources: HashMap::new(),
        bulk_inflight: false,
        fetch_failed: HashMap::new(),
    };
    let now = Instant::now();
    let mut out = Released::default();
    for m in ing.ctx.store.version_vector().unwrap_or_default() {
        ing.reorder
            .set_contiguous(&m.source, m.contiguous, now, &mut out);
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        let mut out = Released::default();
        let mut bulk = false;
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                ing.on_inbound(msg, &mut out);
                // Take what else is waiting, up to a batch.
                for _ in 0..512 {
                    match rx.try_recv() {
                        Ok(m) => ing.on_inbound(m, &mut out),
                        Err(_) => break,
                    }
                }
            }
            Some(done) = done_rx.recv() => {
                bulk = true;
                ing.on_done(done, &mut out).await
            }
            _ = tick.tick() => {
                ticks += 1;
                ing.reorder.tick(Instant::now(), &mut out);
                ing.refetch_gaps();
                if ticks % ing.ctx.summary_every_secs.max(1) == 0 {
                    ing.summary_with_random_peer().await;
                }
                let (gaps, age) = ing.reorder.open_gaps(Instant::now());
                ing.ctx.metrics.gaps_open.set(gaps as i64);
                ing.ctx.metrics.gap_age.set(age.as_secs() as i64);
            }
        }
        ing.apply(out, bulk).await;
    }
}

impl Ingest {
    fn on_inbound(&mut self, msg: Inbound, out: &mut Released) {
        match msg {
            Inbound::Gossip { event, from } => {
                let gaps_before = out.gaps.len();
                self.reorder.offer(*event, Instant::now(), out);
                // Ask the source itself for what is missing when it is
                // connected (it surely holds its own events; a relay may
                // share the hole: gossipsub drops an envelope whose content
                // it already saw from another source), else the relay.
                let new_gaps: Vec<(String, u64)> = out.gaps[gaps_before..]
                    .iter()
                    .map(|(s, f, _)| (s.clone(), *f))
                    .collect();
                for (s, f) in new_gaps {
                    let peer = s
                        .parse::<PeerId>()
                        .ok()
                        .filter(|p| self.ctx.membership.is_connected(p))
                        .unwrap_or(from);
                    self.want(peer, s, f);
                }
            }
            Inbound::Connected(peer) => self.start_summary(peer, false),
            Inbound::Request {
                peer,
                request,
                channel,
            } => {
                let ctx = self.ctx.clone();
                let done = self.done_tx.clone();
                tokio::spawn(async move {
                    let response = answer(&ctx, request, peer, &done).await;
                    let _ = ctx.net.respond(channel, response).await;
                });
            }
        }
    }

    /// Every second: a source still waiting behind a gap with no fetch under
    /// way is asked again, of the source itself when connected, else of a
    /// connected peer chosen at random (an earlier relay may have had the
    /// same hole). Events later ones were released past (the hold ended)
    /// are asked of the source itself when connected; otherwise the summary
    /// exchanges find the peers that hold them.
    fn refetch_gaps(&mut self) {
        let connected: Vec<PeerId> = self.ctx.membership.connected_peers();
        if connected.is_empty() {
            return;
        }
        let now = Instant::now();
        self.fetch_failed
            .retain(|_, at| now.duration_since(*at) < FETCH_AVOID);
        for (source, next) in self.reorder.gapped() {
            if self.fetching.contains_key(&source) {
                continue;
            }
            let ok = |p: &PeerId| !self.fetch_failed.contains_key(&(*p, source.clone()));
            let others: Vec<PeerId> = connected.iter().copied().filter(|p| ok(p)).collect();
            let peer = source
                .parse::<PeerId>()
                .ok()
                .filter(|p| connected.contains(p) && ok(p))
                .or_else(|| {
                    (!others.is_empty()).then(|| others[rand::random::<usize>() % others.len()])
                })
                .unwrap_or_else(|| connected[rand::random::<usize>() % connected.len()]);
            self.want(peer, source, next);
        }
        for (source, first) in self.reorder.missing() {
            if self.fetching.contains_key(&source) {
                continue;
            }
            let Some(peer) = source.parse::<PeerId>().ok().filter(|p| {
                connected.contains(p) && !self.fetch_failed.contains_key(&(*p, source.clone()))
            }) else {
                continue;
            };
            self.want(peer, source, first);
        }
    }

    fn want(&mut self, peer: PeerId, source: String, from: u64) {
        // One fetch chain per source: a chain continues by itself while answers
        // are full, and asking two peers for the same range doubles the work.
        if self.fetching.contains_key(&source) {
            return;
        }
        let from = from.max(self.reorder.next_expected(&source));
        let q = self.queue.entry(peer).or_default();
        if let Some(w) = q.iter_mut().find(|(s, _)| *s == source) {
            w.1 = w.1.min(from);
        } else {
            q.push_back((source, from));
        }
        self.pump(peer);
    }

    /// Exchange summaries with `peer`. With `digest_only`, first only the
    /// digests (about 40 bytes each way); the full summaries follow if they differ.
    fn start_summary(&self, peer: PeerId, digest_only: bool) {
        let ctx = self.ctx.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let ours = marks(ctx.store.version_vector().unwrap_or_default());
            let m = &ctx.metrics;
            m.antientropy_exchanges.inc();
            if digest_only {
                let digest = wire::marks_digest(&ours);
                m.antientropy_bytes.inc_by(DIGEST_BYTES);
                match ctx
                    .net
                    .request(peer, wire::SyncRequest::Digest { digest })
                    .await
                {
                    Ok(wire::SyncResponse::Same) => {
                        m.antientropy_bytes.inc_by(DIGEST_BYTES);
                        return;
                    }
                    Ok(wire::SyncResponse::Summary { marks }) => {
                        m.antientropy_bytes.inc_by(summary_size(&marks));
                        let _ = done.send(Done::Summary(peer, marks)).await;
                        // Then send ours, so the peer can fetch from us too.
                    }
                    Ok(_) => {
                        return tracing::warn!(%peer, "peer answered a digest with something else")
                    }
                    Err(e) => return tracing::debug!(%peer, error = %e, "digest exchange failed"),
                }
            }
            m.antientropy_bytes.inc_by(summary_size(&ours));
            match ctx
                .net
                .request(peer, wire::SyncRequest::Summary { marks: ours })
                .await
            {
                Ok(wire::SyncResponse::Summary { marks }) => {
                    m.antientropy_bytes.inc_by(summary_size(&marks));
                    let _ = done.send(Done::Summary(peer, marks)).await;
                }
                Ok(_) => tracing::warn!(%peer, "peer answered a summary with something else"),
                Err(e) => tracing::debug!(%peer, error = %e, "summary exchange failed"),
            }
        });
    }

    async fn summary_with_random_peer(&self) {
        let Ok(peers) = self.ctx.net.peers().await else {
            return;
        };
        if peers.is_empty() {
            return;
        }
        let pick = &peers[rand::random::<usize>() % peers.len()];
        if let Ok(p) = pick.peer_id.parse::<PeerId>() {
            self.start_summary(p, true);
        }
    }

    /// Start the next fetch from `peer` if none is in flight.
    fn pump(&mut self, peer: PeerId) {
        if self.busy.contains(&peer) || self.bulk.len() >= BULK_HIGH {
            return;
        }
        let Some((source, from)) = self.queue.get_mut(&peer).and_then(|q| q.pop_front()) else {
            return;
        };
        if self.fetching.get(&source).is_some_and(|p| *p != peer) {
            return self.pump(peer);
        }
        // What arrived since this want was queued is not asked for again.
        let from = from.max(self.reorder.next_expected(&source));
        tracing::debug!(%peer, %source, from, "fetch");
        self.fetching.insert(source.clone(), peer);
        self.busy.insert(peer);
        let ctx = self.ctx.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let req = wire::SyncRequest::Fetch {
                source: source.clone(),
                from,
                max_events: FETCH_BATCH,
            };
            // A fetch that hangs (a connection torn down under it) must not
            // hold its source's chain for the whole request timeout.
            let answer = tokio::time::timeout(FETCH_TIMEOUT, ctx.net.request(peer, req))
                .await
                .unwrap_or_else(|_| Err(net::NetError::Publish("fetch timed out".into())));
            let result = match answer {
                Ok(wire::SyncResponse::Events { events, floor }) => {
                    let events: Vec<Event> = events.into_iter().map(Event::from).collect();
                    let full = events.len() as u32 >= FETCH_BATCH;
                    let want = source.clone();
                    tokio::task::spawn_blocking(move || verify_batch(events, &want, floor, full))
                        .await
                        .map_err(|e| e.to_string())
                }
                Ok(wire::SyncResponse::EventsV2 { events, floor }) => {
                    let full = events.len() as u32 >= FETCH_BATCH;
                    let want = source.clone();
                    tokio::task::spawn_blocking(move || verify_batch(events, &want, floor, full))
                        .await
                        .map_err(|e| e.to_string())
                }
                Ok(wire::SyncResponse::Refused { reason }) => Err(reason),
                Ok(_) => Err("unexpected answer to a fetch".into()),
                Err(e) => Err(e.to_string()),
            };
            let _ = done
                .send(Done::Fetch {
                    peer,
                    source,
                    from,
                    result,
                })
                .await;
        });
    }

    async fn on_done(&mut self, done: Done, out: &mut Released) {
        match done {
            Done::Summary(peer, theirs) => {
                let ours = self.ctx.store.version_vector().unwrap_or_default();
                for (source, from) in super::wants(&ours, &from_wire(&theirs)) {
                    self.want(peer, source, from);
                }
            }
            Done::BulkCommitted => {
                self.bulk_inflight = false;
                if self.bulk.len() < BULK_HIGH {
                    let peers: Vec<PeerId> = self.queue.keys().copied().collect();
                    for p in peers {
                        self.pump(p);
                    }
                }
            }
            Done::Fetch {
                peer,
                source,
                from,
                result,
            } => {
                self.busy.remove(&peer);
                self.fetching.remove(&source);
                match result {
                    Err(e) => {
                        tracing::debug!(%peer, %source, error = %e, "fetch failed");
                        self.fetch_failed
                            .insert((peer, source.clone()), Instant::now());
                    }
                    Ok(f) => {
                        let m = &self.ctx.metrics;
                        for reason in &f.rejected {
                            m.events_rejected
                                .get_or_create(&label("reason", *reason))
                                .inc();
                        }
                        if !f.rejected.is_empty() {
                            tracing::warn!(%peer, %source, refused = f.rejected.len(), "catch-up answer held events that fail verification");
                        }
                        tracing::debug!(%peer, %source, from, got = f.events.len(), floor = ?f.floor, "fetched");
                        m.catchup_events.inc_by(f.events.len() as u64);
                        m.catchup_bytes.inc_by(f.bytes as u64);
                        let first = f.events.first().map(|e| e.seq);
                        let last = f.events.last().map(|e| e.seq);
                        // Below the source's own floor, its events are gone past
                        // retention: stop waiting for them. Another peer's floor
                        // may only mean that peer has a hole too.
                        let from_source = source.parse::<PeerId>().ok() == Some(peer);
                        if let (Some(floor), true) = (f.floor, from_source) {
                            if floor > from && first.is_none_or(|s| s > from) {
                                match self.ctx.store.skip_to(&source, floor - 1).await {
                                    Ok(mark) => {
                                        self.reorder.set_contiguous(
                                            &source,
                                            mark.contiguous,
                                            Instant::now(),
                                            out,
                                        );
                                        m.order_skipped.inc();
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "cannot record a retention gap")
                                    }
                                }
                            }
                        }
                        let now = Instant::now();
                        for ev in f.events {
                            self.reorder.offer(ev, now, out);
                        }
                        if f.full {
                            if let Some(last) = last {
                                self.fetching.insert(source.clone(), peer);
                                self.queue
                                    .entry(peer)
                                    .or_default()
                                    .push_front((source, last + 1));
                            }
                        }
                    }
                }
                self.pump(peer);
            }
        }
    }

    /// Append what the reorder buffer released; record given-up gaps. Live
    /// events go to the store at once; catch-up events (`bulk`), and any later
    /// event of a source that still has some waiting, go a chunk at a time.
    async fn apply(&mut self, out: Released, bulk: bool) {
        // The hold ended: later events go ahead, but the missing ones stay
        // wanted (the store's contiguous mark stays below them, so summaries
        // and the gap refetch keep asking for them). Only a source's own
        // retention floor gives events up (see on_done).
        for (source, from, to) in out.skipped {
            tracing::warn!(%source, from, to, "missing events of a source still not here after the order hold; later ones go ahead, the missing ones are still fetched");
            self.ctx.metrics.order_skipped.inc();
        }
        let mut live = Vec::new();
        for ev in out.ready {
            let waiting = self.bulk_sources.get(&ev.source).copied().unwrap_or(0);
            if !bulk && waiting > 0 && waiting <= BULK_CHUNK {
                // A live event whose source has a few fetched events still
                // queued: take those along rather than wait behind the backlog.
                let (mine, rest): (VecDeque<Event>, VecDeque<Event>) =
                    std::mem::take(&mut self.bulk)
                        .into_iter()
                        .partition(|e| e.source == ev.source);
                self.bulk = rest;
                self.bulk_sources.remove(&ev.source);
                live.extend(mine);
                live.push(ev);
            } else if bulk || waiting > 0 {
                *self.bulk_sources.entry(ev.source.clone()).or_default() += 1;
                self.bulk.push_back(ev);
            } else {
                live.push(ev);
            }
        }
        if !live.is_empty() {
            self.commit(live, false).await;
        }
        self.pump_bulk().await;
    }

    async fn pump_bulk(&mut self) {
        if self.bulk_inflight || self.bulk.is_empty() {
            return;
        }
        let n = self.bulk.len().min(BULK_CHUNK);
        let chunk: Vec<Event> = self.bulk.drain(..n).collect();
        for ev in &chunk {
            if let Some(c) = self.bulk_sources.get_mut(&ev.source) {
                *c -= 1;
                if *c == 0 {
                    self.bulk_sources.remove(&ev.source);
                }
            }
        }
        self.bulk_inflight = true;
        self.commit(chunk, true).await;
    }

    /// Queue events on the store (in order) and account for the outcome in a
    /// task of its own, so this loop goes on.
    async fn commit(&mut self, events: Vec<Event>, bulk: bool) {
        let rx = match self.ctx.store.append_remote_queued(events).await {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(error = %e, "cannot store events from peers");
                if bulk {
                    self.bulk_inflight = false;
                }
                return;
            }
        };
        let ctx = self.ctx.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            match rx.await {
                Ok(Ok(res)) => {
                    let now = event::now_ms();
                    let m = &ctx.metrics;
                    for a in res {
                        match a {
                            Appended::New { event, .. } => {
                                m.events_received
                                    .get_or_create(&label("via", "peers"))
                                    .inc();
                                m.remote_latency
                                    .observe(now.saturating_sub(event.ts_ms) as f64 / 1000.0);
                            }
                            Appended::Duplicate { .. } | Appended::Held => {
                                m.events_duplicate
                                    .get_or_create(&label("via", "peers"))
                                    .inc();
                            }
                        }
                    }
                }
                Ok(Err(e)) => tracing::error!(error = %e, "cannot store events from peers"),
                Err(_) => tracing::error!("the store writer stopped"),
            }
            if bulk {
                let _ = done.send(Done::BulkCommitted).await;
            }
        });
    }
}

/// Check every envelope of a fetch answer: of the asked source, in order,
/// hash and signature. The bad ones are dropped and their reasons returned.
fn verify_batch(events: Vec<Event>, source: &str, floor: Option<u64>, full: bool) -> Fetched {
    let mut ok = Vec::with_capacity(events.len());
    let mut rejected = Vec::new();
    let mut bytes = 0;
    let mut last = 0;
    for ev in events {
        bytes += ev.payload.len() + ev.signature.len() + ev.id.len() + ev.source.len() + 64;
        if ev.source != source || ev.seq <= last {
            rejected.push("invalid");
            continue;
        }
        match ev.verify() {
            Ok(()) => {
                last = ev.seq;
                ok.push(ev);
            }
            Err(EventError::HashMismatch) => rejected.push("hash"),
            Err(EventError::BadSignature | EventError::BadSource(_)) => rejected.push("signature"),
            Err(_) => rejected.push("invalid"),
        }
    }
    Fetched {
        events: ok,
        floor,
        rejected,
        bytes,
        full,
    }
}

/// Answer a catch-up request from `peer`.
async fn answer(
    ctx: &Arc<Ctx>,
    request: wire::SyncRequest,
    peer: PeerId,
    done: &mpsc::Sender<Done>,
) -> wire::SyncResponse {
    match request {
        wire::SyncRequest::Summary { marks: theirs } => {
            ctx.metrics.antientropy_bytes.inc_by(summary_size(&theirs));
            // Their summary also tells us what to fetch from them.
            let _ = done.send(Done::Summary(peer, theirs)).await;
            match ctx.store.version_vector() {
                Ok(vv) => {
                    let ours = marks(vv);
                    ctx.metrics.antientropy_bytes.inc_by(summary_size(&ours));
                    wire::SyncResponse::Summary { marks: ours }
                }
                Err(e) => wire::SyncResponse::Refused {
                    reason: e.to_string(),
                },
            }
        }
        wire::SyncRequest::Digest { digest } => {
            ctx.metrics.antientropy_bytes.inc_by(DIGEST_BYTES);
            match ctx.store.version_vector() {
                Ok(vv) => {
                    let ours = marks(vv);
                    if wire::marks_digest(&ours) == digest {
                        ctx.metrics.antientropy_bytes.inc_by(DIGEST_BYTES);
                        wire::SyncResponse::Same
                    } else {
                        ctx.metrics.antientropy_bytes.inc_by(summary_size(&ours));
                        wire::SyncResponse::Summary { marks: ours }
                    }
                }
                Err(e) => wire::SyncResponse::Refused {
                    reason: e.to_string(),
                },
            }
        }
        wire::SyncRequest::Fetch {
            source,
            from,
            max_events,
        } => {
            let store = ctx.store.clone();
            let max = (max_events as usize).clamp(1, FETCH_BATCH as usize);
            let r = tokio::task::spawn_blocking(move || {
                store.source_events(&source, from, max, FETCH_BYTES)
            })
            .await;
            match r {
                Ok(Ok((events, floor))) => wire::SyncResponse::events(events, floor),
                Ok(Err(e)) => wire::SyncResponse::Refused {
                    reason: e.to_string(),
                },
                Err(e) => wire::SyncResponse::Refused {
                    reason: e.to_string(),
                },
            }
        }
    }
}
