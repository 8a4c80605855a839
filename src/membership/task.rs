//! The membership task: one loop that feeds the [`Detector`] from the
//! transport, the probes it asked for, the event log and a tick, and carries
//! out its actions (probes, announcements, refutation); record exchange with
//! each peer over `/riftmesh/member/2` (`/1` with older agents); the graceful leave.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use rand::seq::SliceRandom;
use tokio::sync::mpsc;

use super::detector::{Action, Fact, FactKind, State};
use super::facts::{fact_draft, fact_patterns, idle_draft, parse_fact, HostFacts};
use super::health::{GpuStatus, Health};
use super::idle::{activity, IdleTracker};
use super::incarnation::save_incarnation;
use super::links::Links;
use super::probe::{self, Internal};
use super::sampling::{sample_loop, significant_change};
use super::{
    lock, mismatched, refresh_jobs, subscription_counts, Cmd, Ctx, Inner, LeaveReport, Membership,
    Rec,
};
use crate::event::{self, TypePattern};
use crate::metrics::{label, Labels};
use crate::net::wire::{Heartbeat, MemberInfo, MemberRequest, MemberResponse};
use crate::net::MemberInbound;

/// A link not opened or heard for this long is replaced, if it is a
/// random one (membership::links).
const UNREACHABLE_AFTER: Duration = Duration::from_secs(30);
/// Ticks (250 ms) between two checks of a member held dead, with bounded
/// links: 5 s.
const DEAD_CHECK_TICKS: u64 = 20;

/// Log entries replayed at start to learn members that are not reachable.
const REPLAY_MAX: u64 = 200_000;

pub(super) struct Task {
    pub(super) ctx: Arc<Ctx>,
    pub(super) m: Arc<Membership>,
    pub(super) me: PeerId,
    internal: mpsc::UnboundedSender<Internal>,
    patterns: Vec<TypePattern>,
    cursor: u64,
    /// Per member, the peer and name labels of its `riftmesh_member_state`
    /// series (one per state).
    pub(super) state_series: HashMap<PeerId, Labels>,
    /// Job counters with a `riftmesh_host_jobs` series.
    pub(super) job_series: BTreeSet<String>,
    /// `HOST_ONLINE` waits for the first health sample, whose hardware
    /// figures it carries, until `online_by`; then it goes without them.
    /// Cleared by a leave.
    online_pending: bool,
    online_by: Instant,
    idle: IdleTracker,
    /// The link choice, and the set last handed to the network and the
    /// detector (`Some(None)`: every member).
    links: Links,
    links_sent: Option<Option<BTreeSet<PeerId>>>,
}

/// Run membership until the node stops. `inbound` is the network's
/// membership channel.
pub async fn run(ctx: Arc<Ctx>, mut inbound: mpsc::Receiver<MemberInbound>) {
    let m = ctx.membership.clone();
    let Some(mut cmd_rx) = m.cmd_rx.lock().ok().and_then(|mut c| c.take()) else {
        return;
    };
    let me: PeerId = match ctx.peer_id.parse() {
        Ok(p) => p,
        Err(_) => return,
    };
    let (internal, mut internal_rx) = mpsc::unbounded_channel();
    let (health_tx, mut health_rx) = mpsc::channel(2);
    ctx.tasks.spawn(sample_loop(
        ctx.cfg.data_dir.clone(),
        ctx.cfg.nvidia_smi.clone(),
        ctx.cfg.health_interval,
        health_tx,
    ));
    let mut t = Task {
        cursor: replay_cursor(&ctx),
        ctx: ctx.clone(),
        m,
        me,
        internal,
        patterns: fact_patterns(),
        state_series: HashMap::new(),
        job_series: BTreeSet::new(),
        online_pending: true,
        online_by: Instant::now() + ctx.cfg.online_wait,
        idle: IdleTracker::default(),
        links: Links::new(
            ctx.cfg.full_mesh_max,
            ctx.cfg.link_ring_per_side,
            ctx.cfg.link_random,
            rand::random(),
        ),
        links_sent: None,
    };
    t.follow_log();

    let mut head_rx = ctx.store.watch_head();
    let tick_every = ctx.cfg.detector.tick;
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            msg = inbound.recv() => match msg {
                Some(msg) => t.on_inbound(msg),
                None => break,
            },
            Some(r) = internal_rx.recv() => t.on_internal(r),
            Some(h) = health_rx.recv() => t.on_health(h).await,
            Some(cmd) = cmd_rx.recv() => match cmd {
                Cmd::JobsChanged => t.exchange_all(true),
                Cmd::Leave(reply) => {
                    let report = t.leave().await;
                    let _ = reply.send(report);
                }
            },
            changed = head_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                t.follow_log();
            }
            _ = tick.tick() => {
                ticks += 1;
                t.on_tick(ticks);
            }
        }
        t.run_actions();
    }
}

