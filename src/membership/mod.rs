//! Membership: every agent's record (name, incarnation, health, jobs, tags)
//! exchanged directly with each peer over `/riftmesh/member/1`, the failure
//! detector of [`detector`] fed by the transport and by probes, and the
//! membership events (`HOST_ONLINE`, `NODE_SUSPECT`, `HOST_OFFLINE`,
//! `NODE_RECOVERED`, `HOST_LEFT`) through the normal event path.

pub mod detector;
pub mod health;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::config::AgentConfig;
use crate::event::{self, Draft, TypePattern};
use crate::keys::write_private;
use crate::metrics::Metrics;
use crate::metrics::{label, Labels};
use crate::net::wire::{Heartbeat, MemberInfo, MemberRequest, MemberResponse};
use crate::net::NetHandle;
use crate::net::{MemberInbound, RequestError, AGENT_VERSION};
use crate::publisher::Publisher;
use crate::store::Store;

/// What the membership task works with (handed over by the node at start).
pub struct Ctx {
    pub membership: Arc<Membership>,
    pub cfg: Arc<AgentConfig>,
    pub store: Store,
    pub net: NetHandle,
    pub metrics: Metrics,
    pub publisher: Publisher,
    /// This agent's peer id (base58).
    pub peer_id: String,
    /// Owner of the long-lived tasks (stopped with the agent).
    pub tasks: crate::tasks::Tasks,
}
use detector::{Action, Detector, Fact, FactKind, Failure, State};
use health::{GpuStatus, Health};

/// Origin written on membership events.
pub const ORIGIN: &str = "riftmesh/membership";
/// Most job counters one agent carries.
pub const MAX_JOBS: usize = 64;
/// Incarnations further than this ahead of our clock are refused (a forged
/// fact at u64::MAX could never be refuted).
const MAX_INCARNATION_AHEAD_MS: u64 = 24 * 3600 * 1000;
/// Log entries replayed at start to learn members that are not reachable.
const REPLAY_MAX: u64 = 200_000;

#[derive(Clone, Debug)]
struct Job {
    value: f64,
    expires: Option<Instant>,
}

struct Rec {
    info: Option<MemberInfo>,
    beat: Option<Heartbeat>,
}

struct Local {
    info: MemberInfo,
    beat: Heartbeat,
    jobs: BTreeMap<String, Job>,
    /// Per peer, the version of our info it acknowledged.
    delivered: HashMap<PeerId, u64>,
    leaving: bool,
}

struct Inner {
    det: Detector,
    recs: HashMap<PeerId, Rec>,
    me: Local,
}

enum Cmd {
    JobsChanged,
    Leave(oneshot::Sender<LeaveReport>),
}

/// What a graceful leave reached.
#[derive(Debug, Clone, Serialize)]
pub struct LeaveReport {
    pub incarnation: u64,
    pub peers_told: usize,
    pub peers_acked: usize,
}

/// One row of `riftmesh members`.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub name: Option<String>,
    pub peer_id: String,
    pub is_self: bool,
    pub state: &'static str,
    pub incarnation: u64,
    pub state_since_ms_ago: u64,
    pub connected: bool,
    pub last_heard_ms_ago: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub addresses: Vec<String>,
    pub agent_version: Option<String>,
    pub started_ms: Option<u64>,
    pub tags: BTreeMap<String, String>,
    pub jobs: BTreeMap<String, f64>,
    pub health: Option<Health>,
    pub voters_hash: Option<String>,
}

/// Errors of the jobs API.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("job name {0:?}: use 1-64 letters, digits, '_', '-' or '.'")]
    Name(String),
    #[error("job {0:?}: the value must be a finite number")]
    Value(String),
    #[error("at most {MAX_JOBS} job counters per agent")]
    TooMany,
}

