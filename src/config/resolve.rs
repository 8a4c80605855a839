//! Resolving an [`AgentConfig`]: flag or environment, then the TOML file,
//! then the default, one named step per group of keys. Every value is
//! checked; the first bad one is reported with its key and where it came
//! from. The steps run in the order of the keys' checks, so that a file with
//! several mistakes reports the same one first as before.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;
use libp2p::Multiaddr;

use super::*;

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

/// 1-based line and column (in characters) of a byte offset in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn err(key: &str, value: &str, origin: String, reason: String) -> ConfigError {
    ConfigError {
        key: key.into(),
        value: value.into(),
        origin,
        reason,
    }
}

/// Read and parse the TOML file `args` names (none: every key unset), with
/// the origin its values are reported with.
fn load_file(
    args: &AgentArgs,
    matches: Option<&ArgMatches>,
) -> Result<(FileConfig, String), ConfigError> {
    let Some(path) = &args.config else {
        return Ok((FileConfig::default(), String::new()));
    };
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
    Ok((f, format!("file {}", path.display())))
}

/// Where values come from while resolving: the flags' matches (to tell a
/// flag from an environment variable) and the file's origin text.
struct Sources<'a> {
    matches: Option<&'a ArgMatches>,
    file_origin: String,
}

impl Sources<'_> {
    /// Flag/env, then file, then default, and where the value came from.
    fn pick<T>(
        &self,
        key: &str,
        env: &str,
        arg: Option<T>,
        file: Option<T>,
        default: impl FnOnce() -> T,
    ) -> (T, String) {
        match (arg, file) {
            (Some(v), _) => (v, origin_of(self.matches, key, env)),
            (None, Some(v)) => (v, self.file_origin.clone()),
            (None, None) => (default(), "default".to_string()),
        }
    }

    /// An error about a value from the file.
    fn bad(&self, key: &str, value: &str, reason: impl Into<String>) -> ConfigError {
        err(key, value, self.file_origin.clone(), reason.into())
    }

    fn dur(
        &self,
        key: &str,
        v: Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration(&s).map_err(|r| self.bad(key, &s, r)),
        }
    }

    fn positive(&self, key: &str, v: Option<u64>, default: u64) -> Result<u64, ConfigError> {
        match v {
            Some(0) => Err(self.bad(key, "0", "must be greater than 0")),
            Some(v) => Ok(v),
            None => Ok(default),
        }
    }

    fn positive_usize(
        &self,
        key: &str,
        v: Option<usize>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        Ok(self.positive(key, v.map(|v| v as u64), default as u64)? as usize)
    }

    fn size(&self, key: &str, v: Option<String>, default: u64) -> Result<u64, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => parse_size(&s).map_err(|r| self.bad(key, &s, r)),
        }
    }
}

/// Name, data directory and peer addresses.
struct Identity {
    name: String,
    data_dir: PathBuf,
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    swarm_key: Option<PathBuf>,
}

/// Local endpoints and output.
struct Endpoints {
    api: SocketAddr,
    metrics: SocketAddr,
    mdns: bool,
    log_format: LogFormat,
}

fn multiaddrs(
    key: &str,
    list: &[String],
    origin: &str,
    skip_blank: bool,
) -> Result<Vec<Multiaddr>, ConfigError> {
    list.iter()
        .filter(|s| !skip_blank || !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse::<Multiaddr>()
                .map_err(|e| err(key, s, origin.to_string(), e.to_string()))
        })
        .collect()
}

