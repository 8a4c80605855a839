//! Log-engine comparison for the event log (issue 26): `cargo bench --bench
//! logcmp --features bench-logcmp` (~1 minute; the engines compared are
//! optional dependencies, built only with that feature).
//!
//! Every engine makes the same records durable: real sealed event envelopes
//! (`Draft::seal`, the bytes the store keeps for a ~120-byte payload), each
//! commit ending in an fsync before it returns. Three shapes, each a fresh
//! directory on the same filesystem and RIFTMESH_BENCH_LOGCMP_SECS timed
//! seconds (default 3) after a short warm-up:
//! - `1 writer`: one record per commit, one commit at a time (a lone
//!   publisher; bounded by the device's fsync round trip);
//! - `8 writers`: eight threads, one record per commit each (the engine's
//!   group commit is what is measured);
//! - `batch 100`: one writer, 100 records per commit.
//!
//! Engines:
//! - `riftmesh store`: the agent's event store as it is (sled + indexes +
//!   dedup + signing in its writer thread + `Durable::commit`), fed drafts;
//!   the only row that also signs (~12 µs per event) and indexes.
//! - `segment file`: the floor of the planned design: one preallocated,
//!   pre-zeroed segment, records framed `len u32 | crc32 u32 | bytes`, one
//!   writer thread that takes every waiting commit, writes them with one
//!   `pwrite` and one `fdatasync`, then answers them all. Written here only to
//!   measure what the design can reach; not the agent's code.
//! - `okaywal 0.3`: its multi-threaded WAL (it groups concurrent commits into
//!   one fsync), segments of 64 MiB preallocated, a checkpointer that does
//!   nothing (the WAL alone is measured; in a design with it, sled would be
//!   written behind it and flushed at checkpoints).
//! - `raft-engine 0.4` (TiKV's): entries appended per region (one region per
//!   writer thread), `write(batch, sync = true)`, compression off (records
//!   are small and the other engines do not compress).
//!
//! Per cell: records/s, commit latency p50/p99, and bytes the block device
//! wrote per record during the cell (data, the filesystem's journal and
//! metadata: the engine's whole write amplification).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use riftmesh::event::Draft;
use riftmesh::store::{Appended, Store, StoreConfig};
use serde_json::json;

const EVENT_TYPE: &str = "BENCH_LOGCMP";
const WRITERS: usize = 8;
const BATCH: usize = 100;
/// Distinct sealed records cycled through by the byte-level engines.
const POOL: usize = 4096;
const SEGMENT_BYTES: u64 = 128 << 20;

fn draft(i: u64) -> Draft {
    let payload = json!({
        "job": "selfplay/hex8_2p",
        "host": "gpu-node-0007",
        "games": 256,
        "model": "hex8_2p-v00042",
        "batch": format!("b-{i:010}"),
        "i": i,
    });
    Draft::new(EVENT_TYPE, &payload, None, None, None).expect("valid draft")
}

/// `POOL` real sealed envelopes, encoded as the store keeps them.
fn record_pool() -> Vec<Vec<u8>> {
    let key = Keypair::generate_ed25519();
    (0..POOL as u64)
        .map(|i| {
            let ev = draft(i)
                .seal(&key, i + 1, 1_796_000_000_000 + i)
                .expect("seal");
            riftmesh::codec::encode(&ev).expect("encode")
        })
        .collect()
}

/// One engine: make `n` records durable in one commit; `writer` is the
/// calling thread's number, `first` the writer's running record counter.
trait Log: Send + Sync {
    fn commit(&self, writer: usize, first: u64, n: usize) -> anyhow::Result<()>;
    /// Finish background work before the next cell.
    fn close(&self) {}
}

// ------------------------------------------------------------ riftmesh store

struct RmStore {
    /// Taken by `close` (which wants the last handle).
    store: Mutex<Option<Store>>,
    rt: tokio::runtime::Handle,
}

