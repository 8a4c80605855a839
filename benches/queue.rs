//! Queue benchmark: `cargo bench --bench queue`.
//!
//! (a) Durable queue throughput: the riftmesh store against an SQLite WAL queue
//!     of the old design (synchronous=NORMAL and =FULL), same workload.
//! (b) Publish → remote consumer latency across 5 real agents on loopback.
//! (c) Resident memory of an idle agent in that mesh.
//! (d) Local API durable publish throughput on one agent with no peers (a
//!     fresh one per cell), driven by `wrk` (on PATH; else the in-process
//!     reqwest loop, and the table says so): one
//!     client, 8 clients, and batches of 100 (`POST /v1/events/batch`), each
//!     a 1 s warm-up then RIFTMESH_BENCH_API_SECS timed; every answer must be
//!     a 200 that made new events (checked in the agent's counters) or the
//!     cell fails and so does the bench. Beside each cell, cell by cell, Redis
//!     streams with the append-only file fsynced at every write
//!     (`redis-server --appendonly yes --appendfsync always`, started by the
//!     bench on a loopback port, driven by `redis-benchmark` XADD: 1 client, 8
//!     clients, 1 client pipelining 100); its rows say "skipped" when
//!     redis-server is not installed. Targets: API 1 client >= Redis 1
//!     client, 8 clients >= Redis 8 clients, batches of 100 >= 5x (goal 10x)
//!     the SQLite FULL 1-publisher rate of (a).
//!
//! Prints two plain-text tables and writes a JSON copy to target/bench-queue.json
//! (RIFTMESH_BENCH_RESULTS moves it).
//! Environment: RIFTMESH_BENCH_EVENTS (events per throughput measurement,
//! default 20000), RIFTMESH_BENCH_MAX_SECS (time cap per throughput
//! measurement, default 15; a measurement that hits it reports the events it
//! completed in that time), RIFTMESH_BENCH_AGENTS (agents in the mesh of (b),
//! default 5), RIFTMESH_BENCH_LATENCY_EVENTS (events timed in (b), default
//! 500), RIFTMESH_BENCH_API_SECS (timed whole seconds per (d) cell, default 5,
//! at most the time cap; 0 skips (d)), RIFTMESH_BENCH_API_DRIVER=reqwest (the
//! in-process client instead of wrk; on a lone agent it gave the same rates
//! within the noise, proto-notes/store.md),
//! RIFTMESH_BENCH_PACE_MS (time between two publishes of (b), default 5),
//! RIFTMESH_BENCH_QUEUE_DIR (where the stores, SQLite files, Redis files and
//! the floors' sled live, default target/; on a tmpfs such as /dev/shm,
//! where fdatasync returns at once, every figure is without the disk, and
//! the report says so; everything stays there until the bench ends),
//! RIFTMESH_BENCH_ONLY=mesh (only (b), (c) and (d)), RIFTMESH_BENCH_RESULTS
//! (directory of the JSON copy).

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
const DEFAULT_PACE_MS: u64 = 5;
const DEFAULT_API_SECS: u64 = 5;
const API_WARMUP_SECS: u64 = 1;
const WARMUP_EVENTS: usize = 20;

// ---------------------------------------------------------------- workload

/// The same event body for both queues (`common::event_payload`).
fn payload(i: u64) -> Value {
    common::event_payload(i)
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
    /// Time between two publishes of (b), ms.
    pace_ms: u64,
    /// Timed seconds of each (d) cell, after a warm-up of
    /// [`API_WARMUP_SECS`]; 0 skips (d).
    api_secs: u64,
    /// Every temporary directory is removed at the end of the run.
    keep: Mutex<Vec<TempDir>>,
}

impl Env {
    fn tempdir(&self, prefix: &str) -> PathBuf {
        let d = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.root)
            .expect("tempdir in the bench's data directory");
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
    // A mesh of many agents on two CPUs forms more slowly.
    let form_secs = 60 + agents_n as u64;
    let deadline = Instant::now() + Duration::from_secs(form_secs);
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
            "mesh not formed within {form_secs} s (peers/subscribed per agent: {seen:?})"
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
    let mut tick = tokio::time::interval(Duration::from_millis(env.pace_ms));
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
    drop(agents);
    Ok(MeshResult {
        connect_secs,
        latencies,
        delivered,
        expected: latency_events * (agents_n - 1),
        publish_ms,
        rss_mb,
    })
}

// ---------------------------------------------------------------- (d) local API, lone agent

/// The (d) cells: name, concurrent clients, events per request.
const API_CELLS: [(&str, u64, u64); 3] = [
    ("1 client", 1, 1),
    ("8 clients", PUBLISHERS, 1),
    ("batches of 100", 1, BATCH),
];
const API_EVENT_TYPE: &str = "BENCH_API";

