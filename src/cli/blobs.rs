//! `blob add|list|get|forget` and `sync status` (blob transfers in flight).

use anyhow::{bail, Context};
use serde_json::json;

use riftmesh::api::Client;

use super::exit::usage;
use super::print_json;
use crate::BlobOp;

/// `riftmesh blob …`.
pub async fn run(client: &Client, op: BlobOp, json_out: bool) -> anyhow::Result<()> {
    match op {
        BlobOp::Add {
            file,
            name,
            event,
            source,
            correlation_id,
            parent_id,
            ..
        } => {
            let link = riftmesh::blob::NamingLink {
                source,
                correlation_id,
                parent_id,
            };
            // The CLI reads the file with the caller's permissions and
            // sends its bytes: the agent reads no file for a request
            // (proto-notes/security.md).
            let v = client
                .upload_blob(&file, &name, Some(&event), &link)
                .await
                .with_context(|| format!("cannot add {}", file.display()))?;
            if json_out {
                return print_json(&v);
            }
            println!("{}", v["blob"].as_str().unwrap_or(""));
            eprintln!(
                "{} -> {} bytes in {} chunks ({} in the store), {} {}",
                v["name"].as_str().unwrap_or(""),
                v["size"],
                v["chunks"],
                v["stored"].as_str().unwrap_or(""),
                v["event"].as_str().unwrap_or(""),
                v["event_id"].as_str().unwrap_or("")
            );
        }
        BlobOp::List { .. } => {
            let v = client.get("/v1/blobs").await?;
            if json_out {
                return print_json(&v);
            }
            for b in v["blobs"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{}  {:>14}  {:<8} {}/{}  {}",
                    b["blob"].as_str().unwrap_or(""),
                    b["size"],
                    b["state"].as_str().unwrap_or(""),
                    b["chunks_have"],
                    b["chunks"],
                    b["names"]
                );
            }
            for n in v["names"].as_array().cloned().unwrap_or_default() {
                println!(
                    "name {} -> {} ({} bytes, {}){}",
                    n["name"].as_str().unwrap_or(""),
                    n["blob"].as_str().unwrap_or(""),
                    n["size"],
                    n["event"].as_str().unwrap_or(""),
                    if n["present"] == true {
                        ""
                    } else {
                        "  [not here]"
                    }
                );
            }
            for f in v["forgotten"].as_array().cloned().unwrap_or_default() {
                println!(
                    "forgotten {} (namings up to {} ms retracted)",
                    f["name"].as_str().unwrap_or(""),
                    f["forgotten_ms"]
                );
            }
        }
        BlobOp::Get {
            r, out, timeout, ..
        } => {
            let deadline = std::time::Instant::now()
                + riftmesh::config::parse_duration(&timeout)
                    .map_err(|e| usage(format!("--timeout: {e}")))?;
            let v = client.post("/v1/blob/fetch", &json!({ "ref": r })).await?;
            let mut state = v["state"].as_str().unwrap_or("").to_string();
            while state != "complete" {
                if std::time::Instant::now() > deadline {
                    bail!("gave up waiting for {r} after {timeout}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let i = client.get_query("/v1/blob", &[("ref", r.clone())]).await?;
                state = i["state"].as_str().unwrap_or("").to_string();
                if state == "absent" || state == "partial" {
                    if let Some(f) = i["last_failure"]["reason"].as_str() {
                        bail!("fetch of {r} failed: {f}");
                    }
                }
            }
            let n = client
                .download("/v1/blob/content", &[("ref", r.clone())], &out)
                .await?;
            if json_out {
                return print_json(
                    &json!({ "ref": r, "out": out.display().to_string(), "bytes": n }),
                );
            }
            eprintln!("wrote {n} bytes to {}", out.display());
        }
        BlobOp::Forget { name, .. } => {
            let v = client
                .post("/v1/blob/forget", &json!({ "name": name }))
                .await?;
            if json_out {
                return print_json(&v);
            }
            println!(
                "forgot {} (was {}, {} bytes, named by {} {})",
                v["name"].as_str().unwrap_or(""),
                v["blob"].as_str().unwrap_or(""),
                v["size"],
                v["naming_event"].as_str().unwrap_or(""),
                v["naming_event_id"].as_str().unwrap_or("")
            );
            eprintln!(
                "{} {}: no host fetches it any more; files already placed are left alone",
                v["event"].as_str().unwrap_or(""),
                v["event_id"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// `riftmesh sync status`: blob transfers in flight and recent failures.
pub async fn transfers(client: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = client.get("/v1/sync").await?;
    if json_out {
        return print_json(&v);
    }
    let ts = v["transfers"].as_array().cloned().unwrap_or_default();
    if ts.is_empty() {
        println!("no transfers in flight");
    }
    for t in ts {
        let size = t["size"].as_u64().unwrap_or(0);
        let have = t["have_bytes"].as_u64().unwrap_or(0);
        println!(
            "{}  {}  {} / {} bytes ({:.0}%)  {:.1} MB/s  eta {}  sources {}  [{}]",
            &t["blob"].as_str().unwrap_or("")[..12.min(t["blob"].as_str().unwrap_or("").len())],
            t["names"],
            have,
            size,
            if size > 0 {
                have as f64 * 100.0 / size as f64
            } else {
                100.0
            },
            t["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) / 1e6,
            t["eta_secs"]
                .as_f64()
                .map(|s| format!("{s:.0}s"))
                .unwrap_or_else(|| "-".into()),
            t["sources"].as_array().map_or(0, Vec::len),
            t["state"].as_str().unwrap_or(""),
        );
    }
    for f in v["failures"].as_array().cloned().unwrap_or_default() {
        println!(
            "failed {} {}: {}",
            &f["blob"].as_str().unwrap_or("")[..12.min(f["blob"].as_str().unwrap_or("").len())],
            f["names"],
            f["reason"].as_str().unwrap_or("")
        );
    }
    println!(
        "store {} bytes{}",
        v["store_bytes"],
        v["budget_bytes"]
            .as_u64()
            .map(|b| format!(" of a {b}-byte budget"))
            .unwrap_or_default()
    );
    Ok(())
}
