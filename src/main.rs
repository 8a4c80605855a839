//! The `riftmesh` command line: parsing (the clap definitions) and
//! dispatch; the commands are in `cli/`, the agent in the library.
//!
//! `cli` is a module of the binary, not of the library: the library (and
//! what links it: tests, benches) carries no command-line code.

mod cli;

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use riftmesh::api::Client;
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
    /// File holding the agent's API token, sent as `Authorization: Bearer`
    /// [default: <data-dir>/api.token, when that data directory's agent is
    /// the one at --api].
    #[arg(long, env = "RIFTMESH_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// The local agent's data directory, where its API token is looked for
    /// [default: ./riftmesh-data].
    #[arg(long, env = "RIFTMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (one per host).
    Agent(AgentArgs),
    /// Write a new swarm key (go-libp2p /key/swarm/psk/1.0.0/ format).
    /// With --json (which needs --out): what was written, as JSON, never the key.
    Keygen {
        /// Where to write it; standard output if absent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Publish an event through the local agent.
    Publish(PublishArgs),
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
    /// Content-addressed blobs (models, game data): add, list, get, forget.
    Blob {
        #[command(subcommand)]
        op: BlobOp,
    },
    /// Blob transfers in flight and recent failures.
    Sync {
        #[command(subcommand)]
        op: TransfersOp,
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

// `riftmesh publish`'s arguments (a plain comment: the help text is the variant's).
#[derive(clap::Args)]
struct PublishArgs {
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
    /// Name of the publishing component (the event's `source`, as in
    /// `source="training_daemon"`); `--origin` is its older name.
    #[arg(long, alias = "origin")]
    source: Option<String>,
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
        /// The naming event's source: the component naming the blob
        /// (default riftmesh/blob).
        #[arg(long)]
        source: Option<String>,
        /// The run the naming event belongs to; every host's
        /// MODEL_DISTRIBUTED / DATA_SYNC_* carries it, so `trace` of the run
        /// reaches each placement.
        #[arg(long)]
        correlation_id: Option<String>,
        /// Id of the event that led to this naming (e.g. the
        /// EVALUATION_COMPLETED that promoted the model).
        #[arg(long)]
        parent_id: Option<String>,
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
    /// Retract NAME cluster-wide (BLOB_FORGOTTEN): no host fetches it or
    /// retries it any more and it no longer resolves, until it is named
    /// again. Files already placed stay; the blob is collected once unnamed.
    Forget {
        /// The name, e.g. models/hex8_2p.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum ConsumerOp {
    /// Every consumer of this agent: types, cursor, matching events pending.
    List {
        /// Instead: how many consumers each live host of the cluster has
        /// per type pattern, and the total (from the health records).
        #[arg(long)]
        cluster: bool,
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
            ConsumerOp::List { conn, .. }
            | ConsumerOp::Show { conn, .. }
            | ConsumerOp::Nack { conn, .. }
            | ConsumerOp::DeadLetters { conn, .. }
            | ConsumerOp::Delete { conn, .. } => conn,
        }
    }
}

// `riftmesh sync …`: blob transfers (the command keeps its name; the Rust
// names say "transfers", as "sync" also names catch-up and fsync).
#[derive(Subcommand)]
enum TransfersOp {
    /// Transfers in flight (bytes, rate, sources, ETA) and recent failures.
    Status {
        /// Refresh every --interval until ctrl-c (redrawn on a terminal; a
        /// new table each time on a pipe, a JSON object a line with --json).
        #[arg(long)]
        watch: bool,
        /// How often --watch refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
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
        /// Wait for the lock while it is held (or no leader can grant it),
        /// saying on stderr what it waits for, instead of failing.
        #[arg(long)]
        wait: bool,
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

fn main() {
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
    let parsed = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = match parsed.cmd {
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
            cli::config::check(file.clone(), args, sub, parsed.json)
        }
        Cmd::Completion { shell } => cli::config::completion(shell),
        Cmd::Man { ref out_dir } => cli::config::man(out_dir.as_deref()),
        _ => run_client(parsed).await,
    };
    if let Err(e) = result {
        eprintln!("riftmesh: {e:#}");
        std::process::exit(cli::exit::exit_code(&e));
    }
}

/// How a client command was told to reach the local agent (None: the
/// command needs no agent).
fn conn_of(cmd: &Cmd) -> Option<&Conn> {
    match cmd {
        Cmd::Publish(PublishArgs { conn, .. })
        | Cmd::Events { conn, .. }
        | Cmd::Peers { conn }
        | Cmd::Members { conn }
        | Cmd::Report { conn, .. }
        | Cmd::Leave { conn }
        | Cmd::Leader { conn }
        | Cmd::Run { conn, .. }
        | Cmd::Status { conn }
        | Cmd::Trace { conn, .. }
        | Cmd::Types { conn } => Some(conn),
        Cmd::Lock { op } => Some(op.conn()),
        Cmd::Consumer { op } => Some(op.conn()),
        Cmd::Blob {
            op:
                BlobOp::Add { conn, .. }
                | BlobOp::List { conn }
                | BlobOp::Get { conn, .. }
                | BlobOp::Forget { conn, .. },
        }
        | Cmd::Sync {
            op: TransfersOp::Status { conn, .. },
        } => Some(conn),
        Cmd::Agent(_)
        | Cmd::Keygen { .. }
        | Cmd::Config { .. }
        | Cmd::Completion { .. }
        | Cmd::Man { .. } => None,
    }
}

/// Every command but `agent`, `config`, `completion` and `man`.
async fn run_client(parsed: Cli) -> anyhow::Result<()> {
    let client = match conn_of(&parsed.cmd) {
        Some(conn) => Client::new(&conn.api).with_token(cli::token::client_token(
            &conn.api,
            conn.api_token_file.as_deref(),
            conn.data_dir.as_deref(),
        )?),
        None => Client::new(DEFAULT_API),
    };
    let json_out = parsed.json;
    let c = &client;
    match parsed.cmd {
        Cmd::Agent(_) | Cmd::Config { .. } | Cmd::Completion { .. } | Cmd::Man { .. } => {
            unreachable!("handled in main")
        }
        Cmd::Keygen { out, force } => cli::config::keygen(out, force, json_out),
        Cmd::Publish(args) => cli::events::publish(c, json_out, args).await,
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
            None => cli::events::history(c, json_out, types, follow, from_start, since, max).await,
            Some(name) => {
                let start = cli::events::Start { from_start, since };
                cli::events::consume(c, json_out, &name, types, update, follow, start, max).await
            }
        },
        Cmd::Consumer { op } => cli::consumers::run(c, json_out, op).await,
        Cmd::Peers { .. } => cli::cluster::peers(c, json_out).await,
        Cmd::Members { .. } => cli::cluster::members(c, json_out).await,
        Cmd::Report { values, ttl, .. } => cli::cluster::report(c, json_out, values, ttl).await,
        Cmd::Leader { .. } => cli::cluster::leader(c, json_out).await,
        Cmd::Lock { op } => cli::locks::run(c, json_out, op).await,
        Cmd::Run { cmd, .. } => {
            let code = cli::lockrun::run_if_leader(c, &cmd).await?;
            std::process::exit(code);
        }
        Cmd::Leave { .. } => cli::cluster::leave(c, json_out).await,
        Cmd::Status { .. } => cli::cluster::status(c, json_out).await,
        Cmd::Trace { id, .. } => cli::events::trace(c, json_out, &id).await,
        Cmd::Blob { op } => cli::blobs::run(c, op, json_out).await,
        Cmd::Sync {
            op: TransfersOp::Status {
                watch, interval, ..
            },
        } => cli::blobs::transfers(c, json_out, watch.then_some(interval)).await,
        Cmd::Types { .. } => cli::events::types(c, json_out).await,
    }
}