/// The wrk script of (d). Arguments after `--`: a run tag, events per
/// request (1: `POST /v1/events`, more: `POST /v1/events/batch`), the event
/// type. Every event has a distinct payload: the tag, the wrk thread's number
/// (`setup` gives each thread its own, as each has its own Lua state) and a
/// counter. `done` prints wrk's own counts as one JSON line.
const WRK_SCRIPT: &str = r#"local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end
function init(args)
  run, batch, evtype = args[1], tonumber(args[2]), args[3]
  counter = 0
  path = (batch == 1) and "/v1/events" or "/v1/events/batch"
  headers = {["Content-Type"] = "application/json"}
end
local function event()
  counter = counter + 1
  return string.format('{"type":"%s","payload":{"job":"selfplay/hex8_2p","host":"gpu-node-0007","games":256,"model":"hex8_2p-v00042","batch":"%s-%d-%d","i":%d}}', evtype, run, tid, counter, counter)
end
function request()
  if batch == 1 then
    return wrk.format("POST", path, headers, event())
  end
  local parts = {}
  for k = 1, batch do parts[k] = event() end
  return wrk.format("POST", path, headers, '{"events":[' .. table.concat(parts, ",") .. ']}')
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_SUMMARY {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

/// An executable named `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What drives the (d) cells.
enum Driver {
    /// wrk, and the script written for it.
    Wrk { bin: PathBuf, script: PathBuf },
    /// The in-process reqwest loop; the reason wrk is not used.
    Reqwest(String),
}

impl Driver {
    fn pick(env: &Env) -> Driver {
        if std::env::var("RIFTMESH_BENCH_API_DRIVER").as_deref() == Ok("reqwest") {
            return Driver::Reqwest("RIFTMESH_BENCH_API_DRIVER=reqwest".into());
        }
        let Some(bin) = which("wrk") else {
            return Driver::Reqwest("wrk not on PATH (apt-get install wrk)".into());
        };
        let script = env.tempdir("wrk-").join("publish.lua");
        std::fs::write(&script, WRK_SCRIPT).expect("write the wrk script");
        Driver::Wrk { bin, script }
    }

    fn label(&self) -> String {
        match self {
            Driver::Wrk { .. } => "wrk".into(),
            Driver::Reqwest(why) => format!("reqwest in the bench process ({why})"),
        }
    }
}

/// One timed drive of the API: answered requests and client-side figures.
#[derive(Clone, Copy, Debug, Default)]
struct Drive {
    requests: u64,
    secs: f64,
    /// Answers that were not 2xx.
    status_errors: u64,
    /// Connect, read, write errors and timeouts.
    socket_errors: u64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Drive {
    fn json(&self) -> Value {
        json!({
            "requests": self.requests, "secs": self.secs, "status_errors": self.status_errors,
            "socket_errors": self.socket_errors, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
        })
    }
}

/// Run a load tool with no input, killed if it has not ended within
/// `limit`; its standard output, or an error with both outputs if it failed.
async fn run_bounded(
    mut cmd: tokio::process::Command,
    limit: Duration,
    what: &str,
) -> anyhow::Result<String> {
    use anyhow::Context;
    let out = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, out)
        .await
        .with_context(|| format!("{what} did not end"))??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{what} failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

async fn wrk_drive(
    bin: &Path,
    script: &Path,
    api: &str,
    clients: u64,
    batch: u64,
    tag: &str,
    secs: u64,
) -> anyhow::Result<Drive> {
    use anyhow::Context;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["-t1", &format!("-c{clients}"), &format!("-d{secs}s")])
        .args(["--timeout", "30s", "-s"])
        .arg(script)
        .arg(format!("http://{api}"))
        .args(["--", tag, &batch.to_string(), API_EVENT_TYPE]);
    let text = run_bounded(cmd, Duration::from_secs(secs + 60), "wrk").await?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("WRK_SUMMARY "))
        .with_context(|| format!("no summary in wrk's output:\n{text}"))?;
    let v: Value = serde_json::from_str(line).context("wrk summary")?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Drive {
        requests: n("requests"),
        secs: n("duration_us") as f64 / 1e6,
        status_errors: n("status_errors"),
        socket_errors: n("socket_errors"),
        p50_ms: n("p50_us") as f64 / 1e3,
        p99_ms: n("p99_us") as f64 / 1e3,
    })
}

/// The fallback: `clients` tasks of this process posting until the time is
/// up, each awaiting its answer (the same events as the wrk script).
async fn reqwest_drive(
    client: &reqwest::Client,
    api: &str,
    clients: u64,
    batch: u64,
    tag: &str,
    secs: u64,
) -> anyhow::Result<Drive> {
    let url = if batch == 1 {
        format!("http://{api}/v1/events")
    } else {
        format!("http://{api}/v1/events/batch")
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, url, tag) = (client.clone(), url.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let mut ms = Vec::new();
            let mut i = 0u64;
            let mut event = || {
                i += 1;
                json!({ "type": API_EVENT_TYPE, "payload": {
                    "job": "selfplay/hex8_2p", "host": "gpu-node-0007", "games": 256,
                    "model": "hex8_2p-v00042", "batch": format!("{tag}-{c}-{i}"), "i": i,
                }})
            };
            while Instant::now() < deadline {
                let body = if batch == 1 {
                    event()
                } else {
                    json!({ "events": (0..batch).map(|_| event()).collect::<Vec<_>>() })
                };
                let t = Instant::now();
                http_json(client.post(&url).json(&body)).await?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(ms)
        }));
    }
    let mut ms = Vec::new();
    for t in tasks {
        ms.extend(t.await??);
    }
    let secs = t0.elapsed().as_secs_f64();
    ms.sort_by(f64::total_cmp);
    Ok(Drive {
        requests: ms.len() as u64,
        secs,
        p50_ms: percentile(&ms, 50.0),
        p99_ms: percentile(&ms, 99.0),
        ..Drive::default()
    })
}

