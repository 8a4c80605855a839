//! Membership: every agent's record (name, incarnation, health, jobs, tags)
//! exchanged directly with each peer over `/riftmesh/member/2` (`/1` with older agents), the failure
//! detector of [`detector`] fed by the transport and by probes, and the
//! membership events (`HOST_ONLINE`, `NODE_SUSPECT`, `HOST_OFFLINE`,
//! `NODE_RECOVERED`, `HOST_LEFT`) through the normal event path.

pub mod detector;
mod facts;
pub mod health;
pub mod idle;
mod incarnation;
pub mod links;
mod probe;
pub mod ring;
mod sampling;
mod task;

use crate::util::lock;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::AgentConfig;
use crate::event;
use crate::metrics::Metrics;
use crate::net::wire::{Heartbeat, MemberInfo, SubCounts, MAX_SUB_PATTERNS};
use crate::net::NetHandle;
use crate::net::AGENT_VERSION;
use crate::publisher::Publisher;
use crate::store::ConsumerRec;
use crate::store::Store;
use detector::{Detector, State};
use health::Health;

pub use incarnation::next_incarnation;
pub use task::run;

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

/// Origin written on membership events.
pub const ORIGIN: &str = "riftmesh/membership";
/// Most job counters one agent carries.
pub const MAX_JOBS: usize = 64;

#[derive(Clone, Debug)]
struct Job {
    value: f64,
    expires: Option<Instant>,
}

struct Rec {
    info: Option<MemberInfo>,
    beat: Option<Heartbeat>,
    /// When `beat` arrived.
    beat_at: Option<Instant>,
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
    /// This agent keeps a connection to it and watches it: every member
    /// while the cluster has at most `full_mesh_max` members, else its
    /// ring neighbours and a few random members (proto-notes/membership.md).
    pub link: bool,
    pub last_heard_ms_ago: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub addresses: Vec<String>,
    pub agent_version: Option<String>,
    pub started_ms: Option<u64>,
    pub tags: BTreeMap<String, String>,
    pub jobs: BTreeMap<String, f64>,
    pub health: Option<Health>,
    pub voters_hash: Option<String>,
    /// How this agent's connection reaches it (`direct`, `hole-punched`,
    /// `relayed`; none for itself and hosts it holds no connection to):
    /// filled in by the API from the network's peer list.
    pub via: Option<&'static str>,
}

/// One live host's durable consumers per type pattern, as this agent last
/// heard them (`GET /v1/subscriptions`).
#[derive(Debug, Clone, Serialize)]
pub struct HostSubs {
    pub name: Option<String>,
    pub peer_id: String,
    pub is_self: bool,
    pub state: &'static str,
    /// None: the member's agent does not send them (`/riftmesh/member/1`),
    /// or no record arrived yet.
    pub subscriptions: Option<BTreeMap<String, u32>>,
    /// Age of the record the counts came from.
    pub age_ms: Option<u64>,
}

/// One host's share of a pattern's consumers in [`cluster_counts`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostCount {
    /// The member's name (a label: two members can share one).
    pub name: Option<String>,
    pub count: u64,
}

/// One type pattern's consumers over the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PatternCount {
    pub total: u64,
    /// Per host, by peer id.
    pub hosts: BTreeMap<String, HostCount>,
}

/// A host without counts (`hosts_without_counts`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostRef {
    pub peer_id: String,
    pub name: Option<String>,
}

/// Consumers per type pattern over `hosts` (only the patterns in `only`
/// when given), each host keyed by its peer id: two members with one name
/// (a host re-keyed while its old peer id is still suspect) stay apart.
/// Sums are `u64` and saturate: counts come from peers. Also the hosts
/// without counts, in `hosts` order.
pub fn cluster_counts(
    hosts: &mut [HostSubs],
    only: Option<&[String]>,
) -> (BTreeMap<String, PatternCount>, Vec<HostRef>) {
    let mut types: BTreeMap<String, PatternCount> = BTreeMap::new();
    let mut unknown = Vec::new();
    for h in hosts {
        let Some(subs) = h.subscriptions.as_mut() else {
            unknown.push(HostRef {
                peer_id: h.peer_id.clone(),
                name: h.name.clone(),
            });
            continue;
        };
        if let Some(only) = only {
            subs.retain(|p, _| only.contains(p));
        }
        for (pattern, n) in subs.iter() {
            let n = u64::from(*n);
            let t = types.entry(pattern.clone()).or_default();
            t.total = t.total.saturating_add(n);
            let c = t.hosts.entry(h.peer_id.clone()).or_insert(HostCount {
                name: h.name.clone(),
                count: 0,
            });
            c.count = c.count.saturating_add(n);
        }
    }
    (types, unknown)
}

