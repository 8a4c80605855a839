//! The catch-up shell: runs the network exchanges, store commits and timers
//! around the planner ([`super::plan::Planner`]), which makes every
//! decision. Gossip, catch-up answers and a one-second tick go in; the
//! planner's actions come out and are carried out here. Also answers peers'
//! catch-up requests (summaries, digests, fetches) from the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::mpsc;

use super::plan::{Action, Fetched, Planner, FETCH_BATCH};
use super::{ReorderConfig, SourceMark};
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

/// A fetch not answered in this time is given up (and asked again elsewhere).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of envelopes answered in one fetch, about.
pub const FETCH_BYTES: usize = 4 << 20;
/// Bytes of a digest request or a `Same` answer on the wire, about.
const DIGEST_BYTES: u64 = 38;

/// Results of the shell's own tasks, back to its loop.
enum Done {
    Summary(PeerId, Vec<wire::Mark>),
    BulkCommitted,
    Fetch {
        peer: PeerId,
        source: String,
        from: u64,
        result: Result<Verified, String>,
    },
}

/// A fetch answer after verification: what passed, why the rest did not,
/// and its size (for the catch-up byte counter).
struct Verified {
    fetched: Fetched,
    rejected: Vec<&'static str>,
    bytes: usize,
}

fn marks(vv: Vec<SourceMark>) -> Vec<wire::Mark> {
    vv.into_iter()
        .map(|m| wire::Mark {
            source: m.source,
            contiguous: m.contiguous,
            max_seen: m.max_seen,
        })
        .collect()
}

/// Bytes of a summary on the wire (frame header included).
fn summary_size(m: &[wire::Mark]) -> u64 {
    wire::encode_frame(&wire::CatchupRequest::Summary { marks: m.to_vec() })
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

struct Shell {
    ctx: Arc<Ctx>,
    plan: Planner,
    done_tx: mpsc::Sender<Done>,
}

/// Run catch-up until the network's inbox closes (or the agent stops).
pub async fn run(ctx: Arc<Ctx>, mut rx: mpsc::Receiver<Inbound>) {
    let (done_tx, mut done_rx) = mpsc::channel(256);
    let held = ctx.store.version_vector().unwrap_or_default();
    let mut sh = Shell {
        plan: Planner::new(ctx.order.clone(), &held, Instant::now()),
        ctx,
        done_tx,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        let mut acts = Vec::new();
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                sh.on_inbound(msg, &mut acts);
                // Take what else is waiting, up to a batch.
                for _ in 0..512 {
                    match rx.try_recv() {
                        Ok(m) => sh.on_inbound(m, &mut acts),
                        Err(_) => break,
                    }
                }
            }
            Some(done) = done_rx.recv() => sh.on_done(done, &mut acts),
            _ = tick.tick() => {
                ticks += 1;
                let now = Instant::now();
                let connected = sh.ctx.membership.connected_peers();
                sh.plan.tick(now, &connected, &mut rand::thread_rng(), &mut acts);
                if ticks % sh.ctx.summary_every_secs.max(1) == 0 {
                    sh.summary_with_random_peer(&mut acts).await;
                }
                let (gaps, age) = sh.plan.open_gaps(now);
                sh.ctx.metrics.gaps_open.set(gaps as i64);
                sh.ctx.metrics.gap_age.set(age.as_secs() as i64);
            }
        }
        sh.execute(acts).await;
    }
}

impl Shell {
    fn on_inbound(&mut self, msg: Inbound, acts: &mut Vec<Action>) {
        match msg {
            Inbound::Gossip { event, from } => {
                let m = &self.ctx.membership;
                self.plan
                    .gossip(*event, from, Instant::now(), |p| m.is_connected(p), acts);
            }
            Inbound::Connected(peer) => self.plan.connected(peer, acts),
            Inbound::Request {
                peer,
                request,
                channel,
            } => {
                let ctx = self.ctx.clone();
                let done = self.done_tx.clone();
                tokio::spawn(async move {
                    let response = answer(&ctx, request, peer, &done).await;
                    let _ = ctx.net.catchup_respond(channel, response).await;
                });
            }
        }
    }