/// What the agent counted: local publishes accepted as new events
/// (`riftmesh_events_published_total`), publishes answered `duplicate`
/// (`riftmesh_events_duplicate_total`), and the events in its store.
#[derive(Clone, Copy, Debug)]
struct Counts {
    published: u64,
    duplicates: u64,
    stored: u64,
    /// `riftmesh_store_commit_seconds` by step (stage, apply, sync): sum of
    /// seconds and number of group commits.
    steps: [(f64, f64); 3],
}

const STEPS: [&str; 3] = ["prepare", "apply", "sync"];
/// Index of the `sync` step in [`STEPS`]: one observation per group applied.
const SYNC: usize = 2;

async fn agent_counts(
    client: &reqwest::Client,
    api: &str,
    metrics: &str,
) -> anyhow::Result<Counts> {
    use anyhow::Context;
    let text = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    anyhow::ensure!(
        text.contains("riftmesh_events_published_total"),
        "no riftmesh_events_published_total in the agent's metrics"
    );
    let status = http_json(client.get(format!("http://{api}/v1/status"))).await?;
    Ok(Counts {
        published: common::metric(&text, "riftmesh_events_published_total", "") as u64,
        duplicates: common::metric(&text, "riftmesh_events_duplicate_total", "") as u64,
        stored: status["store"]["events"]
            .as_u64()
            .context("no store.events in /v1/status")?,
        steps: STEPS.map(|step| {
            let f = format!("step=\"{step}\"");
            (
                common::metric(&text, "riftmesh_store_commit_seconds_sum", &f),
                common::metric(&text, "riftmesh_store_commit_seconds_count", &f),
            )
        }),
    })
}

/// One (d) cell, measured.
struct ApiCell {
    tput: Tput,
    run: Drive,
    warmup: Drive,
    /// What the agent counted over warm-up and run.
    published: u64,
    stored: u64,
    /// Over the timed run only: group commits, new events, and the mean
    /// time per group of each commit step (prepare, apply, sync), µs.
    groups: u64,
    run_events: u64,
    step_us: [f64; 3],
}

impl ApiCell {
    fn json(&self, batch: u64, driver: &str) -> Value {
        json!({
            "events": self.tput.events, "secs": self.tput.secs, "events_per_sec": self.tput.rate(),
            "capped": false, "busy_errors": 0, "driver": driver, "events_per_request": batch,
            "run": self.run.json(), "warmup": self.warmup.json(),
            "agent_new_events": self.published, "agent_stored_events": self.stored,
            "answered_events": (self.run.requests + self.warmup.requests) * batch,
            "run_group_commits": self.groups,
            "run_new_events": self.run_events,
            "run_commit_step_mean_us": {
                "prepare": self.step_us[0], "apply": self.step_us[1], "sync": self.step_us[2],
            },
        })
    }
}

