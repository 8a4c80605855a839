//! A mutation fuzzer for the local API's JSON request bodies, driven through
//! the real axum router of a real node (sled store, network, membership,
//! blob store in a temporary directory), in process.
//!
//! Every body the API accepts is a target: publish (single and batch),
//! consumer create, ack, nack, jobs, lock acquire/renew/release, blob add,
//! blob fetch, blob forget, fault injection. Each iteration takes a seed body, mutates it
//! (structurally: values replaced by boundary values of other types, keys
//! dropped or added, arrays blown up, deep nesting; then sometimes as bytes:
//! flips, truncation, splices, junk) and sends it. The answer must be a JSON
//! body and never a 5xx (a panic fails the test); a 4xx must carry an
//! `"error"` message and leave the log, the consumers and the blob store as
//! they were; an accepted publish must store an event that verifies.
//!
//! Seeds: built here, plus every file under `tests/corpus/api_<target>/`.
//! `RIFTMESH_FUZZ_API_ITERS` (default 2000, all targets together) and
//! `RIFTMESH_FUZZ_SEED` lengthen or reproduce a run;
//! `RIFTMESH_FUZZ_WRITE_CORPUS=1` writes the built seeds into the corpus.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tower::ServiceExt;

use riftmesh::config::{AgentArgs, AgentConfig};
use riftmesh::node::Node;

fn iters() -> usize {
    std::env::var("RIFTMESH_FUZZ_API_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn rng() -> rand::rngs::StdRng {
    let base: u64 = std::env::var("RIFTMESH_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    rand::rngs::StdRng::seed_from_u64(base ^ 0xa91_b0d1e5)
}

struct Target {
    name: &'static str,
    method: Method,
    path: &'static str,
    seeds: Vec<Vec<u8>>,
    /// Some seed must be accepted (2xx): the harness reaches the handler's
    /// success path, so a refusal is the body's doing.
    must_accept: bool,
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(format!("api_{target}"))
}

fn with_corpus(target: &str, generated: Vec<Value>) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut all: Vec<Vec<u8>> = generated
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .collect();
    if std::env::var_os("RIFTMESH_FUZZ_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in all.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}.json")), s).unwrap();
        }
        return all;
    }
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            all.push(std::fs::read(&f).unwrap());
        }
    }
    all
}

fn targets(blob_file: &Path) -> Vec<Target> {
    let file = blob_file.display().to_string();
    let ev = |t: &str| json!({ "type": t, "payload": { "config": "hex8_2p", "n": 3 } });
    let t = |name, method, path, must_accept, seeds: Vec<Value>| Target {
        name,
        method,
        path,
        seeds: with_corpus(name, seeds),
        must_accept,
    };
    vec![
        t(
            "publish",
            Method::POST,
            "/v1/events",
            true,
            vec![
                ev("training.completed"),
                json!({ "type": "custom.thing" }),
                json!({ "type": "MODEL_PROMOTED", "payload": [1, 2.5, null, "x", {"a": true}],
                        "source": "trainer", "correlation_id": "run-1", "parent_id": "p-1" }),
                json!({ "type": "custom.thing", "origin": "trainer" }),
            ],
        ),
        t(
            "publish_batch",
            Method::POST,
            "/v1/events/batch",
            true,
            vec![
                json!({ "events": [ev("selfplay.started"), ev("selfplay.completed")] }),
                json!({ "events": [{ "type": "x.y", "payload": { "k": 1 } }] }),
            ],
        ),
        t(
            "consumer",
            Method::PUT,
            "/v1/consumers/fz",
            true,
            vec![
                json!({}),
                json!({ "types": ["training.*", "MODEL_PROMOTED"], "from_start": true }),
                json!({ "since": "10m" }),
                json!({ "after_seq": 1 }),
                json!({ "from_now": true, "types": [] }),
            ],
        ),
        t(
            "ack",
            Method::POST,
            "/v1/consumers/fz/ack",
            true,
            vec![json!({ "seq": 1 })],
        ),
        t(
            "nack",
            Method::POST,
            "/v1/consumers/fz/nack",
            true,
            vec![json!({ "seq": 1, "reason": "bad shape" })],
        ),
        t(
            "jobs",
            Method::POST,
            "/v1/jobs",
            true,
            vec![
                json!({ "jobs": { "selfplay": 3, "training": 1.5 }, "ttl_secs": 60 }),
                json!({ "jobs": { "selfplay": null } }),
            ],
        ),
        // No voters are configured here: every lock call is refused after
        // its body was parsed and checked.
        t(
            "lock_acquire",
            Method::POST,
            "/v1/locks/fz-lock/acquire",
            false,
            vec![json!({ "ttl_secs": 5, "holder": "fz" }), json!({})],
        ),
        t(
            "lock_renew",
            Method::POST,
            "/v1/locks/fz-lock/renew",
            false,
            vec![json!({ "token": 7 })],
        ),
        t(
            "lock_release",
            Method::POST,
            "/v1/locks/fz-lock/release",
            false,
            vec![json!({ "token": 7 })],
        ),
        t(
            "blob_add",
            Method::POST,
            "/v1/blobs",
            true,
            vec![
                json!({ "path": file, "name": "fz/games.bin" }),
                json!({ "path": file, "name": "fz/games2.bin", "event": "GAME_BATCH_READY" }),
            ],
        ),
        t(
            "blob_fetch",
            Method::POST,
            "/v1/blob/fetch",
            true,
            vec![
                json!({ "ref": "fz/games.bin" }),
                json!({ "ref": "0".repeat(64) }),
            ],
        ),
        // Names never bound here (a 404), a blob id (a 400): refused.
        t(
            "blob_forget",
            Method::POST,
            "/v1/blob/forget",
            false,
            vec![
                json!({ "name": "fz/never-named" }),
                json!({ "name": "0".repeat(64) }),
            ],
        ),
        // Fault injection is off: refused after parsing.
        t(
            "debug_block",
            Method::POST,
            "/v1/debug/block",
            false,
            vec![
                json!({ "peers": ["12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"], "block": true }),
            ],
        ),
    ]
}

