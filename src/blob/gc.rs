//! Garbage collection: blobs no name points at are removed after the
//! retention, and retractions of names once a naming they cover can no
//! longer be caught up. The collection's loop also resumes wants whose blob
//! is still missing and refreshes the store's gauges.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::names::resume_wants;
use super::objects::{hex_id, BlobError, BlobId};
use super::room::refresh_gauges;
use super::{lock, now_ms, Ctx};

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
    let kept = b.cfg.forgotten_kept.as_millis() as u64;
    tokio::task::spawn_blocking(move || -> Result<usize, BlobError> {
        // A retraction whose time (the retracted naming's) is older than
        // twice the log's retention: the namings it covers were received
        // by their origin more than a retention ago, and by a host that
        // caught them up late at most one more, so catch-up no longer
        // brings them.
        let pruned = store.prune_forgotten(now_ms().saturating_sub(kept))?;
        if pruned > 0 {
            tracing::info!(pruned, "dropped retractions of names past the log's retention");
        }
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
