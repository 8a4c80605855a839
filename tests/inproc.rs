//! Protocol scenarios on the in-process harness (tests/common/inproc.rs):
//! real agents in this process over libp2p's memory transport. Each test
//! prints how long its agents took to start and how long the scenario took
//! once they were up (`--nocapture` shows it).

#[path = "common/inproc.rs"]
mod inproc;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use inproc::{wait_until, Agent, Cluster};
use serde_json::json;

/// Deadline of one wait: generous for a loaded machine; a pass takes far less.
const T: Duration = Duration::from_secs(10);

fn report(test: &str, started: Instant, up: Instant) {
    println!(
        "{test}: agents up in {:?}, scenario {:?}",
        up - started,
        up.elapsed()
    );
}

/// Per source, the sequence numbers in the order the log holds them (every
/// type: membership facts are events of their agent too).
fn per_source(a: &Agent) -> HashMap<String, Vec<u64>> {
    let mut m: HashMap<String, Vec<u64>> = HashMap::new();
    for e in a.events() {
        m.entry(e.source.clone()).or_default().push(e.seq);
    }
    m
}

/// Ids of the events of type `t` that `a` holds.
fn ids_of(a: &Agent, t: &str) -> HashSet<String> {
    a.events()
        .into_iter()
        .filter(|e| e.event_type == t)
        .map(|e| e.id)
        .collect()
}

/// Agent 2 is cut off while agents 0 and 1 publish; once healed it catches
/// up every event, and each source's events sit in its log in sequence
/// order, 1, 2, 3, … without a hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_after_a_partition() {
    let started = Instant::now();
    let c = Cluster::start(3, |_| {}).await;
    let up = Instant::now();
    let (a0, a1, a2) = (&c.agents[0], &c.agents[1], &c.agents[2]);

    // Before the cut: one event from a0, seen by all.
    let first = a0.publish("TEST_EVENT", json!({"n": 0})).await;
    for a in &c.agents {
        wait_until(
            &format!("{} to hold the first event", a.name),
            T,
            || async { ids_of(a, "TEST_EVENT").contains(&first.id).then_some(()) },
        )
        .await;
    }

    c.isolate(2).await;
    wait_until("a2 to be cut off", T, || async {
        (!a2.connected_to(&a0.peer).await && !a2.connected_to(&a1.peer).await).then_some(())
    })
    .await;
    const N: u64 = 20;
    let mut published = HashSet::new();
    for n in 1..=N {
        published.insert(
            a0.publish("TEST_EVENT", json!({"from": "a0", "n": n}))
                .await
                .id,
        );
        published.insert(
            a1.publish("TEST_EVENT", json!({"from": "a1", "n": n}))
                .await
                .id,
        );
    }
    for a in [a0, a1] {
        wait_until(&format!("{} to hold every event", a.name), T, || async {
            ids_of(a, "TEST_EVENT")
                .is_superset(&published)
                .then_some(())
        })
        .await;
    }
    assert_eq!(
        ids_of(a2, "TEST_EVENT").len(),
        1,
        "a2 received events while cut off"
    );

    c.heal(2).await;
    wait_until("a2 to catch up every event", T, || async {
        ids_of(a2, "TEST_EVENT")
            .is_superset(&published)
            .then_some(())
    })
    .await;
    for (source, seqs) in per_source(a2) {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, want,
            "a2's log holds {source}'s events out of order or with a hole"
        );
    }
    report("catch_up_after_a_partition", started, up);
}

/// The leader as every agent of `agents` sees it, when they all agree and it
/// leads by its own view: (index of the leader, term).
fn agreed_leader(c: &Cluster, agents: &[usize]) -> Option<(usize, u64)> {
    let views: Vec<(Option<String>, u64, String)> =
        agents.iter().map(|&i| c.agents[i].leader()).collect();
    let (name, term, _) = views.first()?.clone();
    let name = name?;
    if views
        .iter()
        .any(|(l, t, _)| l.as_deref() != Some(&name) || *t != term)
    {
        return None;
    }
    let i = c.agents.iter().position(|a| a.name == name)?;
    (agents.contains(&i) && c.agents[i].leader().2 == "leader").then_some((i, term))
}

