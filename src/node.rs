//! Wiring: opens the store, starts the network, builds each part with the
//! narrow handles it uses, and owns their lifecycle. Knows no wire formats.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use prometheus_client::registry::Registry;

use crate::blob;
use crate::catchup::{self, ReorderConfig};
use crate::config::AgentConfig;
use crate::event::{self, Draft};
use crate::leader;
use crate::membership::Membership;
use crate::metrics::{label, Metrics};
use crate::net::{self, NetConfig, NetHandle};
use crate::publisher::Publisher;
use crate::store::{Appended, Store, StoreConfig};
use crate::tasks::Tasks;

use crate::keys::file_err;
pub use crate::keys::{load_identity, load_swarm_key, write_private};
pub use crate::publisher::{NodeError, ENVELOPE_ALLOWANCE};

/// One agent: the parts it is made of, built and wired by [`Node::start`].
/// The API holds it; the parts themselves get narrow handles (their own
/// `Ctx`), never the node.
pub struct Node {
    cfg: Arc<AgentConfig>,
    store: Store,
    net: NetHandle,
    metrics: Metrics,
    publisher: Publisher,
    peer_id: String,
    started: Instant,
    membership: Arc<Membership>,
    leader: Arc<leader::Ctx>,
    blob: Arc<blob::Ctx>,
    tasks: Tasks,
    /// Notified when the agent should stop (after a leave through the API).
    stop: tokio::sync::Notify,
    /// Per consumer: (cursor, last sequence scanned without a match), so
    /// long-polls do not rescan a run of non-matching events.
    scan_hints: Mutex<HashMap<String, (u64, u64)>>,
}

