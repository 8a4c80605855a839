//! Garbage collection and the room on disk: blobs no name points at are
//! removed after the retention; a transfer or an upload first checks the
//! disk budget and the free space; the store's gauges are refreshed. The
//! collection's loop also resumes wants whose blob is still missing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::names::resume_wants;
use super::store::{hex_id, BlobError, BlobId};
use super::{lock, now_ms, Ctx};

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

pub(super) async fn gc_loop(ctx: Arc<Ctx>) {
    let every =
        (ctx.blobs.cfg.retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = gc_once(&ctx).await {
            tracing::warn!(error = %e, "blob garbage collection failed");
        }
        // Wanted names whose blob is still missing (a failed fetch): again.
        resume_wants(&ctx).await;
        refresh_gauges(&ctx).await;
    }
}

/// Remove blobs no name points at, unreferenced for longer than the
/// retention, and not being fetched. Returns how many were removed.
pub async fn gc_once(ctx: &Ctx) -> Result<usize, String> {
    let b = &ctx.blobs;
    let busy: HashSet<BlobId> = lock(&b.transfers).keys().copied().collect();
    let store = b.store.clone();
    let retention = b.cfg.retention;
    tokio::task::spawn_blocking(move || -> Result<usize, BlobError> {
        let named: HashSet<BlobId> = store.names()?.into_iter().map(|(_, r)| r.blob).collect();
        let now = now_ms();
        let mut removed = 0;
        for (id, meta) in store.list()? {
            if named.contains(&id) || busy.contains(&id) {
                store.set_released(&id, 0)?;
                continue;
            }
            if meta.released_ms == 0 {
                store.set_released(&id, now)?;
                continue;
            }
            if now.saturating_sub(meta.released_ms) >= retention.as_millis() as u64 {
                store.remove(&id)?;
                tracing::info!(blob = %hex_id(&id), size = meta.size, "removed a blob no name points at");
                removed += 1;
            }
        }
        Ok(removed)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
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