impl Log for RmStore {
    fn commit(&self, writer: usize, first: u64, n: usize) -> anyhow::Result<()> {
        // Distinct content per writer and counter (the store deduplicates).
        let base = (writer as u64) << 40 | first;
        let drafts = (0..n as u64).map(|k| draft(base + k)).collect();
        let store = self.store.lock().unwrap().clone().expect("store open");
        let out = self.rt.block_on(store.append_local(drafts))?;
        if out.iter().any(|a| matches!(a, Appended::Duplicate { .. })) {
            anyhow::bail!("a record was deduplicated: the workload must be distinct");
        }
        Ok(())
    }
    fn close(&self) {
        if let Some(store) = self.store.lock().unwrap().take() {
            store.close();
        }
    }
}

// ------------------------------------------------------------ segment file

type Reply = mpsc::SyncSender<std::io::Result<()>>;

struct Segment {
    tx: Mutex<mpsc::Sender<(Vec<u8>, Reply)>>,
    pool: Arc<Vec<Vec<u8>>>,
}

impl Segment {
    fn open(dir: &Path, pool: Arc<Vec<Vec<u8>>>) -> anyhow::Result<Segment> {
        let path = dir.join("seg-000001");
        let mut f = File::create(&path)?;
        // Pre-zeroed: writing into allocated, written blocks changes no file
        // metadata, so fdatasync is one data flush (fallocate would leave
        // unwritten extents whose conversion is journalled at each sync).
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(SEGMENT_BYTES >> 20) {
            f.write_all(&zeros)?;
        }
        f.sync_all()?;
        File::open(dir)?.sync_all()?;
        let (tx, rx) = mpsc::channel::<(Vec<u8>, Reply)>();
        std::thread::Builder::new()
            .name("logcmp-segment".into())
            .spawn(move || {
                let mut off = 0u64;
                let mut buf = Vec::with_capacity(1 << 20);
                let mut replies = Vec::new();
                while let Ok(first) = rx.recv() {
                    buf.clear();
                    replies.clear();
                    buf.extend_from_slice(&first.0);
                    replies.push(first.1);
                    while let Ok((b, r)) = rx.try_recv() {
                        buf.extend_from_slice(&b);
                        replies.push(r);
                    }
                    if off + buf.len() as u64 > SEGMENT_BYTES {
                        // The next segment would be a recycled, pre-zeroed one:
                        // the same cost as wrapping this one.
                        off = 0;
                    }
                    let res = f.write_all_at(&buf, off).and_then(|_| f.sync_data());
                    off += buf.len() as u64;
                    for r in replies.drain(..) {
                        let _ = r.send(match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                        });
                    }
                }
            })?;
        Ok(Segment {
            tx: Mutex::new(tx),
            pool,
        })
    }
}

impl Log for Segment {
    fn commit(&self, writer: usize, first: u64, n: usize) -> anyhow::Result<()> {
        let mut framed = Vec::with_capacity(n * 400);
        for k in 0..n as u64 {
            let rec = &self.pool[((writer as u64 * 997 + first + k) as usize) % POOL];
            framed.extend_from_slice(&(rec.len() as u32).to_le_bytes());
            framed.extend_from_slice(&crc32fast::hash(rec).to_le_bytes());
            framed.extend_from_slice(rec);
        }
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.tx
            .lock()
            .unwrap()
            .send((framed, rtx))
            .map_err(|_| anyhow::anyhow!("segment writer gone"))?;
        rrx.recv()??;
        Ok(())
    }
}

// ------------------------------------------------------------ okaywal

#[derive(Debug)]
struct NoCheckpoint;

