//! Log-engine comparison for the event log (issue 26): `cargo bench --bench
//! logcmp --features bench-logcmp` (~2.5 minutes; the engines compared are
//! optional dependencies, built only with that feature, so CI neither builds
//! nor lints this file).
//!
//! Every engine makes the same records durable: real sealed event envelopes
//! (`Draft::seal`, the bytes the store keeps for a ~120-byte payload), each
//! commit ending in an fsync before it returns. Three shapes, each a fresh
//! directory under RIFTMESH_BENCH_DIR (default the temp dir: it must be on a
//! real disk, not tmpfs; the bench says so when it cannot read the device's
//! statistics) and RIFTMESH_BENCH_LOGCMP_SECS timed seconds (default 3)
//! after a short warm-up, RIFTMESH_BENCH_LOGCMP_REPEATS times (default 3,
//! the engines' order turned by one each time; median and range printed):
//! - `1 writer`: one record per commit, one commit at a time (a lone
//!   publisher; bounded by the device's fsync round trip);
//! - `8 writers`: eight threads, one record per commit each (the engine's
//!   group commit is what is measured);
//! - `batch 100`: one writer, 100 records per commit.
//!
//! Engines:
//! - `riftmesh store`: the agent's event store as it is (sled + indexes +
//!   dedup + signing in its writer thread + `Durable::commit`), fed drafts
//!   built inside the timed commit (canonical JSON and a hash, a few µs per
//!   event); the only row that also signs (~12 µs per event) and indexes.
//! - `segment file`: the floor of the design in proto-notes/store.md, the
//!   log alone (no index, no signing): 64 MiB segments zeroed ahead by a
//!   second thread (counted), group header with CRCs, records framed with
//!   length, CRC, seq and kind, groups padded to 4 KiB, one writer thread
//!   taking every waiting commit, one `pwrite` + `fdatasync` per group.
//!   Written here to measure the design, not the agent's code.
//! - `okaywal 0.3`: its multi-threaded WAL (it groups concurrent commits into
//!   one fsync), segments of 64 MiB preallocated, a checkpointer that does
//!   nothing (the WAL alone is measured).
//! - `raft-engine 0.4` (TiKV's): entries appended per region (one region per
//!   writer thread), `write(batch, sync = true)`, compression off.
//!
//! Per cell: records/s, commit latency p50/p99, and bytes the block device
//! wrote per record during the cell (data, journal, metadata), net of what it
//! wrote while idle in the 0.5 s before the cell.
//! RIFTMESH_BENCH_LOGCMP_MEMORY=N instead prints the resident memory of
//! raft-engine with N entries and of an index-only sled with N events' keys
//! (the design's index, applied in batches of 1,000 with sled's own 1 s
//! flush only, as the design first said), after writing them and after
//! reopening. The sled part runs only up to 200,000 events: at 1,000,000 it
//! held more than 22 GiB and the kernel killed it.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use libp2p::identity::Keypair;
use riftmesh::event::Draft;
use riftmesh::store::{Appended, Store, StoreConfig};
use serde_json::json;

const EVENT_TYPE: &str = "BENCH_LOGCMP";
const WRITERS: usize = 8;
const BATCH: usize = 100;
/// Distinct sealed records cycled through by the byte-level engines.
const POOL: usize = 4096;
const SEGMENT_BYTES: u64 = 64 << 20;

