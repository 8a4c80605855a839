//! `consumer list|show|nack|dead-letters|delete`.

use serde_json::json;

use riftmesh::api::{self, Client};

use super::print_json;
use crate::ConsumerOp;

fn consumer_line(c: &api::ConsumerView) -> String {
    let types = if c.types.is_empty() {
        "*".to_string()
    } else {
        c.types.join(",")
    };
    format!(
        "{:<24} {:<32} {:>8} {:>9}{} {:>6}  {}",
        c.name,
        types,
        c.cursor,
        c.lag,
        if c.lag_exact { " " } else { "+" },
        c.dead_letters,
        c.last_ack.as_deref().unwrap_or("-")
    )
}

/// A host of `/v1/subscriptions` as the table shows it: its name, with
/// the end of its peer id when another host of `peers` has the same name.
fn host_label(peer: &str, name: Option<&str>, names: &[Option<&str>]) -> String {
    match name {
        Some(n) if names.iter().filter(|m| **m == Some(n)).count() > 1 => {
            let tail = &peer[peer.len().saturating_sub(6)..];
            format!("{n}[..{tail}]")
        }
        Some(n) => n.to_string(),
        None => peer.to_string(),
    }
}

/// `consumer list --cluster`: one line per type pattern, its total and
/// each host's count; then the hosts that do not send counts.
fn print_cluster_counts(v: &serde_json::Value) {
    println!("{:<32} {:>6}  HOSTS", "TYPES", "TOTAL");
    if let Some(types) = v["types"].as_object() {
        for (pattern, t) in types {
            let hosts: Vec<String> = t["hosts"]
                .as_object()
                .map(|h| {
                    let names: Vec<Option<&str>> = h.values().map(|c| c["name"].as_str()).collect();
                    h.iter()
                        .map(|(peer, c)| {
                            let label = host_label(peer, c["name"].as_str(), &names);
                            format!("{label}={}", c["count"].as_u64().unwrap_or(0))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut hosts = hosts;
            hosts.sort();
            println!(
                "{:<32} {:>6}  {}",
                pattern,
                t["total"].as_u64().unwrap_or(0),
                hosts.join(" ")
            );
        }
    }
    let without: Vec<&str> = v["hosts_without_counts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h["name"].as_str().or_else(|| h["peer_id"].as_str()))
                .collect()
        })
        .unwrap_or_default();
    if !without.is_empty() {
        println!(
            "no counts from: {} (an older agent, or no health record yet)",
            without.join(", ")
        );
    }
}

/// `riftmesh consumer …`.
pub async fn run(client: &Client, json_out: bool, op: ConsumerOp) -> anyhow::Result<()> {
    let header = format!(
        "{:<24} {:<32} {:>8} {:>10} {:>6}  {}",
        "NAME", "TYPES", "CURSOR", "PENDING", "DEAD", "LAST ACK"
    );
    match op {
        ConsumerOp::List { cluster: true, .. } => {
            let v = client.get("/v1/subscriptions").await?;
            if json_out {
                return print_json(&v);
            }
            print_cluster_counts(&v);
        }
        ConsumerOp::List { .. } => {
            let v = client.get("/v1/consumers").await?;
            if json_out {
                return print_json(&v);
            }
            let cs: Vec<api::ConsumerView> = api::decode(v)?;
            println!("{header}");
            for c in &cs {
                println!("{}", consumer_line(c));
            }
        }
        ConsumerOp::Show { name, .. } => {
            let v = client.get(&format!("/v1/consumers/{name}")).await?;
            if json_out {
                return print_json(&v);
            }
            let c: api::ConsumerView = api::decode(v)?;
            println!("{header}\n{}", consumer_line(&c));
        }
        ConsumerOp::Nack {
            name, seq, reason, ..
        } => {
            let v = client
                .post(
                    &format!("/v1/consumers/{name}/nack"),
                    &json!({ "seq": seq, "reason": reason }),
                )
                .await?;
            if json_out {
                return print_json(&v);
            }
            println!("{name}: event {seq} moved to the dead letters ({reason})");
        }
        ConsumerOp::DeadLetters { name, .. } => {
            let v = client
                .get(&format!("/v1/consumers/{name}/dead-letters"))
                .await?;
            if json_out {
                return print_json(&v);
            }
            let list = v["dead_letters"].as_array().cloned().unwrap_or_default();
            println!("{} dead letter(s) of {name}", list.len());
            for d in list {
                let ev = &d["event"];
                println!(
                    "  {:>8}  {:<28} {}  {}",
                    d["seq"].as_u64().unwrap_or(0),
                    ev["type"].as_str().unwrap_or("(gone)"),
                    ev["id"].as_str().unwrap_or("-"),
                    d["reason"].as_str().unwrap_or("")
                );
            }
        }
        ConsumerOp::Delete { name, .. } => {
            let v = client.delete(&format!("/v1/consumers/{name}")).await?;
            if json_out {
                return print_json(&v);
            }
            println!("deleted consumer {name}");
        }
    }
    Ok(())
}