/// Field names the API knows, to add where they do not belong.
const FIELDS: &[&str] = &[
    "type",
    "payload",
    "source",
    "origin",
    "correlation_id",
    "parent_id",
    "events",
    "types",
    "from_start",
    "since",
    "after_seq",
    "from_now",
    "seq",
    "reason",
    "jobs",
    "ttl_secs",
    "holder",
    "token",
    "path",
    "name",
    "event",
    "ref",
    "peers",
    "block",
    "unknown_field",
];

fn interesting(r: &mut impl Rng) -> Value {
    match r.gen_range(0..26) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(1e308),
        7 => json!(-0.0),
        8 => json!(0.05),
        9 => json!(86400.5),
        10 => json!(""),
        11 => json!(" "),
        12 => json!("x".repeat(r.gen_range(100..70_000))),
        13 => json!("../../../etc/passwd"),
        14 => json!("/"),
        15 => json!("a\u{0}b"),
        16 => json!("*"),
        17 => json!("ümlaut.ß"),
        18 => json!("10m"),
        19 => json!("2026-01-01T00:00:00Z"),
        20 => json!({}),
        21 => json!([]),
        22 => {
            // Deeper than serde_json's recursion limit.
            let depth = r.gen_range(100..300);
            let mut s = "[".repeat(depth);
            s.push_str(&"]".repeat(depth));
            serde_json::from_str::<Value>(&s).unwrap_or(json!([[[]]]))
        }
        23 => Value::Array((0..r.gen_range(200..3000)).map(|i| json!(i)).collect()),
        24 => json!("TRAINING_COMPLETED"),
        _ => json!(r.gen::<u32>()),
    }
}

