//! Blob sync between real agents on loopback: add, fetch by want, verify,
//! place, dedup by content, resume after a crash, a corrupt source, a source
//! that serves wrong bytes, the disk budget and garbage collection, and
//! forgetting a name (retries stop everywhere, in either order of events).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{keygen, now_ms, wait_for, Agent, BIN};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(90);

fn random_file(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    // Deterministic, incompressible enough, different per seed.
    let mut data = Vec::with_capacity(len);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(seed);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, &data).unwrap();
    data
}

fn config(root: &Path, name: &str, body: &str) -> Vec<String> {
    let p = root.join(format!("{name}.toml"));
    // The test's files live under `root`: the agent may read them by path.
    std::fs::write(
        &p,
        format!(
            "blob_chunk_size = \"256KiB\"\nblob_roots = [{:?}]\n{body}",
            root.display().to_string()
        ),
    )
    .unwrap();
    vec!["--config".into(), p.display().to_string()]
}

fn want_models(root: &Path, name: &str) -> String {
    format!(
        "[[want]]\nnames = \"models/*\"\nplace = \"{}/{{name}}.bin\"\n",
        root.join(format!("{name}-placed")).display()
    )
}

async fn start(root: &Path, name: &str, boot: &[String], body: &str) -> Agent {
    let extra = config(root, name, body);
    Agent::start_with(root, name, &root.join("swarm.key"), boot, &extra).await
}