/// Exit status of an agent whose store became read-only (a failed or stuck
/// write, e.g. a full disk) once the disk has room again: EX_TEMPFAIL, so
/// that the service manager (`Restart=on-failure`) starts it again.
pub const EXIT_STORE_READ_ONLY: i32 = 75;

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
        let store = open_store(&cfg, &key, registry)?;
        let blobs = crate::blob::Blobs::open(
            &cfg.data_dir.join("blobs"),
            store.durable(),
            crate::blob::TransferConfig {
                forgotten_kept: cfg.retention_age.saturating_mul(2),
                ..cfg.transfer.clone()
            },
            &cfg.tags,
        )
        .map_err(|e| NodeError::File {
            what: "cannot open the blob store",
            path: cfg.data_dir.join("blobs").display().to_string(),
            reason: e.to_string(),
        })?;
        let local = key.public().to_peer_id();
        let peer_id = local.to_base58();
        crate::metrics::register_agent_info(registry, &cfg.name, &peer_id);
        let incarnation = crate::membership::next_incarnation(&cfg.data_dir).map_err(|e| {
            file_err(
                "cannot record the incarnation",
                &cfg.data_dir.join("incarnation"),
                e,
            )
        })?;
        let membership = crate::membership::Membership::new(
            local,
            &cfg.name,
            &cfg.tags,
            incarnation,
            cfg.detector.clone(),
        );
        let leader = crate::leader::Leader::new(&cfg.voters, &cfg.name, cfg.election_timeout);
        membership.set_voters_hash(leader.voters_hash());
        let (net, inbox) = net::start(key, net_config(&cfg, psk), registry, metrics.clone())?;
        Ok(Self::wire(
            cfg,
            Parts {
                store,
                net,
                metrics,
                blobs,
                membership,
                leader,
                peer_id,
            },
            inbox,
        ))
    }

    /// Hand each part the handles it uses and start its tasks.
    fn wire(cfg: AgentConfig, p: Parts, inbox: net::Inbox) -> Arc<Node> {
        let Parts {
            store,
            net,
            metrics,
            blobs,
            membership,
            leader,
            peer_id,
        } = p;
        let tasks = Tasks::new();
        for addr in &cfg.bootstrap {
            let net = net.clone();
            let addr = addr.clone();
            tasks.spawn(async move {
                let _ = net.dial(addr).await;
            });
        }
        let cfg = Arc::new(cfg);
        let publisher = Publisher::new(
            store.clone(),
            net.clone(),
            metrics.clone(),
            cfg.max_event_bytes,
        );

        let leader = Arc::new(leader::Ctx {
            leader,
            cfg: cfg.clone(),
            store: store.clone(),
            net: net.clone(),
            metrics: metrics.clone(),
            membership: membership.clone(),
            publisher: publisher.clone(),
            peer_id: peer_id.clone(),
            tasks: tasks.clone(),
        });
        let blob = Arc::new(blob::Ctx {
            blobs,
            store: store.clone(),
            net: net.clone(),
            metrics: metrics.clone(),
            membership: membership.clone(),
            publisher: publisher.clone(),
            host: cfg.name.clone(),
            data_dir: cfg.data_dir.clone(),
            tasks: tasks.clone(),
        });
        let catchup = Arc::new(catchup::driver::Ctx {
            store: store.clone(),
            net: net.clone(),
            metrics: metrics.clone(),
            membership: membership.clone(),
            order: ReorderConfig {
                hold: cfg.order_hold,
                max_held: cfg.order_max_held,
            },
            summary_every_secs: cfg.summary_every_secs,
        });
        let members = Arc::new(crate::membership::Ctx {
            membership: membership.clone(),
            cfg: cfg.clone(),
            store: store.clone(),
            net: net.clone(),
            metrics: metrics.clone(),
            publisher: publisher.clone(),
            peer_id: peer_id.clone(),
            tasks: tasks.clone(),
        });
        tasks.spawn(catchup::driver::run(catchup, inbox.events));
        tasks.spawn(housekeeping(store.clone(), metrics.clone()));
        tasks.spawn(crate::membership::run(members, inbox.member));
        leader::start(leader.clone(), inbox.raft);
        blob::start(blob.clone(), inbox.blob);
        Arc::new(Node {
            cfg,
            store,
            net,
            metrics,
            publisher,
            peer_id,
            started: Instant::now(),
            membership,
            leader,
            blob,
            tasks,
            stop: tokio::sync::Notify::new(),
            scan_hints: Mutex::new(Default::default()),
        })
    }

    /// Stop this agent in order: its tasks (at most 5 s, then aborted), the
    /// leader's Raft, the network (connections closed), then the store
    /// (a last commit). In-process tests use it for a clean "kill".
    pub async fn shutdown(&self) {
        let aborted = self.tasks.stop(Duration::from_secs(5)).await;
        if aborted > 0 {
            tracing::warn!(aborted, "tasks did not stop within 5 s and were aborted");
        }
        self.leader.leader.shutdown().await;
        self.net.shutdown().await;
        // Every acknowledged write was committed already; this is the last
        // flush. The writer thread ends with the last clone of the store.
        if let Err(e) = self
            .store
            .durable()
            .commit_async(crate::durable::What::Events)
            .await
        {
            tracing::warn!(error = %e, "last store commit at shutdown failed");
        }
    }

    pub fn cfg(&self) -> &AgentConfig {
        &self.cfg
    }
    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn net(&self) -> &NetHandle {
        &self.net
    }
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }
    pub fn started(&self) -> Instant {
        self.started
    }
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }
    pub fn leader(&self) -> &Arc<leader::Leader> {
        &self.leader.leader
    }
    /// What the leader part works with (lock calls and views take it).
    pub fn leader_ctx(&self) -> &leader::Ctx {
        &self.leader
    }
    pub fn blobs(&self) -> &blob::Blobs {
        &self.blob.blobs
    }
    /// What blob transfer works with (wants, room checks, gc take it).
    pub fn blob(&self) -> &Arc<blob::Ctx> {
        &self.blob
    }
    /// Notified when the agent should stop (a leave through the API).
    pub fn stop_signal(&self) -> &tokio::sync::Notify {
        &self.stop
    }
    pub fn scan_hints(&self) -> &Mutex<HashMap<String, (u64, u64)>> {
        &self.scan_hints
    }

    /// Largest payload-plus-metadata a local event may carry.
    pub fn max_event_size(&self) -> usize {
        self.publisher.max_event_size()
    }

    /// Fault injection: refuse and drop connections to these peers (or accept
    /// them again). Returns how many were named.
    pub async fn block_peers(&self, peers: &[String], block: bool) -> Result<usize, NodeError> {
        let ids = peers
            .iter()
            .map(|p| {
                p.parse::<PeerId>().map_err(|e| {
                    NodeError::Event(event::EventError::BadSource(format!("{p}: {e}")))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let n = ids.len();
        self.net.block(ids, block).await?;
        Ok(n)
    }

    /// Accept local events: see [`Publisher::publish`].
    pub async fn publish(&self, drafts: Vec<Draft>) -> Result<Vec<Appended>, NodeError> {
        self.publisher.publish(drafts).await
    }
}

/// What [`Node::start`] opened, before it is wired.
struct Parts {
    store: Store,
    net: NetHandle,
    metrics: Metrics,
    blobs: blob::Blobs,
    membership: Arc<Membership>,
    leader: Arc<leader::Leader>,
    peer_id: String,
}

/// Open the event store, register its commit counter and start its
/// watchdog (a stuck or failed write ends the process with
/// [`EXIT_STORE_READ_ONLY`]).
fn open_store(
    cfg: &AgentConfig,
    key: &libp2p::identity::Keypair,
    registry: &mut Registry,
) -> Result<Store, NodeError> {
    let store = Store::open(
        &cfg.data_dir.join("events"),
        StoreConfig {
            dedup_window: cfg.dedup_window,
            dedup_max_entries: cfg.dedup_max_entries,
            repeat_window: cfg.repeat_window,
            repeat_windows: cfg.repeat_windows.clone(),
            retention_age: cfg.retention_age,
            retention_max_events: cfg.retention_max_events,
            retention_max_bytes: cfg.retention_max_bytes,
            min_free: cfg.store_min_free,
            ..Default::default()
        },
        key.clone(),
    )?;
    registry.sub_registry_with_prefix("riftmesh").register(
            "store_syncs",
            "Completed durable commits of the agent's database (sled flush, then fdatasync), by what asked for them (events, raft, blob)",
            store.durable().syncs_family(),
        );
    registry.sub_registry_with_prefix("riftmesh").register(
        "store_commit_seconds",
        "Time a group commit of the event store spends in each step, per group applied: prepare (on the writer thread: dedup lookups, sealing and signing, building the batch), apply (the storage engine's batch apply), sync (its flush and the fdatasyncs)",
        store.commit_steps(),
    );
    store
        .durable()
        .spawn_watchdog(|msg| {
            tracing::error!("{msg}");
            eprintln!("riftmesh: {msg}");
            std::process::exit(EXIT_STORE_READ_ONLY);
        })
        .map_err(|e| file_err("cannot start the store watchdog", &cfg.data_dir, e))?;
    Ok(store)
}

fn net_config(cfg: &AgentConfig, psk: libp2p::pnet::PreSharedKey) -> NetConfig {
    NetConfig {
        listen: cfg.listen.clone(),
        bootstrap: cfg.bootstrap.clone(),
        mdns: cfg.mdns,
        psk,
        max_message_bytes: cfg.max_event_bytes,
        inbound_queue: cfg.inbound_queue,
        maintain_every: Duration::from_secs(2),
        ping_interval: cfg.ping_interval,
        limits: cfg.limits,
        member_protocols: cfg.member_protocols,
        link_idle: cfg.link_idle,
        full_mesh_max: cfg.full_mesh_max,
    }
}

/// Retention, dedup expiry and gauges.
async fn housekeeping(store: Store, metrics: Metrics) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut n: u64 = 0;
    let mut lagging: HashSet<String> = HashSet::new();
    loop {
        tick.tick().await;
        if n % 6 == 0 {
            store.prune().await;
        }
        crate::bufpool::CHUNKS.trim(Instant::now());
        n += 1;
        metrics.store_events.set(store.len() as i64);
        metrics.store_bytes.set(store.size_on_disk() as i64);
        if let Ok(consumers) = store.consumers() {
            // A deleted consumer's series goes too (the API removes it at
            // once; this catches a delete racing this loop).
            let now: HashSet<String> = consumers.iter().map(|c| c.name.clone()).collect();
            for gone in lagging.difference(&now) {
                metrics
                    .consumer_lag
                    .remove(&label("consumer", gone.clone()));
            }
            for c in consumers {
                // Matching events only; reading the log is blocking work.
                let store = store.clone();
                let lag = tokio::task::spawn_blocking(move || {
                    let (lag, _) = store.consumer_lag(&c);
                    (c.name, lag)
                })
                .await;
                if let Ok((name, lag)) = lag {
                    metrics
                        .consumer_lag
                        .get_or_create(&label("consumer", name))
                        .set(lag as i64);
                }
            }
            lagging = now;
        }
    }
}
