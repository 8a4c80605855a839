//! Hostile members: floods of valid gossip, floods of requests, connections
//! beyond the limits, replays. Real agents on loopback and raw libp2p peers
//! speaking our protocols with the swarm key (tests/common `hostile_peer`).
//! Each case: the input is refused (or dropped as a duplicate), counted,
//! logged once, and the cluster goes on.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{bare_peer, hostile_peer, hostile_peer_with, log_lines, mesh_with, wait_for, Agent};
use libp2p::PeerId;
use riftmesh::event::{now_ms, Draft, Event};
use riftmesh::limits::NetLimits;
use riftmesh::net::{wire, Inbound, BUSY, HANDSHAKE_TIMEOUT};
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

/// The first refusal per (peer, reason) is logged with this text.
const RATE_LOG: &str = "rate limit exceeded";
const CONN_LOG: &str = "connection refused by a connection limit";

fn config(root: &Path, text: &str) -> String {
    let p = root.join("limits.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// A flooding peer lifts its own limits, so only the agent's hold it back.
fn lifted() -> NetLimits {
    NetLimits {
        max_connections: 100_000,
        max_connections_per_peer: 100_000,
        max_pending_incoming: 100_000,
        ..Default::default()
    }
}

fn seal(key: &libp2p::identity::Keypair, t: &str, seq: u64) -> Event {
    Draft::new(t, &json!({ "seq": seq }), None, None, None)
        .unwrap()
        .seal(key, seq, now_ms())
        .unwrap()
}

/// Wait until `peer` has `a` itself among its gossip peers (not only a
/// relay), so what it publishes reaches `a` directly.
async fn subscribed_to(peer: &riftmesh::net::NetHandle, a: &Agent) {
    wait_for(&format!("a gossip link to {}", a.name), LONG, || async {
        peer.peers()
            .await
            .ok()?
            .iter()
            .any(|p| p.peer_id == a.peer_id && p.gossip_subscribed)
            .then_some(())
    })
    .await;
}

async fn copies(a: &Agent, id: &str) -> usize {
    a.all_events()
        .await
        .iter()
        .filter(|e| e["id"] == id)
        .count()
}

async fn arrives(a: &Agent, id: &str) {
    wait_for(&format!("{id} at {}", a.name), LONG, || async {
        a.get(&format!("/v1/events/{id}")).await.ok()
    })
    .await;
}

/// The agent answers its API and an event published on one agent reaches the other.
async fn cluster_goes_on(from: &Agent, to: &Agent) {
    to.get("/v1/status").await.unwrap();
    let ev = from
        .publish("CUSTOM_AFTER_ATTACK", json!({ "at": now_ms() }))
        .await
        .unwrap();
    arrives(to, ev["id"].as_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gossip_flood_from_one_member_is_held_to_its_source_rate() {
    const RATE: f64 = 5.0;
    const BURST: f64 = 20.0;
    const FLOOD: u64 = 1000;
    let root = tempfile::tempdir().unwrap();
    let cfg = config(
        root.path(),
        "gossip_source_rate = 5\ngossip_source_burst = 20\n",
    );
    let agents = mesh_with(root.path(), 2, &["--config", &cfg]).await;
    let (a, b) = (&agents[0], &agents[1]);
    let (evil, _inbox, evil_key) =
        hostile_peer_with(a, &root.path().join("swarm.key"), lifted()).await;
    let evil_id = evil_key.public().to_peer_id().to_base58();

    // The member publishes valid events as itself, as fast as it can, while
    // an honest member publishes a few.
    let start = Instant::now();
    let flood = tokio::spawn(async move {
        for seq in 1..=FLOOD {
            evil.publish_event(&seal(&evil_key, "CUSTOM_FLOOD", seq))
                .await
                .unwrap();
        }
        evil
    });
    let mut honest = Vec::new();
    for i in 0..10 {
        let v = b.publish("CUSTOM_HONEST", json!({ "i": i })).await.unwrap();
        honest.push(v["id"].as_str().unwrap().to_string());
    }
    let _evil = flood.await.unwrap();
    for id in &honest {
        arrives(a, id).await;
    }

    // At most the burst plus the rate over the time elapsed passed; the rest
    // was refused and counted. (Without the limit nothing is counted, and the
    // allowance would need minutes to cover the whole flood.)
    let metric = r#"riftmesh_rate_limited_total{protocol="gossip",reason="source_rate"}"#;
    let limited = wait_for("the flood to be limited", LONG, || async {
        let limited = a.metric_or_zero(metric).await;
        let allowance = BURST + RATE * start.elapsed().as_secs_f64() + 10.0;
        (limited >= FLOOD as f64 - allowance).then_some(limited)
    })
    .await;
    assert!(limited <= FLOOD as f64, "{limited}");
    // What was refused was not stored either: a limiter that counted the
    // excess but let it through would leave the whole flood in the log.
    let stored = a
        .all_events()
        .await
        .iter()
        .filter(|e| e["type"] == "CUSTOM_FLOOD")
        .count();
    let allowance = BURST + RATE * start.elapsed().as_secs_f64() + 10.0;
    assert!(
        stored as f64 <= allowance,
        "{stored} flood events stored, allowance {allowance:.0}"
    );

    // Logged once, not per message.
    let lines = log_lines(a, &[RATE_LOG, &evil_id]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    // The honest member was never limited.
    let b_id = b.peer_id.as_str();
    assert!(log_lines(a, &[RATE_LOG, b_id]).is_empty());
    cluster_goes_on(a, b).await;
    cluster_goes_on(b, a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_flood_from_one_member_is_refused_and_others_are_answered() {
    use riftmesh::net::wire::{CatchupRequest, CatchupResponse, MemberRequest, MemberResponse};
    const RATE: f64 = 10.0;
    const BURST: f64 = 20.0;
    let root = tempfile::tempdir().unwrap();
    let cfg = config(
        root.path(),
        "peer_request_rate = { catchup = 10, member = 10 }\n",
    );
    let agents = mesh_with(root.path(), 2, &["--config", &cfg]).await;
    let (a, b) = (&agents[0], &agents[1]);
    let key = root.path().join("swarm.key");
    let (evil, _evil_inbox, evil_key) = hostile_peer_with(a, &key, lifted()).await;
    let (good, _good_inbox, good_key) = hostile_peer(a, &key).await;
    let evil_id = evil_key.public().to_peer_id().to_base58();
    let good_id = good_key.public().to_peer_id().to_base58();
    let target: PeerId = a.peer_id.parse().unwrap();

    // 400 catch-up requests and 400 pings, 40 at a time, while another peer
    // asks once every 200 ms.
    let start = Instant::now();
    let flood = async {
        let (mut busy, mut answered, mut failed) = ([0usize; 2], [0usize; 2], [0usize; 2]);
        for _ in 0..10 {
            let sync =
                futures::future::join_all((0..40).map(|_| {
                    evil.catchup_request(target, CatchupRequest::Digest { digest: [0; 32] })
                }))
                .await;
            for r in sync {
                match r {
                    Ok(CatchupResponse::Refused { reason }) if reason == BUSY => busy[0] += 1,
                    Ok(_) => answered[0] += 1,
                    Err(_) => failed[0] += 1,
                }
            }
            let member = futures::future::join_all(
                (0..40)
                    .map(|_| evil.member_request(target, MemberRequest::Ping { incarnation: 1 })),
            )
            .await;
            for r in member {
                match r {
                    Ok(MemberResponse::Refused { reason }) if reason == BUSY => busy[1] += 1,
                    Ok(_) => answered[1] += 1,
                    Err(_) => failed[1] += 1,
                }
            }
        }
        (busy, answered, failed)
    };
    let honest = async {
        let mut out = Vec::new();
        for _ in 0..10 {
            let s = good
                .catchup_request(target, CatchupRequest::Digest { digest: [0; 32] })
                .await;
            let m = good
                .member_request(target, MemberRequest::Ping { incarnation: 1 })
                .await;
            out.push((s, m));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        out
    };
    let ((busy, answered, failed), honest) = tokio::join!(flood, honest);
    let elapsed = start.elapsed().as_secs_f64();

    // The limit holds on both protocols: what was answered fits the burst
    // and the rate, and everything else got the cheap BUSY refusal. A
    // limiter that resets or drops the stream instead of answering BUSY
    // shows up as failures, and those are not allowed: on loopback every
    // request gets an answer.
    let allowance = (BURST + RATE * elapsed + 5.0) as usize;
    for p in 0..2 {
        assert_eq!(busy[p] + answered[p] + failed[p], 400);
        assert_eq!(
            failed[p], 0,
            "{p}: requests failed instead of BUSY: {failed:?}"
        );
        assert!(answered[p] <= allowance, "{p}: {answered:?} > {allowance}");
        assert!(
            busy[p] >= 400usize.saturating_sub(allowance),
            "{p}: {busy:?} BUSY, allowance {allowance}"
        );
        assert!(busy[p] > 0, "{p}: nothing refused: {busy:?}");
    }
    // The other peer was answered every time.
    for (s, m) in &honest {
        assert!(
            matches!(
                s,
                Ok(CatchupResponse::Summary { .. }) | Ok(CatchupResponse::Same)
            ),
            "{s:?}"
        );
        assert!(matches!(m, Ok(MemberResponse::Pong { .. })), "{m:?}");
    }
    // Each BUSY answer was counted, and nothing else was (neither the honest
    // peer nor the other agent was refused).
    let counted_sync = a
        .metric(r#"riftmesh_rate_limited_total{protocol="catchup",reason="peer_rate"}"#)
        .await;
    let counted_member = a
        .metric(r#"riftmesh_rate_limited_total{protocol="member",reason="peer_rate"}"#)
        .await;
    assert_eq!(counted_sync, busy[0] as f64, "{counted_sync} {busy:?}");
    assert_eq!(counted_member, busy[1] as f64, "{counted_member} {busy:?}");

    // One line per (peer, protocol); nothing about the honest peer.
    let lines = log_lines(a, &[RATE_LOG, &evil_id]);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("catchup")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("member")), "{lines:#?}");
    assert!(log_lines(a, &[RATE_LOG, &good_id]).is_empty());
    assert!(log_lines(a, &[RATE_LOG, &b.peer_id]).is_empty());

    // The honest agent stays a live member everywhere and events flow.
    let m = a.member("a1").await.unwrap();
    assert_eq!(m["state"], "alive", "{m}");
    cluster_goes_on(a, b).await;
    cluster_goes_on(b, a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_peer_limit_are_refused_and_counted() {
    const LIMIT: usize = 3;
    let (root, agents, addr) = limited_pair("max_connections_per_peer = 3\n").await;
    let (a, b) = (&agents[0], &agents[1]);
    let (evil, _inbox, evil_key) =
        hostile_peer_with(a, &root.path().join("swarm.key"), lifted()).await;
    let evil_id = evil_key.public().to_peer_id().to_base58();

    // Ten more connections from the same peer, each dialed anew.
    for _ in 0..10 {
        evil.dial(addr.clone()).await.unwrap();
    }
    let metric = r#"riftmesh_connections_refused_total{limit="per_peer",direction="in"}"#;
    let refused = wait_for("refusals to be counted", LONG, || async {
        let r = a.metric_or_zero(metric).await;
        (r >= (10 + 1 - LIMIT) as f64).then_some(r)
    })
    .await;
    assert!(refused <= 10.0, "{refused}");
    // The agent holds at most the limit of connections to that peer.
    let v = a.get("/v1/peers").await.unwrap();
    let evil_peer = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == evil_id.as_str())
        .cloned()
        .expect("the peer keeps its allowed connections");
    let held = evil_peer["addresses"].as_array().unwrap().len();
    assert!((1..=LIMIT).contains(&held), "{evil_peer}");

    // Logged once; the honest agent was never refused and stays connected.
    let lines = log_lines(a, &[CONN_LOG, &evil_id]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(log_lines(a, &[CONN_LOG, &b.peer_id]).is_empty());
    assert!(log_lines(b, &[CONN_LOG]).is_empty());
    member_stays(a, b).await;
}

/// Two meshed agents with `limits` in their config, and the first one's
/// TCP listen address.
async fn limited_pair(limits: &str) -> (tempfile::TempDir, Vec<Agent>, libp2p::Multiaddr) {
    let root = tempfile::tempdir().unwrap();
    let cfg = config(root.path(), limits);
    let agents = mesh_with(root.path(), 2, &["--config", &cfg]).await;
    let addr = tcp_addr(&agents[0]).await;
    (root, agents, addr)
}

/// `a` still holds the member `b`, and events flow both ways.
async fn member_stays(a: &Agent, b: &Agent) {
    assert!(
        holds_peer(a, &b.peer_id).await,
        "the member lost its connection"
    );
    cluster_goes_on(a, b).await;
    cluster_goes_on(b, a).await;
}

/// The agent's listen address without its `/p2p/` suffix.
async fn tcp_addr(a: &Agent) -> libp2p::Multiaddr {
    a.p2p_addr()
        .await
        .split("/p2p/")
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Connections `a` holds, all peers together (one address per connection).
async fn connections(a: &Agent) -> usize {
    let v = a.get("/v1/peers").await.unwrap();
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["addresses"].as_array().map_or(0, |a| a.len()))
        .sum()
}

async fn holds_peer(a: &Agent, id: &str) -> bool {
    let v = a.get("/v1/peers").await.unwrap();
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["peer_id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_total_limit_are_refused_and_members_keep_theirs() {
    const LIMIT: usize = 4;
    const PEERS: usize = 8;
    let (root, agents, addr) = limited_pair(&format!("max_connections = {LIMIT}\n")).await;
    let (a, b) = (&agents[0], &agents[1]);

    // Eight strangers with the swarm key (eight identities) each dial once.
    let key_path = root.path().join("swarm.key");
    let mut strangers = Vec::new();
    for _ in 0..PEERS {
        let (h, inbox, key) = bare_peer(&key_path, lifted(), vec![]);
        h.dial(addr.clone()).await.unwrap();
        strangers.push((h, inbox, key.public().to_peer_id().to_base58()));
    }
    // `a` already holds `b`, so at least PEERS + 1 - LIMIT are refused.
    let metric = r#"riftmesh_connections_refused_total{limit="total",direction="in"}"#;
    wait_for("refusals to be counted", LONG, || async {
        let r = a.metric_or_zero(metric).await;
        (r >= (PEERS + 1 - LIMIT) as f64).then_some(r)
    })
    .await;
    // No upper bound on the count: the member's own bootstrap redials are
    // refused too while the agent is full (it keeps the connection it has).
    let held = connections(a).await;
    assert!(held <= LIMIT, "{held} connections held, limit {LIMIT}");
    assert!(
        holds_peer(a, &b.peer_id).await,
        "the member lost its connection"
    );

    // Each refused stranger is logged at most once, and at least one is.
    let mut logged = 0;
    for (_, _, id) in &strangers {
        let n = log_lines(a, &[CONN_LOG, id]).len();
        assert!(n <= 1, "{id} logged {n} times");
        logged += n;
    }
    assert!(logged >= 1);
    assert!(log_lines(b, &[CONN_LOG]).is_empty());
    member_stays(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_refused_beyond_the_pending_limit_and_closed_at_the_handshake_timeout(
) {
    use tokio::io::AsyncReadExt;
    const PENDING: usize = 2;
    const SILENT: usize = 6;
    let (root, agents, addr) = limited_pair(&format!("max_pending_incoming = {PENDING}\n")).await;
    let (a, b) = (&agents[0], &agents[1]);
    let port = addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();

    // TCP connections that never send the private-network nonce: each holds
    // a pending slot until the handshake times out.
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let metric = r#"riftmesh_connections_refused_total{limit="pending_incoming",direction="in"}"#;
    let refused = wait_for("refusals to be counted", LONG, || async {
        let r = a.metric_or_zero(metric).await;
        (r >= (SILENT - PENDING) as f64).then_some(r)
    })
    .await;
    assert!(refused <= SILENT as f64, "{refused}");
    // Logged once for that address, not per connection.
    let lines = log_lines(a, &[CONN_LOG, "pending_incoming"]);
    assert_eq!(lines.len(), 1, "{lines:#?}");

    // The agent closes every silent connection: the refused at once, the
    // pending ones at the handshake timeout (at most the nonce arrives).
    let started = Instant::now();
    for mut s in silent {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(HANDSHAKE_TIMEOUT + LONG, s.read_to_end(&mut buf))
            .await
            .expect("the agent closes a silent connection");
        if let Ok(n) = read {
            assert!(n <= 24, "{n} bytes on a connection that never answered");
        }
    }
    assert!(started.elapsed() < HANDSHAKE_TIMEOUT + LONG);

    // The slots are free again: a new peer joins, and the member never left.
    let (_peer, _inbox, _key) = hostile_peer(a, &root.path().join("swarm.key")).await;
    member_stays(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_gossip_message_is_stored_once_and_counted_as_duplicate() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = common::mesh(root.path(), 2).await;
    let key = root.path().join("swarm.key");
    let (recorder, mut inbox, rec_key) = hostile_peer(&agents[0], &key).await;

    // Capture an honest member's event off the wire, and one of our own.
    let honest = agents[1]
        .publish("CUSTOM_CAPTURED", json!({ "secret": 1 }))
        .await
        .unwrap();
    let honest_id = honest["id"].as_str().unwrap().to_string();
    let captured = tokio::time::timeout(LONG, async {
        loop {
            match inbox.recv().await {
                Some(Inbound::Gossip { event, .. }) if event.id == honest_id => break event,
                Some(_) => continue,
                None => panic!("the recorder's network stopped"),
            }
        }
    })
    .await
    .expect("the honest event reaches the recorder");
    let own = seal(&rec_key, "CUSTOM_RECORDED", 1);
    recorder.publish_event(&own).await.unwrap();
    arrives(&agents[0], &own.id).await;
    let frames = [wire::encode_event(&captured), wire::encode_event(&own)];
    let ids = [captured.id.clone(), own.id.clone()];

    // Replayed later by a fresh swarm (its own gossip cache knows nothing).
    let (replayer, _i, rep_key) = hostile_peer(&agents[0], &key).await;
    subscribed_to(&replayer, &agents[0]).await;
    for f in &frames {
        replayer.publish_frame(f.clone()).await.unwrap();
    }
    // A new event after the replays: once it is in, the replays were handled.
    let marker = seal(&rep_key, "CUSTOM_MARKER", 1);
    replayer.publish_event(&marker).await.unwrap();
    arrives(&agents[0], &marker.id).await;
    for id in &ids {
        assert_eq!(copies(&agents[0], id).await, 1, "{id}");
    }

    // After an agent that holds them restarts (gossipsub's seen-cache is
    // gone), the store's persistent dedup index still knows them. (The
    // second agent restarts: it rejoins through its bootstrap address.)
    arrives(&agents[1], &own.id).await;
    agents[1].restart().await;
    wait_for("the restarted agent to rejoin", LONG, || async {
        (agents[1].connected_peers().await >= 1).then_some(())
    })
    .await;
    let dup = r#"riftmesh_events_duplicate_total{via="peers"}"#;
    let before = agents[1].metric_or_zero(dup).await;
    let (replayer2, _i2, rep2_key) = hostile_peer(&agents[1], &key).await;
    subscribed_to(&replayer2, &agents[1]).await;
    for f in &frames {
        replayer2.publish_frame(f.clone()).await.unwrap();
    }
    // (Another type: the same content would itself be a duplicate.)
    let marker2 = seal(&rep2_key, "CUSTOM_MARKER_AFTER_RESTART", 1);
    replayer2.publish_event(&marker2).await.unwrap();
    arrives(&agents[1], &marker2.id).await;
    wait_for("the replays to be counted as duplicates", LONG, || async {
        (agents[1].metric_or_zero(dup).await >= before + 2.0).then_some(())
    })
    .await;
    for id in &ids {
        assert_eq!(copies(&agents[0], id).await, 1, "{id}");
        assert_eq!(copies(&agents[1], id).await, 1, "{id}");
    }
    // A replay is not misbehaviour the agent could tell from a slow relay:
    // no refusal, no warning per message.
    let warned: Vec<String> = [&agents[0], &agents[1]]
        .iter()
        .flat_map(|a| log_lines(a, &["WARN"]))
        .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
        .collect();
    assert!(warned.is_empty(), "{warned:#?}");
    let (a, b) = agents.split_at(1);
    cluster_goes_on(&a[0], &b[0]).await;
    cluster_goes_on(&b[0], &a[0]).await;
}
