//! The Raft network: `/riftmesh/raft/3` bodies ([`Envelope`], [`Msg`],
//! [`Reply`]), openraft's client side ([`Factory`], [`Conn`]), the server
//! side ([`serve`]), and the fuzz harness's hooks into the decoder.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RaftNetwork, RaftNetworkFactory, ServerState};
use serde::{Deserialize, Serialize};

use super::{Ctx, LockAnswer, LockCall, LockError, NodeId, PeerNode, TypeConfig};
use crate::codec;
use crate::net::{NetHandle, MAX_RAFT_MESSAGE};

/// `/riftmesh/raft/3` bodies: every request carries the sender's voter-list
/// hash, and a voter answers only peers with the same list.
#[derive(Serialize, Deserialize)]
pub(super) struct Envelope {
    pub(super) voters_hash: [u8; 32],
    pub(super) msg: Msg,
}

#[derive(Serialize, Deserialize)]
pub(super) enum Msg {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    Lock(LockCall),
}

#[derive(Serialize, Deserialize)]
pub(super) enum Reply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Lock(Result<LockAnswer, String>),
    /// The sender's voter list differs from ours.
    Mismatch,
    /// This agent is not a voter.
    NotVoter,
}

type RpcErr<E> = RPCError<NodeId, PeerNode, RaftError<NodeId, E>>;

pub(super) struct Factory {
    net: NetHandle,
    ctx: std::sync::Weak<Ctx>,
    hash: [u8; 32],
}

pub(super) struct Conn {
    target: NodeId,
    name: String,
    net: NetHandle,
    ctx: std::sync::Weak<Ctx>,
    hash: [u8; 32],
}

impl Factory {
    pub(super) fn new(ctx: &Arc<Ctx>) -> Factory {
        Factory {
            net: ctx.net.clone(),
            ctx: Arc::downgrade(ctx),
            hash: ctx.leader.hash,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, n: &PeerNode) -> Conn {
        Conn {
            target,
            name: n.name.clone(),
            net: self.net.clone(),
            ctx: self.ctx.clone(),
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
            .ctx
            .upgrade()
            .and_then(|n| n.membership.peer_for_name(&self.name))
            .ok_or_else(|| unreachable(format!("voter {} is not a known member", self.name)))?;
        // Not connected (it restarted, or we lost its address when it died):
        // dial the addresses it last reported and give the connection a
        // moment, rather than fail on a peer the swarm cannot find.
        if let Some(n) = self.ctx.upgrade() {
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
                if let (Ok(v), Some(n)) = (&r, self.ctx.upgrade()) {
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

/// Whether `body` decodes as a `/riftmesh/raft/3` request (the fuzz
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

pub(super) async fn serve(ctx: &Ctx, body: &[u8]) -> Reply {
    let l = &ctx.leader;
    let env: Envelope = match codec::decode(body, MAX_RAFT_MESSAGE) {
        Ok(e) => e,
        Err(e) => {
            ctx.metrics
                .events_rejected
                .get_or_create(&crate::metrics::label("reason", "raft_decode"))
                .inc();
            tracing::warn!(error = %e, "raft message refused");
            return Reply::Lock(Err(format!("undecodable request: {e}")));
        }
    };
    if env.voters_hash != l.hash {
        ctx.metrics
            .events_rejected
            .get_or_create(&crate::metrics::label("reason", "voter_list"))
            .inc();
        return Reply::Mismatch;
    }
    if let Msg::Lock(call) = env.msg {
        // Forwarded calls are served by the leader only: no forwarding chains.
        let leads = matches!(l.raft_view(), Some((ServerState::Leader, ..)));
        return Reply::Lock(if leads {
            l.call_local(ctx, call).await.map_err(|e| e.to_string())
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
