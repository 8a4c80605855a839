//! Shared by the benches that run real `riftmesh agent` processes on loopback:
//! spawning agents on OS-chosen ports, reading `<data-dir>/agent.json`, HTTP
//! and a few statistics helpers.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Kills every agent it holds when dropped, panics included.
pub struct Agents {
    pub children: Vec<Child>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `riftmesh keygen --out <path>`.
pub fn keygen(bin: &str, path: &Path) -> anyhow::Result<()> {
    let st = Command::new(bin)
        .arg("keygen")
        .arg("--out")
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "riftmesh keygen failed ({st})");
    Ok(())
}

pub fn spawn_agent(
    bin: &str,
    root: &Path,
    name: &str,
    bootstrap: Option<&str>,
) -> anyhow::Result<Child> {
    spawn_agent_with(bin, root, name, bootstrap, &[])
}

/// An agent with data in `<root>/<name>`, the swarm key `<root>/swarm.key`,
/// ports chosen by the OS, no mDNS, its log appended to `<root>/<name>.log`,
/// and `extra` flags.
pub fn spawn_agent_with(
    bin: &str,
    root: &Path,
    name: &str,
    bootstrap: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<Child> {
    spawn_agent_at(bin, root, name, "/ip4/127.0.0.1/tcp/0", bootstrap, extra)
}

/// [`spawn_agent_with`] listening on `listen` (a restarted host keeps its
/// address, as a real one does).
pub fn spawn_agent_at(
    bin: &str,
    root: &Path,
    name: &str,
    listen: &str,
    bootstrap: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<Child> {
    let data = root.join(name);
    std::fs::create_dir_all(&data)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(format!("{name}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.arg("agent")
        .args(["--name", name])
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", listen])
        .args(["--api", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .arg("--swarm-key")
        .arg(root.join("swarm.key"))
        .arg("--no-mdns")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    // Only the flags above configure the agents.
    for (k, _) in std::env::vars() {
        if k.starts_with("RIFTMESH_") {
            cmd.env_remove(k);
        }
    }
    Ok(cmd.spawn()?)
}

pub fn log_tail(root: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(root.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Wait for `<data-dir>/agent.json` written by this very process (its pid);
/// returns the whole record (peer_id, api, metrics, ...).
pub async fn wait_agent_info(
    child: &mut Child,
    root: &Path,
    name: &str,
    deadline: Instant,
    poll: Duration,
) -> anyhow::Result<Value> {
    let path = root.join(name).join("agent.json");
    let pid = u64::from(child.id());
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                if v["pid"].as_u64() == Some(pid)
                    && v["peer_id"].is_string()
                    && v["api"].is_string()
                {
                    return Ok(v);
                }
            }
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "agent {name} exited ({status}) before writing agent.json:\n{}",
                log_tail(root, name)
            );
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "agent {name} did not write {} in time:\n{}",
                path.display(),
                log_tail(root, name)
            );
        }
        tokio::time::sleep(poll).await;
    }
}

/// Wait for `<data-dir>/agent.json`; returns (peer_id, api address).
pub async fn wait_agent_json(
    child: &mut Child,
    root: &Path,
    name: &str,
    deadline: Instant,
) -> anyhow::Result<(String, String)> {
    let v = wait_agent_info(child, root, name, deadline, Duration::from_millis(50)).await?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Ok((s("peer_id"), s("api")))
}

pub async fn http_json(req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let resp = req.send().await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    if !status.is_success() {
        anyhow::bail!("HTTP {status}: {body}");
    }
    Ok(body)
}

pub fn vm_rss_kb(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn verdict(ok: bool) -> String {
    if ok { "met" } else { "missed" }.to_string()
}

/// Sum of a Prometheus metric's samples: lines named exactly `name` (any
/// labels) whose text contains `filter`.
pub fn metric(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// CPU time a process has used, user + system, in clock ticks (`/proc/<pid>/stat`).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) start at
    // field 3 (state); utime and stime are fields 14 and 15.
    let mut f = text.rsplit_once(')')?.1.split_whitespace().skip(11);
    Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when it cannot tell).
pub fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Wall-clock time, unix milliseconds (the clock of the agents' `received_ms`).
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// What a report's header says of its run: the command (with the given
/// prefix's environment variables), the source measured (`git describe
/// --always --dirty`: the work tree may differ from the commit) and the UTC
/// date.
pub fn run_header(env_prefix: &str, bench: &str) -> (String, String, String) {
    let mut vars: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with(env_prefix))
        .map(|(k, v)| format!("{k}={v} "))
        .collect();
    vars.sort();
    let command = format!("{}cargo bench --bench {bench}", vars.concat());
    let out = |cmd: &mut Command| {
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let source = out(Command::new("git").args([
        "-C",
        env!("CARGO_MANIFEST_DIR"),
        "describe",
        "--always",
        "--dirty",
    ]));
    let date = out(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    (command, source, date)
}

/// The directory a bench writes its report files to: `RIFTMESH_BENCH_RESULTS`
/// when set (the report runner, `benches/report.py`, points every bench at its
/// own scratch directory so a short run does not replace the kept reports),
/// else `default`.
pub fn results_dir(default: std::path::PathBuf) -> std::path::PathBuf {
    match std::env::var_os("RIFTMESH_BENCH_RESULTS") {
        Some(d) if !d.is_empty() => std::path::PathBuf::from(d),
        _ => default,
    }
}

/// The benches' event body: ~120 bytes of canonical JSON with a counter, so
/// every event has distinct content (the queue, catch-up and log benches
/// publish the same shape).
pub fn event_payload(i: u64) -> Value {
    serde_json::json!({
        "job": "selfplay/hex8_2p",
        "host": "gpu-node-0007",
        "games": 256,
        "model": "hex8_2p-v00042",
        "batch": format!("b-{i:010}"),
        "i": i,
    })
}
