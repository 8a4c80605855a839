//! After a transfer: the blob placed for every name that wants it (a copy
//! at the configured path), the completion or failure reported (metrics,
//! sync events), and whoever waits for the transfer woken.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use super::events::{event_type, publish_event, report_failure, TransferStep};
use super::objects::{hex_id, BlobError, BlobId};
use super::repair::local_damage;
use super::room::refresh_gauges;
use super::{lock, Ctx, Transfer};
use crate::metrics::label;

/// After a transfer: place for every name that wants it, and report. Only a
/// blob fetched now counts as a completed fetch (wants of held blobs are
/// resumed every 30 s to retry their placement). `gen`: the transfer's, so
/// that one called off meanwhile (out of the table, perhaps replaced by a
/// newer transfer of the same blob) reports nothing.
pub(super) async fn finish(ctx: &Arc<Ctx>, blob: BlobId, gen: u64, result: Result<bool, String>) {
    let b = &ctx.blobs;
    let tr = {
        let mut t = lock(&b.transfers);
        match t.get(&blob) {
            Some(tr) if tr.gen == gen => t.remove(&blob),
            _ => None,
        }
    };
    let Some(tr) = tr else {
        return;
    };
    let secs = tr.started.elapsed().as_secs_f64();
    if result == Ok(true) {
        ctx.metrics.transfer_seconds.observe(secs);
    }
    match result {
        Ok(fetched) => {
            if fetched {
                ctx.metrics
                    .transfers_finished
                    .get_or_create(&label("result", "completed"))
                    .inc();
            }
            for name in &tr.names {
                complete_name(ctx, blob, &tr, name, secs).await;
            }
        }
        Err(reason) => {
            ctx.metrics
                .transfers_finished
                .get_or_create(&label("result", "failed"))
                .inc();
            report_failure(ctx, blob, &tr.names, &reason, &tr.cause).await;
        }
    }
    tr.wake.notify_waiters();
    refresh_gauges(ctx).await;
}

/// A transfer called off because its names were forgotten: counted
/// (`riftmesh_sync_transfers_total{result="forgotten"}`), no failure
/// reported, nothing retried.
pub(super) async fn called_off(ctx: &Arc<Ctx>) {
    ctx.metrics
        .transfers_finished
        .get_or_create(&label("result", "forgotten"))
        .inc();
    refresh_gauges(ctx).await;
}

/// One name of a blob now held: placed if wanted, and its completed event
/// published when there is something new to say.
async fn complete_name(ctx: &Arc<Ctx>, blob: BlobId, tr: &Transfer, name: &str, secs: f64) {
    let b = &ctx.blobs;
    // Only if the name still points here (not elsewhere since, nor forgotten).
    let store = b.store.clone();
    let nm = name.to_string();
    let current = tokio::task::spawn_blocking(move || store.name(&nm))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    if current.as_ref().is_none_or(|c| c.blob != blob) {
        return;
    }
    let Some(path) = place(ctx, blob, tr, name).await else {
        return;
    };
    let ty = event_type(name, TransferStep::Completed);
    let payload = json!({
        "name": name,
        "blob": hex_id(&blob),
        "size": tr.size,
        "host": ctx.host,
        "path": path.as_ref().map(|p| p.display().to_string()),
        "seconds": (secs * 1000.0).round() / 1000.0,
        "sources": tr.view.sources.len(),
    });
    tracing::info!(%name, blob = %hex_id(&blob), path = ?path, secs, "blob arrived");
    publish_event(ctx, ty, &payload, &tr.cause).await;
}

/// Put the blob where the want of `name` says. `Some(Some(path))`: placed
/// there now; `Some(None)`: wanted with no place, announced for the first
/// time; `None`: nothing to report (not wanted, placed already, announced
/// already, or failed: the failure is reported here).
async fn place(ctx: &Arc<Ctx>, blob: BlobId, tr: &Transfer, name: &str) -> Option<Option<PathBuf>> {
    let b = &ctx.blobs;
    let Some(p) = b.want_for(name).and_then(|w| w.path_for(name, &blob)) else {
        // Not wanted here: nothing to report.
        b.want_for(name)?;
        // Wanted with no place to put it: announced once per
        // (name, blob), not at every restart.
        let store = b.store.clone();
        let nm = name.to_string();
        let r = tokio::task::spawn_blocking(move || store.announce(&nm, &blob)).await;
        return matches!(r, Ok(Ok(true))).then_some(None);
    };
    let store = b.store.clone();
    let p2 = p.clone();
    let r = tokio::task::spawn_blocking(move || {
        if store.placed(&p2)? == Some(blob) && p2.exists() {
            return Ok(false);
        }
        store.place(&blob, &p2).map(|_| true)
    })
    .await;
    let reason = match r {
        Ok(Ok(false)) => return None,
        Ok(Ok(true)) => return Some(Some(p)),
        Ok(Err(e @ BlobError::DamagedChunk { .. })) => {
            // Placed once the repair completes the blob again.
            ctx.metrics.transfer_place_failed.inc();
            local_damage(ctx, blob, &e, "placing it");
            return None;
        }
        Ok(Err(e)) => format!("cannot place: {e}"),
        Err(e) => e.to_string(),
    };
    ctx.metrics.transfer_place_failed.inc();
    let names = [name.to_string()];
    report_failure(ctx, blob, &names, &reason, &tr.cause).await;
    None
}
