//! The agent's transport stack: TCP (or a relay circuit), the private
//! network (the swarm key), multistream-select, Noise, Yamux; and the
//! handshake deadline.

use std::time::Duration;

use libp2p::core::transport::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use libp2p::{noise, tcp, Multiaddr, PeerId, Transport};

/// The agent's transport, every layer required: TCP (nodelay), the private
/// network handshake with the swarm key ([`super::privnet`]),
/// multistream-select, Noise, Yamux ([`super::mux`], 60 KiB data frames).
/// Public so that the benchmark measures the same stack the agent runs.
pub fn transport(
    key: &Keypair,
    psk: PreSharedKey,
) -> Result<
    libp2p::core::transport::Boxed<(PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    transport_with_frames(key, psk, super::mux::DEFAULT_FRAME_BYTES)
}

/// A connection's whole handshake (private-network nonces, Noise, Yamux) must
/// finish within this, in both directions: a peer that opens TCP connections
/// and then stays silent holds a pending-connection slot until then (with
/// `max_pending_incoming` of them it would otherwise lock every peer out).
/// libp2p's swarm builder applies it to the whole transport; its default is
/// the same 10 s, set here so that it is ours and documented.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's transport: [`transport`]'s TCP or, for `/p2p-circuit`
/// addresses, a circuit through a relay (`relay`, the client half of
/// libp2p's circuit relay v2, whose behaviour runs beside it). A circuit
/// goes through the same layers as a TCP connection, end to end between
/// the two agents: the private-network handshake with the swarm key, Noise,
/// Yamux; the relay forwards bytes it cannot read (proto-notes/nat.md).
pub fn agent_transport(
    key: &Keypair,
    psk: PreSharedKey,
    relay: libp2p::relay::client::Transport,
    memory: bool,
) -> Result<
    libp2p::core::transport::Boxed<(PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    let frames = super::mux::DEFAULT_FRAME_BYTES;
    if memory {
        secure(
            libp2p::core::transport::MemoryTransport::default().or_transport(relay),
            key,
            psk,
            frames,
        )
    } else {
        secure(tcp_base().or_transport(relay), key, psk, frames)
    }
}

/// [`transport`] with another Yamux data-frame size (the benchmark compares
/// yamux's 16 KiB default with ours).
pub fn transport_with_frames(
    key: &Keypair,
    psk: PreSharedKey,
    frame_bytes: usize,
) -> Result<
    libp2p::core::transport::Boxed<(PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    secure(tcp_base(), key, psk, frame_bytes)
}

/// TCP with nodelay, under every other layer.
fn tcp_base() -> tcp::tokio::Transport {
    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
}

/// The in-process transport of tests: the same layers over libp2p's
/// `MemoryTransport` instead of TCP, so that many agents run in one test
/// process (tests/inproc.rs). Chosen by [`super::start`] only when every
/// listen address is `/memory/<n>` ([`memory_only`]); an agent given any
/// other address runs TCP exactly as before.
pub fn memory_transport(
    key: &Keypair,
    psk: PreSharedKey,
) -> Result<
    libp2p::core::transport::Boxed<(PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    secure(
        libp2p::core::transport::MemoryTransport::default(),
        key,
        psk,
        super::mux::DEFAULT_FRAME_BYTES,
    )
}

/// Whether `listen` names only `/memory/<n>` addresses (and at least one):
/// then the agent runs over [`memory_transport`], without mDNS.
pub fn memory_only(listen: &[Multiaddr]) -> bool {
    !listen.is_empty()
        && listen
            .iter()
            .all(|a| matches!(a.iter().next(), Some(Protocol::Memory(_))))
}

/// Every layer above the byte stream, whatever carries it: the private
/// network handshake, multistream-select, Noise, Yamux.
fn secure<T>(
    base: T,
    key: &Keypair,
    psk: PreSharedKey,
    frame_bytes: usize,
) -> Result<
    libp2p::core::transport::Boxed<(PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    Box<dyn std::error::Error + Send + Sync>,
>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    // Fail closed: no transport at all if the cipher library or the key
    // is not usable (the agent stops at start with this message).
    super::privnet::init()?;
    super::privnet::key_bytes(&psk)?;
    let noise = noise::Config::new(key)?;
    Ok(base
        .and_then(move |socket, _| super::privnet::handshake(psk, socket))
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(super::mux::Config::new(frame_bytes))
        .map(|(p, m), _| (p, libp2p::core::muxing::StreamMuxerBox::new(m)))
        .boxed())
}
