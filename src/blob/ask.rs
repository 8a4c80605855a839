//! Asking peers over `/riftmesh/sync/1`: one request and its decoded
//! answer, and who holds a blob (every connected peer asked at once).

use std::time::Duration;

use libp2p::PeerId;

use super::objects::{Bitmap, BlobId};
use super::wire::{decode_answer, Answer, Request, Response};
use super::Ctx;
use crate::codec;
use crate::metrics::label;

/// Who holds what: (peer, None for the whole blob or its chunks).
pub(super) type Sources = Vec<(PeerId, Option<Bitmap>)>;

/// Ask `peer`, the answer decoded (a chunk copied out of its buffer).
pub(super) async fn ask(ctx: &Ctx, peer: PeerId, req: &Request) -> Result<Response, String> {
    match ask_raw(ctx, peer, req).await? {
        Answer::Chunk(buf, range) => {
            let data = buf[range].to_vec();
            crate::bufpool::CHUNKS.give(buf);
            Ok(Response::Chunk(data))
        }
        Answer::Other(r) => Ok(r),
    }
}

/// Ask `peer`, the answer as it came off the wire (see [`Answer`]).
pub(super) async fn ask_raw(ctx: &Ctx, peer: PeerId, req: &Request) -> Result<Answer, String> {
    let body = codec::encode(req).map_err(|e| e.to_string())?;
    let resp = ctx
        .net
        .blob_request(peer, body)
        .await
        .map_err(|e| e.to_string())?;
    decode_answer(resp).map_err(|e| {
        ctx.metrics
            .events_rejected
            .get_or_create(&label("reason", "blob_decode"))
            .inc();
        format!("undecodable answer: {e}")
    })
}

/// Ask every connected peer which of `blobs` it holds.
pub(super) async fn who_has(ctx: &Ctx, blob: BlobId) -> Sources {
    let peers = ctx.membership.connected_peers();
    let req = Request::Have { blobs: vec![blob] };
    let futs = peers.into_iter().map(|p| {
        let req = req.clone();
        async move {
            let r = tokio::time::timeout(Duration::from_secs(5), ask(ctx, p, &req)).await;
            match r {
                Ok(Ok(Response::Have { held })) => held
                    .into_iter()
                    .find(|h| h.blob == blob)
                    .map(|h| (p, h.chunks)),
                _ => None,
            }
        }
    });
    futures::future::join_all(futs)
        .await
        .into_iter()
        .flatten()
        .collect()
}
