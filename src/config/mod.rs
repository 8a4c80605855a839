//! Agent configuration: embedded defaults, then a TOML file (`--config`), then
//! `RIFTMESH_*` environment variables, then flags; later wins. Every value is
//! checked at start and a bad one is reported with the key and where it came from.
//!
//! This file owns the shapes (flags, file, resolved config); `resolve` turns
//! them into an [`AgentConfig`]; `transfer` holds the blob transfer settings.

mod resolve;
mod transfer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use libp2p::Multiaddr;
use serde::Deserialize;

use crate::membership::detector::DetectorConfig;
pub use transfer::{check_name, TransferConfig, Want, MAX_CHUNK, MIN_CHUNK};

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
    /// File holding the local API's bearer token; every request must then
    /// carry `Authorization: Bearer <token>` [default: none on loopback;
    /// <data-dir>/api.token, created if missing, when --api is not loopback].
    #[arg(long, env = "RIFTMESH_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
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
    pub full_mesh_max: Option<usize>,
    pub suspect_min: Option<String>,
    pub suspect_max: Option<String>,
    pub member_forget_after: Option<String>,
    pub nvidia_smi: Option<String>,
    pub idle_after: Option<String>,
    pub idle_gpu_util_pct: Option<f32>,
    pub voters: Option<Vec<String>>,
    pub election_timeout: Option<String>,
    pub want: Option<Vec<Want>>,
    pub blob_chunk_size: Option<String>,
    pub blob_budget: Option<String>,
    pub blob_reserve: Option<String>,
    pub blob_retention: Option<String>,
    /// How long a transfer may go without a chunk (nothing in flight)
    /// before it gives up, e.g. "60s".
    pub sync_stall: Option<String>,
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
    pub api_token_file: Option<PathBuf>,
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
    pub detector: DetectorConfig,
    /// The largest cluster (live members, this agent included) in which
    /// every agent connects to every other; above it each keeps a bounded
    /// set of links (membership::links).
    pub full_mesh_max: usize,
    /// Ring neighbours linked on each side, random links, and how long a
    /// connection dialled to a member that is not a link stays open idle.
    /// Not config keys: 4, 4 and 30 s (membership::links, net); in-process
    /// tests shrink them so that a handful of agents has members that are
    /// not links.
    pub link_ring_per_side: usize,
    pub link_random: usize,
    pub link_idle: Duration,
    /// Command that reports GPUs ("" to not look for GPUs).
    pub nvidia_smi: String,
    /// `IDLE_RESOURCE_DETECTED` after this long idle (zero: never).
    pub idle_after: Duration,
    /// A GPU below this utilization (percent) is idle.
    pub idle_gpu_util_pct: f32,
    /// How long `HOST_ONLINE` waits for the first health sample before it
    /// is published without capabilities. Not a config key: 10 s (twice
    /// the nvidia-smi timeout); in-process tests shorten it.
    pub online_wait: Duration,
    /// The member protocol versions this agent offers, the preferred first.
    /// Not a config key: both (`crate::net::MEMBER_PROTOCOLS`); for
    /// compatibility tests, which run an agent that knows only `/1`.
    pub member_protocols: &'static [&'static str],
    /// Names of the hosts that elect the leader (3 or 5), the same list on
    /// every host; empty: this cluster has no leader.
    pub voters: Vec<String>,
    /// Raft election timeout, low end (the high end is twice it; heartbeats
    /// every fifth of it). The leader's lease is this long.
    pub election_timeout: Duration,
    /// Blob transfer (the `[sync]` section): wants, sizes, limits (proto-notes/sync.md).
    pub transfer: TransferConfig,
    /// Connection limits and per-peer / per-source rates (proto-notes/security.md).
    pub limits: crate::limits::NetLimits,
    /// Directories (canonical) under which the API may read a file named by
    /// a request; empty by default (proto-notes/security.md).
    pub blob_roots: Vec<PathBuf>,
    /// Host names, besides loopback names and addresses, that the API
    /// accepts in a request's `Host` header.
    pub api_hosts: Vec<String>,
    /// The local API's token file, when configured (`keys::load_api_token`
    /// says which file is used: without one, `<data>/api.token` when the
    /// API is not on loopback).
    pub api_token_file: Option<PathBuf>,
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

/// A byte size: `1048576`, `512KiB`, `1MiB`, `500 GiB`, `2GB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{e} (write e.g. 1048576, 4MiB, 500GiB)"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (write e.g. 30s, 10m, 24h, 7d)"))
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
        // No API token on the default (loopback) API.
        assert!(c.api_token_file.is_none());
        assert!(!crate::keys::api_token_needed(&c));
    }

    #[test]
    fn the_api_token_file_from_flag_or_file_and_when_one_is_needed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "api_token_file = \"/etc/riftmesh/api.token\"\n").unwrap();
        let mut args = AgentArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        let c = AgentConfig::resolve(&args, None).unwrap();
        assert_eq!(
            c.api_token_file,
            Some(PathBuf::from("/etc/riftmesh/api.token"))
        );
        // Configured: needed on loopback too.
        assert!(crate::keys::api_token_needed(&c));
        args.api_token_file = Some("/run/t".into());
        let c = AgentConfig::resolve(&args, None).unwrap();
        assert_eq!(c.api_token_file, Some(PathBuf::from("/run/t")));
        std::fs::write(&p, "api_token_file = \"\"\n").unwrap();
        args.api_token_file = None;
        let e = AgentConfig::resolve(&args, None).unwrap_err();
        assert_eq!(e.key, "api_token_file");
        // Not configured: needed only when the API is not on loopback, and
        // then it is <data_dir>/api.token.
        let c = AgentConfig::resolve(
            &AgentArgs {
                api: Some("0.0.0.0:7411".into()),
                data_dir: Some("/d".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert!(crate::keys::api_token_needed(&c));
        assert_eq!(
            crate::keys::api_token_path(&c),
            Some(PathBuf::from("/d/api.token"))
        );
    }

    #[test]
    fn sync_stall_is_read_and_under_a_second_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let args = AgentArgs {
            config: Some(p.clone()),
            ..Default::default()
        };
        std::fs::write(&p, "sync_stall = \"90s\"\n").unwrap();
        let c = AgentConfig::resolve(&args, None).unwrap();
        assert_eq!(c.transfer.stall, Duration::from_secs(90));
        std::fs::write(&p, "sync_stall = \"0s\"\n").unwrap();
        let e = AgentConfig::resolve(&args, None).unwrap_err();
        assert_eq!(e.key, "sync_stall");
        let d = AgentConfig::resolve(&AgentArgs::default(), None).unwrap();
        assert_eq!(d.transfer.stall, Duration::from_secs(60));
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
