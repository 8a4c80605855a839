//! Request-response codecs: [`FrameCodec`] (bincode bodies in the
//! [`wire`] frame, size-checked before a byte of the body is read) and
//! [`RawCodec`] (the same frame, the body handed over as bytes for the
//! module that owns its format), and which protocol uses which.

use libp2p::{request_response, StreamProtocol};

use super::wire;

/// bincode frames for a request-response protocol, size-limited before decoding.
pub struct FrameCodec<Req, Resp> {
    req_limit: usize,
    resp_limit: usize,
    _types: std::marker::PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> FrameCodec<Req, Resp> {
    pub fn new(req_limit: usize, resp_limit: usize) -> Self {
        FrameCodec {
            req_limit,
            resp_limit,
            _types: std::marker::PhantomData,
        }
    }
}

impl<Req, Resp> Clone for FrameCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.req_limit, self.resp_limit)
    }
}

pub type CatchupCodec = FrameCodec<wire::CatchupRequest, wire::CatchupResponse>;
/// `/riftmesh/raft/3` carries opaque bodies: the leader module owns their format.
pub type RaftCodec = FrameCodec<Vec<u8>, Vec<u8>>;
/// `/riftmesh/sync/1` (blob transfer) carries raw frames: the blob module
/// owns the body format; chunk data is never re-encoded on the way.
pub type BlobCodec = RawCodec;

/// Frames of a version byte, a u32 big-endian length checked against the
/// limit before anything is read, and the body as raw bytes.
#[derive(Clone)]
pub struct RawCodec {
    req_limit: usize,
    resp_limit: usize,
}

impl RawCodec {
    pub fn new(req_limit: usize, resp_limit: usize) -> Self {
        RawCodec {
            req_limit,
            resp_limit,
        }
    }
}

async fn read_raw<R: futures::AsyncRead + Unpin + Send>(
    io: &mut R,
    limit: usize,
) -> std::io::Result<Vec<u8>> {
    use futures::AsyncReadExt;
    let mut header = [0u8; 5];
    io.read_exact(&mut header).await?;
    let len = wire::frame_len(&header, limit)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    // Chunk-sized bodies come from the pool and go back to it once used.
    let mut body = crate::bufpool::CHUNKS.take_len(len);
    io.read_exact(&mut body).await?;
    Ok(body)
}

async fn write_raw<W: futures::AsyncWrite + Unpin + Send>(
    io: &mut W,
    body: &[u8],
) -> std::io::Result<()> {
    use futures::AsyncWriteExt;
    let len = u32::try_from(body.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "body too large"))?;
    let mut header = [0u8; 5];
    header[0] = wire::VERSION;
    header[1..].copy_from_slice(&len.to_be_bytes());
    io.write_all(&header).await?;
    io.write_all(body).await?;
    io.close().await
}

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_raw(io, self.req_limit).await
    }
    async fn read_response<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_raw(io, self.resp_limit).await
    }
    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        let r = write_raw(io, &req).await;
        crate::bufpool::CHUNKS.give(req);
        r
    }
    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()> {
        let r = write_raw(io, &res).await;
        crate::bufpool::CHUNKS.give(res);
        r
    }
}

fn invalid(e: wire::WireError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// The body of one frame, its length checked against `limit` first.
async fn read_body<R: futures::AsyncRead + Unpin + Send>(
    io: &mut R,
    limit: usize,
) -> std::io::Result<Vec<u8>> {
    use futures::AsyncReadExt;
    let mut header = [0u8; 5];
    io.read_exact(&mut header).await?;
    let len = wire::frame_len(&header, limit).map_err(invalid)?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(body)
}

async fn read_frame<T: serde::de::DeserializeOwned, R: futures::AsyncRead + Unpin + Send>(
    io: &mut R,
    limit: usize,
) -> std::io::Result<T> {
    let body = read_body(io, limit).await?;
    wire::decode_body(&body, limit).map_err(invalid)
}

async fn write_bytes<W: futures::AsyncWrite + Unpin + Send>(
    io: &mut W,
    frame: &[u8],
) -> std::io::Result<()> {
    use futures::AsyncWriteExt;
    io.write_all(frame).await?;
    io.close().await
}

async fn write_frame<T: serde::Serialize, W: futures::AsyncWrite + Unpin + Send>(
    io: &mut W,
    v: &T,
) -> std::io::Result<()> {
    let frame = wire::encode_frame(v).map_err(invalid)?;
    write_bytes(io, &frame).await
}

/// `/riftmesh/member/2` and `/1`: the same frames, the consumer counts of a
/// heartbeat carried only on `/2` ([`wire::encode_member`]).
#[derive(Clone)]
pub struct MemberCodec {
    limit: usize,
}

impl MemberCodec {
    pub fn new(limit: usize) -> Self {
        MemberCodec { limit }
    }
}

fn is_v2(p: &StreamProtocol) -> bool {
    p.as_ref() == super::MEMBER_PROTOCOL
}

impl request_response::Codec for MemberCodec {
    type Protocol = StreamProtocol;
    type Request = wire::MemberRequest;
    type Response = wire::MemberResponse;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Self::Request> {
        let body = read_body(io, self.limit).await?;
        wire::decode_member(&body, self.limit, is_v2(p)).map_err(invalid)
    }
    async fn read_response<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Self::Response> {
        let body = read_body(io, self.limit).await?;
        wire::decode_member(&body, self.limit, is_v2(p)).map_err(invalid)
    }
    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
        req: Self::Request,
    ) -> std::io::Result<()> {
        let frame = wire::encode_member(&req, is_v2(p)).map_err(invalid)?;
        write_bytes(io, &frame).await
    }
    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
        res: Self::Response,
    ) -> std::io::Result<()> {
        let frame = wire::encode_member(&res, is_v2(p)).map_err(invalid)?;
        write_bytes(io, &frame).await
    }
}

impl<Req, Resp> request_response::Codec for FrameCodec<Req, Resp>
where
    Req: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    Resp: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Self::Request> {
        read_frame(io, self.req_limit).await
    }
    async fn read_response<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Self::Response> {
        read_frame(io, self.resp_limit).await
    }
    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Self::Request,
    ) -> std::io::Result<()> {
        write_frame(io, &req).await
    }
    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Self::Response,
    ) -> std::io::Result<()> {
        write_frame(io, &res).await
    }
}