pub struct Membership {
    inner: Mutex<Inner>,
    cmd_tx: mpsc::Sender<Cmd>,
    cmd_rx: Mutex<Option<mpsc::Receiver<Cmd>>>,
    started: Instant,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// This start's incarnation: above the last one written and at least the
/// wall clock in ms, so a restarted agent always outranks its old self.
pub fn next_incarnation(data_dir: &Path) -> std::io::Result<u64> {
    let path = data_dir.join("incarnation");
    let last = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let inc = last.saturating_add(1).max(event::now_ms());
    write_private(&path, inc.to_string().as_bytes())?;
    Ok(inc)
}

fn save_incarnation(data_dir: &Path, inc: u64) {
    if let Err(e) = write_private(&data_dir.join("incarnation"), inc.to_string().as_bytes()) {
        tracing::error!(error = %e, dir = %data_dir.display(), "cannot record the incarnation");
    }
}

fn valid_job_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

impl Membership {
    pub fn new(
        peer: PeerId,
        name: &str,
        tags: &[(String, String)],
        incarnation: u64,
        cfg: detector::DetectorConfig,
    ) -> Arc<Membership> {
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let info = MemberInfo {
            version: 1,
            name: name.to_string(),
            agent_version: AGENT_VERSION.to_string(),
            started_ms: event::now_ms(),
            addrs: Vec::new(),
            tags: tags.to_vec(),
            voters_hash: None,
        };
        let beat = Heartbeat {
            incarnation,
            info_version: 1,
            health: Health::default(),
            jobs: Vec::new(),
        };
        let seed = rand::random();
        Arc::new(Membership {
            inner: Mutex::new(Inner {
                det: Detector::new(cfg, peer, name.to_string(), incarnation, seed),
                recs: HashMap::new(),
                me: Local {
                    info,
                    beat,
                    jobs: BTreeMap::new(),
                    delivered: HashMap::new(),
                    leaving: false,
                },
            }),
            cmd_tx,
            cmd_rx: Mutex::new(Some(cmd_rx)),
            started: Instant::now(),
        })
    }

    pub fn incarnation(&self) -> u64 {
        lock(&self.inner).det.incarnation()
    }

    /// Set (or with `None`, remove) job counters reported by local processes.
    pub async fn set_jobs(
        &self,
        jobs: BTreeMap<String, Option<f64>>,
        ttl: Option<Duration>,
    ) -> Result<BTreeMap<String, f64>, JobsError> {
        for (k, v) in &jobs {
            if !valid_job_name(k) {
                return Err(JobsError::Name(k.clone()));
            }
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(JobsError::Value(k.clone()));
            }
        }
        let out = {
            let mut g = lock(&self.inner);
            let mut next = g.me.jobs.clone();
            for (k, v) in jobs {
                match v {
                    Some(value) => {
                        next.insert(
                            k,
                            Job {
                                value,
                                expires: ttl.map(|t| Instant::now() + t),
                            },
                        );
                    }
                    None => {
                        next.remove(&k);
                    }
                }
            }
            if next.len() > MAX_JOBS {
                return Err(JobsError::TooMany);
            }
            g.me.jobs = next;
            refresh_jobs(&mut g.me);
            g.me.jobs
                .iter()
                .map(|(k, j)| (k.clone(), j.value))
                .collect()
        };
        let _ = self.cmd_tx.try_send(Cmd::JobsChanged);
        Ok(out)
    }