/// Where the log is read from at start: members we cannot reach yet are
/// learned from recent membership events (those younger than
/// `forget_after`, at most [`REPLAY_MAX`] entries back).
fn replay_cursor(ctx: &Ctx) -> u64 {
    let head = ctx.store.head();
    let since_ms = event::now_ms().saturating_sub(ctx.cfg.detector.forget_after.as_millis() as u64);
    ctx.store
        .seq_before_time(since_ms)
        .unwrap_or(0)
        .max(head.saturating_sub(REPLAY_MAX))
}

impl Task {
    pub(super) fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.m.inner)
    }

    /// The detector's clock, expired jobs (told to every peer at once), and
    /// every fourth tick the metrics.
    fn on_tick(&mut self, ticks: u64) {
        let now = Instant::now();
        let jobs_changed = {
            let mut g = self.inner();
            g.det.tick(now);
            refresh_jobs(&mut g.me, now)
        };
        if jobs_changed {
            self.exchange_all(true);
        }
        if self.online_pending && now >= self.online_by {
            tracing::warn!(
                wait = ?self.ctx.cfg.online_wait,
                "no health sample yet: HOST_ONLINE goes without capabilities"
            );
            self.announce_online();
        }
        if ticks % 4 == 0 {
            self.update_metrics();
            self.choose_links();
        }
        if ticks % DEAD_CHECK_TICKS == 0 {
            self.check_one_dead();
        }
    }

    /// The links for the members held live now; handed to the network and
    /// the detector when they changed. A random link this agent has not
    /// been able to open or hear for [`UNREACHABLE_AFTER`] is replaced.
    fn choose_links(&mut self) {
        let now = Instant::now();
        let (live, unreachable) = {
            let g = self.inner();
            let live: Vec<PeerId> = g
                .det
                .members()
                .filter(|m| matches!(m.state, State::Alive | State::Suspect))
                .map(|m| m.peer)
                .collect();
            let bounded = g.det.links_bounded();
            let unreachable: BTreeSet<PeerId> = g
                .det
                .members()
                .filter(|m| bounded && g.det.is_link(&m.peer) && !m.connected)
                .filter(|m| now.saturating_duration_since(m.quiet_since()) > UNREACHABLE_AFTER)
                .map(|m| m.peer)
                .collect();
            (live, unreachable)
        };
        let links = self.links.choose(&self.me, &live, &unreachable);
        if self.links_sent.as_ref() == Some(&links) {
            return;
        }
        let was_bounded = matches!(self.links_sent, Some(Some(_)));
        // Back to a full mesh: the network dials every live member once
        // (none of the earlier non-links is connected).
        let dial = if was_bounded && links.is_none() {
            live.clone()
        } else {
            Vec::new()
        };
        let to_net = links.as_ref().map(|l| l.iter().copied().collect());
        if !self.ctx.net.try_set_links(to_net, dial) {
            // The network's queue is full: again at the next choice.
            return;
        }
        match &links {
            Some(l) if was_bounded => {
                tracing::debug!(links = l.len(), members = live.len() + 1, "links changed")
            }
            Some(l) => tracing::info!(links = l.len(), members = live.len() + 1, "links bounded"),
            None if self.links_sent.is_some() => {
                tracing::info!(members = live.len() + 1, "links to every member")
            }
            None => {}
        }
        self.inner()
            .det
            .set_links(links.as_ref().map(|l| l.iter().copied().collect()));
        self.links_sent = Some(links);
    }

    /// With bounded links, every [`DEAD_CHECK_TICKS`] ticks: an exchange
    /// with one member held dead (not left), dialling it. A partition that
    /// lasted long enough for each side to bury the other heals this way:
    /// no dead member is a link, and nothing else would dial across. A
    /// member that is alive learns from this agent's log (catch-up on the
    /// new connection) that it was declared dead, and refutes.
    fn check_one_dead(&mut self) {
        let dead: Vec<PeerId> = {
            let g = self.inner();
            if !g.det.links_bounded() {
                return;
            }
            g.det
                .members()
                .filter(|m| m.state == State::Dead && !m.connected)
                .map(|m| m.peer)
                .collect()
        };
        if let Some(p) = dead.choose(&mut rand::thread_rng()) {
            self.exchange(*p);
        }
    }

    fn on_inbound(&mut self, msg: MemberInbound) {
        let now = Instant::now();
        match msg {
            MemberInbound::Connected(p) => {
                {
                    let mut g = self.inner();
                    g.me.delivered.remove(&p);
                    g.det.connected(p, now);
                }
                self.exchange(p);
            }
            MemberInbound::Disconnected(p) => {
                let mut g = self.inner();
                g.me.delivered.remove(&p);
                g.det.disconnected(p, now);
            }
            MemberInbound::Rtt(p, rtt) => self.inner().det.rtt(p, rtt, now),
            MemberInbound::Request {
                peer,
                request,
                channel,
            } => {
                let response = match request {
                    MemberRequest::Exchange {
                        beat,
                        info,
                        have_yours,
                    } => {
                        let mut g = self.inner();
                        Self::store_record(&mut g, peer, *beat, info.map(|i| *i), now);
                        let include = have_yours != g.me.info.version;
                        MemberResponse::Exchange {
                            beat: Box::new(g.me.beat.clone()),
                            info: include.then(|| Box::new(g.me.info.clone())),
                        }
                    }
                    MemberRequest::Ping { .. } => {
                        let mut g = self.inner();
                        g.det.heard(peer, now);
                        MemberResponse::Pong {
                            incarnation: g.det.incarnation(),
                        }
                    }
                    MemberRequest::Leave { incarnation } => {
                        self.inner().det.left(peer, incarnation, now);
                        MemberResponse::Done
                    }
                    MemberRequest::ProbeFor { target } => {
                        let target = PeerId::from_bytes(&target).ok();
                        let gone = target.is_some_and(|t| self.inner().det.settled_gone(&t));
                        probe::answer_for(
                            self.ctx.net.clone(),
                            channel,
                            target,
                            self.me,
                            gone,
                            self.m.incarnation(),
                            self.ctx.cfg.detector.probe_timeout,
                        );
                        return;
                    }
                };
                let net = self.ctx.net.clone();
                tokio::spawn(async move { net.member_respond(channel, response).await });
            }
        }
    }

    fn store_record(
        g: &mut Inner,
        peer: PeerId,
        beat: Heartbeat,
        info: Option<MemberInfo>,
        now: Instant,
    ) {
        let rec = g.recs.entry(peer).or_insert(Rec {
            info: None,
            beat: None,
            beat_at: None,
        });
        if let Some(info) = info {
            rec.info = Some(info);
        }
        let inc = beat.incarnation;
        rec.beat = Some(beat);
        rec.beat_at = Some(now);
        match rec.info.as_ref().map(|i| i.name.clone()) {
            Some(name) => g.det.record(peer, &name, inc, now),
            None => g.det.heard(peer, now),
        }
    }

    fn on_internal(&mut self, r: Internal) {
        let now = Instant::now();
        match r {
            Internal::Direct(p, result) => self.inner().det.probe_result(p, result, now),
            Internal::Indirect {
                target,
                helper,
                reached,
            } => self
                .inner()
                .det
                .indirect_result(target, helper, reached, now),
            Internal::Exchanged {
                peer,
                sent_info,
                response,
            } => {
                if let MemberResponse::Exchange { beat, info } = *response {
                    let mut g = self.inner();
                    g.me.delivered.insert(peer, sent_info);
                    Self::store_record(&mut g, peer, *beat, info.map(|i| *i), now);
                }
            }
        }
    }

    /// Send our record to `peer` and take its own back.
    fn exchange(&self, peer: PeerId) {
        let req = {
            let g = self.inner();
            let v = g.me.info.version;
            let include = g.me.delivered.get(&peer) != Some(&v);
            let have_yours = g
                .recs
                .get(&peer)
                .and_then(|r| r.info.as_ref())
                .map_or(0, |i| i.version);
            (
                MemberRequest::Exchange {
                    beat: Box::new(g.me.beat.clone()),
                    info: include.then(|| Box::new(g.me.info.clone())),
                    have_yours,
                },
                v,
            )
        };
        let (request, sent_info) = req;
        let net = self.ctx.net.clone();
        let tx = self.internal.clone();
        tokio::spawn(async move {
            if let Ok(Ok(response)) =
                tokio::time::timeout(Duration::from_secs(10), net.member_request(peer, request))
                    .await
            {
                let _ = tx.send(Internal::Exchanged {
                    peer,
                    sent_info,
                    response: Box::new(response),
                });
            }
        });
    }

    /// Exchange with connected peers: all of them (`all`: something changed),
    /// or those whose peer id sorts after ours (the periodic round: one
    /// exchange per pair carries both records). With bounded links, with
    /// every connected link, each side with its own (a random link is one
    /// side's only; no other connection is kept in use by exchanges).
    fn exchange_all(&self, all: bool) {
        let mine = self.me.to_bytes();
        let g = self.inner();
        let bounded = g.det.links_bounded();
        let peers: Vec<PeerId> = g
            .det
            .members()
            .filter(|m| m.connected && m.state != State::Left)
            .filter(|m| {
                if bounded {
                    g.det.is_link(&m.peer)
                } else {
                    all || m.peer.to_bytes() > mine
                }
            })
            .map(|m| m.peer)
            .collect();
        drop(g);
        for p in peers {
            self.exchange(p);
        }
    }

    async fn on_health(&mut self, h: Health) {
        let addrs = self.ctx.net.listen_addr_texts().await;
        // This host's consumers per type pattern, told to every peer at
        // once when they change.
        let subs = match self.ctx.store.consumers() {
            Ok(cs) => Some(subscription_counts(&cs)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the consumers for the health record");
                None
            }
        };
        let significant = {
            let mut g = self.inner();
            let mut changed = false;
            if !addrs.is_empty() && addrs != g.me.info.addrs {
                g.me.info.addrs = addrs;
                g.me.info.version += 1;
                g.me.beat.info_version = g.me.info.version;
                changed = true;
            }
            changed |= significant_change(&g.me.beat.health, &h);
            g.me.beat.health = h;
            if subs.is_some() && subs != g.me.beat.subs {
                g.me.beat.subs = subs;
                changed = true;
            }
            changed
        };
        self.update_host_metrics();
        // Periodic: one exchange per pair; a significant change: everyone now.
        self.exchange_all(significant);
        // A leaving agent announces nothing more about itself: HOST_LEFT
        // is its last word at this incarnation.
        if self.leaving() {
            return;
        }
        if self.online_pending {
            self.announce_online();
        }
        self.check_idle();
    }

    /// Whether this agent is leaving or left the cluster.
    fn leaving(&self) -> bool {
        self.inner().me.leaving
    }

    /// `IDLE_RESOURCE_DETECTED` about this host, once per idle period.
    fn check_idle(&mut self) {
        let after = self.ctx.cfg.idle_after;
        let below = self.ctx.cfg.idle_gpu_util_pct;
        let (a, name, tags) = {
            let g = self.inner();
            (
                activity(&g.me.beat.health, &g.me.beat.jobs, below),
                g.me.info.name.clone(),
                g.me.info.tags.clone(),
            )
        };
        let Some(report) = self.idle.observe(after, event::now_ms(), a) else {
            return;
        };
        let Some(draft) = idle_draft(&self.me, &name, &tags, below, &report) else {
            return;
        };
        tracing::info!(
            idle_since_ms = report.idle_since_ms,
            idle_for_ms = report.idle_for_ms,
            "this host is idle: IDLE_RESOURCE_DETECTED"
        );
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = ctx.publisher.publish(vec![draft]).await {
                tracing::warn!(error = %e, "cannot publish IDLE_RESOURCE_DETECTED");
            }
        });
    }

    fn follow_log(&mut self) {
        loop {
            let (batch, last) =
                match self
                    .ctx
                    .store
                    .read_after(self.cursor, 512, 20_000, &self.patterns)
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "membership cannot read the event log");
                        return;
                    }
                };
            let now = Instant::now();
            for (_, stored) in batch {
                let ev = &stored.event;
                match parse_fact(&ev.event_type, &ev.payload) {
                    Ok(Some(f)) => self.inner().det.fact(&f, now),
                    Ok(None) => {}
                    Err(e) => {
                        self.ctx
                            .metrics
                            .events_rejected
                            .get_or_create(&label("reason", "membership_payload"))
                            .inc();
                        tracing::warn!(id = %ev.id, source = %ev.source, error = %e, "membership event ignored");
                    }
                }
            }
            if last == self.cursor {
                return;
            }
            self.cursor = last;
        }
    }

    fn announce(&self, f: Fact) {
        // HOST_ONLINE carries the host's tags and hardware from its own
        // record: this agent's own, or the one the member sent us. A member
        // whose record has not arrived gets none (the key leaves them out,
        // so the first copy stored is the fact).
        let draft = {
            let g = self.inner();
            let own = (f.peer == self.me).then_some((&g.me.info.tags, Some(&g.me.beat.health)));
            let host = own
                .or_else(|| {
                    let r = g.recs.get(&f.peer)?;
                    Some((&r.info.as_ref()?.tags, r.beat.as_ref().map(|b| &b.health)))
                })
                .map(|(tags, health)| HostFacts {
                    tags,
                    // Not sampled yet: no capabilities rather than zeros.
                    health: health.filter(|h| h.sampled_ms != 0),
                });
            fact_draft(&f, host)
        };
        let Some(draft) = draft else {
            return;
        };
        tracing::info!(event = f.kind.event_type(), node = %f.peer, name = %f.name, incarnation = f.incarnation, "membership fact");
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = ctx.publisher.publish(vec![draft]).await {
                tracing::warn!(error = %e, "cannot publish a membership event");
            }
        });
    }

    /// `HOST_ONLINE` of this agent, at its current incarnation (once; never
    /// once it is leaving).
    fn announce_online(&mut self) {
        if !std::mem::take(&mut self.online_pending) || self.leaving() {
            return;
        }
        let (name, inc) = {
            let g = self.inner();
            (g.me.info.name.clone(), g.det.incarnation())
        };
        self.announce(Fact {
            kind: FactKind::Online,
            peer: self.me,
            name,
            incarnation: inc,
        });
    }

    fn run_actions(&mut self) {
        let actions = self.inner().det.take_actions();
        let timeout = self.ctx.cfg.detector.probe_timeout;
        for a in actions {
            match a {
                Action::ProbeDirect(p) => probe::direct(
                    self.ctx.net.clone(),
                    self.internal.clone(),
                    p,
                    self.m.incarnation(),
                    timeout,
                ),
                Action::ProbeIndirect { target, helpers } => {
                    probe::indirect(&self.ctx.net, &self.internal, target, helpers, timeout)
                }
                Action::Announce(f) => self.announce(f),
                Action::Refute { incarnation } => {
                    tracing::warn!(
                        incarnation,
                        "this agent was suspected or declared dead by a peer: refuting with a higher incarnation"
                    );
                    save_incarnation(&self.ctx.cfg.data_dir, incarnation);
                    self.inner().me.beat.incarnation = incarnation;
                    self.exchange_all(true);
                }
                Action::Transition { peer, from, to } => {
                    let name = self
                        .inner()
                        .det
                        .member(&peer)
                        .and_then(|m| m.name.clone())
                        .unwrap_or_default();
                    tracing::info!(%peer, %name, from = from.as_str(), to = to.as_str(), "member state changed");
                    self.ctx
                        .metrics
                        .member_transitions
                        .get_or_create(&vec![
                            ("from", from.as_str().to_string()),
                            ("to", to.as_str().to_string()),
                        ])
                        .inc();
                    self.update_member_state();
                }
                Action::Forget(peer) => {
                    let name = self
                        .inner()
                        .recs
                        .remove(&peer)
                        .and_then(|r| r.info.map(|i| i.name))
                        .unwrap_or_default();
                    tracing::info!(%peer, %name, "member forgotten");
                    let l = peer_labels(&peer, &name);
                    self.ctx.metrics.member_last_heard.remove(&l);
                    self.ctx.metrics.member_rtt.remove(&l);
                    self.update_member_state();
                }
            }
        }
    }

    async fn leave(&mut self) -> LeaveReport {
        // Nothing more about this agent at this incarnation after HOST_LEFT:
        // no late HOST_ONLINE (a sample taken while the peers are told is
        // handled after the leave), no idle report.
        self.online_pending = false;
        let (inc, peers) = {
            let mut g = self.inner();
            g.me.leaving = true;
            let peers: Vec<PeerId> = g
                .det
                .members()
                .filter(|m| m.connected)
                .map(|m| m.peer)
                .collect();
            (g.det.incarnation(), peers)
        };
        let draft = {
            let g = self.inner();
            fact_draft(
                &Fact {
                    kind: FactKind::Left,
                    peer: self.me,
                    name: g.me.info.name.clone(),
                    incarnation: inc,
                },
                None,
            )
        };
        if let Some(d) = draft {
            if let Err(e) = self.ctx.publisher.publish(vec![d]).await {
                tracing::warn!(error = %e, "cannot publish HOST_LEFT");
            }
        }
        let mut tasks = Vec::new();
        for p in &peers {
            let net = self.ctx.net.clone();
            let p = *p;
            tasks.push(tokio::spawn(async move {
                matches!(
                    tokio::time::timeout(
                        Duration::from_secs(2),
                        net.member_request(p, MemberRequest::Leave { incarnation: inc })
                    )
                    .await,
                    Ok(Ok(MemberResponse::Done))
                )
            }));
        }
        let mut acked = 0;
        for t in tasks {
            if matches!(t.await, Ok(true)) {
                acked += 1;
            }
        }
        tracing::info!(
            incarnation = inc,
            told = peers.len(),
            acked,
            "left the cluster"
        );
        LeaveReport {
            incarnation: inc,
            peers_told: peers.len(),
            peers_acked: acked,
        }
    }
}