/// Three agents, all voters, with a short election timeout: below the
/// resolver's floor (150 ms), which an operator cannot set. An election
/// takes 2 x this (the lease) plus a draw in [1, 2) x this, and a split vote
/// another draw; at 150 ms the failover scenario took about 1.3 s, at 100 ms
/// about 0.7 s.
async fn three_voters() -> Cluster {
    let voters: Vec<String> = (0..3).map(|i| format!("a{i}")).collect();
    Cluster::start(3, |cfg| {
        cfg.voters = voters.clone();
        cfg.election_timeout = Duration::from_millis(100);
    })
    .await
}

/// Failover by isolation: three voters elect a leader; the leader is cut off
/// from both others, who elect a new one in a higher term; once healed there
/// is one leader all agree on, and no agent's term ever went down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_the_leader_is_cut_off() {
    let started = Instant::now();
    let c = three_voters().await;
    let up = Instant::now();
    let all = [0, 1, 2];
    // Every term each agent reported, in order: they must never go down.
    let seen = std::sync::Mutex::new(vec![Vec::<u64>::new(); 3]);
    let sample = || {
        let mut s = seen.lock().unwrap();
        for (i, a) in c.agents.iter().enumerate() {
            s[i].push(a.leader().1);
        }
    };

    let (old, t1) = wait_until("a leader all three agree on", T, || async {
        sample();
        agreed_leader(&c, &all)
    })
    .await;
    let elected = Instant::now();

    c.isolate(old).await;
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    let (new, t2) = wait_until("the other two to elect a new leader", T, || async {
        sample();
        agreed_leader(&c, &rest).filter(|(_, t)| *t > t1)
    })
    .await;
    assert_ne!(new, old);
    let failed_over = Instant::now();

    c.heal(old).await;
    let (last, t3) = wait_until(
        "one leader all three agree on after the heal",
        T,
        || async {
            sample();
            agreed_leader(&c, &all).filter(|(_, t)| *t >= t2)
        },
    )
    .await;
    // Exactly one agent calls itself leader.
    let leaders: Vec<&str> = c
        .agents
        .iter()
        .filter(|a| a.leader().2 == "leader")
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(leaders, vec![c.agents[last].name.as_str()]);
    sample();
    for (i, terms) in seen.lock().unwrap().iter().enumerate() {
        assert!(
            terms.windows(2).all(|w| w[0] <= w[1]),
            "a{i}'s term went down: {terms:?}"
        );
    }
    println!(
        "leader a{old} term {t1} after {:?}; a{new} term {t2} {:?} after the cut; a{last} term {t3} {:?} after the heal",
        elected - up,
        failed_over - elected,
        failed_over.elapsed()
    );
    report("failover_when_the_leader_is_cut_off", started, up);
}

/// Failover when the leader stops (the in-process "kill"): its tasks,
/// Raft and swarm are stopped by `Node::shutdown`, its connections close,
/// and the two others elect a new leader in a higher term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_the_leader_stops() {
    let started = Instant::now();
    let c = three_voters().await;
    let up = Instant::now();
    let all = [0, 1, 2];
    let (old, t1) = wait_until("a leader all three agree on", T, || async {
        agreed_leader(&c, &all)
    })
    .await;
    c.agents[old].node().shutdown().await;
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    let gone: libp2p::PeerId = c.agents[old].peer_id().parse().unwrap();
    // Its connections are closed: no survivor still counts it connected.
    wait_until("the stopped leader's connections to close", T, || async {
        let mut open = false;
        for &i in &rest {
            open |= c.agents[i].connected_to(&gone).await;
        }
        (!open).then_some(())
    })
    .await;
    let (new, t2) = wait_until("the other two to elect a new leader", T, || async {
        agreed_leader(&c, &rest).filter(|(_, t)| *t > t1)
    })
    .await;
    assert_ne!(new, old);
    println!("a{old} (term {t1}) stopped; a{new} leads in term {t2}");
    report("failover_when_the_leader_stops", started, up);
}

/// Deterministic, incompressible bytes (the same generator as tests/blob.rs).
fn random_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut data = Vec::with_capacity(len + 8);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(seed);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    data
}

