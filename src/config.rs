//! Agent configuration: embedded defaults, then a TOML file (`--config`), then
//! `RIFTMESH_*` environment variables, then flags; later wins. Every value is
//! checked at start and a bad one is reported with the key and where it came from.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use libp2p::Multiaddr;
use serde::Deserialize;

pub const DEFAULT_API: &str = "127.0.0.1:7411";
pub const DEFAULT_METRICS: &str = "0.0.0.0:9464";
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/4001";
pub const DEFAULT_DATA_DIR: &str = "./riftmesh-data";

/// Flags of `riftmesh agent`. Each also reads `RIFTMESH_<NAME>`.
#[derive(Args, Debug, Default, Clone)]
pub struct AgentArgs {
    /// TOML configuration file.
    #[arg(long, env = "RIFTMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// This host's name in the cluster [default: the hostname].
    #[arg(long, env = "RIFTMESH_NAME")]
    pub name: Option<String>,
    /// Data directory (identity, swarm key, event store) [default: ./riftmesh-data].
    #[arg(long, env = "RIFTMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Multiaddr to listen on for peers; repeatable [default: /ip4/0.0.0.0/tcp/4001].
    #[arg(long, env = "RIFTMESH_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Multiaddr of a peer to join through; repeatable.
    #[arg(long, env = "RIFTMESH_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// Swarm key file (go-libp2p /key/swarm/psk/1.0.0/ format) [default: <data-dir>/swarm.key, created if missing].
    #[arg(long, env = "RIFTMESH_SWARM_KEY")]
    pub swarm_key: Option<PathBuf>,
    /// Local HTTP API address [default: 127.0.0.1:7411].
    #[arg(long, env = "RIFTMESH_API")]
    pub api: Option<String>,
    /// Prometheus /metrics address [default: 0.0.0.0:9464].
    #[arg(long, env = "RIFTMESH_METRICS")]
    pub metrics: Option<String>,
    /// Turn off mDNS discovery on the local network.
    #[arg(long, env = "RIFTMESH_NO_MDNS")]
    pub no_mdns: bool,
    /// Accept fault-injection calls (/v1/debug/*) on the local API; for tests and testnet only.
    #[arg(long, env = "RIFTMESH_FAULT_INJECTION")]
    pub fault_injection: bool,
    /// Log format: text or json [default: text].
    #[arg(long, env = "RIFTMESH_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// A directory under which `POST /v1/blobs {"path": …}` may make the
    /// agent read files; repeatable [default: none: blobs come as uploaded
    /// bytes, as `riftmesh blob add` sends them].
    #[arg(long, env = "RIFTMESH_BLOB_ROOTS", value_delimiter = ',')]
    pub blob_root: Vec<PathBuf>,
}

/// The TOML file. Every key is optional; unknown keys are an error.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<Vec<String>>,
    pub bootstrap: Option<Vec<String>>,
    pub swarm_key: Option<PathBuf>,
    pub api: Option<String>,
    pub metrics: Option<String>,
    pub mdns: Option<bool>,
    pub alone_warning_after: Option<String>,
    pub log_format: Option<String>,
    pub max_event_bytes: Option<usize>,
    pub api_max_body_bytes: Option<usize>,
    pub dedup_window: Option<String>,
    pub dedup_max_entries: Option<u64>,
    pub repeat_window: Option<String>,
    pub repeat_windows: Option<std::collections::BTreeMap<String, String>>,
    pub retention_age: Option<String>,
    pub retention_max_events: Option<u64>,
    pub retention_max_bytes: Option<u64>,
    pub store_min_free: Option<String>,
    pub inbound_queue: Option<usize>,
    pub max_batch: Option<usize>,
    pub order_hold: Option<String>,
    pub order_max_held: Option<usize>,
    pub summary_every_secs: Option<u64>,
    pub fault_injection: Option<bool>,
    pub tags: Option<std::collections::BTreeMap<String, String>>,
    pub health_interval: Option<String>,
    pub ping_interval: Option<String>,
    pub suspect_after: Option<String>,
    pub probe_timeout: Option<String>,
    pub indirect_probes: Option<usize>,
    pub suspect_min: Option<String>,
    pub suspect_max: Option<String>,
    pub member_forget_after: Option<String>,
    pub nvidia_smi: Option<String>,
    pub voters: Option<Vec<String>>,
    pub election_timeout: Option<String>,
    pub want: Option<Vec<crate::blob::Want>>,
    pub blob_chunk_size: Option<String>,
    pub blob_budget: Option<String>,
    pub blob_reserve: Option<String>,
    pub blob_retention: Option<String>,
    pub sync_transfers: Option<usize>,
    pub sync_upload_rate: Option<String>,
    pub sync_download_rate: Option<String>,
    pub max_connections: Option<u32>,
    pub max_connections_per_peer: Option<u32>,
    pub max_pending_incoming: Option<u32>,
    pub peer_request_rate: Option<RequestRatesFile>,
    pub gossip_source_rate: Option<u32>,
    pub gossip_source_burst: Option<u32>,
    pub blob_roots: Option<Vec<PathBuf>>,
    pub api_hosts: Option<Vec<String>>,
    pub strict_types: Option<bool>,
    pub custom_types: Option<Vec<String>>,
}