// ---- the Prometheus series membership keeps (per member state, last heard
// and RTT, member counts, the voter-list mismatch, this host's health and
// job counters) ----

impl Task {
    /// `riftmesh_member_state`: per member, one series per state (the
    /// kube-state-metrics pattern): 1 for its current state, 0 for the
    /// others, so a change of state changes values, not series. The series
    /// of a forgotten member, or of its old name, are removed.
    pub(super) fn update_member_state(&mut self) {
        const STATES: [&str; 4] = ["alive", "suspect", "dead", "left"];
        let now: HashMap<PeerId, (Labels, &'static str)> = {
            let g = self.inner();
            g.det
                .members()
                .map(|m| {
                    let l = peer_labels(&m.peer, m.name.as_deref().unwrap_or(""));
                    let state = STATES
                        .iter()
                        .find(|s| **s == m.state.as_str())
                        .copied()
                        .unwrap_or("dead");
                    (m.peer, (l, state))
                })
                .chain(std::iter::once((
                    self.me,
                    (peer_labels(&self.me, &g.me.info.name), "alive"),
                )))
                .collect()
        };
        let with_state = |l: &Labels, s: &str| -> Labels {
            let mut l = l.clone();
            l.push(("state", s.to_string()));
            l
        };
        let mx = &self.ctx.metrics;
        for (peer, old) in &self.state_series {
            if now.get(peer).map(|(l, _)| l) != Some(old) {
                for s in STATES {
                    mx.member_state.remove(&with_state(old, s));
                }
            }
        }
        for (l, current) in now.values() {
            for s in STATES {
                mx.member_state
                    .get_or_create(&with_state(l, s))
                    .set(i64::from(s == *current));
            }
        }
        self.state_series = now.into_iter().map(|(p, (l, _))| (p, l)).collect();
    }

