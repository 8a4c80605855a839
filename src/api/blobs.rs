//! Content-addressed blobs: add (a path under the roots, or uploaded
//! bytes), list, info, fetch, content, forget (retract a name), and the
//! transfers in flight.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::event;
use crate::node::Node;
use crate::store::Appended;

use super::error::{ApiError, ApiJson, ApiQuery, ApiResult};
use super::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BlobAddReq {
    /// Absolute path of a file under the configured `blob_roots`
    /// (proto-notes/security.md); without roots, upload the bytes.
    path: String,
    name: String,
    /// Naming event type [default: BLOB_PUBLISHED].
    #[serde(default)]
    event: Option<String>,
    /// The naming event's `source`, `correlation_id` and `parent_id`.
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    parent_id: Option<String>,
}

/// The naming event's link fields, checked before anything is stored.
fn naming_link(
    source: Option<String>,
    correlation_id: Option<String>,
    parent_id: Option<String>,
) -> Result<crate::blob::NamingLink, ApiError> {
    for (field, v) in [
        ("source", &source),
        ("correlation_id", &correlation_id),
        ("parent_id", &parent_id),
    ] {
        if v.as_ref().is_some_and(|s| s.len() > event::MAX_ID_LEN) {
            return Err(ApiError::bad(format!(
                "`{field}` is longer than {} bytes",
                event::MAX_ID_LEN
            )));
        }
    }
    Ok(crate::blob::NamingLink {
        source,
        correlation_id,
        parent_id,
    })
}

/// The naming event's type, checked: one of the types that name blobs.
fn naming_type(name: &str, event: Option<&str>) -> Result<String, ApiError> {
    crate::blob::check_name(name).map_err(ApiError::bad)?;
    let ty = event::normalize_type(event.unwrap_or("BLOB_PUBLISHED"))
        .map_err(|e| ApiError::bad(e.to_string()))?;
    if !crate::blob::NAMING_TYPES.contains(&ty.as_str()) {
        return Err(ApiError::bad(format!(
            "event {ty} does not name blobs; use one of {:?}",
            crate::blob::NAMING_TYPES
        )));
    }
    Ok(ty)
}

/// Add the bytes of `src` and answer with what was stored and published.
async fn add_and_answer(
    node: &AppState,
    src: Box<dyn std::io::Read + Send>,
    len: u64,
    label: std::path::PathBuf,
    name: &str,
    ty: &str,
    link: crate::blob::NamingLink,
) -> ApiResult<Json<Value>> {
    let (added, appended) = crate::blob::add(node.blob(), src, len, label, name, ty, link)
        .await
        .map_err(|e| {
            if [
                "cannot open",
                "not a regular file",
                "cannot read",
                "were announced",
            ]
            .iter()
            .any(|m| e.contains(m))
            {
                ApiError::bad(e)
            } else {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)
            }
        })?;
    let (event_id, duplicate) = match &appended {
        Appended::New { event, .. } => (event.id.clone(), false),
        Appended::Duplicate { id, .. } => (id.clone(), true),
        Appended::Held => (String::new(), true),
    };
    Ok(Json(json!({
        "blob": crate::blob::hex_id(&added.id),
        "name": name,
        "size": added.manifest.size,
        "root": crate::blob::hex_id(&added.manifest.root()),
        "chunk_size": added.manifest.chunk_size,
        "chunks": added.manifest.chunks.len(),
        "stored": if added.existing { "existing" } else { "new" },
        "event": ty,
        "event_id": event_id,
        "event_duplicate": duplicate,
    })))
}

/// `POST /v1/blobs {"path": …}`: the agent reads a file under
/// `blob_roots` (none by default: see `blob::source`).
pub(super) async fn blob_add(
    State(node): State<AppState>,
    ApiJson(req): ApiJson<BlobAddReq>,
) -> ApiResult<Json<Value>> {
    let ty = naming_type(&req.name, req.event.as_deref())?;
    let link = naming_link(req.source, req.correlation_id, req.parent_id)?;
    let policy = crate::blob::source::FilePolicy::new(
        node.cfg().blob_roots.clone(),
        &node.cfg().data_dir,
        node.cfg().swarm_key.as_deref(),
    );
    let requested = req.path.clone();
    let (f, len, canon) = tokio::task::spawn_blocking(move || policy.open(&requested))
        .await
        .map_err(store_err)?
        .map_err(|e| match e {
            crate::blob::source::SourceError::Forbidden(m) => {
                ApiError::new(StatusCode::FORBIDDEN, m)
            }
            crate::blob::source::SourceError::Invalid(m) => ApiError::bad(m),
        })?;
    // Before copying, as an upload: a copy that cannot fit would fill the
    // disk the event log and Raft share.
    crate::blob::check_room(node.blob(), len)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("cannot add {}: {e}", canon.display()),
            )
        })?;
    add_and_answer(&node, Box::new(f), len, canon, &req.name, &ty, link).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadQuery {
    name: String,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    parent_id: Option<String>,
}

