//! The cluster as this agent sees it: peers, health, status, members,
//! job counters, leave, leader, and the fault-injection block.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::consumers::consumer_views;
use super::error::{ApiError, ApiJson, ApiQuery, ApiResult};
use super::params::patterns;
use super::views::yes;
use super::AppState;

pub(super) async fn peers(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let peers = node
        .net()
        .peers()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(json!({ "peer_id": node.peer_id(), "peers": peers })))
}

/// The agent answers; `ok` is false while its store refuses writes.
pub(super) async fn health(State(node): State<AppState>) -> Json<Value> {
    match node.store().durable().read_only() {
        None => Json(json!({ "ok": true })),
        Some(r) => Json(json!({
            "ok": false,
            "store": store_state(&node),
            "reason": format!("the store is read-only: {}", r.reason),
        })),
    }
}

/// `GET /v1/health` without a token on an API that has one: up or not,
/// nothing else (no reason, no paths).
pub(super) fn health_open(node: &AppState) -> Json<Value> {
    Json(json!({ "ok": node.store().durable().read_only().is_none() }))
}

/// Writable, or read-only and why (durable.rs).
pub(super) fn store_state(node: &AppState) -> Value {
    match node.store().durable().read_only() {
        None => json!({ "writable": true }),
        Some(r) => json!({
            "writable": false,
            "read_only_reason": r.reason,
            "read_only_since_ms": r.since_ms,
        }),
    }
}

pub(super) async fn status(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let peers = node
        .net()
        .peers()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let listen = node.net().listen_addrs().await.unwrap_or_default();
    let reach = node.net().reach().await.ok();
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
        "reach": reach,
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

pub(super) async fn members(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let listen = node.net().listen_addr_texts().await;
    let via: std::collections::HashMap<String, &'static str> = node
        .net()
        .peers()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.peer_id, p.via))
        .collect();
    let mut list = node.membership().members(&listen);
    if let Some(me) = list.first_mut() {
        me.peer_id = node.peer_id().to_string();
    }
    for m in list.iter_mut().skip(1) {
        m.via = via.get(&m.peer_id).copied();
    }
    Ok(Json(json!({ "self": node.peer_id(), "members": list })))
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SubsQuery {
    /// Only these type patterns (comma-separated, exactly as consumers
    /// name them; `*` for the consumers of every type).
    #[serde(default)]
    pub types: Option<String>,
}

/// Durable consumers per type pattern on every live host: this agent's
/// counted now, the others' as their last health record carried them.
pub(super) async fn subscriptions(
    State(node): State<AppState>,
    ApiQuery(q): ApiQuery<SubsQuery>,
) -> ApiResult<Json<Value>> {
    let only: Option<Vec<String>> = match q.types.as_deref() {
        None => None,
        Some(t) => {
            let list: Vec<String> = t.split(',').map(str::to_string).collect();
            let pats = patterns(&list)?;
            if pats.is_empty() {
                return Err(ApiError::bad(
                    "types: give one or more type patterns, comma-separated",
                ));
            }
            Some(pats.iter().map(|p| p.as_str().to_string()).collect())
        }
    };
    let mine = crate::membership::subscription_counts(&node.store().consumers()?);
    let mut hosts = node.membership().subscriptions();
    if let Some(me) = hosts.first_mut() {
        me.peer_id = node.peer_id().to_string();
        me.subscriptions = Some(mine.into_iter().collect());
    }
    let (types, unknown) = crate::membership::cluster_counts(&mut hosts, only.as_deref());
    Ok(Json(json!({
        "types": types,
        "hosts": hosts,
        "hosts_without_counts": unknown,
        "health_interval_ms": node.cfg().health_interval.as_millis() as u64,
    })))
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
pub(super) async fn set_jobs(
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
pub(super) async fn leave(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    let report = node.membership().leave().await.ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "membership is not running")
    })?;
    node.stop_signal().notify_one();
    Ok(Json(
        json!({ "left": true, "incarnation": report.incarnation, "peers_told": report.peers_told, "peers_acked": report.peers_acked, "stopping": true }),
    ))
}

pub(super) async fn leader(State(node): State<AppState>) -> Json<Value> {
    Json(json!(node.leader().view(node.leader_ctx())))
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BlockReq {
    pub peers: Vec<String>,
    /// false to accept them again.
    #[serde(default = "yes")]
    pub block: bool,
}

/// Fault injection: cut this agent off from peers (a partition, from this side).
pub(super) async fn debug_block(
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
