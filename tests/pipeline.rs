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
