//! Queue benchmark: `cargo bench --bench queue`.
//!
//! (a) Durable queue throughput: the riftmesh store against an SQLite WAL queue
//!     of the old design (synchronous=NORMAL and =FULL), same workload.
//! (b) Publish → remote consumer latency across 5 real agents on loopback.
//! (c) Resident memory of an idle agent in that mesh.
//!
//! Prints one plain-text table and writes a JSON copy to target/bench-queue.json.
//! Environment: RIFTMESH_BENCH_EVENTS (events per throughput measurement,
//! default 20000), RIFTMESH_BENCH_MAX_SECS (time cap per throughput
//! measurement, default 15; a measurement that hits it reports the events it
//! completed in that time), RIFTMESH_BENCH_AGENTS (agents in the mesh of (b),
//! default 5), RIFTMESH_BENCH_LATENCY_EVENTS (events timed in (b), default
//! 500), RIFTMESH_BENCH_API_EVENTS (events per local API publish measurement
//! (d), default 5000; 0 skips it), RIFTMESH_BENCH_ONLY=mesh (only (b), (c) and
//! (d)), RIFTMESH_BENCH_RESULTS (directory of the JSON copy).
//!
//! (d) Local API publish throughput on agent 1 of that mesh (HTTP on
//!     loopback, durable append, gossip to the others): one client, 8
//!     clients, and batches of 100 (`POST /v1/events/batch`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use riftmesh::event::{self, Draft};
use riftmesh::store::{Appended, StartAt, Store, StoreConfig};
use rusqlite::{params, Connection, TransactionBehavior};
use serde_json::{json, Value};
use tempfile::TempDir;

use common::{
    http_json, keygen, log_tail, percentile, spawn_agent, verdict, vm_rss_kb, wait_agent_json,
    Agents,
};

const EVENT_TYPE: &str = "BENCH_QUEUE";
const PUBLISHERS: u64 = 8;
const BATCH: u64 = 100;
const DEFAULT_AGENTS: usize = 5;
const DEFAULT_LATENCY_EVENTS: usize = 500;
const DEFAULT_API_EVENTS: u64 = 5000;
const WARMUP_EVENTS: usize = 20;

// ---------------------------------------------------------------- workload

/// The same event body for both queues: ~120 bytes of canonical JSON with a
/// counter, so every event has distinct content.
fn payload(i: u64) -> Value {
    json!({
        "job": "selfplay/hex8_2p",
        "host": "gpu-node-0007",
        "games": 256,
        "model": "hex8_2p-v00042",
        "batch": format!("b-{i:010}"),
        "i": i,
    })
}

fn draft(i: u64) -> Draft {
    Draft::new(EVENT_TYPE, &payload(i), None, None, None).expect("valid draft")
}

/// What the old design stored per event: type, payload text, content hash.
fn sqlite_row(i: u64) -> (String, String) {
    let text = event::canonical_json(&payload(i));
    let hash = hex::encode(event::content_hash(EVENT_TYPE, &text));
    (text, hash)
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Events completed in a measurement and the time they took.
#[derive(Clone, Copy, Debug)]
struct Tput {
    events: u64,
    secs: f64,
    /// Stopped by the time cap before all N events were done.
    capped: bool,
    /// Publishes refused with SQLITE_BUSY after the busy timeout (and retried).
    busy: u64,
}

impl Tput {
    fn new(events: u64, started: Instant, n: u64) -> Self {
        Tput {
            events,
            secs: started.elapsed().as_secs_f64(),
            capped: events < n,
            busy: 0,
        }
    }
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.events as f64 / self.secs
        } else {
            0.0
        }
    }
    fn json(&self) -> Value {
        json!({ "events": self.events, "secs": self.secs, "events_per_sec": self.rate(), "capped": self.capped, "busy_errors": self.busy })
    }
}

struct Env {
    root: PathBuf,
    n: u64,
    cap: Duration,
    /// Agents in the mesh of (b).
    agents: usize,
    /// Events timed in (b).
    latency_events: usize,
    /// Events per API publish measurement (d); 0 skips (d).
    api_events: u64,
    /// Every temporary directory is removed at the end of the run.
    keep: Mutex<Vec<TempDir>>,
}

impl Env {
    fn tempdir(&self, prefix: &str) -> PathBuf {
        let d = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.root)
            .expect("tempdir in target/");
        let p = d.path().to_path_buf();
        self.keep.lock().unwrap().push(d);
        p
    }
}

// ---------------------------------------------------------------- riftmesh store

fn open_store(dir: &Path) -> Store {
    Store::open(dir, StoreConfig::default(), Keypair::generate_ed25519()).expect("open store")
}