/// A blob transfer with a lying source, in process: a bare peer with the
/// swarm key answers `/riftmesh/sync/1` by relaying a1's requests to the
/// honest holder a0 and flipping the last byte of every chunk it passes on.
/// a1 must reject and count each such chunk (by its hash), finish from a0,
/// and place the right bytes. (This scenario ran as agent processes in
/// tests/blob.rs before; it needs no real process, so it runs here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_source_is_rejected_and_the_transfer_finishes_elsewhere() {
    use std::sync::atomic::Ordering;
    let started = Instant::now();
    let placed = tempfile::tempdir().unwrap();
    let place = format!("{}/{{name}}.bin", placed.path().display());
    let c = Cluster::start(2, |cfg| {
        cfg.transfer.chunk_size = 256 * 1024;
        if cfg.name == "a1" {
            cfg.transfer.wants = wants_models_at(&place);
        }
    })
    .await;
    let up = Instant::now();
    let (a0, a1) = (&c.agents[0], &c.agents[1]);

    let (liar_id, served_bad, relay) = start_liar(&c.swarm_key, a0, a1).await;
    wait_until("a1 to be connected to the liar", T, || async {
        a1.connected_to(&liar_id).await.then_some(())
    })
    .await;

    let data = random_bytes(6 * 1024 * 1024, 3);
    let len = data.len() as u64;
    riftmesh::blob::add(
        a0.node().blob(),
        Box::new(std::io::Cursor::new(data.clone())),
        len,
        "m.pth".into(),
        "models/m",
        "MODEL_PROMOTED",
        riftmesh::blob::NamingLink::default(),
    )
    .await
    .unwrap();
    let target = placed.path().join("m.bin");
    wait_until("a1 to place the blob", T, || async {
        let meta = std::fs::metadata(&target).ok()?;
        (meta.len() == len && std::fs::read(&target).ok()? == data).then_some(())
    })
    .await;
    let bad = served_bad.load(Ordering::SeqCst);
    assert!(bad >= 1, "the liar was never asked for a chunk");
    let rejected = a1.metric("riftmesh_sync_chunks_rejected_total{reason=\"hash\"}");
    assert!(
        rejected >= bad as f64,
        "{rejected} chunks rejected for their hash, {bad} wrong ones served"
    );
    println!("{bad} wrong chunks served, {rejected} rejected for their hash");
    relay.abort();
    report(
        "a_lying_source_is_rejected_and_the_transfer_finishes_elsewhere",
        started,
        up,
    );
}

/// A want of every `models/*` blob, placed at `place` (`{name}` in it).
fn wants_models_at(place: &str) -> Vec<riftmesh::blob::Want> {
    vec![riftmesh::blob::Want {
        names: "models/*".into(),
        place: Some(place.to_string()),
        if_tags: Default::default(),
    }]
}

/// A bare peer that relays `asker`'s blob requests to `honest` and flips
/// the last byte of every chunk it passes on (anyone else gets an empty
/// answer): its id, how many chunks it altered, and the relay task.
async fn start_liar(
    swarm_key: &std::path::Path,
    honest: &Agent,
    asker: &Agent,
) -> (
    libp2p::PeerId,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (liar, mut inbox, liar_key) = inproc::bare_memory_peer(swarm_key);
    liar.dial(honest.addr.clone()).await.unwrap();
    liar.dial(asker.addr.clone()).await.unwrap();
    let served_bad = std::sync::Arc::new(AtomicUsize::new(0));
    let count = served_bad.clone();
    let (honest_id, asker_id) = (honest.peer, asker.peer);
    let relay = tokio::spawn(async move {
        while let Some(req) = inbox.blob.recv().await {
            // Relay to the honest holder (never back to it).
            if req.peer != asker_id {
                liar.blob_respond(req.channel, Vec::new()).await;
                continue;
            }
            let mut answer: Vec<u8> = liar
                .blob_request(honest_id, req.request)
                .await
                .unwrap_or_default();
            // A chunk answer: tag 2, then the bytes; change the last one.
            if answer.first() == Some(&2) && answer.len() > 2 {
                *answer.last_mut().unwrap() ^= 0x5a;
                count.fetch_add(1, Ordering::SeqCst);
            }
            liar.blob_respond(req.channel, answer).await;
        }
    });
    (liar_key.public().to_peer_id(), served_bad, relay)
}