/// `POST /v1/blobs/upload?name=…&event=…` with the blob's bytes as the
/// body (`Content-Length` required): the caller reads its file with its
/// own permissions; the agent hashes and stores the bytes as they arrive.
pub(super) async fn blob_upload(
    State(node): State<AppState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let ty = naming_type(&q.name, q.event.as_deref())?;
    let link = naming_link(q.source, q.correlation_id, q.parent_id)?;
    // Only application/octet-stream: a web page can send text/plain or a
    // form without a preflight, never this.
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/octet-stream") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("send the bytes as Content-Type: application/octet-stream (got {ct:?})"),
        ));
    }
    let len = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "send Content-Length: the blob's size in bytes",
            )
        })?;
    let max = crate::blob::objects::MAX_CHUNKS as u64 * u64::from(crate::blob::objects::MAX_CHUNK);
    if len > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a blob is at most {max} bytes; Content-Length is {len}"),
        ));
    }
    crate::blob::check_room(node.blob(), len)
        .await
        .map_err(|e| ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e))?;
    // A sender that stops sending is cut off: an upload never holds a
    // thread (and the agent's shutdown) for longer than this without bytes.
    const IDLE: Duration = Duration::from_secs(30);
    let stream = Box::pin(futures::stream::unfold(
        body.into_data_stream(),
        |mut s| async move {
            use futures::StreamExt;
            match tokio::time::timeout(IDLE, s.next()).await {
                Ok(Some(r)) => Some((r.map_err(std::io::Error::other), s)),
                Ok(None) => None,
                Err(_) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no bytes of the upload for {IDLE:?}"),
                    )),
                    s,
                )),
            }
        },
    ));
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    add_and_answer(
        &node,
        Box::new(reader),
        len,
        std::path::PathBuf::from("the uploaded body"),
        &q.name,
        &ty,
        link,
    )
    .await
}

fn store_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Most retractions listed by `GET /v1/blobs` (the newest).
const FORGOTTEN_LISTED: usize = 100;

pub(super) async fn blob_list(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let store = node.blobs().store.clone();
    let (blobs, names, forgotten) = tokio::task::spawn_blocking(move || {
        let blobs = store.list()?;
        let names = store.names()?;
        let mut out = Vec::new();
        for (id, m) in blobs {
            let have = if m.complete {
                None
            } else {
                store.have(&id)?.map(|b| b.count())
            };
            let chunks = store.manifest(&id)?.map_or(0, |m| m.chunks.len());
            out.push(json!({
                "blob": crate::blob::hex_id(&id),
                "size": m.size,
                "state": if m.complete { "complete" } else { "partial" },
                "chunks": chunks,
                "chunks_have": have.unwrap_or(chunks),
                "names": names.iter().filter(|(_, r)| r.blob == id).map(|(n, _)| n.clone()).collect::<Vec<_>>(),
                "added_ms": m.added_ms,
                "unreferenced_since_ms": (m.released_ms > 0).then_some(m.released_ms),
            }));
        }
        let names: Vec<Value> = names
            .iter()
            .map(|(n, r)| {
                json!({
                    "name": n,
                    "blob": crate::blob::hex_id(&r.blob),
                    "size": r.size,
                    "updated_ms": r.ts_ms,
                    "event_id": r.event_id,
                    "event": r.event_type,
                    "present": blobs_complete(&store, &r.blob),
                })
            })
            .collect();
        // The newest retractions first, at most FORGOTTEN_LISTED of them.
        let mut kept = store.forgotten_names()?;
        let count = kept.len();
        kept.sort_by(|a, b| b.1.at_ms.cmp(&a.1.at_ms).then_with(|| a.0.cmp(&b.0)));
        let forgotten: Vec<Value> = kept
            .into_iter()
            .take(FORGOTTEN_LISTED)
            .map(|(n, r)| json!({ "name": n, "forgotten_ms": r.at_ms }))
            .collect();
        Ok::<_, crate::blob::objects::BlobError>((out, names, (forgotten, count)))
    })
    .await
    .map_err(store_err)?
    .map_err(store_err)?;
    let (forgotten, forgotten_count) = forgotten;
    Ok(Json(json!({
        "blobs": blobs,
        "names": names,
        "forgotten": forgotten,
        "forgotten_count": forgotten_count,
    })))
}

