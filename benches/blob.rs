//! Blob sync benchmark: `cargo bench --bench blob`.
//!
//! On this machine, in one run:
//! (1) the disk: `dd if=/dev/zero bs=4M conv=fdatasync` of the blob's size;
//! (2) `scp` of the same file over loopback to a throwaway `sshd` (when
//!     openssh-server is installed; scp does not fsync);
//! (3) `riftmesh blob add` of the file (hash + copy into the store);
//! (4) one agent to another: from the naming event's publication until the
//!     file is verified and placed at the receiver, with the receiver's
//!     resident memory sampled every 50 ms;
//! (5) `kill -9` of a third receiver at half way, restart, and how many
//!     chunks it fetched again (received before the kill, not recorded);
//! (6) fan-out: a blob of a quarter the size to N fresh receivers at once
//!     (RIFTMESH_BENCH_FANOUT, 9; 0 skips), and the share of the bytes the
//!     origin served (the rest came from receivers serving each other).
//!
//! Environment: RIFTMESH_BENCH_BLOB_MIB (1024), RIFTMESH_BENCH_KEEP (keep
//! the directory and logs). Writes benches/results/blob.txt and blob.json.

mod common;
mod stack;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{
    clock_ticks_per_sec, cpu_ticks, http_json, keygen, metric, spawn_agent_with, vm_rss_kb,
    wait_agent_info, Agents,
};

const CHUNK: u64 = 1 << 20;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn write_random(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    f.get_ref().sync_all()
}

/// Log lines without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// Time `dd` writing `bytes` with fdatasync.
fn dd(dir: &Path, bytes: u64) -> Option<f64> {
    let out = dir.join("dd.bin");
    let t = Instant::now();
    let st = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", out.display()))
        .arg("bs=4M")
        .arg(format!("count={}", bytes.div_ceil(4 << 20)))
        .arg("conv=fdatasync")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    st.success().then_some(secs)
}

