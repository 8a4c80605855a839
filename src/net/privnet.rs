//! The private-network layer (the swarm key), byte for byte the protocol of
//! libp2p-pnet and go-libp2p's private networks: each side sends a random
//! 24-byte nonce, reads the peer's, and from then on encrypts what it sends
//! with XSalsa20(key, own nonce) and decrypts what it reads with
//! XSalsa20(key, peer's nonce).
//!
//! Why not `libp2p::pnet`: its XSalsa20 is the pure-Rust scalar one
//! (~570 MB/s per core here), and it ran on every byte both ways: the
//! largest cost on the bulk path. The cipher here is libsodium's
//! (SSE2/AVX2, ~4 GB/s per core here). The key type, parsing and
//! fingerprint stay libp2p-pnet's.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::task::{ready, Context, Poll};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::pnet::PreSharedKey;

pub const NONCE_SIZE: usize = 24;
/// The most plaintext one write takes: the encrypted copy waits in a
/// buffer of at most this size until the socket takes it.
const MAX_WRITE: usize = 256 << 10;
const BLOCK: u64 = 64;

/// The 32 raw bytes of a swarm key (libp2p-pnet keeps them private; its
/// key-file text is the one public form). Fails closed: a text not in the
/// form the key's own formatter writes is an error, never a zero key.
pub fn key_bytes(psk: &PreSharedKey) -> io::Result<[u8; 32]> {
    key_bytes_from_text(&psk.to_string())
}

fn key_bytes_from_text(text: &str) -> io::Result<[u8; 32]> {
    let mut lines = text.lines();
    let (head, enc, hex_line) = (lines.next(), lines.next(), lines.next());
    let mut out = [0u8; 32];
    let well_formed = head.map(str::trim) == Some("/key/swarm/psk/1.0.0/")
        && enc.map(str::trim) == Some("/base16/")
        && hex_line.is_some_and(|h| hex::decode_to_slice(h.trim(), &mut out).is_ok());
    if !well_formed {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "swarm key text not in the /key/swarm/psk/1.0.0/ base16 form",
        ));
    }
    Ok(out)
}

/// libsodium's one-time initialisation. Fails closed: the agent stops at
/// start (`net::start` calls this first) and a handshake fails, rather
/// than running a cipher whose library did not initialise.
pub fn init() -> io::Result<()> {
    static INIT: Once = Once::new();
    static OK: AtomicBool = AtomicBool::new(false);
    // SAFETY: sodium_init is safe to call from any thread; Once runs it once.
    INIT.call_once(|| unsafe {
        OK.store(libsodium_sys::sodium_init() >= 0, Ordering::Release);
    });
    if OK.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(io::Error::other(
            "libsodium failed to initialise (sodium_init < 0): the private network cannot run",
        ))
    }
}

/// XSalsa20 keystream at a byte position.
pub struct XorStream {
    key: [u8; 32],
    nonce: [u8; NONCE_SIZE],
    pos: u64,
}

impl XorStream {
    pub fn new(key: [u8; 32], nonce: [u8; NONCE_SIZE]) -> Self {
        XorStream { key, nonce, pos: 0 }
    }

    /// `len` bytes at `src` XOR the keystream from `block`, to `out`.
    ///
    /// # Safety
    /// `src` and `out` are valid for `len` bytes; they are the same buffer
    /// or do not overlap (libsodium allows in-place).
    unsafe fn xor_raw(&self, out: *mut u8, src: *const u8, len: usize, block: u64) {
        // SAFETY: the caller's guarantee; nonce is 24 bytes, key 32.
        unsafe {
            libsodium_sys::crypto_stream_xsalsa20_xor_ic(
                out,
                src,
                len as u64,
                self.nonce.as_ptr(),
                block,
                self.key.as_ptr(),
            );
        }
    }

    fn xor_blocks(&self, data: &mut [u8], block: u64) {
        // SAFETY: in place, over data's own length.
        unsafe { self.xor_raw(data.as_mut_ptr(), data.as_ptr(), data.len(), block) }
    }

    /// `out` = `src` XOR keystream from `block`; the two the same length.
    fn xor_blocks_into(&self, src: &[u8], out: &mut [u8], block: u64) {
        assert_eq!(src.len(), out.len());
        // SAFETY: both valid for out.len() bytes; distinct (one is
        // borrowed mutably, the other shared).
        unsafe { self.xor_raw(out.as_mut_ptr(), src.as_ptr(), out.len(), block) }
    }

    /// The rest of the keystream block `pos` is in, XORed into the first
    /// bytes of `out` (from `src`, or in place): how many bytes that was.
    fn partial_block(&mut self, src: Option<&[u8]>, out: &mut [u8]) -> usize {
        let within = (self.pos % BLOCK) as usize;
        if within == 0 || out.is_empty() {
            return 0;
        }
        let mut ks = [0u8; BLOCK as usize];
        self.xor_blocks(&mut ks, self.pos / BLOCK);
        let n = (BLOCK as usize - within).min(out.len());
        for (i, k) in ks[within..within + n].iter().enumerate() {
            out[i] = src.map_or(out[i], |s| s[i]) ^ k;
        }
        self.pos += n as u64;
        n
    }

    /// XOR the next `data.len()` keystream bytes into `data`.
    pub fn apply(&mut self, data: &mut [u8]) {
        let n = self.partial_block(None, data);
        let data = &mut data[n..];
        if !data.is_empty() {
            self.xor_blocks(data, self.pos / BLOCK);
            self.pos += data.len() as u64;
        }
    }

