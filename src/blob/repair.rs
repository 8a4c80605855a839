//! Damaged copies: a stored blob that fails verification is not used; it is
//! queued for repair, where its damaged chunks are found and forgotten (the
//! repair loop in `names` then fetches them again from peers).

use std::sync::Arc;

use super::objects::{hex_id, BlobError, BlobId, NameRecord};
use super::{lock, Ctx};
use crate::metrics::label;

/// A stored copy failed verification while `doing` something with it:
/// counted (`riftmesh_sync_chunks_rejected_total{reason="local_damage"}`),
/// logged with the file's path, and repaired from peers.
pub fn local_damage(ctx: &Arc<Ctx>, blob: BlobId, e: &BlobError, doing: &str) {
    ctx.metrics
        .transfer_chunks_rejected
        .get_or_create(&label("reason", "local_damage"))
        .inc();
    tracing::error!(error = %e, doing, "a stored blob is damaged; not using it, repairing it from peers");
    if !lock(&ctx.blobs.damaged_queued).insert(blob) {
        return;
    }
    if ctx.blobs.damaged.try_send(blob).is_err() {
        lock(&ctx.blobs.damaged_queued).remove(&blob);
        tracing::warn!(blob = %hex_id(&blob), "repair queue full; the damage is found again when the copy is next used");
    }
}

/// A stored copy failed verification: find every damaged chunk and forget
/// them. Returns what to fetch again (checked against our manifest, whose
/// root was checked when the blob was stored): the record and the names
/// that point at the blob; `None` when nothing is to be fetched.
pub(super) async fn scrub(ctx: &Ctx, blob: BlobId) -> Option<(NameRecord, Vec<String>)> {
    if lock(&ctx.blobs.transfers).contains_key(&blob) {
        return None;
    }
    let store = ctx.blobs.store.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<_, BlobError> {
        let bad = store.scrub(&blob)?;
        if !bad.is_empty() {
            store.demote(&blob, &bad)?;
        }
        let meta = store.meta(&blob)?;
        let names: Vec<String> = store
            .names()?
            .into_iter()
            .filter(|(_, r)| r.blob == blob)
            .map(|(n, _)| n)
            .collect();
        Ok((bad, meta, names))
    })
    .await;
    match r {
        Ok(Ok((bad, Some(meta), names))) if !bad.is_empty() => {
            tracing::warn!(blob = %hex_id(&blob), chunks = ?bad, "damaged chunks forgotten; fetching them again");
            let rec = NameRecord {
                blob,
                size: meta.size,
                root: meta.root,
                ts_ms: 0,
                event_hash: [0; 32],
                event_id: String::new(),
                event_type: String::new(),
                origin: "riftmesh/repair".into(),
            };
            Some((rec, names))
        }
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            tracing::error!(blob = %hex_id(&blob), error = %e, "cannot repair a damaged blob");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "repair task failed");
            None
        }
    }
}
