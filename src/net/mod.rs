//! The libp2p side: one task owns the Swarm; the rest of the agent talks to it
//! through [`NetHandle`] (commands with replies) and receives verified events on
//! a bounded channel. Wire frames are defined in [`wire`].
//!
//! This file is the module's map and its public surface: the protocols the
//! agent speaks (ids and size limits), what the network hands to the rest of
//! the agent, and [`start`]. The parts:
//! - [`wire`]: frame and message formats (gossip events, catch-up, membership);
//! - `codec`: request-response codecs (bincode frames, raw frames);
//! - `transport`: TCP or a relay circuit, the private network ([`privnet`]),
//!   Noise, Yamux ([`mux`]);
//! - `behaviour`: the libp2p behaviours and the swarm built from them;
//! - `handle`: [`NetHandle`], the commands other tasks send;
//! - `event_loop`: the task that owns the Swarm (commands, connections and
//!   maintenance; gossip validation, request-response traffic, the
//!   refusals it counts and NAT traversal in files of their own).

mod behaviour;
mod codec;
mod event_loop;
mod handle;
pub mod mux;
pub mod privnet;
mod transport;
pub mod wire;

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::{request_response, Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::event::Event;
use crate::limits::NetLimits;
use crate::metrics::Metrics;

pub use codec::{BlobCodec, CatchupCodec, FrameCodec, MemberCodec, RaftCodec, RawCodec};
pub use handle::NetHandle;
pub use transport::{
    memory_only, memory_transport, transport, transport_with_frames, HANDSHAKE_TIMEOUT,
};

pub const EVENTS_TOPIC: &str = "riftmesh/events/1";
pub const IDENTIFY_PROTOCOL: &str = "/riftmesh/id/1.0.0";
pub const KAD_PROTOCOL: &str = "/riftmesh/kad/1.0.0";
pub const AGENT_VERSION: &str = concat!("riftmesh/", env!("CARGO_PKG_VERSION"));

/// Catch-up: summaries, digests and event fetches ([`wire::CatchupRequest`]).
pub const CATCHUP_PROTOCOL: &str = "/riftmesh/events/1";

/// Membership records, probes and leaves; `/2` adds consumer counts to
/// the heartbeat ([`wire::encode_member`]). Both are offered, `/2` first,
/// so an agent that knows only `/1` answers in `/1`.
pub const MEMBER_PROTOCOL: &str = "/riftmesh/member/2";
/// The membership protocol of agents without consumer counts.
pub const MEMBER_PROTOCOL_V1: &str = "/riftmesh/member/1";
/// The member protocol versions an agent offers, the preferred first.
pub const MEMBER_PROTOCOLS: &[&str] = &[MEMBER_PROTOCOL, MEMBER_PROTOCOL_V1];

/// The `Refused` reason of a request over its peer's rate.
pub const BUSY: &str = "busy: request rate exceeded";

pub const RAFT_PROTOCOL: &str = "/riftmesh/raft/3";
/// Largest `/riftmesh/raft/3` body either way.
pub const MAX_RAFT_MESSAGE: usize = 4 << 20;
/// Largest `/riftmesh/sync/1` request body.
pub const MAX_BLOB_REQUEST: usize = 64 << 10;
/// Largest `/riftmesh/sync/1` response body: the largest chunk or manifest
/// plus framing.
pub const MAX_BLOB_RESPONSE: usize = (8 << 20) + (64 << 10);

/// Blob transfer: manifests and chunks ([`BlobCodec`]).
pub const BLOB_PROTOCOL: &str = "/riftmesh/sync/1";

#[derive(Clone, Debug)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    pub psk: PreSharedKey,
    /// Largest gossip message (whole frame).
    pub max_message_bytes: usize,
    /// Capacity of the queue of verified inbound events.
    pub inbound_queue: usize,
    /// How often to redial bootstrap peers and refresh the DHT.
    pub maintain_every: Duration,
    /// libp2p ping interval on every connection (liveness and round-trip time).
    pub ping_interval: Duration,
    /// Connection limits and per-peer / per-source rates.
    pub limits: NetLimits,
    /// The member protocol versions offered, the preferred first:
    /// [`MEMBER_PROTOCOLS`]; a shorter list only in compatibility tests
    /// (an agent that knows only `/riftmesh/member/1`).
    pub member_protocols: &'static [&'static str],
    /// A connection dialled to a peer that is not a link closes after
    /// carrying no request for this long ([`LINK_IDLE`]).
    pub link_idle: Duration,
    /// Peers heard of are dialled only while fewer than this many are
    /// connected, until membership names the links (`full_mesh_max`).
    pub full_mesh_max: usize,
}

