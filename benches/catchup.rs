//! Catch-up benchmark: `cargo bench --bench catchup`.
//!
//! Real agents on loopback, ports chosen by the OS (read from agent.json):
//! (1) Partition and heal: 5 agents split 2 | 3 with the fault-injection block
//!     list while both sides publish 1,000 events each; time from healing until
//!     every agent holds all 2,000, then a check that each holds every event
//!     once and each source's events in order.
//! (2) Downtime: of 3 agents a, b, c, c is killed (-9) while a publishes
//!     100,000 events; c restarts on the same data dir and catches up (events/s)
//!     while b publishes live events at ~50/s to a durable consumer on c
//!     (latency from the POST on b to the long-poll answer on c).
//! (3) Idle anti-entropy at 20 agents: bytes/s of version-vector summaries
//!     (`riftmesh_antientropy_bytes_total`) and of all libp2p traffic
//!     (`libp2p_bandwidth_bytes_total`) per agent, and resident memory.
//!
//! Prints one plain-text table and writes a JSON copy to target/bench-catchup.json.
//! Environment: RIFTMESH_BENCH_SPLIT_SECS (how long the split holds, default
//! 60), RIFTMESH_BENCH_CATCHUP_EVENTS (events published while c is down,
//! default 100000), RIFTMESH_BENCH_IDLE_SECS (idle measurement window,
//! default 30), RIFTMESH_BENCH_ONLY (e.g. "2,3": run only these measurements).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde::Serialize;
use serde_json::{json, Value};
use tempfile::TempDir;

use common::{
    http_json, keygen, log_tail, percentile, spawn_agent_with, verdict, vm_rss_kb, wait_agent_info,
    Agents,
};

/// Events each side of the split publishes.
const SPLIT_SIDE_EVENTS: usize = 1000;
const SPLIT_BATCH: usize = 50;
/// Heal target: every agent holds everything within this many seconds.
const HEAL_TARGET_SECS: f64 = 5.0;
const DOWNTIME_BATCH: usize = 100;
/// Concurrent batch publishers on a while c is down.
const DOWNTIME_PUBLISHERS: usize = 4;
const CATCHUP_TARGET_RATE: f64 = 10_000.0;
const LIVE_INTERVAL: Duration = Duration::from_millis(20);
/// At least this many live events, even if the catch-up ends sooner.
const LIVE_MIN: usize = 100;
const LIVE_TARGET_P99_MS: f64 = 100.0;
/// How long c is watched after it holds everything (does it keep fetching?).
const AFTER_DONE: Duration = Duration::from_secs(5);
const IDLE_AGENTS: usize = 20;
/// Anti-entropy target per agent, bytes/s (1 KB = 1000 bytes).
const IDLE_TARGET_BPS: f64 = 1000.0;

// ---------------------------------------------------------------- setup

struct Bench {
    root: PathBuf,
    bin: &'static str,
    http: reqwest::Client,
    /// Every temporary directory is removed at the end of the run.
    keep: Mutex<Vec<TempDir>>,
    split_secs: f64,
    catchup_events: usize,
    idle_secs: f64,
}

impl Bench {
    fn tempdir(&self, prefix: &str) -> anyhow::Result<PathBuf> {
        let d = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.root)?;
        let p = d.path().to_path_buf();
        self.keep.lock().unwrap().push(d);
        Ok(p)
    }

    async fn get(&self, url: &str) -> anyhow::Result<Value> {
        http_json(self.http.get(url)).await
    }

    async fn post(&self, url: &str, body: &Value) -> anyhow::Result<Value> {
        http_json(self.http.post(url).json(body)).await
    }

    async fn status(&self, p: &Peer) -> anyhow::Result<Value> {
        self.get(&format!("{}/v1/status", p.api)).await
    }

    /// `store.events` of the agent's status (0 when it does not answer).
    async fn held(&self, p: &Peer) -> u64 {
        match self.status(p).await {
            Ok(v) => v["store"]["events"].as_u64().unwrap_or(0),
            Err(_) => 0,
        }
    }

    async fn metrics(&self, p: &Peer) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(&p.metrics)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Peer ids this agent is connected to and sees subscribed to the events topic.
    async fn subscribed(&self, p: &Peer) -> HashSet<String> {
        let Ok(v) = self.get(&format!("{}/v1/peers", p.api)).await else {
            return HashSet::new();
        };
        v["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["gossip_subscribed"].as_bool() == Some(true))
            .filter_map(|p| p["peer_id"].as_str().map(str::to_string))
            .collect()
    }

    /// Every retained event of `etype`, in log order (history pages of 1000).
    async fn history(&self, p: &Peer, etype: &str) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let v = self
                .get(&format!(
                    "{}/v1/events?after={after}&types={etype}&limit=1000",
                    p.api
                ))
                .await?;
            out.extend(v["events"].as_array().into_iter().flatten().cloned());
            let next = v["next_after"].as_u64().unwrap_or(after);
            if next == after || next >= v["head"].as_u64().unwrap_or(0) {
                return Ok(out);
            }
            after = next;
        }
    }
}

