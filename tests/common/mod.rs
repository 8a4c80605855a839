//! Test harness: real `riftmesh agent` processes on loopback, each with its own
//! data directory; ports are chosen by the OS and read back from agent.json.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_riftmesh");

/// Poll `f` until it returns Some, failing with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
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

/// This machine's wall clock, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn keygen(path: &Path) {
    let st = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub swarm_key: PathBuf,
    pub bootstrap: Vec<String>,
    pub extra: Vec<String>,
    /// Extra environment of the agent process (e.g. libfaketime's).
    pub env: Vec<(String, String)>,
    pub api: String,
    pub metrics: String,
    pub peer_id: String,
    child: Option<Child>,
    pub http: reqwest::Client,
    /// The API token the helpers send (`--api-token-file`, else the
    /// agent's `api.token` when it made one).
    pub token: Option<String>,
}

impl Agent {
    pub async fn start(root: &Path, name: &str, swarm_key: &Path, bootstrap: &[String]) -> Agent {
        Self::start_with(root, name, swarm_key, bootstrap, &[]).await
    }

    pub async fn start_with(
        root: &Path,
        name: &str,
        swarm_key: &Path,
        bootstrap: &[String],
        extra: &[String],
    ) -> Agent {
        Self::start_env(root, name, swarm_key, bootstrap, extra, &[]).await
    }

    /// As [`Agent::start_with`], with extra environment variables.
    pub async fn start_env(
        root: &Path,
        name: &str,
        swarm_key: &Path,
        bootstrap: &[String],
        extra: &[String],
        env: &[(String, String)],
    ) -> Agent {
        let mut a = Agent {
            name: name.into(),
            dir: root.join(name),
            swarm_key: swarm_key.into(),
            bootstrap: bootstrap.to_vec(),
            extra: extra.to_vec(),
            env: env.to_vec(),
            api: String::new(),
            metrics: String::new(),
            peer_id: String::new(),
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            token: None,
        };
        a.spawn().await;
        a
    }

