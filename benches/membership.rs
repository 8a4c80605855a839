//! Membership benchmark: `cargo bench --bench membership`.
//!
//! N real agents on loopback (ports chosen by the OS, read from agent.json),
//! all bootstrapped to the first:
//! (1) mesh: time until every agent lists all N members alive;
//! (2) idle: libp2p bytes in and out per agent (`libp2p_bandwidth_bytes_total`),
//!     resident memory and CPU use; then how fast one published event reaches
//!     every other agent's log (the path a membership fact takes);
//! (3) kill -9 trials: time from SIGKILL until every other agent holds the
//!     victim's `HOST_OFFLINE` (its `received_ms` there), and that each holds
//!     exactly one; the victim then restarts on its data dir;
//! (4) SIGSTOP trials: the same for a frozen agent, which refutes by itself
//!     after SIGCONT;
//! (5) CPU saturation: 2 busy loops per CPU, and no agent may be declared dead.
//!
//! Prints one table and writes it to benches/results/membership.txt, with a
//! JSON copy in benches/results/membership.json. Environment (defaults):
//! RIFTMESH_BENCH_AGENTS (20), RIFTMESH_BENCH_KILLS (20), RIFTMESH_BENCH_STOPS
//! (10), RIFTMESH_BENCH_SATURATE_SECS (600), RIFTMESH_BENCH_IDLE_SECS (60),
//! RIFTMESH_BENCH_SPREADS (5 events for the gossip timing); 0 skips the
//! trials, the saturation or the gossip timing. RIFTMESH_BENCH_KEEP: keep the
//! agents' directories and logs even when every target is met (they are kept
//! anyway when one is missed or the run fails).

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde::Serialize;
use serde_json::{json, Value};

use common::{
    clock_ticks_per_sec, cpu_ticks, http_json, keygen, log_tail, metric, percentile,
    spawn_agent_with, unix_ms, verdict, vm_rss_kb, wait_agent_info, Agents,
};

/// Per agent, libp2p in + out, bytes/s (1 KB = 1000 bytes).
const IDLE_TARGET_BPS: f64 = 5000.0;
/// kill -9: p99 of "dead everywhere".
const KILL_TARGET_P99_MS: f64 = 2000.0;
/// SIGSTOP: max of "dead everywhere".
const STOP_TARGET_MAX_MS: f64 = 6000.0;
const MESH_DEADLINE: Duration = Duration::from_secs(120);
/// Quiet time after the mesh formed, before the idle window.
const SETTLE: Duration = Duration::from_secs(10);
/// Until every other agent holds the victim's HOST_OFFLINE.
const DETECT_DEADLINE: Duration = Duration::from_secs(30);
/// Until every agent lists the victim alive again, at a higher incarnation.
const BACK_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// Saturation: events and load are sampled this often.
const SAMPLE: Duration = Duration::from_secs(5);
/// Saturation: events received this long after the window are reported apart.
const TAIL: Duration = Duration::from_secs(10);
const FACTS: &str = "HOST_OFFLINE,NODE_SUSPECT,NODE_RECOVERED";

// ---------------------------------------------------------------- cluster

#[derive(Clone, Copy, Debug, Serialize)]
struct Config {
    agents: usize,
    /// Events published one at a time to time gossip (after the idle window).
    spreads: usize,
    kills: usize,
    stops: usize,
    saturate_secs: f64,
    idle_secs: f64,
}