/// (d) cell `k` of [`API_CELLS`] on a fresh agent with no peers: a warm-up,
/// then `env.api_secs` timed. Fails unless every answer was a 200 that made
/// new events: no error, no `duplicate`, and the agent counted at least as
/// many new events as were answered (requests in flight when the driver
/// stopped may add a few; so may the agent's own HOST_ONLINE).
async fn api_cell(env: &Env, driver: &Driver, k: usize) -> anyhow::Result<ApiCell> {
    let (_, clients, batch) = API_CELLS[k];
    let bin = env!("CARGO_BIN_EXE_riftmesh");
    let root = env.tempdir("api-");
    keygen(bin, &root.join("swarm.key"))?;
    let mut agents = Agents {
        children: vec![spawn_agent(bin, &root, "solo", None)?],
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = common::wait_agent_info(
        &mut agents.children[0],
        &root,
        "solo",
        deadline,
        Duration::from_millis(20),
    )
    .await?;
    let s = |k: &str| info[k].as_str().unwrap_or_default().to_string();
    let (api, metrics) = (s("api"), s("metrics"));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let before = agent_counts(&client, &api, &metrics).await?;
    // Distinct tags per cell and phase: no payload repeats another.
    let tag = format!("{}-{k}", std::process::id());
    let drive = |phase: &'static str, secs: u64| {
        let (client, api, tag) = (client.clone(), api.clone(), format!("{tag}{phase}"));
        async move {
            match driver {
                Driver::Wrk { bin, script } => {
                    wrk_drive(bin, script, &api, clients, batch, &tag, secs).await
                }
                Driver::Reqwest(_) => {
                    reqwest_drive(&client, &api, clients, batch, &tag, secs).await
                }
            }
        }
    };
    let warmup = drive("w", API_WARMUP_SECS).await?;
    let mid = agent_counts(&client, &api, &metrics).await?;
    let run = drive("r", env.api_secs).await?;
    let after = agent_counts(&client, &api, &metrics).await?;
    drop(agents);

    let answered = (warmup.requests + run.requests) * batch;
    let published = after.published - before.published;
    let stored = after.stored - before.stored;
    let duplicates = after.duplicates - before.duplicates;
    let (status, socket) = (
        warmup.status_errors + run.status_errors,
        warmup.socket_errors + run.socket_errors,
    );
    anyhow::ensure!(
        status == 0 && socket == 0,
        "{status} answers were not 2xx and {socket} requests failed at the socket"
    );
    anyhow::ensure!(
        duplicates == 0,
        "{duplicates} events were answered `duplicate`: not every request made new events"
    );
    anyhow::ensure!(
        published >= answered && stored >= answered,
        "{answered} events answered, but the agent counted {published} new events and its store \
         grew by {stored}"
    );
    anyhow::ensure!(run.requests > 0, "no request answered");
    // The commit steps over the timed run only, as its rate and latency.
    let groups = after.steps[SYNC].1 - mid.steps[SYNC].1;
    anyhow::ensure!(
        groups > 0.0,
        "no riftmesh_store_commit_seconds observation during the run"
    );
    let step_us = std::array::from_fn(|i| {
        let n = after.steps[i].1 - mid.steps[i].1;
        (after.steps[i].0 - mid.steps[i].0) / n.max(1.0) * 1e6
    });
    Ok(ApiCell {
        groups: groups as u64,
        run_events: after.published - mid.published,
        step_us,
        tput: Tput {
            events: run.requests * batch,
            secs: run.secs,
            capped: false,
            busy: 0,
        },
        run,
        warmup,
        published,
        stored,
    })
}

// ---------------------------------------------------------------- (d) Redis streams

/// The Redis cells beside the (d) cells: XADD from 1 client, 8 clients, and
/// 1 client pipelining 100 XADDs per round trip.
const REDIS_PIPELINE: u64 = 100;

/// A child process killed when dropped.
struct Killed(tokio::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// One command over RESP; the answer's lines joined by newlines (a simple
/// string, an integer, a bulk string, or an array of bulk strings).
async fn resp(port: u16, args: &[&str]) -> anyhow::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).await?;
    let mut r = tokio::io::BufReader::new(s);
    let read = async {
        let mut lines = Vec::new();
        let mut want = 1;
        while lines.len() < want {
            let mut line = String::new();
            anyhow::ensure!(r.read_line(&mut line).await? > 0, "connection closed");
            let line = line.trim_end().to_string();
            if lines.is_empty() {
                if let Some(n) = line.strip_prefix('*') {
                    want += 2 * n.parse::<usize>().unwrap_or(0);
                } else if line.starts_with('$') && line != "$-1" {
                    want += 1;
                }
            }
            lines.push(line);
        }
        anyhow::Ok(lines.join("\n"))
    };
    tokio::time::timeout(Duration::from_secs(10), read).await?
}

struct RedisCell {
    tput: Tput,
    /// XADDs of the warm-up run (its rate sized the timed run).
    warmup: u64,
    p50_ms: f64,
    p99_ms: f64,
    version: String,
}

impl RedisCell {
    fn json(&self, clients: u64, pipeline: u64) -> Value {
        json!({
            "events": self.tput.events, "secs": self.tput.secs, "events_per_sec": self.tput.rate(),
            "clients": clients, "pipeline": pipeline, "warmup_xadds": self.warmup,
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "version": self.version,
        })
    }
}

/// `redis-benchmark ... --csv XADD ...`: requests/s, p50 and p99 (ms).
async fn redis_benchmark(
    bin: &Path,
    port: u16,
    clients: u64,
    pipeline: u64,
    n: u64,
    limit: Duration,
) -> anyhow::Result<(f64, f64, f64)> {
    use anyhow::Context;
    // The store's payload text with a random 12-digit number in its
    // "batch" field (redis-benchmark's -r).
    let payload = event::canonical_json(&payload(0)).replace("b-0000000000", "b-__rand_int__");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &clients.to_string(), "-n", &n.to_string()])
        .args(["-P", &pipeline.to_string(), "-r", "1000000000000", "--csv"])
        .args([
            "XADD", "bench", "*", "type", EVENT_TYPE, "payload", &payload,
        ]);
    // It retries a refused connection forever: bounded here.
    let text = run_bounded(cmd, limit, "redis-benchmark").await?;
    // "test","rps","avg","min","p50","p95","p99","max": the test name (the
    // command, commas and all) first, so the numbers are counted from the end.
    let nums = text
        .lines()
        .filter_map(|l| {
            let f: Vec<f64> = l
                .rsplit(',')
                .take(7)
                .map_while(|x| x.trim_matches('"').parse().ok())
                .collect();
            (f.len() == 7).then_some(f)
        })
        .next()
        .with_context(|| format!("no figures in redis-benchmark's output:\n{text}"))?;
    // Reversed: max, p99, p95, p50, min, avg, rps.
    Ok((nums[6], nums[3], nums[1]))
}

