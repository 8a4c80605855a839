//! The `riftmesh` command line: parsing only; everything else is in the library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::{json, Value};

use riftmesh::api::{self, Client, EventView, FetchResp, TraceNode};
use riftmesh::config::{AgentArgs, AgentConfig, DEFAULT_API};

/// jemalloc instead of glibc's malloc: under a steady event load the agent's
/// live heap levels off near 50 MiB, but glibc's arenas kept growing the
/// resident size (77 MB held for 54 MB in use after 11 min of a 20-agent
/// soak) by fragmentation; jemalloc returns freed pages to the system.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (`_RJEM_MALLOC_CONF` in the
/// environment still overrides them).
///
/// `tcache_max:65536`: the thread caches keep freed blocks up to 64 KiB
/// (the default stops at 32 KiB). Noise and Yamux allocate a zeroed buffer
/// per frame (up to 64 KiB); above the cache, jemalloc zeroes a reused
/// block by handing its pages back to the kernel (`MADV_DONTNEED`), so every
/// frame cost a TLB shootdown and a page fault per 4 KiB on its next use.
/// Receiving a 1 GiB blob took 530,000 page faults and 4.3 s; with the
/// cache, 63,000 and 2.8 s, for about 3 MB more resident memory
/// (proto-notes/sync.md, "Throughput").
///
/// `tcache_nslots_large:64,tcache_gc_incr_bytes:16777216`: a receiver holds
/// many frames at once (several 1 MiB answers in flight), more than the 20
/// the cache keeps per size by default, and the cache's garbage collection
/// ran every 64 KiB allocated, flushing blocks the next frames needed; the
/// faults came back (about 75,000 per GiB). With 64 slots and a collection
/// every 16 MiB: about 17,000, receiver CPU per GiB 3.1 -> 2.85 s, for about
/// 8 MB more resident memory.
#[cfg(all(not(target_env = "msvc"), not(target_os = "macos")))]
#[export_name = "_rjem_malloc_conf"]
#[allow(non_upper_case_globals)]
pub static malloc_conf: Option<&'static u8> =
    Some(&b"tcache_max:65536,tcache_nslots_large:64,tcache_gc_incr_bytes:16777216\0"[0]);

/// Exit status of every command (README.md, "Exit codes"). `run` and
/// `lock run` exit with their command's status once it has started.
mod exit {
    /// Anything else that went wrong (the agent failed the request, a local
    /// file could not be written, a wait gave up).
    pub const FAILED: i32 = 1;
    /// Bad arguments or configuration, or a request the agent calls malformed.
    pub const USAGE: i32 = 2;
    /// `lock run`: the lock was lost or not renewed in time; the command was stopped.
    pub const LOCK_LOST: i32 = 3;
    /// No riftmesh agent answers at the API address.
    pub const UNREACHABLE: i32 = 4;
    /// What was named does not exist (event, consumer, blob, lock, member).
    pub const NOT_FOUND: i32 = 5;
    /// It exists already or is taken: a lock held, a token that does not hold
    /// the lock, a file that exists, a duplicate name.
    pub const CONFLICT: i32 = 6;
    /// Refused by the agent's policy (fault injection off, a path outside
    /// the blob roots, a strict type list).
    pub const POLICY: i32 = 7;
}

/// A mistake in how the command was called (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// An error with its exit status chosen where it happened.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
struct Classed {
    code: i32,
    msg: String,
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

/// The exit status for an error: the first cause in its chain that has a class.
fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<api::ClientError>() {
            return match c {
                api::ClientError::Unreachable { .. } | api::ClientError::NotApi { .. } => {
                    exit::UNREACHABLE
                }
                api::ClientError::Refused { status, .. } => match status {
                    400 | 411 | 413 | 415 | 422 => exit::USAGE,
                    403 => exit::POLICY,
                    404 => exit::NOT_FOUND,
                    409 => exit::CONFLICT,
                    _ => exit::FAILED,
                },
                api::ClientError::Protocol(_) | api::ClientError::Local(_) => exit::FAILED,
            };
        }
        if cause.is::<Usage>() || cause.is::<riftmesh::config::ConfigError>() {
            return exit::USAGE;
        }
        if let Some(c) = cause.downcast_ref::<Classed>() {
            return c.code;
        }
    }
    exit::FAILED
}

/// The agent's API address as given: `host:port` or an `http://` URL, with
/// a port (`localhost` alone would mean port 80, where no agent listens).
fn parse_api(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .unwrap_or(s);
    let hostport = rest.split('/').next().unwrap_or("");
    let port = match hostport.rfind(']') {
        // [::1]:7411
        Some(i) => hostport[i + 1..].strip_prefix(':'),
        None => hostport.rsplit_once(':').map(|(_, p)| p),
    };
    match port {
        Some(p) if p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(s.to_string()),
        Some(p) => Err(format!(
            "{p:?} is not a port: write host:port, e.g. {DEFAULT_API} (from --api or RIFTMESH_API)"
        )),
        None => Err(format!(
            "{s:?} names no port: write {hostport}:7411, or the port the agent's --api / `api` setting uses \
             (from --api or RIFTMESH_API)"
        )),
    }
}

