//! What the fdatasync of the one durability rule adds to a small write (a
//! Raft vote): the same insert made durable by sled's flush alone (its
//! `sync_file_range`, what Raft and blob metadata had before) against
//! `Durable::commit` (flush, then fdatasync). Side by side in one run, two
//! rounds, p50 and p99 of 300 writes each.
//!
//! `cargo bench --bench commit_cost`

use std::time::{Duration, Instant};

use riftmesh::durable::{Durable, What};

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled::open(dir.path()).expect("sled");
    let d = Durable::open(db.clone(), dir.path(), Duration::from_secs(10), 0).expect("durable");
    let tree = db.open_tree("raft2_meta").expect("tree");
    let n: usize = 300;
    let run = |durable: bool| {
        let mut t: Vec<f64> = (0..n)
            .map(|i| {
                let start = Instant::now();
                tree.insert("vote", &(i as u64).to_be_bytes())
                    .expect("insert");
                if durable {
                    d.commit(What::Raft).expect("commit");
                } else {
                    db.flush().expect("flush");
                }
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        (t[n / 2], t[n * 99 / 100])
    };
    println!(
        "riftmesh commit cost: {n} small writes per row, data in {}",
        dir.path().display()
    );
    for round in 0..2 {
        let (f50, f99) = run(false);
        let (c50, c99) = run(true);
        println!(
            "round {round}: sled flush only p50 {f50:.3} ms p99 {f99:.3} ms; flush + fdatasync p50 {c50:.3} ms p99 {c99:.3} ms (x{:.1} at p50)",
            c50 / f50.max(1e-9)
        );
    }
}