/// Default of [`NetConfig::link_idle`].
pub const LINK_IDLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Serialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub addresses: Vec<String>,
    pub agent_version: Option<String>,
    pub listen_addrs: Vec<String>,
    pub connected_secs: u64,
    pub rtt_ms: Option<f64>,
    pub gossip_subscribed: bool,
    /// How the best of its connections reaches it: `direct`,
    /// `hole-punched` or `relayed`.
    pub via: &'static str,
}

/// Whether peers can dial this agent, and what it does about it
/// (proto-notes/nat.md).
#[derive(Clone, Debug, Serialize)]
pub struct ReachInfo {
    /// `public` (a peer dialled one of our addresses back), `private` (a
    /// peer failed to and none is confirmed), or `unknown`.
    pub state: &'static str,
    /// Relays holding a reservation for us (only while `private`).
    pub relays: Vec<String>,
    /// Our addresses confirmed dialable from outside.
    pub external: Vec<String>,
}

/// What the network hands to the node.
pub enum Inbound {
    /// A verified event from gossip.
    Gossip { event: Box<Event>, from: PeerId },
    /// A catch-up request to answer with [`NetHandle::respond`].
    Request {
        peer: PeerId,
        request: wire::CatchupRequest,
        channel: request_response::ResponseChannel<wire::CatchupResponse>,
    },
    /// A peer connected (first connection).
    Connected(PeerId),
}

/// What the network hands to membership, on a channel of its own so liveness
/// never waits behind a burst of events.
pub enum MemberInbound {
    /// First connection to a peer established.
    Connected(PeerId),
    /// Last connection to a peer closed.
    Disconnected(PeerId),
    /// A ping answered.
    Rtt(PeerId, Duration),
    /// A `/riftmesh/member/2` (or `/1`) request to answer with [`NetHandle::member_respond`].
    Request {
        peer: PeerId,
        request: wire::MemberRequest,
        channel: request_response::ResponseChannel<wire::MemberResponse>,
    },
}

/// Why a request to a peer got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("cannot connect to the peer: {0}")]
    Dial(String),
    #[error("no answer in time")]
    Timeout,
    #[error("{0}")]
    Other(String),
}

/// A request on a protocol whose bodies another module owns (raft, blob
/// transfer), to answer with [`NetHandle::raft_respond`] / [`NetHandle::blob_respond`].
pub struct OpaqueInbound {
    pub peer: PeerId,
    pub request: Vec<u8>,
    pub channel: request_response::ResponseChannel<Vec<u8>>,
}
pub type RaftInbound = OpaqueInbound;
pub type BlobInbound = OpaqueInbound;

/// What the network hands to the rest of the agent.
pub struct Inbox {
    pub events: mpsc::Receiver<Inbound>,
    pub member: mpsc::Receiver<MemberInbound>,
    pub raft: mpsc::Receiver<RaftInbound>,
    pub blob: mpsc::Receiver<BlobInbound>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network task stopped")]
    Closed,
    #[error("{0}")]
    Publish(String),
    #[error("cannot build the network: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
}

/// Build the swarm, start listening, and spawn the task that owns it.
/// Returns the handle and the receivers of verified inbound messages.
pub fn start(
    key: Keypair,
    cfg: NetConfig,
    registry: &mut Registry,
    metrics: Metrics,
) -> Result<(NetHandle, Inbox), NetError> {
    let local_peer_id = key.public().to_peer_id();
    let swarm = behaviour::build_swarm(key, &cfg, registry)?;
    let (event_loop, tx, inbox) = event_loop::EventLoop::new(swarm, cfg, registry, metrics);
    let handle = NetHandle::new(tx, local_peer_id, event_loop.max_msg());
    tokio::spawn(event_loop.run());
    Ok((handle, inbox))
}

/// Parse a go-libp2p swarm key file (`/key/swarm/psk/1.0.0/`).
pub fn parse_psk(text: &str) -> Result<PreSharedKey, String> {
    text.parse::<PreSharedKey>().map_err(|e| e.to_string())
}

/// A fresh random swarm key in the go-libp2p text format.
pub fn generate_psk() -> PreSharedKey {
    PreSharedKey::new(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    #[test]
    fn psk_text_format_roundtrips() {
        let k = super::generate_psk();
        let text = k.to_string();
        assert!(text.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"));
        assert_eq!(
            super::parse_psk(&text).unwrap().fingerprint().to_string(),
            k.fingerprint().to_string()
        );
    }
}
