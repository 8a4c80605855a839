//! Events: publish (one and batch), history, one event, trace, the type catalog.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::event::{self, Draft};
use crate::metrics::label;
use crate::node::Node;
use crate::store::Appended;

use super::error::{ApiError, ApiJson, ApiQuery, ApiResult};
use super::params::{page_size, parse_since, patterns, MAX_SCAN};
use super::views::{EventView, PublishResp, TraceNode};
use super::AppState;

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PublishReq {
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub payload: Option<Value>,
    /// The publishing component's name (the seeds' `source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Deprecated name of `source`, still accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub parent_id: Option<String>,
    /// Every publish of this type with this key is one fact: a retry is
    /// answered `duplicate` with the first one's id, whatever its timing
    /// and payload. Without one, the same type and payload is a duplicate
    /// only within the type's repeat window (proto-notes/events.md §13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// A type name near a catalog name is meant as a new type (otherwise
    /// refused with `did you mean …`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub custom_type: bool,
}

#[derive(Deserialize, Serialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BatchReq {
    pub events: Vec<PublishReq>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    #[serde(default)]
    pub after: Option<u64>,
    #[serde(default)]
    pub since: Option<String>,
    /// Comma-separated type patterns.
    #[serde(default)]
    pub types: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
    /// "asc" (default: oldest first, from `after` or `since`) or "desc"
    /// (newest first, before `before`, default the head + 1).
    #[serde(default)]
    pub order: Option<String>,
    #[serde(default)]
    pub before: Option<u64>,
}

/// A checked draft, and the warning its answer carries if any.
fn draft(r: PublishReq, node: &Node) -> ApiResult<(Draft, Option<String>)> {
    let cfg = &node.cfg();
    let payload = r.payload.unwrap_or_else(|| json!({}));
    let component = match (r.source, r.origin) {
        (Some(s), Some(o)) if s != o => {
            return Err(ApiError::bad(format!(
                "`source` ({s:?}) and its deprecated name `origin` ({o:?}) differ: give one"
            )))
        }
        (s, o) => s.or(o),
    };
    let d = Draft::new(
        &r.event_type,
        &payload,
        component,
        r.correlation_id,
        r.parent_id,
    )
    .and_then(|d| d.with_idem_key(r.idempotency_key))
    .map_err(|e| ApiError::bad(e.to_string()))?;
    event::check_local_type(
        &d.event_type,
        r.custom_type,
        cfg.strict_types,
        &cfg.custom_types,
    )
    .map_err(ApiError::bad)?;
    let warning =
        crate::blob::check_naming_payload(&d.event_type, &payload).map_err(ApiError::bad)?;
    if warning.is_some() {
        node.metrics()
            .naming_without_blob
            .get_or_create(&label("type", d.event_type.clone()))
            .inc();
    }
    Ok((d, warning))
}

fn publish_resp(a: &Appended, event_type: &str, hash: &event::Hash) -> PublishResp {
    match a {
        Appended::New { seq, event } => PublishResp {
            id: event.id.clone(),
            hash: event.hash_hex(),
            seq: *seq,
            event_type: event.event_type.clone(),
            duplicate: false,
            age_ms: None,
            duplicate_by: None,
            warning: None,
        },
        Appended::Duplicate {
            seq,
            id,
            ts_ms,
            by_key,
        } => PublishResp {
            id: id.clone(),
            hash: hex::encode(hash),
            seq: *seq,
            event_type: event_type.to_string(),
            duplicate: true,
            age_ms: Some(event::now_ms().saturating_sub(*ts_ms)),
            duplicate_by: Some(
                if *by_key {
                    "idempotency_key"
                } else {
                    "content"
                }
                .into(),
            ),
            warning: None,
        },
        // Only peers' envelopes can be held already; kept for completeness.
        Appended::Held => PublishResp {
            id: String::new(),
            hash: hex::encode(hash),
            seq: 0,
            event_type: event_type.to_string(),
            duplicate: true,
            age_ms: None,
            duplicate_by: None,
            warning: None,
        },
    }
}

pub(super) async fn publish(
    State(node): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(mut req): ApiJson<PublishReq>,
) -> ApiResult<Json<PublishResp>> {
    // The key may come as an `Idempotency-Key` header instead; one only,
    // or which one decides would depend on the proxy in between.
    if headers.get_all("idempotency-key").iter().nth(1).is_some() {
        return Err(ApiError::bad(
            "several Idempotency-Key headers: send one (a publish has one key)",
        ));
    }
    if let Some(h) = headers.get("idempotency-key") {
        let h = h
            .to_str()
            .map_err(|_| ApiError::bad("Idempotency-Key header is not visible ASCII"))?;
        match &req.idempotency_key {
            Some(k) if k != h => {
                return Err(ApiError::bad(
                    "the Idempotency-Key header and the body's idempotency_key differ",
                ))
            }
            _ => req.idempotency_key = Some(h.to_string()),
        }
    }
    let (d, warning) = draft(req, &node)?;
    let (t, h) = (d.event_type.clone(), d.hash);
    let out = node.publish(vec![d]).await?;
    let mut resp = publish_resp(&out[0], &t, &h);
    resp.warning = warning;
    Ok(Json(resp))
}

