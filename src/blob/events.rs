//! The sync events a transfer publishes (proto-notes/sync.md, "Events";
//! their type names stay, they are user-facing): started, completed,
//! failed, each caused by the naming event that asked for the blob. Also
//! the list of recent failures the API shows.

use std::sync::Arc;

use serde_json::json;

use super::objects::{hex_id, BlobId};
use super::{lock, now_ms, Ctx, FailureView};
use crate::event::Draft;

/// The sync event types of a name (proto-notes/sync.md, "Events"): models
/// are distributed, everything else is data that is synced.
/// A model's distribution has no start event (the seeds have none).
pub(super) fn event_type(name: &str, what: TransferStep) -> Option<&'static str> {
    let model = name.starts_with("models/");
    Some(match (model, what) {
        (true, TransferStep::Started) => return None,
        (true, TransferStep::Completed) => "MODEL_DISTRIBUTED",
        (true, TransferStep::Failed) => "MODEL_DISTRIBUTION_FAILED",
        (false, TransferStep::Started) => "DATA_SYNC_STARTED",
        (false, TransferStep::Completed) => "DATA_SYNC_COMPLETED",
        (false, TransferStep::Failed) => "DATA_SYNC_FAILED",
    })
}

/// Where a transfer stands, for its event type.
#[derive(Clone, Copy)]
pub(super) enum TransferStep {
    Started,
    Completed,
    Failed,
}

/// Publish a sync event (none for `None`) caused by the naming event
/// `cause`: its parent is the naming event, and its correlation the naming
/// event's own (the run that led to it), or the naming event's id when it
/// has none or is no longer retained here; so a trace of the run reaches
/// every host's placement (proto-notes/sync.md, "Events").
pub(super) async fn publish_event(
    ctx: &Arc<Ctx>,
    ty: Option<&str>,
    payload: &serde_json::Value,
    cause: &str,
) {
    let Some(ty) = ty else {
        return;
    };
    let parent = (!cause.is_empty()).then(|| cause.to_string());
    let correlation = parent.as_ref().map(|id| {
        ctx.store
            .get_by_id(id)
            .ok()
            .flatten()
            .and_then(|(_, s)| s.event.correlation_id.clone())
            .unwrap_or_else(|| id.clone())
    });
    match Draft::new(
        ty,
        payload,
        Some("riftmesh/sync".into()),
        correlation,
        parent,
    ) {
        Ok(d) => {
            if let Err(e) = ctx.publisher.publish(vec![d]).await {
                tracing::warn!(error = %e, "cannot publish {ty}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot build {ty}"),
    }
}

/// A transfer (or a placement) failed: logged, kept among the last 100
/// failures, and a failed event published per name.
pub(super) async fn report_failure(
    ctx: &Arc<Ctx>,
    blob: BlobId,
    names: &[String],
    reason: &str,
    cause: &str,
) {
    tracing::warn!(blob = %hex_id(&blob), ?names, reason, "blob sync failed");
    {
        let mut f = lock(&ctx.blobs.failures);
        f.push(FailureView {
            blob: hex_id(&blob),
            names: names.to_vec(),
            reason: reason.to_string(),
            at_ms: now_ms(),
        });
        let len = f.len();
        if len > 100 {
            f.drain(..len - 100);
        }
    }
    for name in names {
        let payload = json!({
            "name": name,
            "blob": hex_id(&blob),
            "host": ctx.host,
            "reason": reason,
        });
        publish_event(ctx, event_type(name, TransferStep::Failed), &payload, cause).await;
    }
}