    pub(super) fn update_metrics(&mut self) {
        self.update_member_state();
        let g = self.inner();
        let now = Instant::now();
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for s in ["alive", "suspect", "dead", "left"] {
            counts.insert(s, 0);
        }
        *counts.entry("alive").or_default() += 1; // this agent
        let mx = &self.ctx.metrics;
        for m in g.det.members() {
            *counts.entry(m.state.as_str()).or_default() += 1;
            let l = peer_labels(&m.peer, m.name.as_deref().unwrap_or(""));
            if let Some(h) = m.last_heard {
                mx.member_last_heard
                    .get_or_create(&l)
                    .set(now.saturating_duration_since(h).as_secs_f64());
            }
            if let Some(r) = m.rtt {
                mx.member_rtt.get_or_create(&l).set(r.as_secs_f64());
            }
        }
        for (s, n) in counts {
            mx.members.get_or_create(&label("state", s)).set(n);
        }
        mx.incarnation.set(g.det.incarnation() as i64);
        // Members with another voter list: reported loudly, every minute.
        let odd = mismatched(&g, g.me.info.voters_hash);
        mx.voter_mismatch.set(odd.len() as i64);
        let every_minute = self.m.started.elapsed().as_secs() % 60 == 0;
        if !odd.is_empty() && every_minute {
            tracing::error!(members = ?odd, "these members have a different voter list than this agent: fix the config so every host has the same `voters`; raft traffic between different lists is refused");
        }
        // The detector counts stalls; the counter follows it.
        let stalls = g.det.stalls;
        let seen = mx.detector_stalls.get();
        if stalls > seen {
            mx.detector_stalls.inc_by(stalls - seen);
        }
    }

