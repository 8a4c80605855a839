//! Real agents on loopback: delivery to every agent exactly once, dedup across
//! the cluster, kill -9 during a burst, private-network isolation, and hostile input.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{keygen, mesh, wait_for, Agent};
use reqwest::Method;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

async fn fetch(a: &Agent, consumer: &str, wait_ms: u64) -> Vec<Value> {
    let v = a
        .get(&format!(
            "/v1/consumers/{consumer}/events?max=1000&wait_ms={wait_ms}"
        ))
        .await
        .unwrap();
    v["events"].as_array().unwrap().clone()
}

async fn count_hash(a: &Agent, hash: &str) -> usize {
    a.all_events()
        .await
        .iter()
        .filter(|e| e["hash"] == hash)
        .count()
}

/// The log without the agents' own membership events.
async fn own_events(a: &Agent) -> Vec<serde_json::Value> {
    a.all_events()
        .await
        .into_iter()
        .filter(|e| e["source"] != "riftmesh/membership")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_reaches_every_agent_exactly_once() {
    let root = tempfile::tempdir().unwrap();
    let agents = mesh(root.path(), 3).await;
    for a in &agents[1..] {
        a.put("/v1/consumers/trainer", &json!({ "types": ["TRAINING_*"] }))
            .await
            .unwrap();
    }
    let r = agents[0]
        .publish(
            "training.completed",
            json!({ "config": "hex8_2p", "model_path": "models/hex8_2p.pth" }),
        )
        .await
        .unwrap();
    assert_eq!(r["duplicate"], false);
    assert_eq!(r["type"], "TRAINING_COMPLETED");
    agents[0]
        .publish("EVALUATION_COMPLETED", json!({ "elo": 1500 }))
        .await
        .unwrap();
    for a in &agents[1..] {
        let got = wait_for("the event on a remote consumer", LONG, || async {
            let evs = fetch(a, "trainer", 5000).await;
            (!evs.is_empty()).then_some(evs)
        })
        .await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["id"], r["id"]);
        assert_eq!(got[0]["hash"], r["hash"]);
        assert_eq!(got[0]["payload"]["config"], "hex8_2p");
        a.post(
            "/v1/consumers/trainer/ack",
            &json!({ "seq": got[0]["seq"] }),
        )
        .await
        .unwrap();
        assert!(
            fetch(a, "trainer", 0).await.is_empty(),
            "acked event delivered again"
        );
    }

    // The same fact published on two agents at once is held once everywhere.
    let payload = json!({ "model": "m-42", "config": "sq8" });
    let (x, y) = tokio::join!(
        agents[1].publish("MODEL_PROMOTED", payload.clone()),
        agents[2].publish("model.promoted", payload.clone())
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x["hash"], y["hash"]);
    let hash = x["hash"].as_str().unwrap().to_string();
    // Markers published after it from both agents: once they are everywhere,
    // the earlier copies have arrived too (gossip is ordered per connection).
    let m1 = agents[1]
        .publish("CUSTOM_MARKER", json!({ "from": 1 }))
        .await
        .unwrap();
    let m2 = agents[2]
        .publish("CUSTOM_MARKER", json!({ "from": 2 }))
        .await
        .unwrap();
    for a in &agents {
        wait_for("markers everywhere", LONG, || async {
            let evs = a.all_events().await;
            let ids: HashSet<&str> = evs.iter().filter_map(|e| e["id"].as_str()).collect();
            (ids.contains(m1["id"].as_str().unwrap()) && ids.contains(m2["id"].as_str().unwrap()))
                .then_some(())
        })
        .await;
        assert_eq!(
            count_hash(a, &hash).await,
            1,
            "{} holds the fact more than once",
            a.name
        );
    }
    // The second copy is dropped by gossipsub itself (same message id = content
    // hash) or by the store's dedup index; either way each log holds it once.
    // Publishing it again through the API is refused as a duplicate with the original id.
    let again = agents[0].publish("MODEL_PROMOTED", payload).await.unwrap();
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["hash"], hash.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_publish_burst_loses_nothing_acknowledged() {
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("swarm.key");
    keygen(&key);
    let mut agent = Agent::start(root.path(), "k0", &key, &[]).await;
    agent
        .put("/v1/consumers/c1", &json!({ "from_start": true }))
        .await
        .unwrap();
    let ok_ids: Arc<Mutex<HashSet<String>>> = Default::default();
    let acked: Arc<Mutex<HashSet<String>>> = Default::default();
    let uncertain: Arc<Mutex<HashSet<String>>> = Default::default();
    let mut counter = 0u64;
    for round in 0..5 {
        let api = agent.api.clone();
        let http = agent.http.clone();
        // 4 concurrent publishers until the agent dies under them.
        let mut tasks = Vec::new();
        for w in 0..4 {
            let (api, http, ok_ids) = (api.clone(), http.clone(), ok_ids.clone());
            let base = counter + w * 1_000_000;
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let body = json!({ "type": "SELFPLAY_COMPLETED", "payload": { "round": round, "n": base + i } });
                    match http.post(format!("{api}/v1/events")).json(&body).send().await {
                        Ok(r) if r.status() == 200 => {
                            let v: Value = match r.json().await {
                                Ok(v) => v,
                                Err(_) => return,
                            };
                            ok_ids.lock().unwrap().insert(v["id"].as_str().unwrap().to_string());
                        }
                        _ => return,
                    }
                }
            }));
        }
        counter += 10_000_000;
        // A consumer that acks as it goes.
        let consumer = {
            let (api, http, acked, uncertain) =
                (api.clone(), http.clone(), acked.clone(), uncertain.clone());
            tokio::spawn(async move {
                loop {
                    let r = match http
                        .get(format!("{api}/v1/consumers/c1/events?max=200&wait_ms=1000"))
                        .send()
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                    let Ok(v) = r.json::<Value>().await else {
                        return;
                    };
                    let evs = v["events"].as_array().cloned().unwrap_or_default();
                    let ids: Vec<String> = evs
                        .iter()
                        .map(|e| e["id"].as_str().unwrap().to_string())
                        .collect();
                    {
                        let a = acked.lock().unwrap();
                        for id in &ids {
                            assert!(!a.contains(id), "event {id} delivered again after its ack");
                        }
                    }
                    let Some(last) = evs.last() else { continue };
                    let ack = http
                        .post(format!("{api}/v1/consumers/c1/ack"))
                        .json(&json!({ "seq": last["seq"] }))
                        .send()
                        .await;
                    match ack {
                        Ok(r) if r.status() == 200 => acked.lock().unwrap().extend(ids),
                        _ => {
                            uncertain.lock().unwrap().extend(ids);
                            return;
                        }
                    }
                }
            })
        };
        let before = ok_ids.lock().unwrap().len();
        wait_for("publishes to succeed", LONG, || async {
            (ok_ids.lock().unwrap().len() >= before + 300).then_some(())
        })
        .await;
        agent.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        consumer.await.unwrap();
        agent.spawn().await;
        let all: HashSet<String> = agent
            .all_events()
            .await
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        let ok = ok_ids.lock().unwrap();
        let lost: Vec<&String> = ok.iter().filter(|id| !all.contains(*id)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} acknowledged publishes lost after kill -9, e.g. {:?}",
            lost.len(),
            lost.first()
        );
    }
    // Drain the consumer: every event is delivered once after its ack, none lost.
    loop {
        let evs = fetch(&agent, "c1", 0).await;
        let Some(last) = evs.last() else { break };
        {
            let mut a = acked.lock().unwrap();
            for e in &evs {
                let id = e["id"].as_str().unwrap().to_string();
                assert!(!a.contains(&id), "event {id} delivered again after its ack");
                a.insert(id);
            }
        }
        agent
            .post("/v1/consumers/c1/ack", &json!({ "seq": last["seq"] }))
            .await
            .unwrap();
    }
    let all: HashSet<String> = agent
        .all_events()
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let a = acked.lock().unwrap();
    let u = uncertain.lock().unwrap();
    let missing: Vec<&String> = all
        .iter()
        .filter(|id| !a.contains(*id) && !u.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events never reached the consumer",
        missing.len()
    );
    assert!(all.len() >= 1500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_another_swarm_key_never_connect() {
    let root = tempfile::tempdir().unwrap();
    let (k1, k2) = (root.path().join("k1.key"), root.path().join("k2.key"));
    keygen(&k1);
    keygen(&k2);
    let a = Agent::start(root.path(), "good", &k1, &[]).await;
    let boot = vec![a.p2p_addr().await];
    let x = Agent::start(root.path(), "other", &k2, &boot).await;
    let before = x
        .publish("CUSTOM_INJECTED", json!({ "evil": true }))
        .await
        .unwrap();
    // The outsider keeps redialing (every 5 s) and keeps failing.
    wait_for("the outsider's dials to fail", LONG, || async {
        (x.metric_or_zero("libp2p_swarm_outgoing_connection_error_total")
            .await
            >= 2.0)
            .then_some(())
    })
    .await;
    assert_eq!(a.connected_peers().await, 0);
    assert_eq!(x.connected_peers().await, 0);
    assert_eq!(count_hash(&a, before["hash"].as_str().unwrap()).await, 0);
    // Both sides say why, once per address, and count every failure.
    for (agent, dir) in [(&x, "out"), (&a, "in")] {
        let series = format!("riftmesh_handshake_failures_total{{direction=\"{dir}\"}}");
        wait_for(
            &format!("{} to count 2 failed handshakes", agent.name),
            LONG,
            || async { (agent.metric_or_zero(&series).await >= 2.0).then_some(()) },
        )
        .await;
        let warned = common::log_lines(agent, &["another swarm key"]);
        assert_eq!(warned.len(), 1, "{}: {warned:?}", agent.name);
    }
    // A legitimate member with the right key joins the same agent fine.
    let b = Agent::start(root.path(), "member", &k1, &boot).await;
    wait_for("the member to connect", LONG, || async {
        (a.connected_peers().await == 1).then_some(())
    })
    .await;
    assert_eq!(b.connected_peers().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_api_requests_get_4xx_and_write_nothing() {
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("swarm.key");
    keygen(&key);
    let a = Agent::start(root.path(), "api", &key, &[]).await;
    let raw = |body: &'static str| {
        let (http, api) = (a.http.clone(), a.api.clone());
        async move {
            let r = http
                .post(format!("{api}/v1/events"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (s, v)
        }
    };
    let cases = [
        ("{not json", 400),
        (r#"{"type": 5}"#, 422),
        (r#"{"type": "OK_TYPE", "payload": {}, "surprise": 1}"#, 422),
        (r#"{"type": "bad type!"}"#, 400),
        (r#"{"payload": {}}"#, 422),
    ];
    for (body, want) in cases {
        let (s, v) = raw(body).await;
        assert_eq!(s, want, "{body}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}: no message in {v}"
        );
    }
    // Oversized: a body past the API limit, and an event past the gossip limit.
    // The server answers 413 before reading the whole body and closes the
    // connection, so this one goes on a connection of its own, not the pool's.
    let huge = "x".repeat(9 << 20);
    let once = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = once
        .post(format!("{}/v1/events", a.api))
        .json(&json!({ "type": "BIG", "payload": { "x": huge } }))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 413),
        // The server may close while the client is still writing: still refused
        // (that nothing was written is checked below).
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    let big = "x".repeat(300 << 10);
    let (s, v) = a
        .send(
            Method::POST,
            "/v1/events",
            &json!({ "type": "BIG", "payload": { "x": big } }),
        )
        .await
        .unwrap();
    assert_eq!(s, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("limit"), "{v}");
    // A batch with one bad event writes none of them.
    let (s, v) = a
        .send(
            Method::POST,
            "/v1/events/batch",
            &json!({ "events": [{ "type": "GOOD_ONE" }, { "type": "no good" }] }),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("events[1]"), "{v}");
    // Consumers: unknown, bad names, bad acks.
    let (s, _) = a
        .send(
            Method::POST,
            "/v1/consumers/ghost/ack",
            &json!({ "seq": 1 }),
        )
        .await
        .unwrap();
    assert_eq!(s, 404);
    let (s, _) = a
        .send(Method::GET, "/v1/consumers/ghost/events", &json!(null))
        .await
        .unwrap();
    assert_eq!(s, 404);
    let (s, _) = a
        .send(Method::PUT, "/v1/consumers/bad%20name", &json!({}))
        .await
        .unwrap();
    assert_eq!(s, 400);
    a.put("/v1/consumers/real", &json!({})).await.unwrap();
    let (s, _) = a
        .send(
            Method::POST,
            "/v1/consumers/real/ack",
            &json!({ "seq": 999 }),
        )
        .await
        .unwrap();
    assert_eq!(s, 400);
    let (s, _) = a
        .send(
            Method::POST,
            "/v1/consumers/real/ack",
            &json!({ "seq": "one" }),
        )
        .await
        .unwrap();
    assert_eq!(s, 422);
    let (s, _) = a
        .send(
            Method::PUT,
            "/v1/consumers/real",
            &json!({ "from_start": true, "since": "1h" }),
        )
        .await
        .unwrap();
    assert_eq!(s, 400);
    // Bounds: too many patterns, a blank nack reason, an oversized holder.
    let many: Vec<String> = (0..257).map(|i| format!("T{i}_*")).collect();
    let (s, v) = a
        .send(Method::PUT, "/v1/consumers/real", &json!({ "types": many }))
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    let (s, v) = a
        .send(
            Method::POST,
            "/v1/consumers/real/nack",
            &json!({ "seq": 1, "reason": "  " }),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    let (s, v) = a
        .send(
            Method::POST,
            "/v1/locks/x/acquire",
            &json!({ "holder": "h".repeat(129) }),
        )
        .await
        .unwrap();
    assert_eq!(s, 400, "{v}");
    let (s, _) = a
        .send(Method::GET, "/v1/no-such-thing", &json!(null))
        .await
        .unwrap();
    assert_eq!(s, 404);
    // Nothing was written, and the agent still serves.
    let written = own_events(&a).await;
    assert!(written.is_empty(), "{written:?}");
    assert!(a.metric("riftmesh_api_errors_total").await >= 14.0);
    let ok = a.publish("GOOD_ONE", json!({})).await.unwrap();
    let written = own_events(&a).await;
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(written[0]["id"], ok["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_gossip_is_refused_and_counted() {
    use libp2p::identity::Keypair;
    use riftmesh::event::{content_hash, Draft};
    use riftmesh::net::wire;

    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("swarm.key");
    keygen(&key);
    let a = Agent::start(root.path(), "target", &key, &[]).await;
    // A peer with the right swarm key speaking our protocol, but hostile.
    let (evil, _inbound, evil_key) = common::hostile_peer(&a, &key).await;

    // A valid event from this peer is accepted (it is a member).
    let good = Draft::new("CUSTOM_GOOD", &json!({ "n": 1 }), None, None, None)
        .unwrap()
        .seal(&evil_key, 1, riftmesh::event::now_ms())
        .unwrap();
    evil.publish_event(&good).await.unwrap();
    wait_for("the valid event", LONG, || async {
        a.get(&format!("/v1/events/{}", good.id)).await.ok()
    })
    .await;

    // Garbage, an unknown version, an altered relayed event, and a forged source.
    evil.publish_frame(b"\x01\x01 definitely not an event".to_vec())
        .await
        .unwrap();
    evil.publish_frame(vec![0xff; 64]).await.unwrap();
    let victim = Keypair::generate_ed25519();
    let mut altered = Draft::new(
        "MODEL_PROMOTED",
        &json!({ "model": "good" }),
        None,
        None,
        None,
    )
    .unwrap()
    .seal(&victim, 1, 1)
    .unwrap();
    altered.payload = r#"{"model":"evil"}"#.into();
    altered.hash = content_hash(&altered.event_type, &altered.payload);
    evil.publish_frame(wire::encode_event(&altered))
        .await
        .unwrap();
    let mut forged = Draft::new(
        "MODEL_PROMOTED",
        &json!({ "model": "forged" }),
        None,
        None,
        None,
    )
    .unwrap()
    .seal(&evil_key, 2, 1)
    .unwrap();
    forged.source = victim.public().to_peer_id().to_base58();
    evil.publish_frame(wire::encode_event(&forged))
        .await
        .unwrap();
    // A frame claiming a 1 GiB vector.
    let mut bomb = vec![1u8, 1];
    bomb.extend([7u8; 32]);
    bomb.extend([0xfc, 0x00, 0x00, 0x00, 0x40]);
    evil.publish_frame(bomb).await.unwrap();

    wait_for("rejections to be counted", LONG, || async {
        (a.metric_or_zero("riftmesh_events_rejected_total").await >= 5.0).then_some(())
    })
    .await;
    let by_reason: HashMap<&str, f64> = {
        let mut m = HashMap::new();
        for r in ["decode", "version", "signature"] {
            m.insert(
                r,
                a.metric(&format!("riftmesh_events_rejected_total{{reason=\"{r}\"}}"))
                    .await,
            );
        }
        m
    };
    assert!(by_reason["decode"] >= 2.0, "{by_reason:?}");
    assert!(by_reason["version"] >= 1.0, "{by_reason:?}");
    assert!(by_reason["signature"] >= 2.0, "{by_reason:?}");
    // None of it was stored, and the agent keeps serving.
    let evs = own_events(&a).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["id"], good.id.as_str());
    a.publish("CUSTOM_AFTER", json!({})).await.unwrap();
}

fn cli(api: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(common::BIN)
        .args(args)
        .env("RIFTMESH_API", api.trim_start_matches("http://"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publishes_consumes_durably_and_traces() {
    let root = tempfile::tempdir().unwrap();
    let agents = mesh(root.path(), 2).await;
    let (a, b) = (&agents[0], &agents[1]);
    // Create the consumer on b before anything is published.
    let (ok, _, err) = cli(
        &b.api,
        &["events", "--consumer", "trainer", "--type", "TRAINING_*"],
    );
    assert!(ok, "{err}");
    let (ok, out, err) = cli(
        &a.api,
        &[
            "publish",
            "TRAINING_COMPLETED",
            "--json",
            // Key-less, so that the repeat below is judged by content.
            "--by-content",
            "--payload",
            r#"{"config":"hex8_2p","model_path":"models/hex8_2p.pth"}"#,
        ],
    );
    assert!(ok, "{err}");
    let root_ev: Value = serde_json::from_str(&out).unwrap();
    let root_id = root_ev["id"].as_str().unwrap().to_string();
    assert_eq!(root_ev["hash"].as_str().unwrap().len(), 64);
    let (ok, out, _) = cli(
        &a.api,
        &[
            "publish",
            "evaluation.completed",
            "--json",
            "--payload",
            r#"{"elo":1612}"#,
            "--correlation-id",
            &root_id,
            "--parent-id",
            &root_id,
        ],
    );
    assert!(ok);
    let child: Value = serde_json::from_str(&out).unwrap();
    let (ok, out, _) = cli(
        &a.api,
        &[
            "publish",
            "TRAINING_STARTED",
            "--payload",
            "{}",
            "--correlation-id",
            &root_id,
            "--parent-id",
            child["id"].as_str().unwrap(),
        ],
    );
    assert!(ok);
    assert!(out.starts_with("published TRAINING_STARTED"), "{out}");
    let (ok, out, _) = cli(
        &a.api,
        &[
            "publish",
            "TRAINING_COMPLETED",
            "--by-content",
            "--payload",
            r#"{"model_path":"models/hex8_2p.pth","config":"hex8_2p"}"#,
        ],
    );
    assert!(ok);
    // Without a key, the same content within the window is the same fact.
    assert!(
        out.starts_with("duplicate of") && out.contains("within the repeat window"),
        "{out}"
    );
    let (ok, _, err) = cli(&a.api, &["publish", "X", "--payload", "{nope"]);
    assert!(!ok && err.contains("--payload"), "{err}");

    // b's durable consumer gets both TRAINING_* events once, across CLI runs.
    let seen: Arc<Mutex<Vec<Value>>> = Default::default();
    wait_for("both training events on b", LONG, || {
        let api = b.api.clone();
        let seen = seen.clone();
        async move {
            let (ok, out, err) = cli(&api, &["events", "--consumer", "trainer", "--json"]);
            assert!(ok, "{err}");
            let mut seen = seen.lock().unwrap();
            seen.extend(
                out.lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()),
            );
            (seen.len() >= 2).then_some(())
        }
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen
        .iter()
        .all(|e| e["type"].as_str().unwrap().starts_with("TRAINING_")));
    let (ok, out, _) = cli(&b.api, &["events", "--consumer", "trainer", "--json"]);
    assert!(ok && out.is_empty(), "acked events came back: {out}");
    // Replay from the start on demand.
    let (ok, out, _) = cli(
        &b.api,
        &["events", "--consumer", "trainer", "--from-start", "--json"],
    );
    assert!(ok);
    assert_eq!(out.lines().count(), 2, "{out}");

    // The trace tree: root, its child, the grandchild.
    let (ok, out, err) = cli(&b.api, &["trace", &root_id]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains("TRAINING_COMPLETED")
            && lines[1].contains("EVALUATION_COMPLETED")
            && lines[2].contains("TRAINING_STARTED"),
        "{out}"
    );
    assert!(lines[2].starts_with("    "), "grandchild not nested: {out}");

    let (ok, out, _) = cli(&b.api, &["status", "--json"]);
    assert!(ok);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["consumers"][0]["name"], "trainer");
    assert_eq!(st["connected_peers"], 1);
    let (ok, out, _) = cli(&b.api, &["peers", "--json"]);
    assert!(ok);
    let p: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["peers"][0]["peer_id"], a.peer_id.as_str());
    let (ok, out, _) = cli(&b.api, &["types"]);
    assert!(
        ok && out.contains("TRAINING_COMPLETED") && out.contains("TRAINING_COMPLETE"),
        "{out}"
    );
    // An agent that is not there is named in the error.
    let (ok, _, err) = cli("127.0.0.1:1", &["status"]);
    assert!(!ok && err.contains("127.0.0.1:1"), "{err}");
}