fn blobs_complete(store: &crate::blob::BlobStore, id: &crate::blob::BlobId) -> bool {
    store.is_complete(id).unwrap_or(false)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BlobRef {
    /// A blob id (64 hex digits) or a name.
    #[serde(rename = "ref")]
    r: String,
}

/// Resolve a reference to (id, the record of a name pointing at it).
async fn resolve_ref(
    node: &Node,
    r: &str,
) -> ApiResult<(crate::blob::BlobId, Option<crate::blob::NameRecord>)> {
    if crate::blob::parse_id(r).is_none() {
        crate::blob::check_name(r)
            .map_err(|e| ApiError::bad(format!("{e} (or give a blob id: 64 hex digits)")))?;
    }
    let store = node.blobs().store.clone();
    let r2 = r.to_string();
    let found =
        tokio::task::spawn_blocking(move || -> Result<_, crate::blob::objects::BlobError> {
            if let Some(id) = crate::blob::parse_id(&r2) {
                // A name that points at it gives the signed root to check against.
                let rec = store
                    .names()?
                    .into_iter()
                    .map(|(_, rec)| rec)
                    .find(|rec| rec.blob == id);
                let known = rec.is_some() || store.meta(&id)?.is_some();
                return Ok(known.then_some((id, rec)));
            }
            Ok(store.name(&r2)?.map(|rec| (rec.blob, Some(rec))))
        })
        .await
        .map_err(store_err)?
        .map_err(store_err)?;
    if let Some(f) = found {
        return Ok(f);
    }
    // A naming event already in the log may not be recorded as a name yet:
    // wait for the recorder to reach the log's head, then look again.
    if crate::blob::parse_id(r).is_none() {
        let head = *node.store().watch_head().borrow();
        if node
            .blobs()
            .names_caught_up(head, std::time::Duration::from_secs(5))
            .await
        {
            let store = node.blobs().store.clone();
            let r2 = r.to_string();
            let again = tokio::task::spawn_blocking(move || store.name(&r2))
                .await
                .map_err(store_err)?
                .map_err(store_err)?;
            if let Some(rec) = again {
                return Ok((rec.blob, Some(rec)));
            }
        }
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no blob or name {r:?} is known here"),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ForgetReq {
    /// The name to retract (not a blob id: blobs are not retracted, names are).
    name: String,
}

/// `POST /v1/blob/forget {"name": N}`: retract the name cluster-wide
/// (`BLOB_FORGOTTEN`, proto-notes/sync.md "Forgetting a name"). Answers
/// once the retraction is applied here: the name no longer resolves on
/// this agent.
pub(super) async fn blob_forget(
    State(node): State<AppState>,
    ApiJson(req): ApiJson<ForgetReq>,
) -> ApiResult<Json<Value>> {
    let name = req.name;
    crate::blob::check_name(&name).map_err(|e| {
        let hint = if crate::blob::parse_id(&name).is_some() {
            " (a blob id: forget the names that point at it)"
        } else {
            ""
        };
        ApiError::bad(format!("name {name:?}: {e}{hint}"))
    })?;
    // The binding as this agent knows it, once every naming event already
    // in its log is recorded.
    let head = *node.store().watch_head().borrow();
    if !node
        .blobs()
        .names_caught_up(head, Duration::from_secs(5))
        .await
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot tell what {name:?} is bound to: this agent has not recorded the naming events in its log (up to position {head}) within 5 s; nothing was retracted, try again"),
        ));
    }
    let store = node.blobs().store.clone();
    let n2 = name.clone();
    let (rec, forgotten) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::blob::objects::BlobError>((store.name(&n2)?, store.forgotten(&n2)?))
    })
    .await
    .map_err(store_err)?
    .map_err(store_err)?;
    let Some(rec) = rec else {
        let msg = match forgotten {
            Some(r) => format!(
                "name {name:?} is not bound here: it was forgotten at {} (ms since the epoch) and not named again since", r.at_ms
            ),
            None => format!("name {name:?} was never bound here (no naming event for it)"),
        };
        return Err(ApiError::new(StatusCode::NOT_FOUND, msg));
    };
    // Receivers bound a retraction's time by its own event time plus
    // FORGET_MAX_AHEAD_MS: a naming stamped further ahead of this agent's
    // clock cannot be retracted from here.
    let now = event::now_ms();
    if rec.ts_ms > now.saturating_add(crate::blob::FORGET_MAX_AHEAD_MS) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "name {name:?} is bound by a naming stamped {} ms ahead of this agent's clock (origin {:?}): a retraction from here would not cover it; retract it from a host whose clock is within {} min of the naming's, or fix the clocks and name it again",
                rec.ts_ms - now,
                rec.origin,
                crate::blob::FORGET_MAX_AHEAD_MS / 60_000
            ),
        ));
    }
    let (f, appended) = crate::blob::forget(node.blob(), &name, &rec)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let (event_id, seq, duplicate) = match &appended {
        Appended::New { event, seq } => (event.id.clone(), *seq, false),
        Appended::Duplicate { id, seq, .. } => (id.clone(), *seq, true),
        Appended::Held => (String::new(), 0, true),
    };
    // Applied here as on every agent, from the log: wait for it.
    if !node
        .blobs()
        .names_caught_up(seq, Duration::from_secs(5))
        .await
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the retraction of {name:?} is published (event {event_id}, log position {seq}) but not yet applied on this agent after 5 s; it will be, as on every agent: check with GET /v1/blob?ref={name}"),
        ));
    }
    Ok(Json(json!({
        "name": name,
        "blob": crate::blob::hex_id(&rec.blob),
        "size": rec.size,
        "named_ms": rec.ts_ms,
        "naming_event": rec.event_type,
        "naming_event_id": rec.event_id,
        "forgotten_ms": f.forgotten_ms,
        "event": crate::blob::FORGET_TYPE,
        "event_id": event_id,
        "event_duplicate": duplicate,
    })))
}

