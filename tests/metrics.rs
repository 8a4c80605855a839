//! `/metrics` of real agents: the classic text format by default (and
//! `promtool check metrics` clean: skipped without promtool, except under
//! `CI`, where a missing promtool fails), OpenMetrics
//! when asked for; the operator's series (agent info, member state by name,
//! job counters by kind, the leader term on a non-voter, a deleted consumer's
//! lag gone, placement failures).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{keygen, wait_for, Agent, BIN};
use serde_json::json;

const T: Duration = Duration::from_secs(60);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT004: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn scrape(a: &Agent, accept: Option<&str>) -> (String, String) {
    let mut req = a.http.get(&a.metrics);
    if let Some(v) = accept {
        req = req.header("accept", v);
    }
    let r = req.send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (ctype, r.text().await.unwrap())
}

async fn text(a: &Agent) -> String {
    scrape(a, None).await.1
}

fn config(root: &Path, name: &str, body: &str) -> Vec<String> {
    let p = root.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!("mdns = false\nhealth_interval = \"1s\"\n{body}"),
    )
    .unwrap();
    vec!["--config".into(), p.display().to_string()]
}

/// `promtool check metrics` on `body`: None when promtool is not installed,
/// else (success, what it printed).
fn promtool(body: &str) -> Option<(bool, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return None,
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mut said = String::from_utf8_lossy(&out.stdout).into_owned();
    said.push_str(&String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), said))
}