    fn on_done(&mut self, done: Done, acts: &mut Vec<Action>) {
        match done {
            Done::Summary(peer, theirs) => {
                let ours = self.ctx.store.version_vector().unwrap_or_default();
                self.plan.summary(peer, &ours, &from_wire(&theirs), acts);
            }
            Done::BulkCommitted => self.plan.bulk_committed(acts),
            Done::Fetch {
                peer,
                source,
                from,
                result,
            } => {
                let result = match result {
                    Err(e) => {
                        tracing::debug!(%peer, %source, error = %e, "fetch failed");
                        Err(e)
                    }
                    Ok(v) => {
                        let m = &self.ctx.metrics;
                        for reason in &v.rejected {
                            m.events_rejected
                                .get_or_create(&label("reason", *reason))
                                .inc();
                        }
                        if !v.rejected.is_empty() {
                            tracing::warn!(%peer, %source, refused = v.rejected.len(), "catch-up answer held events that fail verification");
                        }
                        tracing::debug!(%peer, %source, from, got = v.fetched.events.len(), floor = ?v.fetched.floor, "fetched");
                        m.catchup_events.inc_by(v.fetched.events.len() as u64);
                        m.catchup_bytes.inc_by(v.bytes as u64);
                        Ok(v.fetched)
                    }
                };
                self.plan
                    .fetched(peer, source, from, result, Instant::now(), acts);
            }
        }
    }

    /// Carry out the planner's actions (and those they lead to). Consecutive
    /// live commits go to the store as one; a bulk commit first sends the
    /// live events before it, so each source's events stay in order.
    async fn execute(&mut self, mut acts: Vec<Action>) {
        while !acts.is_empty() {
            let mut live: Vec<Event> = Vec::new();
            for act in std::mem::take(&mut acts) {
                match act {
                    Action::Fetch { peer, source, from } => self.fetch(peer, source, from),
                    Action::Summary { peer, digest_only } => self.start_summary(peer, digest_only),
                    Action::Commit {
                        events,
                        bulk: false,
                    } => live.extend(events),
                    Action::Commit { events, bulk: true } => {
                        if !live.is_empty() {
                            self.commit(std::mem::take(&mut live), false).await;
                        }
                        self.commit(events, true).await;
                    }
                    Action::SkipTo { source, to } => {
                        let mark = match self.ctx.store.skip_to(&source, to).await {
                            Ok(mark) => {
                                self.ctx.metrics.order_skipped.inc();
                                Some(mark.contiguous)
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot record a retention gap");
                                None
                            }
                        };
                        self.plan.skipped(&source, mark, Instant::now(), &mut acts);
                    }
                    Action::Overtaken { source, from, to } => {
                        tracing::warn!(%source, from, to, "missing events of a source still not here after the order hold; later ones go ahead, the missing ones are still fetched");
                        self.ctx.metrics.order_skipped.inc();
                    }
                }
            }
            if !live.is_empty() {
                self.commit(live, false).await;
            }
        }
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
                    .catchup_request(peer, wire::CatchupRequest::Digest { digest })
                    .await
                {
                    Ok(wire::CatchupResponse::Same) => {
                        m.antientropy_bytes.inc_by(DIGEST_BYTES);
                        return;
                    }
                    Ok(wire::CatchupResponse::Summary { marks }) => {
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
                .catchup_request(peer, wire::CatchupRequest::Summary { marks: ours })
                .await
            {
                Ok(wire::CatchupResponse::Summary { marks }) => {
                    m.antientropy_bytes.inc_by(summary_size(&marks));
                    let _ = done.send(Done::Summary(peer, marks)).await;
                }
                Ok(_) => tracing::warn!(%peer, "peer answered a summary with something else"),
                Err(e) => tracing::debug!(%peer, error = %e, "summary exchange failed"),
            }
        });
    }

    async fn summary_with_random_peer(&mut self, acts: &mut Vec<Action>) {
        let Ok(peers) = self.ctx.net.peers().await else {
            return;
        };
        let peers: Vec<PeerId> = peers
            .iter()
            .filter_map(|p| p.peer_id.parse().ok())
            .collect();
        self.plan.summary_due(&peers, &mut rand::thread_rng(), acts);
    }