pub(super) async fn publish_batch(
    State(node): State<AppState>,
    ApiJson(req): ApiJson<BatchReq>,
) -> ApiResult<Json<Value>> {
    if req.events.is_empty() {
        return Err(ApiError::bad("events is empty"));
    }
    if req.events.len() > node.cfg().max_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "batch of {} events exceeds max_batch = {}",
                req.events.len(),
                node.cfg().max_batch
            ),
        ));
    }
    // Validate everything before writing anything.
    let drafts = req
        .events
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            draft(r, &node).map_err(|e| ApiError::bad(format!("events[{i}]: {}", e.message)))
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let (drafts, warnings): (Vec<Draft>, Vec<Option<String>>) = drafts.into_iter().unzip();
    let keys: Vec<(String, event::Hash)> = drafts
        .iter()
        .map(|d| (d.event_type.clone(), d.hash))
        .collect();
    let out = node.publish(drafts).await?;
    let results: Vec<PublishResp> = out
        .iter()
        .zip(&keys)
        .zip(warnings)
        .map(|((a, (t, h)), w)| PublishResp {
            warning: w,
            ..publish_resp(a, t, h)
        })
        .collect();
    Ok(Json(json!({ "results": results })))
}

pub(super) async fn history(
    State(node): State<AppState>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<Value>> {
    let pats = patterns(
        &q.types
            .map(|t| t.split(',').map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default(),
    )?;
    let limit = page_size("limit", q.limit)?;
    match q.order.as_deref() {
        None | Some("asc") => {
            if q.before.is_some() {
                return Err(ApiError::bad("before goes with order=desc"));
            }
        }
        Some("desc") => {
            if q.after.is_some() || q.since.is_some() {
                return Err(ApiError::bad(
                    "order=desc pages with before; after and since go with order=asc",
                ));
            }
            let before = q.before.unwrap_or(node.store().head().saturating_add(1));
            let store = node.store().clone();
            let (events, lowest) = tokio::task::spawn_blocking(move || {
                store.read_before(before, limit, MAX_SCAN, &pats)
            })
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
            let views: Vec<EventView> = events.iter().map(|(s, e)| EventView::new(*s, e)).collect();
            let first = node.store().first();
            return Ok(Json(json!({
                "events": views,
                "next_before": lowest,
                "first": first,
                "head": node.store().head(),
                "done": lowest <= first,
            })));
        }
        Some(o) => return Err(ApiError::bad(format!("order {o:?}: write asc or desc"))),
    }
    let after = match (q.after, q.since) {
        (Some(a), _) => a,
        (None, Some(s)) => node
            .store()
            .seq_before_time(parse_since(&s).map_err(ApiError::bad)?)?,
        (None, None) => node.store().first().saturating_sub(1),
    };
    let store = node.store().clone();
    let (events, last) =
        tokio::task::spawn_blocking(move || store.read_after(after, limit, MAX_SCAN, &pats))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let views: Vec<EventView> = events.iter().map(|(s, e)| EventView::new(*s, e)).collect();
    Ok(Json(
        json!({ "events": views, "next_after": last, "head": node.store().head() }),
    ))
}

pub(super) async fn get_event(
    State(node): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<EventView>> {
    match node.store().get_by_id(&id)? {
        Some((seq, s)) => Ok(Json(EventView::new(seq, &s))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no event with id {id:?} is retained here"),
        )),
    }
}

/// Order events as a tree by parent id, depth-first, roots first by time.
/// An event whose parent is not among them is a root.
pub fn trace_tree(mut events: Vec<EventView>) -> Vec<TraceNode> {
    events.sort_by_key(|e| e.seq);
    let ids: std::collections::HashSet<String> = events.iter().map(|e| e.id.clone()).collect();
    let mut children: HashMap<Option<String>, Vec<EventView>> = HashMap::new();
    for e in events {
        let parent = e
            .parent_id
            .clone()
            .filter(|p| ids.contains(p) && *p != e.id);
        children.entry(parent).or_default().push(e);
    }
    let mut out = Vec::new();
    let mut stack: Vec<(usize, EventView)> = children
        .remove(&None)
        .unwrap_or_default()
        .into_iter()
        .rev()
        .map(|e| (0, e))
        .collect();
    while let Some((depth, e)) = stack.pop() {
        if let Some(kids) = children.remove(&Some(e.id.clone())) {
            stack.extend(kids.into_iter().rev().map(|k| (depth + 1, k)));
        }
        out.push(TraceNode { depth, event: e });
    }
    out
}

pub(super) async fn trace(
    State(node): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let Some((seq, s)) = node.store().get_by_id(&id)? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no event with id {id:?} is retained here"),
        ));
    };
    let corr = s
        .event
        .correlation_id
        .clone()
        .unwrap_or_else(|| s.event.id.clone());
    let mut found: HashMap<String, EventView> = HashMap::new();
    found.insert(s.event.id.clone(), EventView::new(seq, &s));
    if let Some((rs, r)) = node.store().get_by_id(&corr)? {
        found.insert(r.event.id.clone(), EventView::new(rs, &r));
    }
    for (sq, e) in node.store().by_correlation(&corr)? {
        found.insert(e.event.id.clone(), EventView::new(sq, &e));
    }
    // Follow parent links upwards from the asked event too.
    let mut cur = s.event.parent_id.clone();
    let mut hops = 0;
    while let (Some(p), true) = (cur.clone(), hops < 64) {
        hops += 1;
        match node.store().get_by_id(&p)? {
            Some((ps, pe)) => {
                cur = pe.event.parent_id.clone();
                found.insert(pe.event.id.clone(), EventView::new(ps, &pe));
            }
            None => break,
        }
    }
    let tree = trace_tree(found.into_values().collect());
    Ok(Json(json!({ "correlation_id": corr, "events": tree })))
}

pub(super) async fn types() -> Json<Value> {
    let list: Vec<Value> = event::CATALOG
        .iter()
        .map(|t| json!({ "name": t.name, "category": t.category, "aliases": t.aliases, "description": t.description }))
        .collect();
    Json(json!({ "types": list }))
}
