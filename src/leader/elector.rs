//! The election side of the leader part: the election timer of a voter
//! ([`elector`]), what a voter does on a change of term or leader
//! ([`watch_leadership`], which publishes `LEADER_ELECTED`), and how every
//! agent learns the leader from those events ([`follow_elections`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::Deserialize;
use serde_json::json;

use super::{lock_known, Ctx, Known, NodeId, Raft};
use crate::event::{Draft, TypePattern};

/// The election timer of a voter. An election starts when nothing was heard
/// from a leader (and no vote granted) for the leader's lease (twice
/// `election_timeout`) plus a delay drawn anew for every attempt from
/// [`election_timeout`, 2 × `election_timeout`); a failed attempt is retried
/// after a new draw. The other voters reject a vote request while their own
/// lease runs, so this never unseats a leader that a majority still hears.
/// A leader campaigns too once no majority has acknowledged it for as long.
/// A voter told by a voter with a longer log that its own is stale stands
/// aside for 4 × `election_timeout` (openraft's own timer does the same), so
/// a restarted voter cannot keep outbidding the one that can win.
pub(super) async fn elector(ctx: Arc<Ctx>, raft: Raft) {
    let et = ctx.cfg.election_timeout;
    let lease = et * 2;
    let draw = || draw_jitter(et, &mut rand::thread_rng());
    let mut jitter = draw();
    let mut attempt: Option<Instant> = None;
    let step = (et / 10).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(step).await;
        let (state, acked_ms) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.state, m.millis_since_quorum_ack)
        };
        if state == ServerState::Shutdown {
            return;
        }
        if state == ServerState::Leader {
            // A leader that a majority acknowledges needs no election. One
            // that none has (a voter restarted on a vote it had won, which
            // openraft restores as leadership of that old term) would
            // otherwise never campaign, and a voter with a shorter log could
            // never win its vote: it campaigns like a follower.
            if quorum_fresh(ctx.leader.voters.len(), acked_ms, lease) {
                attempt = None;
                continue;
            }
        }
        if ctx.leader.aside() {
            continue;
        }
        if Instant::now() >= election_due(ctx.leader.heard(), attempt, lease, jitter) {
            if raft.trigger().elect().await.is_err() {
                return;
            }
            attempt = Some(Instant::now());
            jitter = draw();
        }
    }
}

/// The delay added to the lease before a campaign: drawn from
/// [`et`, 2 × `et`), anew for every attempt.
pub(super) fn draw_jitter(et: Duration, rng: &mut impl rand::Rng) -> Duration {
    et + et.mul_f64(rng.gen_range(0.0..1.0))
}

/// Whether a leader still holds its lease: it is the only voter, or a
/// majority acknowledged it less than `lease` ago.
pub(super) fn quorum_fresh(voters: usize, acked_ms: Option<u64>, lease: Duration) -> bool {
    voters == 1 || acked_ms.is_some_and(|ms| u128::from(ms) < lease.as_millis())
}

/// When a voter campaigns: `lease + jitter` after it last heard a leader (or
/// granted a vote), and no sooner than `jitter` after its own last attempt
/// if that came later.
pub(super) fn election_due(
    heard: Instant,
    attempt: Option<Instant>,
    lease: Duration,
    jitter: Duration,
) -> Instant {
    let due = heard + lease + jitter;
    match attempt.filter(|a| *a > heard) {
        Some(a) => due.max(a + jitter),
        None => due,
    }
}

