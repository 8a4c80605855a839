//! Cluster-wide locks with fencing tokens, asked of the leader.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ApiJson, ApiResult};
use super::views::rfc3339;
use super::AppState;

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

pub(super) async fn list_locks(State(node): State<AppState>) -> ApiResult<Json<Value>> {
    use crate::leader::{LockAnswer, LockCall};
    match node
        .leader()
        .call(node.leader_ctx(), LockCall::List)
        .await
        .map_err(lock_err)?
    {
        LockAnswer::List(l) => {
            // Durations from the leader, instants on this agent's clock.
            let now = crate::event::now_ms();
            let locks: Vec<Value> = l
                .into_iter()
                .map(|l| json!({"name": l.name, "holder": l.holder, "token": l.token, "ttl_ms": l.ttl_ms, "remaining_ms": l.remaining_ms, "expires_ms": now + l.remaining_ms}))
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

pub(super) async fn lock_op(
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
    // The leader answers durations; `expires_ms` is this agent's clock plus
    // the duration (display only: a holder counts its lease from when it
    // sent the call, on its own monotonic clock).
    let now = crate::event::now_ms();
    let (status, body) = match ans {
        LockAnswer::One(LockResponse::Granted { token, ttl_ms, .. }) => (
            StatusCode::OK,
            json!({"name": name, "granted": true, "token": token, "ttl_ms": ttl_ms, "expires_ms": now + ttl_ms}),
        ),
        LockAnswer::One(LockResponse::Released) => {
            (StatusCode::OK, json!({"name": name, "released": true}))
        }
        LockAnswer::One(LockResponse::Denied {
            holder,
            token,
            remaining_ms,
        }) => {
            let expires_ms = now + remaining_ms;
            (
                StatusCode::CONFLICT,
                json!({"name": name, "granted": false, "error": format!("lock {name} is held by {holder} (token {token}) until {} ({:.1} s from now unless renewed)", rfc3339(expires_ms), remaining_ms as f64 / 1000.0), "holder": holder, "token": token, "remaining_ms": remaining_ms, "expires_ms": expires_ms}),
            )
        }
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
