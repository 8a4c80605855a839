//! [`NetHandle`]: how the rest of the agent talks to the task that owns the
//! Swarm. Each call is a `Command` on a bounded queue, with a oneshot for
//! its reply.

use libp2p::{request_response, Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::{wire, NetError, PeerInfo, ReachInfo, RequestError};
use crate::event::Event;

pub(super) type OpaqueReply = oneshot::Sender<Result<Vec<u8>, RequestError>>;

/// The protocols with opaque bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Opaque {
    Raft,
    Blob,
}

impl Opaque {
    pub(super) fn name(self) -> &'static str {
        match self {
            Opaque::Raft => "raft",
            Opaque::Blob => "blob",
        }
    }
}

pub(super) enum Command {
    /// Gossip frames on the events topic, in order; one answer per frame.
    Publish {
        frames: Vec<Vec<u8>>,
        reply: oneshot::Sender<Vec<Result<(), String>>>,
    },
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Reach(oneshot::Sender<ReachInfo>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr),
    /// Membership's links: `None` every peer, else these; and peers to
    /// dial now.
    SetLinks {
        bounded: Option<Vec<PeerId>>,
        dial: Vec<PeerId>,
    },
    CatchupRequest {
        peer: PeerId,
        request: wire::CatchupRequest,
        reply: oneshot::Sender<Result<wire::CatchupResponse, String>>,
    },
    CatchupRespond {
        channel: request_response::ResponseChannel<wire::CatchupResponse>,
        response: wire::CatchupResponse,
    },
    MemberRequest {
        peer: PeerId,
        request: wire::MemberRequest,
        reply: oneshot::Sender<Result<wire::MemberResponse, RequestError>>,
    },
    MemberRespond {
        channel: request_response::ResponseChannel<wire::MemberResponse>,
        response: wire::MemberResponse,
    },
    OpaqueRequest {
        proto: Opaque,
        peer: PeerId,
        request: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, RequestError>>,
    },
    OpaqueRespond {
        proto: Opaque,
        channel: request_response::ResponseChannel<Vec<u8>>,
        response: Vec<u8>,
    },
    /// Fault injection: refuse and drop connections to these peers.
    Block(Vec<PeerId>),
    Unblock(Vec<PeerId>),
    /// Stop the event loop and drop the swarm (its connections close);
    /// answered once the swarm is gone.
    Shutdown(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
    pub local_peer_id: PeerId,
    pub max_message_bytes: usize,
}

impl NetHandle {
    pub(super) fn new(
        tx: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        max_message_bytes: usize,
    ) -> Self {
        NetHandle {
            tx,
            local_peer_id,
            max_message_bytes,
        }
    }

    /// Send a command that carries a reply channel and wait for the reply.
    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, NetError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(cmd(reply))
            .await
            .map_err(|_| NetError::Closed)?;
        rx.await.map_err(|_| NetError::Closed)
    }

