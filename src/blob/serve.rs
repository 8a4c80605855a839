//! Serving peers: answers to `/riftmesh/sync/1` requests (who holds what,
//! manifests, chunks), within the upload limits (at most `MAX_UPLOADS`
//! chunk uploads at once, `upload_rate` bytes per second).

use std::sync::Arc;

use libp2p::PeerId;

use super::objects::{BlobError, BlobId};
use super::rate::take;
use super::repair::local_damage;
use super::wire::{chunk_answer_buf, Held, Request, Response, MAX_HAVE_IDS};
use super::{count_bytes, Ctx};
use crate::codec;
use crate::metrics::label;
use crate::net::{BlobInbound, MAX_BLOB_REQUEST};

pub async fn serve_peers(ctx: Arc<Ctx>, mut inbound: tokio::sync::mpsc::Receiver<BlobInbound>) {
    while let Some(msg) = inbound.recv().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let body = match serve(&ctx, msg.peer, &msg.request).await {
                Served::Encoded(bytes) => bytes,
                Served::Value(resp) => codec::encode(&resp).unwrap_or_default(),
            };
            ctx.net.blob_respond(msg.channel, body).await;
        });
    }
}

/// An answer to a peer: a value to encode, or a chunk answer already in its
/// wire form (read from disk straight behind its header, so the megabyte is
/// not copied again to encode it).
enum Served {
    Value(Response),
    Encoded(Vec<u8>),
}

/// Count a request answered (`riftmesh_sync_requests_served_total{kind, result}`).
fn served(ctx: &Ctx, kind: &str, result: &str) {
    ctx.metrics
        .transfer_served
        .get_or_create(&vec![
            ("kind", kind.to_string()),
            ("result", result.to_string()),
        ])
        .inc();
}

async fn serve(ctx: &Arc<Ctx>, peer: PeerId, body: &[u8]) -> Served {
    let req: Request = match codec::decode(body, MAX_BLOB_REQUEST) {
        Ok(r) => r,
        Err(e) => {
            ctx.metrics
                .events_rejected
                .get_or_create(&label("reason", "blob_decode"))
                .inc();
            tracing::warn!(%peer, error = %e, "blob sync request refused");
            return Served::Value(Response::Refused {
                reason: format!("undecodable request: {e}"),
            });
        }
    };
    match req {
        Request::Have { blobs } => Served::Value(serve_have(ctx, blobs).await),
        Request::Manifest { blob } => Served::Value(serve_manifest(ctx, blob).await),
        Request::Chunk { blob, index } => serve_chunk(ctx, peer, blob, index).await,
    }
}

async fn serve_have(ctx: &Ctx, blobs: Vec<BlobId>) -> Response {
    if blobs.len() > MAX_HAVE_IDS {
        served(ctx, "have", "refused");
        return Response::Refused {
            reason: format!("at most {MAX_HAVE_IDS} ids per request"),
        };
    }
    let store = ctx.blobs.store.clone();
    let held = tokio::task::spawn_blocking(move || {
        blobs
            .into_iter()
            .filter_map(|id| {
                let meta = store.meta(&id).ok()??;
                if meta.complete {
                    Some(Held {
                        blob: id,
                        chunks: None,
                    })
                } else {
                    // Even with no chunk yet: the asker learns
                    // it is not the only receiver (its chunk order
                    // stays shuffled, see sched).
                    let have = store.have(&id).ok()??;
                    Some(Held {
                        blob: id,
                        chunks: Some(have),
                    })
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    served(ctx, "have", "ok");
    Response::Have { held }
}

async fn serve_manifest(ctx: &Ctx, blob: BlobId) -> Response {
    let store = ctx.blobs.store.clone();
    match tokio::task::spawn_blocking(move || store.manifest(&blob)).await {
        Ok(Ok(Some(m))) => {
            served(ctx, "manifest", "ok");
            Response::Manifest((*m).clone())
        }
        Ok(Ok(None)) => {
            served(ctx, "manifest", "not_found");
            Response::NotFound
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read a manifest");
            Response::Refused {
                reason: "store error".into(),
            }
        }
        Err(_) => Response::Refused {
            reason: "store error".into(),
        },
    }
}

async fn serve_chunk(ctx: &Arc<Ctx>, peer: PeerId, blob: BlobId, index: u32) -> Served {
    let b = &ctx.blobs;
    let Ok(_permit) = b.uploads.clone().try_acquire_owned() else {
        served(ctx, "chunk", "busy");
        return Served::Value(Response::Busy { retry_ms: 200 });
    };
    let store = b.store.clone();
    let res = tokio::task::spawn_blocking(move || {
        store.read_verified_chunk_after(&blob, index, chunk_answer_buf)
    })
    .await;
    Served::Value(match res {
        Ok(Ok((answer, data_len, hashed))) => {
            ctx.metrics
                .transfer_serve_checks
                .get_or_create(&label("check", if hashed { "hashed" } else { "vouched" }))
                .inc();
            take(&b.up, data_len as u64).await;
            tracing::trace!(%peer, chunk = index, "chunk served");
            count_bytes(ctx, peer, "out", data_len as u64);
            served(ctx, "chunk", "ok");
            return Served::Encoded(answer);
        }
        Ok(Err(e @ BlobError::DamagedChunk { .. })) => {
            local_damage(ctx, blob, &e, "serving it to a peer");
            served(ctx, "chunk", "damaged");
            Response::NotFound
        }
        Ok(Err(BlobError::NotHeld(_))) | Ok(Err(BlobError::Invalid(_))) => {
            served(ctx, "chunk", "not_found");
            Response::NotFound
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read a chunk to serve");
            served(ctx, "chunk", "error");
            Response::Refused {
                reason: "store error".into(),
            }
        }
        Err(_) => Response::Refused {
            reason: "store error".into(),
        },
    })
}
