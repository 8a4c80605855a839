//! The transport's ceiling on this machine: the same bytes moved over
//! loopback with no disk and no hashing, one layer added at a time, so the
//! cost of each layer shows as the difference between two rows:
//!
//! 1. plain TCP (1 MiB writes and reads);
//! 2. TCP + the private-network layer (XSalsa20 both ways), ours
//!    (`riftmesh::privnet`) and libp2p-pnet's for comparison;
//! 3. TCP + pnet + Noise (ChaCha20-Poly1305 in 64 KiB frames);
//! 4. the agent's whole stack, `riftmesh::net::transport` (TCP, pnet,
//!    multistream-select, Noise, Yamux) under two bare swarms whose only
//!    behaviour is request-response with the agent's `RawCodec`: one
//!    request per chunk, `in_flight` requests outstanding, the answer a
//!    chunk-sized buffer held in memory. This is the blob protocol's shape
//!    without the store.
//! 5. with `--features bench-quic`, for comparison: the same exchange over
//!    libp2p-quic instead (not a layer of the agent).
//!
//! Each function returns the seconds from the first byte asked for to the
//! last byte received.

use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, StreamProtocol};
use riftmesh::privnet;
use tokio::net::{TcpListener, TcpStream};

const BUF: usize = 1 << 20;

fn psk() -> PreSharedKey {
    PreSharedKey::new(rand::random())
}

/// Reads `bytes` from `r` into a reused buffer.
async fn drain<R: futures::AsyncRead + Unpin>(r: &mut R, bytes: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUF];
    let mut got = 0u64;
    while got < bytes {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n as u64;
    }
    Ok(())
}

/// Writes `bytes` to `w` from one buffer.
async fn fill<W: futures::AsyncWrite + Unpin>(w: &mut W, bytes: u64) -> std::io::Result<()> {
    let buf = vec![0x5au8; BUF];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BUF as u64) as usize;
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    w.flush().await
}

/// Seconds to move `bytes` from `a` to `b` (writer on its own task).
async fn time_transfer<A, B>(mut a: A, mut b: B, bytes: u64) -> anyhow::Result<f64>
where
    A: futures::AsyncWrite + Unpin + Send + 'static,
    B: futures::AsyncRead + Unpin,
{
    let t = Instant::now();
    let send = tokio::spawn(async move { fill(&mut a, bytes).await.map(|_| a) });
    drain(&mut b, bytes).await?;
    let secs = t.elapsed().as_secs_f64();
    send.await??;
    Ok(secs)
}

async fn pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let a = a?;
    let (b, _) = b?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

/// Row 1: plain TCP.
pub async fn tcp(bytes: u64) -> anyhow::Result<f64> {
    let (a, b) = pair().await?;
    time_transfer(
        libp2p::tcp::tokio::TcpStream(a),
        libp2p::tcp::tokio::TcpStream(b),
        bytes,
    )
    .await
}

/// Both ends of a TCP connection after the private-network handshake.
async fn pnet_pair() -> anyhow::Result<(
    privnet::PrivStream<libp2p::tcp::tokio::TcpStream>,
    privnet::PrivStream<libp2p::tcp::tokio::TcpStream>,
)> {
    let (a, b) = pair().await?;
    let k = psk();
    let (a, b) = tokio::join!(
        privnet::handshake(k, libp2p::tcp::tokio::TcpStream(a)),
        privnet::handshake(k, libp2p::tcp::tokio::TcpStream(b)),
    );
    Ok((a?, b?))
}

/// The same with libp2p-pnet's layer (its own XSalsa20), for comparison.
pub async fn libp2p_pnet(bytes: u64) -> anyhow::Result<f64> {
    let (a, b) = pair().await?;
    let k = psk();
    let (a, b) = tokio::join!(
        libp2p::pnet::PnetConfig::new(k).handshake(libp2p::tcp::tokio::TcpStream(a)),
        libp2p::pnet::PnetConfig::new(k).handshake(libp2p::tcp::tokio::TcpStream(b)),
    );
    time_transfer(a?, b?, bytes).await
}

/// Row 2: TCP + pnet.
pub async fn pnet(bytes: u64) -> anyhow::Result<f64> {
    let (a, b) = pnet_pair().await?;
    time_transfer(a, b, bytes).await
}

/// Row 3: TCP + pnet + Noise.
pub async fn pnet_noise(bytes: u64) -> anyhow::Result<f64> {
    let (a, b) = pnet_pair().await?;
    let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let (a, b) = tokio::join!(
        noise::Config::new(&ka)?.upgrade_outbound(a, "/noise"),
        noise::Config::new(&kb)?.upgrade_inbound(b, "/noise"),
    );
    let ((_, a), (_, b)) = (a?, b?);
    time_transfer(a, b, bytes).await
}