/// Check the shape of both formats of one agent's /metrics.
async fn check_formats(a: &Agent) {
    let (ctype, body) = scrape(a, None).await;
    assert_eq!(ctype, TEXT004, "no Accept: the classic text format");
    assert!(
        !body.contains("# EOF") && !body.contains("# UNIT"),
        "{body}"
    );
    let mut counters = 0;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, typ) = rest.split_once(' ').unwrap();
            assert!(
                matches!(
                    typ,
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ),
                "{line}"
            );
            if typ == "counter" {
                counters += 1;
                assert!(name.ends_with("_total"), "counter family {name}");
            }
        } else if !line.starts_with('#') {
            assert!(!line.contains(" # {"), "an exemplar left: {line}");
        }
    }
    assert!(counters > 5, "{body}");
    assert!(body.contains("# TYPE riftmesh_events_published_total counter\n"));
    assert!(body.contains("# HELP riftmesh_events_published_total "));
    assert!(body.contains("# TYPE riftmesh_agent_info gauge\n"));
    assert!(
        !body.contains("summary_"),
        "no metric named after a summary"
    );

    for accept in [
        "application/openmetrics-text",
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ] {
        let (ctype, om) = scrape(a, Some(accept)).await;
        assert_eq!(ctype, OPENMETRICS, "Accept: {accept}");
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE riftmesh_events_published counter\n"));
        assert!(om.contains("\nriftmesh_events_published_total "));
        assert!(om.contains("# TYPE riftmesh_agent info\n"));
    }
    let (ctype, _) = scrape(a, Some("text/plain;version=0.0.4")).await;
    assert_eq!(ctype, TEXT004);

    match promtool(&body) {
        // CI installs promtool before the tests (.ci/run) and sets CI: a
        // missing promtool there is a failure, not a skip.
        None if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") => {
            panic!("CI is set and promtool is not on PATH: `promtool check metrics` cannot run")
        }
        None => println!("note: promtool is not on PATH: `promtool check metrics` skipped"),
        Some((ok, said)) => assert!(
            ok && said.trim().is_empty(),
            "promtool check metrics on {}: {said}",
            a.name
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_and_operator_series() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key = root.join("swarm.key");
    keygen(&key);
    // v0 votes alone; w1 wants models placed under a path that cannot be a
    // directory (a file stands in the way), and with a short blob retention
    // resumes its wants (retrying placement) every 2 s; w2 will be killed.
    let blocker = root.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let voters = "voters = [\"v0\"]\n";
    let v0 = Agent::start_with(root, "v0", &key, &[], &config(root, "v0", voters)).await;
    let boot = vec![v0.p2p_addr().await];
    let w1_cfg = format!(
        "{voters}blob_retention = \"4s\"\n[[want]]\nnames = \"models/*\"\nplace = \"{}/{{name}}.bin\"\n",
        blocker.display()
    );
    let w1 = Agent::start_with(root, "w1", &key, &boot, &config(root, "w1", &w1_cfg)).await;
    let mut w2 = Agent::start_with(root, "w2", &key, &boot, &config(root, "w2", voters)).await;
    for a in [&v0, &w1, &w2] {
        wait_for("a full mesh", T, || async {
            (a.connected_peers().await >= 2).then_some(())
        })
        .await;
    }

    // Identity.
    for a in [&v0, &w1] {
        let want = format!(
            "riftmesh_agent_info{{name=\"{}\",peer_id=\"{}\",version=\"{}\"}} 1\n",
            a.name,
            a.peer_id,
            env!("CARGO_PKG_VERSION")
        );
        assert!(text(a).await.contains(&want), "{want}");
    }

    // The leader term reaches the non-voter through LEADER_ELECTED.
    wait_for("w1 to know the leader term", T, || async {
        (w1.metric("riftmesh_leader_term ").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(
        w1.metric("riftmesh_raft_term ").await,
        0.0,
        "a non-voter has no Raft term of its own"
    );

    // Job counters are labelled by kind (Prometheus owns `job`).
    v0.post(
        "/v1/jobs",
        &json!({ "jobs": { "selfplay_jobs": 6 }, "ttl_secs": 600 }),
    )
    .await
    .unwrap();
    wait_for("the job counter", T, || async {
        (v0.metric_or_zero("riftmesh_host_jobs{kind=\"selfplay_jobs\"} ")
            .await
            == 6.0)
            .then_some(())
    })
    .await;
    assert!(!text(&v0).await.contains("riftmesh_host_jobs{job="));

    // A deleted consumer's lag series goes with it.
    v0.put("/v1/consumers/trainer", &json!({ "types": ["TRAINING_*"] }))
        .await
        .unwrap();
    v0.publish("training.completed", json!({ "run": 1 }))
        .await
        .unwrap();
    wait_for("the consumer's lag", T, || async {
        text(&v0)
            .await
            .contains("riftmesh_consumer_lag{consumer=\"trainer\"}")
            .then_some(())
    })
    .await;
    let (st, _) = v0
        .send(reqwest::Method::DELETE, "/v1/consumers/trainer", &json!({}))
        .await
        .unwrap();
    assert_eq!(st, 200);
    assert!(!text(&v0).await.contains("consumer=\"trainer\""));
    // A housekeeping pass (every 5 s) must not bring the series back. Only
    // that pass creates lag series, so a consumer made after the delete
    // showing one proves a pass has run.
    v0.put("/v1/consumers/witness", &json!({})).await.unwrap();
    wait_for("a housekeeping pass after the delete", T, || async {
        text(&v0)
            .await
            .contains("riftmesh_consumer_lag{consumer=\"witness\"}")
            .then_some(())
    })
    .await;
    assert!(!text(&v0).await.contains("consumer=\"trainer\""));

    // A blob w1 fetches but cannot place is counted.
    let src = root.join("model.bin");
    std::fs::write(&src, vec![7u8; 100_000]).unwrap();
    let out = Command::new(BIN)
        .args(["blob", "add"])
        .arg(&src)
        .args(["--name", "models/m1"])
        .env("RIFTMESH_API", v0.api.trim_start_matches("http://"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("w1 to count the placement failures", T, || async {
        (w1.metric("riftmesh_sync_place_failed_total ").await >= 3.0).then_some(())
    })
    .await;
    // Fetched once; the retries only place.
    assert_eq!(
        w1.metric("riftmesh_sync_transfers_total{result=\"completed\"}")
            .await,
        1.0
    );
    assert_eq!(w1.metric("riftmesh_sync_transfer_seconds_count").await, 1.0);

    // Member state by name; both formats while everything runs.
    let series = |name: &str, state: &str, peer: &str| {
        format!("riftmesh_member_state{{peer=\"{peer}\",name=\"{name}\",state=\"{state}\"}} 1\n")
    };
    wait_for("w2 alive on v0", T, || async {
        text(&v0)
            .await
            .contains(&series("w2", "alive", &w2.peer_id))
            .then_some(())
    })
    .await;
    assert!(text(&v0)
        .await
        .contains(&series("v0", "alive", &v0.peer_id)));
    for a in [&v0, &w1, &w2] {
        check_formats(a).await;
    }
    let w2_peer = w2.peer_id.clone();
    w2.kill9();
    // One series per state, 1 for the current one: a change of state
    // changes values, not series.
    wait_for(
        "w2 dead on v0, and only dead",
        Duration::from_secs(90),
        || async {
            let t = text(&v0).await;
            let ours: Vec<&str> = t
                .lines()
                .filter(|l| l.starts_with("riftmesh_member_state{") && l.contains(&w2_peer))
                .collect();
            let ones: Vec<&&str> = ours.iter().filter(|l| l.ends_with(" 1")).collect();
            (ours.len() == 4 && ones.len() == 1 && ones[0].contains("state=\"dead\"")).then_some(())
        },
    )
    .await;
    let t = text(&v0).await;
    assert!(t.contains(&series("w2", "dead", &w2_peer)));
    for state in ["alive", "suspect", "left"] {
        let zero = format!(
            "riftmesh_member_state{{peer=\"{w2_peer}\",name=\"w2\",state=\"{state}\"}} 0\n"
        );
        assert!(t.contains(&zero), "{zero}");
    }
    check_formats(&v0).await;
}
