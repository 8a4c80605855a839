//! The libp2p behaviours the agent runs (gossipsub, identify, ping, kad,
//! mDNS, four request-response protocols, the block list and connection
//! limits, and for hosts behind NAT: AutoNAT v2, circuit relay v2 server
//! and client, DCUtR), each configured here, and the Swarm built from them.

use std::time::Duration;

use libp2p::gossipsub::{self, IdentTopic, MessageId};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, dcutr, identify, mdns, ping, relay, request_response, PeerId, StreamProtocol, Swarm,
};
use prometheus_client::registry::Registry;

use super::codec::{BlobCodec, CatchupCodec, MemberCodec, RaftCodec};
use super::transport::{agent_transport, memory_only};
use super::{
    wire, NetConfig, NetError, AGENT_VERSION, BLOB_PROTOCOL, CATCHUP_PROTOCOL, EVENTS_TOPIC,
    HANDSHAKE_TIMEOUT, IDENTIFY_PROTOCOL, KAD_PROTOCOL, MAX_BLOB_REQUEST, MAX_BLOB_RESPONSE,
    MAX_RAFT_MESSAGE, RAFT_PROTOCOL,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The derived behaviour asks each field in declaration order whether to
/// accept a connection and stops at the first that denies it; the fields
/// asked before have already taken it on. `request_response` records a
/// connection as soon as it is asked (and is never told of the denial), so a
/// denied connection would stay in its table: a later request to that peer
/// can be sent to the phantom connection and hang without a timeout or a
/// failure. The block list therefore comes first, so a blocked peer's
/// connection is refused before any other behaviour sees it, and the
/// connection limits right after it, for the same reason.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) blocked: libp2p::allow_block_list::Behaviour<libp2p::allow_block_list::BlockedPeers>,
    pub(super) limits: libp2p::connection_limits::Behaviour,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: kad::Behaviour<MemoryStore>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) catchup: request_response::Behaviour<CatchupCodec>,
    pub(super) member: request_response::Behaviour<MemberCodec>,
    pub(super) raft: request_response::Behaviour<RaftCodec>,
    pub(super) blob: request_response::Behaviour<BlobCodec>,
    /// Whether our own addresses can be dialled: asks peers to dial back.
    pub(super) autonat: autonat::v2::client::Behaviour,
    /// Dials back the addresses peers ask about.
    pub(super) autonat_server: autonat::v2::server::Behaviour,
    /// Serves circuits for members behind NAT; enabled only while we are
    /// reachable ourselves (the event loop's `reach`).
    pub(super) relay: relay::Behaviour,
    /// Reservations on relays while we are not reachable, and the circuits
    /// of [`agent_transport`]'s relay half.
    pub(super) relay_client: relay::client::Behaviour,
    /// Hole punching: upgrades a relayed connection to a direct one.
    pub(super) dcutr: dcutr::Behaviour,
}

/// How long one relayed connection may last and how many bytes it may
/// carry, both ways together, before the relay closes it (the two ends
/// reconnect through the relay or directly if they need to). Sized for
/// control traffic (membership, Raft, gossip, catch-up: well under a MB
/// a minute at 20 events/s) and for blobs between two agents that only
/// meet through a relay (proto-notes/nat.md).
pub const RELAY_CIRCUIT_SECS: u64 = 3600;
pub const RELAY_CIRCUIT_BYTES: u64 = 256 << 20;
/// Circuits one relay serves at once, in all and to one source.
pub const RELAY_MAX_CIRCUITS: usize = 64;
pub const RELAY_MAX_CIRCUITS_PER_PEER: usize = 8;

/// Build the swarm on [`transport`], subscribed to the events topic and
/// listening on `cfg.listen`.
pub(super) fn build_swarm(
    key: Keypair,
    cfg: &NetConfig,
    registry: &mut Registry,
) -> Result<Swarm<Behaviour>, NetError> {
    let psk = cfg.psk;
    let memory = memory_only(&cfg.listen);
    let (relay_transport, relay_client) = relay::client::new(key.public().to_peer_id());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| agent_transport(key, psk, relay_transport, memory))
        .map_err(|e| NetError::Build(e.to_string()))?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key| behaviour(key, cfg, relay_client))
        .map_err(|e| NetError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .with_connection_timeout(HANDSHAKE_TIMEOUT)
        .build();
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&IdentTopic::new(EVENTS_TOPIC))
        .map_err(|e| NetError::Build(e.to_string()))?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    Ok(swarm)
}

