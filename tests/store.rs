//! The durable queue on a real sled store: dedup across restarts, consumer
//! cursors, dead letters, time seeks, and damaged or locked data directories.

use std::path::Path;

use libp2p::identity::Keypair;
use riftmesh::event::{Draft, TypePattern};
use riftmesh::store::{Appended, StartAt, Store, StoreConfig, StoreError};
use serde_json::json;

fn draft(t: &str, i: u64) -> Draft {
    Draft::new(t, &json!({ "i": i }), None, None, None).unwrap()
}

fn open(dir: &Path, key: &Keypair) -> Store {
    Store::open(dir, StoreConfig::default(), key.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_and_sequences_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let s = open(dir.path(), &key);
    let out = s
        .append_local(vec![
            draft("TRAINING_COMPLETED", 1),
            draft("TRAINING_COMPLETED", 2),
        ])
        .await
        .unwrap();
    let Appended::New { seq: 1, event: e1 } = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(e1.seq, 1);
    e1.verify().unwrap();
    // Same content within one batch and across calls is a duplicate.
    let out = s
        .append_local(vec![
            draft("training.complete", 3),
            draft("TRAINING_COMPLETED", 3),
        ])
        .await
        .unwrap();
    assert!(matches!(out[0], Appended::New { seq: 3, .. }));
    assert!(matches!(&out[1], Appended::Duplicate { seq: 3, .. }));
    s.close();

    let s = open(dir.path(), &key);
    assert_eq!(s.head(), 3);
    let out = s
        .append_local(vec![
            draft("TRAINING_COMPLETED", 1),
            draft("TRAINING_COMPLETED", 4),
        ])
        .await
        .unwrap();
    match &out[0] {
        Appended::Duplicate { seq, id, .. } => {
            assert_eq!(*seq, 1);
            assert_eq!(id, &e1.id);
        }
        other => panic!("expected duplicate, got {other:?}"),
    }
    // The per-source sequence continues without a gap after the duplicate.
    let Appended::New { seq: 4, event } = &out[1] else {
        panic!("{out:?}")
    };
    assert_eq!(event.seq, 4);
    // A remote copy of a known fact, published within the repeat window,
    // is kept for catch-up but not delivered.
    let other = Keypair::generate_ed25519();
    let remote = draft("TRAINING_COMPLETED", 2)
        .seal(&other, 1, riftmesh::event::now_ms())
        .unwrap();
    assert!(matches!(
        s.append_remote(vec![remote]).await.unwrap()[0],
        Appended::Duplicate { seq: 2, .. }
    ));
    // The same content published long before (outside the window) is
    // another fact.
    let old = draft("TRAINING_COMPLETED", 2).seal(&other, 2, 1).unwrap();
    assert!(matches!(
        s.append_remote(vec![old]).await.unwrap()[0],
        Appended::New { .. }
    ));
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_ack_nack_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let s = open(dir.path(), &key);
    s.append_local((0..5).map(|i| draft("SELFPLAY_COMPLETED", i)).collect())
        .await
        .unwrap();
    // A new consumer starts at the end unless told otherwise.
    let c = s.upsert_consumer("late", None, None).await.unwrap();
    assert_eq!(c.cursor, 5);
    let c = s
        .upsert_consumer(
            "eval",
            Some(vec!["TRAINING_*".into()]),
            Some(StartAt::Start),
        )
        .await
        .unwrap();
    assert_eq!(c.cursor, 0);
    s.append_local((10..13).map(|i| draft("TRAINING_COMPLETED", i)).collect())
        .await
        .unwrap();
    let pats: Vec<TypePattern> = c
        .types
        .iter()
        .map(|t| TypePattern::parse(t).unwrap())
        .collect();
    let (got, _) = s.read_after(c.cursor, 100, 1000, &pats).unwrap();
    assert_eq!(
        got.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        vec![6, 7, 8]
    );
    s.ack("eval", 6).await.unwrap();
    s.nack("eval", 7, "bad model path".into()).await.unwrap();
    assert!(matches!(
        s.ack("nobody", 1).await,
        Err(StoreError::UnknownConsumer(_))
    ));
    assert!(matches!(
        s.ack("eval", 99).await,
        Err(StoreError::BeyondHead { .. })
    ));
    s.close();

    let s = open(dir.path(), &key);
    let c = s.consumer("eval").unwrap().unwrap();
    assert_eq!(c.cursor, 7);
    assert_eq!(c.dead_letters, 1);
    let dl = s.dead_letters("eval").unwrap();
    assert_eq!((dl[0].seq, dl[0].reason.as_str()), (7, "bad model path"));
    let pats: Vec<TypePattern> = c
        .types
        .iter()
        .map(|t| TypePattern::parse(t).unwrap())
        .collect();
    let (got, _) = s.read_after(c.cursor, 100, 1000, &pats).unwrap();
    assert_eq!(got.iter().map(|(q, _)| *q).collect::<Vec<_>>(), vec![8]);
    // Time seek: everything was received now, so "since an hour ago" is the start.
    let hour_ago = riftmesh::event::now_ms() - 3_600_000;
    let c = s
        .upsert_consumer("eval", None, Some(StartAt::Since(hour_ago)))
        .await
        .unwrap();
    assert_eq!(c.cursor, 0);
    let future = riftmesh::event::now_ms() + 3_600_000;
    let c = s
        .upsert_consumer("eval", None, Some(StartAt::Since(future)))
        .await
        .unwrap();
    assert_eq!(c.cursor, 8);
    s.delete_consumer("eval").await.unwrap();
    assert!(s.consumer("eval").unwrap().is_none());
    assert!(s.dead_letters("eval").unwrap().is_empty());
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_oldest_and_reports_missed() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let cfg = StoreConfig {
        retention_max_events: 10,
        ..Default::default()
    };
    let s = Store::open(dir.path(), cfg, key).unwrap();
    s.upsert_consumer("slow", None, Some(StartAt::Start))
        .await
        .unwrap();
    s.append_local((0..25).map(|i| draft("CUSTOM_THING", i)).collect())
        .await
        .unwrap();
    s.prune().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(5));
    while s.first() != 16 {
        assert!(
            std::time::Instant::now() < deadline,
            "retention did not run: first = {}",
            s.first()
        );
        poll.tick().await;
    }
    assert_eq!(s.len(), 10);
    assert!(s.get(15).unwrap().is_none());
    assert!(s.get(16).unwrap().is_some());
    s.close();
}