/// A transfer whose only source lies gives up within its stall time and
/// says why (proto-notes/sync.md, "Giving up"): a1 is cut off from a0, the
/// only holder; the liar relays a0's answers to a1 with every chunk
/// altered; a2 (which holds nothing) carries the naming event. a1 rejects
/// the chunks, drops the liar, shows the last problem while it runs, and
/// records a failure naming the chunk, the liar and the verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_whose_only_source_lies_gives_up_and_says_why() {
    use std::sync::atomic::Ordering;
    let started = Instant::now();
    let placed = tempfile::tempdir().unwrap();
    let place = format!("{}/{{name}}.bin", placed.path().display());
    let stall = Duration::from_secs(3);
    let c = Cluster::start(3, |cfg| {
        cfg.transfer.chunk_size = 256 * 1024;
        cfg.transfer.stall = stall;
        if cfg.name == "a1" {
            cfg.transfer.wants = wants_models_at(&place);
        }
    })
    .await;
    let up = Instant::now();
    let (a0, a1) = (&c.agents[0], &c.agents[1]);
    let (liar_id, served_bad, relay) = start_liar(&c.swarm_key, a0, a1).await;
    a1.block(&[a0.peer], true).await;
    a0.block(&[a1.peer], true).await;
    wait_until(
        "a1 to be cut off from a0 and connected to the liar",
        T,
        || async {
            (!a1.connected_to(&a0.peer).await && a1.connected_to(&liar_id).await).then_some(())
        },
    )
    .await;

    let data = random_bytes(1024 * 1024, 5);
    let len = data.len() as u64;
    let added = riftmesh::blob::add(
        a0.node().blob(),
        Box::new(std::io::Cursor::new(data.clone())),
        len,
        "m.pth".into(),
        "models/m",
        "MODEL_PROMOTED",
        riftmesh::blob::NamingLink::default(),
    )
    .await
    .unwrap();
    let hex = riftmesh::blob::hex_id(&added.0.id);
    let liar_b58 = liar_id.to_base58();
    // While it runs, the transfer says what goes wrong.
    let problem = wait_until("a1's transfer to show its last problem", T, || async {
        a1.node()
            .blobs()
            .transfers()
            .into_iter()
            .find(|t| t.blob == hex)
            .and_then(|t| t.last_problem)
    })
    .await;
    assert_eq!(problem.peer, liar_b58);
    assert!(
        problem.reason.contains("failed verification (hash)"),
        "{}",
        problem.reason
    );
    // Then it gives up, within the stall time of its last chunk, and says why.
    let t_problem = Instant::now();
    let failure = wait_until("a1's transfer to give up", T, || async {
        a1.node()
            .blobs()
            .failures()
            .into_iter()
            .find(|f| f.blob == hex)
    })
    .await;
    let waited = t_problem.elapsed();
    assert!(
        failure.reason.contains("no progress for 3s")
            && failure.reason.contains(&liar_b58)
            && failure.reason.contains("failed verification (hash)"),
        "{}",
        failure.reason
    );
    assert!(
        waited < stall + Duration::from_secs(5),
        "gave up {waited:?} after the first problem (stall {stall:?})"
    );
    assert!(served_bad.load(Ordering::SeqCst) >= 1);
    assert!(!placed.path().join("m.bin").exists(), "nothing was placed");
    println!(
        "gave up {waited:?} after the first problem: {}",
        failure.reason
    );
    relay.abort();
    report(
        "a_transfer_whose_only_source_lies_gives_up_and_says_why",
        started,
        up,
    );
}

// ---- membership: what an agent says about itself, and `/riftmesh/member/1` ----

/// Payloads of the events of type `t` about member `node` in `a`'s log.
fn facts_about(a: &Agent, t: &str, node: &Agent) -> Vec<serde_json::Value> {
    a.facts_about(t, &node.peer_id())
}

/// `a`'s view of member `b`.
fn member_of(a: &Agent, b: &Agent) -> Option<riftmesh::membership::MemberView> {
    let id = b.peer_id();
    a.node()
        .membership()
        .members(&[])
        .into_iter()
        .find(|m| m.peer_id == id)
}

/// Time of `a`'s own latest health sample (0: none yet).
fn own_sampled_ms(a: &Agent) -> u64 {
    a.node().membership().members(&[])[0]
        .health
        .as_ref()
        .map_or(0, |h| h.sampled_ms)
}