impl okaywal::LogManager for NoCheckpoint {
    fn recover(&mut self, _entry: &mut okaywal::Entry<'_>) -> std::io::Result<()> {
        Ok(())
    }
    fn checkpoint_to(
        &mut self,
        _last: okaywal::EntryId,
        _entries: &mut okaywal::SegmentReader,
        _wal: &okaywal::WriteAheadLog,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

struct OkayWal {
    wal: okaywal::WriteAheadLog,
    pool: Arc<Vec<Vec<u8>>>,
}

impl OkayWal {
    fn open(dir: &Path, pool: Arc<Vec<Vec<u8>>>) -> anyhow::Result<OkayWal> {
        let wal = okaywal::Configuration::default_for(dir)
            .preallocate_bytes(64 << 20)
            .checkpoint_after_bytes(48 << 20)
            .open(NoCheckpoint)?;
        Ok(OkayWal { wal, pool })
    }
}

impl Log for OkayWal {
    fn commit(&self, writer: usize, first: u64, n: usize) -> anyhow::Result<()> {
        let mut entry = self.wal.begin_entry()?;
        for k in 0..n as u64 {
            entry.write_chunk(&self.pool[((writer as u64 * 997 + first + k) as usize) % POOL])?;
        }
        entry.commit()?;
        Ok(())
    }
}

// ------------------------------------------------------------ raft-engine

/// raft-engine's entries are protobuf messages; a `BytesValue` holding the
/// entry's index (8 bytes) then the record.
struct Rec;

impl raft_engine::MessageExt for Rec {
    type Entry = protobuf::well_known_types::BytesValue;
    fn index(e: &Self::Entry) -> u64 {
        u64::from_le_bytes(e.value[..8].try_into().expect("8-byte index"))
    }
}

struct RaftEngine {
    engine: raft_engine::Engine,
    pool: Arc<Vec<Vec<u8>>>,
}

impl RaftEngine {
    fn open(dir: &Path, pool: Arc<Vec<Vec<u8>>>) -> anyhow::Result<RaftEngine> {
        let cfg = raft_engine::Config {
            dir: dir.to_string_lossy().into_owned(),
            batch_compression_threshold: raft_engine::ReadableSize(0),
            ..Default::default()
        };
        Ok(RaftEngine {
            engine: raft_engine::Engine::open(cfg)?,
            pool,
        })
    }
}

impl Log for RaftEngine {
    fn commit(&self, writer: usize, first: u64, n: usize) -> anyhow::Result<()> {
        let entries: Vec<_> = (0..n as u64)
            .map(|k| {
                let idx = first + k + 1;
                let rec = &self.pool[((writer as u64 * 997 + first + k) as usize) % POOL];
                let mut v = Vec::with_capacity(8 + rec.len());
                v.extend_from_slice(&idx.to_le_bytes());
                v.extend_from_slice(rec);
                let mut e = protobuf::well_known_types::BytesValue::new();
                e.value = v;
                e
            })
            .collect();
        let mut batch = raft_engine::LogBatch::default();
        batch.add_entries::<Rec>(writer as u64 + 1, &entries)?;
        self.engine.write(&mut batch, true)?;
        Ok(())
    }
}

// ------------------------------------------------------------ measurement

/// Opens one engine in a fresh directory.
type Opener<'a> = dyn Fn(&Path) -> anyhow::Result<Arc<dyn Log>> + 'a;

#[derive(Clone, Copy)]
enum Shape {
    One,
    Writers,
    Batch,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::One => "1 writer, 1 per commit",
            Shape::Writers => "8 writers, 1 per commit",
            Shape::Batch => "1 writer, 100 per commit",
        }
    }
    fn threads(self) -> usize {
        match self {
            Shape::Writers => WRITERS,
            _ => 1,
        }
    }
    fn per_commit(self) -> usize {
        match self {
            Shape::Batch => BATCH,
            _ => 1,
        }
    }
}

struct Cell {
    recs_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    bytes_per_rec: Option<f64>,
}

