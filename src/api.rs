//! The local HTTP/JSON API (server) and the client the CLI uses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::event::{self, Draft, Event, TypePattern};
use crate::metrics::label;
use crate::node::{Node, NodeError};
use crate::store::{Appended, StartAt, StoreError, Stored};

// ---------------------------------------------------------------- errors

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Event(e) => ApiError::bad(e.to_string()),
            NodeError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            NodeError::Store(s) => s.into(),
            other => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownConsumer(name) => unknown_consumer(&name),
            StoreError::BeyondHead { .. } | StoreError::Event(_) => ApiError::bad(e.to_string()),
            // The store cannot write now (read-only, stuck, a failed
            // commit): retry later, at this agent after its restart.
            StoreError::ReadOnly(_)
            | StoreError::Timeout { .. }
            | StoreError::CommitFailed { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

/// `Json<T>` whose rejections are our JSON errors with a clear message.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(ApiError::new(r.status(), r.body_text())),
        }
    }
}

/// `Query<T>` with our JSON errors.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(q) => Ok(ApiQuery(q.0)),
            Err(r) => {
                let r: QueryRejection = r;
                Err(ApiError::new(r.status(), r.body_text()))
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;
type AppState = Arc<Node>;

// ---------------------------------------------------------------- views

/// An event as the API shows it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct EventView {
    pub seq: u64,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub source: String,
    pub origin: Option<String>,
    pub source_seq: u64,
    pub ts_ms: u64,
    pub time: String,
    pub received_ms: u64,
    pub correlation_id: Option<String>,
    pub parent_id: Option<String>,
    /// The publisher's idempotency key, if it gave one (envelope version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub payload: Value,
    pub hash: String,
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl EventView {
    pub fn new(seq: u64, s: &Stored) -> Self {
        let e: &Event = &s.event;
        EventView {
            seq,
            id: e.id.clone(),
            event_type: e.event_type.clone(),
            source: e.source.clone(),
            origin: e.origin.clone(),
            source_seq: e.seq,
            ts_ms: e.ts_ms,
            time: rfc3339(e.ts_ms),
            received_ms: s.received_ms,
            correlation_id: e.correlation_id.clone(),
            parent_id: e.parent_id.clone(),
            idempotency_key: e.idem_key.clone(),
            payload: e.payload_value(),
            hash: e.hash_hex(),
        }
    }
}

// ---------------------------------------------------------------- requests

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PublishReq {
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default)]
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

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PublishResp {
    pub id: String,
    pub hash: String,
    pub seq: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub duplicate: bool,
    /// For a duplicate: how long before this answer the first copy was
    /// published, by its publication time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// For a duplicate: "idempotency_key" or "content".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_by: Option<String>,
    /// Accepted, but probably not what was meant (a MODEL_PROMOTED without
    /// a blob reference: nothing will be transferred).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

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

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FetchResp {
    pub consumer: String,
    pub events: Vec<EventView>,
    /// Events removed by retention before this consumer acknowledged them.
    pub missed: u64,
    pub cursor: u64,
    pub head: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ConsumerView {
    pub name: String,
    pub types: Vec<String>,
    pub cursor: u64,
    /// Events after the cursor that this consumer matches (not every log
    /// entry): what it has still to handle.
    pub lag: u64,
    /// False when `lag` stopped counting at [`LAG_SCAN`] entries (at least
    /// that many).
    #[serde(default = "yes")]
    pub lag_exact: bool,
    pub dead_letters: u64,
    pub created: String,
    pub last_ack: Option<String>,
}

/// Most log entries a consumer's lag counts through.
pub const LAG_SCAN: usize = 20_000;

const MAX_FETCH: usize = 1000;
const MAX_WAIT_MS: u64 = 60_000;
const MAX_SCAN: usize = 50_000;

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

/// Most type patterns one request or consumer may carry.
pub const MAX_PATTERNS: usize = 256;

fn patterns(list: &[String]) -> ApiResult<Vec<TypePattern>> {
    if list.len() > MAX_PATTERNS {
        return Err(ApiError::bad(format!(
            "{} type patterns given; at most {MAX_PATTERNS}",
            list.len()
        )));
    }
    list.iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| TypePattern::parse(s).map_err(|e| ApiError::bad(format!("type pattern: {e}"))))
        .collect()
}

/// A time as RFC 3339, milliseconds since the epoch, or a duration ago.
pub fn parse_since(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0));
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(event::now_ms().saturating_sub(d.as_millis() as u64));
    }
    Err(format!("since {s:?}: write an RFC 3339 time (2026-11-23T10:00:00Z), milliseconds since the epoch, or a duration ago (10m)"))
}

