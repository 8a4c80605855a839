//! Leader election and locks with real agents on loopback: election on start,
//! failover when the leader is killed, lock fencing across the failover, TTL
//! expiry, and a cut-off leader that stops leading and grants nothing.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{mesh_with, now_ms, wait_for, Agent};
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

/// An agent's `/v1/leader`. Every agent must answer: one whose API call
/// fails is a failure, not an agent that claims nothing.
async fn leader_view(a: &Agent) -> Value {
    a.get("/v1/leader")
        .await
        .unwrap_or_else(|e| panic!("{}: GET /v1/leader: {e}", a.name))
}

/// Agents that say they lead right now.
async fn claimants(agents: &[&Agent]) -> Vec<String> {
    let mut out = Vec::new();
    for a in agents {
        if leader_view(a).await["is_self"] == true {
            out.push(a.name.clone());
        }
    }
    out
}

/// Wait until exactly one agent claims leadership and it is the leader
/// every agent names, in one term. At no sample may two agents claim it,
/// and every agent must answer every time. Returns (leader, term).
async fn sole_leader_named_by_all(agents: &[&Agent], what: &str) -> (String, u64) {
    wait_for(what, LONG, || async {
        let mut claims = Vec::new();
        let mut named = HashSet::new();
        for a in agents {
            let v = leader_view(a).await;
            if v["is_self"] == true {
                claims.push(a.name.clone());
            }
            named.insert((v["leader"].as_str().map(String::from), v["term"].as_u64()));
        }
        assert!(claims.len() <= 1, "two agents claim leadership: {claims:?}");
        let claimant = claims.pop()?;
        let (leader, term) = match named.into_iter().collect::<Vec<_>>().as_slice() {
            [(Some(l), Some(t))] => (l.clone(), *t),
            _ => return None,
        };
        (leader == claimant).then_some((leader, term))
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
    // Exactly one agent says it is the leader: the one everyone names.
    let selves = claimants(&all).await;
    assert!(selves.len() <= 1, "{selves:?}");
    let (sole, sole_term) =
        sole_leader_named_by_all(&all, "the named leader to claim leadership").await;
    assert_eq!((sole.as_str(), sole_term), (leader.as_str(), term));
    // LEADER_ELECTED reached a non-voter, naming the leader as the seeds
    // read it (leader_id), with its term as the idempotency key.
    wait_for("LEADER_ELECTED on a4", LONG, || async {
        let evs = agents[4].all_events().await;
        evs.iter()
            .any(|e| {
                e["type"] == "LEADER_ELECTED"
                    && e["payload"]["term"] == term
                    && e["payload"]["leader_id"] == leader.as_str()
                    && e["idempotency_key"] == format!("term/{term}").as_str()
            })
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
    let (_, term3) = agreed_leader(&all, None).await;
    assert!(term3 >= term2);
    assert!(claimants(&all).await.len() <= 1, "one leader after healing");
    // The rejoining agent may start an election, so the leader can change
    // once more after the first agreement: wait for a sole claimant that
    // every agent names, in a term no older than the majority's.
    let (_, term4) = sole_leader_named_by_all(&all, "one leader after healing, named by all").await;
    assert!(term4 >= term2, "{term4} >= {term2}");
    let _ = leader2;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lock_clients_never_overlap_and_tokens_increase() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path());
    let agents = mesh_with(root.path(), 4, &["--config", &cfg]).await;
    let all: Vec<&Agent> = agents.iter().collect();
    agreed_leader(&all, None).await;
    // Four clients, one per agent, race for one lock for a while; each holds
    // a grant to its expiry (no release). A grant's window on the holder's
    // side is [send of its request, send + TTL]; the next grant must not be
    // answered before that window ends (it is made at least a TTL after the
    // previous grant was applied, which is after its request was sent).
    let history = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    let mut tasks = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let api = agent.api.clone();
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            // Each client at its own phase, so no one is always first.
            tokio::time::sleep(Duration::from_millis(13 * i as u64)).await;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while std::time::Instant::now() < deadline {
                tick.tick().await;
                let sent = now_ms();
                let r = http
                    .post(format!("{api}/v1/locks/race/acquire"))
                    .json(&json!({ "ttl_secs": 0.3, "holder": format!("client{i}") }))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    let v: Value = r.json().await.unwrap();
                    let answered = now_ms();
                    history
                        .lock()
                        .unwrap()
                        .push((v["token"].as_u64().unwrap(), sent, answered, i));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut h = history.lock().unwrap().clone();
    h.sort();
    assert!(h.len() >= 3, "too few grants to check: {h:?}");
    let holders: HashSet<usize> = h.iter().map(|g| g.3).collect();
    assert!(holders.len() >= 2, "{h:?}");
    for w in h.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert!(b.0 > a.0, "tokens strictly increase: {h:?}");
        assert!(
            b.2 >= a.1 + 300,
            "grant {b:?} answered before {a:?}'s holder's lease ended (sent + 300 ms)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_voter_list_is_reported_and_never_leads() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path());
    let agents = mesh_with(root.path(), 3, &["--config", &cfg]).await;
    let other = root.path().join("other.toml");
    std::fs::write(&other, "voters = [\"a0\", \"a1\", \"odd\"]\n").unwrap();
    let boot = vec![agents[0].p2p_addr().await];
    let odd = Agent::start_with(
        root.path(),
        "odd",
        &root.path().join("swarm.key"),
        &boot,
        &["--config".into(), other.display().to_string()],
    )
    .await;
    wait_for("a0 to report odd's voter list", LONG, || async {
        let v = agents[0].get("/v1/leader").await.ok()?;
        (v["voter_list_mismatch"] == json!(["odd"])).then_some(())
    })
    .await;
    let all: Vec<&Agent> = agents.iter().collect();
    let (leader, _) = agreed_leader(&all, None).await;
    assert_ne!(leader, "odd");
    let v = odd.get("/v1/leader").await.unwrap();
    assert_eq!(v["is_self"], false, "{v}");
    wait_for("the mismatch metric", LONG, || async {
        (agents[0].metric("riftmesh_voter_list_mismatch").await >= 1.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_run_and_run_if_leader_start_commands() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path());
    let agents = mesh_with(root.path(), 3, &["--config", &cfg]).await;
    let all: Vec<&Agent> = agents.iter().collect();
    let (leader, term) = agreed_leader(&all, None).await;
    let li = agents.iter().position(|a| a.name == leader).unwrap();
    let fi = (li + 1) % 3;
    let out = |n: &str| root.path().join(n);
    let api = |a: &Agent| a.api.trim_start_matches("http://").to_string();

    // lock run: the command sees its fencing token; the lock is released after.
    let st = std::process::Command::new(common::BIN)
        .args([
            "lock",
            "run",
            "job",
            "--ttl",
            "5s",
            "--api",
            &api(&agents[fi]),
            "--",
        ])
        .args([
            "sh",
            "-c",
            &format!("echo $RIFTMESH_LOCK_TOKEN > {}", out("token").display()),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "{st:?}");
    let token: u64 = std::fs::read_to_string(out("token"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(token > 0);
    wait_for("the lock to be released", LONG, || async {
        let v = agents[fi].get("/v1/locks").await.ok()?;
        v["locks"].as_array()?.is_empty().then_some(())
    })
    .await;

    // run --if-leader: on the leader the command runs with the term; on a
    // follower it does not start.
    let run = |a: &Agent, file: std::path::PathBuf| {
        std::process::Command::new(common::BIN)
            .args(["run", "--if-leader", "--api", &api(a), "--"])
            .args([
                "sh",
                "-c",
                &format!(
                    "echo $RIFTMESH_LEADER_TERM > {}; exec sleep 60",
                    file.display()
                ),
            ])
            .spawn()
            .unwrap()
    };
    let mut on_follower = run(&agents[fi], out("follower"));
    let mut on_leader = run(&agents[li], out("leader"));
    let got = wait_for("the leader's command to start", LONG, || async {
        std::fs::read_to_string(out("leader"))
            .ok()
            .filter(|s| !s.is_empty())
    })
    .await;
    assert_eq!(got.trim(), term.to_string());
    assert!(!out("follower").exists(), "a follower started its command");
    assert!(on_follower.try_wait().unwrap().is_none());
    // SIGTERM stops the runner and the command it started.
    for c in [&mut on_follower, &mut on_leader] {
        std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        let st = wait_for("the runner to stop", LONG, || {
            let r = c.try_wait().unwrap();
            async move { r }
        })
        .await;
        assert!(!st.success());
    }
}

/// A voter killed (-9) right after an election it took part in remembers
/// its vote and term when it restarts alone: what it read back can only come
/// from its own store (its peers are gone and it does not campaign within
/// the long election timeout it restarts with). Its Raft writes were counted
/// as synced before it was killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_killed_after_voting_remembers_its_vote() {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path());
    let mut agents = mesh_with(root.path(), 3, &["--config", &cfg]).await;
    let all: Vec<&Agent> = agents.iter().collect();
    let (leader, term) = agreed_leader(&all, None).await;
    let fi = agents.iter().position(|a| a.name != leader).unwrap();
    // The follower's vote, once it names the leader of this term.
    let vote = wait_for("the follower's vote for the leader", LONG, || async {
        let v = agents[fi].get("/v1/leader").await.ok()?;
        let vote = v["vote"].clone();
        (vote["term"] == term && vote["voted_for"] == leader.as_str()).then_some(vote)
    })
    .await;
    assert!(
        agents[fi]
            .metric("riftmesh_store_syncs_total{what=\"raft\"}")
            .await
            >= 1.0
    );
    for a in agents.iter_mut() {
        a.kill9();
    }
    // Alone, with an election timeout too long to campaign during the test.
    let alone = root.path().join("alone.toml");
    std::fs::write(
        &alone,
        "voters = [\"a0\", \"a1\", \"a2\"]\nelection_timeout = \"10m\"\n",
    )
    .unwrap();
    let b = &mut agents[fi];
    b.extra = vec!["--config".into(), alone.display().to_string()];
    b.spawn().await;
    let back = wait_for(
        "the restarted voter to read its vote back",
        Duration::from_secs(20),
        || async {
            let v = b.get("/v1/leader").await.ok()?;
            (v["vote"]["term"].as_u64()? > 0).then_some(v)
        },
    )
    .await;
    assert_eq!(back["vote"]["term"], vote["term"], "{back}");
    assert_eq!(back["vote"]["voted_for"], vote["voted_for"], "{back}");
    assert_eq!(back["term"], term, "{back}");
    b.kill9();
}
