//! `blob add|list|get|forget` and `sync status` (blob transfers in flight).

use std::io::IsTerminal;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use riftmesh::api::Client;

use super::exit::usage;
use super::lockrun::stop_signal;
use super::names::Names;
use super::progress::Progress;
use super::{print_json, write_stdout};
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
            let progress = Progress::bytes(json_out, &format!("sending {}", file.display()));
            let v = client
                .upload_blob_with(&file, &name, Some(&event), &link, progress.reporter())
                .await
                .with_context(|| format!("cannot add {}", file.display()))?;
            progress.done();
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
            let listed = v["forgotten"].as_array().map_or(0, Vec::len) as u64;
            let count = v["forgotten_count"].as_u64().unwrap_or(listed);
            if count > listed {
                println!("... and {} older retractions", count - listed);
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
            // While the agent fetches from peers: its transfer's bytes; then
            // the download's.
            let progress = Progress::bytes(json_out, &format!("fetching {r}"));
            while state != "complete" {
                if std::time::Instant::now() > deadline {
                    bail!("gave up waiting for {r} after {timeout}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let i = client.get_query("/v1/blob", &[("ref", r.clone())]).await?;
                state = i["state"].as_str().unwrap_or("").to_string();
                let t = &i["transfer"];
                if let (Some(have), Some(size)) = (t["have_bytes"].as_u64(), t["size"].as_u64()) {
                    progress.set(have, size);
                    progress.message(format!(
                        "fetching {r} from {} peer(s)",
                        t["sources"].as_array().map_or(0, Vec::len)
                    ));
                }
                if state == "absent" || state == "partial" {
                    if let Some(f) = i["last_failure"]["reason"].as_str() {
                        bail!("fetch of {r} failed: {f}");
                    }
                }
            }
            progress.restart(format!("writing {}", out.display()));
            let n = client
                .download_with(
                    "/v1/blob/content",
                    &[("ref", r.clone())],
                    &out,
                    progress.reporter(),
                )
                .await?;
            progress.done();
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

/// `riftmesh sync status`: blob transfers in flight and recent failures;
/// with `watch`, again every `watch` interval until SIGINT or SIGTERM
/// (exit 0). On a terminal the table is redrawn in place; on a pipe each
/// refresh is a new table after a `---` line (JSON: one object a line).
pub async fn transfers(
    client: &Client,
    json_out: bool,
    watch: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let Some(every) = watch else {
        let v = client.get("/v1/sync").await?;
        if json_out {
            return print_json(&v);
        }
        let names = Names::fetch(client).await;
        return write_stdout(transfers_table(&v, &names).as_bytes());
    };
    if every < std::time::Duration::from_millis(100) {
        return Err(usage("--interval: at least 100ms"));
    }
    let redraw = !json_out && std::io::stdout().is_terminal();
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let refresh = async {
            let v = client.get("/v1/sync").await?;
            let names = if json_out {
                Names::default()
            } else {
                Names::fetch(client).await
            };
            Ok::<_, anyhow::Error>((v, names))
        };
        let got = tokio::select! {
            got = refresh => got,
            _ = &mut stop => return Ok(()),
        };
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let every_h = humantime::format_duration(every);
        let text = match got {
            Ok((v, _)) if json_out => format!("{}\n", serde_json::to_string(&v)?),
            Ok((v, names)) if redraw => format!(
                "\x1b[H\x1b[2J--- sync status at {now} (every {every_h}; ctrl-c to stop)\n{}",
                transfers_table(&v, &names)
            ),
            Ok((v, names)) => format!("--- sync status at {now}\n{}", transfers_table(&v, &names)),
            // The agent restarting is no reason to stop watching.
            Err(e) => {
                eprintln!("riftmesh: {e:#}");
                String::new()
            }
        };
        write_stdout(text.as_bytes())?;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}

/// The `sync status` table of a `GET /v1/sync` answer, sources by name.
fn transfers_table(v: &Value, names: &Names) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let ts = v["transfers"].as_array().cloned().unwrap_or_default();
    if ts.is_empty() {
        o.push_str("no transfers in flight\n");
    }
    for t in ts {
        let size = t["size"].as_u64().unwrap_or(0);
        let have = t["have_bytes"].as_u64().unwrap_or(0);
        let sources: Vec<String> = t["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|id| names.name_or_short(id))
            .collect();
        let _ = writeln!(
            o,
            "{}  {}  {} / {} bytes ({:.0}%)  {:.1} MB/s  eta {}  sources {} [{}]  [{}]",
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
            sources.len(),
            sources.join(","),
            t["state"].as_str().unwrap_or(""),
        );
        if let Some(p) = t["last_problem"].as_object() {
            let _ = writeln!(
                o,
                "  last problem: chunk {} from {}: {}",
                p.get("chunk").and_then(Value::as_u64).unwrap_or(0),
                names.name_or_short(p.get("peer").and_then(Value::as_str).unwrap_or("")),
                p.get("reason").and_then(Value::as_str).unwrap_or("")
            );
        }
    }
    for f in v["failures"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            o,
            "failed {} {}: {}",
            &f["blob"].as_str().unwrap_or("")[..12.min(f["blob"].as_str().unwrap_or("").len())],
            f["names"],
            f["reason"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        o,
        "store {} bytes{}",
        v["store_bytes"],
        v["budget_bytes"]
            .as_u64()
            .map(|b| format!(" of a {b}-byte budget"))
            .unwrap_or_default()
    );
    o
}