    /// Fetch `source` from `from` on of `peer`, verify the answer off the
    /// runtime, and hand it back to the loop.
    fn fetch(&self, peer: PeerId, source: String, from: u64) {
        tracing::debug!(%peer, %source, from, "fetch");
        let ctx = self.ctx.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let req = wire::CatchupRequest::Fetch {
                source: source.clone(),
                from,
                max_events: FETCH_BATCH,
            };
            // A fetch that hangs (a connection torn down under it) must not
            // hold its source's chain for the whole request timeout.
            let answer = tokio::time::timeout(FETCH_TIMEOUT, ctx.net.catchup_request(peer, req))
                .await
                .unwrap_or_else(|_| Err(net::NetError::Publish("fetch timed out".into())));
            let result = match answer {
                Ok(wire::CatchupResponse::Events { events, floor }) => {
                    let events: Vec<Event> = events.into_iter().map(Event::from).collect();
                    let full = events.len() as u32 >= FETCH_BATCH;
                    let want = source.clone();
                    tokio::task::spawn_blocking(move || verify_batch(events, &want, floor, full))
                        .await
                        .map_err(|e| e.to_string())
                }
                Ok(wire::CatchupResponse::EventsV2 { events, floor }) => {
                    let full = events.len() as u32 >= FETCH_BATCH;
                    let want = source.clone();
                    tokio::task::spawn_blocking(move || verify_batch(events, &want, floor, full))
                        .await
                        .map_err(|e| e.to_string())
                }
                Ok(wire::CatchupResponse::Refused { reason }) => Err(reason),
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

    /// Queue events on the store (in order) and account for the outcome in a
    /// task of its own, so this loop goes on.
    async fn commit(&mut self, events: Vec<Event>, bulk: bool) {
        let rx = match self.ctx.store.append_remote_queued(events).await {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(error = %e, "cannot store events from peers");
                if bulk {
                    self.plan.bulk_failed();
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
fn verify_batch(events: Vec<Event>, source: &str, floor: Option<u64>, full: bool) -> Verified {
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
    Verified {
        fetched: Fetched {
            events: ok,
            floor,
            full,
        },
        rejected,
        bytes,
    }
}

/// Answer a catch-up request from `peer`.
async fn answer(
    ctx: &Arc<Ctx>,
    request: wire::CatchupRequest,
    peer: PeerId,
    done: &mpsc::Sender<Done>,
) -> wire::CatchupResponse {
    match request {
        wire::CatchupRequest::Summary { marks: theirs } => {
            ctx.metrics.antientropy_bytes.inc_by(summary_size(&theirs));
            // Their summary also tells us what to fetch from them.
            let _ = done.send(Done::Summary(peer, theirs)).await;
            match ctx.store.version_vector() {
                Ok(vv) => {
                    let ours = marks(vv);
                    ctx.metrics.antientropy_bytes.inc_by(summary_size(&ours));
                    wire::CatchupResponse::Summary { marks: ours }
                }
                Err(e) => wire::CatchupResponse::Refused {
                    reason: e.to_string(),
                },
            }
        }
        wire::CatchupRequest::Digest { digest } => {
            ctx.metrics.antientropy_bytes.inc_by(DIGEST_BYTES);
            match ctx.store.version_vector() {
                Ok(vv) => {
                    let ours = marks(vv);
                    if wire::marks_digest(&ours) == digest {
                        ctx.metrics.antientropy_bytes.inc_by(DIGEST_BYTES);
                        wire::CatchupResponse::Same
                    } else {
                        ctx.metrics.antientropy_bytes.inc_by(summary_size(&ours));
                        wire::CatchupResponse::Summary { marks: ours }
                    }
                }
                Err(e) => wire::CatchupResponse::Refused {
                    reason: e.to_string(),
                },
            }
        }
        wire::CatchupRequest::Fetch {
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
                Ok(Ok((events, floor))) => wire::CatchupResponse::events(events, floor),
                Ok(Err(e)) => wire::CatchupResponse::Refused {
                    reason: e.to_string(),
                },
                Err(e) => wire::CatchupResponse::Refused {
                    reason: e.to_string(),
                },
            }
        }
    }
}