/// `peer_request_rate = { catchup = 500, member = 200, raft = 2000, blob = 5000 }`:
/// inbound requests per second per peer, per protocol; omitted keys keep their default.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RequestRatesFile {
    pub catchup: Option<u32>,
    pub member: Option<u32>,
    pub raft: Option<u32>,
    pub blob: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The resolved configuration of one agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub swarm_key: Option<PathBuf>,
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    pub mdns: bool,
    /// Without bootstrap addresses: how long without any peer before the
    /// agent warns (once) that it is a cluster of one; zero: never.
    pub alone_warning_after: Duration,
    pub log_format: LogFormat,
    /// Largest gossip frame; an event must fit in it.
    pub max_event_bytes: usize,
    pub api_max_body_bytes: usize,
    pub dedup_window: Duration,
    pub dedup_max_entries: u64,
    /// Without an idempotency key, the same type and content is one fact
    /// only within this distance of publication times (0: never).
    pub repeat_window: Duration,
    /// Per canonical type, instead of `repeat_window`.
    pub repeat_windows: std::collections::HashMap<String, Duration>,
    pub retention_age: Duration,
    pub retention_max_events: u64,
    pub retention_max_bytes: u64,
    /// Free bytes kept on the event store's filesystem: below it, publishes
    /// and consumer changes are refused (Raft and blob records still write).
    pub store_min_free: u64,
    pub inbound_queue: usize,
    /// Most events in one batch publish.
    pub max_batch: usize,
    /// How long a source's later event waits for a missing earlier one.
    pub order_hold: Duration,
    /// Most events held waiting for earlier ones, all sources together.
    pub order_max_held: usize,
    /// Seconds between version-vector summaries with a random peer.
    pub summary_every_secs: u64,
    /// Accept fault-injection calls on the local API (tests, testnet).
    pub fault_injection: bool,
    /// This host's tags (`role = "training"`), carried in its health record.
    pub tags: Vec<(String, String)>,
    /// How often health is sampled and exchanged with every peer.
    pub health_interval: Duration,
    /// libp2p ping interval on every connection.
    pub ping_interval: Duration,
    /// Failure detector thresholds: the same on every node (see proto-notes/membership.md).
    pub detector: crate::membership::detector::DetectorConfig,
    /// Command that reports GPUs ("" to not look for GPUs).
    pub nvidia_smi: String,
    /// Names of the hosts that elect the leader (3 or 5), the same list on
    /// every host; empty: this cluster has no leader.
    pub voters: Vec<String>,
    /// Raft election timeout, low end (the high end is twice it; heartbeats
    /// every fifth of it). The leader's lease is this long.
    pub election_timeout: Duration,
    /// Blob sync: wants, sizes, limits (proto-notes/sync.md).
    pub sync: crate::blob::SyncConfig,
    /// Connection limits and per-peer / per-source rates (proto-notes/security.md).
    pub limits: crate::limits::NetLimits,
    /// Directories (canonical) under which the API may read a file named by
    /// a request; empty by default (proto-notes/security.md).
    pub blob_roots: Vec<PathBuf>,
    /// Host names, besides loopback names and addresses, that the API
    /// accepts in a request's `Host` header.
    pub api_hosts: Vec<String>,
    /// Refuse local publishes and consumer filters naming a type that is
    /// neither in the catalog nor in `custom_types`.
    pub strict_types: bool,
    /// Custom type names this cluster uses (canonical form).
    pub custom_types: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key} = {value:?} (from {origin}): {reason}")]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub origin: String,
    pub reason: String,
}

