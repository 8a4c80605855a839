//! `lock acquire|renew|release|list`, and `lock run` handed to `lockrun`.

use anyhow::Context;
use serde_json::json;

use riftmesh::api::{self, Client};

use super::exit::{self, usage, Classed};
use super::lockrun::{lock_run, waiting_for_lock};
use super::names::{short_id, Names};
use super::print_json;
use super::wait::WaitNote;
use crate::LockOp;

/// `riftmesh lock …`.
pub async fn run(client: &Client, json_out: bool, op: LockOp) -> anyhow::Result<()> {
    match op {
        LockOp::Acquire {
            name,
            ttl,
            holder,
            wait,
            ..
        } => acquire(client, json_out, &name, &ttl, holder, wait).await,
        LockOp::Renew { name, token, .. } => renew(client, json_out, &name, token).await,
        LockOp::Release { name, token, .. } => release(client, json_out, &name, token).await,
        LockOp::List { .. } => list(client, json_out).await,
        LockOp::Run {
            name,
            ttl,
            wait,
            cmd,
            ..
        } => {
            let code = lock_run(client, &name, secs(&ttl, "--ttl")?, wait, &cmd).await?;
            std::process::exit(code);
        }
    }
}

async fn acquire(
    client: &Client,
    json_out: bool,
    name: &str,
    ttl: &str,
    holder: Option<String>,
    wait: bool,
) -> anyhow::Result<()> {
    let ttl = secs(ttl, "--ttl")?;
    let mut body = json!({ "ttl_secs": ttl });
    if let Some(h) = holder {
        body["holder"] = json!(h);
    }
    let path = format!("/v1/locks/{name}/acquire");
    let mut note = WaitNote::new();
    let v = loop {
        match client.post(&path, &body).await {
            Err(api::ClientError::Refused {
                status: status @ (409 | 503),
                message,
            }) if wait => note.tick(|| waiting_for_lock(name, status, &message)),
            other => break other?,
        }
        tokio::time::sleep(std::time::Duration::from_secs_f64(
            (ttl / 6.0).clamp(0.2, 2.0),
        ))
        .await;
    };
    if json_out {
        return print_json(&v);
    }
    println!("{}", v["token"]);
    Ok(())
}

async fn renew(client: &Client, json_out: bool, name: &str, token: u64) -> anyhow::Result<()> {
    let v = client
        .post(
            &format!("/v1/locks/{name}/renew"),
            &json!({ "token": token }),
        )
        .await?;
    if json_out {
        return print_json(&v);
    }
    let exp = v["expires_ms"].as_u64().unwrap_or(0);
    println!(
        "renewed {name} (token {token}) until {}",
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(exp)
        )
    );
    Ok(())
}

async fn release(
    client: &Client,
    json_out: bool,
    name: &str,
    token: Option<u64>,
) -> anyhow::Result<()> {
    let token = match token {
        Some(t) => t,
        None => own_lock_token(client, name).await?,
    };
    let v = client
        .post(
            &format!("/v1/locks/{name}/release"),
            &json!({ "token": token }),
        )
        .await?;
    if json_out {
        return print_json(&v);
    }
    println!("released {name}");
    Ok(())
}

async fn list(client: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = client.get("/v1/locks").await?;
    if json_out {
        return print_json(&v);
    }
    let locks = v["locks"].as_array().cloned().unwrap_or_default();
    if locks.is_empty() {
        println!("no locks held");
        return Ok(());
    }
    let names = Names::fetch(client).await;
    println!(
        "{:<24} {:<32} {:>8}  {:<24} LEFT",
        "NAME", "HOLDER", "TOKEN", "EXPIRES"
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    for l in locks {
        let exp = l["expires_ms"].as_u64().unwrap_or(0);
        println!(
            "{:<24} {:<32} {:>8}  {:<24} {}",
            l["name"].as_str().unwrap_or("?"),
            holder_label(&names, l["holder"].as_str().unwrap_or("?")),
            l["token"],
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(exp)
            ),
            human_left(exp, now_ms)
        );
    }
    Ok(())
}

/// A holder as a person reads it: a member's name with the tail of its
/// peer id (the default holder is the agent's name), a peer id with its
/// member's name, anything else as given.
fn holder_label(names: &Names, holder: &str) -> String {
    if let Some(id) = names.id_of(holder) {
        return format!("{holder} ({})", short_id(id));
    }
    match names.name(holder) {
        Some(_) => names.label(holder),
        None => holder.to_string(),
    }
}

fn secs(s: &str, what: &str) -> anyhow::Result<f64> {
    Ok(riftmesh::config::parse_duration(s)
        .map_err(|e| usage(format!("{what} {s:?}: {e}")))?
        .as_secs_f64())
}

/// "in 25s", "in 3m 10s", or "expired" (by this host's clock).
fn human_left(expires_ms: u64, now_ms: u64) -> String {
    if expires_ms <= now_ms {
        return "expired".into();
    }
    let secs = (expires_ms - now_ms).div_ceil(1000);
    format!(
        "in {}",
        humantime::format_duration(std::time::Duration::from_secs(secs))
    )
}

/// The token of lock `name` if this agent holds it (its holder is this
/// agent's name, the default holder); otherwise an error saying why.
async fn own_lock_token(client: &Client, name: &str) -> anyhow::Result<u64> {
    let me = client.get("/v1/status").await?;
    let me = me["name"].as_str().unwrap_or_default().to_string();
    let v = client.get("/v1/locks").await?;
    let lock = v["locks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["name"].as_str() == Some(name));
    match lock {
        None => Err(Classed {
            code: exit::NOT_FOUND,
            msg: format!("lock {name} is not held"),
        }
        .into()),
        Some(l) if l["holder"].as_str() == Some(me.as_str()) => l["token"]
            .as_u64()
            .context("the lock list has no token for this lock"),
        Some(l) => Err(Classed {
            code: exit::CONFLICT,
            msg: format!(
                "lock {name} is held by {} (token {}), not by this agent ({me}); to release it from here, pass --token",
                l["holder"].as_str().unwrap_or("?"),
                l["token"]
            ),
        }
        .into()),
    }
}
