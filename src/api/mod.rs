//! The local HTTP/JSON API: the router, the `Host`/`Origin` check, the
//! token check (`auth`) and error counting; handlers by resource in the
//! submodules, the CLI's client in `client`.

mod auth;
mod blobs;
mod client;
mod cluster;
mod consumers;
mod error;
mod events;
mod locks;
mod params;
mod views;

pub use auth::ApiAuth;
pub use client::{decode, Client, ClientError};
pub use cluster::{BlockReq, JobsReq, MAX_JOBS_TTL_SECS};
pub use consumers::{AckReq, ConsumerReq, FetchQuery, NackReq, LAG_SCAN};
pub use error::{ApiError, ApiJson, ApiQuery};
pub use events::{trace_tree, BatchReq, HistoryQuery, PublishReq};
pub use locks::LockReq;
pub use params::{parse_since, MAX_PATTERNS};
pub use views::{ConsumerView, EventView, FetchResp, PublishResp, TraceNode};

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::metrics::label;
use crate::node::Node;

/// What every handler gets: the node.
type AppState = Arc<Node>;

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

/// Fault injection lets a caller cut the agent off from its peers, so it
/// may only be on where every request is checked: the API on loopback, or
/// with a token. (An API elsewhere than loopback always has one,
/// `keys::load_api_token`; this refuses the start should that ever change.)
pub fn check_fault_injection(
    api: SocketAddr,
    fault_injection: bool,
    has_token: bool,
) -> Result<(), String> {
    if fault_injection && !api.ip().is_loopback() && !has_token {
        return Err(format!(
            "fault injection is on and the local API listens on {api}, not loopback, without a \
             token: anyone who reaches it could cut this agent off from its peers. Bind the API \
             to 127.0.0.1, or set api_token_file, or turn fault injection off"
        ));
    }
    Ok(())
}

/// The API's routes behind its checks: `auth` holds the token, if any
/// (`ApiAuth::open()`: none).
pub fn router(node: Arc<Node>, auth: Arc<ApiAuth>) -> Router {
    let limit = node.cfg().api_max_body_bytes;
    Router::new()
        .route("/v1/health", get(cluster::health))
        .route("/v1/events", post(events::publish).get(events::history))
        .route("/v1/events/batch", post(events::publish_batch))
        .route("/v1/events/{id}", get(events::get_event))
        .route("/v1/trace/{id}", get(events::trace))
        .route("/v1/consumers", get(consumers::list_consumers))
        .route(
            "/v1/consumers/{name}",
            axum::routing::put(consumers::upsert_consumer)
                .delete(consumers::delete_consumer)
                .get(consumers::get_consumer),
        )
        .route("/v1/consumers/{name}/events", get(consumers::fetch))
        .route("/v1/consumers/{name}/ack", post(consumers::ack))
        .route("/v1/consumers/{name}/nack", post(consumers::nack))
        .route(
            "/v1/consumers/{name}/dead-letters",
            get(consumers::dead_letters),
        )
        .route("/v1/peers", get(cluster::peers))
        .route("/v1/members", get(cluster::members))
        .route("/v1/subscriptions", get(cluster::subscriptions))
        .route("/v1/jobs", post(cluster::set_jobs))
        .route("/v1/leave", post(cluster::leave))
        .route("/v1/leader", get(cluster::leader))
        .route("/v1/locks", get(locks::list_locks))
        .route("/v1/locks/{name}/{op}", post(locks::lock_op))
        .route("/v1/status", get(cluster::status))
        .route("/v1/types", get(events::types))
        .route("/v1/blobs", post(blobs::blob_add).get(blobs::blob_list))
        .route(
            "/v1/blobs/upload",
            // A blob is as large as the store takes, not a JSON body.
            post(blobs::blob_upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/blob", get(blobs::blob_info))
        .route("/v1/blob/fetch", post(blobs::blob_fetch))
        .route("/v1/blob/forget", post(blobs::blob_forget))
        .route("/v1/blob/content", get(blobs::blob_content))
        .route("/v1/sync", get(blobs::transfers))
        .route("/v1/debug/block", post(cluster::debug_block))
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
            auth::AuthState {
                node: node.clone(),
                auth,
            },
            auth::check_token,
        ))
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

#[cfg(test)]
mod tests {
    use super::{check_fault_injection, host_allowed};

    #[test]
    fn fault_injection_needs_loopback_or_a_token() {
        let lo: std::net::SocketAddr = "127.0.0.1:7411".parse().unwrap();
        let lo6: std::net::SocketAddr = "[::1]:7411".parse().unwrap();
        let any: std::net::SocketAddr = "0.0.0.0:7411".parse().unwrap();
        let at: std::net::SocketAddr = "10.0.0.5:7411".parse().unwrap();
        for api in [any, at] {
            let e = check_fault_injection(api, true, false).unwrap_err();
            assert!(e.contains("fault injection") && e.contains("token"), "{e}");
            check_fault_injection(api, true, true).unwrap();
            check_fault_injection(api, false, false).unwrap();
        }
        for api in [lo, lo6] {
            check_fault_injection(api, true, false).unwrap();
        }
    }

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