/// Bytes written to the block device holding `dir` so far (sectors written,
/// /sys/dev/block/MAJ:MIN/stat), or None where that is not readable. Not the
/// process's `write_bytes` of /proc/self/io: on this kernel (6.18, large
/// page-cache folios) that counts a whole folio per small overwrite, about
/// 1 MiB per 339-byte commit into a file first written in 1 MiB pieces,
/// while the device wrote 4.5 KB. The machine is otherwise idle while the
/// bench runs; other writers to the same device would be counted too.
fn device_written(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/stat")).ok()?;
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure(log: Arc<dyn Log>, dir: &Path, shape: Shape, secs: f64) -> anyhow::Result<Cell> {
    let per = shape.per_commit();
    // Warm-up (not counted): a few commits as other writers (raft-engine
    // wants each writer's indexes contiguous from 1).
    for w in 0..shape.threads() {
        for k in 0..5u64 {
            log.commit(64 + w, k * per as u64, per)?;
        }
    }
    let bytes0 = device_written(dir);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..shape.threads())
        .map(|w| {
            let log = log.clone();
            std::thread::spawn(move || -> anyhow::Result<(u64, Vec<f64>)> {
                let mut lat = Vec::new();
                let mut next = 0u64;
                while Instant::now() < end {
                    let c = Instant::now();
                    log.commit(w, next, per)?;
                    lat.push(c.elapsed().as_secs_f64() * 1e6);
                    next += per as u64;
                }
                Ok((next, lat))
            })
        })
        .collect();
    let mut total = 0u64;
    let mut lat = Vec::new();
    for h in handles {
        let (n, l) = h.join().expect("writer thread")?;
        total += n;
        lat.extend(l);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let bytes = match (bytes0, device_written(dir)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(Cell {
        recs_per_s: total as f64 / elapsed,
        p50_us: pct(&lat, 0.50),
        p99_us: pct(&lat, 0.99),
        bytes_per_rec: bytes.map(|b| b as f64 / total.max(1) as f64),
    })
}

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::var("RIFTMESH_BENCH_LOGCMP_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pool = Arc::new(record_pool());
    let mean = pool.iter().map(Vec::len).sum::<usize>() as f64 / pool.len() as f64;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load1: f64 = load
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "log engines, durable commits of sealed event envelopes ({mean:.0} bytes each), {secs} s per cell; load {load1:.2} on {cpus} CPUs{}",
        if load1 >= cpus as f64 {
            " -- LOADED MACHINE: the figures measure the scheduler"
        } else {
            ""
        }
    );
    let engines: [(&str, &Opener); 4] = [
        ("riftmesh store", &|d| {
            let store = Store::open(d, StoreConfig::default(), Keypair::generate_ed25519())?;
            Ok(Arc::new(RmStore {
                store: Mutex::new(Some(store)),
                rt: rt.handle().clone(),
            }))
        }),
        ("segment file", &|d| {
            Ok(Arc::new(Segment::open(d, pool.clone())?))
        }),
        ("okaywal 0.3", &|d| {
            Ok(Arc::new(OkayWal::open(d, pool.clone())?))
        }),
        ("raft-engine 0.4", &|d| {
            Ok(Arc::new(RaftEngine::open(d, pool.clone())?))
        }),
    ];
    let base = std::env::var_os("RIFTMESH_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!(
        "{:<26} {:<16} {:>11} {:>10} {:>10} {:>11}",
        "shape", "engine", "records/s", "p50 µs", "p99 µs", "device B/rec"
    );
    let mut json_rows = Vec::new();
    for shape in [Shape::One, Shape::Writers, Shape::Batch] {
        for (name, open) in &engines {
            let dir = tempfile::Builder::new()
                .prefix("logcmp-")
                .tempdir_in(&base)?;
            let log = open(dir.path())?;
            let c = measure(log.clone(), dir.path(), shape, secs)?;
            log.close();
            drop(log);
            println!(
                "{:<26} {:<16} {:>11.0} {:>10.0} {:>10.0} {:>11}",
                shape.label(),
                name,
                c.recs_per_s,
                c.p50_us,
                c.p99_us,
                c.bytes_per_rec
                    .map_or("n/a".to_string(), |b| format!("{b:.0}"))
            );
            json_rows.push(json!({
                "shape": shape.label(), "engine": name, "records_per_s": c.recs_per_s,
                "p50_us": c.p50_us, "p99_us": c.p99_us, "bytes_per_record": c.bytes_per_rec,
            }));
        }
    }
    let out = json!({"record_bytes": mean, "secs": secs, "load1": load1, "cpus": cpus, "rows": json_rows});
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-logcmp.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&out)?)?;
    println!("JSON: {}", path.display());
    Ok(())
}
