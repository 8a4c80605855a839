//! Damaged copies: a stored blob that fails verification is not used; its
//! damaged chunks are found, forgotten and fetched again from peers.

use std::sync::Arc;

use super::names::want;
use super::store::{hex_id, BlobError, BlobId, NameRecord};
use super::{lock, Ctx};
use crate::metrics::label;

/// A stored copy failed verification while `doing` something with it:
/// counted (`riftmesh_sync_chunks_rejected_total{reason="local_damage"}`),
/// logged with the file's path, and repaired from peers.
pub fn local_damage(ctx: &Arc<Ctx>, blob: BlobId, e: &BlobError, doing: &str) {
    ctx.metrics
        .sync_chunks_rejected
        .get_or_create(&label("reason", "local_damage"))
        .inc();
    tracing::error!(error = %e, doing, "a stored blob is damaged; not using it, repairing it from peers");
    ctx.tasks.spawn(repair(ctx.clone(), blob));
}

/// A stored copy failed verification: find every damaged chunk, forget them,
/// and fetch them again from peers (checked against our manifest, whose root
/// was checked when the blob was stored).
pub async fn repair(ctx: Arc<Ctx>, blob: BlobId) {
    if lock(&ctx.blobs.transfers).contains_key(&blob) {
        return;
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
            want(&ctx, blob, rec, names);
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(blob = %hex_id(&blob), error = %e, "cannot repair a damaged blob")
        }
        Err(e) => tracing::error!(error = %e, "repair task failed"),
    }
}
