//! The stream multiplexer: Yamux (`/yamux/1.0.0`, the same wire as every
//! libp2p peer speaks), wrapped here rather than through `libp2p-yamux`
//! because that wrapper fixes the data-frame size at yamux's 16 KiB default.
//!
//! Chunks of a blob are 1 MiB; in 16 KiB frames every chunk costs 64 frame
//! headers, 64 Noise frames and as many socket writes at each end. The frame
//! size is a sender-side choice (the receiver accepts any frame within its
//! window), so a larger one needs nothing from the peer and mixes freely
//! with peers that keep 16 KiB. Measured in `cargo bench --bench blob`
//! ("transport ceiling" rows).

use std::collections::VecDeque;
use std::io;
use std::iter;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::{future, AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

/// Payload bytes per Yamux data frame this agent sends. 60 KiB keeps a
/// frame plus its 12-byte header inside one Noise frame (65 519 bytes of
/// plaintext), so one frame is one encryption and one socket write.
pub const DEFAULT_FRAME_BYTES: usize = 60 * 1024;

/// Inbound streams accepted by the connection but not yet taken by the
/// swarm. Beyond it new streams are reset (yamux's own ack backlog is 256,
/// so a well-behaved peer stops opening streams before this is reached).
const MAX_PENDING_INBOUND: usize = 256;

/// Upgrade that negotiates `/yamux/1.0.0` and runs yamux with our frame size.
#[derive(Debug, Clone)]
pub struct Config(yamux::Config);

impl Config {
    /// Yamux defaults (1 GiB connection window, 512 streams), with data
    /// frames of `frame_bytes` payload.
    pub fn new(frame_bytes: usize) -> Self {
        let mut c = yamux::Config::default();
        c.set_split_send_size(frame_bytes.max(1024));
        Config(c)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new(DEFAULT_FRAME_BYTES)
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = iter::Once<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<io::Result<Muxer<C>>>;

    fn upgrade_inbound(self, io: C, _: &'static str) -> Self::Future {
        future::ready(Ok(Muxer::new(io, self.0, yamux::Mode::Server)))
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<io::Result<Muxer<C>>>;

    fn upgrade_outbound(self, io: C, _: &'static str) -> Self::Future {
        future::ready(Ok(Muxer::new(io, self.0, yamux::Mode::Client)))
    }
}

/// One multiplexed connection.
pub struct Muxer<C> {
    conn: yamux::Connection<C>,
    /// Streams the peer opened while the swarm polled `poll` (which is the
    /// only way yamux makes progress) rather than `poll_inbound`.
    pending: VecDeque<yamux::Stream>,
    inbound_waker: Option<Waker>,
}

impl<C> Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    fn new(io: C, cfg: yamux::Config, mode: yamux::Mode) -> Self {
        Muxer {
            conn: yamux::Connection::new(io, cfg, mode),
            pending: VecDeque::new(),
            inbound_waker: None,
        }
    }

    fn next_inbound(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<yamux::Stream>> {
        match self.conn.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(s))) => Poll::Ready(Ok(s)),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(into_io(e))),
            Poll::Ready(None) => Poll::Ready(Err(into_io(yamux::ConnectionError::Closed))),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn into_io(e: yamux::ConnectionError) -> io::Error {
    match e {
        yamux::ConnectionError::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<C> StreamMuxer for Muxer<C>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    type Substream = yamux::Stream;
    type Error = io::Error;

    fn poll_inbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<yamux::Stream>> {
        let this = self.get_mut();
        if let Some(s) = this.pending.pop_front() {
            return Poll::Ready(Ok(s));
        }
        match this.next_inbound(cx) {
            Poll::Pending => {
                this.inbound_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            ready => ready,
        }
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<yamux::Stream>> {
        self.get_mut().conn.poll_new_outbound(cx).map_err(into_io)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().conn.poll_close(cx).map_err(into_io)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<StreamMuxerEvent>> {
        let this = self.get_mut();
        // Drive the connection until it has nothing more to do; each stream
        // the peer opens meanwhile waits for `poll_inbound`. After a handful
        // of new streams, yield (and ask to be polled again) so one busy
        // connection cannot hold the swarm's task.
        for _ in 0..16 {
            match this.next_inbound(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(s)) => {
                    if this.pending.len() >= MAX_PENDING_INBOUND {
                        tracing::debug!(stream = %s, "inbound stream reset: backlog full");
                        drop(s);
                    } else {
                        this.pending.push_back(s);
                        if let Some(w) = this.inbound_waker.take() {
                            w.wake();
                        }
                    }
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
