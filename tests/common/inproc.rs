//! In-process cluster harness: N real agents in one test process.
//!
//! Each agent is the real `riftmesh::node::Node::start` (its own sled store
//! in a temp directory, gossipsub, catch-up, membership, Raft, blob
//! transfer), listening on a `/memory/<n>` address, so `net::start` builds
//! the agent's transport stack (private network with the swarm key, Noise,
//! Yamux) over libp2p's `MemoryTransport` instead of TCP. Nothing is mocked;
//! only the sockets are channels in this process.
//!
//! Time is the wall clock: gossipsub, identify and ping keep their own
//! timers (futures-timer) and sled its own threads, which tokio's paused
//! clock does not drive, so the scenarios wait on conditions with deadlines
//! and aim for the same verdict on every run, not an identical replay.
//!
//! Every access to a node goes through [`Agent::node`] and the few helpers
//! below, so that `Node`'s fields turning into accessor methods is a
//! substitution here (`.store` → `.store()`, …) and nowhere else.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use riftmesh::config::{AgentArgs, AgentConfig};
use riftmesh::event::{Draft, Event};
use riftmesh::node::Node;

/// `/memory/<n>` ports handed out in this process: the memory transport's
/// table of listeners is global to the process, and tests run in parallel.
/// A random base, so that no port is guessed by another harness.
static NEXT_PORT: std::sync::LazyLock<AtomicU64> =
    std::sync::LazyLock::new(|| AtomicU64::new((rand::random::<u64>() >> 2) | 1));

fn next_memory_addr() -> Multiaddr {
    let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    format!("/memory/{port}").parse().unwrap()
}

/// Poll `f` every few milliseconds until it returns Some; panics with
/// `what` after `timeout`. No fixed sleeps: the poll period only bounds how
/// late a met condition is seen.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
    }
}

/// Timers short enough for sub-second scenarios, each within the bounds
/// `AgentConfig::resolve` enforces (so every value is one an operator could
/// set): election timeout 150 ms (its floor), health and ping every 200 ms,
/// suspicion after 600 ms of silence.
pub fn fast_config(name: &str, dir: &Path, swarm_key: &Path) -> AgentConfig {
    let args = AgentArgs {
        name: Some(name.into()),
        data_dir: Some(dir.to_path_buf()),
        swarm_key: Some(swarm_key.to_path_buf()),
        no_mdns: true,
        api: Some("127.0.0.1:0".into()),
        metrics: Some("127.0.0.1:0".into()),
        ..Default::default()
    };
    let mut cfg = AgentConfig::resolve(&args, None).expect("defaults resolve");
    cfg.listen = vec![next_memory_addr()];
    cfg.mdns = false;
    cfg.election_timeout = Duration::from_millis(150);
    cfg.health_interval = Duration::from_millis(200);
    cfg.ping_interval = Duration::from_millis(200);
    cfg.detector.suspect_after = Duration::from_millis(600);
    cfg.detector.probe_timeout = Duration::from_millis(200);
    cfg.detector.suspect_min = Duration::from_millis(200);
    cfg.detector.suspect_max = Duration::from_millis(600);
    cfg.summary_every_secs = 1;
    cfg
}

/// The agents' logs, with `RUST_LOG` set (e.g. `RUST_LOG=riftmesh=debug`),
/// in the test's captured output.
pub fn log_to_test_output() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// One agent of the cluster.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    node: Arc<Node>,
    /// Its metric families (ours and libp2p's), as `/metrics` would serve them.
    pub registry: Registry,
    pub peer: PeerId,
    /// `/memory/<n>/p2p/<peer>`: what others bootstrap to.
    pub addr: Multiaddr,
}

impl Agent {
    /// Start a real agent from `cfg` in this runtime.
    pub fn start(cfg: AgentConfig) -> Agent {
        let mut registry = Registry::default();
        let name = cfg.name.clone();
        let dir = cfg.data_dir.clone();
        let listen = cfg.listen[0].clone();
        let node = Node::start(cfg, &mut registry).unwrap_or_else(|e| panic!("{name}: {e}"));
        let peer: PeerId = node.peer_id().parse().unwrap();
        let addr = listen.with(libp2p::multiaddr::Protocol::P2p(peer));
        Agent {
            name,
            dir,
            node,
            registry,
            peer,
            addr,
        }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    pub fn peer_id(&self) -> String {
        self.peer.to_base58()
    }

    /// Publish one event of type `t` through the agent's own path (durable
    /// append, then gossip).
    pub async fn publish(&self, t: &str, payload: serde_json::Value) -> Event {
        let d = Draft::new(t, &payload, None, None, None).unwrap();
        let out = self.node.publish(vec![d]).await.unwrap();
        match out.into_iter().next() {
            Some(riftmesh::store::Appended::New { event, .. }) => (*event).clone(),
            other => panic!("{}: publish gave {:?}", self.name, other.is_some()),
        }
    }

    /// Every entry of the log, in log order.
    pub fn events(&self) -> Vec<Event> {
        let store = &self.node.store();
        (store.first().max(1)..=store.head())
            .filter_map(|seq| store.get(seq).unwrap())
            .map(|s| s.event)
            .collect()
    }

    /// Peers this agent is connected to and sees subscribed to the topic.
    pub async fn subscribed_peers(&self) -> Vec<String> {
        self.node
            .net()
            .peers()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.gossip_subscribed)
            .map(|p| p.peer_id)
            .collect()
    }