fn origin_of(m: Option<&ArgMatches>, id: &str, env: &str) -> String {
    match m.and_then(|m| m.value_source(id)) {
        Some(ValueSource::EnvVariable) => format!("environment {env}"),
        Some(ValueSource::CommandLine) => format!("flag --{}", id.replace('_', "-")),
        _ => "command line".into(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "riftmesh".into())
}

/// A byte size: `1048576`, `512KiB`, `1MiB`, `500 GiB`, `2GB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{e} (write e.g. 1048576, 4MiB, 500GiB)"))
}

/// 1-based line and column (in characters) of a byte offset in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (write e.g. 30s, 10m, 24h, 7d)"))
}

impl AgentConfig {
    /// Resolve from flags/env (`args`, with `matches` to tell which was which),
    /// the TOML file they name, and the defaults.
    pub fn resolve(args: &AgentArgs, matches: Option<&ArgMatches>) -> Result<Self, ConfigError> {
        let err = |key: &str, value: &str, origin: String, reason: String| ConfigError {
            key: key.into(),
            value: value.into(),
            origin,
            reason,
        };
        let (file, file_origin) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    err(
                        "config",
                        &path.display().to_string(),
                        origin_of(matches, "config", "RIFTMESH_CONFIG"),
                        e.to_string(),
                    )
                })?;
                let f: FileConfig = toml::from_str(&text).map_err(|e| {
                    err(
                        "config",
                        &path.display().to_string(),
                        format!("file {}", path.display()),
                        e.span()
                            .map(|s| {
                                let (line, col) = line_col(&text, s.start);
                                format!("line {line}, column {col}: ")
                            })
                            .unwrap_or_default()
                            + e.message().trim_end(),
                    )
                })?;
                (f, format!("file {}", path.display()))
            }
            None => (FileConfig::default(), String::new()),
        };
        // Pick flag/env, then file, then default, and remember where it came from.
        macro_rules! pick {
            ($key:literal, $env:literal, $arg:expr, $file:expr, $default:expr) => {
                match ($arg, $file) {
                    (Some(v), _) => (v, origin_of(matches, $key, $env)),
                    (None, Some(v)) => (v, file_origin.clone()),
                    (None, None) => ($default, "default".to_string()),
                }
            };
        }
        let (name, name_o) = pick!(
            "name",
            "RIFTMESH_NAME",
            args.name.clone(),
            file.name,
            hostname()
        );
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(err(
                "name",
                &name,
                name_o,
                "use 1-64 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        let (data_dir, _) = pick!(
            "data_dir",
            "RIFTMESH_DATA_DIR",
            args.data_dir.clone(),
            file.data_dir,
            PathBuf::from(DEFAULT_DATA_DIR)
        );
        let (listen, listen_o) = pick!(
            "listen",
            "RIFTMESH_LISTEN",
            (!args.listen.is_empty()).then(|| args.listen.clone()),
            file.listen,
            vec![DEFAULT_LISTEN.to_string()]
        );
        let listen = listen
            .iter()
            .map(|s| {
                s.trim()
                    .parse::<Multiaddr>()
                    .map_err(|e| err("listen", s, listen_o.clone(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if listen.is_empty() {
            return Err(err(
                "listen",
                "",
                listen_o,
                "at least one address is needed".into(),
            ));
        }
        let (bootstrap, boot_o) = pick!(
            "bootstrap",
            "RIFTMESH_BOOTSTRAP",
            (!args.bootstrap.is_empty()).then(|| args.bootstrap.clone()),
            file.bootstrap,
            Vec::new()
        );
        let bootstrap = bootstrap
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<Multiaddr>()
                    .map_err(|e| err("bootstrap", s, boot_o.clone(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let swarm_key = args.swarm_key.clone().or(file.swarm_key);
        let (api, api_o) = pick!(
            "api",
            "RIFTMESH_API",
            args.api.clone(),
            file.api,
            DEFAULT_API.to_string()
        );
        let api: SocketAddr = api.parse().map_err(|e: std::net::AddrParseError| {
            err(
                "api",
                &api,
                api_o,
                format!("{e} (write host:port, e.g. 127.0.0.1:7411)"),
            )
        })?;
        let (metrics, m_o) = pick!(
            "metrics",
            "RIFTMESH_METRICS",
            args.metrics.clone(),
            file.metrics,
            DEFAULT_METRICS.to_string()
        );
        let metrics: SocketAddr = metrics.parse().map_err(|e: std::net::AddrParseError| {
            err(
                "metrics",
                &metrics,
                m_o,
                format!("{e} (write host:port, e.g. 0.0.0.0:9464)"),
            )
        })?;
        let mdns = if args.no_mdns {
            false
        } else {
            file.mdns.unwrap_or(true)
        };
        let (lf, lf_o) = pick!(
            "log_format",
            "RIFTMESH_LOG_FORMAT",
            args.log_format.clone(),
            file.log_format,
            "text".to_string()
        );
        let log_format = match lf.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(err("log_format", &lf, lf_o, "use text or json".into())),
        };
        let dur =
            |key: &str, v: Option<String>, default: Duration| -> Result<Duration, ConfigError> {
                match v {
                    None => Ok(default),
                    Some(s) => parse_duration(&s).map_err(|r| err(key, &s, file_origin.clone(), r)),
                }
            };
        let positive = |key: &str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            match v {
                Some(0) => Err(err(
                    key,
                    "0",
                    file_origin.clone(),
                    "must be greater than 0".into(),
                )),
                Some(v) => Ok(v),
                None => Ok(default),
            }
        };
        let max_event_bytes = positive(
            "max_event_bytes",
            file.max_event_bytes.map(|v| v as u64),
            256 * 1024,
        )? as usize;
        if !(4096..=8 << 20).contains(&max_event_bytes) {
            return Err(err(
                "max_event_bytes",
                &max_event_bytes.to_string(),
                file_origin,
                "must be between 4096 and 8388608".into(),
            ));
        }
        let mut tags = Vec::new();
        for (k, v) in file.tags.unwrap_or_default() {
            let ok = |t: &str| {
                !t.is_empty()
                    && t.len() <= 64
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
            };
            if !ok(&k) || !ok(&v) {
                return Err(err(
                    "tags",
                    &format!("{k} = {v}"),
                    file_origin.clone(),
                    "tag names and values are 1-64 letters, digits or -_./:".into(),
                ));
            }
            tags.push((k, v));
        }
        let health_interval = dur(
            "health_interval",
            file.health_interval,
            Duration::from_secs(5),
        )?;
        let ping_interval = dur("ping_interval", file.ping_interval, Duration::from_secs(2))?;
        let dflt = crate::membership::detector::DetectorConfig::default();
        let detector = crate::membership::detector::DetectorConfig {
            suspect_after: dur("suspect_after", file.suspect_after, dflt.suspect_after)?,
            probe_timeout: dur("probe_timeout", file.probe_timeout, dflt.probe_timeout)?,
            indirect_probes: positive(
                "indirect_probes",
                file.indirect_probes.map(|v| v as u64),
                dflt.indirect_probes as u64,
            )? as usize,
            suspect_min: dur("suspect_min", file.suspect_min, dflt.suspect_min)?,
            suspect_max: dur("suspect_max", file.suspect_max, dflt.suspect_max)?,
            forget_after: dur(
                "member_forget_after",
                file.member_forget_after,
                dflt.forget_after,
            )?,
            tick: dflt.tick,
        };
        for (key, d) in [
            ("health_interval", health_interval),
            ("ping_interval", ping_interval),
            ("probe_timeout", detector.probe_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(err(
                    key,
                    &format!("{d:?}"),
                    file_origin.clone(),
                    "must be at least 100ms".into(),
                ));
            }
        }
        if detector.suspect_after <= ping_interval {
            return Err(err(
                "suspect_after",
                &format!("{:?}", detector.suspect_after),
                file_origin.clone(),
                format!("must be longer than ping_interval ({ping_interval:?}), or every pause between pings looks like a failure"),
            ));
        }
        if detector.suspect_max < detector.suspect_min {
            return Err(err(
                "suspect_max",
                &format!("{:?}", detector.suspect_max),
                file_origin.clone(),
                "must be at least suspect_min".into(),
            ));
        }
        let voters = file.voters.unwrap_or_default();
        {
            let mut seen = std::collections::HashSet::new();
            for v in &voters {
                if !seen.insert(v.as_str()) {
                    return Err(err(
                        "voters",
                        v,
                        file_origin.clone(),
                        "a voter is named twice".into(),
                    ));
                }
            }
            if voters.len() > 9 {
                return Err(err(
                    "voters",
                    &voters.len().to_string(),
                    file_origin.clone(),
                    "name 3 or 5 stable hosts (at most 9)".into(),
                ));
            }
        }
        let election_timeout = dur(
            "election_timeout",
            file.election_timeout,
            Duration::from_millis(350),
        )?;
        if election_timeout < Duration::from_millis(150) {
            return Err(err(
                "election_timeout",
                &format!("{election_timeout:?}"),
                file_origin.clone(),
                "must be at least 150ms".into(),
            ));
        }
        let size = |key: &str, v: Option<String>, default: u64| -> Result<u64, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) => parse_size(&s).map_err(|r| err(key, &s, file_origin.clone(), r)),
            }
        };
        let sd = crate::blob::SyncConfig::default();
        let chunk = size(
            "blob_chunk_size",
            file.blob_chunk_size,
            u64::from(sd.chunk_size),
        )?;
        if !(u64::from(crate::blob::store::MIN_CHUNK)..=u64::from(crate::blob::store::MAX_CHUNK))
            .contains(&chunk)
        {
            return Err(err(
                "blob_chunk_size",
                &chunk.to_string(),
                file_origin.clone(),
                "must be between 64KiB and 8MiB".into(),
            ));
        }
        let wants = file.want.unwrap_or_default();
        for w in &wants {
            w.check()
                .map_err(|r| err("want", &w.names, file_origin.clone(), r))?;
        }
        let sync = crate::blob::SyncConfig {
            wants,
            chunk_size: chunk as u32,
            budget: size("blob_budget", file.blob_budget, sd.budget)?,
            reserve: size("blob_reserve", file.blob_reserve, sd.reserve)?,
            transfers: positive(
                "sync_transfers",
                file.sync_transfers.map(|v| v as u64),
                sd.transfers as u64,
            )? as usize,
            upload_rate: size("sync_upload_rate", file.sync_upload_rate, 0)?,
            download_rate: size("sync_download_rate", file.sync_download_rate, 0)?,
            retention: dur("blob_retention", file.blob_retention, sd.retention)?,
            per_source: sd.per_source,
        };
        let limits = {
            use crate::limits as l;
            let n = |key: &str, v: Option<u32>, default: u32| -> Result<u32, ConfigError> {
                Ok(
                    positive(key, v.map(u64::from), u64::from(default))?.min(u64::from(u32::MAX))
                        as u32,
                )
            };
            let rr = file.peer_request_rate.unwrap_or_default();
            l::NetLimits {
                max_connections: n(
                    "max_connections",
                    file.max_connections,
                    l::DEFAULT_MAX_CONNECTIONS,
                )?,
                max_connections_per_peer: n(
                    "max_connections_per_peer",
                    file.max_connections_per_peer,
                    l::DEFAULT_MAX_CONNECTIONS_PER_PEER,
                )?,
                max_pending_incoming: n(
                    "max_pending_incoming",
                    file.max_pending_incoming,
                    l::DEFAULT_MAX_PENDING_INCOMING,
                )?,
                request_rates: l::RequestRates {
                    catchup: n(
                        "peer_request_rate.catchup",
                        rr.catchup,
                        l::DEFAULT_RATE_CATCHUP,
                    )?,
                    member: n(
                        "peer_request_rate.member",
                        rr.member,
                        l::DEFAULT_RATE_MEMBER,
                    )?,
                    raft: n("peer_request_rate.raft", rr.raft, l::DEFAULT_RATE_RAFT)?,
                    blob: n("peer_request_rate.blob", rr.blob, l::DEFAULT_RATE_BLOB)?,
                },
                gossip_source_rate: n(
                    "gossip_source_rate",
                    file.gossip_source_rate,
                    l::DEFAULT_GOSSIP_SOURCE_RATE,
                )?,
                gossip_source_burst: n(
                    "gossip_source_burst",
                    file.gossip_source_burst,
                    l::DEFAULT_GOSSIP_SOURCE_BURST,
                )?,
            }
        };
        // Roots are canonical so that a request's canonical path compares
        // with them directly; a root that does not exist is a mistake.
        let roots_from_flag = !args.blob_root.is_empty();
        let blob_roots = if roots_from_flag {
            args.blob_root.clone()
        } else {
            file.blob_roots.unwrap_or_default()
        };
        let blob_roots = blob_roots
            .into_iter()
            .map(|r| {
                std::fs::canonicalize(&r).map_err(|e| {
                    let origin = if roots_from_flag {
                        origin_of(matches, "blob_root", "RIFTMESH_BLOB_ROOTS")
                    } else {
                        file_origin.clone()
                    };
                    err(
                        "blob_roots",
                        &r.display().to_string(),
                        origin,
                        e.to_string(),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let repeat_windows = file
            .repeat_windows
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(t, w)| {
                let key = format!("repeat_windows.{t}");
                let t = crate::event::normalize_type(&t)
                    .map_err(|e| err(&key, &t, file_origin.clone(), e.to_string()))?;
                let w = parse_duration(&w).map_err(|r| err(&key, &w, file_origin.clone(), r))?;
                Ok((t, w))
            })
            .collect::<Result<std::collections::HashMap<_, _>, ConfigError>>()?;
        let custom_types = file
            .custom_types
            .unwrap_or_default()
            .iter()
            .map(|t| {
                crate::event::normalize_type(t)
                    .map_err(|e| err("custom_types", t, file_origin.clone(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AgentConfig {
            limits,
            name,
            data_dir,
            listen,
            bootstrap,
            swarm_key,
            api,
            metrics,
            mdns,
            alone_warning_after: dur(
                "alone_warning_after",
                file.alone_warning_after,
                Duration::from_secs(60),
            )?,
            log_format,
            max_event_bytes,
            api_max_body_bytes: positive(
                "api_max_body_bytes",
                file.api_max_body_bytes.map(|v| v as u64),
                8 << 20,
            )? as usize,
            dedup_window: dur(
                "dedup_window",
                file.dedup_window,
                Duration::from_secs(24 * 3600),
            )?,
            dedup_max_entries: positive("dedup_max_entries", file.dedup_max_entries, 5_000_000)?,
            repeat_window: dur(
                "repeat_window",
                file.repeat_window.clone(),
                Duration::from_secs(30),
            )?,
            repeat_windows,
            retention_age: dur(
                "retention_age",
                file.retention_age,
                Duration::from_secs(7 * 24 * 3600),
            )?,
            retention_max_events: positive(
                "retention_max_events",
                file.retention_max_events,
                10_000_000,
            )?,
            retention_max_bytes: positive(
                "retention_max_bytes",
                file.retention_max_bytes,
                4 << 30,
            )?,
            store_min_free: size(
                "store_min_free",
                file.store_min_free,
                crate::store::DEFAULT_MIN_FREE,
            )?,
            inbound_queue: positive("inbound_queue", file.inbound_queue.map(|v| v as u64), 8192)?
                as usize,
            max_batch: positive("max_batch", file.max_batch.map(|v| v as u64), 1000)? as usize,
            order_hold: dur("order_hold", file.order_hold, Duration::from_secs(10))?,
            order_max_held: positive(
                "order_max_held",
                file.order_max_held.map(|v| v as u64),
                100_000,
            )? as usize,
            summary_every_secs: positive("summary_every_secs", file.summary_every_secs, 5)?,
            fault_injection: args.fault_injection || file.fault_injection.unwrap_or(false),
            tags,
            health_interval,
            ping_interval,
            detector,
            nvidia_smi: file.nvidia_smi.unwrap_or_else(|| "nvidia-smi".into()),
            voters,
            election_timeout,
            sync,
            blob_roots,
            api_hosts: file.api_hosts.unwrap_or_default(),
            strict_types: file.strict_types.unwrap_or(false),
            custom_types,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve() {
        let c = AgentConfig::resolve(&AgentArgs::default(), None).unwrap();
        assert_eq!(c.api.to_string(), DEFAULT_API);
        assert_eq!(c.listen[0].to_string(), DEFAULT_LISTEN);
        assert!(c.mdns);
        assert_eq!(c.dedup_window, Duration::from_secs(86400));
        assert_eq!(c.limits, crate::limits::NetLimits::default());
        // Off unless asked for: fault injection, files read by path.
        assert!(!c.fault_injection);
        assert!(c.blob_roots.is_empty());
    }

    #[test]
    fn limits_from_the_file_and_zero_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "max_connections_per_peer = 3\npeer_request_rate = { catchup = 7 }\ngossip_source_rate = 50\n",
        )
        .unwrap();
        let args = AgentArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        let c = AgentConfig::resolve(&args, None).unwrap();
        assert_eq!(c.limits.max_connections_per_peer, 3);
        assert_eq!(c.limits.request_rates.catchup, 7);
        assert_eq!(
            c.limits.request_rates.raft,
            crate::limits::DEFAULT_RATE_RAFT
        );
        assert_eq!(c.limits.gossip_source_rate, 50);
        std::fs::write(&p, "peer_request_rate = { raft = 0 }\n").unwrap();
        let e = AgentConfig::resolve(&args, None).unwrap_err();
        assert_eq!(e.key, "peer_request_rate.raft");
        std::fs::write(&p, "peer_request_rate = { gossip = 5 }\n").unwrap();
        assert!(AgentConfig::resolve(&args, None).is_err());
    }

    #[test]
    fn file_then_flags_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "name = \"gpu-01\"\napi = \"127.0.0.1:9000\"\nmdns = false\nretention_age = \"2d\"\n",
        )
        .unwrap();
        let args = AgentArgs {
            config: Some(p.clone()),
            api: Some("127.0.0.1:9001".into()),
            ..Default::default()
        };
        let c = AgentConfig::resolve(&args, None).unwrap();
        assert_eq!(c.name, "gpu-01");
        assert_eq!(c.api.port(), 9001);
        assert!(!c.mdns);
        assert_eq!(c.retention_age, Duration::from_secs(2 * 86400));

        std::fs::write(&p, "api = \"nonsense\"\n").unwrap();
        let e = AgentConfig::resolve(
            &AgentArgs {
                config: Some(p.clone()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert_eq!(e.key, "api");
        assert!(e.to_string().contains("api"), "{e}");
        std::fs::write(&p, "apii = \"x\"\n").unwrap();
        let e = AgentConfig::resolve(
            &AgentArgs {
                config: Some(p.clone()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("apii"), "{e}");
        assert!(e.to_string().contains("line 1, column 1"), "{e}");
        std::fs::write(&p, "name = \"a\"\n\nmdns = tru\n").unwrap();
        let e = AgentConfig::resolve(
            &AgentArgs {
                config: Some(p.clone()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 3, column 8"), "{e}");
        std::fs::write(&p, "dedup_window = \"soon\"\n").unwrap();
        let e = AgentConfig::resolve(
            &AgentArgs {
                config: Some(p),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert_eq!(e.key, "dedup_window");
        let e = AgentConfig::resolve(
            &AgentArgs {
                listen: vec!["/ip4/x".into()],
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert_eq!(e.key, "listen");
    }
}