#[test]
fn damaged_and_locked_stores_are_reported_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = Store::open(dir.path(), StoreConfig::default(), key.clone()).unwrap();
    rt.block_on(s.append_local(vec![draft("CUSTOM_THING", 1)]))
        .unwrap();
    match Store::open(dir.path(), StoreConfig::default(), key.clone()) {
        Err(e @ StoreError::Locked { .. }) => {
            assert!(e.to_string().contains(&dir.path().display().to_string()))
        }
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a second open of a locked store succeeded"),
    }
    s.close();

    // Overwrite the middle of sled's data file with garbage.
    let db = dir.path().join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    let n = bytes.len();
    for b in bytes.iter_mut().take(n).skip(16) {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();
    std::fs::remove_file(dir.path().join("conf")).ok();
    match Store::open(dir.path(), StoreConfig::default(), key) {
        Err(e @ StoreError::Damaged { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        }
        Err(e) => panic!("expected Damaged, got {e}"),
        Ok(s) => panic!("a garbled store opened silently with head {}", s.head()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_vector_tracks_each_source_and_serves_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let me = Keypair::generate_ed25519();
    let peer = Keypair::generate_ed25519();
    let peer_id = peer.public().to_peer_id().to_base58();
    let s = open(dir.path(), &me);
    s.append_local(vec![draft("CUSTOM_A", 1), draft("CUSTOM_A", 2)])
        .await
        .unwrap();
    let ev = |n: u64| draft("CUSTOM_B", n).seal(&peer, n, 1).unwrap();
    // 1, 2, then 4 (a gap at 3), then 4 again.
    let out = s
        .append_remote(vec![ev(1), ev(2), ev(4), ev(4)])
        .await
        .unwrap();
    assert!(matches!(out[3], Appended::Held), "{out:?}");
    let vv = s.version_vector().unwrap();
    let mark = vv.iter().find(|m| m.source == peer_id).unwrap();
    assert_eq!((mark.contiguous, mark.max_seen), (2, 4));
    let mine = vv.iter().find(|m| m.source != peer_id).unwrap();
    assert_eq!(mine.contiguous, 2);
    // Filling the gap moves the mark over everything held after it.
    s.append_remote(vec![ev(3)]).await.unwrap();
    let vv = s.version_vector().unwrap();
    assert_eq!(
        vv.iter().find(|m| m.source == peer_id).unwrap().contiguous,
        4
    );
    let (evs, floor) = s.source_events(&peer_id, 2, 2, 1 << 20).unwrap();
    assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(floor, Some(1));
    for e in &evs {
        e.verify().unwrap();
    }
    // The same fact from another source is kept for catch-up but not delivered twice.
    let other = Keypair::generate_ed25519();
    let copy = draft("CUSTOM_B", 1).seal(&other, 1, 1).unwrap();
    assert!(matches!(
        s.append_remote(vec![copy]).await.unwrap()[0],
        Appended::Duplicate { .. }
    ));
    let other_id = other.public().to_peer_id().to_base58();
    assert_eq!(
        s.source_events(&other_id, 1, 10, 1 << 20).unwrap().0.len(),
        1
    );
    let (visible, _) = s.read_after(0, 100, 1000, &[]).unwrap();
    assert_eq!(visible.len(), 6, "the repeated fact must not be delivered");
    // Giving up on a gap moves the mark past it.
    s.append_remote(vec![ev(7)]).await.unwrap();
    let m = s.skip_to(&peer_id, 6).await.unwrap();
    assert_eq!(m.contiguous, 7);
    s.close();
    let s = open(dir.path(), &me);
    let vv = s.version_vector().unwrap();
    assert_eq!(
        vv.iter().find(|m| m.source == peer_id).unwrap().contiguous,
        7
    );
    s.close();
}

/// Every acknowledged write (publish, consumer change, ack) completed a
/// durable commit (sled flush + fdatasync) before it was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_was_synced_first() {
    use riftmesh::durable::What;
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let s = open(dir.path(), &key);
    let d = s.durable().clone();
    let synced = |before: u64, what: &str| {
        let now = d.syncs(What::Events);
        assert_eq!(
            now,
            before + 1,
            "{what} was acknowledged without a durable commit first"
        );
        now
    };
    let mut n = d.syncs(What::Events);
    for i in 0..5 {
        let out = s.append_local(vec![draft("T", i)]).await.unwrap();
        assert!(matches!(out[0], Appended::New { .. }));
        n = synced(n, "a publish");
    }
    s.upsert_consumer("c", None, Some(StartAt::Start))
        .await
        .unwrap();
    n = synced(n, "a new consumer");
    s.ack("c", 3).await.unwrap();
    synced(n, "an ack");
    assert_eq!(d.syncs(What::Raft), 0);
}

/// Every group commit applied to the database is timed in each of its three
/// steps (`riftmesh_store_commit_seconds{step}`), once per group: the
/// figures an operator reads to tell a slow disk from a busy CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_commit_is_timed_by_step() {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;
    use riftmesh::durable::What;
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::generate_ed25519();
    let s = open(dir.path(), &key);
    let mut reg = Registry::default();
    reg.register("store_commit_seconds", "", s.commit_steps());
    // (observations, sum of seconds) of one step.
    let step = |reg: &Registry, step: &str| -> (u64, f64) {
        let mut text = String::new();
        encode(&mut text, reg).unwrap();
        let value = |series: &str| {
            let prefix = format!("store_commit_seconds_{series}{{step=\"{step}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .map(|v| v.trim().to_string())
        };
        (
            value("count").map_or(0, |v| v.parse().unwrap()),
            value("sum").map_or(0.0, |v| v.parse().unwrap()),
        )
    };
    let started = std::time::Instant::now();
    let syncs = s.durable().syncs(What::Events);
    for i in 0..5 {
        s.append_local(vec![draft("T", i)]).await.unwrap();
    }
    s.upsert_consumer("c", None, Some(StartAt::Start))
        .await
        .unwrap();
    // A duplicate is a group too (nothing new in it but the counters):
    // applied, synced and timed like the others.
    let dup = s.append_local(vec![draft("T", 0)]).await.unwrap();
    assert!(matches!(dup[0], Appended::Duplicate { .. }), "{dup:?}");
    let elapsed = started.elapsed().as_secs_f64();
    let groups = s.durable().syncs(What::Events) - syncs;
    assert_eq!(groups, 7, "one durable commit per request here");
    let mut total = 0.0;
    for name in ["prepare", "apply", "sync"] {
        let (n, sum) = step(&reg, name);
        assert_eq!(n, groups, "observations of step {name}");
        assert!(sum > 0.0, "step {name} timed as zero");
        total += sum;
    }
    assert!(
        total <= elapsed,
        "the steps add up to {total} s, more than the {elapsed} s the requests took"
    );
    s.close();
}