    /// Publish a raw gossip frame on the events topic.
    pub async fn publish_frame(&self, data: Vec<u8>) -> Result<(), NetError> {
        self.publish_frames(vec![data])
            .await?
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Publish frames on the events topic, in order, with one round trip to
    /// the network task for all of them (a batch of 100 events was 100
    /// round trips); one result per frame. `Err` only if the network has
    /// stopped.
    pub async fn publish_frames(
        &self,
        frames: Vec<Vec<u8>>,
    ) -> Result<Vec<Result<(), NetError>>, NetError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .ask(|reply| Command::Publish { frames, reply })
            .await?
            .into_iter()
            .map(|r| r.map_err(NetError::Publish))
            .collect())
    }

    pub async fn publish_event(&self, ev: &Event) -> Result<(), NetError> {
        self.publish_frame(wire::encode_event(ev)).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetError> {
        self.ask(Command::Peers).await
    }

    /// Whether peers can dial us, our relays and confirmed addresses.
    pub async fn reach(&self) -> Result<ReachInfo, NetError> {
        self.ask(Command::Reach).await
    }

    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(Command::ListenAddrs).await
    }

    /// The listen addresses as text, as members report them (none if the
    /// network has stopped).
    pub async fn listen_addr_texts(&self) -> Vec<String> {
        self.listen_addrs()
            .await
            .unwrap_or_default()
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// Send a catch-up request and wait for the answer.
    pub async fn catchup_request(
        &self,
        peer: PeerId,
        request: wire::CatchupRequest,
    ) -> Result<wire::CatchupResponse, NetError> {
        self.ask(|reply| Command::CatchupRequest {
            peer,
            request,
            reply,
        })
        .await?
        .map_err(NetError::Publish)
    }

    /// Answer a catch-up request ([`super::Inbound::Request`]).
    pub async fn catchup_respond(
        &self,
        channel: request_response::ResponseChannel<wire::CatchupResponse>,
        response: wire::CatchupResponse,
    ) -> Result<(), NetError> {
        self.tx
            .send(Command::CatchupRespond { channel, response })
            .await
            .map_err(|_| NetError::Closed)
    }

    /// Send a `/riftmesh/member/2` request (`/1` to an older peer) (dialing the peer if needed).
    pub async fn member_request(
        &self,
        peer: PeerId,
        request: wire::MemberRequest,
    ) -> Result<wire::MemberResponse, RequestError> {
        self.ask(|reply| Command::MemberRequest {
            peer,
            request,
            reply,
        })
        .await
        .map_err(stopped)?
    }

    pub async fn member_respond(
        &self,
        channel: request_response::ResponseChannel<wire::MemberResponse>,
        response: wire::MemberResponse,
    ) {
        let _ = self
            .tx
            .send(Command::MemberRespond { channel, response })
            .await;
    }

    async fn opaque_request(
        &self,
        proto: Opaque,
        peer: PeerId,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, RequestError> {
        self.ask(|reply| Command::OpaqueRequest {
            proto,
            peer,
            request,
            reply,
        })
        .await
        .map_err(stopped)?
    }

    async fn opaque_respond(
        &self,
        proto: Opaque,
        channel: request_response::ResponseChannel<Vec<u8>>,
        response: Vec<u8>,
    ) {
        let _ = self
            .tx
            .send(Command::OpaqueRespond {
                proto,
                channel,
                response,
            })
            .await;
    }

    /// Send a `/riftmesh/raft/3` request (dialing the peer if needed).
    pub async fn raft_request(
        &self,
        peer: PeerId,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, RequestError> {
        self.opaque_request(Opaque::Raft, peer, request).await
    }

    pub async fn raft_respond(
        &self,
        channel: request_response::ResponseChannel<Vec<u8>>,
        response: Vec<u8>,
    ) {
        self.opaque_respond(Opaque::Raft, channel, response).await
    }

    /// Send a `/riftmesh/sync/1` (blob transfer) request (dialing the peer if needed).
    pub async fn blob_request(
        &self,
        peer: PeerId,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, RequestError> {
        self.opaque_request(Opaque::Blob, peer, request).await
    }

    pub async fn blob_respond(
        &self,
        channel: request_response::ResponseChannel<Vec<u8>>,
        response: Vec<u8>,
    ) {
        self.opaque_respond(Opaque::Blob, channel, response).await
    }

    /// Fault injection: cut this agent off from `peers` (and accept them again).
    pub async fn block(&self, peers: Vec<PeerId>, block: bool) -> Result<(), NetError> {
        let cmd = if block {
            Command::Block(peers)
        } else {
            Command::Unblock(peers)
        };
        self.tx.send(cmd).await.map_err(|_| NetError::Closed)
    }

    /// Stop the network: the swarm is dropped and every connection closed.
    /// Returns when that is done (at once if it already stopped).
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The peers to hold a connection to: `None` every member (the loop
    /// dials every peer it hears of), else only these (it dials them,
    /// and closes idle connections it dialled to others); and peers to
    /// dial at once (every member, when links stop being bounded). `false`
    /// when the network's queue is full (or it stopped): try again later.
    /// Not async, so that two changes cannot arrive out of order.
    pub fn try_set_links(&self, bounded: Option<Vec<PeerId>>, dial: Vec<PeerId>) -> bool {
        self.tx
            .try_send(Command::SetLinks { bounded, dial })
            .is_ok()
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.tx
            .send(Command::Dial(addr))
            .await
            .map_err(|_| NetError::Closed)
    }
}

/// The [`RequestError`] of a request the network task was gone for.
fn stopped(_: NetError) -> RequestError {
    RequestError::Other("network task stopped".into())
}
