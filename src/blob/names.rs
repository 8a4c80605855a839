//! Names: naming events (a name pointed at a blob) recorded as names, and
//! the wants they raise on this host (fetch the blob, then place it).
//! Also the checks of a naming payload and of a name, and `add`, which
//! makes a local file a named blob.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::fetch::run_transfer;
use super::objects::{self as store, hex_id, parse_id, BlobId, NameRecord};
use super::place::finish;
use super::room::refresh_gauges;
use super::{lock, now_ms, Ctx, Transfer, TransferView};
use crate::config::check_name;
use crate::event::{Draft, TypePattern};

/// Event types that point a name at a blob (payload [`Naming`]).
pub const NAMING_TYPES: [&str; 3] = ["BLOB_PUBLISHED", "MODEL_PROMOTED", "GAME_BATCH_READY"];

/// Payload of a naming event.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Naming {
    pub name: String,
    pub blob: String,
    pub size: u64,
    pub root: String,
    /// When this naming was made (ms since the epoch), set by `blob add`:
    /// each add is a new fact, so naming a version again (a rollback to an
    /// earlier model) publishes a new event instead of being answered as
    /// a duplicate of the first naming (proto-notes/events.md). Optional:
    /// by-reference naming events without it are read as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_ms: Option<u64>,
}

/// What a local publish of `event_type` with `payload` means to blob
/// transfer: `Ok(None)` a naming event (or not a naming type), `Ok(Some(w))`
/// a naming type without a blob reference (no `blob` field: a plain event;
/// nothing will be transferred: `w` says so), `Err` a blob reference that
/// is malformed (naming the field, with an example).
pub fn check_naming_payload(
    event_type: &str,
    payload: &serde_json::Value,
) -> Result<Option<String>, String> {
    if !NAMING_TYPES.contains(&event_type) {
        return Ok(None);
    }
    let refers = payload.as_object().is_some_and(|o| o.contains_key("blob"));
    if !refers {
        return Ok(Some(format!(
            "{event_type} carries no blob reference (name, blob, size, root): it is delivered as a plain event and nothing is transferred; to distribute a file, use `riftmesh blob add FILE --name NAME --event {event_type}` (or POST /v1/blobs/upload)"
        )));
    }
    let example =
        r#"{"name": "models/hex8_2p", "blob": "<64 hex>", "size": 1048576, "root": "<64 hex>"}"#;
    let n: Naming = serde_json::from_value(payload.clone())
        .map_err(|e| format!("{event_type} blob reference: {e}; expected e.g. {example}"))?;
    for (field, v) in [("blob", &n.blob), ("root", &n.root)] {
        if parse_id(v).is_none() {
            return Err(format!(
                "{event_type} blob reference: {field} {v:?} is not 64 hex digits; expected e.g. {example}"
            ));
        }
    }
    check_name(&n.name).map_err(|e| format!("{event_type} blob reference: name: {e}"))?;
    Ok(None)
}

pub(super) async fn follow_names(ctx: Arc<Ctx>) {
    let patterns: Vec<TypePattern> = NAMING_TYPES
        .iter()
        .filter_map(|t| TypePattern::parse(t).ok())
        .collect();
    let mut head = ctx.store.watch_head();
    let mut cursor = 0;
    // Names already recorded whose blob is missing or not placed (a restart).
    resume_wants(&ctx).await;
    loop {
        let upto = *head.borrow_and_update();
        loop {
            let Ok((batch, last)) = ctx.store.read_after(cursor, 256, 20_000, &patterns) else {
                break;
            };
            for (_, s) in batch {
                let Ok(n) = serde_json::from_str::<Naming>(&s.event.payload) else {
                    continue;
                };
                let (Some(blob), Some(root)) = (parse_id(&n.blob), parse_id(&n.root)) else {
                    continue;
                };
                if check_name(&n.name).is_err() {
                    continue;
                }
                let rec = NameRecord {
                    blob,
                    size: n.size,
                    root,
                    ts_ms: s.event.ts_ms,
                    event_hash: s.event.hash,
                    event_id: s.event.id.clone(),
                    event_type: s.event.event_type.clone(),
                    origin: s.event.origin.clone().unwrap_or_default(),
                };
                let store = ctx.blobs.store.clone();
                let name = n.name.clone();
                let r2 = rec.clone();
                let changed = tokio::task::spawn_blocking(move || store.set_name(&name, &r2))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                if changed.is_some() {
                    tracing::info!(name = %n.name, blob = %n.blob, size = n.size, "name updated");
                    if ctx.blobs.want_for(&n.name).is_some() {
                        ensure_held(&ctx, blob, rec, vec![n.name.clone()]);
                    }
                }
            }
            if last == cursor {
                break;
            }
            cursor = last;
        }
        ctx.blobs.names_seen.send_if_modified(|s| {
            let grew = upto > *s;
            *s = (*s).max(upto);
            grew
        });
        if head.changed().await.is_err() {
            return;
        }
    }
}