impl Sources<'_> {
    fn identity(&self, args: &AgentArgs, file: &mut FileConfig) -> Result<Identity, ConfigError> {
        let (name, name_o) = self.pick(
            "name",
            "RIFTMESH_NAME",
            args.name.clone(),
            file.name.take(),
            hostname,
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
        let (data_dir, _) = self.pick(
            "data_dir",
            "RIFTMESH_DATA_DIR",
            args.data_dir.clone(),
            file.data_dir.take(),
            || PathBuf::from(DEFAULT_DATA_DIR),
        );
        let (listen, listen_o) = self.pick(
            "listen",
            "RIFTMESH_LISTEN",
            (!args.listen.is_empty()).then(|| args.listen.clone()),
            file.listen.take(),
            || vec![DEFAULT_LISTEN.to_string()],
        );
        let listen = multiaddrs("listen", &listen, &listen_o, false)?;
        if listen.is_empty() {
            return Err(err(
                "listen",
                "",
                listen_o,
                "at least one address is needed".into(),
            ));
        }
        let (bootstrap, boot_o) = self.pick(
            "bootstrap",
            "RIFTMESH_BOOTSTRAP",
            (!args.bootstrap.is_empty()).then(|| args.bootstrap.clone()),
            file.bootstrap.take(),
            Vec::new,
        );
        let bootstrap = multiaddrs("bootstrap", &bootstrap, &boot_o, true)?;
        Ok(Identity {
            name,
            data_dir,
            listen,
            bootstrap,
            swarm_key: args.swarm_key.clone().or(file.swarm_key.take()),
        })
    }

    fn endpoints(&self, args: &AgentArgs, file: &mut FileConfig) -> Result<Endpoints, ConfigError> {
        let (api, api_o) = self.pick(
            "api",
            "RIFTMESH_API",
            args.api.clone(),
            file.api.take(),
            || DEFAULT_API.to_string(),
        );
        let api: SocketAddr = api.parse().map_err(|e: std::net::AddrParseError| {
            err(
                "api",
                &api,
                api_o,
                format!("{e} (write host:port, e.g. 127.0.0.1:7411)"),
            )
        })?;
        let (metrics, m_o) = self.pick(
            "metrics",
            "RIFTMESH_METRICS",
            args.metrics.clone(),
            file.metrics.take(),
            || DEFAULT_METRICS.to_string(),
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
        let (lf, lf_o) = self.pick(
            "log_format",
            "RIFTMESH_LOG_FORMAT",
            args.log_format.clone(),
            file.log_format.take(),
            || "text".to_string(),
        );
        let log_format = match lf.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(err("log_format", &lf, lf_o, "use text or json".into())),
        };
        Ok(Endpoints {
            api,
            metrics,
            mdns,
            log_format,
        })
    }

    fn max_event_bytes(&self, file: &FileConfig) -> Result<usize, ConfigError> {
        let max_event_bytes =
            self.positive_usize("max_event_bytes", file.max_event_bytes, 256 * 1024)?;
        if !(4096..=8 << 20).contains(&max_event_bytes) {
            return Err(self.bad(
                "max_event_bytes",
                &max_event_bytes.to_string(),
                "must be between 4096 and 8388608",
            ));
        }
        Ok(max_event_bytes)
    }

    fn tags(&self, file: &mut FileConfig) -> Result<Vec<(String, String)>, ConfigError> {
        let mut tags = Vec::new();
        for (k, v) in file.tags.take().unwrap_or_default() {
            let ok = |t: &str| {
                !t.is_empty()
                    && t.len() <= 64
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
            };
            if !ok(&k) || !ok(&v) {
                return Err(self.bad(
                    "tags",
                    &format!("{k} = {v}"),
                    "tag names and values are 1-64 letters, digits or -_./:",
                ));
            }
            tags.push((k, v));
        }
        Ok(tags)
    }

    /// Health exchange and the failure detector's thresholds.
    fn membership(
        &self,
        file: &mut FileConfig,
    ) -> Result<(Duration, Duration, DetectorConfig), ConfigError> {
        let health_interval = self.dur(
            "health_interval",
            file.health_interval.take(),
            Duration::from_secs(5),
        )?;
        let ping_interval = self.dur(
            "ping_interval",
            file.ping_interval.take(),
            Duration::from_secs(2),
        )?;
        let dflt = DetectorConfig::default();
        let detector = DetectorConfig {
            suspect_after: self.dur(
                "suspect_after",
                file.suspect_after.take(),
                dflt.suspect_after,
            )?,
            probe_timeout: self.dur(
                "probe_timeout",
                file.probe_timeout.take(),
                dflt.probe_timeout,
            )?,
            indirect_probes: self.positive_usize(
                "indirect_probes",
                file.indirect_probes,
                dflt.indirect_probes,
            )?,
            suspect_min: self.dur("suspect_min", file.suspect_min.take(), dflt.suspect_min)?,
            suspect_max: self.dur("suspect_max", file.suspect_max.take(), dflt.suspect_max)?,
            forget_after: self.dur(
                "member_forget_after",
                file.member_forget_after.take(),
                dflt.forget_after,
            )?,
            tick: dflt.tick,
            helpers_near_target: dflt.helpers_near_target,
        };
        for (key, d) in [
            ("health_interval", health_interval),
            ("ping_interval", ping_interval),
            ("probe_timeout", detector.probe_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(self.bad(key, &format!("{d:?}"), "must be at least 100ms"));
            }
        }
        if detector.suspect_after <= ping_interval {
            return Err(self.bad(
                "suspect_after",
                &format!("{:?}", detector.suspect_after),
                format!("must be longer than ping_interval ({ping_interval:?}), or every pause between pings looks like a failure"),
            ));
        }
        if detector.suspect_max < detector.suspect_min {
            return Err(self.bad(
                "suspect_max",
                &format!("{:?}", detector.suspect_max),
                "must be at least suspect_min",
            ));
        }
        Ok((health_interval, ping_interval, detector))
    }

    /// When a host counts as idle (`IDLE_RESOURCE_DETECTED`).
    fn idle(&self, file: &mut FileConfig) -> Result<(Duration, f32), ConfigError> {
        let after = self.dur(
            "idle_after",
            file.idle_after.take(),
            Duration::from_secs(600),
        )?;
        let pct = file.idle_gpu_util_pct.take().unwrap_or(5.0);
        if !(pct > 0.0 && pct <= 100.0) {
            return Err(self.bad(
                "idle_gpu_util_pct",
                &pct.to_string(),
                "must be above 0 and at most 100 (a GPU below it is idle)",
            ));
        }
        Ok((after, pct))
    }

    /// The voters and the election timeout.
    fn leader(&self, file: &mut FileConfig) -> Result<(Vec<String>, Duration), ConfigError> {
        let voters = file.voters.take().unwrap_or_default();
        let mut seen = HashSet::new();
        for v in &voters {
            if !seen.insert(v.as_str()) {
                return Err(self.bad("voters", v, "a voter is named twice"));
            }
        }
        if voters.len() > 9 {
            return Err(self.bad(
                "voters",
                &voters.len().to_string(),
                "name 3 or 5 stable hosts (at most 9)",
            ));
        }
        let election_timeout = self.dur(
            "election_timeout",
            file.election_timeout.take(),
            Duration::from_millis(350),
        )?;
        if election_timeout < Duration::from_millis(150) {
            return Err(self.bad(
                "election_timeout",
                &format!("{election_timeout:?}"),
                "must be at least 150ms",
            ));
        }
        Ok((voters, election_timeout))
    }

    fn blob_transfer(&self, file: &mut FileConfig) -> Result<TransferConfig, ConfigError> {
        let sd = TransferConfig::default();
        let chunk = self.size(
            "blob_chunk_size",
            file.blob_chunk_size.take(),
            u64::from(sd.chunk_size),
        )?;
        if !(u64::from(MIN_CHUNK)..=u64::from(MAX_CHUNK)).contains(&chunk) {
            return Err(self.bad(
                "blob_chunk_size",
                &chunk.to_string(),
                "must be between 64KiB and 8MiB",
            ));
        }
        let wants = file.want.take().unwrap_or_default();
        for w in &wants {
            w.check().map_err(|r| self.bad("want", &w.names, r))?;
        }
        Ok(TransferConfig {
            wants,
            chunk_size: chunk as u32,
            budget: self.size("blob_budget", file.blob_budget.take(), sd.budget)?,
            reserve: self.size("blob_reserve", file.blob_reserve.take(), sd.reserve)?,
            transfers: self.positive_usize("sync_transfers", file.sync_transfers, sd.transfers)?,
            upload_rate: self.size("sync_upload_rate", file.sync_upload_rate.take(), 0)?,
            download_rate: self.size("sync_download_rate", file.sync_download_rate.take(), 0)?,
            retention: self.dur("blob_retention", file.blob_retention.take(), sd.retention)?,
            per_source: sd.per_source,
            forgotten_kept: sd.forgotten_kept,
            stall: {
                let d = self.dur("sync_stall", file.sync_stall.take(), sd.stall)?;
                if d < Duration::from_secs(1) {
                    return Err(self.bad(
                        "sync_stall",
                        &format!("{d:?}"),
                        "must be at least 1s (a transfer gives up after this long without a chunk)",
                    ));
                }
                d
            },
        })
    }

    fn net_limits(&self, file: &mut FileConfig) -> Result<crate::limits::NetLimits, ConfigError> {
        use crate::limits as l;
        let n = |key: &str, v: Option<u32>, default: u32| -> Result<u32, ConfigError> {
            Ok(self
                .positive(key, v.map(u64::from), u64::from(default))?
                .min(u64::from(u32::MAX)) as u32)
        };
        let rr = file.peer_request_rate.take().unwrap_or_default();
        Ok(l::NetLimits {
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
        })
    }

    fn blob_roots(
        &self,
        args: &AgentArgs,
        file: &mut FileConfig,
    ) -> Result<Vec<PathBuf>, ConfigError> {
        // Roots are canonical so that a request's canonical path compares
        // with them directly; a root that does not exist is a mistake.
        let roots_from_flag = !args.blob_root.is_empty();
        let blob_roots = if roots_from_flag {
            args.blob_root.clone()
        } else {
            file.blob_roots.take().unwrap_or_default()
        };
        blob_roots
            .into_iter()
            .map(|r| {
                std::fs::canonicalize(&r).map_err(|e| {
                    let origin = if roots_from_flag {
                        origin_of(self.matches, "blob_root", "RIFTMESH_BLOB_ROOTS")
                    } else {
                        self.file_origin.clone()
                    };
                    err(
                        "blob_roots",
                        &r.display().to_string(),
                        origin,
                        e.to_string(),
                    )
                })
            })
            .collect()
    }

    /// The API token file, if one is named (its content is checked when the
    /// agent starts: `keys::load_api_token`).
    fn api_token_file(
        &self,
        args: &AgentArgs,
        file: &mut FileConfig,
    ) -> Result<Option<PathBuf>, ConfigError> {
        let (path, origin) = match (&args.api_token_file, file.api_token_file.take()) {
            (Some(p), _) => (
                p.clone(),
                origin_of(self.matches, "api_token_file", "RIFTMESH_API_TOKEN_FILE"),
            ),
            (None, Some(p)) => (p, self.file_origin.clone()),
            (None, None) => return Ok(None),
        };
        if path.as_os_str().is_empty() {
            return Err(err(
                "api_token_file",
                "",
                origin,
                "name a file holding the token (without one, an API not on loopback uses \
                 <data_dir>/api.token)"
                    .into(),
            ));
        }
        Ok(Some(path))
    }

    /// Per-type repeat windows and the custom types, in canonical form.
    fn types(
        &self,
        file: &mut FileConfig,
    ) -> Result<(HashMap<String, Duration>, Vec<String>), ConfigError> {
        let repeat_windows = file
            .repeat_windows
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(t, w)| {
                let key = format!("repeat_windows.{t}");
                let t = crate::event::normalize_type(&t)
                    .map_err(|e| self.bad(&key, &t, e.to_string()))?;
                let w = parse_duration(&w).map_err(|r| self.bad(&key, &w, r))?;
                Ok((t, w))
            })
            .collect::<Result<HashMap<_, _>, ConfigError>>()?;
        let custom_types = file
            .custom_types
            .take()
            .unwrap_or_default()
            .iter()
            .map(|t| {
                crate::event::normalize_type(t)
                    .map_err(|e| self.bad("custom_types", t, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((repeat_windows, custom_types))
    }
}

impl AgentConfig {
    /// Resolve from flags/env (`args`, with `matches` to tell which was which),
    /// the TOML file they name, and the defaults.
    pub fn resolve(args: &AgentArgs, matches: Option<&ArgMatches>) -> Result<Self, ConfigError> {
        let (mut file, file_origin) = load_file(args, matches)?;
        let s = Sources {
            matches,
            file_origin,
        };
        let id = s.identity(args, &mut file)?;
        let ep = s.endpoints(args, &mut file)?;
        let max_event_bytes = s.max_event_bytes(&file)?;
        let tags = s.tags(&mut file)?;
        let (health_interval, ping_interval, detector) = s.membership(&mut file)?;
        let (voters, election_timeout) = s.leader(&mut file)?;
        let (idle_after, idle_gpu_util_pct) = s.idle(&mut file)?;
        let transfer = s.blob_transfer(&mut file)?;
        let limits = s.net_limits(&mut file)?;
        let blob_roots = s.blob_roots(args, &mut file)?;
        let (repeat_windows, custom_types) = s.types(&mut file)?;
        let api_token_file = s.api_token_file(args, &mut file)?;
        let f = file;
        Ok(AgentConfig {
            limits,
            name: id.name,
            data_dir: id.data_dir,
            listen: id.listen,
            bootstrap: id.bootstrap,
            swarm_key: id.swarm_key,
            api: ep.api,
            metrics: ep.metrics,
            mdns: ep.mdns,
            alone_warning_after: s.dur(
                "alone_warning_after",
                f.alone_warning_after,
                Duration::from_secs(60),
            )?,
            log_format: ep.log_format,
            max_event_bytes,
            api_max_body_bytes: s.positive_usize(
                "api_max_body_bytes",
                f.api_max_body_bytes,
                8 << 20,
            )?,
            dedup_window: s.dur(
                "dedup_window",
                f.dedup_window,
                Duration::from_secs(24 * 3600),
            )?,
            dedup_max_entries: s.positive("dedup_max_entries", f.dedup_max_entries, 5_000_000)?,
            repeat_window: s.dur("repeat_window", f.repeat_window, Duration::from_secs(30))?,
            repeat_windows,
            retention_age: s.dur(
                "retention_age",
                f.retention_age,
                Duration::from_secs(7 * 24 * 3600),
            )?,
            retention_max_events: s.positive(
                "retention_max_events",
                f.retention_max_events,
                10_000_000,
            )?,
            retention_max_bytes: s.positive(
                "retention_max_bytes",
                f.retention_max_bytes,
                4 << 30,
            )?,
            store_min_free: s.size(
                "store_min_free",
                f.store_min_free,
                crate::store::DEFAULT_MIN_FREE,
            )?,
            inbound_queue: s.positive_usize("inbound_queue", f.inbound_queue, 8192)?,
            max_batch: s.positive_usize("max_batch", f.max_batch, 1000)?,
            order_hold: s.dur("order_hold", f.order_hold, Duration::from_secs(10))?,
            order_max_held: s.positive_usize("order_max_held", f.order_max_held, 100_000)?,
            summary_every_secs: s.positive("summary_every_secs", f.summary_every_secs, 5)?,
            fault_injection: args.fault_injection || f.fault_injection.unwrap_or(false),
            tags,
            health_interval,
            ping_interval,
            detector,
            full_mesh_max: s.positive_usize(
                "full_mesh_max",
                f.full_mesh_max,
                crate::membership::links::FULL_MESH_MAX,
            )?,
            link_ring_per_side: crate::membership::links::RING_PER_SIDE,
            link_random: crate::membership::links::RANDOM_LINKS,
            link_idle: crate::net::LINK_IDLE,
            nvidia_smi: f.nvidia_smi.unwrap_or_else(|| "nvidia-smi".into()),
            idle_after,
            idle_gpu_util_pct,
            online_wait: Duration::from_secs(10),
            member_protocols: crate::net::MEMBER_PROTOCOLS,
            voters,
            election_timeout,
            transfer,
            blob_roots,
            api_hosts: f.api_hosts.unwrap_or_default(),
            api_token_file,
            strict_types: f.strict_types.unwrap_or(false),
            custom_types,
        })
    }
}