/// Redis cell `k` (1 client, 8 clients, 1 client pipelining 100) against a
/// fresh `redis-server` on a free loopback port with an append-only file
/// fsynced before every answer. Ok(Err(why)) when Redis is not installed.
async fn redis_cell(env: &Env, k: usize) -> anyhow::Result<Result<RedisCell, String>> {
    use anyhow::Context;
    let (Some(server), Some(bench)) = (which("redis-server"), which("redis-benchmark")) else {
        return Ok(Err(if which("redis-server").is_none() {
            "skipped: redis-server not installed (apt-get install redis-server)".into()
        } else {
            "skipped: redis-benchmark not installed (apt-get install redis-tools)".into()
        }));
    };
    let (clients, pipeline) = [(1, 1), (PUBLISHERS, 1), (1, REDIS_PIPELINE)][k];
    let version = std::process::Command::new(&server)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let t = String::from_utf8_lossy(&o.stdout).to_string();
            Some(
                t.split_whitespace()
                    .find_map(|w| w.strip_prefix("v="))?
                    .to_string(),
            )
        })
        .unwrap_or_else(|| "?".into());
    let dir = env.tempdir("redis-");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = dir.join("redis.log");
    let mut child = Killed(
        tokio::process::Command::new(&server)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--daemonize", "no"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start redis-server")?,
    );
    let tail = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while resp(port, &["PING"]).await.ok().as_deref() != Some("+PONG") {
        if let Some(st) = child.0.try_wait()? {
            anyhow::bail!("redis-server exited ({st}):\n{}", tail());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "redis-server not answering PING on port {port} after 10 s:\n{}",
            tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (key, want) in [("appendonly", "yes"), ("appendfsync", "always")] {
        let got = resp(port, &["CONFIG", "GET", key]).await?;
        anyhow::ensure!(
            got.ends_with(&format!("\n{want}")),
            "redis-server's {key} is not {want}: {got:?}"
        );
    }
    let limit = Duration::from_secs(env.api_secs * 4 + 60);
    // Warm-up, sized to take about a second, then the timed run sized from
    // its rate to take about env.api_secs. Whole rounds of every client's
    // pipeline.
    let round = clients * pipeline;
    let warmup = (if pipeline > 1 { 20_000 } else { 500 * clients }).div_ceil(round) * round;
    let (rate, _, _) = redis_benchmark(&bench, port, clients, pipeline, warmup, limit).await?;
    let n = ((rate * env.api_secs as f64) as u64).div_ceil(round).max(1) * round;
    let (rps, p50, p99) = redis_benchmark(&bench, port, clients, pipeline, n, limit).await?;
    let len = resp(port, &["XLEN", "bench"]).await?;
    anyhow::ensure!(
        len == format!(":{}", warmup + n),
        "the stream holds {len} entries after {} XADDs",
        warmup + n
    );
    drop(child);
    // redis-benchmark's own rate (its clock, as wrk's for riftmesh).
    Ok(Ok(RedisCell {
        tput: Tput {
            events: n,
            secs: n as f64 / rps,
            capped: false,
            busy: 0,
        },
        warmup,
        p50_ms: p50,
        p99_ms: p99,
        version,
    }))
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
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.riftmesh.clone(),
                r.normal.clone(),
                r.full.clone(),
                r.ratio_normal.clone(),
                r.ratio_full.clone(),
                r.target.clone(),
                r.result.clone(),
            ]
        })
        .collect();
    print_grid(&headers, &cells, &[0, 6, 7]);
}

const REDIS_KINDS: [&str; 3] = ["1 client", "8 clients", "1 client, pipelined 100"];

/// A (d) cell and its Redis counterpart, or why each has no figure.
type ApiPair = (Result<ApiCell, String>, Result<RedisCell, String>);

/// A row of the (d) table.
struct ApiRow {
    name: String,
    cells: Vec<String>,
    json: Value,
}

const API_HEADERS: [&str; 8] = [
    "measurement",
    "riftmesh API",
    "store direct (a)",
    "compared with (same run)",
    "its rate",
    "rm/it",
    "target",
    "result",
];