    /// Peer ids (base58) this agent holds a connection to.
    pub async fn connected_peers(&self) -> std::collections::HashSet<String> {
        self.node
            .net()
            .peers()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.peer_id)
            .collect()
    }

    pub async fn connected_to(&self, peer: &PeerId) -> bool {
        self.connected_peers().await.contains(&peer.to_base58())
    }

    /// Payloads of the events of type `t` about member `node` (peer id,
    /// base58) in this agent's log.
    pub fn facts_about(&self, t: &str, node: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e.event_type == t)
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.payload).ok())
            .filter(|p| p["node"] == node)
            .collect()
    }

    /// Refuse (or accept again) connections with `peers` (fault injection).
    pub async fn block(&self, peers: &[PeerId], block: bool) {
        let ids: Vec<String> = peers.iter().map(|p| p.to_base58()).collect();
        self.node.block_peers(&ids, block).await.unwrap();
    }

    pub async fn dial(&self, addr: &Multiaddr) {
        self.node.net().dial(addr.clone()).await.unwrap();
    }

    /// The leader as this agent sees it: (leader name, term, role).
    pub fn leader(&self) -> (Option<String>, u64, String) {
        let v = self.node.leader().view(self.node.leader_ctx());
        (v.leader, v.term, v.role)
    }

    /// The registry in the text format `/metrics` serves.
    pub fn scrape(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).unwrap();
        s
    }

    /// Sum of the series starting with `prefix` (absent: zero).
    pub fn metric(&self, prefix: &str) -> f64 {
        self.scrape()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// N agents sharing one swarm key, each bootstrapped to the first.
pub struct Cluster {
    pub agents: Vec<Agent>,
    pub swarm_key: PathBuf,
    pub root: PathBuf,
    // Last: the directories outlive the agents' handles.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Start `n` agents named a0.. and wait until each sees every other
    /// subscribed to the events topic. `tune` adjusts each agent's config.
    pub async fn start(n: usize, tune: impl Fn(&mut AgentConfig)) -> Cluster {
        let c = Cluster::start_unmeshed(n, tune);
        // Setup, not what the tests assert: the whole binary builds eight
        // three-agent clusters at once on two CPUs, and one took over 10 s
        // to mesh in a full CI run (16 s for the binary, against 11 s alone).
        c.wait_meshed(Duration::from_secs(30)).await;
        c
    }

    /// [`Cluster::start`] without waiting for the agents to see each other
    /// (with bounded links, not every agent connects to every other).
    pub fn start_unmeshed(n: usize, tune: impl Fn(&mut AgentConfig)) -> Cluster {
        log_to_test_output();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let swarm_key = root.join("swarm.key");
        std::fs::write(&swarm_key, riftmesh::net::generate_psk().to_string()).unwrap();
        let mut agents: Vec<Agent> = Vec::new();
        for i in 0..n {
            let name = format!("a{i}");
            let mut cfg = fast_config(&name, &root.join(&name), &swarm_key);
            if let Some(first) = agents.first() {
                cfg.bootstrap = vec![first.addr.clone()];
            }
            tune(&mut cfg);
            agents.push(Agent::start(cfg));
        }
        Cluster {
            agents,
            swarm_key,
            root,
            _dir: dir,
        }
    }

    pub async fn wait_meshed(&self, timeout: Duration) {
        let n = self.agents.len();
        for a in &self.agents {
            wait_until(
                &format!("{} to see {} peers subscribed", a.name, n - 1),
                timeout,
                || async { (a.subscribed_peers().await.len() >= n - 1).then_some(()) },
            )
            .await;
        }
    }

    /// Cut agent `i` off from every other (both ends refuse).
    pub async fn isolate(&self, i: usize) {
        let others: Vec<PeerId> = self.others(i).map(|a| a.peer).collect();
        self.agents[i].block(&others, true).await;
        for a in self.others(i) {
            a.block(&[self.agents[i].peer], true).await;
        }
    }

    /// Undo [`Cluster::isolate`] and redial at once, rather than at the
    /// next maintenance tick (node.rs: every 2 s).
    pub async fn heal(&self, i: usize) {
        let others: Vec<PeerId> = self.others(i).map(|a| a.peer).collect();
        self.agents[i].block(&others, false).await;
        for a in self.others(i) {
            a.block(&[self.agents[i].peer], false).await;
        }
        for a in self.others(i) {
            self.agents[i].dial(&a.addr).await;
        }
    }

    pub fn others(&self, i: usize) -> impl Iterator<Item = &Agent> {
        self.agents
            .iter()
            .enumerate()
            .filter(move |(j, _)| *j != i)
            .map(|(_, a)| a)
    }
}

/// A bare libp2p peer of our protocols with the swarm key, listening on a
/// memory address and connected to no one yet (the caller dials): the
/// in-process counterpart of tests/common `bare_peer`.
pub fn bare_memory_peer(
    swarm_key: &Path,
) -> (
    riftmesh::net::NetHandle,
    riftmesh::net::Inbox,
    libp2p::identity::Keypair,
) {
    let psk = riftmesh::net::parse_psk(&std::fs::read_to_string(swarm_key).unwrap()).unwrap();
    let mut registry = Registry::default();
    let metrics = riftmesh::metrics::Metrics::register(&mut registry);
    let key = libp2p::identity::Keypair::generate_ed25519();
    let (h, inbox) = riftmesh::net::start(
        key.clone(),
        riftmesh::net::NetConfig {
            listen: vec![next_memory_addr()],
            bootstrap: Vec::new(),
            mdns: false,
            psk,
            max_message_bytes: 1 << 20,
            inbound_queue: 1024,
            maintain_every: Duration::from_secs(1),
            ping_interval: Duration::from_millis(200),
            limits: riftmesh::limits::NetLimits::default(),
            member_protocols: riftmesh::net::MEMBER_PROTOCOLS,
            link_idle: riftmesh::net::LINK_IDLE,
            full_mesh_max: riftmesh::membership::links::FULL_MESH_MAX,
        },
        &mut registry,
        metrics,
    )
    .unwrap();
    (h, inbox, key)
}
