//! `riftmesh agent`: start a node, the API and /metrics listeners, and run
//! until SIGINT/SIGTERM.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use serde_json::json;

use crate::config::AgentConfig;
use crate::node::{write_private, Node};

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // The API's token and the fault-injection gate first: a bad token file
    // or an unguarded fault injection stops the agent before it binds or
    // opens anything.
    let token = crate::keys::load_api_token(&cfg)?;
    crate::api::check_fault_injection(cfg.api, cfg.fault_injection, token.is_some())
        .map_err(anyhow::Error::msg)?;
    let mut registry = Registry::default();
    let api_listener = tokio::net::TcpListener::bind(cfg.api).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for the local API on {}: {e} (set --api)",
            cfg.api
        )
    })?;
    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for /metrics on {}: {e} (set --metrics)",
                cfg.metrics
            )
        })?;
    let node = Node::start(cfg.clone(), &mut registry)?;
    let api_addr = api_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    if let Some(t) = &token {
        tracing::info!(%api_addr, token_file = %t.path.display(), "the local API takes only requests with `Authorization: Bearer <token>` (GET /v1/health without it: up or not)");
        if cfg.fault_injection {
            tracing::warn!(%api_addr, "fault injection is on: anyone with the API token can cut this agent off from its peers");
        }
    }
    tracing::info!(
        name = %cfg.name,
        peer_id = %node.peer_id(),
        data_dir = %cfg.data_dir.display(),
        api = %format!("http://{api_addr}"),
        metrics = %format!("http://{metrics_addr}/metrics"),
        listen = ?cfg.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        bootstrap = ?cfg.bootstrap.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        mdns = cfg.mdns,
        "riftmesh agent started"
    );
    // Where everything is, for scripts and tests (ports may have been 0).
    let info = json!({
        "name": cfg.name,
        "peer_id": node.peer_id(),
        "pid": std::process::id(),
        "api": api_addr.to_string(),
        "metrics": metrics_addr.to_string(),
    });
    let info_path = cfg.data_dir.join("agent.json");
    write_private(&info_path, info.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", info_path.display()))?;

    if cfg.bootstrap.is_empty() && !cfg.alone_warning_after.is_zero() {
        tokio::spawn(warn_if_alone(
            node.clone(),
            cfg.alone_warning_after,
            cfg.mdns,
        ));
    }

    let registry = Arc::new(registry);
    tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve(metrics_listener, registry).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    let auth = Arc::new(crate::api::ApiAuth::new(token));
    let a2 = auth.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::limits::LOG_SUMMARY_EVERY);
        loop {
            tick.tick().await;
            a2.maintain();
        }
    });
    // The peer's address reaches the token check (refusals are logged once
    // per address).
    let app = crate::api::router(node.clone(), auth)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let n = node.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => {
                // SIGTERM / Ctrl-C: a graceful leave, so peers mark us `left`
                // at once instead of suspecting us.
                tracing::info!("stop signal: leaving the cluster");
                if tokio::time::timeout(std::time::Duration::from_secs(5), n.membership().leave()).await.is_err() {
                    tracing::warn!("leave did not finish in 5 s; stopping anyway");
                }
            }
            _ = n.stop_signal().notified() => {}
        }
    };
    let stopping = Arc::new(tokio::sync::Notify::new());
    let s2 = stopping.clone();
    let shutdown = async move {
        shutdown.await;
        s2.notify_one();
    };
    let server = axum::serve(api_listener, app).with_graceful_shutdown(shutdown);
    // Connections still open 10 s after the stop (a stalled upload, a
    // long poll) do not hold the agent up.
    tokio::select! {
        r = std::future::IntoFuture::into_future(server) => r?,
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        } => tracing::warn!("local API connections still open 10 s after the stop; closing them"),
    }
    tracing::info!("riftmesh agent stopping");
    // In order: the parts' tasks, Raft, the swarm, a last store commit.
    if tokio::time::timeout(std::time::Duration::from_secs(10), node.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("the agent's parts did not stop within 10 s; exiting anyway");
    }
    Ok(())
}

/// An agent with no bootstrap address that has found no peer after `after`
/// says so, once, with the fix: a default configuration on a network that
/// drops multicast (most clouds) forms a cluster of one without a word.
async fn warn_if_alone(node: Arc<Node>, after: std::time::Duration, mdns: bool) {
    tokio::time::sleep(after).await;
    let alone = node.net().peers().await.is_ok_and(|p| p.is_empty());
    if !alone {
        return;
    }
    let how = if mdns {
        "mDNS found no peer on this network (cloud networks usually drop multicast)"
    } else {
        "mDNS is off"
    };
    tracing::warn!(
        after = %humantime::format_duration(after),
        mdns,
        "no bootstrap address and no peer: this agent is a cluster of one ({how}). \
         To join a cluster, set bootstrap = [\"/ip4/<peer-address>/tcp/4001\"] in the \
         config (or --bootstrap / RIFTMESH_BOOTSTRAP) to one or more running hosts; \
         if this host is the first, start the others with its address \
         (alone_warning_after = \"0s\" silences this)"
    );
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
