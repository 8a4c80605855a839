//! Wiring: opens the store, starts the network, routes events between them, and
//! runs housekeeping. Knows no wire formats.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::event::{self, Draft};
use crate::metrics::{label, Metrics};
use crate::net::{self, Inbound, NetConfig, NetHandle};
use crate::store::{Appended, Store, StoreConfig, StoreError};

/// Room left in a gossip frame for the envelope around the payload
/// (ids, signature, gossipsub's own framing).
pub const ENVELOPE_ALLOWANCE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Event(#[from] event::EventError),
    #[error("event of about {size} bytes exceeds the limit of {limit} bytes (max_event_bytes minus {ENVELOPE_ALLOWANCE} bytes of envelope); send large data as a blob")]
    TooLarge { size: usize, limit: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("{what} at {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
}

pub struct Node {
    pub cfg: AgentConfig,
    pub store: Store,
    pub net: NetHandle,
    pub metrics: Metrics,
    pub peer_id: String,
    pub started: Instant,
    /// Per consumer: (cursor, last sequence scanned without a match), so
    /// long-polls do not rescan a run of non-matching events.
    pub scan_hints: Mutex<std::collections::HashMap<String, (u64, u64)>>,
}

fn file_err(what: &'static str, path: &Path, e: impl ToString) -> NodeError {
    NodeError::File {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Write a file readable by the owner only, atomically.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The node's identity: `<data>/identity.key`, made on first start.
pub fn load_identity(data_dir: &Path) -> Result<Keypair, NodeError> {
    let path = data_dir.join("identity.key");
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| file_err("identity key is unreadable (restore it from backup, or delete it to become a new member)", &path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| file_err("cannot encode identity", &path, e))?;
            write_private(&path, &bytes).map_err(|e| file_err("cannot write identity key", &path, e))?;
            tracing::info!(path = %path.display(), "created a new node identity");
            Ok(key)
        }
        Err(e) => Err(file_err("cannot read identity key", &path, e)),
    }
}

/// The swarm key: the configured file, or `<data>/swarm.key` (made if missing).
pub fn load_swarm_key(cfg: &AgentConfig) -> Result<PreSharedKey, NodeError> {
    let (path, may_create) = match &cfg.swarm_key {
        Some(p) => (p.clone(), false),
        None => (cfg.data_dir.join("swarm.key"), true),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => net::parse_psk(&text)
            .map_err(|e| file_err("swarm key is not in /key/swarm/psk/1.0.0/ format", &path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
            let psk = net::generate_psk();
            write_private(&path, psk.to_string().as_bytes())
                .map_err(|e| file_err("cannot write swarm key", &path, e))?;
            tracing::warn!(
                path = %path.display(),
                fingerprint = %psk.fingerprint(),
                "no swarm key given: created a new private network key; copy this file to every host (or pass --swarm-key) so they can join"
            );
            Ok(psk)
        }
        Err(e) => Err(file_err("cannot read swarm key", &path, e)),
    }
}

impl Node {
    /// Open the store and start the network. The registry receives every
    /// metric family (ours and libp2p's) before it is served.
    pub fn start(cfg: AgentConfig, registry: &mut Registry) -> Result<Arc<Node>, NodeError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| file_err("cannot create data directory", &cfg.data_dir, e))?;
        let key = load_identity(&cfg.data_dir)?;
        let psk = load_swarm_key(&cfg)?;
        tracing::info!(fingerprint = %psk.fingerprint(), "private network key loaded");
        let metrics = Metrics::register(registry);
        let store = Store::open(
            &cfg.data_dir.join("events"),
            StoreConfig {
                dedup_window: cfg.dedup_window,
                dedup_max_entries: cfg.dedup_max_entries,
                retention_age: cfg.retention_age,
                retention_max_events: cfg.retention_max_events,
                retention_max_bytes: cfg.retention_max_bytes,
                ..Default::default()
            },
            key.clone(),
        )?;
        let peer_id = key.public().to_peer_id().to_base58();
        let (net, inbound) = net::start(
            key,
            NetConfig {
                listen: cfg.listen.clone(),
                bootstrap: cfg.bootstrap.clone(),
                mdns: cfg.mdns,
                psk,
                max_message_bytes: cfg.max_event_bytes,
                inbound_queue: cfg.inbound_queue,
                maintain_every: Duration::from_secs(5),
            },
            registry,
            metrics.clone(),
        )?;
        for addr in &cfg.bootstrap {
            let net = net.clone();
            let addr = addr.clone();
            tokio::spawn(async move { net.dial(addr).await });
        }
        let node = Arc::new(Node {
            cfg,
            store,
            net,
            metrics,
            peer_id,
            started: Instant::now(),
            scan_hints: Mutex::new(Default::default()),
        });
        tokio::spawn(ingest(node.clone(), inbound));
        tokio::spawn(housekeeping(node.clone()));
        Ok(node)
    }

    /// Largest payload-plus-metadata a local event may carry.
    pub fn max_event_size(&self) -> usize {
        self.cfg.max_event_bytes.saturating_sub(ENVELOPE_ALLOWANCE)
    }

    /// Accept local events: size check, durable append (dedup by content hash),
    /// then gossip the new ones.
    pub async fn publish(&self, drafts: Vec<Draft>) -> Result<Vec<Appended>, NodeError> {
        let limit = self.max_event_size();
        for d in &drafts {
            let size = d.payload.len()
                + d.event_type.len()
                + d.origin.as_ref().map_or(0, |s| s.len())
                + d.correlation_id.as_ref().map_or(0, |s| s.len())
                + d.parent_id.as_ref().map_or(0, |s| s.len());
            if size > limit {
                return Err(NodeError::TooLarge { size, limit });
            }
        }
        let out = self.store.append_local(drafts).await?;
        for a in &out {
            match a {
                Appended::New { event, .. } => {
                    self.metrics.events_published.inc();
                    if let Err(e) = self.net.publish_event(event).await {
                        tracing::warn!(id = %event.id, error = %e, "gossip publish failed; peers get the event through catch-up");
                    }
                }
                Appended::Duplicate { .. } | Appended::Held => {
                    self.metrics
                        .events_duplicate
                        .get_or_create(&label("via", "api"))
                        .inc();
                }
            }
        }
        Ok(out)
    }
}

/// Verified events from gossip → the store, in batches.
async fn ingest(node: Arc<Node>, mut rx: mpsc::Receiver<Inbound>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first.event];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(i) => batch.push(i.event),
                Err(_) => break,
            }
        }
        match node.store.append_remote(batch).await {
            Ok(out) => {
                let now = event::now_ms();
                for a in out {
                    match a {
                        Appended::New { event, .. } => {
                            node.metrics
                                .events_received
                                .get_or_create(&label("via", "gossip"))
                                .inc();
                            node.metrics
                                .remote_latency
                                .observe(now.saturating_sub(event.ts_ms) as f64 / 1000.0);
                        }
                        Appended::Duplicate { .. } | Appended::Held => {
                            node.metrics
                                .events_duplicate
                                .get_or_create(&label("via", "gossip"))
                                .inc();
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot store events from peers"),
        }
    }
}

/// Retention, dedup expiry and gauges.
async fn housekeeping(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        if n % 6 == 0 {
            node.store.prune().await;
        }
        n += 1;
        let head = node.store.head();
        node.metrics.store_events.set(node.store.len() as i64);
        node.metrics
            .store_bytes
            .set(node.store.size_on_disk() as i64);
        if let Ok(consumers) = node.store.consumers() {
            for c in consumers {
                node.metrics
                    .consumer_lag
                    .get_or_create(&label("consumer", c.name))
                    .set(head.saturating_sub(c.cursor) as i64);
            }
        }
    }
}