/// scp over loopback through a private sshd; Err says why not.
fn scp(dir: &Path, src: &Path) -> Result<f64, String> {
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("sshd not installed (apt-get install openssh-server)")?;
    let d = dir.join("ssh");
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let keygen = |path: &Path| {
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
            .map_err(|e| e.to_string())
    };
    keygen(&d.join("host"))?;
    keygen(&d.join("user"))?;
    std::fs::copy(d.join("user.pub"), d.join("authorized_keys")).map_err(|e| e.to_string())?;
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = 22000 + (std::process::id() % 1000) as u16;
    let mut server = Command::new(sshd)
        .args(["-D", "-e", "-p", &port.to_string(), "-h"])
        .arg(d.join("host"))
        .arg("-o")
        .arg(format!(
            "AuthorizedKeysFile={}",
            d.join("authorized_keys").display()
        ))
        .args([
            "-o",
            "ListenAddress=127.0.0.1",
            "-o",
            "PidFile=none",
            "-o",
            "StrictModes=no",
            "-o",
            "PermitRootLogin=yes",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let dst = dir.join("scp.bin");
    let run = || {
        Command::new("scp")
            .args(["-q", "-P", &port.to_string(), "-i"])
            .arg(d.join("user"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
            ])
            .arg(src)
            .arg(format!("root@127.0.0.1:{}", dst.display()))
            .status()
    };
    // sshd needs a moment to listen: retry a few times.
    let mut res = Err("scp never ran".to_string());
    for _ in 0..20 {
        let t = Instant::now();
        match run() {
            Ok(st) if st.success() => {
                res = Ok(t.elapsed().as_secs_f64());
                break;
            }
            Ok(st) => res = Err(format!("scp failed: {st}")),
            Err(e) => res = Err(e.to_string()),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_file(&dst);
    res
}

struct Node {
    name: String,
    api: String,
    metrics: String,
    pid: u32,
}

async fn start(
    bin: &str,
    root: &Path,
    name: &str,
    boot: Option<&str>,
    config: &str,
    agents: &mut Agents,
) -> anyhow::Result<(Node, String)> {
    let cfg = root.join(format!("{name}.toml"));
    // The bench's files live under its root: the agent may read them by path.
    std::fs::write(
        &cfg,
        format!("blob_roots = [{:?}]\n{config}", root.display().to_string()),
    )?;
    let mut child = spawn_agent_with(
        bin,
        root,
        name,
        boot,
        &["--config", cfg.to_str().unwrap_or("")],
    )?;
    let v = wait_agent_info(
        &mut child,
        root,
        name,
        Instant::now() + Duration::from_secs(60),
        Duration::from_millis(50),
    )
    .await?;
    let pid = child.id();
    agents.children.push(child);
    let api = format!("http://{}", v["api"].as_str().unwrap_or_default());
    let http = reqwest::Client::new();
    let addr = loop {
        let st = http_json(http.get(format!("{api}/v1/status"))).await?;
        if let Some(a) = st["listen_addrs"][0].as_str() {
            break format!("{a}/p2p/{}", v["peer_id"].as_str().unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok((
        Node {
            name: name.into(),
            api,
            metrics: format!(
                "http://{}/metrics",
                v["metrics"].as_str().unwrap_or_default()
            ),
            pid,
        },
        addr,
    ))
}

fn want(root: &Path, name: &str) -> String {
    want_of(root, name, "models/*")
}

fn want_of(root: &Path, name: &str, pattern: &str) -> String {
    format!(
        "[[want]]\nnames = \"{pattern}\"\nplace = \"{}/{{name}}.bin\"\n",
        root.join(format!("{name}-placed")).display()
    )
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http_json(http.get(url)).await.unwrap_or(Value::Null)
}

#[derive(Default)]
struct Report {
    bytes: u64,
    dd_secs: Option<f64>,
    scp: Option<Result<f64, String>>,
    add_secs: f64,
    transfer_secs: f64,
    end_to_end_secs: f64,
    rss_max_kb: u64,
    rss_idle_kb: u64,
    refetched_chunks: Option<f64>,
    held_at_restart: Option<u64>,
    in_flight_per_source: u64,
    chunk: u64,
    fetched_after_restart_ok: bool,
    cpu_sender: f64,
    cpu_receiver: f64,
    fan: usize,
    fan_bytes: u64,
    fan_all_secs: f64,
    fan_origin_share: f64,
    /// (row, seconds, CPU seconds of both ends)
    ceiling: Vec<(String, f64, f64)>,
    /// Which row of `ceiling` is the agent's whole stack (the target's).
    stack_row: usize,
    /// Both hashes of every chunk (its own and the whole file's), over
    /// SHA_BENCH_BYTES in memory: (one after the other, in one pass) in s.
    sha_secs: (f64, f64),
    error: Option<String>,
}

/// Bytes of the hashing rows (in memory, 1 MiB chunks).
const SHA_BENCH_BYTES: usize = 256 << 20;

/// Seconds to give every 1 MiB chunk of SHA_BENCH_BYTES its own SHA-256 and
/// feed the whole-content one: two sha2 passes, then the one pass the agent
/// makes (blob::sha); the best of three runs each.
fn sha_both() -> (f64, f64) {
    use riftmesh::blob::sha::{chunk_and_whole, Running};
    use sha2::{Digest, Sha256};
    let data: Vec<u8> = (0..SHA_BENCH_BYTES)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3])
        .collect();
    let best = |f: &dyn Fn() -> [u8; 32]| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let two = best(&|| {
        let mut whole = Sha256::new();
        let mut x = [0u8; 32];
        for c in data.chunks(1 << 20) {
            whole.update(c);
            x[0] ^= Sha256::digest(c)[0];
        }
        std::hint::black_box(x);
        whole.finalize().into()
    });
    let one = best(&|| {
        let mut whole = Running::new();
        let mut x = [0u8; 32];
        for c in data.chunks(1 << 20) {
            x[0] ^= chunk_and_whole(c, &mut whole)[0];
        }
        std::hint::black_box(x);
        whole.finalize()
    });
    (two, one)
}

async fn run(root: &Path, bytes: u64, r: &mut Report) -> anyhow::Result<()> {
    let bin = env!("CARGO_BIN_EXE_riftmesh");
    let mut agents = Agents {
        children: Vec::new(),
    };
    keygen(bin, &root.join("swarm.key"))?;
    r.bytes = bytes;
    r.in_flight_per_source = 8;
    r.dd_secs = dd(root, bytes);
    r.sha_secs = sha_both();
    // (2b) the transport's ceiling, layer by layer, before any agent runs;
    // with the CPU seconds this process (both ends) spent on each.
    let me = std::process::id();
    let tck = clock_ticks_per_sec();
    let mut measure = |name: &str, secs: f64, c0: Option<u64>| {
        let cpu = match (c0, cpu_ticks(me)) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / tck,
            _ => f64::NAN,
        };
        r.ceiling.push((name.to_string(), secs, cpu));
        r.ceiling.len() - 1
    };
    let c = cpu_ticks(me);
    measure("transport ceiling: plain TCP", stack::tcp(bytes).await?, c);
    let c = cpu_ticks(me);
    measure(
        "  + pnet, libp2p-pnet's (pure-Rust XSalsa20)",
        stack::libp2p_pnet(bytes).await?,
        c,
    );
    let c = cpu_ticks(me);
    measure(
        "  + pnet, ours (libsodium XSalsa20)",
        stack::pnet(bytes).await?,
        c,
    );
    let c = cpu_ticks(me);
    measure(
        "  + Noise (ChaCha20-Poly1305)",
        stack::pnet_noise(bytes).await?,
        c,
    );
    let c = cpu_ticks(me);
    measure(
        "  + Yamux, 16 KiB frames (libp2p-yamux), request-response",
        stack::stack(
            bytes,
            CHUNK as usize,
            r.in_flight_per_source as usize,
            16 * 1024,
        )
        .await?,
        c,
    );
    let c = cpu_ticks(me);
    let stack_row = measure(
        "  + Yamux, 60 KiB frames: the agent's stack",
        stack::stack(
            bytes,
            CHUNK as usize,
            r.in_flight_per_source as usize,
            riftmesh::mux::DEFAULT_FRAME_BYTES,
        )
        .await?,
        c,
    );
    #[cfg(feature = "bench-quic")]
    for (name, mtu) in [
        ("QUIC instead (libp2p-quic, AES-GCM), not the agent's", None),
        ("  the same, path MTU up to 65000 (loopback)", Some(65000)),
    ] {
        let c = cpu_ticks(me);
        measure(
            name,
            stack::quic(bytes, CHUNK as usize, r.in_flight_per_source as usize, mtu).await?,
            c,
        );
    }
    r.stack_row = stack_row;
    if std::env::var("RIFTMESH_BENCH_ONLY").as_deref() == Ok("stack") {
        for (name, secs, cpu) in &r.ceiling {
            println!(
                "{name:<60} {:>6.0} MB/s  {cpu:.1} CPU-s",
                mbps(r.bytes, *secs)
            );
        }
        return Ok(());
    }
    let src = root.join("model.bin");
    write_random(&src, bytes)?;
    r.scp = Some(scp(root, &src));

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let chunk_cfg = std::env::var("RIFTMESH_BENCH_CHUNK")
        .map(|c| format!("blob_chunk_size = \"{c}\"\n"))
        .unwrap_or_default();
    let (a0, boot) = start(bin, root, "a0", None, &chunk_cfg, &mut agents).await?;
    let (a1, _) = start(bin, root, "a1", Some(&boot), &want(root, "a1"), &mut agents).await?;
    // Connected?
    let t = Instant::now();
    while get(&http, format!("{}/v1/status", a1.api)).await["connected_peers"]
        .as_u64()
        .unwrap_or(0)
        < 1
    {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "a1 never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.rss_idle_kb = vm_rss_kb(a1.pid).unwrap_or(0);

    // (3) add, (4) transfer.
    let t0 = Instant::now();
    let added = http_json(http.post(format!("{}/v1/blobs", a0.api)).json(&json!({
        "path": src.display().to_string(), "name": "models/bench", "event": "MODEL_PROMOTED"
    })))
    .await?;
    r.add_secs = t0.elapsed().as_secs_f64();
    let id = added["blob"].as_str().unwrap_or_default().to_string();
    let chunk = added["chunk_size"].as_u64().unwrap_or(CHUNK);
    r.chunk = chunk;
    let t1 = Instant::now();
    let cpu0 = (cpu_ticks(a0.pid), cpu_ticks(a1.pid));
    let placed = root.join("a1-placed/bench.bin");
    loop {
        if let Some(kb) = vm_rss_kb(a1.pid) {
            r.rss_max_kb = r.rss_max_kb.max(kb);
        }
        let v = get(&http, format!("{}/v1/blob?ref={id}", a1.api)).await;
        if v["state"] == "complete" && placed.exists() {
            break;
        }
        if let Some(f) = v["last_failure"]["reason"].as_str() {
            anyhow::bail!("a1's fetch failed: {f}");
        }
        anyhow::ensure!(
            t1.elapsed() < Duration::from_secs(900),
            "a1 never got the blob"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.end_to_end_secs = t1.elapsed().as_secs_f64();
    let hz = clock_ticks_per_sec();
    if let ((Some(s0), Some(r0)), Some(s1), Some(r1)) = (cpu0, cpu_ticks(a0.pid), cpu_ticks(a1.pid))
    {
        r.cpu_sender = (s1 - s0) as f64 / hz;
        r.cpu_receiver = (r1 - r0) as f64 / hz;
    }
    let evs = get(
        &http,
        format!("{}/v1/events?types=MODEL_DISTRIBUTED&limit=10", a1.api),
    )
    .await;
    r.transfer_secs = evs["events"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["source"] == "riftmesh/sync"))
        .and_then(|e| {
            let p: Value = match &e["payload"] {
                Value::String(s) => serde_json::from_str(s).ok()?,
                v => v.clone(),
            };
            p["seconds"].as_f64()
        })
        .unwrap_or(f64::NAN);

    // (5) kill a receiver at half way.
    let (a2, _) = start(bin, root, "a2", Some(&boot), &want(root, "a2"), &mut agents).await?;
    let chunks = bytes.div_ceil(chunk);
    let t2 = Instant::now();
    loop {
        let v = get(&http, format!("{}/v1/blob?ref={id}", a2.api)).await;
        if v["chunks_have"].as_u64().unwrap_or(0) * 2 >= chunks {
            break;
        }
        anyhow::ensure!(
            t2.elapsed() < Duration::from_secs(900),
            "a2 never got half way"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Verified chunks received so far, read just before the kill (a chunk
    // or two may still land in between: the figure below is then a little
    // low).
    let received = metric(
        &reqwest::get(&a2.metrics).await?.text().await?,
        "riftmesh_sync_bytes_total",
        "direction=\"in\"",
    );
    let idx = agents.children.len() - 1;
    let _ = agents.children[idx].kill();
    let _ = agents.children[idx].wait();
    let cfg = root.join("a2.toml");
    let mut child = spawn_agent_with(
        bin,
        root,
        "a2",
        Some(&boot),
        &["--config", cfg.to_str().unwrap_or("")],
    )?;
    let v = wait_agent_info(
        &mut child,
        root,
        "a2",
        Instant::now() + Duration::from_secs(60),
        Duration::from_millis(50),
    )
    .await?;
    agents.children[idx] = child;
    let a2 = Node {
        api: format!("http://{}", v["api"].as_str().unwrap_or_default()),
        metrics: format!(
            "http://{}/metrics",
            v["metrics"].as_str().unwrap_or_default()
        ),
        ..a2
    };
    let placed2 = root.join("a2-placed/bench.bin");
    let t3 = Instant::now();
    while !placed2.exists() {
        anyhow::ensure!(
            t3.elapsed() < Duration::from_secs(900),
            "a2 never finished after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(root.join("a2.log")).unwrap_or_default();
    let held = strip_ansi(&log)
        .lines()
        .rev()
        .find(|l| l.contains("resuming a fetch"))
        .and_then(|l| {
            let s = l.split("held=").nth(1)?;
            s.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        });
    r.held_at_restart = held;
    let text = reqwest::get(&a2.metrics).await?.text().await?;
    let fetched = metric(&text, "riftmesh_sync_bytes_total", "direction=\"in\"");
    if let Some(h) = held {
        // Received before the kill but not recorded: fetched again.
        r.refetched_chunks = Some((received / chunk as f64 - h as f64).max(0.0));
        let missing = bytes.saturating_sub(h * chunk) as f64;
        r.fetched_after_restart_ok = (fetched - missing).abs() < chunk as f64;
    }
    let _ = (&a0.name, &a1.name, &a2.name);

    // (6) fan-out: a second blob from a0 to N fresh receivers at once.
    let fan = env_num("RIFTMESH_BENCH_FANOUT", 9) as usize;
    if fan > 0 {
        let mut rx = Vec::new();
        for i in 0..fan {
            let name = format!("f{i}");
            let (n, _) = start(
                bin,
                root,
                &name,
                Some(&boot),
                // Only the fan-out blob, not the earlier ones under models/.
                &want_of(root, &name, "fan/*"),
                &mut agents,
            )
            .await?;
            rx.push(n);
        }
        for n in &rx {
            let t = Instant::now();
            while get(&http, format!("{}/v1/status", n.api)).await["connected_peers"]
                .as_u64()
                .unwrap_or(0)
                < fan as u64
            {
                anyhow::ensure!(
                    t.elapsed() < Duration::from_secs(60),
                    "{} never joined the mesh",
                    n.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let src2 = root.join("fan.bin");
        let fbytes = bytes / 4;
        write_random(&src2, fbytes)?;
        let out_before = metric(
            &reqwest::get(&a0.metrics).await?.text().await?,
            "riftmesh_sync_bytes_total",
            "direction=\"out\"",
        );
        http_json(http.post(format!("{}/v1/blobs", a0.api)).json(&json!({
            "path": src2.display().to_string(), "name": "fan/blob"
        })))
        .await?;
        let t = Instant::now();
        let mut done = vec![None; fan];
        while done.iter().any(Option::is_none) {
            for (i, n) in rx.iter().enumerate() {
                if done[i].is_none() && root.join(format!("{}-placed/blob.bin", n.name)).exists() {
                    done[i] = Some(t.elapsed().as_secs_f64());
                }
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(900),
                "fan-out never finished"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out_after = metric(
            &reqwest::get(&a0.metrics).await?.text().await?,
            "riftmesh_sync_bytes_total",
            "direction=\"out\"",
        );
        r.fan = fan;
        r.fan_bytes = fbytes;
        r.fan_all_secs = done.iter().flatten().fold(0.0, |a: f64, b| a.max(*b));
        r.fan_origin_share = (out_after - out_before) / (fbytes as f64 * fan as f64);
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let mib = env_num("RIFTMESH_BENCH_BLOB_MIB", 1024);
    let bytes = mib << 20;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = manifest.join("target");
    let _ = std::fs::create_dir_all(&target);
    let dir = tempfile::Builder::new()
        .prefix("bench-blob-")
        .tempdir_in(&target)
        .expect("temp dir in target/");
    let started = Instant::now();
    let mut r = Report::default();
    if let Err(e) = run(dir.path(), bytes, &mut r).await {
        r.error = Some(e.to_string());
    }
    if std::env::var("RIFTMESH_BENCH_ONLY").as_deref() == Ok("stack") {
        // The rows were printed; the results file keeps the last full run.
        if let Some(e) = r.error {
            eprintln!("blob bench: {e}");
            std::process::exit(1);
        }
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = format!(
        "riftmesh blob bench: {} MiB blob in {} KiB chunks on loopback; {cpus} CPUs; {}\ncommand: RIFTMESH_BENCH_BLOB_MIB={mib} cargo bench --bench blob\n",
        mib,
        r.chunk / 1024,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
    );
    out += &format!(
        "{:<62} {:>22}  {:<24} {}\n",
        "measurement", "value", "target", "result"
    );
    out += &format!("{}\n", "-".repeat(120));
    let mut row = |m: &str, v: String, t: &str, ok: Option<bool>| {
        out += &format!(
            "{:<62} {:>22}  {:<24} {}\n",
            m,
            v,
            t,
            ok.map(common::verdict).unwrap_or_else(|| "-".into())
        );
    };
    let rate = |s: f64| format!("{:.0} MB/s ({s:.2} s)", mbps(r.bytes, s));
    let dd_rate = r.dd_secs.map(|s| mbps(r.bytes, s));
    row(
        "disk: dd bs=4M conv=fdatasync",
        r.dd_secs.map_or("n/a".into(), rate),
        "",
        None,
    );
    let scp_rate = match &r.scp {
        Some(Ok(s)) => {
            row("scp over loopback (no fsync)", rate(*s), "", None);
            Some(mbps(r.bytes, *s))
        }
        Some(Err(e)) => {
            row("scp over loopback", format!("n/a: {e}"), "", None);
            None
        }
        None => None,
    };
    for (name, secs, cpu) in &r.ceiling {
        row(name, format!("{} | {cpu:.1} CPU-s", rate(*secs)), "", None);
    }
    let stack_rate = r.ceiling.get(r.stack_row).map(|c| mbps(r.bytes, c.1));
    let sha_rate = |s: f64| format!("{:.0} MB/s", mbps(SHA_BENCH_BYTES as u64, s));
    row(
        "SHA-256 of each chunk and of the whole: two sha2 passes",
        sha_rate(r.sha_secs.0),
        "",
        None,
    );
    row(
        "  in one pass, two streams interleaved (the agent's)",
        sha_rate(r.sha_secs.1),
        "",
        None,
    );
    row(
        "blob add (hash + copy into the store)",
        rate(r.add_secs),
        "",
        None,
    );
    // The headline is timed from outside: from the naming event (the add's
    // answer) until the file is placed at the receiver, polled every 50 ms.
    let tr = mbps(r.bytes, r.end_to_end_secs);
    // At least scp, and at least 80 % of the lesser of the stack's ceiling
    // and the disk.
    let lesser = [stack_rate, dd_rate]
        .into_iter()
        .flatten()
        .fold(f64::NAN, f64::min);
    let floor = [scp_rate, Some(lesser * 0.8)]
        .into_iter()
        .flatten()
        .fold(f64::NAN, f64::max);
    row(
        "one agent to another: naming event -> file placed",
        rate(r.end_to_end_secs),
        &format!(">= {floor:.0} MB/s"),
        (tr.is_finite() && floor.is_finite()).then_some(tr >= floor),
    );
    row(
        "  of which fetch + verify (the receiver's MODEL_DISTRIBUTED seconds)",
        rate(r.transfer_secs),
        "",
        None,
    );
    row(
        "  CPU seconds during it: sender / receiver",
        format!("{:.1} / {:.1} s", r.cpu_sender, r.cpu_receiver),
        "",
        None,
    );
    row(
        "receiver resident memory, idle -> max during the transfer",
        format!("{} -> {} MB", r.rss_idle_kb / 1024, r.rss_max_kb / 1024),
        "< 100 MB",
        Some(r.rss_max_kb > 0 && r.rss_max_kb < 100 * 1024),
    );
    row(
        "kill -9 at half way: chunks received before, fetched again",
        r.refetched_chunks.map_or("n/a".into(), |c| {
            format!("{c:.0} (held {})", r.held_at_restart.unwrap_or(0))
        }),
        &format!("<= {} (in flight)", r.in_flight_per_source),
        r.refetched_chunks
            .map(|c| c <= r.in_flight_per_source as f64 && r.fetched_after_restart_ok),
    );
    if r.fan > 0 {
        let single = r.fan_bytes as f64 / (r.bytes as f64 / r.transfer_secs);
        row(
            &format!(
                "fan-out of {} MiB to {} receivers at once: all placed",
                r.fan_bytes >> 20,
                r.fan
            ),
            format!(
                "{:.2} s ({:.1}x one)",
                r.fan_all_secs,
                r.fan_all_secs / single
            ),
            "<= 2x one (tc-shaped)",
            None,
        );
        row(
            "  bytes the origin served / bytes the receivers needed",
            format!("{:.0} %", r.fan_origin_share * 100.0),
            "",
            None,
        );
    }
    if let Some(e) = &r.error {
        row("error", e.clone(), "", Some(false));
    }
    out += &format!("{}\n", "-".repeat(120));
    out += "rates are the blob's size over the time; the one-to-one row is timed from outside, from the naming event's publication (the add's answer) until the receiver's file is placed (polled every 50 ms); fetch + verify is the receiver's own figure, from the start of its transfer to its whole-file check.\n";
    out += "target of the one-to-one row: at least scp, and at least 80 % of the lesser of the agent's stack ceiling and the disk.\n";
    out += "fan-out: all agents share this machine's 2 CPUs and loopback (no link shaping), so it shows how the load spreads, not the shaped-link target; 'one' is the fetch time of that size at the one-to-one rate above.\n";
    out += &format!(
        "total bench time {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    print!("{out}");
    let res = common::results_dir(manifest.join("benches/results"));
    let _ = std::fs::create_dir_all(&res);
    let _ = std::fs::write(res.join("blob.txt"), &out);
    let j = json!({
        "bytes": r.bytes,
        "dd_secs": r.dd_secs,
        "scp_secs": r.scp.as_ref().and_then(|s| s.as_ref().ok()),
        "add_secs": r.add_secs,
        "sha_bytes": SHA_BENCH_BYTES,
        "sha_two_passes_secs": r.sha_secs.0,
        "sha_one_pass_secs": r.sha_secs.1,
        "transfer_secs": r.transfer_secs,
        "end_to_end_secs": r.end_to_end_secs,
        "rss_idle_kb": r.rss_idle_kb,
        "rss_max_kb": r.rss_max_kb,
        "refetched_chunks": r.refetched_chunks,
        "fanout": r.fan,
        "fanout_bytes": r.fan_bytes,
        "fanout_all_secs": r.fan_all_secs,
        "fanout_origin_share": r.fan_origin_share,
        "ceiling": r.ceiling.iter().map(|(n, s, c)| json!({"row": n.trim(), "secs": s, "cpu_secs": c})).collect::<Vec<_>>(),
        "error": r.error,
    });
    let _ = std::fs::write(
        res.join("blob.json"),
        serde_json::to_string_pretty(&j).unwrap_or_default(),
    );
    if std::env::var_os("RIFTMESH_BENCH_KEEP").is_some() || r.error.is_some() {
        println!("kept {}", dir.keep().display());
    }
}