fn draft(i: u64) -> Draft {
    Draft::new(EVENT_TYPE, &common::event_payload(i), None, None, None).expect("valid draft")
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
/// A commit for the segment writer: framed records, their count, the reply.
type SegCommit = (Vec<u8>, u64, Reply);

struct Segment {
    tx: Mutex<Option<mpsc::Sender<SegCommit>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    pool: Arc<Vec<Vec<u8>>>,
}

/// Page size groups are padded to: a group never shares a block with the
/// acknowledged group before it, so a torn write cannot damage that one.
const PAGE: usize = 4096;
const GROUP_MAGIC: u32 = 0x5247_4d31;

/// A segment made ready for writing: written full of zeros under a
/// temporary name, fsynced, renamed, directory fsynced.
fn zeroed_segment(dir: &Path, n: u64) -> std::io::Result<File> {
    let tmp = dir.join(format!("seg-{n:06}.tmp"));
    let path = dir.join(format!("seg-{n:06}"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&tmp)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(SEGMENT_BYTES >> 20) {
        f.write_all(&zeros)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(f)
}

impl Segment {
    /// The floor of the design in proto-notes/store.md: 64 MiB segments,
    /// each zeroed and fsynced by a second thread while the one before
    /// fills (the writer waits if it is not ready: that stall is counted);
    /// a full segment is deleted by that thread (standing in for recycling,
    /// which re-zeroes it: the same bytes). Per group: a 32-byte header
    /// (magic, length, CRC of the records, first seq, count, CRC of the
    /// header), the framed records, zero padding to a 4 KiB boundary; one
    /// `pwrite` and one `fdatasync`.
    fn open(dir: &Path, pool: Arc<Vec<Vec<u8>>>) -> anyhow::Result<Segment> {
        let first = zeroed_segment(dir, 1)?;
        // The next segment is ready before the first commit; each later one
        // is prepared when the writer moves on, so its zeroing falls inside
        // the timed cell and is counted.
        let (ready_tx, ready_rx) = mpsc::sync_channel::<std::io::Result<File>>(1);
        ready_tx
            .send(zeroed_segment(dir, 2))
            .expect("channel has room");
        let (done_tx, done_rx) = mpsc::channel::<u64>();
        let zdir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("logcmp-zeroer".into())
            .spawn(move || {
                let mut n = 3;
                while let Ok(old) = done_rx.recv() {
                    let _ = std::fs::remove_file(zdir.join(format!("seg-{old:06}")));
                    if ready_tx.send(zeroed_segment(&zdir, n)).is_err() {
                        break;
                    }
                    n += 1;
                }
            })?;
        let (tx, rx) = mpsc::channel::<SegCommit>();
        let writer = std::thread::Builder::new()
            .name("logcmp-segment".into())
            .spawn(move || {
                let mut f = first;
                let mut seg = 1u64;
                let mut off = 0u64;
                let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
                let mut replies = Vec::new();
                while let Ok(first) = rx.recv() {
                    buf.clear();
                    replies.clear();
                    buf.resize(32, 0);
                    let mut count = first.1;
                    buf.extend_from_slice(&first.0);
                    replies.push(first.2);
                    while let Ok((b, c, r)) = rx.try_recv() {
                        buf.extend_from_slice(&b);
                        count += c;
                        replies.push(r);
                    }
                    let body = (buf.len() - 32) as u32;
                    let crc = crc32fast::hash(&buf[32..]);
                    buf[0..4].copy_from_slice(&GROUP_MAGIC.to_le_bytes());
                    buf[4..8].copy_from_slice(&body.to_le_bytes());
                    buf[8..12].copy_from_slice(&crc.to_le_bytes());
                    buf[12..20].copy_from_slice(&off.to_le_bytes());
                    buf[20..28].copy_from_slice(&count.to_le_bytes());
                    let hcrc = crc32fast::hash(&buf[..28]);
                    buf[28..32].copy_from_slice(&hcrc.to_le_bytes());
                    buf.resize(buf.len().div_ceil(PAGE) * PAGE, 0);
                    let res = (|| {
                        if off + buf.len() as u64 > SEGMENT_BYTES {
                            // The rest of this one stays zero; the design
                            // writes an end-of-segment record there.
                            f = ready_rx
                                .recv()
                                .map_err(|_| std::io::Error::other("zeroer thread gone"))??;
                            let _ = done_tx.send(seg);
                            seg += 1;
                            off = 0;
                        }
                        f.write_all_at(&buf, off)?;
                        f.sync_data()
                    })();
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
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            pool,
        })
    }
}

impl Log for Segment {
    fn commit(&self, writer: usize, first: u64, n: usize) -> anyhow::Result<()> {
        let mut framed = Vec::with_capacity(n * 400);
        for k in 0..n as u64 {
            let rec = &self.pool[((writer as u64 * 997 + first + k) as usize) % POOL];
            // len | crc | seq | kind | body; the seq stands for the one the
            // writer would assign.
            let seq = first + k;
            let start = framed.len();
            framed.extend_from_slice(&(rec.len() as u32).to_le_bytes());
            framed.extend_from_slice(&[0; 4]);
            framed.extend_from_slice(&seq.to_le_bytes());
            framed.push(1);
            framed.extend_from_slice(rec);
            let crc = crc32fast::hash(&framed[start + 8..]);
            framed[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        }
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.tx
            .lock()
            .unwrap()
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("segment log closed"))?
            .send((framed, n as u64, rtx))
            .map_err(|_| anyhow::anyhow!("segment writer gone"))?;
        rrx.recv()??;
        Ok(())
    }
    fn close(&self) {
        drop(self.tx.lock().unwrap().take());
        if let Some(h) = self.writer.lock().unwrap().take() {
            let _ = h.join();
        }
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
    fn close(&self) {
        if let Err(e) = self.wal.clone().shutdown() {
            eprintln!("okaywal shutdown: {e}");
        }
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
    // What the device writes while this bench writes nothing (other
    // processes, the filesystem's own flushes): subtracted below.
    let idle0 = device_written(dir);
    let idle_t = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let idle_rate = match (idle0, device_written(dir)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / idle_t.elapsed().as_secs_f64()),
        _ => None,
    };
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
    let bytes = match (bytes0, device_written(dir), idle_rate) {
        (Some(a), Some(b), Some(r)) => Some((b.saturating_sub(a) as f64 - r * elapsed).max(0.0)),
        _ => None,
    };
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(Cell {
        recs_per_s: total as f64 / elapsed,
        p50_us: pct(&lat, 0.50),
        p99_us: pct(&lat, 0.99),
        bytes_per_rec: bytes.map(|b| b / total.max(1) as f64),
    })
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// One line of the memory mode: RSS (KiB) before, after writing `n`
/// records, after reopening, and after closing (the reopen's base).
fn report_memory(what: &str, n: u64, [before, written, reopened, closed]: [u64; 4]) {
    let per = |hi: u64, lo: u64| (hi.saturating_sub(lo) * 1024) as f64 / n as f64;
    println!(
        "{what}: RSS {} MiB before, {} MiB after writing (+{:.0} bytes/record), \
         {} MiB after closing, {} MiB after reopening (+{:.0} bytes/record)",
        before >> 10,
        written >> 10,
        per(written, before),
        closed >> 10,
        reopened >> 10,
        per(reopened, closed)
    );
}

/// RIFTMESH_BENCH_LOGCMP_MEMORY=N: raft-engine's resident memory for N
/// entries (in commits of 1,000), then after reopening them; printed
/// instead of the throughput table.
fn raft_engine_memory(base: &Path, pool: Arc<Vec<Vec<u8>>>, n: u64) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("logcmp-mem-")
        .tempdir_in(base)?;
    let rss0 = vm_rss_kib();
    let e = RaftEngine::open(dir.path(), pool.clone())?;
    let mut i = 0;
    while i < n {
        let k = 1000.min(n - i) as usize;
        e.commit(0, i, k)?;
        i += k as u64;
    }
    let rss1 = vm_rss_kib();
    drop(e);
    let rss2 = vm_rss_kib();
    let e = RaftEngine::open(dir.path(), pool)?;
    report_memory(
        &format!("raft-engine, {n} entries"),
        n,
        [rss0, rss1, vm_rss_kib(), rss2],
    );
    drop(e);
    Ok(())
}

/// The same for an index-only sled (what the design keeps in sled per
/// event: `h`, `x`, `i`, `k`, `o` and an `l` pointer, with keys and values of
/// the store's sizes), sled's cache at the store's 32 MiB.
fn sled_index_memory(base: &Path, n: u64) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("logcmp-mem-")
        .tempdir_in(base)?;
    let open = || {
        sled::Config::new()
            .path(dir.path())
            .cache_capacity(32 << 20)
            .flush_every_ms(Some(1000))
            .open()
    };
    let rss0 = vm_rss_kib();
    let db = open()?;
    let mut i = 0u64;
    while i < n {
        let mut b = sled::Batch::default();
        for seq in i..(i + 1000).min(n) {
            let h: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(seq.to_le_bytes()).into();
            let id = format!("01a25095-{:04x}-7f26-93a3-{:012x}", seq & 0xffff, seq);
            let mut k = |prefix: u8, rest: &[u8], v: &[u8]| {
                let mut key = vec![prefix];
                key.extend_from_slice(rest);
                b.insert(key, v);
            };
            k(b'h', &h, &[0u8; 24]);
            k(b'x', &[&seq.to_be_bytes()[..], &h[..]].concat(), &[]);
            k(b'i', id.as_bytes(), &seq.to_be_bytes());
            k(
                b'k',
                &[id.as_bytes(), &[0], &seq.to_be_bytes()].concat(),
                &[],
            );
            k(
                b'o',
                &[&[52u8][..], &[b'p'; 52], &seq.to_be_bytes()].concat(),
                &seq.to_be_bytes(),
            );
            k(b'l', &seq.to_be_bytes(), &[0u8; 12]);
        }
        db.apply_batch(b)?;
        i = (i + 1000).min(n);
    }
    db.flush()?;
    let rss1 = vm_rss_kib();
    drop(db);
    let rss2 = vm_rss_kib();
    let db = open()?;
    report_memory(
        &format!("sled index only, {n} events"),
        n,
        [rss0, rss1, vm_rss_kib(), rss2],
    );
    drop(db);
    Ok(())
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
    if device_written(&base).is_none() {
        println!(
            "note: {} is not on a block device whose statistics are readable (tmpfs?): \
             bytes are not measured, and fsync may cost nothing there; set RIFTMESH_BENCH_DIR",
            base.display()
        );
    }
    if let Some(n) = std::env::var("RIFTMESH_BENCH_LOGCMP_MEMORY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        raft_engine_memory(&base, pool.clone(), n)?;
        // 1,000,000 took the machine's 24 GiB and was killed by the kernel.
        if n > 200_000 {
            println!(
                "sled index only: skipped above 200000 events (1000000 used more than 22 GiB)"
            );
            return Ok(());
        }
        return sled_index_memory(&base, n);
    }
    let repeats: usize = std::env::var("RIFTMESH_BENCH_LOGCMP_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let shapes = [Shape::One, Shape::Writers, Shape::Batch];
    // cells[shape][engine]: one Cell per repeat; the engines' order turns
    // by one each repeat, so none always runs first or last.
    let mut cells: Vec<Vec<Vec<Cell>>> = (0..shapes.len())
        .map(|_| (0..engines.len()).map(|_| Vec::new()).collect())
        .collect();
    for r in 0..repeats {
        for (si, shape) in shapes.iter().enumerate() {
            for k in 0..engines.len() {
                let ei = (k + r) % engines.len();
                let dir = tempfile::Builder::new()
                    .prefix("logcmp-")
                    .tempdir_in(&base)?;
                let log = (engines[ei].1)(dir.path())?;
                let c = measure(log.clone(), dir.path(), *shape, secs)?;
                log.close();
                drop(log);
                cells[si][ei].push(c);
            }
        }
        eprintln!("logcmp: repeat {} of {repeats} done", r + 1);
    }
    println!("median of {repeats} repeats [min-max]");
    println!(
        "{:<26} {:<16} {:>26} {:>8} {:>8} {:>22}",
        "shape", "engine", "records/s", "p50 µs", "p99 µs", "device B/rec"
    );
    let mut json_rows = Vec::new();
    for (si, shape) in shapes.iter().enumerate() {
        for (ei, (name, _)) in engines.iter().enumerate() {
            let cs = &cells[si][ei];
            let stat = |f: &dyn Fn(&Cell) -> Option<f64>| -> Option<(f64, f64, f64)> {
                let mut v: Vec<f64> = cs.iter().filter_map(f).collect();
                if v.is_empty() {
                    return None;
                }
                v.sort_by(|a, b| a.total_cmp(b));
                Some((v[v.len() / 2], v[0], v[v.len() - 1]))
            };
            let rate = stat(&|c| Some(c.recs_per_s)).unwrap_or_default();
            let p50 = stat(&|c| Some(c.p50_us)).unwrap_or_default();
            let p99 = stat(&|c| Some(c.p99_us)).unwrap_or_default();
            let bytes = stat(&|c| c.bytes_per_rec);
            println!(
                "{:<26} {:<16} {:>26} {:>8.0} {:>8.0} {:>22}",
                shape.label(),
                name,
                format!("{:.0} [{:.0}-{:.0}]", rate.0, rate.1, rate.2),
                p50.0,
                p99.0,
                bytes.map_or("n/a".to_string(), |b| format!(
                    "{:.0} [{:.0}-{:.0}]",
                    b.0, b.1, b.2
                ))
            );
            json_rows.push(json!({
                "shape": shape.label(), "engine": name,
                "records_per_s": cs.iter().map(|c| c.recs_per_s).collect::<Vec<_>>(),
                "p50_us": cs.iter().map(|c| c.p50_us).collect::<Vec<_>>(),
                "p99_us": cs.iter().map(|c| c.p99_us).collect::<Vec<_>>(),
                "device_bytes_per_record": cs.iter().map(|c| c.bytes_per_rec).collect::<Vec<_>>(),
            }));
        }
    }
    let out = json!({"record_bytes": mean, "secs": secs, "repeats": repeats, "load1": load1, "cpus": cpus, "rows": json_rows});
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-logcmp.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&out)?)?;
    println!("JSON: {}", path.display());
    Ok(())
}