    /// Announce a graceful leave: `HOST_LEFT`, and a direct word to every
    /// connected peer. The agent should stop afterwards.
    pub async fn leave(&self) -> Option<LeaveReport> {
        let (tx, rx) = oneshot::channel();
        self.cmd_tx.send(Cmd::Leave(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Set the hash of this agent's voter list, carried in its info.
    pub fn set_voters_hash(&self, h: Option<[u8; 32]>) {
        let mut g = lock(&self.inner);
        if g.me.info.voters_hash != h {
            g.me.info.voters_hash = h;
            g.me.info.version += 1;
            g.me.beat.info_version = g.me.info.version;
        }
    }

    /// Peers this agent holds a connection to.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        lock(&self.inner)
            .det
            .members()
            .filter(|m| m.connected)
            .map(|m| m.peer)
            .collect()
    }

    /// Whether this agent holds a connection to `peer`.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        lock(&self.inner)
            .det
            .member(peer)
            .is_some_and(|m| m.connected)
    }

    /// The listen addresses a member last reported, with its peer id
    /// appended (ready to dial).
    pub fn dial_addrs(&self, peer: &PeerId) -> Vec<libp2p::Multiaddr> {
        let g = lock(&self.inner);
        g.recs
            .get(peer)
            .and_then(|r| r.info.as_ref())
            .map(|i| {
                i.addrs
                    .iter()
                    .filter_map(|a| a.parse::<libp2p::Multiaddr>().ok())
                    .map(|a| a.with_p2p(*peer).unwrap_or_else(|a| a))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The live member (alive or suspect) called `name`, at its highest incarnation.
    pub fn peer_by_name(&self, name: &str) -> Option<PeerId> {
        let g = lock(&self.inner);
        g.det
            .members()
            .filter(|m| m.name.as_deref() == Some(name))
            .filter(|m| matches!(m.state, State::Alive | State::Suspect))
            .max_by_key(|m| m.incarnation)
            .map(|m| m.peer)
    }

    /// The peer that goes by `name`, live or not: a live one first, else the
    /// last one heard of. Peer ids survive restarts, so a member held dead
    /// here can still be dialled; it is back as soon as a connection opens.
    pub fn peer_for_name(&self, name: &str) -> Option<PeerId> {
        let g = lock(&self.inner);
        g.det
            .members()
            .filter(|m| m.name.as_deref() == Some(name))
            .max_by_key(|m| {
                (
                    matches!(m.state, State::Alive | State::Suspect),
                    m.incarnation,
                )
            })
            .map(|m| m.peer)
    }

    /// Names of live members whose voter list hash differs from `mine`.
    pub fn voter_list_mismatch(&self, mine: Option<[u8; 32]>) -> Vec<String> {
        mismatched(&lock(&self.inner), mine)
    }

    /// Every member this agent knows, itself first.
    pub fn members(&self, net_listen: &[String]) -> Vec<MemberView> {
        let g = lock(&self.inner);
        let now = Instant::now();
        let ms = |d: Duration| d.as_millis() as u64;
        let me = &g.me;
        let mut addrs = me.info.addrs.clone();
        if addrs.is_empty() {
            addrs = net_listen.to_vec();
        }
        let mut out = vec![MemberView {
            name: Some(me.info.name.clone()),
            peer_id: String::new(),
            is_self: true,
            state: if me.leaving { "left" } else { "alive" },
            incarnation: g.det.incarnation(),
            state_since_ms_ago: ms(now.duration_since(self.started)),
            connected: true,
            last_heard_ms_ago: Some(0),
            rtt_ms: None,
            addresses: addrs,
            agent_version: Some(me.info.agent_version.clone()),
            started_ms: Some(me.info.started_ms),
            tags: me.info.tags.iter().cloned().collect(),
            jobs: me.beat.jobs.iter().cloned().collect(),
            health: Some(me.beat.health.clone()),
            voters_hash: me.info.voters_hash.map(hex::encode),
        }];
        let mut rest: Vec<MemberView> = g
            .det
            .members()
            .map(|m| {
                let rec = g.recs.get(&m.peer);
                let info = rec.and_then(|r| r.info.as_ref());
                let beat = rec.and_then(|r| r.beat.as_ref());
                MemberView {
                    name: m.name.clone(),
                    peer_id: m.peer.to_base58(),
                    is_self: false,
                    state: m.state.as_str(),
                    incarnation: m.incarnation,
                    state_since_ms_ago: ms(now.saturating_duration_since(m.since)),
                    connected: m.connected,
                    last_heard_ms_ago: m.last_heard.map(|h| ms(now.saturating_duration_since(h))),
                    rtt_ms: m.rtt.map(|r| r.as_secs_f64() * 1000.0),
                    addresses: info.map(|i| i.addrs.clone()).unwrap_or_default(),
                    agent_version: info.map(|i| i.agent_version.clone()),
                    started_ms: info.map(|i| i.started_ms),
                    tags: info
                        .map(|i| i.tags.iter().cloned().collect())
                        .unwrap_or_default(),
                    jobs: beat
                        .map(|b| b.jobs.iter().cloned().collect())
                        .unwrap_or_default(),
                    health: beat.map(|b| b.health.clone()),
                    voters_hash: info.and_then(|i| i.voters_hash.map(hex::encode)),
                }
            })
            .collect();
        rest.sort_by(|a, b| a.name.cmp(&b.name).then(a.peer_id.cmp(&b.peer_id)));
        out.extend(rest);
        out
    }
}

/// Names of live members whose voter-list hash differs from `mine`, sorted.
fn mismatched(g: &Inner, mine: Option<[u8; 32]>) -> Vec<String> {
    let mut out: Vec<String> = g
        .det
        .members()
        .filter(|m| matches!(m.state, State::Alive | State::Suspect))
        .filter_map(|m| {
            let info = g.recs.get(&m.peer)?.info.as_ref()?;
            (info.voters_hash != mine).then(|| info.name.clone())
        })
        .collect();
    out.sort();
    out
}

/// Drop expired jobs and copy the rest into the heartbeat. True if it changed.
fn refresh_jobs(me: &mut Local) -> bool {
    let now = Instant::now();
    me.jobs.retain(|_, j| j.expires.is_none_or(|e| e > now));
    let jobs: Vec<(String, f64)> = me.jobs.iter().map(|(k, j)| (k.clone(), j.value)).collect();
    if jobs != me.beat.jobs {
        me.beat.jobs = jobs;
        true
    } else {
        false
    }
}

/// Results of the requests the loop sent, back into the loop.
enum Internal {
    Direct(PeerId, Result<(), Failure>),
    Indirect {
        target: PeerId,
        helper: PeerId,
        reached: Option<bool>,
    },
    Exchanged {
        peer: PeerId,
        sent_info: u64,
        response: Box<MemberResponse>,
    },
}

fn fact_draft(f: &Fact) -> Option<Draft> {
    let payload = json!({
        "node": f.peer.to_base58(),
        "name": f.name,
        "incarnation": f.incarnation,
    });
    // Several hosts report one observation: one fact per node and
    // incarnation whoever reports it and however late (events.md §13).
    Draft::new(
        f.kind.event_type(),
        &payload,
        Some(ORIGIN.to_string()),
        None,
        None,
    )
    .and_then(|d| d.with_idem_key(Some(format!("{}/{}", f.peer.to_base58(), f.incarnation))))
    .ok()
}

#[derive(serde::Deserialize)]
struct FactPayload {
    node: String,
    name: String,
    incarnation: u64,
}

fn parse_fact(event_type: &str, payload: &str) -> Result<Option<Fact>, String> {
    let Some(kind) = FactKind::from_event_type(event_type) else {
        return Ok(None);
    };
    let p: FactPayload = serde_json::from_str(payload).map_err(|e| e.to_string())?;
    let peer = p
        .node
        .parse::<PeerId>()
        .map_err(|e| format!("node {:?}: {e}", p.node))?;
    if p.incarnation > event::now_ms().saturating_add(MAX_INCARNATION_AHEAD_MS) {
        return Err(format!(
            "incarnation {} is far ahead of the clock",
            p.incarnation
        ));
    }
    Ok(Some(Fact {
        kind,
        peer,
        name: p.name,
        incarnation: p.incarnation,
    }))
}

struct Task {
    ctx: Arc<Ctx>,
    m: Arc<Membership>,
    me: PeerId,
    internal: mpsc::UnboundedSender<Internal>,
    patterns: Vec<TypePattern>,
    cursor: u64,
    /// Per member, the peer and name labels of its `riftmesh_member_state`
    /// series (one per state).
    state_series: HashMap<PeerId, Labels>,
    /// Job counters with a `riftmesh_host_jobs` series.
    job_series: BTreeSet<String>,
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
    let patterns = [
        "HOST_ONLINE",
        "NODE_SUSPECT",
        "HOST_OFFLINE",
        "NODE_RECOVERED",
        "HOST_LEFT",
    ]
    .iter()
    .filter_map(|p| TypePattern::parse(p).ok())
    .collect();
    let mut t = Task {
        cursor: 0,
        ctx: ctx.clone(),
        m: m.clone(),
        me,
        internal,
        patterns,
        state_series: HashMap::new(),
        job_series: BTreeSet::new(),
    };
    // Members we cannot reach yet are learned from recent membership events.
    let head = ctx.store.head();
    let since_ms = event::now_ms().saturating_sub(ctx.cfg.detector.forget_after.as_millis() as u64);
    t.cursor = ctx
        .store
        .seq_before_time(since_ms)
        .unwrap_or(0)
        .max(head.saturating_sub(REPLAY_MAX));
    t.follow_log();
    t.announce_self(FactKind::Online);

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
                let jobs_changed = {
                    let mut g = lock(&m.inner);
                    g.det.tick(Instant::now());
                    refresh_jobs(&mut g.me)
                };
                if jobs_changed {
                    t.exchange_all(true);
                }
                if ticks % 4 == 0 {
                    t.update_metrics();
                }
            }
        }
        t.run_actions();
    }
}

impl Task {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.m.inner)
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
                        let Ok(target) = PeerId::from_bytes(&target) else {
                            let net = self.ctx.net.clone();
                            tokio::spawn(async move {
                                net.member_respond(
                                    channel,
                                    MemberResponse::Refused {
                                        reason: "target is not a peer id".into(),
                                    },
                                )
                                .await
                            });
                            return;
                        };
                        let gone = self.inner().det.settled_gone(&target);
                        let net = self.ctx.net.clone();
                        let me = self.me;
                        let timeout = self.ctx.cfg.detector.probe_timeout;
                        let inc = self.m.incarnation();
                        tokio::spawn(async move {
                            let reached = if target == me {
                                true
                            } else if gone {
                                false
                            } else {
                                matches!(
                                    tokio::time::timeout(
                                        timeout,
                                        net.member_request(
                                            target,
                                            MemberRequest::Ping { incarnation: inc }
                                        )
                                    )
                                    .await,
                                    Ok(Ok(MemberResponse::Pong { .. }))
                                )
                            };
                            net.member_respond(channel, MemberResponse::Probed { reached })
                                .await
                        });
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
        });
        if let Some(info) = info {
            rec.info = Some(info);
        }
        let inc = beat.incarnation;
        rec.beat = Some(beat);
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
    /// exchange per pair carries both records).
    fn exchange_all(&self, all: bool) {
        let mine = self.me.to_bytes();
        let peers: Vec<PeerId> = self
            .inner()
            .det
            .members()
            .filter(|m| m.connected && m.state != State::Left)
            .filter(|m| all || m.peer.to_bytes() > mine)
            .map(|m| m.peer)
            .collect();
        for p in peers {
            self.exchange(p);
        }
    }

    async fn on_health(&mut self, h: Health) {
        let addrs: Vec<String> = self
            .ctx
            .net
            .listen_addrs()
            .await
            .unwrap_or_default()
            .iter()
            .map(|a| a.to_string())
            .collect();
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
            changed
        };
        self.update_host_metrics();
        // Periodic: one exchange per pair; a significant change: everyone now.
        self.exchange_all(significant);
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
        let Some(draft) = fact_draft(&f) else {
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

    fn announce_self(&self, kind: FactKind) {
        let (name, inc) = {
            let g = self.inner();
            (g.me.info.name.clone(), g.det.incarnation())
        };
        self.announce(Fact {
            kind,
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
                Action::ProbeDirect(p) => {
                    let net = self.ctx.net.clone();
                    let tx = self.internal.clone();
                    let inc = self.m.incarnation();
                    tokio::spawn(async move {
                        let r = tokio::time::timeout(
                            timeout,
                            net.member_request(p, MemberRequest::Ping { incarnation: inc }),
                        )
                        .await;
                        let result = match r {
                            Ok(Ok(MemberResponse::Pong { .. })) => Ok(()),
                            Ok(Err(RequestError::Dial(_))) => Err(Failure::Refused),
                            _ => Err(Failure::Silent),
                        };
                        let _ = tx.send(Internal::Direct(p, result));
                    });
                }
                Action::ProbeIndirect { target, helpers } => {
                    for helper in helpers {
                        let net = self.ctx.net.clone();
                        let tx = self.internal.clone();
                        let bytes = target.to_bytes();
                        tokio::spawn(async move {
                            let r = tokio::time::timeout(
                                timeout * 2,
                                net.member_request(
                                    helper,
                                    MemberRequest::ProbeFor { target: bytes },
                                ),
                            )
                            .await;
                            let reached = match r {
                                Ok(Ok(MemberResponse::Probed { reached })) => Some(reached),
                                _ => None,
                            };
                            let _ = tx.send(Internal::Indirect {
                                target,
                                helper,
                                reached,
                            });
                        });
                    }
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

    /// `riftmesh_member_state`: per member, one series per state (the
    /// kube-state-metrics pattern): 1 for its current state, 0 for the
    /// others, so a change of state changes values, not series. The series
    /// of a forgotten member, or of its old name, are removed.
    fn update_member_state(&mut self) {
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

    fn update_metrics(&mut self) {
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

    fn update_host_metrics(&mut self) {
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

    async fn leave(&mut self) -> LeaveReport {
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
            fact_draft(&Fact {
                kind: FactKind::Left,
                peer: self.me,
                name: g.me.info.name.clone(),
                incarnation: inc,
            })
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

/// A change worth telling every peer at once rather than at the next round:
/// GPUs appearing or vanishing, CPU use moving by 25 points, memory by a
/// tenth of the total, free disk by a twentieth.
fn significant_change(old: &Health, new: &Health) -> bool {
    if old.sampled_ms == 0 {
        return true;
    }
    let gpus = |h: &Health| match &h.gpu {
        GpuStatus::Present(g) => g.len(),
        GpuStatus::Absent(_) => 0,
    };
    // |a - b| >= total / parts
    let moved = |a: u64, b: u64, total: u64, parts: u64| {
        total > 0 && u128::from(a.abs_diff(b)) * u128::from(parts) >= u128::from(total)
    };
    gpus(old) != gpus(new)
        || (old.cpu_use_pct - new.cpu_use_pct).abs() >= 25.0
        || moved(
            old.mem_used_bytes,
            new.mem_used_bytes,
            new.mem_total_bytes,
            10,
        )
        || moved(
            old.disk_free_bytes,
            new.disk_free_bytes,
            new.disk_total_bytes,
            20,
        )
}

fn peer_labels(peer: &PeerId, name: &str) -> Vec<(&'static str, String)> {
    vec![("peer", peer.to_base58()), ("name", name.to_string())]
}

/// Sample health every `every`; GPUs through `nvidia_smi` ("" = off). A
/// missing `nvidia-smi` is looked for again once a minute only.
async fn sample_loop(
    data_dir: std::path::PathBuf,
    nvidia_smi: String,
    every: Duration,
    tx: mpsc::Sender<Health>,
) {
    let mut sampler = Some(health::Sampler::new(&data_dir));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gpu = GpuStatus::default();
    let mut gpu_next = Instant::now();
    loop {
        tick.tick().await;
        let Some(s) = sampler.take() else { return };
        let Ok((s, mut h)) = tokio::task::spawn_blocking(move || {
            let mut s = s;
            let h = s.sample();
            (s, h)
        })
        .await
        else {
            return;
        };
        sampler = Some(s);
        if nvidia_smi.is_empty() {
            gpu = GpuStatus::Absent("GPU sampling is off (nvidia_smi = \"\")".into());
        } else if Instant::now() >= gpu_next {
            gpu = health::sample_gpus(&nvidia_smi, Duration::from_secs(5)).await;
            gpu_next = match &gpu {
                GpuStatus::Absent(why) if why.contains("not found") => {
                    Instant::now() + Duration::from_secs(60)
                }
                _ => Instant::now(),
            };
        }
        h.gpu = gpu.clone();
        if tx.send(h).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fact_payloads_are_identical_wherever_they_are_made() {
        let peer = PeerId::random();
        let f = Fact {
            kind: FactKind::Offline,
            peer,
            name: "gpu-07".into(),
            incarnation: 1_763_900_000_000,
        };
        let a = fact_draft(&f).expect("draft");
        let b = fact_draft(&f.clone()).expect("draft");
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.event_type, "HOST_OFFLINE");
        let back = parse_fact(&a.event_type, &a.payload).expect("parse");
        assert_eq!(back, Some(f.clone()));
        let other = Fact {
            incarnation: f.incarnation + 1,
            ..f
        };
        assert_ne!(fact_draft(&other).expect("draft").hash, a.hash);
    }

    #[test]
    fn forged_facts_are_refused() {
        assert!(parse_fact("HOST_OFFLINE", "{}").is_err());
        assert!(parse_fact(
            "HOST_OFFLINE",
            r#"{"ctx":"nope","name":"x","incarnation":1}"#
        )
        .is_err());
        let far = format!(
            r#"{{"ctx":"{}","name":"x","incarnation":{}}}"#,
            PeerId::random(),
            u64::MAX
        );
        assert!(parse_fact("HOST_LEFT", &far).is_err());
        assert_eq!(parse_fact("MODEL_PROMOTED", "{}"), Ok(None));
    }

    #[test]
    fn significant_health_changes() {
        let base = Health {
            sampled_ms: 1,
            cpu_use_pct: 10.0,
            mem_total_bytes: 1000,
            mem_used_bytes: 100,
            disk_total_bytes: 1000,
            disk_free_bytes: 500,
            ..Default::default()
        };
        assert!(!significant_change(&base, &base.clone()));
        let busy = Health {
            cpu_use_pct: 40.0,
            ..base.clone()
        };
        assert!(significant_change(&base, &busy));
        let mem = Health {
            mem_used_bytes: 200,
            ..base.clone()
        };
        assert!(significant_change(&base, &mem));
        let mem_small = Health {
            mem_used_bytes: 150,
            ..base.clone()
        };
        assert!(!significant_change(&base, &mem_small));
        let disk = Health {
            disk_free_bytes: 440,
            ..base.clone()
        };
        assert!(significant_change(&base, &disk));
        let gpu = Health {
            gpu: GpuStatus::Present(vec![]),
            ..base.clone()
        };
        assert!(!significant_change(&base, &gpu), "0 GPUs either way");
        assert!(
            significant_change(&Health::default(), &base),
            "first sample"
        );
    }

    #[test]
    fn incarnation_grows_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = next_incarnation(dir.path()).expect("first");
        let b = next_incarnation(dir.path()).expect("second");
        assert!(b > a);
        // A clock behind the recorded value still yields a higher one.
        std::fs::write(dir.path().join("incarnation"), format!("{}", u64::MAX / 2)).expect("w");
        assert_eq!(
            next_incarnation(dir.path()).expect("third"),
            u64::MAX / 2 + 1
        );
    }
}
