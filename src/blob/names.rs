//! Names: naming events (a name pointed at a blob) recorded as names, and
//! the wants they raise on this host (fetch the blob, then place it);
//! retractions (`BLOB_FORGOTTEN`), which unbind a name and call off what
//! it raised. Also the checks of a naming payload and of a name, `add`,
//! which makes a local file a named blob, and `forget`, which retracts a
//! name cluster-wide.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::fetch::run_transfer;
use super::objects::{self as store, hex_id, parse_id, BlobId, NameRecord, Retraction};
use super::place::{called_off, finish};
use super::room::refresh_gauges;
use super::{lock, now_ms, Ctx, Transfer, TransferView};
use crate::config::check_name;
use crate::event::{Draft, TypePattern};

/// Event types that point a name at a blob (payload [`Naming`]).
pub const NAMING_TYPES: [&str; 3] = ["BLOB_PUBLISHED", "MODEL_PROMOTED", "GAME_BATCH_READY"];

/// The event type that retracts a name (payload [`Forgetting`]).
pub const FORGET_TYPE: &str = "BLOB_FORGOTTEN";

/// Payload of a retraction: the naming of `name` it retracts, at
/// `forgotten_ms` (that naming's event time, `ts_ms`) with event hash
/// `naming_hash`, and every naming older than it in naming order (event
/// time, then event hash) no longer bind the name, on every agent,
/// whichever of the two it learns first; a newer naming binds it again.
/// Without `naming_hash` (a retraction made by hand, or by an agent built
/// before the field) it covers every naming at or
/// before `forgotten_ms`. Receivers bound `forgotten_ms` by the
/// retraction's own event time plus [`FORGET_MAX_AHEAD_MS`].
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Forgetting {
    pub name: String,
    pub forgotten_ms: u64,
    /// The blob the name pointed at where the retraction was made
    /// (information for readers of the event; receivers go by the naming).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
    /// The event hash of the naming retracted (64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub naming_hash: Option<String>,
}

/// How far a retraction's `forgotten_ms` may be ahead: of the agent's
/// clock when it is published (`POST /v1/events`: else 400), and of the
/// retraction's own event time where it is applied (clamped to that), so
/// that no value, however large, retracts every later naming of a name.
pub const FORGET_MAX_AHEAD_MS: u64 = 5 * 60 * 1000;