fn cli(a: &Agent, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("RIFTMESH_API", a.api.trim_start_matches("http://"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Progress (bytes, rate, ETA, a redrawn line) is for a terminal only:
/// none of it on a pipe.
#[track_caller]
fn assert_no_progress(stderr: &str) {
    assert!(
        !stderr.contains('\r')
            && !stderr.contains('\x1b')
            && !stderr.contains("B/s")
            && !stderr.contains(" eta "),
        "progress on a pipe: {stderr:?}"
    );
}

async fn events_of(a: &Agent, ty: &str) -> Vec<Value> {
    a.all_events()
        .await
        .into_iter()
        .filter(|e| e["type"] == ty)
        .collect()
}

fn payload(e: &Value) -> Value {
    match &e["payload"] {
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::Null),
        v => v.clone(),
    }
}

async fn wait_file(path: &Path, data: &[u8]) {
    wait_for(
        &format!("{} to hold the blob", path.display()),
        T,
        || async { (std::fs::read(path).ok()? == data).then_some(()) },
    )
    .await;
}

/// `a` adds the file at `src` and names it `name` with a MODEL_PROMOTED
/// (the agent reads it under its `blob_roots`); the add's answer.
async fn promote(a: &Agent, src: &Path, name: &str) -> Value {
    a.post(
        "/v1/blobs",
        &json!({ "path": src.display().to_string(), "name": name, "event": "MODEL_PROMOTED" }),
    )
    .await
    .unwrap()
}

async fn blob_state(a: &Agent, r: &str) -> Value {
    a.get(&format!("/v1/blob?ref={r}"))
        .await
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_reach_every_wanting_agent_verified_placed_and_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    keygen(&root.join("swarm.key"));
    let a0 = start(root, "a0", &[], "").await;
    let boot = vec![a0.p2p_addr().await];
    let a1 = start(root, "a1", &boot, &want_models(root, "a1")).await;
    let a2 = start(root, "a2", &boot, &want_models(root, "a2")).await;
    // a3 wants game data only as a training host, which it is not.
    let a3 = start(
        root,
        "a3",
        &boot,
        "[[want]]\nnames = \"*\"\nif_tags = { role = \"training\" }\n",
    )
    .await;
    for a in [&a0, &a1, &a2, &a3] {
        wait_for("a full mesh", T, || async {
            (a.connected_peers().await >= 3).then_some(())
        })
        .await;
    }

    let src = root.join("model.pth");
    let data = random_file(&src, 5 * 1024 * 1024 + 1234, 1);
    let (ok, out, err) = cli(
        &a0,
        &[
            "blob",
            "add",
            src.to_str().unwrap(),
            "--name",
            "models/hex8_2p",
            "--event",
            "MODEL_PROMOTED",
        ],
    );
    assert!(ok, "blob add failed: {err}");
    assert_no_progress(&err);
    let id = hex::encode(Sha256::digest(&data));
    assert_eq!(out.trim(), id, "blob add prints the blob id");
    // The producer may now rewrite its file without harm.
    std::fs::write(&src, b"rewritten").unwrap();

    for name in ["a1", "a2"] {
        wait_file(&root.join(format!("{name}-placed/hex8_2p.bin")), &data).await;
    }
    // Each arrival is reported once, cluster-wide.
    let reports = wait_for("MODEL_DISTRIBUTED from a1 and a2 on a0", T, || async {
        let evs = events_of(&a0, "MODEL_DISTRIBUTED").await;
        let hosts: Vec<String> = evs
            .iter()
            .map(|e| payload(e)["host"].as_str().unwrap_or("").to_string())
            .collect();
        (hosts.contains(&"a1".to_string()) && hosts.contains(&"a2".to_string())).then_some(evs)
    })
    .await;
    assert_eq!(reports.len(), 2, "{reports:?}");
    for r in &reports {
        assert_eq!(payload(r)["blob"], id);
    }
    // a3 does not want it: it knows the name but holds nothing.
    wait_for("a3 to learn the name", T, || async {
        let v = a3.get("/v1/blobs").await.ok()?;
        (v["names"][0]["name"] == "models/hex8_2p").then_some(())
    })
    .await;
    assert_eq!(blob_state(&a3, &id).await["state"], "absent");

    // The same content under a new name: placed again, not transferred again.
    let in_before = a1
        .metric("riftmesh_sync_bytes_total{direction=\"in\"}")
        .await;
    assert!(in_before >= data.len() as f64, "{in_before}");
    std::fs::write(&src, &data).unwrap();
    let v = a0
        .post(
            "/v1/blobs",
            &json!({ "path": src.display().to_string(), "name": "models/copy" }),
        )
        .await
        .unwrap();
    assert_eq!(v["blob"], id);
    assert_eq!(v["stored"], "existing");
    wait_file(&root.join("a1-placed/copy.bin"), &data).await;
    assert_eq!(
        a1.metric("riftmesh_sync_bytes_total{direction=\"in\"}")
            .await,
        in_before
    );

    // blob get on a host that does not want it: fetched on demand, written atomically.
    let out_path = root.join("got.bin");
    let (ok, _, err) = cli(
        &a3,
        &[
            "blob",
            "get",
            "models/hex8_2p",
            "--out",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(ok, "blob get failed: {err}");
    assert_no_progress(&err);
    assert!(err.starts_with("wrote "), "{err}");
    assert_eq!(std::fs::read(&out_path).unwrap(), data);

    // Unknown references are clean 404s; a bad add is a 400.
    let (s, v) = a3
        .send(
            reqwest::Method::GET,
            &format!("/v1/blob/content?ref={}", "ab".repeat(32)),
            &Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(s, 404, "{v}");
    let (s, v) = a0
        .send(
            reqwest::Method::POST,
            "/v1/blobs",
            &json!({ "path": "relative/file", "name": "models/x" }),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    let (s, _) = a0
        .send(
            reqwest::Method::POST,
            "/v1/blobs",
            &json!({ "path": src.display().to_string(), "name": "../etc/passwd" }),
        )
        .await
        .unwrap();
    assert_eq!(s, 400);
    let st = a1.get("/v1/sync").await.unwrap();
    assert!(st["transfers"].as_array().unwrap().is_empty(), "{st}");
    assert!(st["store_bytes"].as_u64().unwrap() >= data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_resumes_after_a_crash_and_routes_around_a_corrupt_source() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    keygen(&root.join("swarm.key"));
    let a0 = start(root, "a0", &[], "").await;
    let boot = vec![a0.p2p_addr().await];
    // a1 downloads at 1 MiB/s: slow enough to be killed half way.
    let mut a1 = start(
        root,
        "a1",
        &boot,
        &format!("sync_download_rate = \"1MiB\"\n{}", want_models(root, "a1")),
    )
    .await;
    wait_for("a1 connected", T, || async {
        (a1.connected_peers().await >= 1).then_some(())
    })
    .await;
    let src = root.join("big.pth");
    let data = random_file(&src, 6 * 1024 * 1024, 2);
    let id = hex::encode(Sha256::digest(&data));
    promote(&a0, &src, "models/big").await;
    let held = wait_for("a1 to hold some chunks durably", T, || async {
        let v = blob_state(&a1, &id).await;
        let n = v["chunks_have"].as_u64()?;
        (n >= 4).then_some(n)
    })
    .await;
    a1.kill9();
    a1.spawn().await;
    wait_file(&root.join("a1-placed/big.bin"), &data).await;
    let fetched = a1
        .metric("riftmesh_sync_bytes_total{direction=\"in\"}")
        .await;
    assert!(
        fetched <= (data.len() - held as usize * 256 * 1024) as f64,
        "after the restart only the missing chunks are fetched: {fetched} bytes, {held} chunks were held"
    );

    // a0 hashed those bytes when it added them: it served them unhashed.
    let vouched = a0
        .metric("riftmesh_sync_serve_checks_total{check=\"vouched\"}")
        .await;
    assert!(
        vouched >= 1.0,
        "a0 served chunks it verified at the add without hashing them again"
    );

    // Now a0's copy rots on disk; a2 must still get a verified file, from a1.
    // The write changes the file's stamp, so a0 hashes before serving again.
    let obj = root.join("a0/blobs/objects").join(&id);
    let mut perm = std::fs::metadata(&obj).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&obj, perm).unwrap();
    let garbage: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    std::fs::write(&obj, &garbage).unwrap();
    let a2 = start(root, "a2", &boot, &want_models(root, "a2")).await;
    wait_file(&root.join("a2-placed/big.bin"), &data).await;
    // a0 caught its damage when asked for a chunk and never served it...
    let found = a0
        .metric("riftmesh_sync_chunks_rejected_total{reason=\"local_damage\"}")
        .await;
    assert!(found >= 1.0, "a0 found its stored copy damaged");
    assert_eq!(
        a2.metric_or_zero("riftmesh_sync_chunks_rejected_total{reason=\"hash\"}")
            .await,
        0.0,
        "no damaged chunk reached a2"
    );
    // ...and repaired it from a1.
    wait_file(&obj, &data).await;
    wait_for("a0's copy complete again", T, || async {
        (blob_state(&a0, &id).await["state"] == "complete").then_some(())
    })
    .await;
    // A path-like reference is refused, not looked up.
    let (s, v) = a0
        .send(
            reqwest::Method::GET,
            "/v1/blob/content?ref=../../etc/passwd",
            &Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    // Everyone keeps running.
    assert!(a0.get("/v1/health").await.is_ok());
    drop(a2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_budget_refuses_and_unnamed_blobs_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    keygen(&root.join("swarm.key"));
    let a0 = start(root, "a0", &[], "blob_retention = \"2s\"\n").await;
    let boot = vec![a0.p2p_addr().await];
    let a1 = start(
        root,
        "a1",
        &boot,
        &format!("blob_budget = \"300KiB\"\n{}", want_models(root, "a1")),
    )
    .await;
    wait_for("a1 connected", T, || async {
        (a1.connected_peers().await >= 1).then_some(())
    })
    .await;
    let src: PathBuf = root.join("m.pth");
    let first = random_file(&src, 1024 * 1024, 3);
    let v1 = a0
        .post(
            "/v1/blobs",
            &json!({ "path": src.display().to_string(), "name": "models/m" }),
        )
        .await
        .unwrap();
    // A model that can't be placed: MODEL_DISTRIBUTION_FAILED (the seeds'
    // name; game data would give DATA_SYNC_FAILED).
    let failed = wait_for("MODEL_DISTRIBUTION_FAILED from a1", T, || async {
        events_of(&a0, "MODEL_DISTRIBUTION_FAILED")
            .await
            .into_iter()
            .next()
    })
    .await;
    let p = payload(&failed);
    assert_eq!(p["host"], "a1");
    assert!(p["reason"].as_str().unwrap().contains("budget"), "{failed}");
    assert!(!root.join("a1-placed/m.bin").exists());

    // A new version of the name: the old blob is unnamed, then collected.
    let second = random_file(&src, 100 * 1024, 4);
    let v2 = a0
        .post(
            "/v1/blobs",
            &json!({ "path": src.display().to_string(), "name": "models/m" }),
        )
        .await
        .unwrap();
    assert_ne!(v1["blob"], v2["blob"]);
    wait_for("the unnamed blob to be removed", T, || async {
        let v = a0.get("/v1/blobs").await.ok()?;
        let ids: Vec<&str> = v["blobs"]
            .as_array()?
            .iter()
            .filter_map(|b| b["blob"].as_str())
            .collect();
        (ids == [v2["blob"].as_str().unwrap()]).then_some(())
    })
    .await;
    assert!(!root
        .join("a0/blobs/objects")
        .join(v1["blob"].as_str().unwrap())
        .exists());
    // The small one fits a1's budget and arrives.
    wait_file(&root.join("a1-placed/m.bin"), &second).await;
    let _ = first;
}

/// `Have` requests an agent answered: while a peer looks for a blob it asks
/// every connected agent every 500 ms.
const HAVE_ASKED: &str = "riftmesh_sync_requests_served_total{kind=\"have\"";

/// Wait until the name recorder of `a` has reached its log's head: a lookup
/// of a name never bound waits for that before answering 404.
async fn names_settled(a: &Agent) {
    let (s, v) = a
        .send(
            reqwest::Method::GET,
            "/v1/blob?ref=never/bound",
            &Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(s, 404, "{v}");
}

/// Wait until the series `prefix` of `a` has not moved for `quiet`: what it
/// counts has stopped (it moves more often than that while it goes on).
async fn wait_quiet(a: &Agent, prefix: &str, quiet: Duration) -> f64 {
    let last = std::sync::Mutex::new((a.metric_or_zero(prefix).await, std::time::Instant::now()));
    wait_for(
        &format!("{prefix} on {} to stop moving", a.name),
        T,
        || async {
            let v = a.metric_or_zero(prefix).await;
            let mut last = last.lock().unwrap();
            if v != last.0 {
                *last = (v, std::time::Instant::now());
            }
            (last.1.elapsed() >= quiet).then_some(v)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_name_is_fetched_nowhere_any_more_until_it_is_named_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    keygen(&root.join("swarm.key"));
    let mut a0 = start(root, "a0", &[], "").await;
    let boot = vec![a0.p2p_addr().await];
    let a1 = start(root, "a1", &boot, "").await;
    wait_for("a1 connected", T, || async {
        (a1.connected_peers().await >= 1).then_some(())
    })
    .await;
    // a0 names a model only it holds, and a1 learns the name...
    let src = root.join("lost.pth");
    random_file(&src, 1024 * 1024, 5);
    let lost = promote(&a0, &src, "models/lost").await;
    wait_for("a1 to know models/lost", T, || async {
        (blob_state(&a1, "models/lost").await["blob"] == lost["blob"]).then_some(())
    })
    .await;
    // ...then a0 is gone for good. a2 wants models: it learns the name from
    // a1 and looks for the blob without end (a failed search is retried).
    a0.kill9();
    let a2 = start(
        root,
        "a2",
        &[a1.p2p_addr().await],
        &format!("blob_retention = \"2s\"\n{}", want_models(root, "a2")),
    )
    .await;
    wait_for("a2 looking for models/lost", T, || async {
        let v = a2.get("/v1/sync").await.ok()?;
        v["transfers"]
            .as_array()?
            .iter()
            .any(|t| t["names"] == json!(["models/lost"]) && t["blob"] == lost["blob"])
            .then_some(())
    })
    .await;
    let asked = a1.metric_or_zero(HAVE_ASKED).await;
    wait_for("a2 to keep asking a1 for the blob", T, || async {
        (a1.metric_or_zero(HAVE_ASKED).await >= asked + 3.0).then_some(())
    })
    .await;

    // Forgotten on a1.
    let (ok, out, err) = cli(&a1, &["blob", "forget", "models/lost"]);
    assert!(ok, "blob forget failed: {err}");
    assert!(
        out.contains(lost["blob"].as_str().unwrap()),
        "says what it retracted: {out}"
    );
    // a2 calls its transfer off, stops asking, and the name resolves nowhere.
    wait_for("a2 to call off its transfer", T, || async {
        let v = a2.get("/v1/sync").await.ok()?;
        let off = a2
            .metric_or_zero("riftmesh_sync_transfers_total{result=\"forgotten\"}")
            .await;
        let active = a2.metric("riftmesh_sync_active").await;
        (v["transfers"].as_array()?.is_empty() && off == 1.0 && active == 0.0).then_some(())
    })
    .await;
    wait_quiet(&a1, HAVE_ASKED, Duration::from_secs(3)).await;
    assert_eq!(
        a2.metric_or_zero("riftmesh_sync_transfers_total{result=\"failed\"}")
            .await,
        0.0,
        "called off, not given up"
    );
    for a in [&a1, &a2] {
        let (s, v) = a
            .send(
                reqwest::Method::GET,
                "/v1/blob?ref=models/lost",
                &Value::Null,
            )
            .await
            .unwrap();
        assert_eq!(s, 404, "{}: {v}", a.name);
        let list = a.get("/v1/blobs").await.unwrap();
        assert!(
            !list["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == "models/lost"),
            "{list}"
        );
        assert_eq!(list["forgotten"][0]["name"], "models/lost", "{list}");
    }
    // What a forget of something else answers.
    for (body, status, says) in [
        (json!({ "name": "models/lost" }), 404, "forgotten at"),
        (json!({ "name": "models/never" }), 404, "never bound"),
        (json!({ "name": "../etc/passwd" }), 400, "name"),
        (json!({ "ref": "models/lost" }), 422, "expected `name`"),
    ] {
        let (s, v) = a1
            .send(reqwest::Method::POST, "/v1/blob/forget", &body)
            .await
            .unwrap();
        assert_eq!(s, status, "{body}: {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains(says),
            "{body}: {v}"
        );
    }

    // Named again, by a host that holds it: a2 fetches and places it.
    let src2 = root.join("found.pth");
    let found_data = random_file(&src2, 512 * 1024, 6);
    let found = promote(&a1, &src2, "models/lost").await;
    let placed = root.join("a2-placed/lost.bin");
    wait_file(&placed, &found_data).await;

    // A retraction older than that naming, arriving late, unbinds nothing.
    let forgotten_ms = a2.get("/v1/blobs").await.unwrap()["forgotten"][0]["forgotten_ms"]
        .as_u64()
        .unwrap();
    let stale = a1
        .publish(
            "BLOB_FORGOTTEN",
            json!({ "name": "models/lost", "forgotten_ms": forgotten_ms }),
        )
        .await
        .unwrap();
    wait_for("a2 to receive the stale retraction", T, || async {
        a2.get(&format!("/v1/events/{}", stale["id"].as_str().unwrap()))
            .await
            .ok()
    })
    .await;
    names_settled(&a2).await;
    assert_eq!(blob_state(&a2, "models/lost").await["blob"], found["blob"]);

    // Forgetting a placed model leaves the placed file alone.
    let (ok, _, err) = cli(&a2, &["blob", "forget", "models/lost"]);
    assert!(ok, "blob forget failed: {err}");
    let (s, _) = a2
        .send(
            reqwest::Method::GET,
            "/v1/blob?ref=models/lost",
            &Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(s, 404, "applied on a2 before the answer");
    wait_for("a1 to apply a2's retraction", T, || async {
        let (s, _) = a1
            .send(
                reqwest::Method::GET,
                "/v1/blob?ref=models/lost",
                &Value::Null,
            )
            .await
            .ok()?;
        (s == 404).then_some(())
    })
    .await;
    assert_eq!(std::fs::read(&placed).unwrap(), found_data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retraction_learnt_before_the_older_naming_it_retracts_still_wins() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    keygen(&root.join("swarm.key"));
    // a0, alone, names a model; nobody hears of it while it is down.
    let mut a0 = start(root, "a0", &[], "").await;
    let src = root.join("late.pth");
    let data = random_file(&src, 512 * 1024, 7);
    let naming = promote(&a0, &src, "models/late").await;
    a0.kill9();
    // a1 wants models and learns the retraction first.
    let a1 = start(root, "a1", &[], &want_models(root, "a1")).await;
    let retraction = a1
        .publish(
            "BLOB_FORGOTTEN",
            json!({ "name": "models/late", "forgotten_ms": now_ms() }),
        )
        .await
        .unwrap();
    // a0 comes back and a1 catches up the older naming after it.
    a0.bootstrap = vec![a1.p2p_addr().await];
    a0.spawn().await;
    let got = wait_for("a1 to catch up the naming", T, || async {
        a1.get(&format!(
            "/v1/events/{}",
            naming["event_id"].as_str().unwrap()
        ))
        .await
        .ok()
    })
    .await;
    assert!(
        got["seq"].as_u64().unwrap() > retraction["seq"].as_u64().unwrap(),
        "the retraction came first: {got} {retraction}"
    );
    names_settled(&a1).await;
    let (s, v) = a1
        .send(
            reqwest::Method::GET,
            "/v1/blob?ref=models/late",
            &Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(s, 404, "the older naming binds nothing: {v}");
    let st = a1.get("/v1/sync").await.unwrap();
    assert!(st["transfers"].as_array().unwrap().is_empty(), "{st}");
    // Named again after the retraction: bound, fetched from a0 and placed.
    let again = promote(&a0, &src, "models/late").await;
    assert_ne!(again["event_id"], naming["event_id"]);
    wait_file(&root.join("a1-placed/late.bin"), &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retraction_leaves_a_newer_naming_bound_even_one_its_maker_had_not_heard_of() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    keygen(&root.join("swarm.key"));
    let mut a0 = start(root, "a0", &[], "").await;
    let mut a1 = start(root, "a1", &[a0.p2p_addr().await], "").await;
    // a0 names a model, and a1 learns the name.
    let src1 = root.join("v1.pth");
    random_file(&src1, 256 * 1024, 8);
    let v1 = promote(&a0, &src1, "models/x").await;
    wait_for("a1 to know models/x", T, || async {
        (blob_state(&a1, "models/x").await["blob"] == v1["blob"]).then_some(())
    })
    .await;
    // a0 is away while a1 names a newer version; then a1 is away while a0,
    // which has not heard of it, retracts the name (the one it knows).
    a0.kill9();
    let src2 = root.join("v2.pth");
    random_file(&src2, 256 * 1024, 9);
    let v2 = promote(&a1, &src2, "models/x").await;
    a1.kill9();
    a0.spawn().await;
    let forgot = a0
        .post("/v1/blob/forget", &json!({ "name": "models/x" }))
        .await
        .unwrap();
    assert_eq!(forgot["blob"], v1["blob"], "{forgot}");
    assert_eq!(forgot["naming_event_id"], v1["event_id"], "{forgot}");
    // A hand-made retraction reaching far past now is refused.
    for forgotten_ms in [now_ms() + 3_600_000, u64::MAX] {
        let (s, v) = a0
            .send(
                reqwest::Method::POST,
                "/v1/events",
                &json!({ "type": "BLOB_FORGOTTEN", "payload": { "name": "models/x", "forgotten_ms": forgotten_ms } }),
            )
            .await
            .unwrap();
        assert_eq!(s, 400, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap_or("")
                .contains("ahead of this agent's clock"),
            "{v}"
        );
    }
    // Back together: each catches up what the other did. The newer naming
    // stays bound on both, whichever order each learnt the two in.
    a1.bootstrap = vec![a0.p2p_addr().await];
    a1.spawn().await;
    for (a, id) in [(&a0, &v2["event_id"]), (&a1, &forgot["event_id"])] {
        wait_for(&format!("{} to catch up {id}", a.name), T, || async {
            a.get(&format!("/v1/events/{}", id.as_str().unwrap()))
                .await
                .ok()
        })
        .await;
        names_settled(a).await;
        assert_eq!(
            blob_state(a, "models/x").await["blob"],
            v2["blob"],
            "{}: the newer naming is bound",
            a.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retractions_are_dropped_after_the_log_retention_and_listed_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    keygen(&root.join("swarm.key"));
    // The log keeps events 5 s: a retraction is kept 10 s after its time.
    let a = start(
        root,
        "a",
        &[],
        "retention_age = \"5s\"\nblob_retention = \"2s\"\n",
    )
    .await;
    let src = root.join("p.pth");
    random_file(&src, 64 * 1024, 10);
    a.post(
        "/v1/blobs",
        &json!({ "path": src.display().to_string(), "name": "models/p" }),
    )
    .await
    .unwrap();
    a.post("/v1/blob/forget", &json!({ "name": "models/p" }))
        .await
        .unwrap();
    let list = a.get("/v1/blobs").await.unwrap();
    assert_eq!(list["forgotten"][0]["name"], "models/p", "{list}");
    assert_eq!(list["forgotten_count"], 1, "{list}");
    wait_for("the retraction to be dropped", T, || async {
        let list = a.get("/v1/blobs").await.ok()?;
        (list["forgotten_count"] == 0 && list["forgotten"] == json!([])).then_some(())
    })
    .await;
    // Many retractions: the newest 100 are listed, with the count.
    let base = now_ms() + 60_000;
    for i in 0..102u64 {
        a.publish(
            "BLOB_FORGOTTEN",
            json!({ "name": format!("models/f{i}"), "forgotten_ms": base + i }),
        )
        .await
        .unwrap();
    }
    let list = wait_for("102 retractions recorded", T, || async {
        let list = a.get("/v1/blobs").await.ok()?;
        (list["forgotten_count"] == 102).then_some(list)
    })
    .await;
    let listed = list["forgotten"].as_array().unwrap();
    assert_eq!(listed.len(), 100, "{list}");
    assert_eq!(listed[0]["name"], "models/f101");
    assert_eq!(listed[99]["name"], "models/f2");
}