fn expect_new(out: &[Appended]) {
    for a in out {
        if let Appended::Duplicate { seq, .. } = a {
            panic!("event deduplicated as a copy of seq {seq}: the workload must be distinct");
        }
    }
}

/// Stop the store's writer (it finishes its pending writes) so it takes no
/// I/O from the next measurement.
async fn settle(store: Store) {
    tokio::task::spawn_blocking(move || store.close())
        .await
        .expect("close store");
}

async fn rm_sequential(env: &Env) -> Tput {
    let store = open_store(&env.tempdir("rm-seq-"));
    let deadline = Instant::now() + env.cap;
    let t0 = Instant::now();
    let mut done = 0;
    for i in 0..env.n {
        if Instant::now() >= deadline {
            break;
        }
        expect_new(&store.append_local(vec![draft(i)]).await.expect("append"));
        done += 1;
    }
    let t = Tput::new(done, t0, env.n);
    settle(store).await;
    t
}

async fn rm_concurrent(env: &Env) -> Tput {
    let store = open_store(&env.tempdir("rm-conc-"));
    let deadline = Instant::now() + env.cap;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let store = store.clone();
        let n = env.n;
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            // Publisher p takes every PUBLISHERS-th counter.
            for i in (p..n).step_by(PUBLISHERS as usize) {
                if Instant::now() >= deadline {
                    break;
                }
                expect_new(&store.append_local(vec![draft(i)]).await.expect("append"));
                done += 1;
            }
            done
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("publisher task");
    }
    let t = Tput::new(done, t0, env.n);
    settle(store).await;
    t
}

async fn rm_batches(env: &Env) -> Tput {
    let store = open_store(&env.tempdir("rm-batch-"));
    let deadline = Instant::now() + env.cap;
    let t0 = Instant::now();
    let mut done = 0;
    let mut i = 0;
    while i < env.n && Instant::now() < deadline {
        let end = (i + BATCH).min(env.n);
        let drafts: Vec<Draft> = (i..end).map(draft).collect();
        expect_new(&store.append_local(drafts).await.expect("append"));
        done += end - i;
        i = end;
    }
    let t = Tput::new(done, t0, env.n);
    settle(store).await;
    t
}

async fn rm_consume(env: &Env) -> Tput {
    let store = open_store(&env.tempdir("rm-consume-"));
    // Fill (not timed).
    let mut i = 0;
    while i < env.n {
        let end = (i + 1000).min(env.n);
        expect_new(
            &store
                .append_local((i..end).map(draft).collect())
                .await
                .expect("fill"),
        );
        i = end;
    }
    let deadline = Instant::now() + env.cap;
    let t0 = Instant::now();
    let rec = store
        .upsert_consumer("bench", None, Some(StartAt::Start))
        .await
        .expect("consumer");
    let mut cursor = rec.cursor;
    let mut done = 0u64;
    while Instant::now() < deadline {
        let (events, _scanned) = store
            .read_after(cursor, 100, 50_000, &[])
            .expect("read_after");
        let Some(&(last_seq, _)) = events.last() else {
            break;
        };
        done += events.len() as u64;
        store.ack("bench", last_seq).await.expect("ack");
        cursor = last_seq;
    }
    let t = Tput::new(done, t0, env.n);
    settle(store).await;
    t
}

// ---------------------------------------------------------------- SQLite, old design

#[derive(Clone, Copy, Debug, PartialEq)]
enum SyncMode {
    Normal,
    Full,
}

impl SyncMode {
    fn pragma(self) -> &'static str {
        match self {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        }
    }
}

const SQL_INSERT: &str =
    "INSERT OR IGNORE INTO events(type, payload, hash, created) VALUES (?1, ?2, ?3, ?4)";

fn sqlite_open(path: &Path, sync: SyncMode) -> Connection {
    let conn = Connection::open(path).expect("open sqlite");
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode.to_lowercase(), "wal");
    conn.execute_batch(&format!("PRAGMA synchronous={}", sync.pragma()))
        .expect("synchronous");
    let level: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .expect("synchronous");
    assert_eq!(level, if sync == SyncMode::Full { 2 } else { 1 });
    conn.busy_timeout(Duration::from_millis(5000))
        .expect("busy_timeout");
    conn
}

/// A fresh database with the old schema.
fn sqlite_create(env: &Env, prefix: &str) -> PathBuf {
    let path = env.tempdir(prefix).join("events.db");
    let conn = sqlite_open(&path, SyncMode::Full);
    conn.execute_batch(
        "CREATE TABLE events(id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, payload TEXT, hash TEXT UNIQUE, created REAL);
         CREATE TABLE acks(consumer TEXT, event_id INTEGER, PRIMARY KEY(consumer, event_id));",
    )
    .expect("schema");
    path
}

