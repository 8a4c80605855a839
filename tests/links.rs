//! Bounded links on the in-process harness (tests/common/inproc.rs): above
//! `full_mesh_max` members each agent keeps connections to its ring
//! neighbours and a few random members only (membership::links), closes the
//! others it dialled once idle, and events and membership verdicts still
//! reach every agent over those links.

#[path = "common/inproc.rs"]
mod inproc;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use inproc::{wait_until, Agent, Cluster};
use serde_json::json;

const N: usize = 8;
/// Deadline of one wait: generous for a loaded machine; a pass takes far less.
const T: Duration = Duration::from_secs(60);

/// The members `a` holds as links, by peer id.
fn links_of(a: &Agent) -> HashSet<String> {
    a.node()
        .membership()
        .members(&[])
        .into_iter()
        .filter(|m| !m.is_self && m.link)
        .map(|m| m.peer_id)
        .collect()
}

fn alive_count(a: &Agent) -> usize {
    a.node()
        .membership()
        .members(&[])
        .into_iter()
        .filter(|m| m.state == "alive")
        .count()
}

/// Eight agents above `full_mesh_max` = 2, each linking to one ring
/// neighbour on each side and one random member (three at most of
/// seven), once every one lists every member alive.
async fn bounded_cluster() -> Cluster {
    let c = Cluster::start_unmeshed(N, |cfg| {
        cfg.full_mesh_max = 2;
        cfg.link_ring_per_side = 1;
        cfg.link_random = 1;
        cfg.link_idle = Duration::from_millis(1500);
    });
    wait_until("every agent to list every member alive", T, || async {
        c.agents.iter().all(|a| alive_count(a) == N).then_some(())
    })
    .await;
    c
}

/// Wait until every agent holds bounded links (1 to 3) and every
/// connection is a link of one of its two ends; the number of connections.
async fn links_only(c: &Cluster) -> usize {
    let by_id: HashMap<String, &Agent> = c.agents.iter().map(|a| (a.peer_id(), a)).collect();
    wait_until("connections to be links only", T, || async {
        let mut pairs = 0;
        for a in &c.agents {
            let mine = links_of(a);
            if mine.is_empty() || mine.len() > 3 {
                return None;
            }
            for p in a.connected_peers().await {
                let theirs = links_of(by_id.get(&p)?);
                if !mine.contains(&p) && !theirs.contains(&a.peer_id()) {
                    return None;
                }
                pairs += 1;
            }
        }
        Some(pairs / 2)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_links_carry_events_and_verdicts() {
    let started = Instant::now();
    let c = bounded_cluster().await;
    let up = Instant::now();
    // Every connection is a link of one of its two ends: those dialled to
    // anyone else (the bootstrap agent, peers heard of by the DHT) closed.
    let settled = links_only(&c).await;
    // An event reaches every agent over the links.
    let ev = c.agents[5]
        .publish("TRAINING_COMPLETED", json!({"model": "m1"}))
        .await;
    wait_until("the event on every agent", T, || async {
        c.agents
            .iter()
            .all(|a| a.events().iter().any(|e| e.id == ev.id))
            .then_some(())
    })
    .await;
    // A stopped agent is declared dead everywhere, and nobody else is.
    let victim = c.agents[3].peer_id();
    c.agents[3].node().shutdown().await;
    wait_until(
        "HOST_OFFLINE of the stopped agent everywhere",
        T,
        || async {
            c.agents
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 3)
                .all(|(_, a)| !a.facts_about("HOST_OFFLINE", &victim).is_empty())
                .then_some(())
        },
    )
    .await;
    for (i, a) in c.agents.iter().enumerate().filter(|(i, _)| *i != 3) {
        for b in &c.agents {
            if b.peer_id() == victim {
                continue;
            }
            for t in ["NODE_SUSPECT", "HOST_OFFLINE"] {
                assert_eq!(
                    a.facts_about(t, &b.peer_id()).len(),
                    0,
                    "a{i} holds {t} about live {}",
                    b.name
                );
            }
        }
    }
    println!(
        "bounded_links_carry_events_and_verdicts: {settled} connections among {N}; agents up in {:?}, scenario {:?}",
        up - started,
        up.elapsed()
    );
}

/// `a`'s state of member `b` ("alive", "dead", ...).
fn state_of(a: &Agent, b: &Agent) -> Option<&'static str> {
    let id = b.peer_id();
    a.node()
        .membership()
        .members(&[])
        .into_iter()
        .find(|m| m.peer_id == id)
        .map(|m| m.state)
}

/// Two halves that buried each other find each other again once the cut
/// heals: no dead member is a link, so only the agents' checks of the
/// members they hold dead dial across.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_that_buried_each_other_rejoin() {
    let c = bounded_cluster().await;
    // Links bounded and the other connections closed: no agent holds a
    // connection the cut could leave open, nor one a heal would revive.
    links_only(&c).await;
    let half = |i: usize| i < N / 2;
    let cut = |i: usize| -> Vec<libp2p::PeerId> {
        c.agents
            .iter()
            .enumerate()
            .filter(|(j, _)| half(*j) != half(i))
            .map(|(_, a)| a.peer)
            .collect()
    };
    for (i, a) in c.agents.iter().enumerate() {
        a.block(&cut(i), true).await;
    }
    wait_until("each half to hold the other dead", T, || async {
        c.agents
            .iter()
            .enumerate()
            .all(|(i, a)| {
                c.agents
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| half(*j) != half(i))
                    .all(|(_, b)| state_of(a, b) == Some("dead"))
            })
            .then_some(())
    })
    .await;
    // Heal without dialling anyone: what reconnects is the agents' own.
    let healed_at = Instant::now();
    for (i, a) in c.agents.iter().enumerate() {
        a.block(&cut(i), false).await;
    }
    wait_until(
        "every agent to list every member alive again",
        T,
        || async { c.agents.iter().all(|a| alive_count(a) == N).then_some(()) },
    )
    .await;
    println!(
        "halves_that_buried_each_other_rejoin: all alive again {:?} after the heal",
        healed_at.elapsed()
    );
}
