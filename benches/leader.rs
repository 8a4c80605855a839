//! Leader failover with real agents on loopback: N agents (default 20) of
//! which 3, then 5, are voters. For each voter count: kill -9 of the leader
//! (RIFTMESH_BENCH_KILLS, default 20) and SIGSTOP of the leader
//! (RIFTMESH_BENCH_STOPS, default 10), timed until every other agent holds
//! the new leader's `LEADER_ELECTED` (its `received_ms` there, against the
//! wall clock just before the signal), then checked that every agent's
//! `GET /v1/leader` names it; then a
//! partition of the leader (the minority) from everyone else: how soon it
//! stops claiming leadership, whether it grants a lock, and how soon everyone
//! agrees after healing. Every poll of every agent is checked for two agents
//! claiming leadership in one term.
//!
//! `cargo bench --bench leader`; report in benches/results/leader.{txt,json}.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    keygen, percentile, spawn_agent_at, spawn_agent_with, unix_ms, verdict, wait_agent_info, Agents,
};
use serde_json::{json, Value};

const POLL: Duration = Duration::from_millis(25);
const DEADLINE: Duration = Duration::from_secs(30);

fn env_num(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

struct Cluster {
    bin: &'static str,
    root: PathBuf,
    boot: String,
    /// Each agent's listen address, kept across restarts.
    listen: Vec<String>,
    extra: Vec<String>,
    agents: Agents,
    names: Vec<String>,
    apis: Vec<String>,
    peers: Vec<String>,
    down: HashSet<usize>,
    http: reqwest::Client,
    /// term → agents that claimed leadership in it (the invariant).
    claims: BTreeMap<u64, HashSet<String>>,
    reported_slow: bool,
}

impl Cluster {
    async fn start(root: &Path, n: usize, voters: usize) -> anyhow::Result<Cluster> {
        let bin = env!("CARGO_BIN_EXE_riftmesh");
        std::fs::create_dir_all(root)?;
        keygen(bin, &root.join("swarm.key"))?;
        let names: Vec<String> = (0..n).map(|i| format!("n{i:02}")).collect();
        let cfg = root.join("cluster.toml");
        std::fs::write(
            &cfg,
            format!(
                "voters = {:?}\nhealth_interval = \"5s\"\n",
                &names[..voters]
            ),
        )?;
        let extra = vec![
            "--config".to_string(),
            cfg.display().to_string(),
            "--fault-injection".into(),
        ];
        let mut cl = Cluster {
            bin,
            root: root.to_path_buf(),
            boot: String::new(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".into(); n],
            extra,
            agents: Agents {
                children: Vec::new(),
            },
            names: names.clone(),
            apis: vec![String::new(); n],
            peers: vec![String::new(); n],
            down: HashSet::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            claims: BTreeMap::new(),
            reported_slow: false,
        };
        let extra = cl.extra.clone();
        let x: Vec<&str> = extra.iter().map(String::as_str).collect();
        cl.agents
            .children
            .push(spawn_agent_with(bin, root, &names[0], None, &x)?);
        cl.info(0).await?;
        let st = loop {
            if let Ok(v) = cl.get(0, "/v1/status").await {
                if let Some(a) = v["listen_addrs"][0].as_str() {
                    break a.to_string();
                }
            }
            tokio::time::sleep(POLL).await;
        };
        cl.boot = format!("{st}/p2p/{}", cl.peers[0]);
        for name in &names[1..] {
            let c = spawn_agent_with(bin, root, name, Some(&cl.boot), &x)?;
            cl.agents.children.push(c);
        }
        for i in 1..n {
            cl.info(i).await?;
        }
        Ok(cl)
    }

    async fn info(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let v = wait_agent_info(
            &mut self.agents.children[i],
            &self.root,
            &self.names[i],
            deadline,
            POLL,
        )
        .await?;
        self.apis[i] = format!("http://{}", v["api"].as_str().unwrap_or_default());
        self.peers[i] = v["peer_id"].as_str().unwrap_or_default().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(v) = self.get(i, "/v1/status").await {
                if let Some(a) = v["listen_addrs"][0].as_str() {
                    self.listen[i] = a.to_string();
                    return Ok(());
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} never listened",
                self.names[i]
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn get(&self, i: usize, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}{path}", self.apis[i]))
            .send()
            .await?
            .json()
            .await?)
    }

    async fn post(&self, i: usize, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.apis[i]))
            .json(body)
            .send()
            .await?;
        let s = r.status().as_u16();
        Ok((s, r.json().await.unwrap_or(Value::Null)))
    }

    /// Every agent's view, in parallel (None: down or not answering).
    async fn views(&mut self, skip: &HashSet<usize>) -> Vec<Option<Value>> {
        let this: &Cluster = self;
        let futs = (0..this.names.len()).map(|i| {
            let skip = skip.contains(&i) || this.down.contains(&i);
            async move {
                if skip {
                    None
                } else {
                    this.get(i, "/v1/leader").await.ok()
                }
            }
        });
        let v = futures::future::join_all(futs).await;
        for (i, view) in v.iter().enumerate() {
            if let Some(view) = view {
                if view["is_self"] == true {
                    let term = view["term"].as_u64().unwrap_or(0);
                    self.claims
                        .entry(term)
                        .or_default()
                        .insert(self.names[i].clone());
                }
            }
        }
        v
    }

    /// Wait until every agent not in `skip` names one leader other than
    /// `not`, at a term above `above`. Returns (leader index, term).
    async fn agreed(
        &mut self,
        skip: &HashSet<usize>,
        not: Option<usize>,
        above: u64,
    ) -> anyhow::Result<(usize, u64)> {
        let start = Instant::now();
        loop {
            let views = self.views(skip).await;
            let mut seen = HashSet::new();
            let mut all = true;
            for (i, v) in views.iter().enumerate() {
                if skip.contains(&i) || self.down.contains(&i) {
                    continue;
                }
                match v
                    .as_ref()
                    .and_then(|v| Some((v["leader"].as_str()?.to_string(), v["term"].as_u64()?)))
                {
                    Some(x) => {
                        seen.insert(x);
                    }
                    None => all = false,
                }
            }
            if start.elapsed() > Duration::from_secs(3) && !self.reported_slow {
                // Why is this slow? Name the agents that disagree, once per wait.
                self.reported_slow = true;
                let mut counts: HashMap<String, usize> = HashMap::new();
                for (i, v) in views.iter().enumerate() {
                    if skip.contains(&i) || self.down.contains(&i) {
                        continue;
                    }
                    let key = match v {
                        Some(v) => format!(
                            "leader={} term={} note={}",
                            v["leader"], v["term"], v["note"]
                        ),
                        None => "no answer".into(),
                    };
                    *counts.entry(key).or_default() += 1;
                }
                eprintln!("slow agreement after 3 s: {counts:?}");
            }
            if all && seen.len() == 1 {
                self.reported_slow = false;
                let (l, t) = seen.into_iter().next().unwrap_or_default();
                let li = self.names.iter().position(|n| *n == l);
                if let Some(li) = li {
                    if Some(li) != not && t > above {
                        return Ok((li, t));
                    }
                }
            }
            anyhow::ensure!(
                start.elapsed() < DEADLINE,
                "no agreement on a new leader within {DEADLINE:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Wait until every agent not in `skip` holds a `LEADER_ELECTED` of a
    /// term above `above`; returns the latest of the first such event's
    /// `received_ms` over those agents, minus `t0_ms` (the wall clock just
    /// before the signal: agents and bench share this machine's clock).
    /// Each agent's log is read every 250 ms: the time comes from the
    /// agents' own stamps, so polling less often costs nothing in accuracy
    /// and loads the shared CPU less than polling every agent's
    /// `/v1/leader` every 25 ms.
    async fn elected_everywhere(
        &mut self,
        skip: &HashSet<usize>,
        above: u64,
        t0_ms: f64,
    ) -> anyhow::Result<f64> {
        let start = Instant::now();
        let n = self.names.len();
        let mut got: Vec<Option<f64>> = vec![None; n];
        loop {
            let this: &Cluster = self;
            let want: Vec<usize> = (0..n)
                .filter(|i| !skip.contains(i) && !this.down.contains(i) && got[*i].is_none())
                .collect();
            let futs = want.iter().map(|&i| async move {
                let v = this
                    .get(i, "/v1/events?types=LEADER_ELECTED&after=0&limit=1000")
                    .await
                    .ok()?;
                v["events"]
                    .as_array()?
                    .iter()
                    .filter(|e| e["payload"]["term"].as_u64().is_some_and(|t| t > above))
                    .filter_map(|e| e["received_ms"].as_f64())
                    .reduce(f64::min)
            });
            let found = futures::future::join_all(futs).await;
            for (&i, f) in want.iter().zip(found) {
                got[i] = f;
            }
            let missing = (0..n)
                .filter(|i| !skip.contains(i) && !self.down.contains(i))
                .filter(|&i| got[i].is_none())
                .count();
            if missing == 0 {
                let last = got.iter().flatten().copied().fold(f64::MIN, f64::max);
                return Ok(last - t0_ms);
            }
            anyhow::ensure!(
                start.elapsed() < DEADLINE,
                "{missing} agents hold no LEADER_ELECTED above term {above} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.agents.children[i].id();
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status();
    }

    async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let x: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        // Same address as before, and a live agent other than itself to join.
        let j = (1..self.names.len())
            .map(|k| (i + k) % self.names.len())
            .find(|j| !self.down.contains(j))
            .unwrap_or(0);
        let boot = format!("{}/p2p/{}", self.listen[j], self.peers[j]);
        let c = spawn_agent_at(
            self.bin,
            &self.root,
            &self.names[i],
            &self.listen[i],
            Some(&boot),
            &x,
        )?;
        self.agents.children[i] = c;
        self.info(i).await?;
        self.down.remove(&i);
        Ok(())
    }

    async fn block(&self, i: usize, block: bool) -> anyhow::Result<()> {
        let others: Vec<String> = (0..self.names.len())
            .filter(|j| *j != i)
            .map(|j| self.peers[j].clone())
            .collect();
        self.post(
            i,
            "/v1/debug/block",
            &json!({ "peers": others, "block": block }),
        )
        .await?;
        for j in (0..self.names.len()).filter(|j| *j != i) {
            self.post(
                j,
                "/v1/debug/block",
                &json!({ "peers": [self.peers[i].clone()], "block": block }),
            )
            .await?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Result1 {
    voters: usize,
    kills: Vec<f64>,
    stops: Vec<f64>,
    minority_stops_claiming_ms: Option<f64>,
    minority_lock_statuses: Vec<u16>,
    majority_new_leader_ms: Option<f64>,
    heal_agreement_ms: Option<f64>,
    double_claims: Vec<(u64, Vec<String>)>,
    error: Option<String>,
}

async fn run(root: &Path, n: usize, voters: usize, r: &mut Result1) -> anyhow::Result<()> {
    let mut cl = Cluster::start(root, n, voters).await?;
    let none = HashSet::new();
    let (mut leader, mut term) = cl.agreed(&none, None, 0).await?;
    let kills = env_num("RIFTMESH_BENCH_KILLS", 20);
    let stops = env_num("RIFTMESH_BENCH_STOPS", 10);
    for _ in 0..kills {
        let t0_ms = unix_ms();
        let _ = cl.agents.children[leader].kill();
        let _ = cl.agents.children[leader].wait();
        cl.down.insert(leader);
        r.kills
            .push(cl.elected_everywhere(&none, term, t0_ms).await?);
        // Every agent's view agrees too (and is checked for two claims).
        let (_, t2) = cl.agreed(&none, Some(leader), term).await?;
        cl.restart(leader).await?;
        (leader, term) = cl.agreed(&none, None, t2 - 1).await?;
    }
    for _ in 0..stops {
        let t0_ms = unix_ms();
        cl.signal(leader, "STOP");
        let skip: HashSet<usize> = [leader].into();
        let res = match cl.elected_everywhere(&skip, term, t0_ms).await {
            Ok(ms) => {
                r.stops.push(ms);
                cl.agreed(&skip, Some(leader), term).await
            }
            Err(e) => Err(e),
        };
        cl.signal(leader, "CONT");
        let (_, t2) = res?;
        (leader, term) = cl.agreed(&none, None, t2 - 1).await?;
    }
    // Partition: the leader alone (a minority of the voters) against the rest.
    cl.block(leader, true).await?;
    let t0 = Instant::now();
    let old = leader;
    let rest: HashSet<usize> = [old].into();
    let mut stopped = None;
    let mut majority = None;
    while (stopped.is_none() || majority.is_none()) && t0.elapsed() < DEADLINE {
        let views = cl.views(&none).await;
        if stopped.is_none() && views[old].as_ref().is_some_and(|v| v["is_self"] == false) {
            stopped = Some(t0.elapsed().as_secs_f64() * 1000.0);
        }
        if majority.is_none() {
            let mut seen = HashSet::new();
            let mut all = true;
            for (i, v) in views.iter().enumerate() {
                if i == old {
                    continue;
                }
                match v.as_ref().and_then(|v| v["leader"].as_str()) {
                    Some(l) if l != cl.names[old] => {
                        seen.insert(l.to_string());
                    }
                    _ => all = false,
                }
            }
            if all && seen.len() == 1 {
                majority = Some(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(POLL).await;
    }
    r.minority_stops_claiming_ms = stopped;
    r.majority_new_leader_ms = majority;
    for _ in 0..3 {
        let (s, _) = cl
            .post(old, "/v1/locks/bench/acquire", &json!({ "ttl_secs": 5 }))
            .await?;
        r.minority_lock_statuses.push(s);
    }
    let _ = rest;
    cl.block(old, false).await?;
    let t1 = Instant::now();
    let healed = cl.agreed(&none, None, 0).await;
    if healed.is_ok() {
        r.heal_agreement_ms = Some(t1.elapsed().as_secs_f64() * 1000.0);
    }
    for (term, who) in &cl.claims {
        if who.len() > 1 {
            let mut w: Vec<String> = who.iter().cloned().collect();
            w.sort();
            r.double_claims.push((*term, w));
        }
    }
    healed.map(|_| ())
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&s, 50.0),
        percentile(&s, 99.0),
        s.last().copied().unwrap_or(f64::NAN),
    )
}

#[tokio::main]
async fn main() {
    let n = env_num("RIFTMESH_BENCH_AGENTS", 20);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = manifest.join("target");
    let _ = std::fs::create_dir_all(&target);
    let dir = tempfile::Builder::new()
        .prefix("bench-leader-")
        .tempdir_in(&target)
        .expect("temp dir in target/");
    let started = Instant::now();
    let mut results = Vec::new();
    let sets: Vec<usize> = std::env::var("RIFTMESH_BENCH_VOTERS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![3, 5]);
    for voters in sets {
        let mut r = Result1 {
            voters,
            ..Default::default()
        };
        if let Err(e) = run(&dir.path().join(format!("v{voters}")), n, voters, &mut r).await {
            r.error = Some(e.to_string());
        }
        results.push(r);
    }
    let mut vars: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("RIFTMESH_BENCH_"))
        .map(|(k, v)| format!("{k}={v} "))
        .collect();
    vars.sort();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = String::new();
    out += &format!(
        "riftmesh leader bench: {n} agents on loopback; {cpus} CPUs; {}\ncommand: {}cargo bench --bench leader\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        vars.concat()
    );
    out += &format!(
        "{:<66} {:>22}  {:<14} {}\n",
        "measurement", "value", "target", "result"
    );
    out += &format!("{}\n", "-".repeat(112));
    let mut row = |m: String, v: String, t: &str, ok: Option<bool>| {
        out += &format!(
            "{:<66} {:>22}  {:<14} {}\n",
            m,
            v,
            t,
            ok.map(verdict).unwrap_or_else(|| "-".into())
        );
    };
    let mut json_out = Vec::new();
    for r in &results {
        let v = r.voters;
        let (kp50, kp99, kmax) = stats(&r.kills);
        row(
            format!(
                "{v} voters: kill -9 leader -> LEADER_ELECTED on every agent ({} trials)",
                r.kills.len()
            ),
            format!("{kp50:.0} / {kp99:.0} / {kmax:.0} ms"),
            "p99 <= 2000 ms",
            (!r.kills.is_empty()).then_some(kp99 <= 2000.0),
        );
        let (sp50, sp99, smax) = stats(&r.stops);
        row(
            format!(
                "{v} voters: SIGSTOP leader -> LEADER_ELECTED everywhere ({} trials)",
                r.stops.len()
            ),
            format!("{sp50:.0} / {sp99:.0} / {smax:.0} ms"),
            "max <= 3000 ms",
            (!r.stops.is_empty()).then_some(smax <= 3000.0),
        );
        row(
            format!("{v} voters: cut-off leader stops claiming leadership"),
            r.minority_stops_claiming_ms
                .map(|x| format!("{x:.0} ms"))
                .unwrap_or_else(|| "never".into()),
            "-",
            None,
        );
        row(
            format!("{v} voters: majority side agrees on a new leader"),
            r.majority_new_leader_ms
                .map(|x| format!("{x:.0} ms"))
                .unwrap_or_else(|| "never".into()),
            "-",
            None,
        );
        row(
            format!("{v} voters: lock acquire on the cut-off side, statuses"),
            format!("{:?}", r.minority_lock_statuses),
            "never 200",
            Some(!r.minority_lock_statuses.contains(&200) && !r.minority_lock_statuses.is_empty()),
        );
        row(
            format!("{v} voters: after healing, every agent agrees"),
            r.heal_agreement_ms
                .map(|x| format!("{x:.0} ms"))
                .unwrap_or_else(|| "never".into()),
            "<= 2000 ms",
            Some(r.heal_agreement_ms.is_some_and(|x| x <= 2000.0)),
        );
        row(
            format!("{v} voters: terms with two agents claiming leadership"),
            format!("{}", r.double_claims.len()),
            "0",
            Some(r.double_claims.is_empty()),
        );
        if let Some(e) = &r.error {
            row(
                format!("{v} voters: error"),
                e.chars().take(60).collect(),
                "-",
                Some(false),
            );
        }
        json_out.push(json!({
            "voters": v, "kill_ms": r.kills, "stop_ms": r.stops,
            "minority_stops_claiming_ms": r.minority_stops_claiming_ms,
            "majority_new_leader_ms": r.majority_new_leader_ms,
            "minority_lock_statuses": r.minority_lock_statuses,
            "heal_agreement_ms": r.heal_agreement_ms,
            "double_claims": r.double_claims, "error": r.error,
        }));
    }
    out += &format!("{}\n", "-".repeat(112));
    out += "kill -9 and SIGSTOP times: from the wall clock just before the signal until the latest received_ms, over the other agents, of the first LEADER_ELECTED of a higher term each stored (agents and bench share one clock); every agent's /v1/leader is then checked to agree. Partition and heal times: until every agent polled (every 25 ms) names the same leader; the killed or stopped leader is not polled until restarted or resumed.\n";
    out += &format!(
        "total bench time {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    print!("{out}");
    if std::env::var_os("RIFTMESH_BENCH_KEEP").is_some() {
        println!("agents' data and logs kept in {}", dir.keep().display());
    }
    let res = common::results_dir(manifest.join("benches/results"));
    let _ = std::fs::create_dir_all(&res);
    let _ = std::fs::write(res.join("leader.txt"), &out);
    let mut m = HashMap::new();
    m.insert("agents", json!(n));
    m.insert("runs", json!(json_out));
    let _ = std::fs::write(
        res.join("leader.json"),
        serde_json::to_string_pretty(&m).unwrap_or_default(),
    );
}