pub(super) async fn blob_fetch(
    State(node): State<AppState>,
    ApiJson(req): ApiJson<BlobRef>,
) -> ApiResult<Json<Value>> {
    let (id, rec) = resolve_ref(&node, &req.r).await?;
    let store = node.blobs().store.clone();
    let complete = tokio::task::spawn_blocking(move || store.is_complete(&id))
        .await
        .map_err(store_err)?
        .map_err(store_err)?;
    if complete {
        return Ok(Json(
            json!({ "blob": crate::blob::hex_id(&id), "state": "complete" }),
        ));
    }
    let Some(rec) = rec else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no name points at this blob, so its signed manifest root is unknown; fetch it by name",
        ));
    };
    let names: Vec<String> = if crate::blob::parse_id(&req.r).is_some() {
        Vec::new()
    } else {
        vec![req.r.clone()]
    };
    crate::blob::ensure_held(node.blob(), id, rec, names);
    Ok(Json(
        json!({ "blob": crate::blob::hex_id(&id), "state": "fetching" }),
    ))
}

pub(super) async fn blob_info(
    State(node): State<AppState>,
    ApiQuery(q): ApiQuery<BlobRef>,
) -> ApiResult<Json<Value>> {
    let (id, rec) = resolve_ref(&node, &q.r).await?;
    let store = node.blobs().store.clone();
    let (meta, have) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::blob::objects::BlobError>((store.meta(&id)?, store.have(&id)?))
    })
    .await
    .map_err(store_err)?
    .map_err(store_err)?;
    let hex = crate::blob::hex_id(&id);
    let transfer = node.blobs().transfers().into_iter().find(|t| t.blob == hex);
    let failure = node
        .blobs()
        .failures()
        .into_iter()
        .rev()
        .find(|f| f.blob == hex);
    let state = match (&meta, &transfer) {
        (Some(m), _) if m.complete => "complete",
        (_, Some(_)) => "fetching",
        (Some(_), None) => "partial",
        (None, None) => "absent",
    };
    Ok(Json(json!({
        "blob": hex,
        "size": meta.as_ref().map(|m| m.size).or(rec.as_ref().map(|r| r.size)),
        "state": state,
        "chunks_have": have.map(|b| b.count()),
        "transfer": transfer,
        "last_failure": failure,
    })))
}