    /// `out` = `src` XOR the next `src.len()` keystream bytes (no copy of
    /// `src` first).
    pub fn apply_into(&mut self, src: &[u8], out: &mut [u8]) {
        let n = self.partial_block(Some(src), out);
        let (src, out) = (&src[n..], &mut out[n..]);
        if !src.is_empty() {
            self.xor_blocks_into(src, out, self.pos / BLOCK);
            self.pos += src.len() as u64;
        }
    }
}

/// Exchange nonces over `socket` (ours first, as libp2p-pnet does) and wrap
/// it.
pub async fn handshake<S>(psk: PreSharedKey, mut socket: S) -> io::Result<PrivStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    init()?;
    let key = key_bytes(&psk)?;
    let local: [u8; NONCE_SIZE] = rand::random();
    let mut remote = [0u8; NONCE_SIZE];
    socket.write_all(&local).await?;
    socket.flush().await?;
    socket.read_exact(&mut remote).await?;
    Ok(PrivStream {
        inner: socket,
        read: XorStream::new(key, remote),
        write: XorStream::new(key, local),
        out: Vec::new(),
        filled: 0,
        sent: 0,
    })
}

/// A connection after the handshake: reads are decrypted in place, writes
/// are encrypted into one buffer that drains before the next write.
pub struct PrivStream<S> {
    inner: S,
    read: XorStream,
    write: XorStream,
    /// Ciphertext `out[sent..filled]` waits for the socket.
    out: Vec<u8>,
    filled: usize,
    sent: usize,
}

impl<S: AsyncWrite + Unpin> PrivStream<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.filled {
            let n = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.out[self.sent..self.filled])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.filled = 0;
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrivStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.read.apply(&mut buf[..n]);
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrivStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        let n = buf.len().min(MAX_WRITE);
        // The buffer grows to the largest write once; after that each write
        // is encrypted straight into it.
        if this.out.len() < n {
            this.out.resize(n, 0);
        }
        this.write.apply_into(&buf[..n], &mut this.out[..n]);
        this.filled = n;
        // Start sending now; what the socket does not take yet goes first
        // at the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use salsa20::cipher::{KeyIvInit, StreamCipher};

    /// The keystream equals the reference XSalsa20 at every split of the
    /// data, aligned to blocks or not.
    #[test]
    fn keystream_matches_reference_at_any_split() {
        let key: [u8; 32] = rand::random();
        let nonce: [u8; 24] = rand::random();
        init().unwrap();
        let plain: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut want = plain.clone();
        salsa20::XSalsa20::new(&key.into(), &nonce.into()).apply_keystream(&mut want);
        for split in [1usize, 3, 63, 64, 65, 100, 128, 1000, 4999] {
            let mut got = plain.clone();
            let mut s = XorStream::new(key, nonce);
            let mut off = 0;
            while off < got.len() {
                let end = (off + split).min(got.len());
                s.apply(&mut got[off..end]);
                off = end;
            }
            assert_eq!(got, want, "split {split}");
            // Out of place, from the plaintext, at the same splits.
            let mut out = vec![0u8; plain.len()];
            let mut s = XorStream::new(key, nonce);
            let mut off = 0;
            while off < plain.len() {
                let end = (off + split).min(plain.len());
                s.apply_into(&plain[off..end], &mut out[off..end]);
                off = end;
            }
            assert_eq!(out, want, "split {split}, out of place");
        }
    }

    #[test]
    fn key_bytes_round_trip() {
        let raw: [u8; 32] = rand::random();
        assert_eq!(key_bytes(&PreSharedKey::new(raw)).unwrap(), raw);
    }

    #[test]
    fn a_key_text_not_in_the_formatters_form_is_an_error_not_a_zero_key() {
        let raw: [u8; 32] = rand::random();
        let good = PreSharedKey::new(raw).to_string();
        assert_eq!(key_bytes_from_text(&good).unwrap(), raw);
        let bad = [
            good.replace("/base16/", "/base64/"),
            good.replace("/key/swarm/psk/1.0.0/", "/key/other/"),
            good.lines().take(2).collect::<Vec<_>>().join("\n"),
            good[..good.len() - 2].to_string(),
            good.replacen(&hex::encode(raw)[..2], "zz", 1),
            String::new(),
        ];
        for b in bad {
            assert!(key_bytes_from_text(&b).is_err(), "{b:?} accepted");
        }
    }

    #[test]
    fn libsodium_initialises() {
        init().unwrap();
    }

    /// Our layer talks to libp2p-pnet's on the same socket pair, both ways.
    #[tokio::test]
    async fn interoperates_with_libp2p_pnet() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let psk = PreSharedKey::new(rand::random());
        let (ours, theirs) = tokio::join!(
            handshake(psk, libp2p::tcp::tokio::TcpStream(a.unwrap())),
            libp2p::pnet::PnetConfig::new(psk)
                .handshake(libp2p::tcp::tokio::TcpStream(b.unwrap().0)),
        );
        let (mut ours, mut theirs) = (ours.unwrap(), theirs.unwrap());
        let msg: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let m2 = msg.clone();
        let w = tokio::spawn(async move {
            for part in m2.chunks(7777) {
                ours.write_all(part).await.unwrap();
            }
            ours.flush().await.unwrap();
            let mut back = vec![0u8; 5];
            ours.read_exact(&mut back).await.unwrap();
            back
        });
        let mut got = vec![0u8; msg.len()];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
        theirs.write_all(b"hello").await.unwrap();
        theirs.flush().await.unwrap();
        assert_eq!(w.await.unwrap(), b"hello");
    }
}