pub(super) async fn resume_wants(ctx: &Arc<Ctx>) {
    let store = ctx.blobs.store.clone();
    let Ok(Ok(names)) = tokio::task::spawn_blocking(move || store.names()).await else {
        return;
    };
    for (name, rec) in names {
        if ctx.blobs.want_for(&name).is_some() {
            ensure_held(ctx, rec.blob, rec, vec![name]);
        }
    }
}

/// Make sure `blob` is here and placed for `names`: fetch it if missing.
/// Returns a notifier that fires when the transfer ends.
pub fn ensure_held(
    ctx: &Arc<Ctx>,
    blob: BlobId,
    rec: NameRecord,
    names: Vec<String>,
) -> Arc<Notify> {
    let b = &ctx.blobs;
    let mut t = lock(&b.transfers);
    if let Some(tr) = t.get_mut(&blob) {
        for n in names {
            if !tr.names.contains(&n) {
                tr.names.push(n);
            }
        }
        tr.view.names = tr.names.clone();
        return tr.wake.clone();
    }
    let wake = Arc::new(Notify::new());
    t.insert(
        blob,
        Transfer {
            names: names.clone(),
            size: rec.size,
            root: rec.root,
            view: TransferView {
                blob: hex_id(&blob),
                names,
                size: rec.size,
                have_bytes: 0,
                chunks: 0,
                chunks_have: 0,
                rate_bytes_per_sec: 0.0,
                eta_secs: None,
                sources: Vec::new(),
                state: "queued".into(),
                started_ms: now_ms(),
            },
            started: Instant::now(),
            wake: wake.clone(),
            cause: rec.event_id.clone(),
        },
    );
    drop(t);
    let ctx2 = ctx.clone();
    ctx.tasks.spawn(async move {
        let ctx = ctx2;
        let result = run_transfer(&ctx, blob).await;
        finish(&ctx, blob, result).await;
    });
    wake
}

/// What the naming event of an add says about who named the blob and what
/// led to it: its `source` (the component; `riftmesh/blob` if none), and
/// the run's `correlation_id` and the causing event's `parent_id`, which
/// the sync events of every host then carry (proto-notes/sync.md, "Events").
#[derive(Clone, Debug, Default)]
pub struct NamingLink {
    pub source: Option<String>,
    pub correlation_id: Option<String>,
    pub parent_id: Option<String>,
}

/// Add a local file as a blob and publish `name` for it.
/// Add `len` bytes from `src` (an opened file, or an upload's body read
/// on this blocking thread as it arrives) under `name`, and publish the
/// naming event. `label` names the source in errors.
pub async fn add(
    ctx: &Arc<Ctx>,
    src: Box<dyn std::io::Read + Send>,
    len: u64,
    label: PathBuf,
    name: &str,
    event_type: &str,
    link: NamingLink,
) -> Result<(store::Added, crate::store::Appended), String> {
    check_name(name)?;
    let store = ctx.blobs.store.clone();
    let chunk = ctx.blobs.cfg.chunk_size;
    let added = tokio::task::spawn_blocking(move || store.add_reader(src, len, &label, chunk))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let payload = Naming {
        name: name.to_string(),
        blob: hex_id(&added.id),
        size: added.manifest.size,
        root: hex_id(&added.manifest.root()),
        named_ms: Some(crate::event::now_ms()),
    };
    let payload = serde_json::to_value(&payload).map_err(|e| e.to_string())?;
    let d = Draft::new(
        event_type,
        &payload,
        Some(link.source.unwrap_or_else(|| "riftmesh/blob".into())),
        link.correlation_id,
        link.parent_id,
    )
    .map_err(|e| e.to_string())?;
    let mut out = ctx
        .publisher
        .publish(vec![d])
        .await
        .map_err(|e| e.to_string())?;
    refresh_gauges(ctx).await;
    Ok((added, out.remove(0)))
}

/// Repair damaged copies one at a time as they are reported
/// ([`super::repair::local_damage`]): forget the damaged chunks, then want
/// the blob again under the names that point at it.
pub(super) async fn repair_loop(ctx: Arc<Ctx>, mut damaged: tokio::sync::mpsc::Receiver<BlobId>) {
    while let Some(blob) = damaged.recv().await {
        super::lock(&ctx.blobs.damaged_queued).remove(&blob);
        if let Some((rec, names)) = super::repair::scrub(&ctx, blob).await {
            ensure_held(&ctx, blob, rec, names);
        }
    }
}
