//! The room on disk: a transfer or an upload first checks the disk budget
//! and the free space; the store's size gauges.

use super::objects::BlobId;
use super::Ctx;

/// The store's size and count gauges (`riftmesh_blob_store_bytes`,
/// `riftmesh_blob_store_blobs`).
pub(super) async fn refresh_gauges(ctx: &Ctx) {
    let store = ctx.blobs.store.clone();
    if let Ok(Ok(list)) = tokio::task::spawn_blocking(move || store.list()).await {
        ctx.metrics
            .blob_store_bytes
            .set(list.iter().map(|(_, m)| m.size as i64).sum());
        ctx.metrics.blob_store_blobs.set(list.len() as i64);
    }
}

/// Check the disk budget and the free space for `size` more bytes.
pub(super) async fn check_space(ctx: &Ctx, blob: &BlobId, size: u64) -> Result<(), String> {
    let store = ctx.blobs.store.clone();
    let id = *blob;
    let already =
        tokio::task::spawn_blocking(move || store.meta(&id).ok().flatten().map_or(0, |m| m.size))
            .await
            .map_err(|e| e.to_string())?;
    check_room(ctx, size.saturating_sub(already)).await
}

/// Check the disk budget and the free space for `need` more bytes (an
/// upload: bytes not in the store yet).
pub(crate) async fn check_room(ctx: &Ctx, need: u64) -> Result<(), String> {
    let b = &ctx.blobs;
    let store = b.store.clone();
    let used = tokio::task::spawn_blocking(move || store.used_bytes().unwrap_or(0))
        .await
        .map_err(|e| e.to_string())?;
    if b.cfg.budget > 0 && used + need > b.cfg.budget {
        return Err(format!(
            "disk budget: {} bytes held + {} needed > blob_budget {}",
            used, need, b.cfg.budget
        ));
    }
    let dir = ctx.data_dir.clone();
    let free = tokio::task::spawn_blocking(move || crate::membership::health::free_bytes(&dir))
        .await
        .ok()
        .flatten();
    if let Some(free) = free {
        if free < need + b.cfg.reserve {
            return Err(format!(
                "disk space: {free} bytes free on the data directory's filesystem, {need} needed plus {} kept free (blob_reserve)",
                b.cfg.reserve
            ));
        }
    }
    Ok(())
}