/// The content of a complete blob, streamed.
/// A held blob's bytes, verified chunk by chunk as they stream (chunks
/// vouched for since the object last changed are not hashed again): a
/// damaged copy is never served. `Content-Length` is the manifest's size and
/// `x-riftmesh-blob` the blob id, so a client can check what it got; damage
/// found in the first chunk is a 503 (retry: the copy is being repaired),
/// later damage aborts the body (a short body, which clients treat as
/// failure). Either way the damage is counted and repaired from peers.
pub(super) async fn blob_content(
    State(node): State<AppState>,
    ApiQuery(q): ApiQuery<BlobRef>,
) -> ApiResult<Response> {
    use crate::blob::objects::BlobError;
    let (id, _) = resolve_ref(&node, &q.r).await?;
    let store = node.blobs().store.clone();
    let first = tokio::task::spawn_blocking(move || -> Result<_, BlobError> {
        if !store.is_complete(&id)? {
            return Err(BlobError::NotHeld(crate::blob::hex_id(&id)));
        }
        let m = store
            .manifest(&id)?
            .ok_or_else(|| BlobError::NotHeld(crate::blob::hex_id(&id)))?;
        let first = match m.chunks.len() {
            0 => Vec::new(),
            _ => store.read_verified_chunk(&id, 0)?,
        };
        Ok((m, first))
    })
    .await
    .map_err(store_err)?;
    let (m, first) = match first {
        Ok(v) => v,
        Err(e @ BlobError::NotHeld(_)) if node.blobs().fetching(&id) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e} yet: it is being fetched (or repaired) now; retry"),
            ))
        }
        Err(e @ BlobError::NotHeld(_)) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("{e}: fetch it first (POST /v1/blob/fetch)"),
            ))
        }
        Err(e @ BlobError::DamagedChunk { .. }) => {
            crate::blob::local_damage(node.blob(), id, &e, "reading it for a local client");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{e}: the local copy is damaged and is being fetched again from peers; retry"
                ),
            ));
        }
        Err(e) => return Err(store_err(e)),
    };
    let (size, chunks) = (m.size, m.chunks.len() as u32);
    let store = node.blobs().store.clone();
    let state = (Some(first), 1u32);
    let stream = futures::stream::unfold(state, move |(first, next)| {
        let (store, node) = (store.clone(), node.clone());
        async move {
            if let Some(b) = first {
                return Some((Ok(axum::body::Bytes::from(b)), (None, next)));
            }
            if next >= chunks {
                return None;
            }
            let s = store.clone();
            let r = tokio::task::spawn_blocking(move || s.read_verified_chunk(&id, next)).await;
            match r {
                Ok(Ok(b)) => Some((Ok(axum::body::Bytes::from(b)), (None, next + 1))),
                Ok(Err(e)) => {
                    if matches!(e, BlobError::DamagedChunk { .. }) {
                        crate::blob::local_damage(
                            node.blob(),
                            id,
                            &e,
                            "reading it for a local client",
                        );
                    }
                    // An error ends the body short of Content-Length.
                    Some((Err(std::io::Error::other(e.to_string())), (None, chunks)))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), (None, chunks))),
            }
        }
    });
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (axum::http::header::CONTENT_LENGTH, size.to_string()),
            (
                axum::http::HeaderName::from_static("x-riftmesh-blob"),
                crate::blob::hex_id(&id),
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// `GET /v1/sync` (the path keeps its name): blob transfers in flight,
/// recent failures, the store's use and the transfer settings.
pub(super) async fn transfers(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let store = node.blobs().store.clone();
    let used = tokio::task::spawn_blocking(move || store.used_bytes())
        .await
        .map_err(store_err)?
        .map_err(store_err)?;
    let c = &node.blobs().cfg;
    Ok(Json(json!({
        "transfers": node.blobs().transfers(),
        "failures": node.blobs().failures(),
        "wants": c.wants.iter().map(|w| json!({
            "names": w.names, "place": w.place, "if_tags": w.if_tags,
            "active": node.blobs().want_applies(w),
        })).collect::<Vec<_>>(),
        "store_bytes": used,
        "budget_bytes": (c.budget > 0).then_some(c.budget),
        "max_transfers": c.transfers,
        "upload_rate": (c.upload_rate > 0).then_some(c.upload_rate),
        "download_rate": (c.download_rate > 0).then_some(c.download_rate),
    })))
}