/// What a retraction published at `event_ts_ms` covers: the naming it
/// names and older ones; everything up to `forgotten_ms` if it names none;
/// never anything after `event_ts_ms + FORGET_MAX_AHEAD_MS`.
pub(crate) fn retraction_of(f: &Forgetting, event_ts_ms: u64) -> Retraction {
    let bound = event_ts_ms.saturating_add(FORGET_MAX_AHEAD_MS);
    match f.naming_hash.as_deref().and_then(parse_id) {
        Some(h) if f.forgotten_ms <= bound => Retraction {
            at_ms: f.forgotten_ms,
            naming_hash: h,
        },
        _ => Retraction::up_to(f.forgotten_ms.min(bound)),
    }
}

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
/// transfer: `Ok(None)` a naming event, a well-formed retraction, or
/// neither type; `Ok(Some(w))` a naming type without a blob reference (no
/// `blob` field: a plain event; nothing will be transferred: `w` says so),
/// `Err` a blob reference or a retraction that is malformed (naming the
/// field, with an example).
pub fn check_naming_payload(
    event_type: &str,
    payload: &serde_json::Value,
) -> Result<Option<String>, String> {
    if event_type == FORGET_TYPE {
        return check_forgetting(payload).map(|_| None);
    }
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

/// A retraction's payload, checked (`riftmesh blob forget` makes good ones;
/// this is for one published as a plain event).
fn check_forgetting(payload: &serde_json::Value) -> Result<Forgetting, String> {
    let example = r#"{"name": "models/hex8_2p", "forgotten_ms": 1767772800000}"#;
    let f: Forgetting = serde_json::from_value(payload.clone())
        .map_err(|e| format!("{FORGET_TYPE}: {e}; expected e.g. {example}"))?;
    check_name(&f.name).map_err(|e| format!("{FORGET_TYPE}: name: {e}"))?;
    for (field, v) in [("blob", &f.blob), ("naming_hash", &f.naming_hash)] {
        if let Some(b) = v {
            if parse_id(b).is_none() {
                return Err(format!(
                    "{FORGET_TYPE}: {field} {b:?} is not 64 hex digits (or leave it out)"
                ));
            }
        }
    }
    let limit = crate::event::now_ms().saturating_add(FORGET_MAX_AHEAD_MS);
    if f.forgotten_ms > limit {
        return Err(format!(
            "{FORGET_TYPE}: forgotten_ms {} is more than {} min ahead of this agent's clock ({} ms since the epoch): a retraction covers namings already made; use the retracted naming's time (`riftmesh blob forget NAME` sets it)",
            f.forgotten_ms,
            FORGET_MAX_AHEAD_MS / 60_000,
            limit - FORGET_MAX_AHEAD_MS
        ));
    }
    Ok(f)
}

/// Record naming events as names and retractions as unbindings, in log
/// order, from the start of the log; raise and call off wants accordingly.
pub(super) async fn follow_names(ctx: Arc<Ctx>) {
    let patterns: Vec<TypePattern> = NAMING_TYPES
        .iter()
        .chain(std::iter::once(&FORGET_TYPE))
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
                if s.event.event_type == FORGET_TYPE {
                    apply_forget(&ctx, &s.event.payload, s.event.ts_ms).await;
                    continue;
                }
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
                let _names = ctx.blobs.names_lock.lock().await;
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

/// A retraction from the log (ours or a peer's), published at `ts_ms`:
/// unbind the name if the retraction covers its binding
/// ([`retraction_of`]), and call off what the binding raised here (its
/// transfer leaves the table, nothing is retried: the name is no longer
/// among those `resume_wants` goes through).
async fn apply_forget(ctx: &Arc<Ctx>, payload: &str, ts_ms: u64) {
    let Ok(f) = serde_json::from_str::<Forgetting>(payload) else {
        return;
    };
    if check_name(&f.name).is_err() {
        return;
    }
    let store = ctx.blobs.store.clone();
    let name = f.name.clone();
    let r = retraction_of(&f, ts_ms);
    let at = r.at_ms;
    // Unbinding and calling off under the names lock: `resume_wants` reads
    // the names either before both (and its wants are then called off) or
    // after both (and the name is not among them).
    let _names = ctx.blobs.names_lock.lock().await;
    match tokio::task::spawn_blocking(move || store.forget(&name, r)).await {
        Ok(Ok(Some(rec))) => {
            tracing::info!(name = %f.name, blob = %hex_id(&rec.blob), named_ms = rec.ts_ms, forgotten_ms = at, "name forgotten");
            drop_name(ctx, &f.name);
        }
        Ok(Ok(None)) => {
            tracing::debug!(name = %f.name, forgotten_ms = at, "retraction recorded; it unbinds nothing here now");
        }
        Ok(Err(e)) => tracing::warn!(name = %f.name, error = %e, "cannot record a retraction"),
        Err(e) => tracing::warn!(name = %f.name, error = %e, "cannot record a retraction"),
    }
}

/// `name` no longer points at anything: no transfer is for it any more, and
/// a transfer left for no name is called off (out of the table now; its
/// task stops at its next step, see [`ensure_held`]). A transfer for other
/// names too goes on for them.
pub(super) fn drop_name(ctx: &Ctx, name: &str) {
    let mut t = lock(&ctx.blobs.transfers);
    let mut off = Vec::new();
    for (blob, tr) in t.iter_mut() {
        if tr.names.iter().any(|n| n == name) {
            tr.names.retain(|n| n != name);
            tr.view.names = tr.names.clone();
            if tr.names.is_empty() {
                off.push(*blob);
            }
        }
    }
    for blob in off {
        if let Some(tr) = t.remove(&blob) {
            tr.cancel.cancel();
            tr.wake.notify_waiters();
            tracing::info!(blob = %hex_id(&blob), %name, "transfer called off: its name was forgotten");
        }
    }
}

/// Raise again the wants of the bound names (a restart, a failed fetch).
/// The names are read and the wants raised under the names lock, which a
/// retraction also holds while it unbinds and calls off: a name it unbinds
/// is either called off after this or not read here.
pub(super) async fn resume_wants(ctx: &Arc<Ctx>) {
    let _names = ctx.blobs.names_lock.lock().await;
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
    static GEN: AtomicU64 = AtomicU64::new(0);
    let gen = GEN.fetch_add(1, Ordering::Relaxed);
    let cancel = tokio_util::sync::CancellationToken::new();
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
                last_problem: None,
            },
            started: Instant::now(),
            wake: wake.clone(),
            cause: rec.event_id.clone(),
            gen,
            cancel: cancel.clone(),
        },
    );
    drop(t);
    let ctx2 = ctx.clone();
    ctx.tasks.spawn(async move {
        let ctx = ctx2;
        // Called off (its names forgotten): the fetch stops where it is
        // (waiting for a slot, looking for sources, between chunks); what
        // it verified stays in the partial file for garbage collection.
        tokio::select! {
            biased;
            () = cancel.cancelled() => called_off(&ctx).await,
            result = run_transfer(&ctx, blob) => finish(&ctx, blob, gen, result).await,
        }
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

/// Retract `name` cluster-wide: publish `BLOB_FORGOTTEN` for `rec`, the
/// binding this agent knows: that naming (its time and event hash) and
/// every older one are retracted, a newer one (made elsewhere, or not yet
/// heard of here) stays bound, whatever the clocks. It is applied here as
/// everywhere:
/// when the event is read back from the log. Linked to the naming event
/// (correlation and parent id), so `riftmesh trace` shows both.
pub async fn forget(
    ctx: &Arc<Ctx>,
    name: &str,
    rec: &NameRecord,
) -> Result<(Forgetting, crate::store::Appended), String> {
    check_name(name)?;
    let f = Forgetting {
        name: name.to_string(),
        forgotten_ms: rec.ts_ms,
        blob: Some(hex_id(&rec.blob)),
        naming_hash: Some(hex_id(&rec.event_hash)),
    };
    let payload = serde_json::to_value(&f).map_err(|e| e.to_string())?;
    let link = (!rec.event_id.is_empty()).then(|| rec.event_id.clone());
    let d = Draft::new(
        FORGET_TYPE,
        &payload,
        Some("riftmesh/blob".into()),
        link.clone(),
        link,
    )
    .map_err(|e| e.to_string())?;
    let mut out = ctx
        .publisher
        .publish(vec![d])
        .await
        .map_err(|e| e.to_string())?;
    Ok((f, out.remove(0)))
}

/// Repair damaged copies one at a time as they are reported
/// ([`super::repair::local_damage`]): forget the damaged chunks, then want
/// the blob again under the names that point at it.
pub(super) async fn repair_loop(ctx: Arc<Ctx>, mut damaged: tokio::sync::mpsc::Receiver<BlobId>) {
    while let Some(blob) = damaged.recv().await {
        super::lock(&ctx.blobs.damaged_queued).remove(&blob);
        if let Some((rec, names)) = super::repair::scrub(&ctx, blob).await {
            // The names as they are now, under the names lock: one a
            // retraction unbound since the scrub read them is not wanted.
            let _names = ctx.blobs.names_lock.lock().await;
            let store = ctx.blobs.store.clone();
            let had = !names.is_empty();
            let names = tokio::task::spawn_blocking(move || {
                names
                    .into_iter()
                    .filter(|n| store.name(n).ok().flatten().is_some_and(|r| r.blob == blob))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            if had && names.is_empty() {
                continue;
            }
            ensure_held(&ctx, blob, rec, names);
        }
    }
}
