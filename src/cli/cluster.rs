//! `peers`, `members`, `report`, `leader`, `leave`, `status`: the cluster
//! as the local agent sees it.

use serde_json::{json, Value};

use riftmesh::api::Client;

use super::exit::usage;
use super::names::{short_id, Names};
use super::print_json;

/// `riftmesh peers`.
pub async fn peers(client: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = client.get("/v1/peers").await?;
    if json_out {
        return print_json(&v);
    }
    let names = Names::fetch(client).await;
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    let me = v["peer_id"].as_str().unwrap_or("?");
    println!(
        "{} peer(s) connected to {} {me}",
        peers.len(),
        names.name(me).unwrap_or("this agent"),
    );
    for p in peers {
        let id = p["peer_id"].as_str().unwrap_or("?");
        println!(
            "  {:<28} {}  {}  {}  rtt={}  up {}s  {}",
            names.label(id),
            id,
            p["agent_version"].as_str().unwrap_or("-"),
            p["via"].as_str().unwrap_or("-"),
            p["rtt_ms"]
                .as_f64()
                .map(|r| format!("{r:.1}ms"))
                .unwrap_or_else(|| "-".into()),
            p["connected_secs"],
            p["addresses"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `riftmesh members`.
pub async fn members(client: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = client.get("/v1/members").await?;
    if json_out {
        return print_json(&v);
    }
    print_members(&v);
    Ok(())
}

/// `riftmesh report NAME=VALUE…`: job counters or gauges of this host.
pub async fn report(
    client: &Client,
    json_out: bool,
    values: Vec<String>,
    ttl: Option<String>,
) -> anyhow::Result<()> {
    let mut jobs = serde_json::Map::new();
    for kv in values {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(usage(format!(
                "{kv:?}: write NAME=VALUE (or NAME= to remove)"
            )));
        };
        let value = if v.trim().is_empty() {
            Value::Null
        } else {
            let n: f64 = v
                .trim()
                .parse()
                .map_err(|_| usage(format!("{kv:?}: the value is not a number")))?;
            json!(n)
        };
        jobs.insert(k.trim().to_string(), value);
    }
    let ttl_secs = match ttl {
        Some(t) => Some(
            riftmesh::config::parse_duration(&t)
                .map_err(|e| usage(format!("--ttl {t:?}: {e}")))?
                .as_secs(),
        ),
        None => None,
    };
    let v = client
        .post("/v1/jobs", &json!({ "jobs": jobs, "ttl_secs": ttl_secs }))
        .await?;
    if json_out {
        return print_json(&v);
    }
    println!("jobs now: {}", v["jobs"]);
    Ok(())
}

/// `riftmesh leader`.
pub async fn leader(client: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = client.get("/v1/leader").await?;
    if json_out {
        return print_json(&v);
    }
    if let Some(note) = v["note"].as_str() {
        println!("note       {note}");
    }
    match v["leader"].as_str() {
        Some(l) => {
            println!(
                "leader     {l}{}",
                if v["is_self"] == true {
                    "  (this agent)"
                } else {
                    ""
                }
            );
            println!(
                "peer id    {}",
                v["leader_peer_id"]
                    .as_str()
                    .map(|id| format!("{id} ({l} {})", short_id(id)))
                    .unwrap_or_else(|| "-".into())
            );
            println!("term       {}", v["term"]);
            if let Some(ms) = v["since_ms"].as_u64() {
                println!(
                    "since      {}",
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
                    )
                );
            }
        }
        None => println!("leader     none known"),
    }
    println!(
        "voters     {}   this agent: {}",
        v["voters"],
        v["role"].as_str().unwrap_or("?")
    );
    if v["voter_list_mismatch"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        println!(
            "WARNING    members with another voter list: {}",
            v["voter_list_mismatch"]
        );
    }
    Ok(())
}

/// `riftmesh leave`.
pub async fn leave(client: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = client.post("/v1/leave", &json!({})).await?;
    if json_out {
        return print_json(&v);
    }
    println!(
        "left the cluster at incarnation {} ({} of {} peers acknowledged); the agent is stopping",
        v["incarnation"], v["peers_acked"], v["peers_told"]
    );
    Ok(())
}

/// `riftmesh status`.
pub async fn status(client: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = client.get("/v1/status").await?;
    if json_out {
        return print_json(&v);
    }
    println!("name       {}", v["name"].as_str().unwrap_or("?"));
    println!("peer id    {}", v["peer_id"].as_str().unwrap_or("?"));
    println!(
        "version    {}   up {}s",
        v["version"].as_str().unwrap_or("?"),
        v["uptime_secs"]
    );
    println!("listening  {}", v["listen_addrs"]);
    println!("peers      {} connected", v["connected_peers"]);
    let r = &v["reach"];
    if let Some(state) = r["state"].as_str() {
        let list = |k: &str, f: fn(&str) -> String| {
            r[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(f)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        match state {
            "private" => println!(
                "reach      private: peers dial it through relays ({})",
                list("relays", short_id)
            ),
            "public" => println!("reach      public at {}", list("external", str::to_string)),
            other => println!("reach      {other} (not tested yet)"),
        }
    }
    let s = &v["store"];
    println!(
        "store      {} events (seq {}..{}), {} bytes at {}",
        s["events"],
        s["first_seq"],
        s["head_seq"],
        s["size_bytes"],
        s["path"].as_str().unwrap_or("?")
    );
    if s["state"]["writable"] == false {
        println!(
            "store      READ-ONLY: {}",
            s["state"]["read_only_reason"].as_str().unwrap_or("?")
        );
    }
    let consumers = v["consumers"].as_array().cloned().unwrap_or_default();
    println!("consumers  {}", consumers.len());
    for c in consumers {
        println!(
            "  {:<20} lag {:<8} cursor {:<8} dead letters {:<4} types {}",
            c["name"].as_str().unwrap_or("?"),
            c["lag"],
            c["cursor"],
            c["dead_letters"],
            c["types"]
        );
    }
    Ok(())
}

fn fmt_bytes(b: u64) -> String {
    const G: f64 = 1024.0 * 1024.0 * 1024.0;
    format!("{:.1}G", b as f64 / G)
}

fn print_members(v: &Value) {
    let members = v["members"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<16} {:<9} {:<8} {:<8} {:<21} {:<12} {:>6} {:>8} {:>5} {:>6} {:>13} {:>13}  {:<28} jobs / tags",
        "NAME",
        "PEER",
        "STATE",
        "VERSION",
        "ADDRESS",
        "VIA",
        "HEARD",
        "RTT",
        "CPUS",
        "CPU%",
        "MEM used/tot",
        "DISK free/tot",
        "GPU"
    );
    for m in members {
        let h = &m["health"];
        let heard = match m["last_heard_ms_ago"].as_u64() {
            _ if m["is_self"].as_bool() == Some(true) => "self".to_string(),
            Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
            None => "-".into(),
        };
        let rtt = m["rtt_ms"]
            .as_f64()
            .map(|r| format!("{r:.1}ms"))
            .unwrap_or_else(|| "-".into());
        let gpu = match (&h["gpu"]["present"], &h["gpu"]["absent"]) {
            (Value::Array(g), _) if !g.is_empty() => format!(
                "{}x {} {}%",
                g.len(),
                g[0]["name"].as_str().unwrap_or("?"),
                g.iter()
                    .filter_map(|x| x["util_pct"].as_f64())
                    .map(|u| format!("{u:.0}"))
                    .collect::<Vec<_>>()
                    .join("/")
            ),
            (_, Value::String(why)) => format!("none ({why})"),
            _ => "-".into(),
        };
        let kv = |o: &Value| {
            o.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            format!(
                                "{k}={}",
                                v.as_str()
                                    .map(String::from)
                                    .unwrap_or_else(|| v.to_string())
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let version = m["agent_version"]
            .as_str()
            .map(|v| v.strip_prefix("riftmesh/").unwrap_or(v).to_string())
            .unwrap_or_else(|| "-".into());
        let address = m["addresses"]
            .as_array()
            .and_then(|a| a.iter().filter_map(Value::as_str).map(host_port).next())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:<9} {:<8} {:<8} {:<21} {:<12} {:>6} {:>8} {:>5} {:>6} {:>13} {:>13}  {:<28} {} {}",
            m["name"].as_str().unwrap_or("?"),
            short_id(m["peer_id"].as_str().unwrap_or("?")),
            m["state"].as_str().unwrap_or("?"),
            version,
            address,
            match m["via"].as_str() {
                _ if m["is_self"].as_bool() == Some(true) => "self",
                Some(v) => v,
                None => "-",
            },
            heard,
            rtt,
            h["cpu_count"]
                .as_u64()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            h["cpu_use_pct"]
                .as_f64()
                .map(|c| format!("{c:.0}"))
                .unwrap_or_else(|| "-".into()),
            format!(
                "{}/{}",
                fmt_bytes(h["mem_used_bytes"].as_u64().unwrap_or(0)),
                fmt_bytes(h["mem_total_bytes"].as_u64().unwrap_or(0))
            ),
            format!(
                "{}/{}",
                fmt_bytes(h["disk_free_bytes"].as_u64().unwrap_or(0)),
                fmt_bytes(h["disk_total_bytes"].as_u64().unwrap_or(0))
            ),
            gpu,
            kv(&m["jobs"]),
            kv(&m["tags"]),
        );
    }
}

/// `/ip4/10.0.0.7/tcp/4001` as `10.0.0.7:4001`; other addresses as they are.
fn host_port(addr: &str) -> String {
    let parts: Vec<&str> = addr.split('/').collect();
    match parts.as_slice() {
        ["", "ip4" | "dns" | "dns4" | "dns6", host, "tcp" | "udp", port, ..] => {
            format!("{host}:{port}")
        }
        ["", "ip6", host, "tcp" | "udp", port, ..] => format!("[{host}]:{port}"),
        _ => addr.to_string(),
    }
}