    pub async fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let info = self.dir.join("agent.json");
        let _ = std::fs::remove_file(&info);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("agent")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            // A test may fix the API address (to keep it across restarts).
            .args(if self.extra.iter().any(|a| a == "--api") {
                &[][..]
            } else {
                &["--api", "127.0.0.1:0"][..]
            })
            .args(["--metrics", "127.0.0.1:0", "--no-mdns"])
            .arg("--swarm-key")
            .arg(&self.swarm_key)
            .args(&self.extra)
            .env("RUST_LOG", "info,riftmesh=debug")
            .env_remove("RIFTMESH_API")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for b in &self.bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        self.child = Some(child);
        let v: Value = wait_for(
            &format!("{} to start", self.name),
            Duration::from_secs(60),
            || {
                let info = info.clone();
                async move {
                    let v: Value =
                        serde_json::from_str(&std::fs::read_to_string(&info).ok()?).ok()?;
                    (v["pid"].as_u64() == Some(pid as u64)).then_some(v)
                }
            },
        )
        .await;
        self.api = format!("http://{}", v["api"].as_str().unwrap());
        self.metrics = format!("http://{}/metrics", v["metrics"].as_str().unwrap());
        self.peer_id = v["peer_id"].as_str().unwrap().into();
        let token_file = match self.extra.iter().position(|a| a == "--api-token-file") {
            Some(i) => PathBuf::from(&self.extra[i + 1]),
            None => self.dir.join("api.token"),
        };
        self.token = std::fs::read_to_string(token_file)
            .ok()
            .map(|t| t.trim().to_string());
    }

    /// A request to this agent's API, with its token if it has one.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.api));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Send a signal by name (STOP, CONT, TERM) to the agent process.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().expect("agent running");
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {pid}");
    }

    /// Wait for the agent process to exit by itself; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        let st = wait_for(&format!("{} to exit", self.name), timeout, || {
            let r = child.try_wait().ok().flatten();
            async move { r }
        })
        .await;
        st
    }

    /// This agent's view of member `name` (from /v1/members).
    pub async fn member(&self, name: &str) -> Option<Value> {
        let v = self.get("/v1/members").await.ok()?;
        v["members"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// A dialable address of this agent, with its peer id.
    pub async fn p2p_addr(&self) -> String {
        let addrs: Vec<String> = wait_for("listen address", Duration::from_secs(30), || async {
            let st = self.get("/v1/status").await.ok()?;
            let a: Vec<String> = st["listen_addrs"]
                .as_array()?
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            (!a.is_empty()).then_some(a)
        })
        .await;
        format!("{}/p2p/{}", addrs[0], self.peer_id)
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        let r = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(format!("{status}: {v}"))
        }
    }

    /// Send JSON; returns (status, body).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<(u16, Value), String> {
        let r = self
            .request(method, path)
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        Ok((status, v))
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        match self.send(reqwest::Method::POST, path, body).await? {
            (200, v) => Ok(v),
            (s, v) => Err(format!("{s}: {v}")),
        }
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, String> {
        match self.send(reqwest::Method::PUT, path, body).await? {
            (200, v) => Ok(v),
            (s, v) => Err(format!("{s}: {v}")),
        }
    }

    pub async fn publish(&self, t: &str, payload: Value) -> Result<Value, String> {
        self.post(
            "/v1/events",
            &serde_json::json!({ "type": t, "payload": payload }),
        )
        .await
    }

    pub async fn connected_peers(&self) -> usize {
        self.get("/v1/status")
            .await
            .ok()
            .and_then(|v| v["connected_peers"].as_u64())
            .unwrap_or(0) as usize
    }

    /// Every retained event (history), in log order.
    pub async fn all_events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let v = self
                .get(&format!("/v1/events?after={after}&limit=1000"))
                .await
                .unwrap();
            let evs = v["events"].as_array().unwrap().clone();
            let next = v["next_after"].as_u64().unwrap();
            out.extend(evs);
            if next == after || next >= v["head"].as_u64().unwrap() {
                return out;
            }
            after = next;
        }
    }

    /// This agent's /metrics text (the classic format). Fails the test when
    /// the scrape fails: an unreachable endpoint is not a zero.
    pub async fn scrape(&self) -> String {
        let r = self
            .http
            .get(&self.metrics)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: scraping {}: {e}", self.name, self.metrics));
        assert!(
            r.status().is_success(),
            "{}: scraping {}: {}",
            self.name,
            self.metrics,
            r.status()
        );
        r.text()
            .await
            .unwrap_or_else(|e| panic!("{}: reading {}: {e}", self.name, self.metrics))
    }

    /// Value of a metric series (name with labels, exact prefix), summed over
    /// the lines it matches. Fails the test when the scrape fails or no line
    /// matches; see [`Agent::metric_or_zero`] for a series that may not exist yet.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = self.scrape().await;
        metric_in(&text, prefix).unwrap_or_else(|| {
            panic!(
                "{}: no series {prefix:?} in /metrics:\n{}",
                self.name,
                family_lines(&text, prefix)
            )
        })
    }

    /// [`Agent::metric`] where the caller says an absent series means zero (a
    /// labelled family shows no line before its first increment). A failed
    /// scrape still fails the test, and so does a `riftmesh_` name that
    /// src/metrics.rs does not register, so a misspelt name is no zero.
    pub async fn metric_or_zero(&self, prefix: &str) -> f64 {
        let text = self.scrape().await;
        if let Some(v) = metric_in(&text, prefix) {
            return v;
        }
        let series = prefix.split(['{', ' ']).next().unwrap_or(prefix);
        if let Some(base) = series.strip_prefix("riftmesh_") {
            let base = ["_total", "_count", "_sum", "_bucket"]
                .iter()
                .find_map(|s| base.strip_suffix(s))
                .unwrap_or(base);
            assert!(
                include_str!("../../src/metrics.rs").contains(&format!("\"{base}\"")),
                "{}: {prefix:?} names no metric registered in src/metrics.rs",
                self.name
            );
        }
        0.0
    }
}

