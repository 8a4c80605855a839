//! Durable consumers: create or change, fetch, ack, nack, dead letters,
//! list, delete; and their lag.

use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::event;
use crate::metrics::label;
use crate::node::Node;
use crate::store::StartAt;

use super::error::{unknown_consumer, ApiError, ApiJson, ApiQuery, ApiResult};
use super::params::{page_size, parse_since, patterns, MAX_SCAN};
use super::views::{rfc3339, ConsumerView, EventView, FetchResp};
use super::AppState;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ConsumerReq {
    /// Type patterns; none means every type.
    #[serde(default)]
    pub types: Option<Vec<String>>,
    /// Replay from the oldest retained event.
    #[serde(default)]
    pub from_start: bool,
    /// Replay from a time: RFC 3339, or a duration ago ("10m").
    #[serde(default)]
    pub since: Option<String>,
    /// Continue after this log sequence number.
    #[serde(default)]
    pub after_seq: Option<u64>,
    /// Skip to the end: only events from now on.
    #[serde(default)]
    pub from_now: bool,
    /// An exact type name near a catalog name is meant (otherwise refused
    /// with `did you mean …`, as for publishes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub custom_type: bool,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct FetchQuery {
    #[serde(default)]
    pub max: Option<usize>,
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct AckReq {
    pub seq: u64,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct NackReq {
    pub seq: u64,
    pub reason: String,
}

pub use crate::store::LAG_SCAN;

const MAX_WAIT_MS: u64 = 60_000;

fn valid_consumer(name: &str) -> ApiResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ApiError::bad(format!(
            "consumer name {name:?} is invalid: use 1-64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

pub(super) async fn upsert_consumer(
    State(node): State<AppState>,
    Path(name): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<ConsumerView>> {
    valid_consumer(&name)?;
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    // An empty body keeps or creates the consumer with its defaults.
    let req: ConsumerReq = if body.iter().all(|b| b.is_ascii_whitespace()) {
        ConsumerReq::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("invalid consumer request: {e}")))?
    };
    let starts = [
        req.from_start,
        req.since.is_some(),
        req.after_seq.is_some(),
        req.from_now,
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if starts > 1 {
        return Err(ApiError::bad(
            "give at most one of from_start, since, after_seq, from_now",
        ));
    }
    let types = match req.types {
        Some(t) => {
            let pats = patterns(&t)?;
            // An exact name is checked like a publish's type: a typo would
            // silently match nothing, ever.
            for p in pats.iter().map(|p| p.as_str()) {
                if !p.contains(['*', '?']) {
                    event::check_local_type(
                        p,
                        req.custom_type,
                        node.cfg().strict_types,
                        &node.cfg().custom_types,
                    )
                    .map_err(ApiError::bad)?;
                }
            }
            Some(pats.iter().map(|p| p.as_str().to_string()).collect())
        }
        None => None,
    };
    let start = if req.from_start {
        Some(StartAt::Start)
    } else if let Some(s) = req.since {
        Some(StartAt::Since(parse_since(&s).map_err(ApiError::bad)?))
    } else if let Some(a) = req.after_seq {
        Some(StartAt::After(a))
    } else if req.from_now {
        Some(StartAt::New)
    } else {
        None
    };
    let rec = node.store().upsert_consumer(&name, types, start).await?;
    node.scan_hints().lock().map(|mut h| h.remove(&name)).ok();
    Ok(Json(consumer_view(&node, rec).await?))
}

/// Views of `recs`. Counting a lag reads the log (up to [`LAG_SCAN`]
/// entries each), so it runs on the blocking pool, one task for all.
pub(super) async fn consumer_views(
    node: &Node,
    recs: Vec<crate::store::ConsumerRec>,
) -> ApiResult<Vec<ConsumerView>> {
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || {
        recs.iter()
            .map(|c| consumer_view_with(store.consumer_lag(c), c))
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn consumer_view(node: &Node, c: crate::store::ConsumerRec) -> ApiResult<ConsumerView> {
    let mut v = consumer_views(node, vec![c]).await?;
    Ok(v.remove(0))
}

fn consumer_view_with(
    (lag, lag_exact): (u64, bool),
    c: &crate::store::ConsumerRec,
) -> ConsumerView {
    ConsumerView {
        name: c.name.clone(),
        types: c.types.clone(),
        cursor: c.cursor,
        lag,
        lag_exact,
        dead_letters: c.dead_letters,
        created: rfc3339(c.created_ms),
        last_ack: (c.acked_ms > 0).then(|| rfc3339(c.acked_ms)),
    }
}

pub(super) async fn get_consumer(
    State(node): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<ConsumerView>> {
    valid_consumer(&name)?;
    match node.store().consumer(&name)? {
        Some(c) => Ok(Json(consumer_view(&node, c).await?)),
        None => Err(unknown_consumer(&name)),
    }
}

pub(super) async fn fetch(
    State(node): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<FetchQuery>,
) -> ApiResult<Json<FetchResp>> {
    valid_consumer(&name)?;
    let max = page_size("max", q.max)?;
    let deadline = Instant::now() + Duration::from_millis(q.wait_ms.unwrap_or(0).min(MAX_WAIT_MS));
    let mut watch = node.store().watch_head();
    loop {
        watch.borrow_and_update();
        let rec = node
            .store()
            .consumer(&name)?
            .ok_or_else(|| unknown_consumer(&name))?;
        let pats = patterns(&rec.types)?;
        let first = node.store().first();
        let missed = (first.saturating_sub(1)).saturating_sub(rec.cursor);
        let mut from = rec.cursor.max(first.saturating_sub(1));
        if let Ok(h) = node.scan_hints().lock() {
            if let Some((c, scanned)) = h.get(&name) {
                if *c == rec.cursor {
                    from = from.max(*scanned);
                }
            }
        }
        let store = node.store().clone();
        let (events, last) =
            tokio::task::spawn_blocking(move || store.read_after(from, max, MAX_SCAN, &pats))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        let scanned_to = events.first().map(|(s, _)| s - 1).unwrap_or(last);
        if let Ok(mut h) = node.scan_hints().lock() {
            h.insert(name.clone(), (rec.cursor, scanned_to));
        }
        if !events.is_empty() || Instant::now() >= deadline {
            return Ok(Json(FetchResp {
                consumer: name,
                events: events.iter().map(|(s, e)| EventView::new(*s, e)).collect(),
                missed,
                cursor: rec.cursor,
                head: node.store().head(),
            }));
        }
        let _ = tokio::time::timeout_at(deadline.into(), watch.changed()).await;
    }
}

pub(super) async fn ack(
    State(node): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<AckReq>,
) -> ApiResult<Json<ConsumerView>> {
    valid_consumer(&name)?;
    let rec = node.store().ack(&name, req.seq).await?;
    Ok(Json(consumer_view(&node, rec).await?))
}

pub(super) async fn nack(
    State(node): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<NackReq>,
) -> ApiResult<Json<ConsumerView>> {
    valid_consumer(&name)?;
    if req.reason.len() > 4096 {
        return Err(ApiError::bad("reason is longer than 4096 bytes"));
    }
    if req.reason.trim().is_empty() {
        return Err(ApiError::bad(
            "reason is empty: say why the event failed (it is kept with the dead letter)",
        ));
    }
    if node.store().get(req.seq)?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no event at seq {} is retained", req.seq),
        ));
    }
    let rec = node.store().nack(&name, req.seq, req.reason).await?;
    Ok(Json(consumer_view(&node, rec).await?))
}

pub(super) async fn dead_letters(
    State(node): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    valid_consumer(&name)?;
    node.store()
        .consumer(&name)?
        .ok_or_else(|| unknown_consumer(&name))?;
    let mut out = Vec::new();
    for d in node.store().dead_letters(&name)? {
        let ev = node.store().get(d.seq)?.map(|s| EventView::new(d.seq, &s));
        out.push(json!({ "seq": d.seq, "reason": d.reason, "at": rfc3339(d.at_ms), "event": ev }));
    }
    Ok(Json(json!({ "consumer": name, "dead_letters": out })))
}

pub(super) async fn list_consumers(
    State(node): State<AppState>,
) -> ApiResult<Json<Vec<ConsumerView>>> {
    Ok(Json(
        consumer_views(&node, node.store().consumers()?).await?,
    ))
}

pub(super) async fn delete_consumer(
    State(node): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<ConsumerView>> {
    valid_consumer(&name)?;
    let rec = node.store().delete_consumer(&name).await?;
    node.metrics().consumer_lag.remove(&label("consumer", name));
    Ok(Json(consumer_view(&node, rec).await?))
}