/// Consumers per type pattern (`*` for a consumer of every type), sorted
/// by pattern, at most [`MAX_SUB_PATTERNS`] patterns.
pub fn subscription_counts(consumers: &[ConsumerRec]) -> SubCounts {
    let mut m: BTreeMap<&str, u32> = BTreeMap::new();
    for c in consumers {
        if c.types.is_empty() {
            *m.entry("*").or_default() += 1;
        }
        let mut types: Vec<&str> = c.types.iter().map(String::as_str).collect();
        types.sort_unstable();
        types.dedup();
        for t in types {
            *m.entry(t).or_default() += 1;
        }
    }
    m.into_iter()
        .take(MAX_SUB_PATTERNS)
        .map(|(k, v)| (k.to_string(), v))
        .collect()
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
            subs: None,
            subs_dropped: 0,
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
            refresh_jobs(&mut g.me, Instant::now());
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

    /// Consumer counts of this host (as last announced) and of every live
    /// member (alive or suspect), this host first.
    pub fn subscriptions(&self) -> Vec<HostSubs> {
        let g = self.inner();
        let now = Instant::now();
        // One count per pattern: a peer that repeats a pattern is taken at
        // its last count, never summed with itself.
        let counts = |s: &Option<SubCounts>| s.as_ref().map(|s| s.iter().cloned().collect());
        let mut out = vec![HostSubs {
            name: Some(g.me.info.name.clone()),
            peer_id: String::new(),
            is_self: true,
            state: if g.me.leaving { "left" } else { "alive" },
            subscriptions: counts(&g.me.beat.subs),
            age_ms: Some(0),
        }];
        let mut rest: Vec<HostSubs> = g
            .det
            .members()
            .filter(|m| matches!(m.state, State::Alive | State::Suspect))
            .map(|m| {
                let rec = g.recs.get(&m.peer);
                HostSubs {
                    name: m.name.clone(),
                    peer_id: m.peer.to_base58(),
                    is_self: false,
                    state: m.state.as_str(),
                    subscriptions: rec
                        .and_then(|r| r.beat.as_ref())
                        .and_then(|b| counts(&b.subs)),
                    age_ms: rec
                        .and_then(|r| r.beat_at)
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                }
            })
            .collect();
        rest.sort_by(|a, b| a.name.cmp(&b.name).then(a.peer_id.cmp(&b.peer_id)));
        out.extend(rest);
        out
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
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
            link: false,
            last_heard_ms_ago: Some(0),
            rtt_ms: None,
            addresses: addrs,
            agent_version: Some(me.info.agent_version.clone()),
            started_ms: Some(me.info.started_ms),
            tags: me.info.tags.iter().cloned().collect(),
            jobs: me.beat.jobs.iter().cloned().collect(),
            health: Some(me.beat.health.clone()),
            voters_hash: me.info.voters_hash.map(hex::encode),
            via: None,
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
                    link: g.det.is_link(&m.peer),
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
                    via: None,
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
fn refresh_jobs(me: &mut Local, now: Instant) -> bool {
    me.jobs.retain(|_, j| j.expires.is_none_or(|e| e > now));
    let jobs: Vec<(String, f64)> = me.jobs.iter().map(|(k, j)| (k.clone(), j.value)).collect();
    if jobs != me.beat.jobs {
        me.beat.jobs = jobs;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(peer: &str, name: &str, subs: Option<&[(&str, u32)]>) -> HostSubs {
        HostSubs {
            name: Some(name.to_string()),
            peer_id: peer.to_string(),
            is_self: false,
            state: "alive",
            subscriptions: subs.map(|s| s.iter().map(|(p, n)| (p.to_string(), *n)).collect()),
            age_ms: Some(1),
        }
    }

    #[test]
    fn cluster_counts_keep_hosts_apart_by_peer_and_never_overflow() {
        let max = u64::from(u32::MAX);
        let hosts = vec![
            host(
                "P1",
                "gpu-07",
                Some(&[("TRAINING_COMPLETED", u32::MAX), ("*", 1)]),
            ),
            // The same name under another peer id: a re-keyed host whose
            // old peer id is still suspect.
            host("P2", "gpu-07", Some(&[("TRAINING_COMPLETED", u32::MAX)])),
            host("P3", "old", None),
            host("P4", "gpu-08", Some(&[("TRAINING_COMPLETED", 2)])),
        ];
        let (types, unknown) = cluster_counts(&mut hosts.clone(), None);
        let tc = &types["TRAINING_COMPLETED"];
        assert_eq!(tc.total, 2 * max + 2);
        let seven = |count| HostCount {
            name: Some("gpu-07".into()),
            count,
        };
        assert_eq!(tc.hosts.len(), 3);
        assert_eq!(tc.hosts["P1"], seven(max));
        assert_eq!(tc.hosts["P2"], seven(max));
        assert_eq!(tc.hosts["P4"].count, 2);
        assert_eq!(types["*"].total, 1);
        assert_eq!(
            unknown,
            vec![HostRef {
                peer_id: "P3".into(),
                name: Some("old".into())
            }]
        );
        // Only the patterns asked for.
        let only = ["*".to_string()];
        let (types, unknown) = cluster_counts(&mut hosts.clone(), Some(&only));
        assert_eq!(types.keys().collect::<Vec<_>>(), ["*"]);
        assert_eq!(unknown.len(), 1);
    }

    #[tokio::test]
    async fn expired_jobs_leave_the_heartbeat() {
        let m = Membership::new(
            PeerId::random(),
            "gpu-01",
            &[],
            1,
            detector::DetectorConfig::default(),
        );
        let ttl = Duration::from_secs(30);
        let short = BTreeMap::from([("train".to_string(), Some(2.0))]);
        m.set_jobs(short, Some(ttl)).await.expect("with a ttl");
        let kept = BTreeMap::from([("serve".to_string(), Some(1.0))]);
        m.set_jobs(kept, None).await.expect("without");
        let mut g = lock(&m.inner);
        let now = Instant::now();
        assert!(!refresh_jobs(&mut g.me, now), "nothing expired yet");
        assert_eq!(g.me.beat.jobs.len(), 2);
        assert!(refresh_jobs(&mut g.me, now + ttl + Duration::from_secs(1)));
        assert_eq!(g.me.beat.jobs, vec![("serve".to_string(), 1.0)]);
    }
}
