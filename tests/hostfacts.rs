//! What hosts tell the cluster about themselves, with real agents on
//! loopback: `HOST_ONLINE` with tags and hardware, `IDLE_RESOURCE_DETECTED`
//! (GPUs through a fake `nvidia-smi`, and job counters), and the durable
//! consumers per type pattern of every host (`GET /v1/subscriptions`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{keygen, mesh_with, wait_for, Agent, BIN};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

fn config(root: &Path, body: &str) -> String {
    let p = root.join("host.toml");
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// Events of type `t` in `a`'s log.
async fn events_of(a: &Agent, t: &str) -> Vec<Value> {
    a.all_events()
        .await
        .into_iter()
        .filter(|e| e["type"] == t)
        .collect()
}

/// A fake `nvidia-smi` reporting two GPUs at the utilization written in
/// the returned file.
fn fake_nvidia_smi(root: &Path) -> (PathBuf, PathBuf) {
    let util = root.join("gpu-util");
    std::fs::write(&util, "0").unwrap();
    let script = root.join("nvidia-smi");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nu=$(cat '{}')\necho \"0, NVIDIA H100 80GB HBM3, $u, 10, 81559, 40\"\necho \"1, NVIDIA H100 80GB HBM3, $u, 10, 81559, 41\"\n",
            util.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, util)
}

