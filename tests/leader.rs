//! Leader election and locks with real agents on loopback: election on start,
//! failover when the leader is killed, lock fencing across the failover, TTL
//! expiry, and a cut-off leader that stops leading and grants nothing.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{mesh_with, wait_for, Agent};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

fn config(root: &std::path::Path) -> String {
    let p = root.join("cluster.toml");
    std::fs::write(&p, "voters = [\"a0\", \"a1\", \"a2\"]\n").unwrap();
    p.display().to_string()
}

/// The (leader, term) every given agent reports, once they all agree.
async fn agreed_leader(agents: &[&Agent], not: Option<&str>) -> (String, u64) {
    wait_for("every agent to agree on one leader", LONG, || async {
        let mut seen = HashSet::new();
        for a in agents {
            let v = a.get("/v1/leader").await.ok()?;
            let l = v["leader"].as_str()?.to_string();
            if Some(l.as_str()) == not {
                return None;
            }
            seen.insert((l, v["term"].as_u64()?));
        }
        (seen.len() == 1).then(|| seen.into_iter().next().unwrap())
    })
    .await
}

async fn acquire(a: &Agent, name: &str, ttl: f64) -> (u16, Value) {
    a.send(
        reqwest::Method::POST,
        &format!("/v1/locks/{name}/acquire"),
        &json!({ "ttl_secs": ttl }),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_failover_and_fenced_locks() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path());
    let mut agents = mesh_with(root.path(), 5, &["--config", &cfg]).await;
    let all: Vec<&Agent> = agents.iter().collect();
    let (leader, term) = agreed_leader(&all, None).await;
    assert!(["a0", "a1", "a2"].contains(&leader.as_str()), "{leader}");
    // Exactly one agent says it is the leader.
    let mut selves = 0;
    for a in &agents {
        if a.get("/v1/leader").await.unwrap()["is_self"] == true {
            selves += 1;
            assert_eq!(a.name, leader);
        }
    }
    assert_eq!(selves, 1);
    // LEADER_ELECTED reached a non-voter.
    wait_for("LEADER_ELECTED on a4", LONG, || async {
        let evs = agents[4].all_events().await;
        evs.iter()
            .any(|e| e["type"] == "LEADER_ELECTED" && e["payload"]["term"] == term)
            .then_some(())
    })
    .await;

    // A non-voter takes a lock (forwarded to the leader); another is refused.
    let (s, g) = acquire(&agents[4], "promote", 3.0).await;
    assert_eq!(s, 200, "{g}");
    let t1 = g["token"].as_u64().unwrap();
    let (s, d) = acquire(&agents[3], "promote", 3.0).await;
    assert_eq!(s, 409, "{d}");
    assert_eq!(d["holder"], "a4");
    let bad = agents[3]
        .send(reqwest::Method::POST, "/v1/locks/promote/renew", &json!({}))
        .await
        .unwrap();
    assert_eq!(bad.0, 400, "{}", bad.1);

    // Kill the leader: a new leader with a higher term, known everywhere.
    let li = agents.iter().position(|a| a.name == leader).unwrap();
    agents[li].kill9();
    let rest: Vec<&Agent> = agents
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, a)| a)
        .collect();
    let (leader2, term2) = agreed_leader(&rest, Some(&leader)).await;
    assert_ne!(leader2, leader);
    assert!(term2 > term, "{term2} > {term}");

    // The lock survived the failover; once its TTL ran out, the next grant
    // carries a higher token.
    let t2 = wait_for("a3 to get the lock after its TTL", LONG, || async {
        let (s, v) = acquire(rest[2], "promote", 30.0).await;
        if s == 409 {
            assert_eq!(v["token"].as_u64(), Some(t1), "{v}");
        }
        (s == 200).then(|| v["token"].as_u64().unwrap())
    })
    .await;
    assert!(t2 > t1, "{t2} > {t1}");
    let r = agents[4]
        .post("/v1/locks/promote/release", &json!({ "token": t1 }))
        .await;
    assert!(r.is_err(), "an old token releases nothing: {r:?}");
    let list = agents[0].get("/v1/locks").await;
    let list = match list {
        Ok(l) => l,
        Err(_) => agents[4].get("/v1/locks").await.unwrap(),
    };
    assert_eq!(list["locks"][0]["token"], t2, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_stops_leading_and_grants_nothing() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path());
    let agents = mesh_with(root.path(), 4, &["--config", &cfg, "--fault-injection"]).await;
    let all: Vec<&Agent> = agents.iter().collect();
    let (leader, term) = agreed_leader(&all, None).await;
    let li = agents.iter().position(|a| a.name == leader).unwrap();
    let others: Vec<String> = agents
        .iter()
        .filter(|a| a.name != leader)
        .map(|a| a.peer_id.clone())
        .collect();
    // Cut the leader off from everyone, both ways.
    agents[li]
        .post("/v1/debug/block", &json!({ "peers": others }))
        .await
        .unwrap();
    for a in agents.iter().filter(|a| a.name != leader) {
        a.post(
            "/v1/debug/block",
            &json!({ "peers": [agents[li].peer_id.clone()] }),
        )
        .await
        .unwrap();
    }
    let rest: Vec<&Agent> = agents.iter().filter(|a| a.name != leader).collect();
    let (leader2, term2) = agreed_leader(&rest, Some(&leader)).await;
    assert!(term2 > term);
    // The old leader no longer claims leadership (its lease ran out) and
    // grants no lock.
    wait_for("the cut-off leader to stop claiming", LONG, || async {
        (agents[li].get("/v1/leader").await.ok()?["is_self"] == false).then_some(())
    })
    .await;
    let (s, v) = acquire(&agents[li], "train", 5.0).await;
    assert!(s == 503 || s == 502, "{s}: {v}");
    // The majority side grants.
    let (s, v) = acquire(rest[0], "train", 5.0).await;
    assert_eq!(s, 200, "{v}");
    // Heal: one leader, everyone agrees.
    agents[li]
        .post(
            "/v1/debug/block",
            &json!({ "peers": others, "block": false }),
        )
        .await
        .unwrap();
    for a in agents.iter().filter(|a| a.name != leader) {
        a.post(
            "/v1/debug/block",
            &json!({ "peers": [agents[li].peer_id.clone()], "block": false }),
        )
        .await
        .unwrap();
    }
    let (leader3, term3) = agreed_leader(&all, None).await;
    assert!(term3 >= term2);
    let mut selves = Vec::new();
    for a in &agents {
        if a.get("/v1/leader").await.unwrap()["is_self"] == true {
            selves.push(a.name.clone());
        }
    }
    assert_eq!(selves, vec![leader3.clone()], "one leader after healing");
    let _ = leader2;
}
