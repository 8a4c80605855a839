//! Leader election and distributed locks: openraft 0.9 among the configured
//! voters, over `/riftmesh/raft/2`, its state in our sled database. The Raft
//! term is the fencing token users see for leadership; a lock grant's token is
//! the log index of the entry that granted it. Agents that are not voters
//! learn the leader from `LEADER_ELECTED` events and forward lock calls to it.
//! See proto-notes/leader.md.

pub mod raft_log;
pub use raft_log as store; // rename pending

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RaftNetwork, RaftNetworkFactory, ServerState};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, OnceCell};

use crate::codec;
use crate::event::{self, Draft, TypePattern};
use crate::net::{NetHandle, RaftInbound, MAX_RAFT_MESSAGE};
use crate::node::Node;

pub type NodeId = u64;

/// A voter, by name; its peer id is looked up in the member table at each call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub name: String,
}

/// What the replicated lock table applies. `now_ms` is stamped by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockRequest {
    Acquire {
        name: String,
        holder: String,
        ttl_ms: u64,
        now_ms: u64,
    },
    Renew {
        name: String,
        token: u64,
        now_ms: u64,
    },
    Release {
        name: String,
        token: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockResponse {
    Granted {
        token: u64,
        expires_ms: u64,
        /// The lock was held by someone whose TTL had run out.
        replaced_expired: bool,
    },
    Denied {
        holder: String,
        token: u64,
        expires_ms: u64,
    },
    Released,
    NotHolder,
    /// For blank and membership entries.
    Noop,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = LockRequest,
        R = LockResponse,
        NodeId = NodeId,
        Node = PeerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// A voter's Raft node id: the first 8 bytes of SHA-256 over its name.
pub fn node_id(name: &str) -> NodeId {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("riftmesh/voter/1\0{name}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// SHA-256 of the voter list as configured (order included).
pub fn voters_hash(voters: &[String]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"riftmesh/voters/1\0");
    for v in voters {
        h.update(v.as_bytes());
        h.update(b"\n");
    }
    h.finalize().into()
}

/// A lock call from a client, before the leader stamps its clock on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LockCall {
    Acquire {
        name: String,
        holder: String,
        ttl_ms: u64,
    },
    Renew {
        name: String,
        token: u64,
    },
    Release {
        name: String,
        token: u64,
    },
    List,
}

/// `/riftmesh/raft/2` bodies: every request carries the sender's voter-list
/// hash, and a voter answers only peers with the same list.
#[derive(Serialize, Deserialize)]
struct Envelope {
    voters_hash: [u8; 32],
    msg: Msg,
}

#[derive(Serialize, Deserialize)]
enum Msg {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    Lock(LockCall),
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Lock(Result<LockAnswer, String>),
    /// The sender's voter list differs from ours.
    Mismatch,
    /// This agent is not a voter.
    NotVoter,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LockAnswer {
    One(LockResponse),
    List(Vec<(String, store::Lock)>),
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("no voters are configured: this cluster has no leader and no locks (set `voters = [...]` in the config of every host)")]
    NoVoters,
    #[error("no leader is known right now (an election may be under way, or this side of the network has no majority of the voters); retry")]
    NoLeader,
    #[error("the leader did not commit the call in time (no majority of voters reachable?): {0}")]
    Timeout(String),
    /// The leader could not be reached or answered that it can't serve
    /// now: retry (503, as NoLeader and Timeout).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

impl LockError {
    /// A forwarded call's error as the leader worded it: the reasons a
    /// retry can cure (no leader there, no majority in time) stay 503 on
    /// this side instead of becoming a 502. The wire carries the text
    /// only (Reply::Lock is a string error for compatibility).
    fn from_leader(text: String) -> Self {
        let no_leader = LockError::NoLeader.to_string();
        let timeout = LockError::Timeout(String::new()).to_string();
        if text == no_leader || text.starts_with(timeout.trim_end()) {
            LockError::Unavailable(text)
        } else {
            LockError::Other(text)
        }
    }
}

/// What `GET /v1/leader` shows.
#[derive(Debug, Clone, Serialize)]
pub struct LeaderView {
    pub voters: Vec<String>,
    pub is_voter: bool,
    pub leader: Option<String>,
    pub leader_peer_id: Option<String>,
    pub term: u64,
    /// Unix ms since when this leader has led (as this agent learned it).
    pub since_ms: Option<u64>,
    /// This agent is the leader, inside its lease.
    pub is_self: bool,
    /// Raft state of this agent (voters), or "member" / "none".
    pub role: String,
    pub note: Option<String>,
    /// Members whose voter list differs from ours (by name).
    pub voter_list_mismatch: Vec<String>,
    /// This voter's Raft vote as held (from its durable store at start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vote: Option<VoteView>,
}

/// A voter's vote: the term, whom it voted for, and whether that leader
/// was granted by a majority.
#[derive(Debug, Clone, Serialize)]
pub struct VoteView {
    pub term: u64,
    pub voted_for: Option<String>,
    pub committed: bool,
}

#[derive(Default, Clone)]
struct Known {
    term: u64,
    leader: Option<String>,
    since_ms: Option<u64>,
}

pub struct Leader {
    voters: Vec<String>,
    hash: [u8; 32],
    me: String,
    is_voter: bool,
    lease: Duration,
    raft: OnceCell<Raft>,
    sm: OnceCell<store::LockStateMachine>,
    known: Mutex<Known>,
    /// Last time a leader's append was accepted here, or a vote granted:
    /// the election timer counts from it (see [`elector`]).
    heard: Mutex<Instant>,
    /// No campaign before this: a voter with a longer log refused our vote.
    aside_until: Mutex<Option<Instant>>,
}

fn lock_known(m: &Mutex<Known>) -> std::sync::MutexGuard<'_, Known> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Leader {
    pub fn new(voters: &[String], me: &str, lease: Duration) -> Arc<Leader> {
        Arc::new(Leader {
            voters: voters.to_vec(),
            hash: voters_hash(voters),
            me: me.to_string(),
            is_voter: voters.iter().any(|v| v == me),
            lease,
            raft: OnceCell::new(),
            sm: OnceCell::new(),
            known: Mutex::new(Known::default()),
            heard: Mutex::new(Instant::now()),
            aside_until: Mutex::new(None),
        })
    }

    pub fn voters_hash(&self) -> Option<[u8; 32]> {
        (!self.voters.is_empty()).then_some(self.hash)
    }

    fn heard_now(&self) {
        *self.heard.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn stand_aside(&self, d: Duration) {
        *self.aside_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + d);
    }

    fn aside(&self) -> bool {
        self.aside_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    fn heard(&self) -> Instant {
        *self.heard.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raft_view(&self) -> Option<(ServerState, u64, Option<NodeId>, bool)> {
        let raft = self.raft.get()?;
        let m = raft.metrics().borrow().clone();
        let fresh = self.voters.len() == 1
            || m.millis_since_quorum_ack
                .is_some_and(|ms| u128::from(ms) < self.lease.as_millis());
        Some((m.state, m.current_term, m.current_leader, fresh))
    }

    fn name_of(&self, id: NodeId) -> Option<String> {
        self.voters.iter().find(|v| node_id(v) == id).cloned()
    }

    /// The leader as this agent knows it.
    pub fn view(&self, node: &Node) -> LeaderView {
        let mismatch = node.membership.voter_list_mismatch(self.voters_hash());
        let mut v = LeaderView {
            voters: self.voters.clone(),
            is_voter: self.is_voter,
            leader: None,
            leader_peer_id: None,
            term: 0,
            since_ms: None,
            is_self: false,
            role: if self.voters.is_empty() {
                "none".into()
            } else {
                "member".into()
            },
            note: None,
            voter_list_mismatch: mismatch,
            vote: None,
        };
        if self.voters.is_empty() {
            v.note = Some(format!(
                "no voters configured: name 3 or 5 stable hosts in the config of every host, e.g. voters = [\"gpu-01\", \"gpu-02\", \"gpu-03\"] (a one-host setup names itself: voters = [\"{}\"])",
                self.me
            ));
            return v;
        }
        let known = lock_known(&self.known).clone();
        if let Some(raft) = self.raft.get() {
            let vote = raft.metrics().borrow().vote;
            v.vote = Some(VoteView {
                term: vote.leader_id.term,
                voted_for: vote.leader_id.voted_for.and_then(|id| self.name_of(id)),
                committed: vote.committed,
            });
        }
        if let Some((state, term, leader, fresh)) = self.raft_view() {
            v.role = format!("{state:?}").to_lowercase();
            v.term = term;
            if state == ServerState::Leader {
                if fresh {
                    v.leader = Some(self.me.clone());
                    v.is_self = true;
                } else {
                    v.note = Some("this agent was leader but has not heard from a majority of voters within its lease".into());
                }
            } else {
                v.leader = leader.and_then(|id| self.name_of(id));
            }
        } else {
            v.term = known.term;
            v.leader = known.leader.clone();
        }
        if let Some(l) = &v.leader {
            if *l == known.leader.clone().unwrap_or_default() && v.term == known.term {
                v.since_ms = known.since_ms;
            }
            v.leader_peer_id = if *l == self.me {
                Some(node.peer_id.clone())
            } else {
                node.membership.peer_by_name(l).map(|p| p.to_base58())
            };
            // A leader the member table holds dead or gone is no leader.
            if *l != self.me && v.leader_peer_id.is_none() {
                v.note = Some(format!("last known leader {l} is not a live member"));
                v.leader = None;
            }
        }
        v
    }

    fn stamp(call: LockCall) -> Option<LockRequest> {
        let now_ms = event::now_ms();
        Some(match call {
            LockCall::Acquire {
                name,
                holder,
                ttl_ms,
            } => LockRequest::Acquire {
                name,
                holder,
                ttl_ms,
                now_ms,
            },
            LockCall::Renew { name, token } => LockRequest::Renew {
                name,
                token,
                now_ms,
            },
            LockCall::Release { name, token } => LockRequest::Release { name, token },
            LockCall::List => return None,
        })
    }

    /// Run a lock call here if this agent leads, else at the leader.
    pub async fn call(&self, node: &Node, call: LockCall) -> Result<LockAnswer, LockError> {
        if self.voters.is_empty() {
            return Err(LockError::NoVoters);
        }
        if let Some((ServerState::Leader, _, _, _)) = self.raft_view() {
            return self.call_local(node, call).await;
        }
        let view = self.view(node);
        let Some(peer) = view
            .leader_peer_id
            .as_deref()
            .and_then(|p| p.parse::<PeerId>().ok())
        else {
            return Err(LockError::NoLeader);
        };
        let body = codec::encode(&Envelope {
            voters_hash: self.hash,
            msg: Msg::Lock(call),
        })
        .map_err(|e| LockError::Other(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), node.net.raft_request(peer, body))
            .await
            .map_err(|_| LockError::Timeout("no answer from the leader in 5 s".into()))?
            .map_err(|e| LockError::Unavailable(format!("cannot reach the leader: {e}")))?;
        match codec::decode::<Reply>(&resp, MAX_RAFT_MESSAGE) {
            Ok(Reply::Lock(r)) => r.map_err(LockError::from_leader),
            Ok(Reply::Mismatch) => Err(LockError::Other(
                "the leader has a different voter list than this agent; fix the config".into(),
            )),
            Ok(_) => Err(LockError::Other("unexpected answer from the leader".into())),
            Err(e) => Err(LockError::Other(format!("bad answer from the leader: {e}"))),
        }
    }

    async fn call_local(&self, node: &Node, call: LockCall) -> Result<LockAnswer, LockError> {
        let Some(raft) = self.raft.get() else {
            return Err(LockError::NoLeader);
        };
        let Some(req) = Self::stamp(call) else {
            // A list is read on the leader after checking it still leads.
            tokio::time::timeout(Duration::from_secs(3), raft.ensure_linearizable())
                .await
                .map_err(|_| LockError::Timeout("leadership check".into()))?
                .map_err(|e| LockError::Other(e.to_string()))?;
            let now = event::now_ms();
            let locks = self
                .sm
                .get()
                .map(|sm| sm.locks())
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, l)| l.expires_ms > now)
                .collect();
            return Ok(LockAnswer::List(locks));
        };
        let r = tokio::time::timeout(Duration::from_secs(3), raft.client_write(req))
            .await
            .map_err(|_| LockError::Timeout("3 s".into()))?;
        let m = &node.metrics;
        match r {
            Ok(resp) => {
                match &resp.data {
                    LockResponse::Granted {
                        replaced_expired, ..
                    } => {
                        m.lock_ops
                            .get_or_create(&vec![("op", "grant".into())])
                            .inc();
                        if *replaced_expired {
                            m.lock_ops
                                .get_or_create(&vec![("op", "expired".into())])
                                .inc();
                        }
                    }
                    LockResponse::Denied { .. } => {
                        m.lock_ops.get_or_create(&vec![("op", "deny".into())]).inc();
                    }
                    _ => {}
                }
                Ok(LockAnswer::One(resp.data))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(LockError::NoLeader)
            }
            Err(e) => Err(LockError::Other(e.to_string())),
        }
    }
}

type RpcErr<E> = RPCError<NodeId, PeerNode, RaftError<NodeId, E>>;

struct Factory {
    net: NetHandle,
    node: std::sync::Weak<Node>,
    hash: [u8; 32],
}

struct Conn {
    target: NodeId,
    name: String,
    net: NetHandle,
    node: std::sync::Weak<Node>,
    hash: [u8; 32],
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, n: &PeerNode) -> Conn {
        Conn {
            target,
            name: n.name.clone(),
            net: self.net.clone(),
            node: self.node.clone(),
            hash: self.hash,
        }
    }
}

fn unreachable<E: std::error::Error>(why: String) -> RpcErr<E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why)))
}