/// A checked draft, and the warning its answer carries if any.
fn draft(r: PublishReq, node: &Node) -> ApiResult<(Draft, Option<String>)> {
    let cfg = &node.cfg();
    let payload = r.payload.unwrap_or_else(|| json!({}));
    let d = Draft::new(
        &r.event_type,
        &payload,
        r.origin,
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

// ---------------------------------------------------------------- handlers

async fn publish(
    State(node): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(mut req): ApiJson<PublishReq>,
) -> ApiResult<Json<PublishResp>> {
    // The key may come as an `Idempotency-Key` header instead.
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

async fn publish_batch(
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

async fn history(
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

async fn get_event(
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

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TraceNode {
    pub depth: usize,
    pub event: EventView,
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

async fn trace(State(node): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
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

async fn upsert_consumer(
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
async fn consumer_views(
    node: &Node,
    recs: Vec<crate::store::ConsumerRec>,
) -> ApiResult<Vec<ConsumerView>> {
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || {
        recs.iter()
            .map(|c| consumer_view_with(consumer_lag(&store, c), c))
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

/// A consumer's matching events after its cursor (see [`ConsumerView::lag`]).
pub fn consumer_lag(store: &crate::store::Store, c: &crate::store::ConsumerRec) -> (u64, bool) {
    let pats: Vec<TypePattern> = c
        .types
        .iter()
        .filter_map(|t| TypePattern::parse(t).ok())
        .collect();
    store
        .pending(c.cursor, LAG_SCAN, &pats)
        .unwrap_or((store.head().saturating_sub(c.cursor), false))
}

async fn get_consumer(
    State(node): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<ConsumerView>> {
    valid_consumer(&name)?;
    match node.store().consumer(&name)? {
        Some(c) => Ok(Json(consumer_view(&node, c).await?)),
        None => Err(unknown_consumer(&name)),
    }
}

fn unknown_consumer(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("unknown consumer {name:?}: create it first with PUT /v1/consumers/{name}"),
    )
}

async fn fetch(
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

async fn ack(
    State(node): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<AckReq>,
) -> ApiResult<Json<ConsumerView>> {
    valid_consumer(&name)?;
    let rec = node.store().ack(&name, req.seq).await?;
    Ok(Json(consumer_view(&node, rec).await?))
}

async fn nack(
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

async fn dead_letters(
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

async fn list_consumers(State(node): State<AppState>) -> ApiResult<Json<Vec<ConsumerView>>> {
    Ok(Json(
        consumer_views(&node, node.store().consumers()?).await?,
    ))
}

async fn delete_consumer(
    State(node): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<ConsumerView>> {
    valid_consumer(&name)?;
    let rec = node.store().delete_consumer(&name).await?;
    node.metrics().consumer_lag.remove(&label("consumer", name));
    Ok(Json(consumer_view(&node, rec).await?))
}

async fn peers(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let peers = node
        .net()
        .peers()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(json!({ "peer_id": node.peer_id(), "peers": peers })))
}

/// The agent answers; `ok` is false while its store refuses writes.
async fn health(State(node): State<AppState>) -> Json<Value> {
    match node.store().durable().read_only() {
        None => Json(json!({ "ok": true })),
        Some(r) => Json(json!({
            "ok": false,
            "store": store_state(&node),
            "reason": format!("the store is read-only: {}", r.reason),
        })),
    }
}

/// Writable, or read-only and why (durable.rs).
fn store_state(node: &AppState) -> Value {
    match node.store().durable().read_only() {
        None => json!({ "writable": true }),
        Some(r) => json!({
            "writable": false,
            "read_only_reason": r.reason,
            "read_only_since_ms": r.since_ms,
        }),
    }
}

async fn status(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let peers = node
        .net()
        .peers()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let listen = node.net().listen_addrs().await.unwrap_or_default();
    let consumers = consumer_views(&node, node.store().consumers()?).await?;
    Ok(Json(json!({
        "name": node.cfg().name,
        "peer_id": node.peer_id(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": node.started().elapsed().as_secs(),
        "listen_addrs": listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "data_dir": node.cfg().data_dir.display().to_string(),
        "mdns": node.cfg().mdns,
        "bootstrap": node.cfg().bootstrap.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "connected_peers": peers.len(),
        "peers": peers.iter().map(|p| p.peer_id.clone()).collect::<Vec<_>>(),
        "store": {
            "events": node.store().len(),
            "first_seq": node.store().first(),
            "head_seq": node.store().head(),
            "size_bytes": node.store().size_on_disk(),
            "source_seq": node.store().source_seq(),
            "path": node.store().path().display().to_string(),
            "state": store_state(&node),
        },
        "consumers": consumers,
        "max_event_bytes": node.cfg().max_event_bytes,
        "max_event_payload_bytes": node.max_event_size(),
    })))
}

async fn members(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let listen: Vec<String> = node
        .net()
        .listen_addrs()
        .await
        .unwrap_or_default()
        .iter()
        .map(|a| a.to_string())
        .collect();
    let mut list = node.membership().members(&listen);
    if let Some(me) = list.first_mut() {
        me.peer_id = node.peer_id().to_string();
    }
    Ok(Json(json!({ "self": node.peer_id(), "members": list })))
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct JobsReq {
    /// Counter name → value (a number), or null to remove it.
    pub jobs: std::collections::BTreeMap<String, Option<f64>>,
    /// Drop these counters after this many seconds unless reported again.
    pub ttl_secs: Option<u64>,
}

/// Longest job-counter lifetime a request may ask for (a larger one
/// overflowed the expiry time and panicked the handler).
pub const MAX_JOBS_TTL_SECS: u64 = 30 * 86400;

/// Job counters and gauges reported by local processes; they travel with
/// this host's health record.
async fn set_jobs(
    State(node): State<AppState>,
    ApiJson(req): ApiJson<JobsReq>,
) -> ApiResult<Json<Value>> {
    if req.ttl_secs.is_some_and(|t| t > MAX_JOBS_TTL_SECS) {
        return Err(ApiError::bad(format!(
            "ttl_secs must be at most {MAX_JOBS_TTL_SECS} (30 days)"
        )));
    }
    let ttl = req.ttl_secs.map(Duration::from_secs);
    let jobs = node
        .membership()
        .set_jobs(req.jobs, ttl)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(Json(json!({ "jobs": jobs })))
}

/// Graceful leave: tell the cluster, then stop the agent.
async fn leave(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let report = node.membership().leave().await.ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "membership is not running")
    })?;
    node.stop_signal().notify_one();
    Ok(Json(
        json!({ "left": true, "incarnation": report.incarnation, "peers_told": report.peers_told, "peers_acked": report.peers_acked, "stopping": true }),
    ))
}

async fn leader(State(node): State<AppState>) -> Json<Value> {
    Json(json!(node.leader().view(node.leader_ctx())))
}

fn lock_err(e: crate::leader::LockError) -> ApiError {
    use crate::leader::LockError;
    let status = match e {
        LockError::NoVoters => StatusCode::BAD_REQUEST,
        LockError::NoLeader | LockError::Timeout(_) | LockError::Unavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        LockError::Other(_) => StatusCode::BAD_GATEWAY,
    };
    ApiError::new(status, e.to_string())
}

fn lock_name_ok(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("lock name {name:?}: use 1-128 letters, digits or -_./:"),
        ))
    }
}

async fn list_locks(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    use crate::leader::{LockAnswer, LockCall};
    match node
        .leader()
        .call(node.leader_ctx(), LockCall::List)
        .await
        .map_err(lock_err)?
    {
        LockAnswer::List(l) => {
            let locks: Vec<Value> = l
                .into_iter()
                .map(|(name, l)| json!({"name": name, "holder": l.holder, "token": l.token, "ttl_ms": l.ttl_ms, "expires_ms": l.expires_ms}))
                .collect();
            Ok(Json(json!({ "locks": locks })))
        }
        LockAnswer::One(_) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "unexpected answer from the leader",
        )),
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct LockReq {
    /// Acquire: lease length (default 30).
    pub ttl_secs: Option<f64>,
    /// Acquire: who holds it (default: this agent's name).
    pub holder: Option<String>,
    /// Renew, release: the token the grant returned.
    pub token: Option<u64>,
}

async fn lock_op(
    State(node): State<AppState>,
    Path((name, op)): Path<(String, String)>,
    ApiJson(req): ApiJson<LockReq>,
) -> ApiResult<Response> {
    use crate::leader::{LockAnswer, LockCall, LockResponse};
    lock_name_ok(&name)?;
    let need_token = || {
        req.token.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{op} needs the \"token\" the grant returned"),
            )
        })
    };
    let call = match op.as_str() {
        "acquire" => {
            if let Some(h) = &req.holder {
                if h.is_empty() || h.len() > 128 {
                    return Err(ApiError::bad("holder: 1-128 bytes"));
                }
            }
            let ttl = req.ttl_secs.unwrap_or(30.0);
            if !(0.1..=86400.0).contains(&ttl) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "ttl_secs must be between 0.1 and 86400",
                ));
            }
            LockCall::Acquire {
                name: name.clone(),
                holder: req
                    .holder
                    .clone()
                    .unwrap_or_else(|| node.cfg().name.clone()),
                ttl_ms: (ttl * 1000.0) as u64,
            }
        }
        "renew" => LockCall::Renew {
            name: name.clone(),
            token: need_token()?,
        },
        "release" => LockCall::Release {
            name: name.clone(),
            token: need_token()?,
        },
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "lock operations are acquire, renew and release",
            ))
        }
    };
    let ans = node
        .leader()
        .call(node.leader_ctx(), call)
        .await
        .map_err(lock_err)?;
    let (status, body) = match ans {
        LockAnswer::One(LockResponse::Granted {
            token, expires_ms, ..
        }) => (
            StatusCode::OK,
            json!({"name": name, "granted": true, "token": token, "expires_ms": expires_ms}),
        ),
        LockAnswer::One(LockResponse::Released) => {
            (StatusCode::OK, json!({"name": name, "released": true}))
        }
        LockAnswer::One(LockResponse::Denied {
            holder,
            token,
            expires_ms,
        }) => (
            StatusCode::CONFLICT,
            json!({"name": name, "granted": false, "error": format!("lock {name} is held by {holder} (token {token}) until {}", rfc3339(expires_ms)), "holder": holder, "token": token, "expires_ms": expires_ms}),
        ),
        LockAnswer::One(LockResponse::NotHolder) => (
            StatusCode::CONFLICT,
            json!({"name": name, "error": format!("token does not hold lock {name} (expired, released, or taken by someone else)")}),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            json!({"error": "unexpected answer from the leader"}),
        ),
    };
    Ok((status, Json(body)).into_response())
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BlockReq {
    pub peers: Vec<String>,
    /// false to accept them again.
    #[serde(default = "yes")]
    pub block: bool,
}

fn yes() -> bool {
    true
}

/// Fault injection: cut this agent off from peers (a partition, from this side).
async fn debug_block(
    State(node): State<AppState>,
    ApiJson(req): ApiJson<BlockReq>,
) -> ApiResult<Json<Value>> {
    if !node.cfg().fault_injection {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "fault injection is off; start the agent with --fault-injection (tests and testnet only)",
        ));
    }
    let n = node.block_peers(&req.peers, req.block).await?;
    Ok(Json(json!({ "peers": n, "blocked": req.block })))
}