    pub(super) fn update_host_metrics(&mut self) {
        let g = self.inner();
        let h = &g.me.beat.health;
        let mx = &self.ctx.metrics;
        mx.host_cpu_use.set(h.cpu_use_pct as f64 / 100.0);
        mx.host_load1.set(h.load1 as f64);
        mx.host_mem_used.set(h.mem_used_bytes as i64);
        mx.host_mem_total.set(h.mem_total_bytes as i64);
        mx.host_disk_free.set(h.disk_free_bytes as i64);
        mx.host_disk_total.set(h.disk_total_bytes as i64);
        if let GpuStatus::Present(gpus) = &h.gpu {
            for gpu in gpus {
                let l = label("gpu", gpu.index.to_string());
                if let Some(u) = gpu.util_pct {
                    mx.host_gpu_util.get_or_create(&l).set(u as f64 / 100.0);
                }
                if let Some(t) = gpu.temp_c {
                    mx.host_gpu_temp.get_or_create(&l).set(t as f64);
                }
                if let Some(m) = gpu.mem_used_mib {
                    mx.host_gpu_mem_used
                        .get_or_create(&l)
                        .set((m as f64) * 1048576.0);
                }
            }
        }
        // `kind`, not `job`: Prometheus' own `job` label would rename ours.
        let jobs: BTreeSet<String> = g.me.beat.jobs.iter().map(|(k, _)| k.clone()).collect();
        for gone in self.job_series.difference(&jobs) {
            mx.host_jobs.remove(&label("kind", gone.clone()));
        }
        for (k, v) in &g.me.beat.jobs {
            mx.host_jobs
                .get_or_create(&label("kind", k.clone()))
                .set(*v);
        }
        drop(g);
        self.job_series = jobs;
    }
}

fn peer_labels(peer: &PeerId, name: &str) -> Vec<(&'static str, String)> {
    vec![("peer", peer.to_base58()), ("name", name.to_string())]
}