type Rr = request_response::Behaviour<riftmesh::net::RawCodec>;

fn behaviour() -> Rr {
    request_response::Behaviour::with_codec(
        riftmesh::net::RawCodec::new(
            riftmesh::net::MAX_BLOB_REQUEST,
            riftmesh::net::MAX_BLOB_RESPONSE,
        ),
        [(
            StreamProtocol::new("/bench/chunks/1"),
            ProtocolSupport::Full,
        )],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(60))
            .with_max_concurrent_streams(256),
    )
}

fn swarm(key: Keypair, psk: PreSharedKey, frames: usize) -> anyhow::Result<libp2p::Swarm<Rr>> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|k| riftmesh::net::transport_with_frames(k, psk, frames))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_behaviour(|_| behaviour())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

/// Row 4: the agent's stack under request-response, `chunk`-byte answers,
/// `in_flight` requests outstanding, Yamux data frames of `frames` bytes.
pub async fn stack(
    bytes: u64,
    chunk: usize,
    in_flight: usize,
    frames: usize,
) -> anyhow::Result<f64> {
    let k = psk();
    let server = swarm(Keypair::generate_ed25519(), k, frames)?;
    let client = swarm(Keypair::generate_ed25519(), k, frames)?;
    chunks(
        server,
        client,
        "/ip4/127.0.0.1/tcp/0",
        bytes,
        chunk,
        in_flight,
    )
    .await
}

/// For comparison only (built with `--features bench-quic`; the agent does
/// not speak it): the same request-response exchange over libp2p-quic
/// (QUIC with TLS 1.3, AES-GCM) instead of TCP + pnet + Noise + Yamux.
/// `mtu`: quinn's path-MTU discovery's upper bound (its default 1452).
#[cfg(feature = "bench-quic")]
pub async fn quic(
    bytes: u64,
    chunk: usize,
    in_flight: usize,
    mtu: Option<u16>,
) -> anyhow::Result<f64> {
    let build = || -> anyhow::Result<libp2p::Swarm<Rr>> {
        let key = Keypair::generate_ed25519();
        let mut cfg = libp2p::quic::Config::new(&key);
        if let Some(m) = mtu {
            cfg = cfg.mtu_upper_bound(m);
        }
        Ok(libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|_| {
                use libp2p::Transport;
                libp2p::quic::tokio::Transport::new(cfg)
                    .map(|(p, c), _| (p, libp2p::core::muxing::StreamMuxerBox::new(c)))
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_behaviour(|_| behaviour())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build())
    };
    chunks(
        build()?,
        build()?,
        "/ip4/127.0.0.1/udp/0/quic-v1",
        bytes,
        chunk,
        in_flight,
    )
    .await
}

/// Seconds for `client` to fetch `bytes` from `server` (listening on
/// `listen`) as `chunk`-byte answers, `in_flight` requests outstanding.
async fn chunks(
    mut server: libp2p::Swarm<Rr>,
    mut client: libp2p::Swarm<Rr>,
    listen: &str,
    bytes: u64,
    chunk: usize,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let server_id = *server.local_peer_id();
    server.listen_on(listen.parse()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
            break address;
        }
    };
    let payload = vec![0x5au8; chunk];
    let serve = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            }) = server.select_next_some().await
            {
                let _ = server
                    .behaviour_mut()
                    .send_response(channel, payload.clone());
            }
        }
    });
    client.dial(addr)?;
    loop {
        match client.select_next_some().await {
            SwarmEvent::ConnectionEstablished { .. } => break,
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                serve.abort();
                anyhow::bail!("bench dial failed: {error}");
            }
            _ => {}
        }
    }
    let total = bytes.div_ceil(chunk as u64);
    let (mut asked, mut got, mut got_bytes) = (0u64, 0u64, 0u64);
    let t = Instant::now();
    let deadline = t + Duration::from_secs(600);
    while got < total {
        while asked < total && asked - got < in_flight as u64 {
            client
                .behaviour_mut()
                .send_request(&server_id, b"chunk".to_vec());
            asked += 1;
        }
        let ev = tokio::time::timeout_at(deadline.into(), client.select_next_some()).await;
        match ev {
            Err(_) => {
                serve.abort();
                anyhow::bail!("stack ceiling: no progress before the deadline");
            }
            Ok(SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { response, .. },
                ..
            })) => {
                got += 1;
                got_bytes += response.len() as u64;
            }
            Ok(SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                error, ..
            })) => {
                serve.abort();
                anyhow::bail!("stack ceiling: request failed: {error}");
            }
            Ok(_) => {}
        }
    }
    let secs = t.elapsed().as_secs_f64();
    serve.abort();
    anyhow::ensure!(
        got_bytes >= bytes,
        "stack ceiling: {got_bytes} of {bytes} bytes"
    );
    Ok(secs)
}