/// The sum of the values of the lines of `text` that start with `prefix`;
/// None when no line does.
pub fn metric_in(text: &str, prefix: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("unparsable metric line {l:?}"))
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The lines of the family `prefix` names, for a failure message.
fn family_lines(text: &str, prefix: &str) -> String {
    let series = prefix.split(['{', ' ']).next().unwrap_or(prefix);
    let family = series.trim_end_matches("_total");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(family)).collect();
    if lines.is_empty() {
        format!("(nothing named {family})")
    } else {
        lines.join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Start `n` agents sharing one swarm key, all bootstrapped to the first, and
/// wait until each sees every other.
pub async fn mesh(root: &Path, n: usize) -> Vec<Agent> {
    mesh_with(root, n, &[]).await
}

/// [`mesh`] with extra agent flags.
pub async fn mesh_with(root: &Path, n: usize, extra: &[&str]) -> Vec<Agent> {
    mesh_with_env(root, n, extra, |_| Vec::new()).await
}

/// As [`mesh_with`], agent `i` with the environment `env(i)` added.
pub async fn mesh_with_env(
    root: &Path,
    n: usize,
    extra: &[&str],
    env: impl Fn(usize) -> Vec<(String, String)>,
) -> Vec<Agent> {
    let key = root.join("swarm.key");
    keygen(&key);
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let first = Agent::start_env(root, "a0", &key, &[], &extra, &env(0)).await;
    let boot = vec![first.p2p_addr().await];
    let mut agents = vec![first];
    for i in 1..n {
        agents.push(Agent::start_env(root, &format!("a{i}"), &key, &boot, &extra, &env(i)).await);
    }
    wait_meshed(&agents, Duration::from_secs(60)).await;
    agents
}

/// Wait (at most `deadline` per agent) until every agent sees all the
/// others subscribed to the events topic.
pub async fn wait_meshed(agents: &[Agent], deadline: Duration) {
    let n = agents.len();
    for a in agents {
        wait_for(
            &format!("{} to see {} peers", a.name, n - 1),
            deadline,
            || async {
                let v = a.get("/v1/peers").await.ok()?;
                let subscribed = v["peers"]
                    .as_array()?
                    .iter()
                    .filter(|p| p["gossip_subscribed"] == true)
                    .count();
                (subscribed >= n - 1).then_some(())
            },
        )
        .await;
    }
}

/// A libp2p peer of our own protocol with the right swarm key, joined to `a`
/// and subscribed, driven by the test (it may be hostile). Returns its handle,
/// what it receives, and its key.
pub async fn hostile_peer(
    a: &Agent,
    key_path: &std::path::Path,
) -> (
    riftmesh::net::NetHandle,
    tokio::sync::mpsc::Receiver<riftmesh::net::Inbound>,
    libp2p::identity::Keypair,
) {
    hostile_peer_with(a, key_path, riftmesh::limits::NetLimits::default()).await
}

/// A libp2p peer speaking our protocols with the swarm key and its own
/// limits, not yet connected to anyone (the caller dials).
pub fn bare_peer(
    key_path: &std::path::Path,
    limits: riftmesh::limits::NetLimits,
    bootstrap: Vec<libp2p::Multiaddr>,
) -> (
    riftmesh::net::NetHandle,
    riftmesh::net::Inbox,
    libp2p::identity::Keypair,
) {
    let psk = riftmesh::net::parse_psk(&std::fs::read_to_string(key_path).unwrap()).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = riftmesh::metrics::Metrics::register(&mut registry);
    let key = libp2p::identity::Keypair::generate_ed25519();
    let (h, inbox) = riftmesh::net::start(
        key.clone(),
        riftmesh::net::NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap,
            mdns: false,
            psk,
            max_message_bytes: 1 << 20,
            inbound_queue: 1024,
            maintain_every: Duration::from_secs(1),
            ping_interval: Duration::from_secs(2),
            limits,
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

/// [`hostile_peer`] with its own connection and rate limits (a flooding peer
/// lifts its own so that only the agent's hold it back).
pub async fn hostile_peer_with(
    a: &Agent,
    key_path: &std::path::Path,
    limits: riftmesh::limits::NetLimits,
) -> (
    riftmesh::net::NetHandle,
    tokio::sync::mpsc::Receiver<riftmesh::net::Inbound>,
    libp2p::identity::Keypair,
) {
    let boot: libp2p::Multiaddr = a.p2p_addr().await.parse().unwrap();
    let (h, inbox, key) = bare_peer(key_path, limits, vec![boot.clone()]);
    h.dial(boot).await.unwrap();
    wait_for(
        "the peer to join the topic",
        Duration::from_secs(90),
        || async {
            h.peers()
                .await
                .ok()?
                .iter()
                .any(|p| p.gossip_subscribed)
                .then_some(())
        },
    )
    .await;
    (h, inbox.events, key)
}

/// Lines of the agent's log (all its runs) that contain every one of `needles`.
pub fn log_lines(a: &Agent, needles: &[&str]) -> Vec<String> {
    std::fs::read_to_string(a.dir.join("agent.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(String::from)
        .collect()
}