/// The (d) rows: each API cell beside its Redis counterpart (1 and 8
/// clients), the batch cell against SQLite FULL's single-publish rate of (a)
/// (the issue's target) and beside Redis pipelining 100.
fn api_rows(
    api: &[ApiPair],
    driver: &str,
    rm: &[Tput],
    normal: &[Tput],
    full: &[Tput],
) -> Vec<ApiRow> {
    let dash = || "-".to_string();
    let mut rows = Vec::new();
    for (k, (a, r)) in api.iter().enumerate() {
        let (kind, clients, batch) = API_CELLS[k];
        let direct = rm.get(k);
        let rm_cell = match a {
            Ok(c) => rate_cell(&c.tput),
            Err(_) => "FAILED".into(),
        };
        let rm_json = match a {
            Ok(c) => c.json(batch, driver),
            Err(e) => json!({ "error": e, "driver": driver }),
        };
        let redis_json = match r {
            Ok(c) => c.json([1, PUBLISHERS, 1][k], [1, 1, REDIS_PIPELINE][k]),
            Err(e) => json!({ "skipped": e }),
        };
        // The comparison: Redis for 1 and 8 clients, SQLite FULL 1 publisher
        // for batches; a missing one leaves the target unjudged.
        let cmp: Result<(String, &Tput), String> = if k < 2 {
            r.as_ref()
                .map(|c| (format!("Redis XADD, {}", REDIS_KINDS[k]), &c.tput))
                .map_err(|e| e.clone())
        } else {
            full.first()
                .map(|t| ("SQLite FULL, 1 publisher (a)".to_string(), t))
                .ok_or_else(|| "SQLite FULL, 1 publisher: (a) not run".to_string())
        };
        let ratio_v = match (a, &cmp) {
            (Ok(c), Ok((_, t))) => Some(ratio(&c.tput, t)),
            _ => None,
        };
        let (target, result, met, goal) = match k {
            0 | 1 => {
                let met = ratio_v.map(|x| x >= 1.0);
                (format!("rm >= Redis, {kind}"), met.map(verdict), met, None)
            }
            _ => {
                let (met, goal) = (ratio_v.map(|x| x >= 5.0), ratio_v.map(|x| x >= 10.0));
                let result = match (met, goal) {
                    (Some(true), Some(true)) => "met (goal 10x met)".into(),
                    (Some(true), _) => "met (goal 10x missed)".into(),
                    (Some(false), _) => "missed".into(),
                    _ => dash(),
                };
                (
                    "rm >= 5x SQLite FULL 1 pub; goal 10x".into(),
                    Some(result),
                    met,
                    goal,
                )
            }
        };
        let result = if a.is_err() {
            "FAILED".into()
        } else {
            result.unwrap_or_else(dash)
        };
        let (cmp_name, cmp_rate) = match &cmp {
            Ok((name, t)) => (name.clone(), rate_cell(t)),
            Err(e) if k < 2 => (
                format!("Redis XADD, {}: {}", REDIS_KINDS[k], short(e)),
                dash(),
            ),
            Err(e) => (e.clone(), dash()),
        };
        let name = format!("(d) API publish, {kind}, events/s");
        rows.push(ApiRow {
            name: name.clone(),
            cells: vec![
                name,
                rm_cell.clone(),
                direct.map(rate_cell).unwrap_or_else(dash),
                cmp_name.clone(),
                cmp_rate,
                ratio_v.map(|x| format!("{x:.2}x")).unwrap_or_else(dash),
                target.clone(),
                result,
            ],
            json: json!({
                "riftmesh": rm_json,
                "clients": clients,
                "events_per_request": batch,
                "store_direct": direct.map(Tput::json),
                "sqlite_normal": normal.get(k).map(Tput::json),
                "sqlite_full": full.get(k).map(Tput::json),
                "redis": redis_json,
                "compared_with": cmp_name,
                "ratio": ratio_v,
                "target": target,
                "met": met,
                "goal_met": goal,
            }),
        });
        if k == 2 {
            // Context, no target: one round trip of 100 XADDs, one fsync of
            // the append-only file (a pass of Redis's event loop), the
            // counterpart of one HTTP batch and its one durable commit.
            let ratio_p = match (a, r) {
                (Ok(c), Ok(p)) => Some(ratio(&c.tput, &p.tput)),
                _ => None,
            };
            let name = "(d) API batches of 100 vs Redis pipelined".to_string();
            rows.push(ApiRow {
                name: name.clone(),
                cells: vec![
                    name,
                    rm_cell,
                    direct.map(rate_cell).unwrap_or_else(dash),
                    match r {
                        Ok(_) => format!("Redis XADD, {}", REDIS_KINDS[k]),
                        Err(e) => format!("Redis XADD, {}: {}", REDIS_KINDS[k], short(e)),
                    },
                    r.as_ref().map_or_else(|_| dash(), |p| rate_cell(&p.tput)),
                    ratio_p.map(|x| format!("{x:.2}x")).unwrap_or_else(dash),
                    dash(),
                    dash(),
                ],
                json: json!({ "riftmesh": rm_json, "redis": redis_json, "ratio": ratio_p }),
            });
        }
    }
    rows
}

/// "skipped" or "failed", the first word of a Redis cell's reason.
fn short(why: &str) -> &str {
    why.split(':').next().unwrap_or(why)
}

/// `/proc/loadavg`: the 1, 5 and 15 minute load averages.
fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN));
    [(); 3].map(|_| v.next().unwrap_or(f64::NAN))
}