fn behaviour(
    key: &Keypair,
    cfg: &NetConfig,
    relay_client: relay::client::Behaviour,
) -> Result<Behaviour, BoxError> {
    let peer_id = key.public().to_peer_id();
    let mdns = if cfg.mdns && !memory_only(&cfg.listen) {
        Some(mdns::tokio::Behaviour::new(
            mdns::Config::default(),
            peer_id,
        )?)
    } else {
        None
    };
    Ok(Behaviour {
        gossipsub: gossipsub(key, cfg.max_message_bytes)?,
        identify: identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                .with_agent_version(AGENT_VERSION.into())
                .with_push_listen_addr_updates(true),
        ),
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(cfg.ping_interval)
                .with_timeout(cfg.ping_interval * 4),
        ),
        kad: kad(peer_id),
        mdns: mdns.into(),
        catchup: request_response(
            CatchupCodec::new(wire::MAX_CATCHUP_REQUEST, wire::MAX_CATCHUP_RESPONSE),
            CATCHUP_PROTOCOL,
            Duration::from_secs(30),
            64,
        ),
        member: request_response_of(
            MemberCodec::new(wire::MAX_MEMBER_MESSAGE),
            // The newest first (MEMBER_PROTOCOLS): an agent that knows only
            // `/1` refuses `/2` in the protocol negotiation and the
            // exchange goes on in `/1`.
            cfg.member_protocols,
            Duration::from_secs(10),
            256,
        ),
        raft: request_response(
            RaftCodec::new(MAX_RAFT_MESSAGE, MAX_RAFT_MESSAGE),
            RAFT_PROTOCOL,
            Duration::from_secs(10),
            256,
        ),
        blob: request_response(
            BlobCodec::new(MAX_BLOB_REQUEST, MAX_BLOB_RESPONSE),
            BLOB_PROTOCOL,
            // A whole exchange is one chunk; the blob module keeps
            // its own, tighter, per-request clock.
            Duration::from_secs(60),
            256,
        ),
        blocked: Default::default(),
        limits: libp2p::connection_limits::Behaviour::new(cfg.limits.connection_limits()),
        autonat: autonat::v2::client::Behaviour::default(),
        autonat_server: autonat::v2::server::Behaviour::default(),
        relay: relay_server(peer_id),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
    })
}

/// The relay server: libp2p's defaults (reservations: 128, 4 per peer,
/// an hour each, rate-limited per peer and per IP) but for the circuits'
/// limits ([`RELAY_CIRCUIT_SECS`] and the constants beside it; libp2p's
/// 2 minutes and 128 KiB are for strangers on the open internet, here
/// every client is a member: the private network admits no one else).
/// Starts disabled; the event loop enables it while we are reachable.
fn relay_server(peer_id: PeerId) -> relay::Behaviour {
    let config = relay::Config {
        max_circuits: RELAY_MAX_CIRCUITS,
        max_circuits_per_peer: RELAY_MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: Duration::from_secs(RELAY_CIRCUIT_SECS),
        max_circuit_bytes: RELAY_CIRCUIT_BYTES,
        ..Default::default()
    };
    let mut relay = relay::Behaviour::new(peer_id, config);
    relay.set_status(Some(relay::Status::Disable));
    relay
}

/// One request-response protocol, both directions, with its request
/// timeout and its limit of concurrent streams per connection.
fn request_response<C>(
    codec: C,
    protocol: &'static str,
    timeout: Duration,
    max_streams: usize,
) -> request_response::Behaviour<C>
where
    C: request_response::Codec<Protocol = StreamProtocol> + Clone + Send + 'static,
{
    request_response_of(codec, &[protocol], timeout, max_streams)
}

/// [`request_response`] speaking several versions of a protocol, the
/// preferred first.
fn request_response_of<C>(
    codec: C,
    protocols: &[&'static str],
    timeout: Duration,
    max_streams: usize,
) -> request_response::Behaviour<C>
where
    C: request_response::Codec<Protocol = StreamProtocol> + Clone + Send + 'static,
{
    request_response::Behaviour::with_codec(
        codec,
        protocols.iter().copied().map(|p| {
            (
                StreamProtocol::new(p),
                request_response::ProtocolSupport::Full,
            )
        }),
        request_response::Config::default()
            .with_request_timeout(timeout)
            .with_max_concurrent_streams(max_streams),
    )
}

fn gossipsub(key: &Keypair, max_msg: usize) -> Result<gossipsub::Behaviour, BoxError> {
    let gcfg = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| MessageId::new(&wire::message_id(&m.data)))
        .max_transmit_size(max_msg)
        .heartbeat_interval(Duration::from_millis(700))
        .build()
        .map_err(|e| e.to_string())?;
    let mut gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gcfg)?;
    let topic = IdentTopic::new(EVENTS_TOPIC);
    // Scoring punishes what harms us: invalid messages (our
    // Reject verdicts) and protocol misbehaviour. Two default
    // penalties are switched off, each of which graylisted every
    // peer of a healthy cluster and left events to catch-up:
    // - IP colocation: agents sharing an address (several on one
    //   machine, hosts behind one NAT) are not Sybils in a
    //   network closed by the swarm key;
    // - mesh delivery deficits (P3, P3b): a quiet cluster does
    //   not carry 20 messages per peer per decay interval.
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    params.topics.insert(
        topic.hash(),
        gossipsub::TopicScoreParams {
            invalid_message_deliveries_weight: -10.0,
            invalid_message_deliveries_decay: 0.9,
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            ..Default::default()
        },
    );
    gossipsub.with_peer_score(params, gossipsub::PeerScoreThresholds::default())?;
    Ok(gossipsub)
}

fn kad(peer_id: PeerId) -> kad::Behaviour<MemoryStore> {
    let mut kcfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    // Every member connects to every other it hears of, and a new
    // connection already starts a bootstrap (at most every 10 s):
    // the periodic round only refreshes, and at 20 agents a round
    // a minute cost ~5 KB/s per agent.
    kcfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(600)));
    let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kcfg);
    kad.set_mode(Some(kad::Mode::Server));
    kad
}