impl Conn {
    async fn call<E: std::error::Error>(&self, msg: Msg) -> Result<Reply, RpcErr<E>> {
        let peer = self
            .node
            .upgrade()
            .and_then(|n| n.membership.peer_for_name(&self.name))
            .ok_or_else(|| unreachable(format!("voter {} is not a known member", self.name)))?;
        // Not connected (it restarted, or we lost its address when it died):
        // dial the addresses it last reported and give the connection a
        // moment, rather than fail on a peer the swarm cannot find.
        if let Some(n) = self.node.upgrade() {
            if !n.membership.is_connected(&peer) {
                for a in n.membership.dial_addrs(&peer) {
                    let _ = n.net.dial(a).await;
                }
                for _ in 0..10 {
                    if n.membership.is_connected(&peer) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let body = codec::encode(&Envelope {
            voters_hash: self.hash,
            msg,
        })
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let resp = self
            .net
            .raft_request(peer, body)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        codec::decode(&resp, MAX_RAFT_MESSAGE).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

fn bad_reply<E: std::error::Error>(name: &str) -> RpcErr<E> {
    unreachable(format!(
        "voter {name} answered out of turn (a different voter list?)"
    ))
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        match self.call(Msg::Append(rpc)).await? {
            Reply::Append(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(bad_reply(&self.name)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self.call(Msg::Snapshot(rpc)).await? {
            Reply::Snapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(bad_reply(&self.name)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let mine = rpc.last_log_id.map(|l| l.index);
        match self.call(Msg::Vote(rpc)).await? {
            Reply::Vote(r) => {
                if let (Ok(v), Some(n)) = (&r, self.node.upgrade()) {
                    // A voter with a longer log refused: ours is stale and
                    // cannot win; stand aside so that one can.
                    if !v.vote_granted && v.last_log_id.map(|l| l.index) > mine {
                        n.leader.stand_aside(n.cfg.election_timeout * 4);
                    }
                }
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(bad_reply(&self.name)),
        }
    }
}

/// Start the leader part: Raft on voters, and on every agent the server of
/// `/riftmesh/raft/2` and the follower of `LEADER_ELECTED` events.
pub fn start(node: Arc<Node>, inbound: mpsc::Receiver<RaftInbound>) {
    tokio::spawn(run(node, inbound));
}

async fn run(node: Arc<Node>, mut inbound: mpsc::Receiver<RaftInbound>) {
    let l = node.leader.clone();
    if !l.voters.is_empty() {
        let mut listed: Vec<String> = l.voters.clone();
        listed.sort();
        tracing::info!(voters = ?listed, voter = l.is_voter, "leader election configured");
    }
    if l.is_voter {
        match start_raft(&node).await {
            Ok((raft, sm)) => {
                let _ = l.sm.set(sm);
                let _ = l.raft.set(raft.clone());
                tokio::spawn(watch_leadership(node.clone(), raft.clone()));
                tokio::spawn(elector(node.clone(), raft));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the leader election; this agent takes no part")
            }
        }
    }
    tokio::spawn(follow_elections(node.clone()));
    while let Some(msg) = inbound.recv().await {
        let node = node.clone();
        tokio::spawn(async move {
            let reply = serve(&node, &msg.request).await;
            let body = codec::encode(&reply).unwrap_or_default();
            node.net.raft_respond(msg.channel, body).await;
        });
    }
}

/// Whether `body` decodes as a `/riftmesh/raft/2` request (the fuzz
/// harness drives the decoder through this).
#[doc(hidden)]
pub fn decodes_as_envelope(body: &[u8]) -> bool {
    codec::decode::<Envelope>(body, MAX_RAFT_MESSAGE).is_ok()
}

/// Encoded requests of every kind a voter sends, seeds for the fuzz harness.
#[doc(hidden)]
pub fn sample_envelopes() -> Vec<Vec<u8>> {
    let vote = openraft::Vote::new(3, 1);
    let msgs = vec![
        Msg::Vote(VoteRequest::new(vote, None)),
        Msg::Append(AppendEntriesRequest {
            vote,
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }),
        Msg::Lock(LockCall::Acquire {
            name: "promote".into(),
            holder: "gpu-01".into(),
            ttl_ms: 30_000,
        }),
        Msg::Lock(LockCall::List),
    ];
    msgs.into_iter()
        .filter_map(|msg| {
            codec::encode(&Envelope {
                voters_hash: [4; 32],
                msg,
            })
            .ok()
        })
        .collect()
}

async fn serve(node: &Node, body: &[u8]) -> Reply {
    let l = &node.leader;
    let env: Envelope = match codec::decode(body, MAX_RAFT_MESSAGE) {
        Ok(e) => e,
        Err(e) => {
            node.metrics
                .events_rejected
                .get_or_create(&crate::metrics::label("reason", "raft_decode"))
                .inc();
            tracing::warn!(error = %e, "raft message refused");
            return Reply::Lock(Err(format!("undecodable request: {e}")));
        }
    };
    if env.voters_hash != l.hash {
        node.metrics
            .events_rejected
            .get_or_create(&crate::metrics::label("reason", "voter_list"))
            .inc();
        return Reply::Mismatch;
    }
    if let Msg::Lock(call) = env.msg {
        // Forwarded calls are served by the leader only: no forwarding chains.
        let leads = matches!(l.raft_view(), Some((ServerState::Leader, ..)));
        return Reply::Lock(if leads {
            l.call_local(node, call).await.map_err(|e| e.to_string())
        } else {
            Err(LockError::NoLeader.to_string())
        });
    }
    let Some(raft) = l.raft.get() else {
        return Reply::NotVoter;
    };
    match env.msg {
        Msg::Append(r) => {
            let res = raft.append_entries(r).await;
            if matches!(&res, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                l.heard_now();
            }
            Reply::Append(res)
        }
        Msg::Vote(r) => {
            let res = raft.vote(r).await;
            if matches!(&res, Ok(v) if v.vote_granted) {
                l.heard_now();
            }
            Reply::Vote(res)
        }
        Msg::Snapshot(r) => Reply::Snapshot(raft.install_snapshot(r).await),
        Msg::Lock(_) => Reply::NotVoter,
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn start_raft(node: &Arc<Node>) -> Result<(Raft, store::LockStateMachine), BoxError> {
    let et = node.cfg.election_timeout.as_millis() as u64;
    let config = openraft::Config {
        cluster_name: "riftmesh".into(),
        // openraft ticks every 1.5 heartbeats; a fifth of the election
        // timeout keeps that tick from adding much to a failover.
        heartbeat_interval: (et / 5).max(20),
        election_timeout_min: et,
        election_timeout_max: et * 2,
        // Elections are started by [`elector`], with a fresh random delay
        // each time: openraft's own timer draws its delay once per process
        // and fires on its tick, so two voters can collide round after round.
        enable_elect: false,
        ..Default::default()
    }
    .validate()?;
    let durable = node.store.durable();
    let log = store::LogStore::open(durable)?;
    let sm = store::LockStateMachine::open(durable)?;
    let factory = Factory {
        net: node.net.clone(),
        node: Arc::downgrade(node),
        hash: node.leader.hash,
    };
    let me = node_id(&node.cfg.name);
    let raft = openraft::Raft::new(me, Arc::new(config), factory, log, sm.clone()).await?;
    let members: BTreeMap<NodeId, PeerNode> = node
        .cfg
        .voters
        .iter()
        .map(|v| (node_id(v), PeerNode { name: v.clone() }))
        .collect();
    // Every voter initializes with the same membership: safe in openraft, and
    // the cluster forms whichever voters come up first.
    match raft.initialize(members).await {
        Ok(()) => tracing::info!("raft initialized with the configured voters"),
        Err(e) => tracing::debug!(error = %e, "raft already initialized"),
    }
    Ok((raft, sm))
}

/// The election timer of a voter. An election starts when nothing was heard
/// from a leader (and no vote granted) for the leader's lease (twice
/// `election_timeout`) plus a delay drawn anew for every attempt from
/// [`election_timeout`, 2 × `election_timeout`); a failed attempt is retried
/// after a new draw. The other voters reject a vote request while their own
/// lease runs, so this never unseats a leader that a majority still hears.
/// A leader campaigns too once no majority has acknowledged it for as long.
/// A voter told by a voter with a longer log that its own is stale stands
/// aside for 4 × `election_timeout` (openraft's own timer does the same), so
/// a restarted voter cannot keep outbidding the one that can win.
async fn elector(node: Arc<Node>, raft: Raft) {
    use rand::Rng;
    let et = node.cfg.election_timeout;
    let lease = et * 2;
    let draw = || et + et.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
    let mut jitter = draw();
    let mut attempt: Option<Instant> = None;
    let step = (et / 10).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(step).await;
        let (state, acked_ms) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.state, m.millis_since_quorum_ack)
        };
        if state == ServerState::Shutdown {
            return;
        }
        if state == ServerState::Leader {
            // A leader that a majority acknowledges needs no election. One
            // that none has (a voter restarted on a vote it had won, which
            // openraft restores as leadership of that old term) would
            // otherwise never campaign, and a voter with a shorter log could
            // never win its vote: it campaigns like a follower.
            let fresh = node.leader.voters.len() == 1
                || acked_ms.is_some_and(|ms| u128::from(ms) < lease.as_millis());
            if fresh {
                attempt = None;
                continue;
            }
        }
        if node.leader.aside() {
            continue;
        }
        let heard = node.leader.heard();
        let mut due = heard + lease + jitter;
        if let Some(a) = attempt.filter(|a| *a > heard) {
            due = due.max(a + jitter);
        }
        if Instant::now() >= due {
            if raft.trigger().elect().await.is_err() {
                return;
            }
            attempt = Some(Instant::now());
            jitter = draw();
        }
    }
}

/// On every change of term or leader: metrics, and the new leader publishes
/// `LEADER_ELECTED` once for its term.
async fn watch_leadership(node: Arc<Node>, raft: Raft) {
    let mut rx = raft.metrics();
    let mut last: (u64, Option<NodeId>) = (0, None);
    let mut lost_at: Option<Instant> = None;
    let mut announced_term = 0;
    loop {
        let m = rx.borrow_and_update().clone();
        let mx = &node.metrics;
        mx.raft_term.set(m.current_term as i64);
        mx.is_leader.set(i64::from(m.state == ServerState::Leader));
        if (m.current_term, m.current_leader) != last {
            if m.current_leader.is_none() && lost_at.is_none() {
                lost_at = Some(Instant::now());
            }
            if m.current_leader.is_some() && m.current_leader != last.1 {
                mx.leader_changes.inc();
                if let Some(t) = lost_at.take() {
                    mx.election_seconds.observe(t.elapsed().as_secs_f64());
                }
                let name = m
                    .current_leader
                    .and_then(|id| node.leader.name_of(id))
                    .unwrap_or_default();
                tracing::info!(term = m.current_term, leader = %name, "leader known");
            }
            last = (m.current_term, m.current_leader);
        }
        if m.state == ServerState::Leader && m.current_term > announced_term {
            announced_term = m.current_term;
            // `leader_id` is the seeds' field (cluster.leader_elected);
            // `leader` is kept for the agent's own readers.
            let payload = json!({
                "term": m.current_term,
                "leader": node.cfg.name,
                "leader_id": node.cfg.name,
                "node": node.peer_id,
            });
            // One fact per term, however often it is announced.
            if let Ok(d) = Draft::new(
                "LEADER_ELECTED",
                &payload,
                Some("riftmesh/leader".into()),
                None,
                None,
            )
            .and_then(|d| d.with_idem_key(Some(format!("term/{}", m.current_term))))
            {
                let n = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = n.publish(vec![d]).await {
                        tracing::warn!(error = %e, "cannot publish LEADER_ELECTED");
                    }
                });
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[derive(Deserialize)]
struct Elected {
    term: u64,
    leader: String,
}

/// Every agent keeps the newest `LEADER_ELECTED` it holds (non-voters learn
/// the leader from it).
async fn follow_elections(node: Arc<Node>) {
    let patterns: Vec<TypePattern> = TypePattern::parse("LEADER_ELECTED").into_iter().collect();
    let mut head = node.store.watch_head();
    let mut cursor = node.store.head().saturating_sub(100_000);
    loop {
        loop {
            let Ok((batch, last)) = node.store.read_after(cursor, 256, 20_000, &patterns) else {
                break;
            };
            for (_, s) in batch {
                let Ok(e) = serde_json::from_str::<Elected>(&s.event.payload) else {
                    continue;
                };
                let mut k = lock_known(&node.leader.known);
                if e.term > k.term {
                    node.metrics.leader_term.set(e.term as i64);
                    *k = Known {
                        term: e.term,
                        leader: Some(e.leader),
                        since_ms: Some(s.event.ts_ms),
                    };
                }
            }
            if last == cursor {
                break;
            }
            cursor = last;
        }
        if head.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_forwarded_refusal_a_retry_can_cure_stays_unavailable() {
        use super::LockError;
        let from = |e: LockError| LockError::from_leader(e.to_string());
        assert!(matches!(
            from(LockError::NoLeader),
            LockError::Unavailable(_)
        ));
        assert!(matches!(
            from(LockError::Timeout("3 s".into())),
            LockError::Unavailable(_)
        ));
        assert!(matches!(
            from(LockError::Other("lock held".into())),
            LockError::Other(_)
        ));
    }

    use super::*;

    /// One leader per term: a voter that voted for one candidate in a term
    /// must not grant another candidate of the same term. openraft's default
    /// leader id orders same-term candidates by node id, so the second
    /// candidate's vote compared greater and was granted, and a term could
    /// have two leaders (seen in the testnet soak: two LEADER_ELECTED for one
    /// term). The `single-term-leader` feature makes them incomparable.
    #[test]
    fn a_vote_in_a_term_excludes_other_candidates_of_that_term() {
        let (a, b) = (node_id("gpu-01"), node_id("gpu-02"));
        let va = openraft::Vote::new(28, a);
        let vb = openraft::Vote::new(28, b);
        assert!(
            va.partial_cmp(&vb).is_none(),
            "same-term votes for different candidates must be incomparable"
        );
        assert!(vb.partial_cmp(&va).is_none(), "in either order");
        assert!(openraft::Vote::new(29, a) > vb, "a later term still wins");
        let mut committed = openraft::Vote::new(28, a);
        committed.commit();
        assert!(
            committed > va,
            "the committed vote of the same leader is greater"
        );
    }

    #[test]
    fn node_ids_and_voter_hash_are_stable() {
        assert_eq!(node_id("gpu-01"), node_id("gpu-01"));
        assert_ne!(node_id("gpu-01"), node_id("gpu-02"));
        let a = vec!["a".to_string(), "b".to_string()];
        let b = vec!["b".to_string(), "a".to_string()];
        assert_ne!(
            voters_hash(&a),
            voters_hash(&b),
            "order is part of the list"
        );
        assert_eq!(voters_hash(&a), voters_hash(&a.clone()));
    }

    #[test]
    fn lock_table_grants_denies_expires_and_fences() {
        let mut st = store::LockState::default();
        let acq = |holder: &str, now: u64| LockRequest::Acquire {
            name: "promote".into(),
            holder: holder.into(),
            ttl_ms: 1000,
            now_ms: now,
        };
        let g = st.apply(10, &acq("a", 0));
        assert_eq!(
            g,
            LockResponse::Granted {
                token: 10,
                expires_ms: 1000,
                replaced_expired: false
            }
        );
        assert!(matches!(
            st.apply(11, &acq("b", 500)),
            LockResponse::Denied { token: 10, .. }
        ));
        let renew = LockRequest::Renew {
            name: "promote".into(),
            token: 10,
            now_ms: 900,
        };
        assert!(matches!(
            st.apply(12, &renew),
            LockResponse::Granted {
                token: 10,
                expires_ms: 1900,
                ..
            }
        ));
        // Expired: b takes it with a higher token; a's token no longer works.
        let g = st.apply(13, &acq("b", 2000));
        assert_eq!(
            g,
            LockResponse::Granted {
                token: 13,
                expires_ms: 3000,
                replaced_expired: true
            }
        );
        let late = LockRequest::Release {
            name: "promote".into(),
            token: 10,
        };
        assert_eq!(st.apply(14, &late), LockResponse::NotHolder);
        let rel = LockRequest::Release {
            name: "promote".into(),
            token: 13,
        };
        assert_eq!(st.apply(15, &rel), LockResponse::Released);
    }
}