/// This agent's own latest health sample time (ms).
async fn sampled_ms(a: &Agent) -> Option<u64> {
    a.member(&a.name).await?["health"]["sampled_ms"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_gpus_are_reported_once_per_idle_period() {
    let root = tempfile::tempdir().unwrap();
    let (smi, util) = fake_nvidia_smi(root.path());
    let cfg = config(
        root.path(),
        &format!(
            "tags = {{ role = \"selfplay\" }}\nhealth_interval = \"200ms\"\nidle_after = \"1s\"\nidle_gpu_util_pct = 5.0\nnvidia_smi = \"{}\"\n",
            smi.display()
        ),
    );
    let key = root.path().join("swarm.key");
    keygen(&key);
    let a = Agent::start_with(root.path(), "g0", &key, &[], &["--config".into(), cfg]).await;

    // HOST_ONLINE carries the tags and the GPUs of the first sample.
    let online = wait_for("g0's HOST_ONLINE", LONG, || async {
        events_of(&a, "HOST_ONLINE").await.into_iter().next()
    })
    .await;
    let p = &online["payload"];
    assert_eq!(p["node"], a.peer_id.as_str());
    assert_eq!(p["tags"], json!({"role": "selfplay"}), "{p}");
    assert_eq!(p["capabilities"]["gpu_count"], 2, "{p}");
    assert_eq!(
        p["capabilities"]["gpu_models"],
        json!(["NVIDIA H100 80GB HBM3"]),
        "{p}"
    );
    assert_eq!(p["capabilities"]["gpu_mem_total_mib"], 2 * 81559, "{p}");
    assert!(p["capabilities"]["cpu_count"].as_u64().unwrap() >= 1, "{p}");
    assert!(
        p["capabilities"]["mem_total_bytes"].as_u64().unwrap() > 0,
        "{p}"
    );

    // Idle (0 %) for idle_after: one event.
    let first = wait_for("a first IDLE_RESOURCE_DETECTED", LONG, || async {
        let evs = events_of(&a, "IDLE_RESOURCE_DETECTED").await;
        (!evs.is_empty()).then_some(evs)
    })
    .await;
    assert_eq!(first.len(), 1, "{first:?}");
    let p = &first[0]["payload"];
    assert_eq!(p["node"], a.peer_id.as_str());
    assert_eq!(p["name"], "g0");
    assert_eq!(p["resource"], "gpus");
    assert_eq!(p["gpus"].as_array().unwrap().len(), 2, "{p}");
    assert_eq!(p["gpus"][1]["index"], 1);
    assert_eq!(p["gpus"][0]["util_pct"], 0.0);
    assert_eq!(p["tags"]["role"], "selfplay");
    assert!(p["idle_for_ms"].as_u64().unwrap() >= 1000, "{p}");
    let since1 = p["idle_since_ms"].as_u64().unwrap();

    // Busy: a sample at 90 % is seen.
    std::fs::write(&util, "90").unwrap();
    wait_for("a busy sample", LONG, || async {
        let m = a.member("g0").await?;
        (m["health"]["gpu"]["present"][0]["util_pct"] == 90.0).then_some(())
    })
    .await;
    assert_eq!(events_of(&a, "IDLE_RESOURCE_DETECTED").await.len(), 1);

    // Idle again: a second event, for the new period.
    std::fs::write(&util, "0").unwrap();
    let second = wait_for("a second IDLE_RESOURCE_DETECTED", LONG, || async {
        let evs = events_of(&a, "IDLE_RESOURCE_DETECTED").await;
        (evs.len() >= 2).then_some(evs)
    })
    .await;
    let since2 = second[1]["payload"]["idle_since_ms"].as_u64().unwrap();
    assert!(since2 > since1, "{since1} {since2}");

    // Still idle for three more idle_after: no third event.
    let at = sampled_ms(&a).await.unwrap();
    wait_for("three more seconds of idle samples", LONG, || async {
        (sampled_ms(&a).await? > at + 3000).then_some(())
    })
    .await;
    assert_eq!(
        events_of(&a, "IDLE_RESOURCE_DETECTED").await.len(),
        2,
        "one event per idle period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_job_counters_on_a_host_without_gpus() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(
        root.path(),
        "health_interval = \"200ms\"\nidle_after = \"1s\"\nnvidia_smi = \"\"\n",
    );
    let key = root.path().join("swarm.key");
    keygen(&key);
    let a = Agent::start_with(root.path(), "c0", &key, &[], &["--config".into(), cfg]).await;
    let online = wait_for("c0's HOST_ONLINE", LONG, || async {
        events_of(&a, "HOST_ONLINE").await.into_iter().next()
    })
    .await;
    assert_eq!(online["payload"]["tags"], json!({}));
    assert_eq!(online["payload"]["capabilities"]["gpu_count"], 0);

    // No job counter: nothing to judge by, whatever the time.
    let at = sampled_ms(&a).await.unwrap();
    wait_for("two seconds of samples", LONG, || async {
        (sampled_ms(&a).await? > at + 2000).then_some(())
    })
    .await;
    assert!(events_of(&a, "IDLE_RESOURCE_DETECTED").await.is_empty());

    let report = |jobs: Value| {
        let a = &a;
        async move { a.post("/v1/jobs", &json!({ "jobs": jobs })).await.unwrap() }
    };
    report(json!({"selfplay_jobs": 0, "training_jobs": 0})).await;
    let first = wait_for("IDLE_RESOURCE_DETECTED for the jobs", LONG, || async {
        let evs = events_of(&a, "IDLE_RESOURCE_DETECTED").await;
        (!evs.is_empty()).then_some(evs)
    })
    .await;
    assert_eq!(first.len(), 1);
    let p = &first[0]["payload"];
    assert_eq!(p["resource"], "jobs", "{p}");
    assert_eq!(
        p["jobs"],
        json!({"selfplay_jobs": 0.0, "training_jobs": 0.0}),
        "{p}"
    );
    assert!(p.get("gpus").is_none(), "{p}");

    // A job runs (seen by a sample taken after the report), then stops.
    report(json!({"training_jobs": 1})).await;
    let after = riftmesh::event::now_ms();
    wait_for("a sample with the job running", LONG, || async {
        (sampled_ms(&a).await? > after).then_some(())
    })
    .await;
    report(json!({"training_jobs": 0})).await;
    let evs = wait_for("a second IDLE_RESOURCE_DETECTED", LONG, || async {
        let evs = events_of(&a, "IDLE_RESOURCE_DETECTED").await;
        (evs.len() >= 2).then_some(evs)
    })
    .await;
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_ne!(
        evs[0]["payload"]["idle_since_ms"],
        evs[1]["payload"]["idle_since_ms"]
    );
}

/// `types` of `/v1/subscriptions` as {pattern: (total, {host name: n})}
/// (the answer keys hosts by peer id, each with its name).
fn counts(v: &Value) -> Vec<(String, u64, Value)> {
    let by_name = |hosts: &Value| -> Value {
        hosts
            .as_object()
            .unwrap()
            .values()
            .map(|h| (h["name"].as_str().unwrap().to_string(), h["count"].clone()))
            .collect::<serde_json::Map<String, Value>>()
            .into()
    };
    v["types"]
        .as_object()
        .map(|t| {
            t.iter()
                .map(|(p, c)| {
                    (
                        p.clone(),
                        c["total"].as_u64().unwrap(),
                        by_name(&c["hosts"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_two_hosts_are_counted_on_a_third() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(
        root.path(),
        "tags = { role = \"training\" }\nhealth_interval = \"500ms\"\n",
    );
    let agents = mesh_with(root.path(), 3, &["--config", &cfg]).await;

    // Every HOST_ONLINE in a0's log carries its host's tags.
    wait_for("three HOST_ONLINE with tags in a0's log", LONG, || async {
        let evs = events_of(&agents[0], "HOST_ONLINE").await;
        let tagged = evs
            .iter()
            .filter(|e| e["payload"]["tags"]["role"] == "training")
            .filter(|e| e["payload"]["capabilities"]["cpu_count"].as_u64() >= Some(1))
            .count();
        (tagged == 3).then_some(())
    })
    .await;

    for (a, name, types) in [
        (1, "train-a", json!(["TRAINING_COMPLETED"])),
        (1, "train-b", json!(["training.completed"])),
        (1, "sp", json!(["SELFPLAY_*", "TRAINING_COMPLETED"])),
        (2, "train-c", json!(["TRAINING_COMPLETED"])),
        (2, "all", Value::Null),
    ] {
        let body = if types.is_null() {
            json!({})
        } else {
            json!({ "types": types })
        };
        agents[a]
            .put(&format!("/v1/consumers/{name}"), &body)
            .await
            .unwrap();
    }
    let want = vec![
        ("*".to_string(), 1, json!({"a2": 1})),
        ("SELFPLAY_*".to_string(), 1, json!({"a1": 1})),
        (
            "TRAINING_COMPLETED".to_string(),
            4,
            json!({"a1": 3, "a2": 1}),
        ),
    ];
    let v = wait_for("a1's and a2's consumers counted on a0", LONG, || async {
        let v = agents[0].get("/v1/subscriptions").await.ok()?;
        (counts(&v) == want).then_some(v)
    })
    .await;
    assert_eq!(v["hosts_without_counts"], json!([]), "{v}");
    // Hosts are keyed by peer id, the name beside it.
    assert_eq!(
        v["types"]["TRAINING_COMPLETED"]["hosts"][agents[1].peer_id.as_str()],
        json!({"name": "a1", "count": 3}),
        "{v}"
    );
    let hosts = v["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 3, "{v}");
    assert_eq!(hosts[0]["name"], "a0");
    assert_eq!(hosts[0]["is_self"], true);
    assert_eq!(hosts[0]["subscriptions"], json!({}));
    assert_eq!(hosts[1]["subscriptions"]["TRAINING_COMPLETED"], 3, "{v}");
    assert!(hosts[2]["age_ms"].as_u64().is_some(), "{v}");

    // A filter, normalized like consumer patterns; bad ones are refused.
    let v = agents[0]
        .get("/v1/subscriptions?types=training.completed")
        .await
        .unwrap();
    assert_eq!(counts(&v), want[2..].to_vec());
    for bad in ["types=", "types=bad%20pattern!", "cluster=true"] {
        let (status, body) = agents[0]
            .send(
                reqwest::Method::GET,
                &format!("/v1/subscriptions?{bad}"),
                &Value::Null,
            )
            .await
            .unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].as_str().is_some(), "{bad}: {body}");
    }

    // A deleted consumer leaves the counts.
    agents[1]
        .send(
            reqwest::Method::DELETE,
            "/v1/consumers/train-b",
            &Value::Null,
        )
        .await
        .unwrap();
    wait_for("train-b gone from a0's counts", LONG, || async {
        let v = agents[0].get("/v1/subscriptions").await.ok()?;
        let tc = counts(&v)
            .into_iter()
            .find(|c| c.0 == "TRAINING_COMPLETED")?;
        (tc.2["a1"] == 2).then_some(())
    })
    .await;

    // The CLI's table.
    let api = agents[0].api.trim_start_matches("http://").to_string();
    let out = std::process::Command::new(BIN)
        .args(["consumer", "list", "--cluster", "--api", &api])
        .env_remove("RIFTMESH_API")
        .env_remove("RIFTMESH_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("TRAINING_COMPLETED"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(" 3 ") && line.contains("a1=2 a2=1"), "{text}");
}