async fn types() -> Json<Value> {
    let list: Vec<Value> = event::CATALOG
        .iter()
        .map(|t| json!({ "name": t.name, "category": t.category, "aliases": t.aliases, "description": t.description }))
        .collect();
    Json(json!({ "types": list }))
}

/// Refuse a request whose `Host` names anything but this agent on
/// loopback: a web page that rebinds its own DNS name to 127.0.0.1 sends
/// its name as `Host`, so refusing names we don't know keeps browsers out
/// (proto-notes/security.md). Accepted: `localhost` and `*.localhost`, a
/// loopback address, the address the API is bound to (any address when
/// bound to 0.0.0.0 / ::), and names in `api_hosts`. A request without
/// `Host` (HTTP/1.0 tools; browsers always send one) passes.
async fn check_host(
    State(node): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    // A browser marks its requests: `Origin` on every cross-origin POST
    // (and on simple requests that need no preflight, such as a form's
    // text/plain body), `Sec-Fetch-Site` on all of them. Local processes
    // send neither, so a request carrying either from a foreign site is a
    // web page's and is refused, whatever its Host.
    let fetch_site = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok());
    if req.headers().contains_key(axum::http::header::ORIGIN)
        || fetch_site.is_some_and(|v| v != "none" && v != "same-origin")
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "requests from web pages are refused (Origin or Sec-Fetch-Site present): the API is for local processes",
        )
        .into_response();
    }
    if let Some(h) = req.headers().get(axum::http::header::HOST) {
        let ok = h
            .to_str()
            .is_ok_and(|h| host_allowed(h, node.cfg().api, &node.cfg().api_hosts));
        if !ok {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host {:?} is not this agent's: use 127.0.0.1, localhost or the API's \
                     address, or list the name in api_hosts",
                    String::from_utf8_lossy(h.as_bytes())
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

pub(crate) fn host_allowed(host: &str, api: SocketAddr, extra: &[String]) -> bool {
    // Strip the port: `[::1]:7411`, `127.0.0.1:7411`, `localhost:7411`.
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || tail.starts_with(':') => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return ip.is_loopback() || ip == api.ip() || api.ip().is_unspecified();
    }
    extra.iter().any(|e| e.eq_ignore_ascii_case(&name))
}

async fn count_errors(
    State(node): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    let s = resp.status();
    if s.is_client_error() || s.is_server_error() {
        node.metrics()
            .api_errors
            .get_or_create(&label("code", s.as_u16().to_string()))
            .inc();
    }
    resp
}

// ---------------------------------------------------------------- blobs

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlobAddReq {
    /// Absolute path of a file under the configured `blob_roots`
    /// (proto-notes/security.md); without roots, upload the bytes.
    path: String,
    name: String,
    /// Naming event type [default: BLOB_PUBLISHED].
    #[serde(default)]
    event: Option<String>,
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
) -> ApiResult<Json<Value>> {
    let (added, appended) = crate::blob::add(node.blob(), src, len, label, name, ty)
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
async fn blob_add(
    State(node): State<AppState>,
    ApiJson(req): ApiJson<BlobAddReq>,
) -> ApiResult<Json<Value>> {
    let ty = naming_type(&req.name, req.event.as_deref())?;
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
    add_and_answer(&node, Box::new(f), len, canon, &req.name, &ty).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    name: String,
    #[serde(default)]
    event: Option<String>,
}

/// `POST /v1/blobs/upload?name=…&event=…` with the blob's bytes as the
/// body (`Content-Length` required): the caller reads its file with its
/// own permissions; the agent hashes and stores the bytes as they arrive.
async fn blob_upload(
    State(node): State<AppState>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let ty = naming_type(&q.name, q.event.as_deref())?;
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
    let max = crate::blob::store::MAX_CHUNKS as u64 * u64::from(crate::blob::store::MAX_CHUNK);
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
    )
    .await
}

/// A page size: 1..=MAX_FETCH, default 100; 0 is refused (it would
/// otherwise read as "one"), larger values are capped (proto-notes/api.md).
fn page_size(key: &str, v: Option<usize>) -> Result<usize, ApiError> {
    match v {
        Some(0) => Err(ApiError::bad(format!(
            "{key}=0: give 1..={MAX_FETCH} (default 100)"
        ))),
        v => Ok(v.unwrap_or(100).min(MAX_FETCH)),
    }
}

fn store_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn blob_list(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let store = node.blobs().store.clone();
    let (blobs, names) = tokio::task::spawn_blocking(move || {
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
        Ok::<_, crate::blob::store::BlobError>((out, names))
    })
    .await
    .map_err(store_err)?
    .map_err(store_err)?;
    Ok(Json(json!({ "blobs": blobs, "names": names })))
}

fn blobs_complete(store: &crate::blob::BlobStore, id: &crate::blob::BlobId) -> bool {
    store.is_complete(id).unwrap_or(false)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlobRef {
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
    let found = tokio::task::spawn_blocking(move || -> Result<_, crate::blob::store::BlobError> {
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

async fn blob_fetch(
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
    crate::blob::want(node.blob(), id, rec, names);
    Ok(Json(
        json!({ "blob": crate::blob::hex_id(&id), "state": "fetching" }),
    ))
}

async fn blob_info(
    State(node): State<AppState>,
    ApiQuery(q): ApiQuery<BlobRef>,
) -> ApiResult<Json<Value>> {
    let (id, rec) = resolve_ref(&node, &q.r).await?;
    let store = node.blobs().store.clone();
    let (meta, have) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::blob::store::BlobError>((store.meta(&id)?, store.have(&id)?))
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
async fn blob_content(
    State(node): State<AppState>,
    ApiQuery(q): ApiQuery<BlobRef>,
) -> ApiResult<Response> {
    use crate::blob::store::BlobError;
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

async fn sync_status(State(node): State<AppState>) -> ApiResult<Json<Value>> {
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

pub fn router(node: Arc<Node>) -> Router {
    let limit = node.cfg().api_max_body_bytes;
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/events", post(publish).get(history))
        .route("/v1/events/batch", post(publish_batch))
        .route("/v1/events/{id}", get(get_event))
        .route("/v1/trace/{id}", get(trace))
        .route("/v1/consumers", get(list_consumers))
        .route(
            "/v1/consumers/{name}",
            axum::routing::put(upsert_consumer)
                .delete(delete_consumer)
                .get(get_consumer),
        )
        .route("/v1/consumers/{name}/events", get(fetch))
        .route("/v1/consumers/{name}/ack", post(ack))
        .route("/v1/consumers/{name}/nack", post(nack))
        .route("/v1/consumers/{name}/dead-letters", get(dead_letters))
        .route("/v1/peers", get(peers))
        .route("/v1/members", get(members))
        .route("/v1/jobs", post(set_jobs))
        .route("/v1/leave", post(leave))
        .route("/v1/leader", get(leader))
        .route("/v1/locks", get(list_locks))
        .route("/v1/locks/{name}/{op}", post(lock_op))
        .route("/v1/status", get(status))
        .route("/v1/types", get(types))
        .route("/v1/blobs", post(blob_add).get(blob_list))
        .route(
            "/v1/blobs/upload",
            // A blob is as large as the store takes, not a JSON body.
            post(blob_upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/blob", get(blob_info))
        .route("/v1/blob/fetch", post(blob_fetch))
        .route("/v1/blob/content", get(blob_content))
        .route("/v1/sync", get(sync_status))
        .route("/v1/debug/block", post(debug_block))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint; see proto-notes/api.md",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint; see proto-notes/api.md",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            check_host,
        ))
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            count_errors,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(node)
}

// ---------------------------------------------------------------- client

/// The client the CLI uses.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the riftmesh agent at {addr}: {reason} (is it running? point --api or RIFTMESH_API at it)")]
    Unreachable { addr: String, reason: String },
    #[error("the agent refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
    /// Something answers at the address, but not the agent's API.
    #[error("{addr} is not a riftmesh agent's API: {detail}")]
    NotApi { addr: String, detail: String },
    /// A local file the client was to send.
    #[error("{0}")]
    Local(String),
}

impl Client {
    pub fn new(api: &str) -> Self {
        let base = if api.starts_with("http://") || api.starts_with("https://") {
            api.trim_end_matches('/').to_string()
        } else {
            format!("http://{api}")
        };
        Client {
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap_or_default(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            addr: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let body: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) => return Err(self.not_api(status).await),
        };
        if !status.is_success() {
            let message = body
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no message")
                .to_string();
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    /// The error for an answer that is not JSON: says so, and whether the
    /// address is the agent's metrics port (a common mix-up).
    async fn not_api(&self, status: reqwest::StatusCode) -> ClientError {
        let metrics = async {
            let r = self
                .http
                .get(format!("{}/metrics", self.base))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            let text = r.text().await.ok()?;
            text.contains("riftmesh_").then_some(())
        }
        .await;
        let detail = match metrics {
            Some(()) => format!(
                "that is the agent's Prometheus metrics port; the API is on another port (the agent's --api or `api` setting, {} by default)",
                crate::config::DEFAULT_API
            ),
            None => format!(
                "it answered HTTP {status} without a JSON body (the API is at the agent's --api or `api` setting, {} by default)",
                crate::config::DEFAULT_API
            ),
        };
        ClientError::NotApi {
            addr: self.base.clone(),
            detail,
        }
    }

    /// Upload a file's bytes (read with the caller's permissions) as a
    /// blob: `POST /v1/blobs/upload`, streamed, with its length.
    pub async fn upload_blob(
        &self,
        file: &std::path::Path,
        name: &str,
        event: Option<&str>,
    ) -> Result<Value, ClientError> {
        let local = |e: std::io::Error| ClientError::Local(format!("{}: {e}", file.display()));
        // O_NONBLOCK: a FIFO's open would wait for a writer; the type is
        // checked on the descriptor (regular files ignore the flag).
        let f = std::os::unix::fs::OpenOptionsExt::custom_flags(
            std::fs::OpenOptions::new().read(true),
            libc::O_NONBLOCK,
        )
        .open(file)
        .map_err(local)?;
        let md = f.metadata().map_err(local)?;
        let f = tokio::fs::File::from_std(f);
        if !md.is_file() {
            return Err(ClientError::Local(format!(
                "{} is not a regular file",
                file.display()
            )));
        }
        let mut query = vec![("name", name)];
        if let Some(e) = event {
            query.push(("event", e));
        }
        let body =
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20));
        self.send(
            self.http
                .post(format!("{}/v1/blobs/upload", self.base))
                .query(&query)
                .header(reqwest::header::CONTENT_LENGTH, md.len())
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                // Sending and hashing a large model takes longer than the
                // client's usual 120 s.
                .timeout(Duration::from_secs(6 * 3600))
                .body(body),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn get_query(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Value, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Stream a GET answer into `out` atomically (temporary file, fsync,
    /// rename). Returns the bytes written.
    pub async fn download(
        &self,
        path: &str,
        query: &[(&str, String)],
        out: &std::path::Path,
    ) -> Result<u64, ClientError> {
        use tokio::io::AsyncWriteExt;
        let mut resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                addr: self.base.clone(),
                reason: e.to_string(),
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message: body["error"].as_str().unwrap_or("no message").to_string(),
            });
        }
        let local = |e: std::io::Error| ClientError::Protocol(format!("{}: {e}", out.display()));
        // The blob id the agent served: the whole content is checked
        // against it before the file is renamed into place.
        let expect = resp
            .headers()
            .get("x-riftmesh-blob")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let mut id = [0u8; 32];
                hex::decode_to_slice(v, &mut id).ok().map(|_| id)
            });
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let tmp = out.with_file_name(format!(
            ".{}.riftmesh-get",
            out.file_name()
                .map(|s| s.to_string_lossy())
                .unwrap_or_default()
        ));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(local)?;
        let mut n = 0u64;
        let res = async {
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?
            {
                f.write_all(&chunk).await.map_err(local)?;
                sha2::Digest::update(&mut hasher, &chunk);
                n += chunk.len() as u64;
            }
            // Fail closed: an answer that doesn't name its blob is not
            // written (the agent always names it).
            let id = expect.ok_or_else(|| {
                ClientError::Protocol(
                    "the agent did not name the blob it sent (x-riftmesh-blob): not written".into(),
                )
            })?;
            {
                let got: [u8; 32] = sha2::Digest::finalize(hasher).into();
                if got != id {
                    return Err(ClientError::Protocol(format!(
                        "the content's SHA-256 is {}, not the blob id {}: not written",
                        hex::encode(got),
                        hex::encode(id)
                    )));
                }
            }
            f.sync_all().await.map_err(local)?;
            tokio::fs::rename(&tmp, out).await.map_err(local)
        }
        .await;
        if res.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        res.map(|_| n)
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }
}

pub fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ClientError> {
    serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_loopback_names_the_bound_address_and_listed_names_pass_as_host() {
        let lo: std::net::SocketAddr = "127.0.0.1:7411".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:7411".parse().unwrap();
        let at: std::net::SocketAddr = "10.0.0.5:7411".parse().unwrap();
        let listed = ["gpu-07.lab".to_string()];
        for h in [
            "localhost",
            "LOCALHOST:7411",
            "api.localhost:1",
            "127.0.0.1:7411",
            "127.1.2.3",
            "[::1]:7411",
            "localhost.",
        ] {
            assert!(host_allowed(h, lo, &[]), "{h}");
        }
        for h in [
            "attacker.example",
            "attacker.example:7411",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "10.0.0.5",
            "[::1]x",
            "localhost:abc",
            "",
        ] {
            assert!(!host_allowed(h, lo, &[]), "{h}");
        }
        assert!(host_allowed("10.0.0.5:7411", at, &[]));
        assert!(!host_allowed("10.0.0.6:7411", at, &[]));
        assert!(host_allowed("10.9.9.9", any, &[]));
        assert!(!host_allowed("evil.example", any, &[]));
        assert!(host_allowed("GPU-07.lab:7411", lo, &listed));
    }
}