/// Wait until `a` has taken `n` more health samples than at `from_ms`.
async fn samples_after(a: &Agent, from_ms: u64, n: usize) {
    let mut seen = from_ms;
    for i in 0..n {
        seen = wait_until(
            &format!("{}'s health sample {} after {from_ms}", a.name, i + 1),
            T,
            || async {
                let s = own_sampled_ms(a);
                (s > seen).then_some(s)
            },
        )
        .await;
    }
}

/// A fake `nvidia-smi` that answers after `secs` seconds: two idle GPUs.
fn slow_nvidia_smi(dir: &std::path::Path, secs: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("nvidia-smi");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nsleep {secs}\necho \"0, NVIDIA H100 80GB HBM3, 0, 10, 81559, 40\"\necho \"1, NVIDIA H100 80GB HBM3, 0, 10, 81559, 41\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script.display().to_string()
}

/// An agent that leaves before its first health sample (nvidia-smi takes
/// 3 s) says nothing more about itself at that incarnation: no
/// `HOST_ONLINE` after its `HOST_LEFT` when the sample comes, and no
/// `IDLE_RESOURCE_DETECTED` however idle its GPUs. Its peer, which stays,
/// publishes both from the same samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_left_is_the_last_word_of_a_leaving_agent() {
    let started = Instant::now();
    let tools = tempfile::tempdir().unwrap();
    let smi = slow_nvidia_smi(tools.path(), 3);
    let c = Cluster::start(2, |cfg| {
        cfg.nvidia_smi = smi.clone();
        cfg.idle_after = Duration::from_millis(1);
        cfg.online_wait = Duration::from_secs(60);
    })
    .await;
    let up = Instant::now();
    let (a0, a1) = (&c.agents[0], &c.agents[1]);
    let left = a1.node().membership().leave().await.expect("leave");
    assert_eq!(
        own_sampled_ms(a1),
        0,
        "a1 sampled before it left: the scenario needs a slower nvidia-smi"
    );
    assert_eq!(left.peers_acked, 1);
    wait_until("a0 to see a1 left", T, || async {
        (member_of(a0, a1)?.state == "left").then_some(())
    })
    .await;
    // Three samples on a1 after the leave: the first would announce it,
    // the second report its GPUs idle.
    samples_after(a1, 0, 3).await;
    // The peer that stayed did both from its own samples.
    wait_until("a0's HOST_ONLINE and idle report", T, || async {
        let online = facts_about(a0, "HOST_ONLINE", a0);
        let idle = facts_about(a0, "IDLE_RESOURCE_DETECTED", a0);
        (online.len() == 1 && online[0]["capabilities"]["gpu_count"] == 2 && idle.len() == 1)
            .then_some(())
    })
    .await;
    assert_eq!(facts_about(a1, "HOST_LEFT", a1).len(), 1);
    for a in [a0, a1] {
        assert_eq!(
            facts_about(a, "HOST_ONLINE", a1),
            Vec::<serde_json::Value>::new(),
            "{}",
            a.name
        );
        assert_eq!(
            facts_about(a, "IDLE_RESOURCE_DETECTED", a1),
            Vec::<serde_json::Value>::new(),
            "{}",
            a.name
        );
    }
    report("host_left_is_the_last_word_of_a_leaving_agent", started, up);
}

/// An agent whose first health sample is late (nvidia-smi takes 3 s)
/// still announces itself after `online_wait`: `HOST_ONLINE` with its tags
/// and without capabilities (unknown); the late sample adds no second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_online_does_not_wait_for_a_slow_first_sample() {
    let started = Instant::now();
    let tools = tempfile::tempdir().unwrap();
    let smi = slow_nvidia_smi(tools.path(), 3);
    let c = Cluster::start(1, |cfg| {
        cfg.nvidia_smi = smi.clone();
        cfg.online_wait = Duration::from_millis(300);
        cfg.tags = vec![("role".into(), "training".into())];
    })
    .await;
    let up = Instant::now();
    let a0 = &c.agents[0];
    let online = wait_until("a0's HOST_ONLINE", T, || async {
        facts_about(a0, "HOST_ONLINE", a0).into_iter().next()
    })
    .await;
    assert_eq!(
        own_sampled_ms(a0),
        0,
        "HOST_ONLINE came with the first sample"
    );
    assert_eq!(online["tags"], json!({"role": "training"}));
    assert!(online.get("capabilities").is_none(), "{online}");
    assert_eq!(
        online["incarnation"],
        a0.node().membership().incarnation(),
        "{online}"
    );
    samples_after(a0, 0, 2).await;
    assert_eq!(facts_about(a0, "HOST_ONLINE", a0).len(), 1);
    report(
        "host_online_does_not_wait_for_a_slow_first_sample",
        started,
        up,
    );
}