/// A plain-text table: columns padded to their widest cell, the columns in
/// `left` aligned left, the others right.
fn print_grid(headers: &[&str], cells: &[Vec<String>], left: &[usize]) {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for c in cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[&str]| {
        let mut out = String::new();
        for (k, s) in c.iter().enumerate() {
            let pad = " ".repeat(width[k] - s.chars().count());
            if left.contains(&k) {
                out.push_str(s);
                out.push_str(&pad);
            } else {
                out.push_str(&pad);
                out.push_str(s);
            }
            if k + 1 < c.len() {
                out.push_str("  ");
            }
        }
        out.trim_end().to_string()
    };
    let rule = "-".repeat(width.iter().sum::<usize>() + 2 * (width.len() - 1));
    println!("{}", line(headers));
    println!("{rule}");
    for c in cells {
        println!(
            "{}",
            line(&c.iter().map(String::as_str).collect::<Vec<_>>())
        );
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
    let pace_ms = num("RIFTMESH_BENCH_PACE_MS", DEFAULT_PACE_MS).max(1);
    // Whole seconds (wrk's -d), within the time cap.
    let api_secs = num("RIFTMESH_BENCH_API_SECS", DEFAULT_API_SECS).min((cap_secs as u64).max(1));
    let only_mesh = std::env::var("RIFTMESH_BENCH_ONLY").as_deref() == Ok("mesh");
    // Where the stores live (target/ by default). On a tmpfs (/dev/shm)
    // fdatasync returns at once: the same run there and on the disk tells
    // the disk's share of a figure.
    let root = std::env::var_os("RIFTMESH_BENCH_QUEUE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&root).expect("the bench's data directory");
    let env = Env {
        root: root.clone(),
        n,
        cap: Duration::from_secs_f64(cap_secs),
        agents,
        latency_events,
        pace_ms,
        api_secs,
        keep: Mutex::new(Vec::new()),
    };
    let payload_bytes = event::canonical_json(&payload(n / 2)).len();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    let load_start = loadavg();

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

    // (d) Cell by cell, the riftmesh API then its Redis counterpart, so
    // whatever else the machine is doing weighs on both alike.
    let driver = (env.api_secs > 0).then(|| Driver::pick(&env));
    let mut api = Vec::new();
    if let Some(driver) = &driver {
        eprintln!(
            "(d) local API publish on one agent with no peers, {}, {API_WARMUP_SECS} s warm-up + {} s per cell; Redis beside it",
            driver.label(),
            env.api_secs
        );
        for (k, (kind, _, _)) in API_CELLS.iter().enumerate() {
            eprintln!("    riftmesh API, {kind} ...");
            let a = rt
                .block_on(api_cell(&env, driver, k))
                .map_err(|e| format!("{e:#}"));
            if let Err(e) = &a {
                eprintln!("    FAILED: {e}");
            }
            eprintln!("    redis XADD, {} ...", REDIS_KINDS[k]);
            let r = match rt.block_on(redis_cell(&env, k)) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("    FAILED: {e:#}");
                    Err(format!("failed: {e:#}"))
                }
            };
            api.push((a, r));
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
            let mut pub_sorted = m.publish_ms.clone();
            pub_sorted.sort_by(|a, b| a.total_cmp(b));
            mesh_json = json!({
                "publish_request_ms": {
                    "p50": percentile(&pub_sorted, 50.0),
                    "p99": percentile(&pub_sorted, 99.0),
                    "max": pub_sorted.last().copied().unwrap_or(f64::NAN),
                },
                "agents": agents, "events": latency_events, "pace_ms": env.pace_ms,
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
        let (sign_us, commit_us) = floors(&env.root);
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
         time cap {cap_secs} s per cell; {agents} agents, {latency_events} events paced {} ms",
        env.pace_ms
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
    let label = driver.as_ref().map(Driver::label).unwrap_or_default();
    let api_table = api_rows(&api, &label, &rm, &normal, &full);
    if !api_table.is_empty() {
        println!();
        println!(
            "(d) local API durable publish vs Redis streams, events/s, measured cell by cell in this run"
        );
        let cells: Vec<Vec<String>> = api_table.iter().map(|r| r.cells.clone()).collect();
        print_grid(&API_HEADERS, &cells, &[0, 3, 6, 7]);
        println!(
            "riftmesh API: one agent with no peers (a fresh one per cell), HTTP/1.1 keep-alive on \
             loopback, each answer after the durable append (flush + fdatasync); driven by {label}, \
             {API_WARMUP_SECS} s warm-up then {} s timed{}; every event has a distinct payload. Checked \
             per cell: every answer 2xx, none `duplicate`, and the agent counted at least as many \
             new events as were answered.",
            env.api_secs,
            if matches!(driver, Some(Driver::Wrk { .. })) {
                " (wrk -t1 -cCLIENTS, Lua script in benches/queue.rs)"
            } else {
                ""
            }
        );
        let version = api
            .iter()
            .find_map(|(_, r)| r.as_ref().ok().map(|c| c.version.clone()));
        match version {
            Some(version) => println!(
                "Redis {version}: redis-server on a loopback port, --appendonly yes --appendfsync always \
                 --save '' (the append-only file is fsynced before the answers of each event-loop pass), \
                 a fresh one per cell, driven by redis-benchmark (one thread, as wrk -t1): XADD of the \
                 same payload text with a random 12-digit number, about {} s after a ~1 s warm-up, \
                 XLEN checked. 'pipelined 100': 100 XADDs per round trip, so one fsync per 100, as one \
                 HTTP batch is one durable commit. Redis does not sign, hash or deduplicate events.",
                env.api_secs
            ),
            None => {
                if let Some(Err(e)) = api.first().map(|(_, r)| r) {
                    println!("Redis: {e}");
                }
            }
        }
        println!(
            "store direct (a): the store's own rate for the same shape in (a) (1 publisher, 8 \
             publishers, batches of 100), no HTTP."
        );
        for ((kind, clients, _), (a, _)) in API_CELLS.iter().zip(&api) {
            if let Ok(c) = a {
                // Mean time a request is open: clients over requests per second.
                let mean_us = *clients as f64 * c.run.secs / c.run.requests.max(1) as f64 * 1e6;
                println!(
                    "(d) {kind}, timed run: request mean {mean_us:.0} us (p50 {:.0} us); {:.1} \
                     events per group commit; a group's commit steps, mean: prepare {:.0} us, \
                     apply {:.0} us, sync {:.0} us (riftmesh_store_commit_seconds)",
                    c.run.p50_ms * 1e3,
                    c.run_events as f64 / c.groups as f64,
                    c.step_us[0],
                    c.step_us[1],
                    c.step_us[2]
                );
            }
        }
        for ((kind, _, _), (a, r)) in API_CELLS.iter().zip(&api) {
            if let Err(e) = a {
                println!("(d) riftmesh API, {kind}: FAILED: {e}");
            }
            match r {
                Err(e) if e.starts_with("failed") => println!("(d) redis, {kind}: {e}"),
                _ => {}
            }
        }
    }
    let load_end = loadavg();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "load average 1/5/15 min: {:.2} {:.2} {:.2} at start, {:.2} {:.2} {:.2} at end, {cpus} CPUs",
        load_start[0], load_start[1], load_start[2], load_end[0], load_end[1], load_end[2]
    );
    // With every CPU busy, a thread woken by a finished fsync can wait for
    // the next scheduler tick: one-thread fsync loops (SQLite FULL 1
    // publisher, Redis 1 client) fall to a few hundred per second, the
    // agent's threads less so, and the (d) verdicts flip. Runs started at
    // load 0.96 and 1.17 on 2 CPUs were not affected (SQLite FULL 9,721 and
    // 9,027/s), runs at 3.7 and 3.8 were (265 and 274/s).
    let loaded = load_start[0] >= cpus.max(1) as f64;
    if loaded {
        println!(
            "LOADED MACHINE: load {:.2} at start on {cpus} CPUs; the fsync-bound cells are then bound \
             by CPU wake-up latency, not the disk: do not judge the targets from this run \
             (proto-notes/store.md, \"Where an API publish's time goes\").",
            load_start[0]
        );
    }
    let tmpfs = on_tmpfs(&root);
    println!(
        "stores, SQLite and Redis files in {}{}",
        root.display(),
        if tmpfs {
            " (a tmpfs: fdatasync returns at once, so no figure here includes the disk and \
             the durable rows are not durable; compare with a run on the disk)"
        } else {
            ""
        }
    );
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());

    let out = json!({
        "data_dir": root.display().to_string(),
        "data_dir_is_tmpfs": tmpfs,
        "events": n,
        "payload_bytes": payload_bytes,
        "time_cap_secs": cap_secs,
        "rows": rows
            .iter()
            .map(|r| json!({ "name": r.name, "data": r.json }))
            .chain(api_table.iter().map(|r| json!({ "name": r.name, "data": r.json })))
            .collect::<Vec<_>>(),
        "mesh": mesh_json,
        "api_secs": env.api_secs,
        "api_warmup_secs": API_WARMUP_SECS,
        "api_driver": label,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "cpus": cpus,
        "loaded_at_start": loaded,
        "total_secs": started.elapsed().as_secs_f64(),
    });
    let path = common::results_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-queue.json");
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(&root));
    match std::fs::write(
        &path,
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    ) {
        Ok(()) => println!("JSON copy: {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
    drop(rt);
    // A (d) cell whose events were not all new, or a Redis that is installed
    // but did not run, fails the bench.
    if api
        .iter()
        .any(|(a, r)| a.is_err() || r.as_ref().is_err_and(|e| e.starts_with("failed")))
    {
        eprintln!("a (d) cell failed: see the table");
        std::process::exit(1);
    }
}

/// Whether `p` is on a tmpfs (where fdatasync does not reach a disk).
fn on_tmpfs(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a writable statfs.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC }
}

/// Two floors under the durable publish rows: the Ed25519 signature every
/// local event carries, and one sled commit of a single small key (apply,
/// sled flush, fdatasync of its file) as the store does per group.
fn floors(root: &Path) -> (f64, f64) {
    let key = Keypair::generate_ed25519();
    let msg = vec![5u8; 400];
    let n = 5000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(key.sign(&msg).expect("sign"));
    }
    let sign_us = t.elapsed().as_secs_f64() / n as f64 * 1e6;

    let dir = tempfile::tempdir_in(root).expect("tempdir");
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