/// One agent as the bench sees it (ports change at each restart).
#[derive(Clone, Debug)]
struct Peer {
    name: String,
    api: String,
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

/// N agents sharing one swarm key, all bootstrapped to the first; every
/// process is killed when this is dropped (panics included).
struct Cluster {
    bin: &'static str,
    root: PathBuf,
    http: reqwest::Client,
    boot: String,
    agents: Agents,
    peers: Vec<Peer>,
}

impl Cluster {
    async fn start(root: &Path, n: usize) -> anyhow::Result<Cluster> {
        let bin = env!("CARGO_BIN_EXE_riftmesh");
        keygen(bin, &root.join("swarm.key"))?;
        let mut cl = Cluster {
            bin,
            root: root.to_path_buf(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            boot: String::new(),
            agents: Agents {
                children: Vec::new(),
            },
            peers: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let names: Vec<String> = (0..n).map(|i| format!("m{i:02}")).collect();
        cl.agents
            .children
            .push(spawn_agent_with(bin, root, &names[0], None, &[])?);
        let v =
            wait_agent_info(&mut cl.agents.children[0], root, &names[0], deadline, POLL).await?;
        cl.peers.push(Peer::from_info(&names[0], &v));
        let listen = loop {
            if let Ok(v) = cl.get(0, "/v1/status").await {
                if let Some(a) = v["listen_addrs"][0].as_str() {
                    break a.to_string();
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} reports no listen address",
                names[0]
            );
            tokio::time::sleep(POLL).await;
        };
        cl.boot = format!("{listen}/p2p/{}", cl.peers[0].peer_id);
        for name in &names[1..] {
            let child = spawn_agent_with(bin, root, name, Some(&cl.boot), &[])?;
            cl.agents.children.push(child);
        }
        for (k, name) in names.iter().enumerate().skip(1) {
            let v = wait_agent_info(&mut cl.agents.children[k], root, name, deadline, POLL).await?;
            cl.peers.push(Peer::from_info(name, &v));
        }
        Ok(cl)
    }

    fn n(&self) -> usize {
        self.peers.len()
    }

    async fn get(&self, k: usize, path: &str) -> anyhow::Result<Value> {
        http_json(self.http.get(format!("{}{path}", self.peers[k].api))).await
    }

    async fn metrics(&self, k: usize) -> anyhow::Result<String> {
        let resp = self.http.get(&self.peers[k].metrics).send().await?;
        Ok(resp.error_for_status()?.text().await?)
    }

    async fn members(&self, k: usize) -> anyhow::Result<Vec<Value>> {
        let v = self.get(k, "/v1/members").await?;
        Ok(v["members"].as_array().cloned().unwrap_or_default())
    }

    /// The agent's own incarnation, from its own member list.
    async fn incarnation(&self, k: usize) -> anyhow::Result<u64> {
        let ms = self.members(k).await?;
        ms.iter()
            .find(|m| m["is_self"].as_bool() == Some(true))
            .and_then(|m| m["incarnation"].as_u64())
            .ok_or_else(|| anyhow::anyhow!("{} does not list itself", self.peers[k].name))
    }

    /// Events of `types` that agent k appended after `*cursor`; moves the cursor on.
    async fn new_events(
        &self,
        k: usize,
        types: &str,
        cursor: &mut u64,
    ) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        loop {
            let v = self
                .get(
                    k,
                    &format!("/v1/events?types={types}&after={cursor}&limit=1000"),
                )
                .await?;
            out.extend(v["events"].as_array().into_iter().flatten().cloned());
            let next = v["next_after"].as_u64().unwrap_or(*cursor);
            let done = next <= *cursor || next >= v["head"].as_u64().unwrap_or(0);
            *cursor = next.max(*cursor);
            if done {
                return Ok(out);
            }
        }
    }

    /// Fail if an agent that should run has exited.
    fn check_running(&mut self, except: Option<usize>) -> anyhow::Result<()> {
        for (k, c) in self.agents.children.iter_mut().enumerate() {
            if Some(k) == except {
                continue;
            }
            if let Some(status) = c.try_wait()? {
                let name = &self.peers[k].name;
                anyhow::bail!(
                    "agent {name} exited ({status}):\n{}",
                    log_tail(&self.root, name)
                );
            }
        }
        Ok(())
    }

    /// Wait until every agent lists all N members alive and, with `back`,
    /// that member at an incarnation above the given one. Returns seconds waited.
    async fn wait_alive(
        &mut self,
        deadline: Duration,
        back: Option<(&str, u64)>,
    ) -> anyhow::Result<f64> {
        let t = Instant::now();
        let n = self.n();
        loop {
            let views = join_all((0..n).map(|k| self.members(k))).await;
            let alive: Vec<usize> = views
                .iter()
                .map(|v| match v {
                    Ok(ms) => ms.iter().filter(|m| m["state"] == "alive").count(),
                    Err(_) => 0,
                })
                .collect();
            let is_back = |ms: &Vec<Value>| match back {
                None => true,
                Some((id, inc)) => ms.iter().any(|m| {
                    m["peer_id"] == id
                        && m["state"] == "alive"
                        && m["incarnation"].as_u64().is_some_and(|i| i > inc)
                }),
            };
            if alive.iter().all(|a| *a == n)
                && views.iter().flatten().filter(|v| is_back(v)).count() == n
            {
                return Ok(t.elapsed().as_secs_f64());
            }
            self.check_running(None)?;
            anyhow::ensure!(
                t.elapsed() < deadline,
                "not every agent lists {n} members alive{} within {:.0} s (alive per agent: {alive:?})",
                back.map(|(id, _)| format!(", {id} at a higher incarnation")).unwrap_or_default(),
                deadline.as_secs_f64()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Start agent k again on its data dir, same flags.
    async fn restart(&mut self, k: usize) -> anyhow::Result<()> {
        let name = self.peers[k].name.clone();
        let child = spawn_agent_with(self.bin, &self.root, &name, Some(&self.boot), &[])?;
        // The old (killed) process is reaped already; the guard holds the new one.
        self.agents.children[k] = child;
        let deadline = Instant::now() + Duration::from_secs(60);
        let v = wait_agent_info(
            &mut self.agents.children[k],
            &self.root,
            &name,
            deadline,
            POLL,
        )
        .await?;
        let peer = Peer::from_info(&name, &v);
        anyhow::ensure!(
            peer.peer_id == self.peers[k].peer_id,
            "{name} came back with another peer id"
        );
        self.peers[k] = peer;
        Ok(())
    }
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let st = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()?;
    anyhow::ensure!(st.success(), "kill -{sig} {pid} failed ({st})");
    Ok(())
}

/// `e` is the fact `etype` about `peer` at incarnation `inc`.
fn is_fact(e: &Value, etype: &str, peer: &str, inc: u64) -> bool {
    e["type"] == etype
        && e["payload"]["node"] == peer
        && e["payload"]["incarnation"].as_u64() == Some(inc)
}

// ---------------------------------------------------------------- (2) idle

#[derive(Debug, Default, Serialize)]
struct Idle {
    window_secs: f64,
    /// Per agent, bytes/s: in + out, in, out.
    bps: Vec<f64>,
    in_bps: Vec<f64>,
    out_bps: Vec<f64>,
    /// Per agent, % of one core.
    cpu_pct: Vec<f64>,
    /// Per agent, Kademlia requests it answered (libp2p_kad_inbound_requests_total), per minute.
    kad_per_min: Vec<f64>,
    rss_mb: Vec<f64>,
    /// Per agent, peers it held a connection to at the end of the window
    /// (riftmesh_connected_peers).
    peers: Vec<f64>,
    /// Per agent, connections opened per minute in the window (churn).
    opened_per_min: Vec<f64>,
}

struct Sample {
    at: Instant,
    bw_in: f64,
    bw_out: f64,
    kad: f64,
    peers: f64,
    opened: f64,
    ticks: u64,
}

async fn sample(cl: &Cluster, k: usize) -> anyhow::Result<Sample> {
    let m = cl.metrics(k).await?;
    let ticks = cpu_ticks(cl.peers[k].pid)
        .ok_or_else(|| anyhow::anyhow!("cannot read /proc/{}/stat", cl.peers[k].pid))?;
    Ok(Sample {
        at: Instant::now(),
        bw_in: metric(&m, "libp2p_bandwidth_bytes_total", "direction=\"Inbound\""),
        bw_out: metric(&m, "libp2p_bandwidth_bytes_total", "direction=\"Outbound\""),
        kad: metric(&m, "libp2p_kad_inbound_requests_total", ""),
        peers: metric(&m, "riftmesh_connected_peers", ""),
        opened: metric(&m, "libp2p_swarm_connections_established_total", ""),
        ticks,
    })
}

async fn idle(cl: &mut Cluster, secs: f64) -> anyhow::Result<Idle> {
    let n = cl.n();
    let before: Vec<Sample> = join_all((0..n).map(|k| sample(cl, k)))
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let after: Vec<Sample> = join_all((0..n).map(|k| sample(cl, k)))
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    cl.check_running(None)?;
    let hz = clock_ticks_per_sec();
    let mut r = Idle::default();
    for (k, (s0, s1)) in before.iter().zip(&after).enumerate() {
        let dt = s1.at.duration_since(s0.at).as_secs_f64();
        r.window_secs += dt / n as f64;
        let (i, o) = ((s1.bw_in - s0.bw_in) / dt, (s1.bw_out - s0.bw_out) / dt);
        r.in_bps.push(i);
        r.out_bps.push(o);
        r.bps.push(i + o);
        r.cpu_pct
            .push((s1.ticks - s0.ticks) as f64 / hz / dt * 100.0);
        r.kad_per_min.push((s1.kad - s0.kad) / dt * 60.0);
        r.peers.push(s1.peers);
        r.opened_per_min.push((s1.opened - s0.opened) / dt * 60.0);
        let kb = vm_rss_kb(cl.peers[k].pid).ok_or_else(|| anyhow::anyhow!("cannot read VmRSS"))?;
        r.rss_mb.push(kb as f64 / 1024.0);
    }
    Ok(r)
}

/// One event published on one agent, and when each other agent stored it.
#[derive(Debug, Serialize)]
struct Spread {
    source: String,
    /// (agent, its received_ms − the publisher's ts_ms); None: not within 30 s.
    reached: Vec<(String, Option<f64>)>,
}

/// Gossip below 1 s is counted as such; above, the event came by anti-entropy.
const LATE_MS: f64 = 1000.0;

/// One event at a time, published on agent i % N.
async fn spread(cl: &mut Cluster, count: usize) -> anyhow::Result<Vec<Spread>> {
    let n = cl.n();
    let mut out = Vec::new();
    for i in 0..count {
        let src = i % n;
        let mut cursors = vec![0u64; n];
        for (k, c) in cursors.iter_mut().enumerate() {
            cl.new_events(k, "BENCH_SPREAD", c).await?;
        }
        let body = json!({ "type": "BENCH_SPREAD", "payload": { "i": i, "at_ms": unix_ms() } });
        let url = format!("{}/v1/events", cl.peers[src].api);
        http_json(cl.http.post(url).json(&body)).await?;
        let others: Vec<usize> = (0..n).filter(|&k| k != src).collect();
        let held = wait_stored(cl, &others, "BENCH_SPREAD", &mut cursors, None, |e| {
            e["payload"]["i"] == i
        })
        .await?;
        let reached = others.iter().zip(&held).map(|(&k, e)| {
            let ms = e
                .as_ref()
                .and_then(|e| Some(e["received_ms"].as_f64()? - e["ts_ms"].as_f64()?));
            (cl.peers[k].name.clone(), ms)
        });
        out.push(Spread {
            source: cl.peers[src].name.clone(),
            reached: reached.collect(),
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(out)
}

// ---------------------------------------------------------------- (3, 4) trials

#[derive(Debug, Serialize)]
struct Trial {
    victim: String,
    peer_id: String,
    /// The victim's incarnation before the signal.
    incarnation: u64,
    /// Unix ms just before the signal was sent.
    at_ms: f64,
    /// Per other agent, when it stored the victim's HOST_OFFLINE.
    observers: Vec<Seen>,
    /// Max over the observers.
    everywhere_ms: Option<f64>,
    /// Copies of this HOST_OFFLINE each observer holds, read after all trials.
    copies: Vec<usize>,
    /// From the restart (kill) or SIGCONT (stop) until every agent lists the
    /// victim alive at a higher incarnation.
    back_secs: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Seen {
    name: String,
    /// received_ms of the HOST_OFFLINE there − at_ms; None: not within the deadline.
    ms: Option<f64>,
    /// The copy it holds is its own (it reached the verdict itself before a
    /// peer's copy arrived).
    own_copy: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    Stop,
}

async fn trial(cl: &mut Cluster, v: usize, fault: Fault) -> anyhow::Result<Trial> {
    let n = cl.n();
    let victim = cl.peers[v].clone();
    let inc = cl.incarnation(v).await?;
    let observers: Vec<usize> = (0..n).filter(|&k| k != v).collect();
    // Start each observer's reading at the end of its log.
    let mut cursors = vec![0u64; n];
    for &k in &observers {
        cl.new_events(k, "HOST_OFFLINE", &mut cursors[k]).await?;
    }
    let at_ms = unix_ms();
    match fault {
        Fault::Kill => {
            let child = &mut cl.agents.children[v];
            child.kill()?;
            child.wait()?;
        }
        Fault::Stop => signal(victim.pid, "STOP")?,
    }
    let held = wait_stored(cl, &observers, "HOST_OFFLINE", &mut cursors, Some(v), |e| {
        is_fact(e, "HOST_OFFLINE", &victim.peer_id, inc)
    })
    .await?;
    let t = Instant::now();
    match fault {
        Fault::Kill => cl.restart(v).await?,
        Fault::Stop => signal(victim.pid, "CONT")?,
    }
    cl.wait_alive(BACK_DEADLINE, Some((&victim.peer_id, inc)))
        .await?;
    let observers: Vec<Seen> = observers
        .iter()
        .zip(&held)
        .map(|(&k, e)| Seen {
            name: cl.peers[k].name.clone(),
            ms: e
                .as_ref()
                .and_then(|e| Some(e["received_ms"].as_f64()? - at_ms)),
            own_copy: e
                .as_ref()
                .is_some_and(|e| e["node"] == cl.peers[k].peer_id.as_str()),
        })
        .collect();
    let everywhere_ms = observers
        .iter()
        .try_fold(0.0f64, |m, o| o.ms.map(|g| m.max(g)));
    Ok(Trial {
        victim: victim.name,
        peer_id: victim.peer_id,
        incarnation: inc,
        at_ms,
        observers,
        everywhere_ms,
        copies: Vec::new(),
        back_secs: t.elapsed().as_secs_f64(),
    })
}

/// Poll the agents `who` (each reading its log on from `cursors[k]`) until each
/// holds an event of `etype` that is `wanted`, or DETECT_DEADLINE; returns
/// the event each holds, in the order of `who`. Agent `except` may be down.
async fn wait_stored(
    cl: &mut Cluster,
    who: &[usize],
    etype: &str,
    cursors: &mut [u64],
    except: Option<usize>,
    wanted: impl Fn(&Value) -> bool,
) -> anyhow::Result<Vec<Option<Value>>> {
    let t = Instant::now();
    let mut got: Vec<Option<Value>> = vec![None; cl.n()];
    while who.iter().any(|&k| got[k].is_none()) && t.elapsed() < DETECT_DEADLINE {
        tokio::time::sleep(POLL).await;
        let view: &Cluster = cl;
        let polls = cursors
            .iter_mut()
            .enumerate()
            .filter(|(k, _)| who.contains(k) && got[*k].is_none())
            .map(|(k, c)| async move { (k, view.new_events(k, etype, c).await) });
        for (k, evs) in join_all(polls).await {
            got[k] = evs?.into_iter().find(&wanted);
        }
        cl.check_running(except)?;
    }
    Ok(who.iter().map(|&k| got[k].take()).collect())
}

async fn trials(
    cl: &mut Cluster,
    count: usize,
    fault: Fault,
    out: &mut Vec<Trial>,
) -> anyhow::Result<()> {
    let what = if fault == Fault::Kill {
        "kill -9"
    } else {
        "SIGSTOP"
    };
    for i in 0..count {
        let v = 1 + i % (cl.n() - 1);
        let tr = trial(cl, v, fault).await?;
        eprintln!(
            "    {what} {}/{count}: {} dead everywhere after {}, back alive {:.1} s after {}",
            i + 1,
            tr.victim,
            ms(tr.everywhere_ms),
            tr.back_secs,
            if fault == Fault::Kill {
                "restart"
            } else {
                "SIGCONT"
            }
        );
        out.push(tr);
    }
    Ok(())
}

/// Every HOST_OFFLINE each agent holds; fills each trial's copies and returns
/// the deaths (name, incarnation) that no trial caused.
async fn count_copies(cl: &Cluster, all: &mut [&mut Trial]) -> anyhow::Result<Vec<(String, u64)>> {
    let mut logs = Vec::new();
    for k in 0..cl.n() {
        logs.push(cl.new_events(k, "HOST_OFFLINE", &mut 0).await?);
    }
    for tr in all.iter_mut() {
        tr.copies = tr
            .observers
            .iter()
            .map(|o| {
                let k = cl.peers.iter().position(|p| p.name == o.name).unwrap_or(0);
                logs[k]
                    .iter()
                    .filter(|e| is_fact(e, "HOST_OFFLINE", &tr.peer_id, tr.incarnation))
                    .count()
            })
            .collect();
    }
    let mut other = Vec::new();
    for e in &logs[0] {
        let p = &e["payload"];
        let (node, inc) = (
            p["node"].as_str().unwrap_or(""),
            p["incarnation"].as_u64().unwrap_or(0),
        );
        if !all
            .iter()
            .any(|t| t.peer_id == node && t.incarnation == inc)
        {
            other.push((p["name"].as_str().unwrap_or(node).to_string(), inc));
        }
    }
    Ok(other)
}

// ---------------------------------------------------------------- (5) saturation

#[derive(Debug, Default, Serialize)]
struct Saturation {
    burners: usize,
    window_secs: f64,
    /// Facts received in the window by the first agent and by the last one.
    first: Vec<Value>,
    last: Vec<Value>,
    /// Facts the first agent received in the TAIL after the burners stopped.
    tail: Vec<Value>,
    load1: Vec<f64>,
    stalls_before: f64,
    stalls_after: f64,
    /// Every agent lists N members alive after the window (within 30 s).
    alive_after: bool,
}

fn count(evs: &[Value], etype: &str) -> usize {
    evs.iter().filter(|e| e["type"] == etype).count()
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn stalls(cl: &Cluster) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for k in 0..cl.n() {
        sum += metric(&cl.metrics(k).await?, "riftmesh_detector_stalls", "");
    }
    Ok(sum)
}

async fn saturate(cl: &mut Cluster, secs: f64, cpus: usize) -> anyhow::Result<Saturation> {
    let last = cl.n() - 1;
    let (mut c0, mut cl_last) = (0u64, 0u64);
    cl.new_events(0, FACTS, &mut c0).await?;
    cl.new_events(last, FACTS, &mut cl_last).await?;
    let mut r = Saturation {
        burners: 2 * cpus,
        stalls_before: stalls(cl).await?,
        ..Default::default()
    };
    // Killed when dropped, panics included.
    let mut burners = Agents {
        children: Vec::new(),
    };
    for _ in 0..r.burners {
        let c = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .spawn()?;
        burners.children.push(c);
    }
    let start_ms = unix_ms();
    let t = Instant::now();
    let window = Duration::from_secs_f64(secs);
    let mut seen = c0;
    while t.elapsed() < window {
        tokio::time::sleep(SAMPLE.min(window.saturating_sub(t.elapsed()))).await;
        r.load1.push(load1());
        for e in cl.new_events(0, FACTS, &mut seen).await? {
            eprintln!(
                "    at {:.0} s: {} {}",
                t.elapsed().as_secs_f64(),
                e["type"],
                e["payload"]
            );
        }
        cl.check_running(None)?;
    }
    let end_ms = unix_ms();
    r.window_secs = t.elapsed().as_secs_f64();
    drop(burners);
    tokio::time::sleep(TAIL).await;
    let in_window = |e: &Value| {
        e["received_ms"]
            .as_f64()
            .is_some_and(|m| m >= start_ms && m <= end_ms)
    };
    let evs = cl.new_events(0, FACTS, &mut c0).await?;
    r.tail = evs.iter().filter(|e| !in_window(e)).cloned().collect();
    r.first = evs.into_iter().filter(in_window).collect();
    r.last = cl
        .new_events(last, FACTS, &mut cl_last)
        .await?
        .into_iter()
        .filter(in_window)
        .collect();
    r.stalls_after = stalls(cl).await?;
    r.alive_after = cl.wait_alive(Duration::from_secs(30), None).await.is_ok();
    Ok(r)
}

// ---------------------------------------------------------------- run

#[derive(Debug, Default, Serialize)]
struct Results {
    mesh_secs: Option<f64>,
    idle: Option<Idle>,
    /// Per published event and other agent: stored there − publisher's stamp, ms.
    spread: Option<Vec<Spread>>,
    /// The same, after the kill and stop trials (every victim restarted or resumed).
    spread_after: Option<Vec<Spread>>,
    kills: Vec<Trial>,
    stops: Vec<Trial>,
    /// HOST_OFFLINE in the first agent's log that no trial caused, after the trials.
    other_deaths: Option<Vec<(String, u64)>>,
    saturation: Option<Saturation>,
    error: Option<String>,
}

async fn run(cfg: Config, root: &Path, cpus: usize, r: &mut Results) -> anyhow::Result<()> {
    let n = cfg.agents;
    eprintln!("(1) starting {n} agents");
    let t = Instant::now();
    let mut cl = Cluster::start(root, n).await?;
    cl.wait_alive(MESH_DEADLINE, None).await?;
    r.mesh_secs = Some(t.elapsed().as_secs_f64());
    eprintln!(
        "    every agent lists {n} alive after {:.1} s",
        r.mesh_secs.unwrap_or(0.0)
    );

    tokio::time::sleep(SETTLE).await;
    eprintln!("(2) idle for {:.0} s", cfg.idle_secs);
    r.idle = Some(idle(&mut cl, cfg.idle_secs).await?);
    if cfg.spreads > 0 {
        eprintln!("    gossip: {} events published one at a time", cfg.spreads);
        r.spread = Some(spread(&mut cl, cfg.spreads).await?);
    }

    eprintln!("(3) {} kill -9 trials", cfg.kills);
    trials(&mut cl, cfg.kills, Fault::Kill, &mut r.kills).await?;
    eprintln!("(4) {} SIGSTOP trials", cfg.stops);
    trials(&mut cl, cfg.stops, Fault::Stop, &mut r.stops).await?;
    let mut all: Vec<&mut Trial> = r.kills.iter_mut().chain(r.stops.iter_mut()).collect();
    r.other_deaths = Some(count_copies(&cl, &mut all).await?);
    if cfg.spreads > 0 && cfg.kills + cfg.stops > 0 {
        eprintln!("    gossip after the trials: {} events", cfg.spreads);
        r.spread_after = Some(spread(&mut cl, cfg.spreads).await?);
    }

    if cfg.saturate_secs > 0.0 {
        eprintln!("(5) {} busy loops for {:.0} s", 2 * cpus, cfg.saturate_secs);
        r.saturation = Some(saturate(&mut cl, cfg.saturate_secs, cpus).await?);
    }
    Ok(())
}

// ---------------------------------------------------------------- report

struct Row {
    name: String,
    value: String,
    target: String,
    result: String,
}

fn row(rows: &mut Vec<Row>, name: &str, value: String, target: &str, ok: Option<bool>) {
    rows.push(Row {
        name: name.to_string(),
        value,
        target: target.to_string(),
        result: ok.map(verdict).unwrap_or_else(|| "-".into()),
    });
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.0} ms"),
        _ => "never".into(),
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// Sorted, a missing time counted as infinite.
fn sorted(v: impl Iterator<Item = Option<f64>>) -> Vec<f64> {
    let mut v: Vec<f64> = v.map(|x| x.unwrap_or(f64::INFINITY)).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn spread_rows(rows: &mut Vec<Row>, label: &str, sp: &[Spread]) {
    let all = sorted(sp.iter().flat_map(|s| s.reached.iter().map(|r| r.1)));
    row(
        rows,
        &format!(
            "{label} {} events, one at a time: in every other log, p50 / max",
            sp.len()
        ),
        format!(
            "{} / {}",
            ms(Some(percentile(&all, 50.0))),
            ms(Some(max(&all)))
        ),
        "-",
        None,
    );
    // Who was reached late, and whose events were late.
    let (mut to, mut from) = (
        BTreeMap::<&str, usize>::new(),
        BTreeMap::<&str, usize>::new(),
    );
    for s in sp {
        for (name, t) in &s.reached {
            if t.is_none_or(|t| t > LATE_MS) {
                *to.entry(name).or_default() += 1;
                *from.entry(&s.source).or_default() += 1;
            }
        }
    }
    let list = |m: &BTreeMap<&str, usize>| {
        if m.len() > 4 {
            return format!("{} agents", m.len());
        }
        let v: Vec<String> = m.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        v.join(", ")
    };
    let late: usize = to.values().sum();
    let mut value = format!("{late}/{}", all.len());
    if late > 0 {
        value += &format!(" (to {}; from {})", list(&to), list(&from));
    }
    row(
        rows,
        &format!("{label} ... later than 1 s (not by gossip)"),
        value,
        "-",
        None,
    );
}

fn trial_rows(rows: &mut Vec<Row>, label: &str, trials: &[Trial], target: (&str, f64, bool)) {
    let (target, limit, on_max) = target;
    let every = sorted(trials.iter().map(|t| t.everywhere_ms));
    let (p50, p99, mx) = (
        percentile(&every, 50.0),
        percentile(&every, 99.0),
        max(&every),
    );
    let found = trials.iter().filter(|t| t.everywhere_ms.is_some()).count();
    row(
        rows,
        &format!("{label}: dead everywhere within 30 s"),
        format!("{found}/{}", trials.len()),
        "-",
        None,
    );
    row(
        rows,
        &format!("{label}: dead everywhere, p50"),
        ms(Some(p50)),
        "-",
        None,
    );
    let ok = |v: f64| v <= limit;
    let p99_target = if on_max {
        ("-", None)
    } else {
        (target, Some(ok(p99)))
    };
    row(
        rows,
        &format!("{label}: dead everywhere, p99"),
        ms(Some(p99)),
        p99_target.0,
        p99_target.1,
    );
    let max_target = if on_max {
        (target, Some(ok(mx)))
    } else {
        ("-", None)
    };
    row(
        rows,
        &format!("{label}: dead everywhere, max"),
        ms(Some(mx)),
        max_target.0,
        max_target.1,
    );
    let each = sorted(trials.iter().flat_map(|t| t.observers.iter().map(|o| o.ms)));
    row(
        rows,
        &format!("{label}: per observer, p50 / p99 / max"),
        format!(
            "{} / {} / {}",
            ms(Some(percentile(&each, 50.0))),
            ms(Some(percentile(&each, 99.0))),
            ms(Some(max(&each)))
        ),
        "-",
        None,
    );
    let first = sorted(
        trials
            .iter()
            .map(|t| t.observers.iter().filter_map(|o| o.ms).reduce(f64::min)),
    );
    row(
        rows,
        &format!("{label}: first observer, p50 / max"),
        format!(
            "{} / {}",
            ms(Some(percentile(&first, 50.0))),
            ms(Some(max(&first)))
        ),
        "-",
        None,
    );
    let seen = trials.iter().flat_map(|t| &t.observers);
    let own = seen.clone().filter(|o| o.own_copy).count();
    row(
        rows,
        &format!("{label}: observers holding their own copy"),
        format!("{own}/{}", seen.count()),
        "-",
        None,
    );
    let copies: Vec<usize> = trials
        .iter()
        .flat_map(|t| t.copies.iter().copied())
        .collect();
    let ones = copies.iter().filter(|c| **c == 1).count();
    row(
        rows,
        &format!("{label}: HOST_OFFLINE copies per observer"),
        format!("exactly 1 in {ones}/{}", copies.len()),
        "exactly 1",
        Some(!copies.is_empty() && ones == copies.len()),
    );
    let back: Vec<f64> = trials.iter().map(|t| t.back_secs).collect();
    row(
        rows,
        &format!("{label}: back alive everywhere, mean / max"),
        format!("{:.1} / {:.1} s", mean(&back), max(&back)),
        "-",
        None,
    );
}

fn rows(cfg: &Config, r: &Results) -> Vec<Row> {
    let mut rows = Vec::new();
    let n = cfg.agents;
    if let Some(s) = r.mesh_secs {
        row(
            &mut rows,
            &format!("(1) every agent lists {n} alive, from 1st spawn"),
            format!("{s:.1} s"),
            "-",
            None,
        );
    }
    if let Some(i) = &r.idle {
        let ok = max(&i.bps) <= IDLE_TARGET_BPS;
        row(
            &mut rows,
            "(2) idle libp2p in+out per agent, mean / max",
            format!("{:.0} / {:.0} B/s", mean(&i.bps), max(&i.bps)),
            "<= 5 KB/s each",
            Some(ok),
        );
        row(
            &mut rows,
            "(2) idle libp2p out per agent, mean",
            format!("{:.0} B/s", mean(&i.out_bps)),
            "-",
            None,
        );
        row(
            &mut rows,
            "(2) idle connected peers per agent, mean / max",
            format!("{:.1} / {:.0}", mean(&i.peers), max(&i.peers)),
            "-",
            None,
        );
        row(
            &mut rows,
            "(2) idle connections opened per agent, mean / max",
            format!(
                "{:.1} / {:.1} per min",
                mean(&i.opened_per_min),
                max(&i.opened_per_min)
            ),
            "-",
            None,
        );
        row(
            &mut rows,
            "(2) idle RSS per agent, mean / max",
            format!("{:.1} / {:.1} MB", mean(&i.rss_mb), max(&i.rss_mb)),
            "-",
            None,
        );
        row(
            &mut rows,
            "(2) idle CPU per agent, mean / max",
            format!(
                "{:.2} / {:.2} % of a core",
                mean(&i.cpu_pct),
                max(&i.cpu_pct)
            ),
            "-",
            None,
        );
        row(
            &mut rows,
            "(2) idle Kademlia requests answered per agent, mean",
            format!("{:.0} per min", mean(&i.kad_per_min)),
            "-",
            None,
        );
    }
    if let Some(sp) = &r.spread {
        spread_rows(&mut rows, "(2)", sp);
    }
    if !r.kills.is_empty() {
        trial_rows(
            &mut rows,
            "(3) kill -9",
            &r.kills,
            ("p99 <= 2 s", KILL_TARGET_P99_MS, false),
        );
    }
    if !r.stops.is_empty() {
        trial_rows(
            &mut rows,
            "(4) SIGSTOP",
            &r.stops,
            ("max <= 6 s", STOP_TARGET_MAX_MS, true),
        );
    }
    if let Some(o) = &r.other_deaths {
        let names: Vec<String> = o.iter().map(|(n, i)| format!("{n}@{i}")).collect();
        row(
            &mut rows,
            "(3, 4) HOST_OFFLINE of agents not signalled",
            if names.is_empty() {
                "0".into()
            } else {
                format!("{} ({})", o.len(), names.join(", "))
            },
            "0",
            Some(o.is_empty()),
        );
    }
    if let Some(sp) = &r.spread_after {
        spread_rows(&mut rows, "(3, 4) then", sp);
    }
    if let Some(s) = &r.saturation {
        let last = format!("m{:02}", n - 1);
        let both = |t: &str| format!("{} ({last}: {})", count(&s.first, t), count(&s.last, t));
        let offline = count(&s.first, "HOST_OFFLINE") + count(&s.last, "HOST_OFFLINE");
        let label = format!("(5) {} busy loops, {:.0} s", s.burners, s.window_secs);
        row(
            &mut rows,
            &format!("{label}: HOST_OFFLINE, m00"),
            both("HOST_OFFLINE"),
            "0",
            Some(offline == 0),
        );
        row(
            &mut rows,
            &format!("{label}: NODE_SUSPECT, m00"),
            both("NODE_SUSPECT"),
            "-",
            None,
        );
        row(
            &mut rows,
            &format!("{label}: NODE_RECOVERED, m00"),
            both("NODE_RECOVERED"),
            "-",
            None,
        );
        row(
            &mut rows,
            &format!("{label}: facts in the {:.0} s after", TAIL.as_secs_f64()),
            s.tail.len().to_string(),
            "-",
            None,
        );
        row(
            &mut rows,
            &format!("{label}: load1 mean / max"),
            format!("{:.1} / {:.1}", mean(&s.load1), max(&s.load1)),
            "-",
            None,
        );
        row(
            &mut rows,
            &format!("{label}: detector stalls, all agents"),
            format!("{:.0} (before: {:.0})", s.stalls_after, s.stalls_before),
            "-",
            None,
        );
        row(
            &mut rows,
            &format!("{label}: all {n} alive everywhere after"),
            if s.alive_after { "yes" } else { "no" }.into(),
            "-",
            None,
        );
    }
    if let Some(e) = &r.error {
        row(
            &mut rows,
            "error (the run stopped here)",
            e.lines().next().unwrap_or("").into(),
            "-",
            Some(false),
        );
    }
    rows
}

fn table(rows: &[Row]) -> String {
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
            // Values right-aligned, the rest left-aligned.
            if k == 1 {
                out.push_str(&pad);
                out.push_str(s);
            } else {
                out.push_str(s);
                out.push_str(&pad);
            }
            out.push_str("  ");
        }
        out.trim_end().to_string() + "\n"
    };
    let rule = "-".repeat(width.iter().sum::<usize>() + 2 * 3) + "\n";
    let mut out = line(&headers) + &rule;
    for c in &cells {
        out += &line(c);
    }
    out + &rule
}

fn env_num<T: std::str::FromStr + PartialOrd + Default>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v >= T::default())
        .unwrap_or(default)
}

fn cpu_model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    let cfg = Config {
        agents: env_num("RIFTMESH_BENCH_AGENTS", 20usize).max(3),
        spreads: env_num("RIFTMESH_BENCH_SPREADS", 5),
        kills: env_num("RIFTMESH_BENCH_KILLS", 20),
        stops: env_num("RIFTMESH_BENCH_STOPS", 10),
        saturate_secs: env_num("RIFTMESH_BENCH_SATURATE_SECS", 600.0),
        idle_secs: env_num("RIFTMESH_BENCH_IDLE_SECS", 60.0f64).max(1.0),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = manifest.join("target");
    std::fs::create_dir_all(&target).expect("target dir");
    let dir = tempfile::Builder::new()
        .prefix("bench-membership-")
        .tempdir_in(&target)
        .expect("temp dir in target/");
    let (command, source, date) = common::run_header("RIFTMESH_BENCH_", "membership");
    let started = Instant::now();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut r = Results::default();
    if let Err(e) = rt.block_on(run(cfg, dir.path(), cpus, &mut r)) {
        eprintln!("    failed: {e:#}");
        r.error = Some(format!("{e:#}"));
    }
    drop(rt);

    let rows = rows(&cfg, &r);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "riftmesh membership bench: {} agents on loopback; {} CPUs ({}); {date}",
        cfg.agents,
        cpus,
        cpu_model()
    );
    let _ = writeln!(out, "command: {command}  (source: git {source})");
    let _ = writeln!(
        out,
        "idle {:.0} s; {} kill -9 and {} SIGSTOP trials (victims m01..m{:02} in turn); {} busy loops for {:.0} s",
        cfg.idle_secs,
        cfg.kills,
        cfg.stops,
        cfg.agents - 1,
        2 * cpus,
        cfg.saturate_secs
    );
    out += &table(&rows);
    out += "\"dead everywhere\" = max over the other agents of received_ms of the victim's HOST_OFFLINE (at its \
            incarnation before the signal) minus the wall clock just before the signal; SIGSTOP is sent with \
            kill(1), so its times include spawning it.\n";
    out += "libp2p = libp2p_bandwidth_bytes_total, both directions; CPU = utime+stime from /proc/<pid>/stat. \
            (2) events: received_ms on each other agent minus ts_ms on the publisher. (5) counts facts \
            received within the window; the second figure is from the last agent's log. \
            KB = 1000 bytes, MB = 2^20 bytes.\n";
    let _ = writeln!(
        out,
        "total bench time {:.0} s",
        started.elapsed().as_secs_f64()
    );
    print!("{out}");

    let missed = rows.iter().any(|r| r.result == "missed");
    let results = common::results_dir(manifest.join("benches").join("results"));
    let report = json!({
        "machine": { "cpus": cpus, "model": cpu_model() },
        "date": date,
        "command": command,
        "source": source,
        "config": cfg,
        "rows": rows.iter().map(|r| json!({
            "name": r.name, "value": r.value, "target": r.target, "result": r.result,
        })).collect::<Vec<_>>(),
        "results": r,
        "total_secs": started.elapsed().as_secs_f64(),
    });
    let write = |name: &str, text: &str| {
        let path = results.join(name);
        match std::fs::create_dir_all(&results).and_then(|_| std::fs::write(&path, text)) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("cannot write {}: {e}", path.display()),
        }
    };
    write("membership.txt", &out);
    write(
        "membership.json",
        &serde_json::to_string_pretty(&report).unwrap_or_default(),
    );
    if missed || r.error.is_some() || std::env::var_os("RIFTMESH_BENCH_KEEP").is_some() {
        println!(
            "agents' directories and logs kept in {}",
            dir.keep().display()
        );
    }
}