/// An agent that offers only `/riftmesh/member/1` among agents that offer
/// `/2` first: records go both ways, it is seen alive and sees the others
/// alive, it answers probes and probes for others, its leave is seen; and
/// its consumer counts are unknown (`hosts_without_counts`) to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_member_protocol_1_is_a_full_member() {
    use riftmesh::net::wire::{MemberRequest, MemberResponse};
    let started = Instant::now();
    let c = Cluster::start(3, |cfg| {
        if cfg.name == "a2" {
            cfg.member_protocols = &[riftmesh::net::MEMBER_PROTOCOL_V1];
        }
    })
    .await;
    let up = Instant::now();
    let old = &c.agents[2];
    // Health travels only in exchanges: a record with a sample is one
    // exchange done, in that direction.
    for (a, b) in [(0, 2), (1, 2), (2, 0), (2, 1)] {
        let (a, b) = (&c.agents[a], &c.agents[b]);
        wait_until(
            &format!("{} to hold {}'s record, alive", a.name, b.name),
            T,
            || async {
                let m = member_of(a, b)?;
                let sampled = m.health.as_ref().is_some_and(|h| h.sampled_ms != 0);
                (m.state == "alive" && sampled && m.name.as_deref() == Some(b.name.as_str()))
                    .then_some(())
            },
        )
        .await;
    }
    // Probes both ways, direct and through a helper.
    let inc = |a: &Agent| a.node().membership().incarnation();
    for (from, to) in [(&c.agents[0], old), (old, &c.agents[0])] {
        let r = from
            .node()
            .net()
            .member_request(
                to.peer,
                MemberRequest::Ping {
                    incarnation: inc(from),
                },
            )
            .await
            .unwrap();
        assert!(
            matches!(r, MemberResponse::Pong { incarnation } if incarnation == inc(to)),
            "{} pinging {}: {r:?}",
            from.name,
            to.name
        );
    }
    for (from, helper, target) in [
        (&c.agents[0], old, &c.agents[1]),
        (old, &c.agents[0], &c.agents[1]),
    ] {
        let r = from
            .node()
            .net()
            .member_request(
                helper.peer,
                MemberRequest::ProbeFor {
                    target: target.peer.to_bytes(),
                },
            )
            .await
            .unwrap();
        assert!(
            matches!(r, MemberResponse::Probed { reached: true }),
            "{} probing {} through {}: {r:?}",
            from.name,
            target.name,
            helper.name
        );
    }
    // Consumer counts: a1's (over /2) reach a0, the /1 agent's do not.
    let without = wait_until("a0 to hold counts of all but a2", T, || async {
        let mut hosts = c.agents[0].node().membership().subscriptions();
        hosts[0].peer_id = c.agents[0].peer_id();
        let with_a1 = hosts
            .iter()
            .any(|h| h.peer_id == c.agents[1].peer_id() && h.subscriptions.is_some());
        let (_, without) = riftmesh::membership::cluster_counts(&mut hosts, None);
        (with_a1 && without.len() == 1).then_some(without)
    })
    .await;
    assert_eq!(
        without,
        vec![riftmesh::membership::HostRef {
            peer_id: old.peer_id(),
            name: Some("a2".into()),
        }]
    );
    // Its leave reaches both.
    let left = old.node().membership().leave().await.expect("leave");
    assert_eq!(left.peers_acked, 2, "{left:?}");
    for a in &c.agents[..2] {
        wait_until(&format!("{} to see a2 left", a.name), T, || async {
            (member_of(a, old)?.state == "left").then_some(())
        })
        .await;
    }
    report(
        "an_agent_of_member_protocol_1_is_a_full_member",
        started,
        up,
    );
}