/// Every node of `v` (preorder), as a path of steps.
fn paths(v: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                at.push(Step::Key(k.clone()));
                paths(c, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                at.push(Step::Index(i));
                paths(c, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn node_at<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

fn mutate_value(r: &mut impl Rng, v: &mut Value) {
    for _ in 0..r.gen_range(1..=3) {
        let mut all = Vec::new();
        paths(v, &mut Vec::new(), &mut all);
        let path = &all[r.gen_range(0..all.len())];
        let node = node_at(v, path);
        match r.gen_range(0..6) {
            0 | 1 => *node = interesting(r),
            2 => {
                if let Value::Object(m) = node {
                    if !m.is_empty() {
                        let k = m.keys().nth(r.gen_range(0..m.len())).cloned().unwrap();
                        m.remove(&k);
                    }
                }
            }
            3 => {
                if let Value::Object(m) = node {
                    m.insert(FIELDS[r.gen_range(0..FIELDS.len())].into(), interesting(r));
                }
            }
            4 => {
                if let Value::Array(a) = node {
                    if !a.is_empty() {
                        // Up to past max_batch (1000).
                        let item = a[r.gen_range(0..a.len())].clone();
                        let n = if r.gen_bool(0.2) {
                            1001
                        } else {
                            r.gen_range(1..4)
                        };
                        a.extend(std::iter::repeat_n(item, n));
                    }
                }
            }
            _ => {
                // A string or number nudged.
                match node {
                    Value::String(s) => {
                        if !s.is_empty() && r.gen_bool(0.5) {
                            let cut = r.gen_range(0..s.len());
                            let cut = (0..=cut).rev().find(|i| s.is_char_boundary(*i)).unwrap();
                            s.truncate(cut);
                        } else {
                            s.push(['.', '*', ' ', '/', 'é', '\u{0}'][r.gen_range(0..6)]);
                        }
                    }
                    Value::Number(n) => {
                        *node = match n.as_u64() {
                            Some(u) => json!(u.wrapping_add(r.gen_range(0..3)).wrapping_sub(1)),
                            None => json!(-(n.as_f64().unwrap_or(0.0))),
                        };
                    }
                    _ => *node = interesting(r),
                }
            }
        }
    }
}

fn mutate_bytes(r: &mut impl Rng, v: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..r.gen_range(1..=3) {
        match r.gen_range(0..6) {
            0 if !v.is_empty() => {
                let i = r.gen_range(0..v.len());
                v[i] ^= 1 << r.gen_range(0..8);
            }
            1 if !v.is_empty() => {
                let n = r.gen_range(0..v.len());
                v.truncate(n);
            }
            2 => {
                let mut extra = vec![0u8; r.gen_range(1..16)];
                r.fill_bytes(&mut extra);
                let i = r.gen_range(0..=v.len());
                v.splice(i..i, extra);
            }
            3 if !other.is_empty() => {
                let a = r.gen_range(0..=v.len());
                let b = r.gen_range(0..other.len());
                v.truncate(a);
                v.extend_from_slice(&other[b..]);
            }
            4 if !v.is_empty() => {
                let i = r.gen_range(0..v.len());
                let junk = b"{}[]\",:\\0-e.";
                v[i] = junk[r.gen_range(0..junk.len())];
            }
            _ => {
                let i = r.gen_range(0..=v.len());
                v.insert(i, [0x00, 0xff, 0xc3, b' '][r.gen_range(0..4)]);
            }
        }
    }
}

fn mutate(r: &mut impl Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = match serde_json::from_slice::<Value>(seed) {
        Ok(mut v) if r.gen_bool(0.8) => {
            mutate_value(r, &mut v);
            serde_json::to_vec(&v).unwrap()
        }
        _ => seed.to_vec(),
    };
    if r.gen_bool(0.3) {
        mutate_bytes(r, &mut out, other);
    }
    out
}

async fn send(app: &Router, method: Method, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{path}: answer {status} is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        )
    });
    (status, v)
}

/// What a refused request must not change: the log (less the agent's own
/// background events, membership and the like), the consumers and the
/// blob store.
#[derive(Debug, PartialEq)]
struct Snapshot {
    head: u64,
    consumers: Vec<riftmesh::store::ConsumerRec>,
    blobs: Value,
}

async fn snapshot(app: &Router, node: &Arc<Node>) -> Snapshot {
    let (_, blobs) = send(app, Method::GET, "/v1/blobs", Vec::new()).await;
    Snapshot {
        head: node.store().head(),
        consumers: node.store().consumers().unwrap(),
        blobs,
    }
}