/// One publish: one transaction with one insert.
fn sqlite_publish_one(conn: &mut Connection, i: u64) -> rusqlite::Result<()> {
    let (text, hash) = sqlite_row(i);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.prepare_cached(SQL_INSERT)?
        .execute(params![EVENT_TYPE, text, hash, now_secs()])?;
    tx.commit()
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy)
    )
}

fn sqlite_sequential(env: &Env, sync: SyncMode) -> Tput {
    let path = sqlite_create(env, "sq-seq-");
    let mut conn = sqlite_open(&path, sync);
    let deadline = Instant::now() + env.cap;
    let t0 = Instant::now();
    let mut done = 0;
    for i in 0..env.n {
        if Instant::now() >= deadline {
            break;
        }
        sqlite_publish_one(&mut conn, i).expect("publish");
        done += 1;
    }
    Tput::new(done, t0, env.n)
}

fn sqlite_concurrent(env: &Env, sync: SyncMode) -> Tput {
    let path = sqlite_create(env, "sq-conc-");
    let start = Barrier::new(PUBLISHERS as usize + 1);
    let n = env.n;
    let cap = env.cap;
    let (done, busy, t0) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                let (path, start) = (&path, &start);
                s.spawn(move || {
                    let mut conn = sqlite_open(path, sync);
                    start.wait();
                    let deadline = Instant::now() + cap;
                    let (mut done, mut busy) = (0u64, 0u64);
                    'events: for i in (p..n).step_by(PUBLISHERS as usize) {
                        // "database is locked" after the busy timeout: the
                        // publisher retries, as a caller of the old queue had to.
                        loop {
                            if Instant::now() >= deadline {
                                break 'events;
                            }
                            match sqlite_publish_one(&mut conn, i) {
                                Ok(()) => break,
                                Err(e) if is_busy(&e) => busy += 1,
                                Err(e) => panic!("publish: {e}"),
                            }
                        }
                        done += 1;
                    }
                    (done, busy)
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let (mut done, mut busy) = (0, 0);
        for h in handles {
            let (d, b) = h.join().expect("publisher thread");
            done += d;
            busy += b;
        }
        (done, busy, t0)
    });
    Tput {
        busy,
        ..Tput::new(done, t0, env.n)
    }
}