#[derive(Parser)]
#[command(
    name = "riftmesh",
    version,
    about = "Peer-to-peer cluster agent for GPU training fleets",
    after_help = "Exit status: 0 ok, 1 failed, 2 usage, 3 lock lost (lock run), 4 agent unreachable, \
                  5 not found, 6 conflict, 7 refused by policy; `run` and `lock run` pass on \
                  their command's status."
)]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How a client command finds the local agent.
#[derive(clap::Args, Clone)]
struct Conn {
    /// Address of the local agent's API (host:port).
    #[arg(long, env = "RIFTMESH_API", default_value = DEFAULT_API, value_parser = parse_api)]
    api: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (one per host).
    Agent(AgentArgs),
    /// Write a new swarm key (go-libp2p /key/swarm/psk/1.0.0/ format).
    Keygen {
        /// Where to write it; standard output if absent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Publish an event through the local agent.
    Publish {
        /// Event type; any spelling of a catalog name, or a custom UPPER_SNAKE name.
        #[arg(name = "TYPE")]
        event_type: String,
        /// JSON payload (an object, usually).
        #[arg(long, default_value = "{}")]
        payload: String,
        #[arg(long)]
        correlation_id: Option<String>,
        #[arg(long)]
        parent_id: Option<String>,
        /// Name of the publishing process.
        #[arg(long)]
        origin: Option<String>,
        /// TYPE is a new custom type even though it is close to a catalog
        /// name (otherwise refused with "did you mean …").
        #[arg(long)]
        custom: bool,
        /// Idempotency key: every publish of TYPE with this key is one fact.
        /// Default: a new key for this call, reused by its retries.
        #[arg(long, conflicts_with = "by_content")]
        idempotency_key: Option<String>,
        /// Send no key: the same TYPE and payload published again within
        /// the type's repeat window (30 s by default) is a duplicate.
        #[arg(long)]
        by_content: bool,
        /// Retry for this long while the agent is unreachable or answers
        /// 503 (with the same key, so a retry is never a second fact).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        retry_for: std::time::Duration,
        #[command(flatten)]
        conn: Conn,
    },
    /// Read events: as a durable named consumer (acknowledging each batch), or the history.
    Events {
        /// Durable consumer name; without it, the history is printed and nothing is acknowledged.
        #[arg(long)]
        consumer: Option<String>,
        /// Type pattern (TRAINING_*, training.*); repeatable.
        #[arg(long = "type")]
        types: Vec<String>,
        /// Keep streaming new events.
        #[arg(long)]
        follow: bool,
        /// Replay from the oldest retained event.
        #[arg(long, conflicts_with = "since")]
        from_start: bool,
        /// Replay from a time (RFC 3339) or a duration ago (10m).
        #[arg(long)]
        since: Option<String>,
        /// History: the newest MAX matching events (with --from-start or
        /// --since: the first MAX, then pages on). Consumer: most per batch.
        #[arg(long, default_value_t = 100)]
        max: usize,
        /// Change an existing consumer's type filter to --type (without
        /// it, --type only applies when the consumer is created, and a
        /// different filter is refused: looking never changes a consumer).
        #[arg(long, requires = "consumer")]
        update: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Durable consumers: list, show, nack, dead letters, delete.
    Consumer {
        #[command(subcommand)]
        op: ConsumerOp,
    },
    /// Peers this agent is connected to.
    Peers {
        #[command(flatten)]
        conn: Conn,
    },
    /// Every host this agent knows: state, incarnation, health, jobs, tags.
    Members {
        #[command(flatten)]
        conn: Conn,
    },
    /// Report job counters or gauges of this host (NAME=VALUE; NAME= removes one).
    Report {
        #[arg(name = "NAME=VALUE", required = true)]
        values: Vec<String>,
        /// Drop them unless reported again within this time (e.g. 60s).
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The leader: name, peer id, term (the fencing token), since when, and whether it is this agent.
    Leader {
        #[command(flatten)]
        conn: Conn,
    },
    /// Cluster-wide locks with fencing tokens.
    Lock {
        #[command(subcommand)]
        op: LockOp,
    },
    /// Run CMD only while this agent is the leader (stopped on losing leadership).
    Run {
        /// Required: run only while this agent leads.
        #[arg(long, required = true)]
        if_leader: bool,
        #[command(flatten)]
        conn: Conn,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Leave the cluster gracefully and stop the local agent.
    Leave {
        #[command(flatten)]
        conn: Conn,
    },
    /// The agent's view of itself, the mesh, its store and consumers.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// The chain of events linked to ID by correlation and parent ids, as a tree.
    Trace {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// The catalog of known event types and their aliases.
    Types {
        #[command(flatten)]
        conn: Conn,
    },
    /// Content-addressed blobs (models, game data): add, list, get.
    Blob {
        #[command(subcommand)]
        op: BlobOp,
    },
    /// Blob transfers in flight and recent failures.
    Sync {
        #[command(subcommand)]
        op: SyncOp,
    },
    /// Check an agent configuration without starting the agent.
    Config {
        #[command(subcommand)]
        op: ConfigOp,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
    /// Print the manual page (roff), or write one page per command into a directory.
    Man {
        /// Write riftmesh.1 and riftmesh-<command>.1 here instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigOp {
    /// Resolve and validate everything `agent` would (file, environment,
    /// flags, swarm key) and print the result; exit 2 if invalid.
    Check {
        /// The TOML file [default: --config or RIFTMESH_CONFIG; without
        /// either, only the defaults, environment and flags].
        file: Option<PathBuf>,
        #[command(flatten)]
        args: AgentArgs,
    },
}

#[derive(Subcommand)]
enum BlobOp {
    /// Store FILE as a blob (copied; the file may change afterwards) and point NAME at it.
    Add {
        file: PathBuf,
        /// Name to publish, e.g. models/hex8_2p.
        #[arg(long)]
        name: String,
        /// Naming event: BLOB_PUBLISHED, MODEL_PROMOTED or GAME_BATCH_READY.
        #[arg(long, default_value = "BLOB_PUBLISHED")]
        event: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Blobs held here and the names known.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a blob (by id or name) to PATH, fetching it from peers if needed.
    Get {
        #[arg(name = "ID|NAME")]
        r: String,
        #[arg(long)]
        out: PathBuf,
        /// Give up waiting for a fetch after this long.
        #[arg(long, default_value = "1h")]
        timeout: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum ConsumerOp {
    /// Every consumer of this agent: types, cursor, matching events pending.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// One consumer.
    Show {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move the event at SEQ to the consumer's dead letters (and past it).
    Nack {
        name: String,
        seq: u64,
        #[arg(long, default_value = "nacked from the CLI")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// The consumer's dead letters, with their reasons.
    DeadLetters {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete the consumer, its cursor and its dead letters.
    Delete {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

impl ConsumerOp {
    fn conn(&self) -> &Conn {
        match self {
            ConsumerOp::List { conn }
            | ConsumerOp::Show { conn, .. }
            | ConsumerOp::Nack { conn, .. }
            | ConsumerOp::DeadLetters { conn, .. }
            | ConsumerOp::Delete { conn, .. } => conn,
        }
    }
}

#[derive(Subcommand)]
enum SyncOp {
    /// Transfers in flight (bytes, rate, sources, ETA) and recent failures.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum LockOp {
    /// Take the lock; prints the fencing token.
    Acquire {
        name: String,
        /// Lease length; renew before it ends.
        #[arg(long, default_value = "30s")]
        ttl: String,
        /// Who holds it [default: this agent's name].
        #[arg(long)]
        holder: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Extend the lease of a grant.
    Renew {
        name: String,
        #[arg(long)]
        token: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Give the lock back. Without --token: only a lock this agent holds
    /// (its holder is this agent's name).
    Release {
        name: String,
        #[arg(long)]
        token: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Locks currently held.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Hold the lock while CMD runs: renewed every third of the TTL; CMD is
    /// stopped if the lock is lost. The token is in RIFTMESH_LOCK_TOKEN.
    Run {
        name: String,
        #[arg(long, default_value = "30s")]
        ttl: String,
        /// Wait for the lock instead of failing when it is held.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: Conn,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

impl LockOp {
    fn conn(&self) -> &Conn {
        match self {
            LockOp::Acquire { conn, .. }
            | LockOp::Renew { conn, .. }
            | LockOp::Release { conn, .. }
            | LockOp::List { conn }
            | LockOp::Run { conn, .. } => conn,
        }
    }
}

async fn blob_cmd(client: &Client, op: BlobOp, json_out: bool) -> anyhow::Result<()> {
    match op {
        BlobOp::Add {
            file, name, event, ..
        } => {
            // The CLI reads the file with the caller's permissions and
            // sends its bytes: the agent reads no file for a request
            // (proto-notes/security.md).
            let v = client
                .upload_blob(&file, &name, Some(&event))
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
    }
    Ok(())
}

fn secs(s: &str, what: &str) -> anyhow::Result<f64> {
    Ok(riftmesh::config::parse_duration(s)
        .map_err(|e| usage(format!("{what} {s:?}: {e}")))?
        .as_secs_f64())
}

/// Stop a child's process group: SIGTERM, then SIGKILL after 10 s.
async fn stop_child(child: &mut tokio::process::Child) {
    signal_child(child, libc::SIGTERM);
    if tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        kill_child(child).await;
    }
}

/// Signal the child's whole process group (it leads one: `spawn_cmd`), so
/// a shell's or a launcher's own children stop with it.
fn signal_child(child: &tokio::process::Child, sig: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: killpg with a process group id we created and a signal.
        unsafe { libc::killpg(pid as libc::pid_t, sig) };
    }
}

/// SIGKILL the child's process group and reap the child.
async fn kill_child(child: &mut tokio::process::Child) {
    signal_child(child, libc::SIGKILL);
    let _ = child.wait().await;
}

fn spawn_cmd(cmd: &[String], env: &[(&str, String)]) -> anyhow::Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new(&cmd[0]);
    c.args(&cmd[1..]);
    // Its own process group: stopping it stops what it started.
    c.process_group(0);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn()
        .with_context(|| format!("cannot start {:?}", cmd[0]))
}

/// When the holder of a lease must have stopped its command, measured on
/// this host's monotonic clock from *before* the request that got or
/// renewed the lease was sent (the leader's lease starts no earlier than
/// that): SIGTERM at `term`, SIGKILL at `kill`, both before `sent + ttl`
/// (proto-notes/leader.md, "lock run").
#[derive(Clone, Copy, Debug, PartialEq)]
struct HolderDeadline {
    term: tokio::time::Instant,
    kill: tokio::time::Instant,
}

impl HolderDeadline {
    /// Clock-rate drift tolerated between this host and the leader, as a
    /// fraction of the TTL, plus a fixed margin for the kill itself.
    const DRIFT: f64 = 0.05;
    const KILL_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

    /// The grace between SIGTERM and SIGKILL: a quarter of the TTL, at
    /// least 100 ms, at most 10 s.
    fn grace(ttl: f64) -> std::time::Duration {
        std::time::Duration::from_secs_f64((ttl * 0.25).clamp(0.1, 10.0))
    }

    fn new(sent: tokio::time::Instant, ttl: f64) -> Self {
        let usable = std::time::Duration::from_secs_f64(ttl * (1.0 - Self::DRIFT));
        let kill = (sent + usable)
            .checked_sub(Self::KILL_MARGIN)
            .unwrap_or(sent);
        let term = kill.checked_sub(Self::grace(ttl)).unwrap_or(sent);
        HolderDeadline { term, kill }
    }
}

async fn lock_run(
    client: &Client,
    name: &str,
    ttl: f64,
    wait: bool,
    cmd: &[String],
) -> anyhow::Result<i32> {
    use tokio::time::{sleep_until, Instant};
    let path = format!("/v1/locks/{name}/acquire");
    let (grant, sent) = loop {
        let sent = Instant::now();
        match client.post(&path, &json!({ "ttl_secs": ttl })).await {
            Ok(v) => break (v, sent),
            Err(api::ClientError::Refused { status: 409, .. }) if wait => {}
            Err(api::ClientError::Refused { status: 503, .. }) if wait => {}
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(std::time::Duration::from_secs_f64(
            (ttl / 6.0).clamp(0.2, 2.0),
        ))
        .await;
    };
    let token = grant["token"].as_u64().context("no token in the grant")?;
    let mut deadline = HolderDeadline::new(sent, ttl);
    if Instant::now() >= deadline.term {
        let _ = client
            .post(
                &format!("/v1/locks/{name}/release"),
                &json!({ "token": token }),
            )
            .await;
        bail!("lock {name} was granted too late to use (the grant took longer than its TTL allows); try a longer --ttl");
    }
    eprintln!("riftmesh: holding lock {name} with token {token}");
    let mut child = spawn_cmd(cmd, &[("RIFTMESH_LOCK_TOKEN", token.to_string())])?;
    let mut renew = tokio::time::interval(std::time::Duration::from_secs_f64(ttl / 3.0));
    renew.tick().await;
    let stop = stop_signal();
    tokio::pin!(stop);
    // One renew in flight at a time; it never holds up the deadlines (a
    // renew on the minority side of a partition blocks for seconds).
    type Renewal<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = (Instant, Result<Value, api::ClientError>)> + 'a>,
    >;
    let mut renewing: Option<Renewal> = None;
    let mut termed = false;
    let renew_path = format!("/v1/locks/{name}/renew");
    let code = loop {
        tokio::select! {
            st = child.wait() => {
                let st = st?;
                // Killed by a signal: 128 + the signal, as shells report it.
                break st.code().unwrap_or_else(|| {
                    128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)
                });
            }
            _ = &mut stop => {
                // Stopped by the user: SIGTERM, and SIGKILL no later than
                // the lease allows (renewals stop here).
                signal_child(&child, libc::SIGTERM);
                let by = deadline.kill.min(Instant::now() + std::time::Duration::from_secs(10));
                if tokio::time::timeout_at(by, child.wait()).await.is_err() {
                    kill_child(&mut child).await;
                }
                break 143;
            }
            _ = sleep_until(deadline.term), if !termed => {
                eprintln!("riftmesh: lock {name} was not renewed in time; stopping the command (SIGTERM)");
                signal_child(&child, libc::SIGTERM);
                termed = true;
            }
            _ = sleep_until(deadline.kill) => {
                eprintln!("riftmesh: lock {name} expires: killing the command (SIGKILL)");
                kill_child(&mut child).await;
                return Ok(exit::LOCK_LOST);
            }
            _ = renew.tick(), if renewing.is_none() && !termed => {
                let (c, p) = (client, renew_path.clone());
                renewing = Some(Box::pin(async move {
                    let sent = Instant::now();
                    (sent, c.post(&p, &json!({ "token": token })).await)
                }));
            }
            (sent, r) = async { renewing.as_mut().expect("guarded").await }, if renewing.is_some() => {
                renewing = None;
                match r {
                    Ok(_) if !termed => deadline = HolderDeadline::new(sent, ttl),
                    Ok(_) => {}
                    Err(e @ api::ClientError::Refused { status: 409, .. }) => {
                        eprintln!("riftmesh: lost lock {name} ({e}); stopping the command");
                        if !termed {
                            signal_child(&child, libc::SIGTERM);
                            termed = true;
                        }
                        // The lock is known gone: SIGKILL after a short
                        // grace, not at the lease's deadline.
                        let soon = Instant::now() + HolderDeadline::grace(ttl).min(std::time::Duration::from_secs(1));
                        deadline.kill = deadline.kill.min(soon);
                    }
                    Err(e) => eprintln!("riftmesh: cannot renew lock {name} yet ({e}); retrying"),
                }
            }
        }
    };
    if termed {
        return Ok(exit::LOCK_LOST);
    }
    let _ = client
        .post(
            &format!("/v1/locks/{name}/release"),
            &json!({ "token": token }),
        )
        .await;
    Ok(code)
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn run_if_leader(client: &Client, cmd: &[String]) -> anyhow::Result<i32> {
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(250));
    let mut child: Option<tokio::process::Child> = None;
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            _ = &mut stop => {
                if let Some(c) = &mut child {
                    stop_child(c).await;
                }
                return Ok(143);
            }
        }
        let lead = client.get("/v1/leader").await;
        let is_leader = matches!(&lead, Ok(v) if v["is_self"] == true);
        match (&mut child, is_leader) {
            (None, true) => {
                let term = lead
                    .as_ref()
                    .map(|v| v["term"].to_string())
                    .unwrap_or_default();
                eprintln!("riftmesh: this agent leads (term {term}); starting the command");
                child = Some(spawn_cmd(cmd, &[("RIFTMESH_LEADER_TERM", term)])?);
            }
            (Some(c), false) => {
                eprintln!("riftmesh: leadership lost; stopping the command");
                stop_child(c).await;
                child = None;
            }
            (Some(c), true) => {
                if let Some(st) = c.try_wait()? {
                    return Ok(st.code().unwrap_or(1));
                }
            }
            (None, false) => {}
        }
    }
}

fn main() {
    // Before any thread exists, so every thread gets the limited arenas.
    riftmesh::agent::tune_allocator();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("riftmesh: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async_main());
}

async fn async_main() {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = match cli.cmd {
        Cmd::Agent(ref args) => {
            let sub = matches.subcommand_matches("agent");
            match AgentConfig::resolve(args, sub) {
                Ok(cfg) => {
                    riftmesh::logging::init(cfg.log_format);
                    riftmesh::agent::run(cfg).await
                }
                Err(e) => Err(e.into()),
            }
        }
        Cmd::Config {
            op: ConfigOp::Check { ref file, ref args },
        } => {
            let sub = matches
                .subcommand_matches("config")
                .and_then(|m| m.subcommand_matches("check"));
            config_check(file.clone(), args, sub, cli.json)
        }
        Cmd::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "riftmesh", &mut script);
            write_stdout(&script)
        }
        Cmd::Man { ref out_dir } => man(out_dir.as_deref()),
        _ => run_client(cli).await,
    };
    if let Err(e) = result {
        eprintln!("riftmesh: {e:#}");
        std::process::exit(exit_code(&e));
    }
}

/// Write to standard output; a reader that stopped early (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// `riftmesh man`: the page on standard output, or every command's page in a directory.
fn man(out_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match out_dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            write_stdout(&page)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the pages into {}", dir.display()))?;
        }
    }
    Ok(())
}

/// `riftmesh config check [FILE]`: what `agent` would resolve, validated,
/// without binding a port or opening the store.
fn config_check(
    file: Option<PathBuf>,
    args: &AgentArgs,
    matches: Option<&clap::ArgMatches>,
    json_out: bool,
) -> anyhow::Result<()> {
    let mut args = args.clone();
    if file.is_some() {
        args.config = file;
    }
    let cfg = AgentConfig::resolve(&args, matches)?;
    // The swarm key must exist and parse if one is named; without one the
    // agent makes <data-dir>/swarm.key at its first start.
    let key = match &cfg.swarm_key {
        Some(p) => {
            let psk = riftmesh::node::load_swarm_key(&cfg).map_err(|e| usage(e.to_string()))?;
            format!("{} (fingerprint {})", p.display(), psk.fingerprint())
        }
        None => {
            let p = cfg.data_dir.join("swarm.key");
            if p.exists() {
                let psk = riftmesh::node::load_swarm_key(&cfg).map_err(|e| usage(e.to_string()))?;
                format!("{} (fingerprint {})", p.display(), psk.fingerprint())
            } else {
                format!(
                    "{} (made at the first start: copy it to every host)",
                    p.display()
                )
            }
        }
    };
    let mut warnings = Vec::new();
    if cfg.bootstrap.is_empty() {
        warnings.push(if cfg.mdns {
            "no bootstrap: this host finds peers only by mDNS on its local network (set bootstrap = [\"/ip4/<peer>/tcp/4001\"])".to_string()
        } else {
            "no bootstrap and mDNS off: this host will form a cluster of one until a peer dials it (set bootstrap = [\"/ip4/<peer>/tcp/4001\"])".to_string()
        });
    }
    if !cfg.api.ip().is_loopback() {
        warnings.push(format!(
            "the local API listens on {} (not loopback): anyone who can reach it can publish and consume",
            cfg.api
        ));
    }
    if json_out {
        return print_json(&json!({
            "valid": true,
            "config": args.config.as_ref().map(|p| p.display().to_string()),
            "name": cfg.name,
            "data_dir": cfg.data_dir.display().to_string(),
            "listen": cfg.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "bootstrap": cfg.bootstrap.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "api": cfg.api.to_string(),
            "metrics": cfg.metrics.to_string(),
            "mdns": cfg.mdns,
            "voters": cfg.voters,
            "swarm_key": key,
            "warnings": warnings,
        }));
    }
    println!(
        "{}: valid",
        args.config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "configuration (no file)".into())
    );
    println!("name       {}", cfg.name);
    println!("data dir   {}", cfg.data_dir.display());
    println!(
        "listen     {}",
        cfg.listen
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "bootstrap  {}",
        if cfg.bootstrap.is_empty() {
            "none".to_string()
        } else {
            cfg.bootstrap
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!("mdns       {}", if cfg.mdns { "on" } else { "off" });
    println!("api        {}   metrics {}", cfg.api, cfg.metrics);
    println!(
        "voters     {}",
        if cfg.voters.is_empty() {
            "none (no leader in this cluster)".to_string()
        } else if cfg.voters.contains(&cfg.name) {
            format!("{} (this host votes)", cfg.voters.join(", "))
        } else {
            cfg.voters.join(", ")
        }
    );
    println!("swarm key  {key}");
    for w in warnings {
        println!("warning    {w}");
    }
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn fmt_bytes(b: u64) -> String {
    const G: f64 = 1024.0 * 1024.0 * 1024.0;
    format!("{:.1}G", b as f64 / G)
}

fn print_members(v: &Value) {
    let members = v["members"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<16} {:<8} {:<8} {:<21} {:>6} {:>8} {:>5} {:>6} {:>13} {:>13}  {:<28} jobs / tags",
        "NAME",
        "STATE",
        "VERSION",
        "ADDRESS",
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
            "{:<16} {:<8} {:<8} {:<21} {:>6} {:>8} {:>5} {:>6} {:>13} {:>13}  {:<28} {} {}",
            m["name"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            version,
            address,
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

fn event_line(e: &EventView) -> String {
    let src: String = e
        .source
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!(
        "{:>8}  {}  {:<24} {}  src=…{}{}  {}",
        e.seq,
        e.time,
        e.event_type,
        e.id,
        src,
        e.origin
            .as_ref()
            .map(|o| format!(" origin={o}"))
            .unwrap_or_default(),
        e.payload
    )
}

async fn run_client(cli: Cli) -> anyhow::Result<()> {
    let api = match &cli.cmd {
        Cmd::Publish { conn, .. }
        | Cmd::Events { conn, .. }
        | Cmd::Peers { conn }
        | Cmd::Members { conn }
        | Cmd::Report { conn, .. }
        | Cmd::Leave { conn }
        | Cmd::Leader { conn }
        | Cmd::Run { conn, .. }
        | Cmd::Status { conn }
        | Cmd::Trace { conn, .. }
        | Cmd::Types { conn } => conn.api.clone(),
        Cmd::Lock { op } => op.conn().api.clone(),
        Cmd::Consumer { op } => op.conn().api.clone(),
        Cmd::Blob {
            op: BlobOp::Add { conn, .. } | BlobOp::List { conn } | BlobOp::Get { conn, .. },
        }
        | Cmd::Sync {
            op: SyncOp::Status { conn },
        } => conn.api.clone(),
        Cmd::Agent(_)
        | Cmd::Keygen { .. }
        | Cmd::Config { .. }
        | Cmd::Completion { .. }
        | Cmd::Man { .. } => DEFAULT_API.to_string(),
    };
    let client = Client::new(&api);
    match cli.cmd {
        Cmd::Agent(_) | Cmd::Config { .. } | Cmd::Completion { .. } | Cmd::Man { .. } => {
            unreachable!("handled in main")
        }
        Cmd::Keygen { out, force } => {
            let text = riftmesh::net::generate_psk().to_string();
            match out {
                None => print!("{text}"),
                Some(path) => {
                    if path.exists() && !force {
                        return Err(Classed {
                            code: exit::CONFLICT,
                            msg: format!("{} exists; pass --force to overwrite it", path.display()),
                        }
                        .into());
                    }
                    riftmesh::node::write_private(&path, text.as_bytes())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "wrote swarm key to {} (copy it to every host)",
                        path.display()
                    );
                }
            }
        }
        Cmd::Publish {
            event_type,
            payload,
            correlation_id,
            parent_id,
            origin,
            custom,
            idempotency_key,
            by_content,
            retry_for,
            ..
        } => {
            let payload: Value = serde_json::from_str(&payload)
                .map_err(|e| usage(format!("--payload is not valid JSON: {e}")))?;
            let key = match (by_content, idempotency_key) {
                (true, _) => None,
                (false, Some(k)) => Some(k),
                (false, None) => Some(riftmesh::event::new_event_id(riftmesh::event::now_ms())),
            };
            let body = json!({
                "type": event_type, "payload": payload, "correlation_id": correlation_id,
                "parent_id": parent_id, "origin": origin, "custom_type": custom,
                "idempotency_key": key,
            });
            let deadline = std::time::Instant::now() + retry_for;
            let mut pause = std::time::Duration::from_millis(100);
            let mut retried = false;
            // With a key, any failure that may have happened after the agent
            // committed (unreachable, 503, an answer cut short) is retried:
            // the key makes the retry the same fact.
            let answer = loop {
                match client.post("/v1/events", &body).await {
                    Err(
                        e @ (api::ClientError::Unreachable { .. }
                        | api::ClientError::Protocol(_)
                        | api::ClientError::Refused { status: 503, .. }),
                    ) if key.is_some() && std::time::Instant::now() + pause < deadline => {
                        eprintln!("riftmesh: {e}; retrying with the same idempotency key");
                        retried = true;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(std::time::Duration::from_secs(2));
                    }
                    other => break other?,
                }
            };
            let r: api::PublishResp = api::decode(answer)?;
            if let Some(w) = &r.warning {
                eprintln!("riftmesh: warning: {w}");
            }
            // A retry answered "duplicate by this call's key" confirms this
            // call's own publish.
            let confirmed =
                retried && r.duplicate && r.duplicate_by.as_deref() == Some("idempotency_key");
            if cli.json {
                print_json(&r)?;
            } else if confirmed {
                println!(
                    "published {} id {} hash {} (confirmed on retry)",
                    r.event_type, r.id, r.hash
                );
            } else if r.duplicate {
                let age = r
                    .age_ms
                    .map(|ms| {
                        format!(
                            ", published {} ago",
                            humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
                        )
                    })
                    .unwrap_or_default();
                let by = match r.duplicate_by.as_deref() {
                    Some("idempotency_key") => ", same idempotency key",
                    Some("content") => ", same type and payload within the repeat window",
                    _ => "",
                };
                println!(
                    "duplicate of {} ({}{age}{by}), hash {}",
                    r.id, r.event_type, r.hash
                );
            } else {
                println!("published {} id {} hash {}", r.event_type, r.id, r.hash);
            }
        }
        Cmd::Events {
            consumer,
            types,
            follow,
            from_start,
            since,
            max,
            update,
            ..
        } => match consumer {
            None => history(&client, cli.json, types, follow, from_start, since, max).await?,
            Some(name) => {
                let start = Start { from_start, since };
                consume(&client, cli.json, &name, types, update, follow, start, max).await?
            }
        },
        Cmd::Consumer { op } => consumer_op(&client, cli.json, op).await?,
        Cmd::Peers { .. } => {
            let v = client.get("/v1/peers").await?;
            if cli.json {
                return print_json(&v);
            }
            let peers = v["peers"].as_array().cloned().unwrap_or_default();
            println!(
                "{} peer(s) connected to {}",
                peers.len(),
                v["peer_id"].as_str().unwrap_or("?")
            );
            for p in peers {
                println!(
                    "  {}  {}  rtt={}  up {}s  {}",
                    p["peer_id"].as_str().unwrap_or("?"),
                    p["agent_version"].as_str().unwrap_or("-"),
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
        }
        Cmd::Members { .. } => {
            let v = client.get("/v1/members").await?;
            if cli.json {
                return print_json(&v);
            }
            print_members(&v);
        }
        Cmd::Report { values, ttl, .. } => {
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
            if cli.json {
                return print_json(&v);
            }
            println!("jobs now: {}", v["jobs"]);
        }
        Cmd::Leader { .. } => {
            let v = client.get("/v1/leader").await?;
            if cli.json {
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
                    println!("peer id    {}", v["leader_peer_id"].as_str().unwrap_or("-"));
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
        }
        Cmd::Lock { op } => match op {
            LockOp::Acquire {
                name, ttl, holder, ..
            } => {
                let mut body = json!({ "ttl_secs": secs(&ttl, "--ttl")? });
                if let Some(h) = holder {
                    body["holder"] = json!(h);
                }
                let v = client
                    .post(&format!("/v1/locks/{name}/acquire"), &body)
                    .await?;
                if cli.json {
                    return print_json(&v);
                }
                println!("{}", v["token"]);
            }
            LockOp::Renew { name, token, .. } => {
                let v = client
                    .post(
                        &format!("/v1/locks/{name}/renew"),
                        &json!({ "token": token }),
                    )
                    .await?;
                if cli.json {
                    return print_json(&v);
                }
                let exp = v["expires_ms"].as_u64().unwrap_or(0);
                println!(
                    "renewed {name} (token {token}) until {}",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(exp)
                    )
                );
            }
            LockOp::Release { name, token, .. } => {
                let token = match token {
                    Some(t) => t,
                    None => own_lock_token(&client, &name).await?,
                };
                let v = client
                    .post(
                        &format!("/v1/locks/{name}/release"),
                        &json!({ "token": token }),
                    )
                    .await?;
                if cli.json {
                    return print_json(&v);
                }
                println!("released {name}");
            }
            LockOp::List { .. } => {
                let v = client.get("/v1/locks").await?;
                if cli.json {
                    return print_json(&v);
                }
                let locks = v["locks"].as_array().cloned().unwrap_or_default();
                if locks.is_empty() {
                    println!("no locks held");
                    return Ok(());
                }
                println!(
                    "{:<24} {:<20} {:>8}  {:<24} LEFT",
                    "NAME", "HOLDER", "TOKEN", "EXPIRES"
                );
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                for l in locks {
                    let exp = l["expires_ms"].as_u64().unwrap_or(0);
                    println!(
                        "{:<24} {:<20} {:>8}  {:<24} {}",
                        l["name"].as_str().unwrap_or("?"),
                        l["holder"].as_str().unwrap_or("?"),
                        l["token"],
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_millis(exp)
                        ),
                        human_left(exp, now_ms)
                    );
                }
            }
            LockOp::Run {
                name,
                ttl,
                wait,
                cmd,
                ..
            } => {
                let code = lock_run(&client, &name, secs(&ttl, "--ttl")?, wait, &cmd).await?;
                std::process::exit(code);
            }
        },
        Cmd::Run { cmd, .. } => {
            let code = run_if_leader(&client, &cmd).await?;
            std::process::exit(code);
        }
        Cmd::Leave { .. } => {
            let v = client.post("/v1/leave", &json!({})).await?;
            if cli.json {
                return print_json(&v);
            }
            println!(
                "left the cluster at incarnation {} ({} of {} peers acknowledged); the agent is stopping",
                v["incarnation"], v["peers_acked"], v["peers_told"]
            );
        }
        Cmd::Status { .. } => {
            let v = client.get("/v1/status").await?;
            if cli.json {
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
        }
        Cmd::Trace { id, .. } => {
            let v = client.get(&format!("/v1/trace/{id}")).await?;
            if cli.json {
                return print_json(&v);
            }
            let nodes: Vec<TraceNode> = api::decode(v["events"].clone())?;
            println!(
                "correlation {}",
                v["correlation_id"].as_str().unwrap_or("?")
            );
            for n in nodes {
                let mark = if n.event.id == id { "  <=" } else { "" };
                println!(
                    "{}{} {} {} {}{}",
                    "  ".repeat(n.depth),
                    if n.depth > 0 { "└─" } else { "●" },
                    n.event.event_type,
                    n.event.id,
                    n.event.payload,
                    mark
                );
            }
        }
        Cmd::Blob { op } => blob_cmd(&client, op, cli.json).await?,
        Cmd::Sync {
            op: SyncOp::Status { .. },
        } => {
            let v = client.get("/v1/sync").await?;
            if cli.json {
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
                    &t["blob"].as_str().unwrap_or("")
                        [..12.min(t["blob"].as_str().unwrap_or("").len())],
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
                    &f["blob"].as_str().unwrap_or("")
                        [..12.min(f["blob"].as_str().unwrap_or("").len())],
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
        }
        Cmd::Types { .. } => {
            let v = client.get("/v1/types").await.or_else(|_| -> anyhow::Result<Value> {
                // The catalog is compiled in: answer without an agent too.
                Ok(json!({ "types": riftmesh::event::CATALOG.iter().map(|t| json!({"name": t.name, "category": t.category, "aliases": t.aliases, "description": t.description})).collect::<Vec<_>>() }))
            })?;
            if cli.json {
                return print_json(&v);
            }
            for t in v["types"].as_array().cloned().unwrap_or_default() {
                let aliases: Vec<&str> = t["aliases"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                println!(
                    "{:<28} {:<20} {}{}",
                    t["name"].as_str().unwrap_or(""),
                    t["category"].as_str().unwrap_or(""),
                    t["description"].as_str().unwrap_or(""),
                    if aliases.is_empty() {
                        String::new()
                    } else {
                        format!("  (also {})", aliases.join(", "))
                    }
                );
            }
        }
    }
    Ok(())
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

fn emit(json_out: bool, events: &[EventView]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for e in events {
        if json_out {
            writeln!(out, "{}", serde_json::to_string(e)?)?;
        } else {
            writeln!(out, "{}", event_line(e))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Run `call` again while the agent is unreachable (restarting), saying so
/// once; used by `--follow`, which rides out a restart.
async fn riding<T, F, Fut>(follow: bool, mut call: F) -> Result<T, api::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, api::ClientError>>,
{
    let mut said = false;
    loop {
        match call().await {
            Err(e @ api::ClientError::Unreachable { .. }) if follow => {
                if !said {
                    eprintln!("riftmesh: {e}; waiting for the agent to come back");
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Ok(v) => {
                if said {
                    eprintln!("riftmesh: the agent answers again; following on");
                }
                return Ok(v);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn history(
    client: &Client,
    json_out: bool,
    types: Vec<String>,
    follow: bool,
    from_start: bool,
    since: Option<String>,
    max: usize,
) -> anyhow::Result<()> {
    let mut q: Vec<(&str, String)> = vec![("limit", max.to_string())];
    if !types.is_empty() {
        q.push(("types", types.join(",")));
    }
    let mut after: Option<u64> = None;
    if let Some(s) = since {
        q.push(("since", s));
    } else if !from_start {
        // Without a start: the newest `max` matching events, oldest first,
        // paging back through at most a few scans of the log.
        let mut newest: Vec<EventView> = Vec::new();
        let mut before: Option<u64> = None;
        let head = loop {
            let mut query = q.clone();
            query.push(("order", "desc".into()));
            if let Some(b) = before {
                query.push(("before", b.to_string()));
            }
            let v = riding(follow, || client.get_query("/v1/events", &query)).await?;
            let page: Vec<EventView> = api::decode(v["events"].clone())?;
            newest.extend(page);
            let head = v["head"].as_u64().unwrap_or(0);
            before = v["next_before"].as_u64();
            if newest.len() >= max || v["done"].as_bool() != Some(false) {
                break head;
            }
        };
        newest.truncate(max);
        newest.reverse();
        emit(json_out, &newest)?;
        if !follow {
            return Ok(());
        }
        after = Some(head);
    }
    loop {
        let mut query = q.clone();
        if let Some(a) = after {
            query.retain(|(k, _)| *k != "since");
            query.push(("after", a.to_string()));
        }
        let v = riding(follow, || client.get_query("/v1/events", &query)).await?;
        let events: Vec<EventView> = api::decode(v["events"].clone())?;
        emit(json_out, &events)?;
        let next = v["next_after"].as_u64().unwrap_or(0);
        let head = v["head"].as_u64().unwrap_or(0);
        after = Some(next.max(after.unwrap_or(0)));
        if next >= head {
            if !follow {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// Where a consumer created by `events --consumer` starts.
struct Start {
    from_start: bool,
    since: Option<String>,
}

/// Read as a durable consumer. An existing consumer is looked at, never
/// changed, unless `update` (then its type filter becomes `types`).
#[allow(clippy::too_many_arguments)]
async fn consume(
    client: &Client,
    json_out: bool,
    name: &str,
    types: Vec<String>,
    update: bool,
    follow: bool,
    start: Start,
    max: usize,
) -> anyhow::Result<()> {
    let path = format!("/v1/consumers/{name}");
    let existing = match client.get(&path).await {
        Ok(v) => Some(api::decode::<api::ConsumerView>(v)?),
        Err(api::ClientError::Refused { status: 404, .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let mut body = json!({});
    if start.from_start {
        body["from_start"] = json!(true);
    }
    if let Some(s) = &start.since {
        body["since"] = json!(s);
    }
    match &existing {
        None => {
            if !types.is_empty() {
                body["types"] = json!(types);
            }
            client.put(&path, &body).await?;
        }
        Some(c) => {
            if update {
                body["types"] = json!(types);
                client.put(&path, &body).await?;
            } else {
                if !types.is_empty() {
                    let want: Vec<String> = types
                        .iter()
                        .map(|t| {
                            riftmesh::event::TypePattern::parse(t)
                                .map(|p| p.as_str().to_string())
                                .unwrap_or_else(|_| t.clone())
                        })
                        .collect();
                    let (mut a, mut b) = (want.clone(), c.types.clone());
                    a.sort();
                    b.sort();
                    if a != b {
                        bail!(
                            "consumer {name} reads types [{}], not [{}]; pass --update to change its filter",
                            c.types.join(", "),
                            want.join(", ")
                        );
                    }
                }
                if start.from_start || start.since.is_some() {
                    // Moving an existing consumer's cursor is a change too.
                    client.put(&path, &body).await?;
                }
            }
        }
    }
    let wait = if follow { 25_000 } else { 0 };
    let (events_path, ack_path) = (
        format!("/v1/consumers/{name}/events"),
        format!("/v1/consumers/{name}/ack"),
    );
    loop {
        let query = [("max", max.to_string()), ("wait_ms", wait.to_string())];
        let v = riding(follow, || client.get_query(&events_path, &query)).await?;
        let r: FetchResp = api::decode(v)?;
        if r.missed > 0 {
            eprintln!("riftmesh: consumer {name} missed {} event(s) removed by retention before they were acknowledged", r.missed);
        }
        emit(json_out, &r.events)?;
        // Acknowledge only after the batch is written out.
        if let Some(last) = r.events.last() {
            let ack = json!({ "seq": last.seq });
            riding(follow, || client.post(&ack_path, &ack)).await?;
        }
        if r.events.is_empty() && !follow {
            return Ok(());
        }
    }
}

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

async fn consumer_op(client: &Client, json_out: bool, op: ConsumerOp) -> anyhow::Result<()> {
    let header = format!(
        "{:<24} {:<32} {:>8} {:>10} {:>6}  {}",
        "NAME", "TYPES", "CURSOR", "PENDING", "DEAD", "LAST ACK"
    );
    match op {
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

#[cfg(test)]
mod tests {
    use super::HolderDeadline;
    use std::time::Duration;

    #[test]
    fn the_holder_stops_its_command_before_the_lease_can_end() {
        let sent = tokio::time::Instant::now();
        for ttl in [0.5, 2.0, 6.0, 30.0, 600.0] {
            let d = HolderDeadline::new(sent, ttl);
            let lease_end = sent + Duration::from_secs_f64(ttl);
            // SIGKILL before the lease ends, with room for clock-rate drift.
            let slack = lease_end - d.kill;
            assert!(
                slack >= Duration::from_secs_f64(ttl * HolderDeadline::DRIFT),
                "{ttl}"
            );
            // SIGTERM a grace before, and the grace scales with the TTL.
            assert_eq!(
                d.kill - d.term,
                HolderDeadline::grace(ttl).min(d.kill - sent)
            );
            assert!(d.term >= sent);
        }
        assert_eq!(HolderDeadline::grace(2.0), Duration::from_millis(500));
        assert_eq!(HolderDeadline::grace(600.0), Duration::from_secs(10));
    }
}