/// Sum of a metric's samples: lines named exactly `name` (any labels) whose
/// text contains `filter`.
fn metric(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One agent as the bench sees it.
#[derive(Clone, Debug)]
struct Peer {
    name: String,
    /// `http://host:port`
    api: String,
    /// `http://host:port/metrics`
    metrics: String,
    peer_id: String,
    pid: u32,
}

impl Peer {
    fn from_info(name: &str, v: &Value) -> Self {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        Peer {
            name: name.to_string(),
            api: format!("http://{}", s("api")),
            metrics: format!("http://{}/metrics", s("metrics")),
            peer_id: s("peer_id"),
            pid: v["pid"].as_u64().unwrap_or(0) as u32,
        }
    }
}

/// Agents sharing one swarm key, all bootstrapped to the first; every process
/// is killed when this is dropped.
struct Cluster {
    root: PathBuf,
    names: Vec<String>,
    extra: Vec<&'static str>,
    boot: Option<String>,
    agents: Agents,
    peers: Vec<Peer>,
    /// Killed on purpose (not an error when found exited).
    down: Vec<bool>,
}

const POLL: Duration = Duration::from_millis(5);

impl Cluster {
    async fn start(
        b: &Bench,
        prefix: &str,
        names: Vec<String>,
        extra: Vec<&'static str>,
    ) -> anyhow::Result<Cluster> {
        let root = b.tempdir(prefix)?;
        keygen(b.bin, &root.join("swarm.key"))?;
        let mut cl = Cluster {
            root,
            down: vec![false; names.len()],
            names,
            extra,
            boot: None,
            agents: Agents {
                children: Vec::new(),
            },
            peers: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let first = spawn_agent_with(b.bin, &cl.root, &cl.names[0], None, &cl.extra)?;
        cl.agents.children.push(first);
        let v = wait_agent_info(
            &mut cl.agents.children[0],
            &cl.root,
            &cl.names[0],
            deadline,
            POLL,
        )
        .await?;
        cl.peers.push(Peer::from_info(&cl.names[0], &v));
        let listen = loop {
            if let Ok(v) = b.status(&cl.peers[0]).await {
                if let Some(a) = v["listen_addrs"]
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(|a| a.as_str())
                {
                    break a.to_string();
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "agent {} reports no listen address",
                cl.names[0]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let boot = format!("{listen}/p2p/{}", cl.peers[0].peer_id);
        for name in &cl.names[1..] {
            let child = spawn_agent_with(b.bin, &cl.root, name, Some(&boot), &cl.extra)?;
            cl.agents.children.push(child);
        }
        cl.boot = Some(boot);
        for k in 1..cl.names.len() {
            let v = wait_agent_info(
                &mut cl.agents.children[k],
                &cl.root,
                &cl.names[k],
                deadline,
                POLL,
            )
            .await?;
            cl.peers.push(Peer::from_info(&cl.names[k], &v));
        }
        Ok(cl)
    }

    /// Fail if an agent that should run has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (k, c) in self.agents.children.iter_mut().enumerate() {
            if self.down[k] {
                continue;
            }
            if let Some(status) = c.try_wait()? {
                anyhow::bail!(
                    "agent {} exited ({status}):\n{}",
                    self.names[k],
                    log_tail(&self.root, &self.names[k])
                );
            }
        }
        Ok(())
    }

    /// Wait until every agent sees all the others subscribed to the events
    /// topic. Returns (ready, seconds waited, peers seen per agent).
    async fn wait_mesh(
        &mut self,
        b: &Bench,
        timeout: Duration,
    ) -> anyhow::Result<(bool, f64, Vec<usize>)> {
        let want = self.peers.len() - 1;
        let t0 = Instant::now();
        loop {
            let seen: Vec<usize> = join_all(self.peers.iter().map(|p| b.subscribed(p)))
                .await
                .iter()
                .map(HashSet::len)
                .collect();
            let secs = t0.elapsed().as_secs_f64();
            if seen.iter().all(|n| *n >= want) {
                return Ok((true, secs, seen));
            }
            self.check_alive()?;
            if t0.elapsed() >= timeout {
                return Ok((false, secs, seen));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill9(&mut self, k: usize) {
        let c = &mut self.agents.children[k];
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
        self.down[k] = true;
    }

    /// Start agent `k` again on its data dir; returns when its agent.json
    /// (API bound) appears.
    async fn restart(&mut self, b: &Bench, k: usize) -> anyhow::Result<Instant> {
        self.kill9(k);
        let _ = std::fs::remove_file(self.root.join(&self.names[k]).join("agent.json"));
        let child = spawn_agent_with(
            b.bin,
            &self.root,
            &self.names[k],
            self.boot.as_deref(),
            &self.extra,
        )?;
        // The old (exited) process is reaped already; the guard holds the new one.
        self.agents.children[k] = child;
        self.down[k] = false;
        let v = wait_agent_info(
            &mut self.agents.children[k],
            &self.root,
            &self.names[k],
            Instant::now() + Duration::from_secs(60),
            POLL,
        )
        .await?;
        let up = Instant::now();
        self.peers[k] = Peer::from_info(&self.names[k], &v);
        Ok(up)
    }
}

// ---------------------------------------------------------------- log checks

/// What an agent's log holds of one event type, against what was published.
#[derive(Clone, Debug, Default, Serialize)]
struct LogCheck {
    events: usize,
    /// Entries whose content hash or (source, source_seq) appeared before.
    twice: usize,
    /// Entries whose source_seq is not above the previous one of their source.
    out_of_order: usize,
    /// Published events not held.
    missing: u64,
    /// Held events that were not published (unknown source or sequence).
    unexpected: usize,
}

impl LogCheck {
    fn ok(&self) -> bool {
        self.twice == 0 && self.out_of_order == 0 && self.missing == 0 && self.unexpected == 0
    }

    fn describe(&self) -> String {
        if self.ok() {
            return "ok".into();
        }
        let mut parts = Vec::new();
        for (n, what) in [
            (self.twice as u64, "held twice"),
            (self.out_of_order as u64, "out of order"),
            (self.missing, "missing"),
            (self.unexpected as u64, "unexpected"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        parts.join(", ")
    }

    fn add(&mut self, o: &LogCheck) {
        self.events += o.events;
        self.twice += o.twice;
        self.out_of_order += o.out_of_order;
        self.missing += o.missing;
        self.unexpected += o.unexpected;
    }
}

/// `expected`: source peer id → events it published (source_seq 1..=n).
fn check_log(events: &[Value], expected: &HashMap<String, u64>) -> LogCheck {
    let mut c = LogCheck {
        events: events.len(),
        ..Default::default()
    };
    let mut hashes = HashSet::new();
    let mut keys = HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut held: HashMap<&str, u64> = HashMap::new();
    for e in events {
        let src = e["node"].as_str().unwrap_or("");
        let seq = e["source_seq"].as_u64().unwrap_or(0);
        let new_hash = hashes.insert(e["hash"].as_str().unwrap_or("").to_string());
        let new_key = keys.insert((src.to_string(), seq));
        if !new_hash || !new_key {
            c.twice += 1;
        }
        let prev = last.insert(src, seq).unwrap_or(0);
        if seq <= prev {
            c.out_of_order += 1;
        }
        if !new_key {
            continue;
        }
        match expected.get(src) {
            Some(&n) if (1..=n).contains(&seq) => *held.entry(src).or_default() += 1,
            _ => c.unexpected += 1,
        }
    }
    for (src, n) in expected {
        c.missing += n.saturating_sub(held.get(src.as_str()).copied().unwrap_or(0));
    }
    c
}

// ---------------------------------------------------------------- (1) partition and heal

#[derive(Debug, Default, Serialize)]
struct SplitResult {
    mesh_secs: f64,
    /// How long the split held (block to heal).
    split_secs: f64,
    /// store.events per agent just before healing.
    held_at_heal: Vec<u64>,
    /// Each side held exactly its own events at the heal.
    partition_held: bool,
    /// Per agent: seconds from the heal until it had its 4 peers back.
    reconnect_secs: Vec<Option<f64>>,
    /// Per agent: seconds from the heal until it held all 2,000.
    complete_secs: Vec<Option<f64>>,
    /// Per agent: the history check of the 2,000 events.
    checks: Vec<LogCheck>,
    /// store.events per agent at the end.
    final_events: Vec<u64>,
    /// riftmesh_catchup_events_total per agent at the end.
    catchup_fetched: Vec<f64>,
    /// riftmesh_order_gaps_skipped_total per agent at the end.
    gaps_skipped: Vec<f64>,
}

impl SplitResult {
    fn heal_secs(&self) -> Option<f64> {
        self.complete_secs
            .iter()
            .try_fold(0.0f64, |m, s| s.map(|s| m.max(s)))
    }
}

async fn publish_side(
    b: &Bench,
    side: &[Peer],
    label: &str,
    start: Instant,
    window: Duration,
) -> anyhow::Result<HashMap<String, u64>> {
    let batches = SPLIT_SIDE_EVENTS.div_ceil(SPLIT_BATCH);
    let mut published: HashMap<String, u64> = HashMap::new();
    for k in 0..batches {
        let at = start + window.mul_f64(k as f64 / batches as f64);
        tokio::time::sleep_until(at.into()).await;
        let p = &side[k % side.len()];
        let events: Vec<Value> = (k * SPLIT_BATCH..((k + 1) * SPLIT_BATCH).min(SPLIT_SIDE_EVENTS))
            .map(|i| {
                json!({ "type": "BENCH_SPLIT", "payload": { "side": label, "agent": p.name, "i": i } })
            })
            .collect();
        let v = b
            .post(
                &format!("{}/v1/events/batch", p.api),
                &json!({ "events": events }),
            )
            .await?;
        let new = v["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["duplicate"].as_bool() == Some(false))
            .count() as u64;
        anyhow::ensure!(
            new == events.len() as u64,
            "{}: {} of {} events answered as duplicates",
            p.name,
            events.len() as u64 - new,
            events.len()
        );
        *published.entry(p.peer_id.clone()).or_default() += new;
    }
    Ok(published)
}

async fn split(b: &Bench) -> anyhow::Result<SplitResult> {
    let names = (0..5).map(|i| format!("p{i}")).collect();
    let mut cl = Cluster::start(b, "split-", names, vec!["--fault-injection"]).await?;
    let mut r = SplitResult::default();
    let (ready, secs, seen) = cl.wait_mesh(b, Duration::from_secs(60)).await?;
    anyhow::ensure!(ready, "mesh of 5 not formed in 60 s (peers seen: {seen:?})");
    r.mesh_secs = secs;
    eprintln!("    mesh of 5 ready after {secs:.1} s; splitting 2 | 3");

    let peers = cl.peers.clone();
    let (left, right) = peers.split_at(2);
    let ids = |g: &[Peer]| g.iter().map(|p| p.peer_id.clone()).collect::<Vec<_>>();
    let block = |side: &[Peer], other: &[Peer], on: bool| {
        let body = json!({ "peers": ids(other), "block": on });
        let urls: Vec<String> = side
            .iter()
            .map(|p| format!("{}/v1/debug/block", p.api))
            .collect();
        async move {
            for r in join_all(urls.iter().map(|u| b.post(u, &body))).await {
                r?;
            }
            anyhow::Ok(())
        }
    };
    let split_at = Instant::now();
    let (l, rr) = tokio::join!(block(left, right, true), block(right, left, true));
    l?;
    rr?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts: Vec<usize> = join_all(peers.iter().map(|p| b.subscribed(p)))
            .await
            .iter()
            .map(HashSet::len)
            .collect();
        let want = [1, 1, 2, 2, 2];
        if counts.iter().zip(want).all(|(c, w)| *c == w) {
            break;
        }
        cl.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the split did not take within 30 s (peers seen: {counts:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Both sides publish, spread over three quarters of the split.
    let window = Duration::from_secs_f64(b.split_secs * 0.75);
    let start = Instant::now();
    let (pl, pr) = tokio::join!(
        publish_side(b, left, "left", start, window),
        publish_side(b, right, "right", start, window)
    );
    let mut expected = pl?;
    expected.extend(pr?);
    tokio::time::sleep_until((split_at + Duration::from_secs_f64(b.split_secs)).into()).await;
    // Each side holds its own 1000 (gossip inside the side) before the heal.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        r.held_at_heal = join_all(peers.iter().map(|p| b.held(p))).await;
        if r.held_at_heal
            .iter()
            .all(|n| *n >= SPLIT_SIDE_EVENTS as u64)
        {
            break;
        }
        cl.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "a side did not agree on its own events within 30 s after the split time (held: {:?})",
            r.held_at_heal
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.partition_held = r
        .held_at_heal
        .iter()
        .all(|n| *n == SPLIT_SIDE_EVENTS as u64);

    // Heal, and watch every agent get its peers and the other side's events back.
    eprintln!(
        "    healing after {:.1} s",
        split_at.elapsed().as_secs_f64()
    );
    let healed = Instant::now();
    r.split_secs = healed.duration_since(split_at).as_secs_f64();
    let (l, rr) = tokio::join!(block(left, right, false), block(right, left, false));
    l?;
    rr?;
    let total = 2 * SPLIT_SIDE_EVENTS as u64;
    r.reconnect_secs = vec![None; peers.len()];
    r.complete_secs = vec![None; peers.len()];
    let deadline = healed + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while r.complete_secs.iter().any(Option::is_none) && Instant::now() < deadline {
        tick.tick().await;
        let st = join_all(peers.iter().map(|p| b.status(p))).await;
        let at = healed.elapsed().as_secs_f64();
        for (k, s) in st.iter().enumerate() {
            let Ok(s) = s else { continue };
            if r.reconnect_secs[k].is_none()
                && s["connected_peers"].as_u64().unwrap_or(0) >= peers.len() as u64 - 1
            {
                r.reconnect_secs[k] = Some(at);
            }
            if r.complete_secs[k].is_none() && s["store"]["events"].as_u64().unwrap_or(0) >= total {
                r.complete_secs[k] = Some(at);
            }
        }
        cl.check_alive()?;
    }
    match r.heal_secs() {
        Some(s) => eprintln!("    every agent holds all {total} events {s:.2} s after healing"),
        None => eprintln!("    not every agent held all {total} events 60 s after healing"),
    }

    // Every event once, in each source's order, on every agent.
    for p in &peers {
        let evs = b.history(p, "BENCH_SPLIT").await?;
        r.checks.push(check_log(&evs, &expected));
        r.final_events.push(b.held(p).await);
        let m = b.metrics(p).await.unwrap_or_default();
        r.catchup_fetched
            .push(metric(&m, "riftmesh_catchup_events_total", ""));
        r.gaps_skipped
            .push(metric(&m, "riftmesh_order_gaps_skipped_total", ""));
    }
    drop(cl);
    Ok(r)
}

// ---------------------------------------------------------------- (2) downtime catch-up

#[derive(Debug, Default, Serialize)]
struct DowntimeResult {
    events: usize,
    mesh_secs: f64,
    /// Publishing the events on a (c down), seconds.
    publish_secs: f64,
    /// After the publishing ended, until b held them all.
    b_complete_secs: f64,
    b_catchup_fetched: f64,
    b_inbound_dropped: f64,
    /// Spawn of c until its agent.json (API bound).
    c_start_secs: f64,
    /// API up until b and c see each other subscribed (live publishing starts).
    c_joined_secs: f64,
    /// API up until c holds all the events (None: not within the time cap).
    catchup_secs: Option<f64>,
    /// (seconds after API up, store.events) every 250 ms during the catch-up.
    progress: Vec<(f64, u64)>,
    /// riftmesh_catchup_events_total on c when it held everything, and at the end.
    c_fetched_at_done: f64,
    c_fetched: f64,
    /// Seconds from done to the end reading.
    c_after_done_secs: f64,
    c_fetched_bytes: f64,
    c_duplicates_from_peers: f64,
    c_gaps_skipped: f64,
    c_rejected: f64,
    c_final_events: u64,
    c_check: LogCheck,
    live_sent: usize,
    /// Live events published before c held all the events.
    live_during_catchup: usize,
    /// Milliseconds, one per live event; infinite when never received.
    live_ms: Vec<f64>,
    live_delivered_twice: usize,
    live_check: LogCheck,
    live_post_ms_p99: f64,
    /// Per live event held by c: its received_ms on c minus its ts_ms on b.
    live_into_log_ms: Vec<f64>,
    live_error: Option<String>,
}

impl DowntimeResult {
    fn rate(&self) -> Option<f64> {
        self.catchup_secs.map(|s| self.events as f64 / s)
    }
}

/// Publish `n` events on `p` in batches, from several tasks; returns the id of
/// the event with the highest log sequence (a's last, in its source order).
async fn publish_many(b: &Bench, p: &Peer, n: usize) -> anyhow::Result<String> {
    let next = &AtomicUsize::new(0);
    let url = &format!("{}/v1/events/batch", p.api);
    let tasks = (0..DOWNTIME_PUBLISHERS).map(|_| async move {
        let mut last: (u64, String) = (0, String::new());
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let lo = k * DOWNTIME_BATCH;
            if lo >= n {
                return anyhow::Ok(last);
            }
            let events: Vec<Value> = (lo..(lo + DOWNTIME_BATCH).min(n))
                .map(|i| json!({ "type": "BENCH_CATCHUP", "payload": common::event_payload(i as u64) }))
                .collect();
            let v = b.post(url, &json!({ "events": events })).await?;
            for res in v["results"].as_array().into_iter().flatten() {
                anyhow::ensure!(
                    res["duplicate"].as_bool() == Some(false),
                    "event answered as a duplicate: {res}"
                );
                let seq = res["seq"].as_u64().unwrap_or(0);
                if seq > last.0 {
                    last = (seq, res["id"].as_str().unwrap_or_default().to_string());
                }
            }
        }
    });
    let mut last: (u64, String) = (0, String::new());
    for r in join_all(tasks).await {
        let l = r?;
        if l.0 > last.0 {
            last = l;
        }
    }
    anyhow::ensure!(!last.1.is_empty(), "no event published");
    Ok(last.1)
}

#[derive(Default)]
struct LiveRx {
    got: Mutex<Vec<(usize, Instant)>>,
}

/// Long-poll the durable consumer `live` on c, acknowledging each batch, and
/// note when each BENCH_LIVE event arrived. Runs until aborted.
async fn receive_live(http: reqwest::Client, api: String, st: Arc<LiveRx>) -> anyhow::Result<()> {
    let fetch = format!("{api}/v1/consumers/live/events?max=100&wait_ms=5000");
    let ack = format!("{api}/v1/consumers/live/ack");
    loop {
        let v = http_json(http.get(&fetch)).await?;
        let now = Instant::now();
        let mut last = None;
        for e in v["events"].as_array().into_iter().flatten() {
            last = e["seq"].as_u64().or(last);
            if e["type"].as_str() == Some("BENCH_LIVE") {
                if let Some(i) = e["payload"]["i"].as_u64() {
                    st.got.lock().unwrap().push((i as usize, now));
                }
            }
        }
        if let Some(seq) = last {
            http_json(http.post(&ack).json(&json!({ "seq": seq }))).await?;
        }
    }
}

struct LiveSent {
    joined: Instant,
    sent: Vec<Instant>,
    post_ms: Vec<f64>,
}

/// Once b and c see each other on the events topic, publish one BENCH_LIVE
/// event on b every 20 ms until `stop`.
async fn publish_live(
    http: reqwest::Client,
    b_peer: Peer,
    c_peer: Peer,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> anyhow::Result<LiveSent> {
    let bench_get = |url: String| {
        let http = http.clone();
        async move { http_json(http.get(url)).await }
    };
    let sees = |v: &Value, id: &str| {
        v["peers"].as_array().into_iter().flatten().any(|p| {
            p["peer_id"].as_str() == Some(id) && p["gossip_subscribed"].as_bool() == Some(true)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (vb, vc) = tokio::join!(
            bench_get(format!("{}/v1/peers", b_peer.api)),
            bench_get(format!("{}/v1/peers", c_peer.api))
        );
        if let (Ok(vb), Ok(vc)) = (vb, vc) {
            if sees(&vb, &c_peer.peer_id) && sees(&vc, &b_peer.peer_id) {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "b and c did not see each other on the events topic within 30 s of c's restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let joined = Instant::now();
    let url = format!("{}/v1/events", b_peer.api);
    let mut tick = tokio::time::interval(LIVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = Vec::new();
    let mut post_ms = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let i = sent.len();
        let t = Instant::now();
        http_json(
            http.post(&url)
                .json(&json!({ "type": "BENCH_LIVE", "payload": { "i": i } })),
        )
        .await?;
        sent.push(t);
        post_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        count.store(sent.len(), Ordering::Relaxed);
    }
    Ok(LiveSent {
        joined,
        sent,
        post_ms,
    })
}

async fn downtime(b: &Bench) -> anyhow::Result<DowntimeResult> {
    let n = b.catchup_events;
    let names = ["a", "b", "c"].map(String::from).to_vec();
    let mut cl = Cluster::start(b, "downtime-", names, Vec::new()).await?;
    let mut r = DowntimeResult {
        events: n,
        ..Default::default()
    };
    let (ready, secs, seen) = cl.wait_mesh(b, Duration::from_secs(60)).await?;
    anyhow::ensure!(ready, "mesh of 3 not formed in 60 s (peers seen: {seen:?})");
    r.mesh_secs = secs;

    cl.kill9(2);
    let (a, bp) = (cl.peers[0].clone(), cl.peers[1].clone());
    eprintln!("    c killed; publishing {n} events on a in batches of {DOWNTIME_BATCH}");
    let t = Instant::now();
    let last_id = publish_many(b, &a, n).await?;
    r.publish_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let deadline = t + Duration::from_secs(120);
    while b.held(&bp).await < n as u64 {
        cl.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "b did not hold all {n} events within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.b_complete_secs = t.elapsed().as_secs_f64();
    let m = b.metrics(&bp).await?;
    r.b_catchup_fetched = metric(&m, "riftmesh_catchup_events_total", "");
    r.b_inbound_dropped = metric(&m, "riftmesh_inbound_dropped_total", "");
    eprintln!(
        "    published in {:.1} s ({:.0} events/s); b held them all {:.1} s later; restarting c",
        r.publish_secs,
        n as f64 / r.publish_secs,
        r.b_complete_secs
    );

    // Restart c; the clock starts when its API is bound.
    let t = Instant::now();
    let up = cl.restart(b, 2).await?;
    r.c_start_secs = up.duration_since(t).as_secs_f64();
    let c = cl.peers[2].clone();
    b.http
        .put(format!("{}/v1/consumers/live", c.api))
        .json(&json!({ "types": ["BENCH_LIVE"] }))
        .send()
        .await?
        .error_for_status()?;
    let rx = Arc::new(LiveRx::default());
    let receiver = tokio::spawn(receive_live(b.http.clone(), c.api.clone(), rx.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let live_count = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish_live(
        b.http.clone(),
        bp.clone(),
        c.clone(),
        stop.clone(),
        live_count.clone(),
    ));

    // Done when c holds a's last event: the reorder buffer appends a source's
    // events in order, and the history check below confirms all are there.
    let last_url = format!("{}/v1/events/{last_id}", c.api);
    let cap = Duration::from_secs(60 + (n / 1000) as u64);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sample = up;
    let done = loop {
        tick.tick().await;
        if b.get(&last_url).await.is_ok() {
            break Some(Instant::now());
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_millis(250);
            let held = b.held(&c).await;
            r.progress.push((up.elapsed().as_secs_f64(), held));
        }
        cl.check_alive()?;
        if up.elapsed() >= cap {
            eprintln!("    c did not catch up within {cap:?}");
            break None;
        }
    };
    r.catchup_secs = done.map(|d| d.duration_since(up).as_secs_f64());
    let fetched_at = Instant::now();
    r.c_fetched_at_done = metric(
        &b.metrics(&c).await.unwrap_or_default(),
        "riftmesh_catchup_events_total",
        "",
    );
    if let Some(s) = r.catchup_secs {
        eprintln!(
            "    c held all {n} events {s:.2} s after its API came up ({:.0} events/s)",
            n as f64 / s
        );
    }
    r.progress
        .push((up.elapsed().as_secs_f64(), b.held(&c).await));

    // Enough live samples, then stop and wait for them on c.
    let deadline = Instant::now() + Duration::from_secs(30);
    while live_count.load(Ordering::Relaxed) < LIVE_MIN
        && !publisher.is_finished()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let live = match publisher.await {
        Ok(res) => res,
        Err(e) => Err(anyhow::anyhow!("{e}")),
    };
    let live = match live {
        Ok(l) => l,
        Err(e) => {
            // The catch-up was measured; report it without live figures.
            eprintln!("    live publishing on b failed: {e:#}");
            r.live_error = Some(format!("{e:#}"));
            receiver.abort();
            LiveSent {
                joined: up,
                sent: Vec::new(),
                post_ms: Vec::new(),
            }
        }
    };
    r.c_joined_secs = live.joined.duration_since(up).as_secs_f64();
    r.live_sent = live.sent.len();
    r.live_during_catchup = match done {
        Some(d) => live.sent.iter().filter(|t| **t < d).count(),
        None => live.sent.len(),
    };
    let mut pm = live.post_ms.clone();
    pm.sort_by(|a, b| a.total_cmp(b));
    r.live_post_ms_p99 = percentile(&pm, 99.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let distinct: HashSet<usize> = rx.got.lock().unwrap().iter().map(|g| g.0).collect();
        if distinct.len() >= live.sent.len() || receiver.is_finished() || Instant::now() >= deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver.abort();
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(1), receiver).await {
        eprintln!("    live consumer on c failed: {e:#}");
    }
    let mut at: Vec<Option<Instant>> = vec![None; live.sent.len()];
    for &(i, t) in rx.got.lock().unwrap().iter() {
        match at.get_mut(i) {
            Some(slot @ None) => *slot = Some(t),
            Some(Some(_)) => r.live_delivered_twice += 1,
            None => {}
        }
    }
    r.live_ms = at
        .iter()
        .zip(&live.sent)
        .map(|(a, s)| match a {
            Some(a) => a.saturating_duration_since(*s).as_secs_f64() * 1000.0,
            None => f64::INFINITY,
        })
        .collect();

    // What c holds, checked event by event; and whether it goes on fetching
    // once it holds everything.
    tokio::time::sleep_until((fetched_at + AFTER_DONE).into()).await;
    let m = b.metrics(&c).await?;
    r.c_fetched = metric(&m, "riftmesh_catchup_events_total", "");
    r.c_after_done_secs = fetched_at.elapsed().as_secs_f64();
    r.c_fetched_bytes = metric(&m, "riftmesh_catchup_bytes_total", "");
    r.c_duplicates_from_peers = metric(&m, "riftmesh_events_duplicate_total", "peers");
    r.c_gaps_skipped = metric(&m, "riftmesh_order_gaps_skipped_total", "");
    r.c_rejected = metric(&m, "riftmesh_events_rejected_total", "");
    r.c_final_events = b.held(&c).await;
    let evs = b.history(&c, "BENCH_CATCHUP").await?;
    r.c_check = check_log(&evs, &HashMap::from([(a.peer_id.clone(), n as u64)]));
    let evs = b.history(&c, "BENCH_LIVE").await?;
    r.live_check = check_log(
        &evs,
        &HashMap::from([(bp.peer_id.clone(), live.sent.len() as u64)]),
    );
    // Where live events waited: stamped at b (ts_ms) -> appended to c's log
    // (received_ms); same clock, one machine.
    r.live_into_log_ms = evs
        .iter()
        .filter_map(|e| Some(e["received_ms"].as_f64()? - e["ts_ms"].as_f64()?))
        .collect();
    drop(cl);
    Ok(r)
}

// ---------------------------------------------------------------- (3) idle anti-entropy

#[derive(Debug, Default, Serialize)]
struct IdleResult {
    agents: usize,
    mesh_secs: f64,
    mesh_ready: bool,
    /// Peers each agent saw subscribed when the measurement started.
    peers_seen: Vec<usize>,
    window_secs: f64,
    /// riftmesh_antientropy_bytes_total increase per agent, bytes/s.
    summary_bps: Vec<f64>,
    /// riftmesh_antientropy_exchanges_total increase per agent (summaries it started), per s.
    exchanges_per_sec: Vec<f64>,
    /// libp2p_bandwidth_bytes_total increase per agent, bytes/s, in + out.
    bandwidth_bps: Vec<f64>,
    bandwidth_in_bps: Vec<f64>,
    bandwidth_out_bps: Vec<f64>,
    /// libp2p_kad_inbound_requests_total increase per agent, per s.
    kad_requests_per_sec: Vec<f64>,
    /// Connections established per agent during the window.
    new_connections: Vec<f64>,
    rss_mb: Vec<f64>,
}

struct Snapshot {
    at: Instant,
    summary_bytes: f64,
    exchanges: f64,
    bw_in: f64,
    bw_out: f64,
    kad_requests: f64,
    connections: f64,
}

async fn snapshot(b: &Bench, p: &Peer) -> anyhow::Result<Snapshot> {
    let m = b.metrics(p).await?;
    Ok(Snapshot {
        at: Instant::now(),
        summary_bytes: metric(&m, "riftmesh_antientropy_bytes_total", ""),
        exchanges: metric(&m, "riftmesh_antientropy_exchanges_total", ""),
        bw_in: metric(&m, "libp2p_bandwidth_bytes_total", "direction=\"Inbound\""),
        bw_out: metric(&m, "libp2p_bandwidth_bytes_total", "direction=\"Outbound\""),
        kad_requests: metric(&m, "libp2p_kad_inbound_requests_total", ""),
        connections: metric(&m, "libp2p_swarm_connections_established_total", ""),
    })
}

async fn idle(b: &Bench) -> anyhow::Result<IdleResult> {
    let names = (0..IDLE_AGENTS).map(|i| format!("i{i:02}")).collect();
    let mut cl = Cluster::start(b, "idle-", names, Vec::new()).await?;
    let mut r = IdleResult {
        agents: IDLE_AGENTS,
        ..Default::default()
    };
    let (ready, secs, seen) = cl.wait_mesh(b, Duration::from_secs(120)).await?;
    r.mesh_ready = ready;
    r.mesh_secs = secs;
    if ready {
        eprintln!("    mesh of {IDLE_AGENTS} ready after {secs:.1} s");
    } else {
        eprintln!("    warning: mesh of {IDLE_AGENTS} incomplete after {secs:.0} s (peers seen: {seen:?}); measuring anyway");
    }
    let peers = cl.peers.clone();
    // One event from every agent, so each version vector names all 20 sources
    // (as in a cluster that has been running), then let the agents settle.
    for res in join_all(peers.iter().map(|p| async move {
        b.post(
            &format!("{}/v1/events", p.api),
            &json!({ "type": "BENCH_IDLE", "payload": { "agent": p.name } }),
        )
        .await
    }))
    .await
    {
        res?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = join_all(peers.iter().map(|p| b.held(p))).await;
        if held.iter().all(|h| *h >= IDLE_AGENTS as u64) {
            break;
        }
        cl.check_alive()?;
        if Instant::now() >= deadline {
            eprintln!("    warning: not every agent holds the {IDLE_AGENTS} seed events after 30 s: {held:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.peers_seen = join_all(peers.iter().map(|p| b.subscribed(p)))
        .await
        .iter()
        .map(HashSet::len)
        .collect();

    eprintln!(
        "    measuring {IDLE_AGENTS} idle agents for {:.0} s",
        b.idle_secs
    );
    let before: Vec<Snapshot> = join_all(peers.iter().map(|p| snapshot(b, p)))
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    tokio::time::sleep(Duration::from_secs_f64(b.idle_secs)).await;
    let after: Vec<Snapshot> = join_all(peers.iter().map(|p| snapshot(b, p)))
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    cl.check_alive()?;
    let mut dt_sum = 0.0;
    for (s0, s1) in before.iter().zip(&after) {
        let dt = s1.at.duration_since(s0.at).as_secs_f64();
        dt_sum += dt;
        let bytes = s1.summary_bytes - s0.summary_bytes;
        let ex = s1.exchanges - s0.exchanges;
        r.summary_bps.push(bytes / dt);
        r.exchanges_per_sec.push(ex / dt);
        let (bi, bo) = (s1.bw_in - s0.bw_in, s1.bw_out - s0.bw_out);
        r.bandwidth_in_bps.push(bi / dt);
        r.bandwidth_out_bps.push(bo / dt);
        r.bandwidth_bps.push((bi + bo) / dt);
        r.kad_requests_per_sec
            .push((s1.kad_requests - s0.kad_requests) / dt);
        r.new_connections.push(s1.connections - s0.connections);
    }
    r.window_secs = dt_sum / before.len().max(1) as f64;
    for (k, p) in peers.iter().enumerate() {
        let kb = vm_rss_kb(p.pid)
            .ok_or_else(|| anyhow::anyhow!("cannot read VmRSS of agent {}", cl.names[k]))?;
        r.rss_mb.push(kb as f64 / 1024.0);
    }
    drop(cl);
    Ok(r)
}

// ---------------------------------------------------------------- report

struct Row {
    name: String,
    value: String,
    target: String,
    result: String,
    json: Value,
}

fn row(name: &str, value: String, target: &str, ok: Option<bool>, json: Value) -> Row {
    Row {
        name: name.to_string(),
        value,
        target: target.to_string(),
        result: ok.map(verdict).unwrap_or_else(|| "-".into()),
        json,
    }
}

fn secs(v: Option<f64>) -> String {
    match v {
        Some(s) => format!("{s:.2} s"),
        None => "never".into(),
    }
}

fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1} ms")
    } else {
        "never".into()
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        json!(null)
    }
}

fn print_table(rows: &[Row]) {
    let headers = ["measurement", "value", "target", "result"];
    let cells: Vec<[&str; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.name.as_str(),
                r.value.as_str(),
                r.target.as_str(),
                r.result.as_str(),
            ]
        })
        .collect();
    let mut width = headers.map(|h| h.chars().count());
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[&str; 4]| {
        let mut out = String::new();
        for (k, s) in c.iter().enumerate() {
            let pad = " ".repeat(width[k] - s.chars().count());
            if k == 1 {
                out.push_str(&pad);
                out.push_str(s);
            } else {
                out.push_str(s);
                out.push_str(&pad);
            }
            if k < 3 {
                out.push_str("  ");
            }
        }
        out.trim_end().to_string()
    };
    let rule = "-".repeat(width.iter().sum::<usize>() + 2 * 3);
    println!("{}", line(&headers));
    println!("{rule}");
    for c in &cells {
        println!("{}", line(c));
    }
    println!("{rule}");
}

/// The rows with targets of a measurement that failed or was not run.
fn failed(rows: &mut Vec<Row>, e: &anyhow::Error, targets: &[(&str, &str)]) {
    let err = format!("{e:#}");
    let not_run = err.starts_with("not run");
    for (name, target) in targets {
        rows.push(row(
            name,
            if not_run { "not run" } else { "error" }.into(),
            target,
            (!not_run).then_some(false),
            json!({ "error": err }),
        ));
    }
}

fn split_rows(rows: &mut Vec<Row>, r: &anyhow::Result<SplitResult>, b: &Bench) {
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            failed(
                rows,
                e,
                &[("(1) heal: every agent holds all 2000", "<= 5 s")],
            );
            return;
        }
    };
    rows.push(row(
        "(1) 2|3 split held (each side only its own)",
        if r.partition_held { "yes" } else { "no" }.into(),
        "-",
        None,
        json!({ "held_at_heal": r.held_at_heal, "split_secs": r.split_secs, "target_split_secs": b.split_secs }),
    ));
    let reconnect = r
        .reconnect_secs
        .iter()
        .try_fold(0.0f64, |m, s| s.map(|s| m.max(s)));
    rows.push(row(
        "(1) heal: last agent with its 4 peers back",
        secs(reconnect),
        "-",
        None,
        json!({ "per_agent_secs": r.reconnect_secs }),
    ));
    let heal = r.heal_secs();
    let ok = heal.is_some_and(|s| s <= HEAL_TARGET_SECS);
    rows.push(row(
        "(1) heal: every agent holds all 2000",
        secs(heal),
        "<= 5 s",
        Some(ok),
        json!({ "secs": heal, "per_agent_secs": r.complete_secs, "target_secs": HEAL_TARGET_SECS, "met": ok }),
    ));
    let mut all = LogCheck::default();
    for c in &r.checks {
        all.add(c);
    }
    let exact = r
        .final_events
        .iter()
        .all(|n| *n == 2 * SPLIT_SIDE_EVENTS as u64);
    let ok = all.ok() && r.checks.len() == 5 && exact;
    let mut value = format!("{} on 5 agents", all.describe());
    if !exact {
        value.push_str(&format!(" (store.events {:?})", r.final_events));
    }
    rows.push(row(
        "(1) each event once, each source in order",
        value,
        "no dup, no reorder",
        Some(ok),
        json!({ "checks": r.checks, "final_store_events": r.final_events, "met": ok }),
    ));
    rows.push(row(
        "(1) events fetched by catch-up, per agent",
        format!("{:?}", r.catchup_fetched.iter().map(|v| *v as u64).collect::<Vec<_>>()),
        "-",
        None,
        json!({ "catchup_events_total": r.catchup_fetched, "order_gaps_skipped_total": r.gaps_skipped }),
    ));
}

fn downtime_rows(rows: &mut Vec<Row>, r: &anyhow::Result<DowntimeResult>) {
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            failed(
                rows,
                e,
                &[
                    ("(2) c catch-up rate after restart", ">= 10000 events/s"),
                    ("(2) live b->c consumer p99", "< 100 ms"),
                ],
            );
            return;
        }
    };
    let n = r.events;
    rows.push(row(
        &format!("(2) publish {n} on a, c down"),
        format!("{:.0} events/s", n as f64 / r.publish_secs),
        "-",
        None,
        json!({ "secs": r.publish_secs, "b_complete_after_secs": r.b_complete_secs,
                "b_catchup_events_total": r.b_catchup_fetched, "b_inbound_dropped_total": r.b_inbound_dropped }),
    ));
    rows.push(row(
        &format!("(2) c API up -> holds all {n}"),
        secs(r.catchup_secs),
        "-",
        None,
        json!({ "secs": r.catchup_secs, "c_start_secs": r.c_start_secs, "progress": r.progress }),
    ));
    let rate = r.rate();
    let ok = rate.is_some_and(|v| v >= CATCHUP_TARGET_RATE);
    rows.push(row(
        "(2) c catch-up rate after restart",
        rate.map(|v| format!("{v:.0} events/s"))
            .unwrap_or_else(|| "never".into()),
        ">= 10000 events/s",
        Some(ok),
        json!({ "events_per_sec": rate, "target": CATCHUP_TARGET_RATE, "met": ok }),
    ));
    rows.push(row(
        "(2) c fetched by catch-up / needed, at done",
        format!(
            "{:.0} / {n} ({:.2}x)",
            r.c_fetched_at_done,
            r.c_fetched_at_done / n.max(1) as f64
        ),
        "-",
        None,
        json!({ "catchup_events_total_at_done": r.c_fetched_at_done }),
    ));
    rows.push(row(
        &format!(
            "(2) c fetched after done (next {:.0} s)",
            r.c_after_done_secs
        ),
        format!("{:.0}", r.c_fetched - r.c_fetched_at_done),
        "-",
        None,
        json!({ "catchup_events_total": r.c_fetched, "secs_after_done": r.c_after_done_secs,
                "catchup_bytes_total": r.c_fetched_bytes,
                "events_duplicate_total_peers": r.c_duplicates_from_peers,
                "order_gaps_skipped_total": r.c_gaps_skipped, "events_rejected_total": r.c_rejected }),
    ));
    let exact = r.c_final_events == (n + r.live_sent) as u64;
    let ok = r.c_check.ok() && r.live_check.ok() && exact;
    let mut value = format!(
        "{} (+ live: {})",
        r.c_check.describe(),
        r.live_check.describe()
    );
    if !exact {
        value.push_str(&format!(
            " store.events {} != {}",
            r.c_final_events,
            n + r.live_sent
        ));
    }
    rows.push(row(
        "(2) c holds each event once, in order",
        value,
        "no dup, no reorder",
        Some(ok),
        json!({ "catchup": r.c_check, "live": r.live_check, "store_events": r.c_final_events, "met": ok }),
    ));
    let delivered = r.live_ms.iter().filter(|v| v.is_finite()).count();
    rows.push(row(
        "(2) live b->c delivered (during catch-up)",
        match &r.live_error {
            Some(e) => format!("error: {e}"),
            None => format!("{delivered}/{} ({})", r.live_sent, r.live_during_catchup),
        },
        "-",
        None,
        json!({ "delivered": delivered, "sent": r.live_sent, "during_catchup": r.live_during_catchup,
                "delivered_twice": r.live_delivered_twice, "c_joined_secs": r.c_joined_secs,
                "error": r.live_error,
                "b_post_ms_p99": finite(r.live_post_ms_p99) }),
    ));
    let mut sorted = r.live_ms.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99, mx) = (
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN),
    );
    rows.push(row(
        "(2) live b->c consumer p50",
        ms(p50),
        "-",
        None,
        json!({ "ms": finite(p50) }),
    ));
    let ok = p99 < LIVE_TARGET_P99_MS;
    rows.push(row(
        "(2) live b->c consumer p99",
        ms(p99),
        "< 100 ms",
        Some(ok),
        json!({ "ms": finite(p99), "target_ms": LIVE_TARGET_P99_MS, "met": ok }),
    ));
    rows.push(row(
        "(2) live b->c consumer max",
        ms(mx),
        "-",
        None,
        json!({ "ms": finite(mx) }),
    ));
    rows.push(row(
        "(2) live: POST on b (durable publish), p99",
        ms(r.live_post_ms_p99),
        "-",
        None,
        json!({ "p99_ms": finite(r.live_post_ms_p99) }),
    ));
    let mut log = r.live_into_log_ms.clone();
    log.sort_by(|a, b| a.total_cmp(b));
    let (l50, l99, lmax) = (
        percentile(&log, 50.0),
        percentile(&log, 99.0),
        log.last().copied().unwrap_or(f64::NAN),
    );
    rows.push(row(
        "(2) live: b stamp -> c log, p50 / p99 / max",
        format!("{l50:.0} / {l99:.0} / {lmax:.0} ms"),
        "-",
        None,
        json!({ "p50_ms": finite(l50), "p99_ms": finite(l99), "max_ms": finite(lmax) }),
    ));
}

fn idle_rows(rows: &mut Vec<Row>, r: &anyhow::Result<IdleResult>) {
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            failed(
                rows,
                e,
                &[("(3) anti-entropy per agent, mean / max", "<= 1 KB/s each")],
            );
            return;
        }
    };
    let bps = |v: f64| format!("{v:.0} B/s");
    let mean_max = |v: &[f64]| format!("{} / {}", bps(mean(v)), bps(max(v)));
    let min_seen = r.peers_seen.iter().copied().min().unwrap_or(0);
    rows.push(row(
        &format!("(3) {} agents: mesh ready, peers seen (min)", r.agents),
        format!("{:.1} s, {min_seen}", r.mesh_secs),
        "-",
        None,
        json!({ "ready": r.mesh_ready, "secs": r.mesh_secs, "peers_seen": r.peers_seen }),
    ));
    let ok = max(&r.summary_bps) <= IDLE_TARGET_BPS;
    rows.push(row(
        "(3) anti-entropy per agent, mean / max",
        mean_max(&r.summary_bps),
        "<= 1 KB/s each",
        Some(ok),
        json!({ "metric": "riftmesh_antientropy_bytes_total", "bytes_per_sec": r.summary_bps,
                "target": IDLE_TARGET_BPS, "met": ok, "window_secs": r.window_secs }),
    ));
    rows.push(row(
        "(3) exchanges started per agent, mean",
        format!("{:.2} per s", mean(&r.exchanges_per_sec)),
        "-",
        None,
        json!({ "metric": "riftmesh_antientropy_exchanges_total", "per_sec": r.exchanges_per_sec }),
    ));
    rows.push(row(
        "(3) libp2p bandwidth in+out per agent, mean / max",
        mean_max(&r.bandwidth_bps),
        "-",
        None,
        json!({ "bytes_per_sec": r.bandwidth_bps, "in": r.bandwidth_in_bps, "out": r.bandwidth_out_bps }),
    ));
    rows.push(row(
        "(3) kad requests served per agent, mean / max",
        format!(
            "{:.1} / {:.1} per s",
            mean(&r.kad_requests_per_sec),
            max(&r.kad_requests_per_sec)
        ),
        "-",
        None,
        json!({ "per_sec": r.kad_requests_per_sec, "connections_established_in_window": r.new_connections }),
    ));
    rows.push(row(
        "(3) idle agent RSS, mean / max",
        format!("{:.1} / {:.1} MB", mean(&r.rss_mb), max(&r.rss_mb)),
        "-",
        None,
        json!({ "mb": r.rss_mb }),
    ));
}

fn not_run<T>(only: &str) -> anyhow::Result<T> {
    Err(anyhow::anyhow!("not run (RIFTMESH_BENCH_ONLY={only})"))
}

fn report_failure<T>(r: &anyhow::Result<T>) {
    if let Err(e) = r {
        eprintln!("    failed: {e:#}");
    }
}

fn env_num<T: std::str::FromStr + PartialOrd + Default>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > T::default())
        .unwrap_or(default)
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&root).expect("target dir");
    let bench = Bench {
        root: root.clone(),
        bin: env!("CARGO_BIN_EXE_riftmesh"),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client"),
        keep: Mutex::new(Vec::new()),
        split_secs: env_num("RIFTMESH_BENCH_SPLIT_SECS", 60.0),
        catchup_events: env_num("RIFTMESH_BENCH_CATCHUP_EVENTS", 100_000),
        idle_secs: env_num("RIFTMESH_BENCH_IDLE_SECS", 30.0),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();

    let only = std::env::var("RIFTMESH_BENCH_ONLY").unwrap_or_default();
    let run = |k: &str| only.trim().is_empty() || only.split(',').any(|s| s.trim() == k);

    let split = if run("1") {
        eprintln!(
            "(1) partition and heal: 5 agents split 2 | 3 for {:.0} s, {SPLIT_SIDE_EVENTS} events per side",
            bench.split_secs
        );
        let r = rt.block_on(split(&bench));
        report_failure(&r);
        r
    } else {
        not_run(&only)
    };
    let down = if run("2") {
        eprintln!(
            "(2) downtime catch-up: 3 agents, {} events while c is down",
            bench.catchup_events
        );
        let r = rt.block_on(downtime(&bench));
        report_failure(&r);
        r
    } else {
        not_run(&only)
    };
    let idle = if run("3") {
        eprintln!(
            "(3) idle anti-entropy: {IDLE_AGENTS} agents, {:.0} s",
            bench.idle_secs
        );
        let r = rt.block_on(idle(&bench));
        report_failure(&r);
        r
    } else {
        not_run(&only)
    };

    let mut rows = Vec::new();
    split_rows(&mut rows, &split, &bench);
    downtime_rows(&mut rows, &down);
    idle_rows(&mut rows, &idle);

    println!();
    println!(
        "riftmesh catch-up bench: (1) 5 agents split 2|3 for {:.0} s, {SPLIT_SIDE_EVENTS} events per side; \
         (2) {} events while c is down, live events on b every {} ms; (3) {IDLE_AGENTS} idle agents for {:.0} s",
        bench.split_secs,
        bench.catchup_events,
        LIVE_INTERVAL.as_millis(),
        bench.idle_secs
    );
    print_table(&rows);
    println!(
        "(1) heal clock starts when the unblock requests are sent; \"all 2000\" = store.events on each agent, \
         then every agent's history is checked event by event."
    );
    println!(
        "(2) catch-up clock starts when c's agent.json appears (API bound); done when c holds a's last event, \
         then c's history is checked. Live latency: POST on b -> long-poll answer on c; publishing starts once \
         b and c see each other on the events topic; \"b stamp -> c log\" is received_ms on c minus ts_ms on b."
    );
    println!(
        "(3) every agent published one event first, so each version vector names 20 sources (as in a running \
         cluster). Anti-entropy = increase of riftmesh_antientropy_bytes_total (summaries and digests sent and \
         received); libp2p = libp2p_bandwidth_bytes_total, both directions. KB = 1000 bytes, MB = 2^20 bytes."
    );
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());

    let err = |e: &anyhow::Error| json!({ "error": format!("{e:#}") });
    let out = json!({
        "split_secs": bench.split_secs,
        "catchup_events": bench.catchup_events,
        "idle_secs": bench.idle_secs,
        "rows": rows.iter().map(|r| json!({
            "name": r.name, "value": r.value, "target": r.target, "result": r.result, "data": r.json,
        })).collect::<Vec<_>>(),
        "split": match &split { Ok(r) => json!(r), Err(e) => err(e) },
        "downtime": match &down { Ok(r) => json!(r), Err(e) => err(e) },
        "idle": match &idle { Ok(r) => json!(r), Err(e) => err(e) },
        "total_secs": started.elapsed().as_secs_f64(),
    });
    let path = common::results_dir(root.clone()).join("bench-catchup.json");
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(&root));
    match std::fs::write(
        &path,
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    ) {
        Ok(()) => println!("JSON copy: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    drop(rt);
}