/// On every change of term or leader: metrics, and the new leader publishes
/// `LEADER_ELECTED` once for its term.
pub(super) async fn watch_leadership(ctx: Arc<Ctx>, raft: Raft) {
    let mut rx = raft.metrics();
    let mut last: (u64, Option<NodeId>) = (0, None);
    let mut lost_at: Option<Instant> = None;
    let mut announced_term = 0;
    loop {
        let m = rx.borrow_and_update().clone();
        let mx = &ctx.metrics;
        mx.raft_term.set(m.current_term as i64);
        mx.is_leader.set(i64::from(m.state == ServerState::Leader));
        if (m.current_term, m.current_leader) != last {
            if m.current_leader.is_none() && lost_at.is_none() {
                lost_at = Some(Instant::now());
            }
            if m.current_leader.is_some() && m.current_leader != last.1 {
                mx.leader_changes.inc();
                if let Some(t) = lost_at.take() {
                    mx.election_seconds.observe(t.elapsed().as_secs_f64());
                }
                let name = m
                    .current_leader
                    .and_then(|id| ctx.leader.name_of(id))
                    .unwrap_or_default();
                tracing::info!(term = m.current_term, leader = %name, "leader known");
            }
            last = (m.current_term, m.current_leader);
        }
        if m.state == ServerState::Leader && m.current_term > announced_term {
            announced_term = m.current_term;
            // `leader_id` is the seeds' field (cluster.leader_elected);
            // `leader` is kept for the agent's own readers.
            let payload = json!({
                "term": m.current_term,
                "leader": ctx.cfg.name,
                "leader_id": ctx.cfg.name,
                "node": ctx.peer_id,
            });
            // One fact per term, however often it is announced.
            if let Ok(d) = Draft::new(
                "LEADER_ELECTED",
                &payload,
                Some("riftmesh/leader".into()),
                None,
                None,
            )
            .and_then(|d| d.with_idem_key(Some(format!("term/{}", m.current_term))))
            {
                let n = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = n.publisher.publish(vec![d]).await {
                        tracing::warn!(error = %e, "cannot publish LEADER_ELECTED");
                    }
                });
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[derive(Deserialize)]
struct Elected {
    term: u64,
    leader: String,
}

/// Every agent keeps the newest `LEADER_ELECTED` it holds (non-voters learn
/// the leader from it).
pub(super) async fn follow_elections(ctx: Arc<Ctx>) {
    let patterns: Vec<TypePattern> = TypePattern::parse("LEADER_ELECTED").into_iter().collect();
    let mut head = ctx.store.watch_head();
    let mut cursor = ctx.store.head().saturating_sub(100_000);
    loop {
        loop {
            let Ok((batch, last)) = ctx.store.read_after(cursor, 256, 20_000, &patterns) else {
                break;
            };
            for (_, s) in batch {
                let Ok(e) = serde_json::from_str::<Elected>(&s.event.payload) else {
                    continue;
                };
                let mut k = lock_known(&ctx.leader.known);
                if e.term > k.term {
                    ctx.metrics.leader_term.set(e.term as i64);
                    *k = Known {
                        term: e.term,
                        leader: Some(e.leader),
                        since_ms: Some(s.event.ts_ms),
                    };
                }
            }
            if last == cursor {
                break;
            }
            cursor = last;
        }
        if head.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_jitter_lies_between_one_and_two_election_timeouts() {
        let et = Duration::from_millis(300);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let j = draw_jitter(et, &mut rng);
            assert!(j >= et && j < et * 2, "{j:?}");
        }
    }

    #[test]
    fn a_lone_voter_or_a_recent_majority_keeps_the_lease() {
        let lease = Duration::from_millis(600);
        assert!(quorum_fresh(1, None, lease), "a lone voter needs no acks");
        assert!(quorum_fresh(3, Some(599), lease));
        assert!(!quorum_fresh(3, Some(600), lease));
        assert!(!quorum_fresh(3, None, lease), "never acknowledged");
    }

    #[test]
    fn a_campaign_is_due_after_the_lease_and_after_the_last_attempt() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let (lease, jitter) = (ms(600), ms(400));
        assert_eq!(election_due(t0, None, lease, jitter), t0 + ms(1000));
        // An attempt before the last word from a leader does not count.
        let before = t0.checked_sub(ms(50)).unwrap_or(t0);
        assert_eq!(election_due(t0, Some(before), lease, jitter), t0 + ms(1000));
        // A failed attempt late in the window pushes the next one back.
        let late = t0 + ms(900);
        assert_eq!(election_due(t0, Some(late), lease, jitter), late + jitter);
        // An early one does not bring it forward.
        let early = t0 + ms(10);
        assert_eq!(election_due(t0, Some(early), lease, jitter), t0 + ms(1000));
    }
}