/// Events appended after `before` that no local process asked for.
fn unchanged(node: &Node, before: &Snapshot, after: &Snapshot) -> Result<(), String> {
    if before.consumers != after.consumers {
        return Err(format!(
            "consumers {:?} became {:?}",
            before.consumers, after.consumers
        ));
    }
    if before.blobs != after.blobs {
        // A naming event accepted earlier is applied to the blob store by a
        // subscriber of the log, a moment later: a name that appeared is
        // allowed when its event was already in the log before this request.
        let old = before.blobs["names"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let earlier = |n: &Value| {
            old.contains(n)
                || n["event_id"].as_str().is_some_and(|id| {
                    node.store()
                        .get_by_id(id)
                        .ok()
                        .flatten()
                        .is_some_and(|(seq, _)| seq <= before.head)
                })
        };
        let names = after.blobs["names"].as_array().cloned().unwrap_or_default();
        if names.len() < old.len() || !names.iter().all(earlier) {
            return Err(format!("blobs {} became {}", before.blobs, after.blobs));
        }
    }
    let (events, _) = node
        .store()
        .read_after(before.head, 10_000, 10_000, &[])
        .unwrap();
    for (seq, s) in events {
        if !s
            .event
            .origin
            .as_deref()
            .is_some_and(|o| ["riftmesh/membership", "riftmesh/leader"].contains(&o))
        {
            return Err(format!(
                "event {seq} ({}, origin {:?}) was appended",
                s.event.event_type, s.event.origin
            ));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_bodies_are_parsed_and_validated_or_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let blob_file = tmp.path().join("games.bin");
    std::fs::write(&blob_file, vec![7u8; 300_000]).unwrap();
    let args = AgentArgs {
        name: Some("fuzz".into()),
        data_dir: Some(tmp.path().join("agent")),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        api: Some("127.0.0.1:0".into()),
        metrics: Some("127.0.0.1:0".into()),
        no_mdns: true,
        blob_root: vec![tmp.path().to_path_buf()],
        ..Default::default()
    };
    let cfg = AgentConfig::resolve(&args, None).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let node = Node::start(cfg, &mut registry).unwrap();
    let app = riftmesh::api::router(
        node.clone(),
        std::sync::Arc::new(riftmesh::api::ApiAuth::open()),
    );
    let targets = targets(&blob_file);

    let started = std::time::Instant::now();
    let mut accepted: HashMap<&str, usize> = HashMap::new();
    let mut refused: HashMap<&str, usize> = HashMap::new();
    let mut before = snapshot(&app, &node).await;
    let mut r = rng();
    let n = iters();
    // The seeds first, in order (the consumer exists before ack and nack),
    // then mutations of random seeds of random targets.
    let mut plan: Vec<(usize, Vec<u8>)> = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        for s in &t.seeds {
            plan.push((ti, s.clone()));
        }
    }
    let seeded = plan.len();
    for k in 0..seeded + n {
        let (ti, body) = if let Some(p) = plan.get(k) {
            p.clone()
        } else {
            let ti = r.gen_range(0..targets.len());
            let t = &targets[ti];
            let a = &t.seeds[r.gen_range(0..t.seeds.len())];
            let b = &t.seeds[r.gen_range(0..t.seeds.len())];
            (ti, mutate(&mut r, a, b))
        };
        let t = &targets[ti];
        let shown = String::from_utf8_lossy(&body[..body.len().min(400)]).into_owned();
        let (status, answer) = send(&app, t.method.clone(), t.path, body).await;
        assert!(
            !status.is_server_error(),
            "{} answered {status} to {shown}: {answer}",
            t.name
        );
        if status.is_client_error() {
            *refused.entry(t.name).or_default() += 1;
            let msg = answer["error"].as_str().unwrap_or_default();
            assert!(
                !msg.trim().is_empty(),
                "{} refused {shown} with {status} but no error message: {answer}",
                t.name
            );
            let after = snapshot(&app, &node).await;
            if let Err(e) = unchanged(&node, &before, &after) {
                panic!(
                    "{} refused {shown} ({status}: {msg}) but the state changed: {e}",
                    t.name
                );
            }
            before = after;
        } else {
            assert!(status.is_success(), "{}: {status}", t.name);
            *accepted.entry(t.name).or_default() += 1;
            if t.name == "publish" {
                let seq = answer["seq"].as_u64().unwrap();
                let stored = node.store().get(seq).unwrap().expect("the accepted event");
                stored
                    .event
                    .verify()
                    .unwrap_or_else(|e| panic!("accepted {shown} stored an event that fails: {e}"));
            }
            before = snapshot(&app, &node).await;
        }
    }
    for t in &targets {
        if t.must_accept {
            assert!(
                accepted.get(t.name).copied().unwrap_or(0) > 0,
                "{}: nothing accepted, not even a seed",
                t.name
            );
        }
        assert!(
            refused.get(t.name).copied().unwrap_or(0) > 0 || n == 0,
            "{}: no mutation was refused (a broken mutator?)",
            t.name
        );
    }
    eprintln!(
        "api fuzz: {} requests in {:.1?}; accepted {:?}; refused {:?}",
        seeded + n,
        started.elapsed(),
        accepted,
        refused
    );
}