fn sqlite_insert_batch(conn: &mut Connection, range: std::ops::Range<u64>) {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .expect("begin");
    {
        let mut stmt = tx.prepare_cached(SQL_INSERT).expect("prepare");
        for i in range {
            let (text, hash) = sqlite_row(i);
            stmt.execute(params![EVENT_TYPE, text, hash, now_secs()])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

fn sqlite_batches(env: &Env, sync: SyncMode) -> Tput {
    let path = sqlite_create(env, "sq-batch-");
    let mut conn = sqlite_open(&path, sync);
    let deadline = Instant::now() + env.cap;
    let t0 = Instant::now();
    let mut i = 0;
    while i < env.n && Instant::now() < deadline {
        let end = (i + BATCH).min(env.n);
        sqlite_insert_batch(&mut conn, i..end);
        i = end;
    }
    Tput::new(i, t0, env.n)
}

fn sqlite_consume(env: &Env, sync: SyncMode) -> Tput {
    let path = sqlite_create(env, "sq-consume-");
    let mut conn = sqlite_open(&path, sync);
    // Fill (not timed).
    let mut i = 0;
    while i < env.n {
        let end = (i + 1000).min(env.n);
        sqlite_insert_batch(&mut conn, i..end);
        i = end;
    }
    let deadline = Instant::now() + env.cap;
    let t0 = Instant::now();
    let mut done = 0u64;
    while Instant::now() < deadline {
        let batch: Vec<(i64, String, String, String, f64)> = {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, type, payload, hash, created FROM events
                     WHERE id NOT IN (SELECT event_id FROM acks WHERE consumer = ?1)
                     ORDER BY id LIMIT 100",
                )
                .expect("prepare poll");
            let rows = stmt
                .query_map(["bench"], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .expect("poll");
            rows.collect::<Result<_, _>>().expect("rows")
        };
        if batch.is_empty() {
            break;
        }
        done += batch.len() as u64;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .expect("begin");
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO acks(consumer, event_id) VALUES (?1, ?2)")
                .expect("prepare ack");
            for row in &batch {
                stmt.execute(params!["bench", row.0]).expect("ack");
            }
        }
        tx.commit().expect("commit acks");
    }
    Tput::new(done, t0, env.n)
}

// ---------------------------------------------------------------- agents

#[derive(Default)]
struct Receiver {
    warm: AtomicUsize,
    got: Mutex<Vec<(usize, Instant)>>,
}

/// Long-poll a consumer, acknowledging each batch, and note when each
/// BENCH_LATENCY event arrived.
async fn receive(
    client: reqwest::Client,
    api: String,
    st: Arc<Receiver>,
    want: usize,
) -> anyhow::Result<()> {
    let fetch = format!("http://{api}/v1/consumers/lat/events?max=100&wait_ms=20000");
    let ack = format!("http://{api}/v1/consumers/lat/ack");
    loop {
        let v = http_json(client.get(&fetch)).await?;
        let now = Instant::now();
        let mut last = None;
        for e in v["events"].as_array().into_iter().flatten() {
            last = e["seq"].as_u64().or(last);
            match e["type"].as_str() {
                Some("BENCH_LATENCY") => {
                    if let Some(i) = e["payload"]["i"].as_u64() {
                        st.got.lock().unwrap().push((i as usize, now));
                    }
                }
                Some("BENCH_WARMUP") => {
                    st.warm.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        if let Some(seq) = last {
            http_json(client.post(&ack).json(&json!({ "seq": seq }))).await?;
        }
        if st.got.lock().unwrap().len() >= want {
            return Ok(());
        }
    }
}

struct MeshResult {
    connect_secs: f64,
    /// Milliseconds, one per (receiver, event); infinite when never received.
    latencies: Vec<f64>,
    delivered: usize,
    expected: usize,
    /// Milliseconds each publish request took (durable append on agent 1).
    publish_ms: Vec<f64>,
    rss_mb: Vec<f64>,
    /// (d): one client, 8 clients, batches of 100; None when skipped.
    api: Option<[Tput; 3]>,
}

async fn mesh(env: &Env) -> anyhow::Result<MeshResult> {
    let (agents_n, latency_events) = (env.agents, env.latency_events);
    let bin = env!("CARGO_BIN_EXE_riftmesh");
    let root = env.tempdir("mesh-");
    keygen(bin, &root.join("swarm.key"))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut agents = Agents {
        children: Vec::new(),
    };
    let names: Vec<String> = (1..=agents_n).map(|i| format!("b{i}")).collect();
    let t_start = Instant::now();

    // Agent 1, then its address for the others.
    agents
        .children
        .push(spawn_agent(bin, &root, &names[0], None)?);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (peer1, api1) =
        wait_agent_json(&mut agents.children[0], &root, &names[0], deadline).await?;
    let listen = loop {
        let v = http_json(client.get(format!("http://{api1}/v1/status"))).await?;
        let addrs: Vec<String> = v["listen_addrs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        if let Some(a) = addrs.first() {
            break a.clone();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "agent b1 reports no listen address"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let bootstrap = format!("{listen}/p2p/{peer1}");
    let mut apis = vec![api1];
    for name in &names[1..] {
        agents
            .children
            .push(spawn_agent(bin, &root, name, Some(&bootstrap))?);
    }
    for (k, name) in names.iter().enumerate().skip(1) {
        let (_, api) = wait_agent_json(&mut agents.children[k], &root, name, deadline).await?;
        apis.push(api);
    }

    // Full mesh: every agent has the others as connected peers (status), and
    // sees them subscribed to the events topic (peers).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ready = true;
        let mut seen = Vec::new();
        for api in &apis {
            let count = match http_json(client.get(format!("http://{api}/v1/status"))).await {
                Ok(v) => v["connected_peers"].as_u64().unwrap_or(0) as usize,
                Err(_) => 0,
            };
            let subscribed = if count >= agents_n - 1 {
                match http_json(client.get(format!("http://{api}/v1/peers"))).await {
                    Ok(v) => v["peers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|p| p["gossip_subscribed"].as_bool() == Some(true))
                        .count(),
                    Err(_) => 0,
                }
            } else {
                0
            };
            seen.push(format!("{count}/{subscribed}"));
            ready &= count >= agents_n - 1 && subscribed >= agents_n - 1;
        }
        if ready {
            eprintln!(
                "    mesh ready after {:.1} s (peers/subscribed per agent: {seen:?})",
                t_start.elapsed().as_secs_f64()
            );
            break;
        }
        for (k, c) in agents.children.iter_mut().enumerate() {
            if let Some(status) = c.try_wait()? {
                anyhow::bail!(
                    "agent {} exited ({status}):\n{}",
                    names[k],
                    log_tail(&root, &names[k])
                );
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "mesh not formed within 60 s (peers/subscribed per agent: {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connect_secs = t_start.elapsed().as_secs_f64();

    // Consumers and their long-poll loops on agents 2..5.
    let mut receivers = Vec::new();
    let mut tasks = Vec::new();
    for api in &apis[1..] {
        http_json(
            client
                .put(format!("http://{api}/v1/consumers/lat"))
                .json(&json!({})),
        )
        .await?;
        let st = Arc::new(Receiver::default());
        receivers.push(st.clone());
        tasks.push(tokio::spawn(receive(
            client.clone(),
            api.clone(),
            st,
            latency_events,
        )));
    }

    let publish_url = format!("http://{}/v1/events", apis[0]);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Warm-up: gossip mesh, connections of the HTTP pool, the long-polls.
    for i in 0..WARMUP_EVENTS {
        tick.tick().await;
        http_json(
            client
                .post(&publish_url)
                .json(&json!({ "type": "BENCH_WARMUP", "payload": { "i": i } })),
        )
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while receivers
        .iter()
        .any(|r| r.warm.load(Ordering::Relaxed) < WARMUP_EVENTS)
    {
        if Instant::now() >= deadline {
            let warm: Vec<usize> = receivers
                .iter()
                .map(|r| r.warm.load(Ordering::Relaxed))
                .collect();
            eprintln!("warning: warm-up events not all delivered within 15 s: {warm:?} of {WARMUP_EVENTS}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The measured run.
    let mut sent = Vec::with_capacity(latency_events);
    tick.reset();
    let mut publish_ms = Vec::with_capacity(latency_events);
    for i in 0..latency_events {
        tick.tick().await;
        let t = Instant::now();
        sent.push(t);
        http_json(
            client
                .post(&publish_url)
                .json(&json!({ "type": "BENCH_LATENCY", "payload": { "i": i } })),
        )
        .await?;
        publish_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let all = futures::future::join_all(tasks.iter_mut());
    match tokio::time::timeout(Duration::from_secs(20), all).await {
        Ok(results) => {
            for r in results {
                r??;
            }
        }
        Err(_) => {
            eprintln!("warning: not every receiver had every event 20 s after the last publish");
            for t in &tasks {
                t.abort();
            }
        }
    }
    let mut latencies = Vec::new();
    let mut delivered = 0;
    for r in &receivers {
        let mut at: Vec<Option<Instant>> = vec![None; latency_events];
        for &(i, t) in r.got.lock().unwrap().iter() {
            if i < latency_events && at[i].is_none() {
                at[i] = Some(t);
                delivered += 1;
            }
        }
        for (i, t) in at.iter().enumerate() {
            latencies.push(match t {
                Some(t) => t.saturating_duration_since(sent[i]).as_secs_f64() * 1000.0,
                None => f64::INFINITY,
            });
        }
    }

    // Idle memory: long-polls are done or aborted; let the agents sit.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut rss_mb = Vec::new();
    for (k, c) in agents.children.iter().enumerate() {
        let kb = vm_rss_kb(c.id())
            .ok_or_else(|| anyhow::anyhow!("cannot read VmRSS of agent {}", names[k]))?;
        rss_mb.push(kb as f64 / 1024.0);
    }
    let api = if env.api_events > 0 {
        eprintln!(
            "(d) local API publish on b1, {} events each",
            env.api_events
        );
        Some([
            api_publish(env, &client, &apis[0], 1, 1).await?,
            api_publish(env, &client, &apis[0], PUBLISHERS, 1).await?,
            api_publish(env, &client, &apis[0], 1, BATCH).await?,
        ])
    } else {
        None
    };
    drop(agents);
    Ok(MeshResult {
        connect_secs,
        latencies,
        delivered,
        expected: latency_events * (agents_n - 1),
        publish_ms,
        rss_mb,
        api,
    })
}

/// (d) `env.api_events` distinct events published to the agent at `api` by
/// `clients` concurrent HTTP clients, in requests of `batch` events (1: `POST
/// /v1/events`, more: `POST /v1/events/batch`), each request answered after
/// the durable append; stops at the time cap.
async fn api_publish(
    env: &Env,
    client: &reqwest::Client,
    api: &str,
    clients: u64,
    batch: u64,
) -> anyhow::Result<Tput> {
    let run = format!("c{clients}-b{batch}");
    let deadline = Instant::now() + env.cap;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, run, n) = (client.clone(), run.clone(), env.api_events);
        let url = if batch == 1 {
            format!("http://{api}/v1/events")
        } else {
            format!("http://{api}/v1/events/batch")
        };
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            // Client c takes every clients-th request of `batch` events.
            let requests = n.div_ceil(batch);
            for r in (c..requests).step_by(clients as usize) {
                if Instant::now() >= deadline {
                    break;
                }
                let range = r * batch..((r + 1) * batch).min(n);
                let one =
                    |i: u64| json!({ "type": "BENCH_API", "payload": { "run": run, "i": i } });
                let body = if batch == 1 {
                    one(range.start)
                } else {
                    json!({ "events": range.clone().map(one).collect::<Vec<_>>() })
                };
                http_json(client.post(&url).json(&body)).await?;
                done += range.end - range.start;
            }
            anyhow::Ok(done)
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await??;
    }
    Ok(Tput::new(done, t0, env.api_events))
}

// ---------------------------------------------------------------- report

struct Row {
    name: String,
    riftmesh: String,
    normal: String,
    full: String,
    ratio_normal: String,
    ratio_full: String,
    target: String,
    result: String,
    json: Value,
}

fn rate_cell(t: &Tput) -> String {
    let busy = if t.busy > 0 {
        format!(" ({} busy)", t.busy)
    } else {
        String::new()
    };
    format!("{:.0}{}{busy}", t.rate(), if t.capped { "*" } else { "" })
}

fn ratio(a: &Tput, b: &Tput) -> f64 {
    a.rate() / b.rate()
}

fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2} ms")
    } else {
        "never".to_string()
    }
}

fn print_table(rows: &[Row]) {
    let headers = [
        "measurement",
        "riftmesh",
        "sqlite NORMAL",
        "sqlite FULL",
        "rm/NORMAL",
        "rm/FULL",
        "target",
        "result",
    ];
    let cells: Vec<[&str; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.name.as_str(),
                r.riftmesh.as_str(),
                r.normal.as_str(),
                r.full.as_str(),
                r.ratio_normal.as_str(),
                r.ratio_full.as_str(),
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
    let line = |c: &[&str; 8]| {
        let mut out = String::new();
        for (k, s) in c.iter().enumerate() {
            let pad = width[k] - s.chars().count();
            if k == 0 || k >= 6 {
                out.push_str(s);
                out.push_str(&" ".repeat(pad));
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(s);
            }
            if k < 7 {
                out.push_str("  ");
            }
        }
        out.trim_end().to_string()
    };
    let rule = "-".repeat(width.iter().sum::<usize>() + 2 * 7);
    println!("{}", line(&headers));
    println!("{rule}");
    for c in &cells {
        println!("{}", line(c));
    }
    println!("{rule}");
}

fn main() {
    let n: u64 = std::env::var("RIFTMESH_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(20_000);
    let cap_secs: f64 = std::env::var("RIFTMESH_BENCH_MAX_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v: &f64| *v > 0.0)
        .unwrap_or(15.0);
    let num = |k: &str, default: u64| -> u64 {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let agents = (num("RIFTMESH_BENCH_AGENTS", DEFAULT_AGENTS as u64) as usize).max(2);
    let latency_events = (num(
        "RIFTMESH_BENCH_LATENCY_EVENTS",
        DEFAULT_LATENCY_EVENTS as u64,
    ) as usize)
        .max(1);
    let api_events = num("RIFTMESH_BENCH_API_EVENTS", DEFAULT_API_EVENTS);
    let only_mesh = std::env::var("RIFTMESH_BENCH_ONLY").as_deref() == Ok("mesh");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&root).expect("target dir");
    let env = Env {
        root: root.clone(),
        n,
        cap: Duration::from_secs_f64(cap_secs),
        agents,
        latency_events,
        api_events,
        keep: Mutex::new(Vec::new()),
    };
    let payload_bytes = event::canonical_json(&payload(n / 2)).len();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();

    eprintln!("(a) durable queue throughput, N = {n}, payload {payload_bytes} bytes");
    // Row by row, riftmesh then SQLite NORMAL then FULL, so whatever else the
    // machine is doing weighs on the three cells of a row alike.
    let kinds = [
        "1 publisher",
        "8 publishers",
        "batches of 100",
        "consume+ack",
    ];
    let (mut rm, mut normal, mut full) = (Vec::new(), Vec::new(), Vec::new());
    for (k, kind) in kinds.iter().enumerate() {
        if only_mesh {
            break;
        }
        eprintln!("    riftmesh, {kind} ...");
        rm.push(rt.block_on(async {
            match k {
                0 => rm_sequential(&env).await,
                1 => rm_concurrent(&env).await,
                2 => rm_batches(&env).await,
                _ => rm_consume(&env).await,
            }
        }));
        for sync in [SyncMode::Normal, SyncMode::Full] {
            eprintln!("    sqlite {}, {kind} ...", sync.pragma());
            let t = match k {
                0 => sqlite_sequential(&env, sync),
                1 => sqlite_concurrent(&env, sync),
                2 => sqlite_batches(&env, sync),
                _ => sqlite_consume(&env, sync),
            };
            match sync {
                SyncMode::Normal => normal.push(t),
                SyncMode::Full => full.push(t),
            }
        }
    }

    eprintln!("(b, c) {agents} agents on loopback");
    let mesh = rt.block_on(mesh(&env));

    let mut rows = Vec::new();
    for (k, ((r, a), b)) in rm.iter().zip(&normal).zip(&full).enumerate() {
        let (rn, rf) = (ratio(r, a), ratio(r, b));
        let (target, ok) = match k {
            0 => ("rm >= sqlite FULL".to_string(), Some(rf >= 1.0)),
            1 | 2 => ("rm >= 10x sqlite NORMAL".to_string(), Some(rn >= 10.0)),
            _ => ("-".to_string(), None),
        };
        rows.push(Row {
            name: format!("(a) {}, events/s", kinds[k]),
            riftmesh: rate_cell(r),
            normal: rate_cell(a),
            full: rate_cell(b),
            ratio_normal: format!("{rn:.2}x"),
            ratio_full: format!("{rf:.2}x"),
            target: target.clone(),
            result: ok.map(verdict).unwrap_or_else(|| "-".into()),
            json: json!({
                "riftmesh": r.json(), "sqlite_normal": a.json(), "sqlite_full": b.json(),
                "ratio_vs_normal": rn, "ratio_vs_full": rf,
                "target": target, "met": ok,
            }),
        });
    }
    let dash = || "-".to_string();
    let plain = |name: &str, value: String, target: &str, ok: Option<bool>, json: Value| Row {
        name: name.to_string(),
        riftmesh: value,
        normal: dash(),
        full: dash(),
        ratio_normal: dash(),
        ratio_full: dash(),
        target: target.to_string(),
        result: ok.map(verdict).unwrap_or_else(dash),
        json,
    };
    let mut mesh_json = json!(null);
    match &mesh {
        Ok(m) => {
            let mut sorted = m.latencies.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            let (p50, p99, max) = (
                percentile(&sorted, 50.0),
                percentile(&sorted, 99.0),
                sorted.last().copied().unwrap_or(f64::NAN),
            );
            let finite = |v: f64| if v.is_finite() { json!(v) } else { json!(null) };
            rows.push(plain(
                &format!("(b) delivered to {} remote consumers", agents - 1),
                format!("{}/{}", m.delivered, m.expected),
                "-",
                None,
                json!({ "delivered": m.delivered, "expected": m.expected }),
            ));
            rows.push(plain(
                "(b) publish->remote consumer p50",
                ms(p50),
                "-",
                None,
                json!({ "ms": finite(p50) }),
            ));
            rows.push(plain(
                "(b) publish->remote consumer p99",
                ms(p99),
                "< 20 ms",
                Some(p99 < 20.0),
                json!({ "ms": finite(p99), "target_ms": 20, "met": p99 < 20.0 }),
            ));
            rows.push(plain(
                "(b) publish->remote consumer max",
                ms(max),
                "-",
                None,
                json!({ "ms": finite(max) }),
            ));
            let rss_max = m.rss_mb.iter().copied().fold(0.0, f64::max);
            let rss_mean = m.rss_mb.iter().sum::<f64>() / m.rss_mb.len().max(1) as f64;
            rows.push(plain(
                "(c) idle agent RSS, max",
                format!("{rss_max:.1} MB"),
                "< 20 MB",
                Some(rss_max < 20.0),
                json!({ "mb": rss_max, "target_mb": 20, "met": rss_max < 20.0 }),
            ));
            rows.push(plain(
                "(c) idle agent RSS, mean",
                format!("{rss_mean:.1} MB"),
                "-",
                None,
                json!({ "mb": rss_mean }),
            ));
            for (k, t) in m.api.iter().flatten().enumerate() {
                // Beside the SQLite cells and the store-direct rate of the
                // same workload in (a), when (a) ran.
                let (a, b, direct) = (normal.get(k), full.get(k), rm.get(k));
                let cell = |x: Option<&Tput>| x.map(rate_cell).unwrap_or_else(dash);
                let rat = |x: Option<&Tput>| {
                    x.map(|x| format!("{:.2}x", ratio(t, x)))
                        .unwrap_or_else(dash)
                };
                rows.push(Row {
                    name: format!(
                        "(d) API publish, {}, events/s",
                        ["1 client", "8 clients", "batches of 100"][k]
                    ),
                    riftmesh: rate_cell(t),
                    normal: cell(a),
                    full: cell(b),
                    ratio_normal: rat(a),
                    ratio_full: rat(b),
                    target: "-".into(),
                    result: "-".into(),
                    json: json!({
                        "riftmesh": t.json(),
                        "store_direct": direct.map(Tput::json),
                        "sqlite_normal": a.map(Tput::json),
                        "sqlite_full": b.map(Tput::json),
                        "agents": agents,
                    }),
                });
            }
            let mut pub_sorted = m.publish_ms.clone();
            pub_sorted.sort_by(|a, b| a.total_cmp(b));
            mesh_json = json!({
                "publish_request_ms": {
                    "p50": percentile(&pub_sorted, 50.0),
                    "p99": percentile(&pub_sorted, 99.0),
                    "max": pub_sorted.last().copied().unwrap_or(f64::NAN),
                },
                "agents": agents, "events": latency_events, "pace_ms": 5,
                "mesh_ready_secs": m.connect_secs, "rss_mb_per_agent": m.rss_mb,
            });
        }
        Err(e) => {
            let err = format!("failed: {e:#}");
            eprintln!("mesh run {err}");
            for (name, target) in [
                ("(b) publish->remote consumer p99", "< 20 ms"),
                ("(c) idle agent RSS, max", "< 20 MB"),
            ] {
                rows.push(plain(
                    name,
                    "error".into(),
                    target,
                    Some(false),
                    json!({ "error": err }),
                ));
            }
        }
    }

    // Cost floors that bound the (a) rows on this machine, measured here.
    if !only_mesh {
        let (sign_us, commit_us) = floors();
        rows.push(plain(
            "(a) floor: ed25519 sign per event",
            format!("{sign_us:.1} us"),
            "-",
            None,
            json!({ "us": sign_us, "max_events_per_sec_per_core": 1e6 / sign_us }),
        ));
        rows.push(plain(
            "(a) floor: empty sled commit",
            format!("{commit_us:.0} us"),
            "-",
            None,
            json!({ "us": commit_us, "max_commits_per_sec": 1e6 / commit_us }),
        ));
    }

    println!();
    println!(
        "riftmesh queue bench: N = {n} events per throughput cell, payload {payload_bytes} bytes, \
         time cap {cap_secs} s per cell; {agents} agents, {latency_events} events paced 5 ms"
    );
    print_table(&rows);
    let all: Vec<&Tput> = rm.iter().chain(&normal).chain(&full).collect();
    if all.iter().any(|t| t.capped) {
        println!(
            "* hit the time cap: rate over the events done before it (counts in the JSON copy)."
        );
    }
    if all.iter().any(|t| t.busy > 0) {
        println!(
            "(k busy): k publishes failed with \"database is locked\" after the 5 s busy timeout and were retried."
        );
    }
    println!(
        "riftmesh appends return after flush + fsync (= sqlite FULL durability); sqlite NORMAL in WAL \
         mode does not fsync at commit. MB = 2^20 bytes."
    );
    if let Ok(m) = &mesh {
        let mut p = m.publish_ms.clone();
        p.sort_by(|a, b| a.total_cmp(b));
        println!(
            "mesh of {agents} agents fully connected after {:.1} s; the publish requests to b1 \
             (durable append + gossip) took p50 {} / p99 {}.",
            m.connect_secs,
            ms(percentile(&p, 50.0)),
            ms(percentile(&p, 99.0))
        );
    }
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());

    let out = json!({
        "events": n,
        "payload_bytes": payload_bytes,
        "time_cap_secs": cap_secs,
        "rows": rows.iter().map(|r| json!({ "name": r.name, "data": r.json })).collect::<Vec<_>>(),
        "mesh": mesh_json,
        "total_secs": started.elapsed().as_secs_f64(),
    });
    let path = common::results_dir(root.clone()).join("bench-queue.json");
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

/// Two floors under the durable publish rows: the Ed25519 signature every
/// local event carries, and one sled commit of a single small key (apply,
/// sled flush, fdatasync of its file) as the store does per group.
fn floors() -> (f64, f64) {
    let key = Keypair::generate_ed25519();
    let msg = vec![5u8; 400];
    let n = 5000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(key.sign(&msg).expect("sign"));
    }
    let sign_us = t.elapsed().as_secs_f64() / n as f64 * 1e6;

    let dir = tempfile::tempdir_in("target").expect("tempdir");
    let db = sled::Config::new().path(dir.path()).open().expect("sled");
    let file = std::fs::File::open(dir.path().join("db")).expect("db file");
    let commits = 1000u64;
    let t = Instant::now();
    for i in 0..commits {
        db.insert(i.to_be_bytes(), &[1u8; 64][..]).expect("insert");
        db.flush().expect("flush");
        file.sync_data().expect("fsync");
    }
    let commit_us = t.elapsed().as_secs_f64() / commits as f64 * 1e6;
    (sign_us, commit_us)
}
