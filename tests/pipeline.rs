//! The pipeline's own flows with real agents (proto-notes/events.md):
//! a rollback to an earlier model is a new promotion that every wanting
//! host places.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{keygen, wait_for, Agent, BIN};
use serde_json::Value;

fn config(root: &Path, name: &str, body: &str) -> Vec<String> {
    let p = root.join(format!("{name}.toml"));
    std::fs::write(&p, format!("blob_chunk_size = \"256KiB\"\n{body}")).unwrap();
    vec!["--config".into(), p.display().to_string()]
}

fn promote(a: &Agent, file: &Path) -> Value {
    let out = Command::new(BIN)
        .args(["blob", "add"])
        .arg(file)
        .args([
            "--name",
            "models/hex8_2p",
            "--event",
            "MODEL_PROMOTED",
            "--json",
        ])
        .args(["--api", a.api.trim_start_matches("http://")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_to_an_earlier_model_is_promoted_and_placed_again() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let key = root.join("swarm.key");
    keygen(&key);
    let a = Agent::start_with(root, "a", &key, &[], &config(root, "a", "")).await;
    let boot = a.p2p_addr().await;
    let placed_dir = root.join("placed");
    let want = format!(
        "[[want]]\nnames = \"models/*\"\nplace = \"{0}/{{name}}.pth\"\n\
         [[want]]\nnames = \"games/*\"\nplace = \"{0}/games/{{name}}.npz\"\n",
        placed_dir.display()
    );
    let b = Agent::start_with(root, "b", &key, &[boot], &config(root, "b", &want)).await;
    wait_for("a and b connected", Duration::from_secs(60), || async {
        (b.connected_peers().await >= 1).then_some(())
    })
    .await;
    let placed = placed_dir.join("hex8_2p.pth");
    let version = |n: u8| -> Vec<u8> {
        (0..700_000u32)
            .map(|i| (i.wrapping_mul(31).wrapping_add(u32::from(n) * 7919) % 251) as u8)
            .collect()
    };
    let (v3, v4) = (version(3), version(4));
    let (f3, f4) = (root.join("hex8_2p_v3.pth"), root.join("hex8_2p_v4.pth"));
    std::fs::write(&f3, &v3).unwrap();
    std::fs::write(&f4, &v4).unwrap();

    let mut ids = Vec::new();
    for (file, data, what) in [
        (&f3, &v3, "v3 promoted"),
        (&f4, &v4, "v4 promoted"),
        (&f3, &v3, "rolled back to v3"),
    ] {
        let v = promote(&a, file);
        assert_eq!(v["event_duplicate"], false, "{what}: {v}");
        let id = v["event_id"].as_str().unwrap().to_string();
        assert!(!ids.contains(&id), "{what}: an earlier event id again: {v}");
        ids.push(id);
        wait_for(
            &format!("b placed the model: {what}"),
            Duration::from_secs(60),
            || async { (std::fs::read(&placed).ok()? == *data).then_some(()) },
        )
        .await;
    }
    // Every promotion reached b's log, in order.
    let v = b.get("/v1/events?types=MODEL_PROMOTED").await.unwrap();
    let got: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(
        got,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "{v}"
    );
    // Each placement on b is a MODEL_DISTRIBUTED caused by its promotion.
    let v = a.get("/v1/events?types=MODEL_DISTRIBUTED").await.unwrap();
    for e in v["events"].as_array().unwrap() {
        let c = e["correlation_id"].as_str().unwrap_or("");
        assert!(ids.iter().any(|i| i == c), "{e}");
    }

    // Game data: DATA_SYNC_STARTED then DATA_SYNC_COMPLETED from b, both
    // carrying the GAME_BATCH_READY's id as correlation and parent.
    let games = root.join("batch-0001.npz");
    std::fs::write(&games, version(9)).unwrap();
    let out = Command::new(BIN)
        .args(["blob", "add"])
        .arg(&games)
        .args([
            "--name",
            "games/hex8_2p/batch-0001",
            "--event",
            "GAME_BATCH_READY",
            "--json",
        ])
        .args(["--api", a.api.trim_start_matches("http://")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let cause = serde_json::from_slice::<Value>(&out.stdout).unwrap()["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    let steps = wait_for(
        "DATA_SYNC_STARTED and _COMPLETED from b",
        Duration::from_secs(60),
        || async {
            let v = a
                .get("/v1/events?types=DATA_SYNC_STARTED,DATA_SYNC_COMPLETED")
                .await
                .ok()?;
            let evs: Vec<Value> = v["events"].as_array()?.to_vec();
            (evs.len() >= 2).then_some(evs)
        },
    )
    .await;
    let types: Vec<&str> = steps.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        ["DATA_SYNC_STARTED", "DATA_SYNC_COMPLETED"],
        "{steps:?}"
    );
    for e in &steps {
        assert_eq!(e["correlation_id"].as_str(), Some(cause.as_str()), "{e}");
        assert_eq!(e["parent_id"].as_str(), Some(cause.as_str()), "{e}");
        assert_eq!(e["payload"]["host"], "b", "{e}");
    }
    assert_eq!(
        std::fs::read(placed_dir.join("games/hex8_2p/batch-0001.npz")).unwrap(),
        version(9)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_of_a_catalog_name_is_refused_with_its_suggestion() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("swarm.key");
    keygen(&key);
    let a = Agent::start(t.path(), "a", &key, &[]).await;
    let api = a.api.trim_start_matches("http://").to_string();
    let publish = |args: &[&str]| {
        Command::new(BIN)
            .arg("publish")
            .args(args)
            .args(["--api", &api])
            .output()
            .unwrap()
    };
    // The CLI: refused with the suggestion, nothing published.
    let out = publish(&["TRAINING_COMPLTED"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did you mean TRAINING_COMPLETED"), "{err}");
    // The API, dotted spelling, and a consumer filter too.
    let (s, v) = a
        .send(
            reqwest::Method::POST,
            "/v1/events",
            &serde_json::json!({"type": "training.complted", "payload": {}}),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    let (s, v) = a
        .send(
            reqwest::Method::PUT,
            "/v1/consumers/watcher",
            &serde_json::json!({"types": ["MODEL_PROMTED"]}),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("MODEL_PROMOTED"),
        "{v}"
    );
    // On purpose: --custom lets it through; a name far from every
    // catalog name is a custom type without asking.
    assert!(publish(&["TRAINING_COMPLTED", "--custom"]).status.success());
    assert!(publish(&["MY_OWN_PIPELINE_STEP"]).status.success());
    // The seeds' names are catalog types now, in any spelling.
    for n in [
        "REGRESSION_DETECTED",
        "elo.significant_change",
        "CURRICULUM_REBALANCED",
    ] {
        let out = publish(&[n, "--json"]);
        assert!(out.status.success(), "{n}: {out:?}");
    }
    let v = a
        .get("/v1/events?types=TRAINING_COMPLTED,TRAINING_COMPLETED")
        .await
        .unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 1, "{v}");
}

fn cli(a: &Agent, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RIFTMESH_API", a.api.trim_start_matches("http://"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Delivered events of `ty` in `a`'s history.
async fn of_type(a: &Agent, ty: &str) -> Vec<Value> {
    a.all_events()
        .await
        .into_iter()
        .filter(|e| e["type"] == ty)
        .collect()
}

/// The seeds' repeats (proto-notes/events.md §13): a daemon status that
/// flips back within the default repeat window is delivered every time (the
/// CLI gives each publish its own key); a publish retried with one
/// idempotency key is delivered once, whatever its payload; three hosts
/// reporting one HOST_OFFLINE are one fact on every host even with that
/// type's content dedup switched off (`HOST_OFFLINE = "0s"`: the agent's
/// key decides); a key-less repeat within the window is a duplicate whose
/// answer says how old the first copy is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_are_new_facts_and_retries_and_shared_observations_are_not() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let cfg = root.join("repeat.toml");
    std::fs::write(&cfg, "[repeat_windows]\nHOST_OFFLINE = \"0s\"\n").unwrap();
    let extra = ["--config", cfg.to_str().unwrap()];
    let agents = common::mesh_with(root, 4, &extra).await;
    let a = &agents[0];

    // running -> stopped -> running from the CLI: three facts.
    for status in ["running", "stopped", "running"] {
        let payload = format!(r#"{{"daemon":"data_sync","status":"{status}"}}"#);
        let (ok, out, err) = cli(
            a,
            &["publish", "DAEMON_STATUS_CHANGED", "--payload", &payload],
        );
        assert!(ok && out.starts_with("published"), "{out} {err}");
    }
    // One publish retried with its key, the retry with another payload.
    for attempt in [1, 2] {
        let status = a
            .http
            .post(format!("{}/v1/events", a.api))
            .header("Idempotency-Key", "job-42")
            .json(&serde_json::json!({"type": "TRAINING_STARTED", "payload": {"attempt": attempt}}))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "{status}");
    }
    // Two keys in two headers: which one decides is not guessed.
    let two = a
        .http
        .post(format!("{}/v1/events", a.api))
        .header("Idempotency-Key", "job-43")
        .header("Idempotency-Key", "job-44")
        .json(&serde_json::json!({"type": "TRAINING_STARTED", "payload": {"attempt": 9}}))
        .send()
        .await
        .unwrap();
    assert_eq!(two.status().as_u16(), 400);
    assert!(two
        .text()
        .await
        .unwrap()
        .contains("several Idempotency-Key headers"));
    let hist = of_type(a, "TRAINING_STARTED").await;
    assert_eq!(hist.len(), 1, "{hist:?}");
    assert_eq!(hist[0]["idempotency_key"], "job-42");
    assert_eq!(hist[0]["payload"]["attempt"], 1);
    let first_id = hist[0]["id"].as_str().unwrap().to_string();
    let again = a
        .post(
            "/v1/events",
            &serde_json::json!({"type": "TRAINING_STARTED", "payload": {"attempt": 3}, "idempotency_key": "job-42"}),
        )
        .await
        .unwrap();
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["duplicate_by"], "idempotency_key", "{again}");
    assert_eq!(again["id"], first_id.as_str(), "{again}");
    // Key-less: the same content twice within the window is one fact.
    let p1 = a
        .publish("CUSTOM_PING", serde_json::json!({"n": 1}))
        .await
        .unwrap();
    let p2 = a
        .publish("CUSTOM_PING", serde_json::json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(
        (p1["duplicate"].clone(), p2["duplicate"].clone()),
        (false.into(), true.into())
    );
    assert_eq!(p2["duplicate_by"], "content", "{p2}");
    assert!(p2["age_ms"].as_u64().is_some_and(|ms| ms < 30_000), "{p2}");

    // Kill a3: every other host observes HOST_OFFLINE of a3 at one incarnation.
    let victim = agents[3].peer_id.clone();
    let mut agents = agents;
    agents[3].kill9();
    for x in &agents[..3] {
        wait_for(
            &format!("{} to log a3 offline", x.name),
            Duration::from_secs(60),
            || async {
                let off = of_type(x, "HOST_OFFLINE").await;
                off.iter()
                    .any(|e| e["payload"]["node"] == victim.as_str())
                    .then_some(())
            },
        )
        .await;
    }
    // A marker from every host after its observation: once a host holds
    // all three markers it holds every host's earlier events too (each
    // source is delivered in order).
    for x in &agents[..3] {
        x.publish("CUSTOM_MARKER", serde_json::json!({"from": x.name}))
            .await
            .unwrap();
    }
    for x in &agents[..3] {
        wait_for(
            &format!("three markers on {}", x.name),
            Duration::from_secs(60),
            || async { (of_type(x, "CUSTOM_MARKER").await.len() == 3).then_some(()) },
        )
        .await;
        let flips = of_type(x, "DAEMON_STATUS_CHANGED").await;
        let seen: Vec<&str> = flips
            .iter()
            .map(|e| e["payload"]["status"].as_str().unwrap())
            .collect();
        assert_eq!(seen, ["running", "stopped", "running"], "{}", x.name);
        assert_eq!(of_type(x, "TRAINING_STARTED").await.len(), 1, "{}", x.name);
        assert_eq!(of_type(x, "CUSTOM_PING").await.len(), 1, "{}", x.name);
        let off: Vec<Value> = of_type(x, "HOST_OFFLINE")
            .await
            .into_iter()
            .filter(|e| e["payload"]["node"] == victim.as_str())
            .collect();
        assert_eq!(off.len(), 1, "{}: {off:?}", x.name);
    }
}

/// The seeds debug with "the last N of a type" and with their consumers:
/// `events --type T --max N` gives the newest N matches (not a scan of the
/// last N log entries); the API pages newest first; a consumer's lag counts
/// only the events it matches; looking at a consumer never changes it;
/// nack, dead letters and delete are CLI verbs; `--follow` rides out an
/// agent restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_consumers_answer_the_seeds_questions() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let key = root.join("swarm.key");
    keygen(&key);
    // A fixed API port, so that a restarted agent answers where it did.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = format!("127.0.0.1:{port}");
    let mut a = Agent::start_with(root, "a", &key, &[], &["--api".into(), api.clone()]).await;
    // Five TRAINING_COMPLETED, then 25 other events: the last 10 log
    // entries are all of other types.
    for n in 0..5 {
        a.publish("TRAINING_COMPLETED", serde_json::json!({ "n": n }))
            .await
            .unwrap();
        a.publish("CUSTOM_NOISE", serde_json::json!({ "n": n }))
            .await
            .unwrap();
    }
    for n in 5..25 {
        a.publish("CUSTOM_NOISE", serde_json::json!({ "n": n }))
            .await
            .unwrap();
    }
    let ns = |out: &str| -> Vec<i64> {
        out.lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["payload"]["n"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    let (ok, out, err) = cli(
        &a,
        &[
            "events",
            "--type",
            "training.completed",
            "--max",
            "3",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(ns(&out), [2, 3, 4], "{out}");
    // Newest first from the API, paged with before.
    let v = a
        .get("/v1/events?types=TRAINING_COMPLETED&order=desc&limit=2")
        .await
        .unwrap();
    let page: Vec<i64> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(page, [4, 3], "{v}");
    let before = v["next_before"].as_u64().unwrap();
    let v = a
        .get(&format!(
            "/v1/events?types=TRAINING_COMPLETED&order=desc&limit=10&before={before}"
        ))
        .await
        .unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["done"], true, "{v}");

    // A consumer of one type: its lag is its 5 events, not the 30 entries.
    a.put(
        "/v1/consumers/watcher",
        &serde_json::json!({"types": ["TRAINING_COMPLETED"], "from_start": true}),
    )
    .await
    .unwrap();
    let c = a.get("/v1/consumers/watcher").await.unwrap();
    assert_eq!(
        (c["lag"].as_u64(), c["lag_exact"].as_bool()),
        (Some(5), Some(true)),
        "{c}"
    );
    wait_for(
        "the lag gauge to count matches",
        Duration::from_secs(30),
        || async {
            (a.metric_or_zero(r#"riftmesh_consumer_lag{consumer="watcher"}"#)
                .await
                == 5.0)
                .then_some(())
        },
    )
    .await;
    // Looking with another --type is refused and changes nothing.
    let (ok, _, err) = cli(
        &a,
        &[
            "events",
            "--consumer",
            "watcher",
            "--type",
            "MODEL_PROMOTED",
        ],
    );
    assert!(!ok && err.contains("--update"), "{err}");
    let c = a.get("/v1/consumers/watcher").await.unwrap();
    assert_eq!(c["types"], serde_json::json!(["TRAINING_COMPLETED"]), "{c}");
    assert_eq!(c["lag"], 5, "{c}");
    // Reading acknowledges: nothing pending after.
    let (ok, out, err) = cli(
        &a,
        &["events", "--consumer", "watcher", "--max", "2", "--json"],
    );
    assert!(ok, "{err}");
    assert_eq!(ns(&out), [0, 1, 2, 3, 4]);
    assert_eq!(a.get("/v1/consumers/watcher").await.unwrap()["lag"], 0);
    // nack, dead letters, list, delete from the CLI.
    let first = a
        .get("/v1/events?types=TRAINING_COMPLETED&limit=1")
        .await
        .unwrap()["events"][0]["seq"]
        .as_u64()
        .unwrap();
    let (ok, out, err) = cli(
        &a,
        &[
            "consumer",
            "nack",
            "watcher",
            &first.to_string(),
            "--reason",
            "bad model",
        ],
    );
    assert!(ok, "{out} {err}");
    let (ok, out, _) = cli(&a, &["consumer", "dead-letters", "watcher"]);
    assert!(
        ok && out.contains("bad model") && out.contains("TRAINING_COMPLETED"),
        "{out}"
    );
    let (ok, out, _) = cli(&a, &["consumer", "list"]);
    assert!(
        ok && out.lines().nth(1).is_some_and(|l| l.starts_with("watcher")),
        "{out}"
    );
    let (ok, _, err) = cli(&a, &["consumer", "delete", "watcher"]);
    assert!(ok, "{err}");
    let (status, _) = a
        .send(reqwest::Method::GET, "/v1/consumers/watcher", &Value::Null)
        .await
        .unwrap();
    assert_eq!(status, 404);

    // --follow rides out a restart of the agent.
    let mut follow = tokio::process::Command::new(BIN)
        .args([
            "events",
            "--follow",
            "--type",
            "CUSTOM_AFTER",
            "--max",
            "1",
            "--json",
        ])
        .env("RIFTMESH_API", &api)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follow.stdout.take().unwrap()));
    a.publish("CUSTOM_AFTER", serde_json::json!({"n": 100}))
        .await
        .unwrap();
    let first_line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the follower printed the event")
        .unwrap();
    let Some(first_line) = first_line else {
        let out = follow.wait_with_output().await.unwrap();
        panic!(
            "the follower exited ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    assert_eq!(ns(&first_line), [100]);
    a.restart().await;
    assert_eq!(a.api, format!("http://{api}"));
    a.publish("CUSTOM_AFTER", serde_json::json!({"n": 101}))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the follower printed the event published after the restart")
        .unwrap()
        .unwrap_or_default();
    assert_eq!(ns(&next), [101], "{next}");
    assert!(
        follow.try_wait().unwrap().is_none(),
        "the follower exited with the agent"
    );
}

/// The seeds publish `MODEL_PROMOTED {"model_id": …}` with no blob
/// reference: still a plain event, but the answer says nothing will be
/// transferred, and a counter counts it; a malformed blob reference is
/// refused, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_naming_event_without_a_blob_says_so_and_a_malformed_one_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let key = root.join("swarm.key");
    keygen(&key);
    let a = Agent::start(root, "a", &key, &[]).await;
    let r = a
        .publish(
            "MODEL_PROMOTED",
            serde_json::json!({"model_id": "v3", "elo": 1850}),
        )
        .await
        .unwrap();
    assert_eq!(r["duplicate"], false, "{r}");
    assert!(
        r["warning"]
            .as_str()
            .is_some_and(|w| w.contains("no blob reference") && w.contains("blob add")),
        "{r}"
    );
    assert_eq!(
        a.metric(r#"riftmesh_naming_events_without_blob_total{type="MODEL_PROMOTED"}"#)
            .await,
        1.0
    );
    let (ok, _, err) = cli(
        &a,
        &[
            "publish",
            "GAME_BATCH_READY",
            "--payload",
            r#"{"games": 12}"#,
        ],
    );
    assert!(
        ok && err.contains("warning") && err.contains("GAME_BATCH_READY"),
        "{err}"
    );
    // A blob reference that is malformed: 400 naming the field.
    let (status, body) = a
        .send(
            reqwest::Method::POST,
            "/v1/events",
            &serde_json::json!({"type": "MODEL_PROMOTED", "payload": {
                "name": "models/hex8_2p", "blob": "zz", "size": 1, "root": "00"}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("blob"), "{body}");
    // Other types are untouched.
    let r = a
        .publish("TRAINING_COMPLETED", serde_json::json!({"model_id": "v3"}))
        .await
        .unwrap();
    assert!(r.get("warning").is_none(), "{r}");
}

/// `source` means what the seeds mean at every local edge (api.md, "source
/// and node"): the publishing component's name, with the signing agent's
/// peer id under `node`, on the publishing host and on a peer alike; the
/// older request field `origin` is still taken; both, differing, are a 400;
/// the CLI's `--source` and its event lines say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_is_the_publishing_component_and_node_the_signing_agent() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let key = root.join("swarm.key");
    keygen(&key);
    let a = Agent::start(root, "a", &key, &[]).await;
    let b = Agent::start(root, "b", &key, &[a.p2p_addr().await]).await;
    let body = |extra: Value| {
        let mut v =
            serde_json::json!({"type": "TRAINING_COMPLETED", "payload": {"config": "hex8_2p"}});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    a.post(
        "/v1/events",
        &body(serde_json::json!({"source": "training_daemon"})),
    )
    .await
    .unwrap();
    a.post(
        "/v1/events",
        &body(serde_json::json!({"origin": "old_daemon", "payload": {"n": 2}})),
    )
    .await
    .unwrap();
    let refused = a
        .post(
            "/v1/events",
            &body(serde_json::json!({"source": "x", "origin": "y", "payload": {"n": 3}})),
        )
        .await
        .unwrap_err();
    assert!(
        refused.contains("400") && refused.contains("origin"),
        "{refused}"
    );
    let (ok, _, err) = cli(
        &a,
        &[
            "publish",
            "TRAINING_COMPLETED",
            "--payload",
            r#"{"n":4}"#,
            "--source",
            "cli_daemon",
        ],
    );
    assert!(ok, "{err}");
    for agent in [&a, &b] {
        let evs = wait_for(
            "three events with their sources",
            Duration::from_secs(20),
            || async {
                let evs = of_type(agent, "TRAINING_COMPLETED").await;
                (evs.len() == 3).then_some(evs)
            },
        )
        .await;
        let sources: Vec<&str> = evs.iter().map(|e| e["source"].as_str().unwrap()).collect();
        assert_eq!(
            sources,
            ["training_daemon", "old_daemon", "cli_daemon"],
            "{evs:?}"
        );
        for e in &evs {
            assert_eq!(e["node"], a.peer_id.as_str(), "{e}");
            assert_eq!(e["origin"], e["source"], "{e}");
        }
    }
    let (ok, out, err) = cli(
        &b,
        &["events", "--type", "TRAINING_COMPLETED", "--max", "3"],
    );
    assert!(ok, "{err}");
    let tail: String = a
        .peer_id
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert_eq!(
        out.lines()
            .filter(|l| l.contains(&format!(" a (…{tail}) ")) && l.contains(" source="))
            .count(),
        3,
        "{out}"
    );
    assert!(out.contains("source=cli_daemon"), "{out}");
}

/// `blob add` with the run's ids, as a promoter daemon would call it.
fn add_linked(a: &Agent, file: &Path, name: &str, event: &str, run: &str, parent: &str) -> String {
    let out = Command::new(BIN)
        .args(["blob", "add"])
        .arg(file)
        .args(["--name", name, "--event", event, "--source", "promoter"])
        .args(["--correlation-id", run, "--parent-id", parent, "--json"])
        .args(["--api", a.api.trim_start_matches("http://")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["event_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The seeds' run, traced end to end (proto-notes/sync.md, "Events"): a
/// TRAINING_COMPLETED of run `run-7`, the model promoted and a game batch
/// announced with the run's ids, and each of two wanting hosts placing
/// both. Every sync event carries the run's correlation id and its naming
/// event as parent, so a trace of the TRAINING_COMPLETED on any host shows
/// the whole tree: training → promotion → each host's MODEL_DISTRIBUTED,
/// and training → batch → each host's DATA_SYNC_STARTED / _COMPLETED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_of_the_run_reaches_every_hosts_placement() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let key = root.join("swarm.key");
    keygen(&key);
    let a = Agent::start_with(root, "a", &key, &[], &config(root, "a", "")).await;
    let boot = a.p2p_addr().await;
    let mut wanting = Vec::new();
    for name in ["b", "c"] {
        let want = format!(
            "[[want]]\nnames = \"models/*\"\nplace = \"{0}/{name}/{{name}}.pth\"\n\
             [[want]]\nnames = \"games/*\"\nplace = \"{0}/{name}/{{name}}.npz\"\n",
            root.join("placed").display()
        );
        wanting.push(
            Agent::start_with(
                root,
                name,
                &key,
                std::slice::from_ref(&boot),
                &config(root, name, &want),
            )
            .await,
        );
    }
    wait_for(
        "b and c connected to a",
        Duration::from_secs(60),
        || async { (a.connected_peers().await >= 2).then_some(()) },
    )
    .await;
    let trained = a
        .post(
            "/v1/events",
            &serde_json::json!({"type": "TRAINING_COMPLETED", "source": "training_daemon",
                "correlation_id": "run-7", "payload": {"config": "hex8_2p"}}),
        )
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (model, games) = (root.join("hex8_2p.pth"), root.join("batch-7.npz"));
    std::fs::write(&model, vec![7u8; 600_000]).unwrap();
    std::fs::write(&games, vec![9u8; 300_000]).unwrap();
    let promoted = add_linked(
        &a,
        &model,
        "models/hex8_2p",
        "MODEL_PROMOTED",
        "run-7",
        &trained,
    );
    let batch = add_linked(
        &a,
        &games,
        "games/hex8_2p/b7",
        "GAME_BATCH_READY",
        "run-7",
        &trained,
    );

    // Eight sync events reach a: per host a MODEL_DISTRIBUTED, and a
    // DATA_SYNC_STARTED then _COMPLETED.
    let want_under = |parent: &str, ty: &str| (parent.to_string(), ty.to_string());
    let mut expected = Vec::new();
    for _ in ["b", "c"] {
        expected.push(want_under(&promoted, "MODEL_DISTRIBUTED"));
        expected.push(want_under(&batch, "DATA_SYNC_STARTED"));
        expected.push(want_under(&batch, "DATA_SYNC_COMPLETED"));
    }
    expected.sort();
    for host in [&a, &wanting[0], &wanting[1]] {
        let tree = wait_for(
            "the whole run in the trace",
            Duration::from_secs(90),
            || async {
                let v = host.get(&format!("/v1/trace/{trained}")).await.ok()?;
                let nodes = v["events"].as_array()?.clone();
                (nodes.len() == 3 + expected.len()).then_some(nodes)
            },
        )
        .await;
        let depth_of = |id: &str| {
            tree.iter()
                .find(|n| n["event"]["id"] == id)
                .map(|n| n["depth"].as_u64().unwrap())
        };
        assert_eq!(depth_of(&trained), Some(0), "{tree:?}");
        assert_eq!(depth_of(&promoted), Some(1), "{tree:?}");
        assert_eq!(depth_of(&batch), Some(1), "{tree:?}");
        let mut synced: Vec<(String, String)> = tree
            .iter()
            .filter(|n| n["depth"] == 2)
            .map(|n| {
                let e = &n["event"];
                assert_eq!(e["correlation_id"], "run-7", "{e}");
                assert_eq!(e["source"], "riftmesh/sync", "{e}");
                (
                    e["parent_id"].as_str().unwrap().into(),
                    e["type"].as_str().unwrap().into(),
                )
            })
            .collect();
        synced.sort();
        assert_eq!(synced, expected, "{tree:?}");
        let hosts: std::collections::BTreeSet<&str> = tree
            .iter()
            .filter(|n| n["depth"] == 2)
            .filter_map(|n| n["event"]["payload"]["host"].as_str())
            .collect();
        assert_eq!(
            hosts.into_iter().collect::<Vec<_>>(),
            ["b", "c"],
            "{tree:?}"
        );
    }
    // The CLI prints the same tree, the asked event marked.
    let (ok, out, err) = cli(&wanting[1], &["trace", &trained]);
    assert!(ok, "{err}");
    assert!(out.starts_with("correlation run-7"), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("└─ MODEL_DISTRIBUTED"))
            .count(),
        2,
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("● TRAINING_COMPLETED") && l.ends_with("<=")),
        "{out}"
    );
}
