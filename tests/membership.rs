//! Membership and failure detection with real agents on loopback: a kill is
//! declared once everywhere, a restart comes back with a higher incarnation,
//! a paused agent is suspected and not buried, a leave is marked at once.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{mesh_with, wait_for, Agent};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

/// Events of `types` about `peer` in `a`'s log.
async fn facts(a: &Agent, types: &[&str], peer: &str) -> Vec<Value> {
    a.all_events()
        .await
        .into_iter()
        .filter(|e| types.contains(&e["type"].as_str().unwrap_or("")))
        .filter(|e| e["payload"]["node"] == peer)
        .collect()
}

async fn state_of(a: &Agent, name: &str) -> Option<String> {
    Some(a.member(name).await?["state"].as_str()?.to_string())
}

fn config(root: &Path, body: &str) -> String {
    let p = root.join("cluster.toml");
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_health_jobs_kill_and_restart() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(
        root.path(),
        "tags = { role = \"training\", provider = \"test\" }\nhealth_interval = \"1s\"\n",
    );
    let mut agents = mesh_with(root.path(), 4, &["--config", &cfg]).await;
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();

    // Every agent lists every host, alive, with health and tags.
    for a in &agents {
        wait_for(
            &format!("{} to list 4 alive members", a.name),
            LONG,
            || async {
                let v = a.get("/v1/members").await.ok()?;
                let ms = v["members"].as_array()?;
                let ok = names.iter().all(|n| {
                    ms.iter().any(|m| {
                        m["name"] == n.as_str()
                            && m["state"] == "alive"
                            && m["health"]["cpu_count"].as_u64().unwrap_or(0) >= 1
                            && m["health"]["mem_total_bytes"].as_u64().unwrap_or(0) > 0
                            && m["tags"]["role"] == "training"
                    })
                });
                (ok && ms.len() == 4).then_some(())
            },
        )
        .await;
    }
    let me = agents[0].member("a0").await.unwrap();
    assert_eq!(me["is_self"], true);
    assert!(
        me["health"]["gpu"].get("absent").is_some() || me["health"]["gpu"].get("present").is_some()
    );

    // Job counters reported on a1 travel to a0.
    let r = agents[1]
        .post(
            "/v1/jobs",
            &json!({"jobs": {"selfplay_jobs": 6, "training_jobs": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(r["jobs"]["selfplay_jobs"], 6.0);
    wait_for("a1's jobs on a0", LONG, || async {
        let m = agents[0].member("a1").await?;
        (m["jobs"]["selfplay_jobs"] == 6.0 && m["jobs"]["training_jobs"] == 1.0).then_some(())
    })
    .await;
    let (status, body) = agents[1]
        .send(
            reqwest::Method::POST,
            "/v1/jobs",
            &json!({"jobs": {"bad name!": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("bad name!"),
        "{body}"
    );

    // Kill a3: dead on every other agent, one HOST_OFFLINE in every log.
    let victim = agents[3].peer_id.clone();
    let inc_before = agents[0].member("a3").await.unwrap()["incarnation"]
        .as_u64()
        .unwrap();
    agents[3].kill9();
    for a in &agents[..3] {
        wait_for(&format!("{} to see a3 dead", a.name), LONG, || async {
            (state_of(a, "a3").await? == "dead").then_some(())
        })
        .await;
    }
    let mut ids = Vec::new();
    for a in &agents[..3] {
        let off = wait_for(
            &format!("HOST_OFFLINE of a3 in {}'s log", a.name),
            LONG,
            || async {
                let f = facts(a, &["HOST_OFFLINE"], &victim).await;
                (!f.is_empty()).then_some(f)
            },
        )
        .await;
        assert_eq!(off.len(), 1, "{}: {off:?}", a.name);
        assert_eq!(off[0]["payload"]["incarnation"], inc_before);
        ids.push(off[0]["hash"].clone());
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");

    // Restart: the same member, a higher incarnation, recovered once.
    agents[3].spawn().await;
    for a in &agents[..3] {
        let m = wait_for(&format!("{} to see a3 back", a.name), LONG, || async {
            let m = a.member("a3").await?;
            (m["state"] == "alive" && m["incarnation"].as_u64()? > inc_before).then_some(m)
        })
        .await;
        assert_eq!(m["peer_id"], victim.as_str());
        let v = a.get("/v1/members").await.unwrap();
        let same: Vec<&Value> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["name"] == "a3")
            .collect();
        assert_eq!(same.len(), 1, "a3 listed once: {same:?}");
    }
    for a in &agents[..3] {
        let rec = wait_for(
            &format!("NODE_RECOVERED of a3 in {}", a.name),
            LONG,
            || async {
                let f = facts(a, &["NODE_RECOVERED"], &victim).await;
                (!f.is_empty()).then_some(f)
            },
        )
        .await;
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert!(rec[0]["payload"]["incarnation"].as_u64().unwrap() > inc_before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_agent_is_suspected_then_alive_without_a_death() {
    let root = tempfile::tempdir().unwrap();
    // A wide suspicion window, so the test can resume the agent inside it
    // however loaded the machine is.
    let cfg = config(
        root.path(),
        "suspect_min = \"20s\"\nsuspect_max = \"30s\"\n",
    );
    let agents = mesh_with(root.path(), 4, &["--config", &cfg]).await;
    let victim = agents[3].peer_id.clone();
    let inc_before = wait_for("a3's incarnation on a0", LONG, || async {
        agents[0].member("a3").await?["incarnation"].as_u64()
    })
    .await;
    agents[3].signal("STOP");
    let suspect_seen = wait_for("a3 suspected", LONG, || async {
        for a in &agents[..3] {
            if state_of(a, "a3").await.as_deref() == Some("suspect") {
                return Some(a.name.clone());
            }
        }
        None
    })
    .await;
    agents[3].signal("CONT");
    for a in &agents[..3] {
        wait_for(
            &format!("{} to see a3 alive again", a.name),
            LONG,
            || async { (state_of(a, "a3").await? == "alive").then_some(()) },
        )
        .await;
    }
    // Its own view agrees it is a member in good standing.
    wait_for("a3 to answer", LONG, || async {
        agents[3].member("a0").await.map(|_| ())
    })
    .await;
    for a in &agents {
        let dead = facts(a, &["HOST_OFFLINE"], &victim).await;
        assert!(
            dead.is_empty(),
            "{} buried a3 (suspected by {suspect_seen}): {dead:?}",
            a.name
        );
    }
    // Publicly suspected? Then it refuted with a higher incarnation.
    let suspected = facts(&agents[0], &["NODE_SUSPECT"], &victim).await;
    if !suspected.is_empty() {
        for a in &agents[..3] {
            wait_for(
                &format!("{} to see a3's refutation", a.name),
                LONG,
                || async {
                    (a.member("a3").await?["incarnation"].as_u64()? > inc_before).then_some(())
                },
            )
            .await;
        }
    }
}

/// "At once": the others list a leaving agent as left within this bound of
/// its exit, less than the 3 s of silence (`suspect_after`) before failure
/// detection even starts, so the leave message, not a timeout, did it. The
/// leaving agent tells its peers and waits for their answers before it
/// exits, so the state is normally there when the exit is seen.
const AT_ONCE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_by_api_and_by_sigterm_is_marked_left_at_once() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = mesh_with(root.path(), 4, &[]).await;
    for a in &agents {
        wait_for(&format!("{} to list 4 members", a.name), LONG, || async {
            let v = a.get("/v1/members").await.ok()?;
            (v["members"]
                .as_array()?
                .iter()
                .filter(|m| m["state"] == "alive")
                .count()
                == 4)
                .then_some(())
        })
        .await;
    }
    let (p2, p3) = (agents[2].peer_id.clone(), agents[3].peer_id.clone());

    let r = agents[2].post("/v1/leave", &json!({})).await.unwrap();
    assert_eq!(r["left"], true);
    assert_eq!(r["peers_told"], 3, "{r}");
    let st = agents[2].wait_exit(LONG).await;
    let exited2 = std::time::Instant::now();
    assert!(st.success(), "{st:?}");
    for a in &agents[..2] {
        wait_for(
            &format!("{} to see a2 left within {AT_ONCE:?} of its exit", a.name),
            AT_ONCE.saturating_sub(exited2.elapsed()),
            || async { (state_of(a, "a2").await? == "left").then_some(()) },
        )
        .await;
    }

    agents[3].signal("TERM");
    let st = agents[3].wait_exit(LONG).await;
    let exited3 = std::time::Instant::now();
    assert!(st.success(), "{st:?}");
    for a in &agents[..2] {
        wait_for(
            &format!("{} to see a3 left within {AT_ONCE:?} of its exit", a.name),
            AT_ONCE.saturating_sub(exited3.elapsed()),
            || async { (state_of(a, "a3").await? == "left").then_some(()) },
        )
        .await;
    }

    for a in &agents[..2] {
        for (name, peer) in [("a2", &p2), ("a3", &p3)] {
            let left = wait_for(
                &format!("HOST_LEFT of {name} in {}", a.name),
                LONG,
                || async {
                    let f = facts(a, &["HOST_LEFT"], peer).await;
                    (!f.is_empty()).then_some(f)
                },
            )
            .await;
            assert_eq!(left.len(), 1, "{left:?}");
            let bad = facts(a, &["NODE_SUSPECT", "HOST_OFFLINE"], peer).await;
            assert!(bad.is_empty(), "{}: {name} left, yet {bad:?}", a.name);
        }
    }
}
