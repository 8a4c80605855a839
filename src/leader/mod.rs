//! Leader election and distributed locks: openraft 0.9 among the configured
//! voters, over `/riftmesh/raft/3`, its state in our sled database. The Raft
//! term is the fencing token users see for leadership; a lock grant's token is
//! the log index of the entry that granted it. Agents that are not voters
//! learn the leader from `LEADER_ELECTED` events and forward lock calls to it.
//! See proto-notes/leader.md.

mod elector;
mod locks;
pub mod raft_log;
mod rpc;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OnceCell};

use crate::codec;
use crate::config::AgentConfig;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::net::{NetHandle, RaftInbound};
use crate::publisher::Publisher;
use crate::store::Store;

pub use locks::{LockAnswer, LockCall, LockError, LockInfo};
pub use rpc::{decodes_as_envelope, sample_envelopes};

/// What the leader part works with (handed over by the node at start).
pub struct Ctx {
    pub leader: Arc<Leader>,
    pub cfg: Arc<AgentConfig>,
    pub store: Store,
    pub net: NetHandle,
    pub metrics: Metrics,
    pub membership: Arc<Membership>,
    pub publisher: Publisher,
    /// This agent's peer id (base58).
    pub peer_id: String,
    /// Owner of the long-lived tasks (stopped with the agent).
    pub tasks: crate::tasks::Tasks,
}

pub type NodeId = u64;

/// A voter, by name; its peer id is looked up in the member table at each call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub name: String,
}

/// What the replicated lock table applies (proto-notes/leader.md, "Locks").
///
/// The leader decides whether a grant has run out on its own monotonic
/// clock and proposes [`LockRequest::Grant`] / [`LockRequest::Extend`],
/// which apply deterministically without any clock: a grant is a
/// compare-and-set on the lock's version (token, generation, expires_ms). `Acquire` and `Renew`
/// (version 2 of the table: expiry compared with the proposing leader's
/// *wall clock*, `now_ms`) are no longer proposed; they are still applied
/// as before when a log or snapshot written by the previous release is
/// replayed. New variants go at the end: the log is bincode (variant index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockRequest {
    Acquire {
        name: String,
        holder: String,
        ttl_ms: u64,
        now_ms: u64,
    },
    Renew {
        name: String,
        token: u64,
        now_ms: u64,
    },
    Release {
        name: String,
        token: u64,
    },
    /// Grant `name` to `holder` if the table still holds what the leader
    /// judged: `expect` = `None` (free) or the version
    /// ([`raft_log::Lock::version`]: token, generation, `expires_ms`) of the
    /// grant whose TTL the leader saw run out. `stamp_ms` is the leader's wall
    /// clock, kept for display only.
    Grant {
        name: String,
        holder: String,
        ttl_ms: u64,
        expect: Option<(u64, u64, u64)>,
        stamp_ms: u64,
    },
    /// Renew the grant `token` (the leader saw it still running): its
    /// generation becomes this entry's index, so a `Grant` judged before
    /// this renewal fails.
    Extend {
        name: String,
        token: u64,
        stamp_ms: u64,
    },
}

/// The answer to a lock call. Times are durations, never instants: each
/// agent turns them into its own clock's time for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockResponse {
    Granted {
        token: u64,
        ttl_ms: u64,
        /// The lock was held by someone whose TTL had run out.
        replaced_expired: bool,
    },
    Denied {
        holder: String,
        token: u64,
        /// How long the grant in force has left, as the leader measures it
        /// (a renewal extends it).
        remaining_ms: u64,
    },
    Released,
    NotHolder,
    /// For blank and membership entries.
    Noop,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = LockRequest,
        R = LockResponse,
        NodeId = NodeId,
        Node = PeerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// A voter's Raft node id: the first 8 bytes of SHA-256 over its name.
pub fn node_id(name: &str) -> NodeId {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("riftmesh/voter/1\0{name}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// SHA-256 of the voter list as configured (order included).
pub fn voters_hash(voters: &[String]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"riftmesh/voters/1\0");
    for v in voters {
        h.update(v.as_bytes());
        h.update(b"\n");
    }
    h.finalize().into()
}

/// What `GET /v1/leader` shows.
#[derive(Debug, Clone, Serialize)]
pub struct LeaderView {
    pub voters: Vec<String>,
    pub is_voter: bool,
    pub leader: Option<String>,
    pub leader_peer_id: Option<String>,
    pub term: u64,
    /// Unix ms since when this leader has led (as this agent learned it).
    pub since_ms: Option<u64>,
    /// This agent is the leader, inside its lease.
    pub is_self: bool,
    /// Raft state of this agent (voters), or "member" / "none".
    pub role: String,
    pub note: Option<String>,
    /// Members whose voter list differs from ours (by name).
    pub voter_list_mismatch: Vec<String>,
    /// This voter's Raft vote as held (from its durable store at start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vote: Option<VoteView>,
}

/// A voter's vote: the term, whom it voted for, and whether that leader
/// was granted by a majority.
#[derive(Debug, Clone, Serialize)]
pub struct VoteView {
    pub term: u64,
    pub voted_for: Option<String>,
    pub committed: bool,
}

#[derive(Default, Clone)]
struct Known {
    term: u64,
    leader: Option<String>,
    since_ms: Option<u64>,
}

pub struct Leader {
    voters: Vec<String>,
    hash: [u8; 32],
    me: String,
    is_voter: bool,
    lease: Duration,
    raft: OnceCell<Raft>,
    sm: OnceCell<raft_log::LockStateMachine>,
    known: Mutex<Known>,
    /// Last time a leader's append was accepted here, or a vote granted:
    /// the election timer counts from it (see [`elector::elector`]).
    heard: Mutex<Instant>,
    /// No campaign before this: a voter with a longer log refused our vote.
    aside_until: Mutex<Option<Instant>>,
}

fn lock_known(m: &Mutex<Known>) -> std::sync::MutexGuard<'_, Known> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Leader {
    pub fn new(voters: &[String], me: &str, lease: Duration) -> Arc<Leader> {
        Arc::new(Leader {
            voters: voters.to_vec(),
            hash: voters_hash(voters),
            me: me.to_string(),
            is_voter: voters.iter().any(|v| v == me),
            lease,
            raft: OnceCell::new(),
            sm: OnceCell::new(),
            known: Mutex::new(Known::default()),
            heard: Mutex::new(Instant::now()),
            aside_until: Mutex::new(None),
        })
    }

    pub fn voters_hash(&self) -> Option<[u8; 32]> {
        (!self.voters.is_empty()).then_some(self.hash)
    }

    fn heard_now(&self) {
        *self.heard.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn stand_aside(&self, d: Duration) {
        *self.aside_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + d);
    }

    fn aside(&self) -> bool {
        self.aside_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    fn heard(&self) -> Instant {
        *self.heard.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raft_view(&self) -> Option<(ServerState, u64, Option<NodeId>, bool)> {
        let raft = self.raft.get()?;
        let m = raft.metrics().borrow().clone();
        let fresh = elector::quorum_fresh(self.voters.len(), m.millis_since_quorum_ack, self.lease);
        Some((m.state, m.current_term, m.current_leader, fresh))
    }

    /// Stop this voter's Raft (its own tasks end; at most 3 s); nothing on a
    /// non-voter.
    pub async fn shutdown(&self) {
        if let Some(raft) = self.raft.get() {
            match tokio::time::timeout(Duration::from_secs(3), raft.shutdown()).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "raft shutdown"),
                Err(_) => tracing::warn!("raft did not stop within 3 s"),
                Ok(Ok(())) => {}
            }
        }
    }

    fn name_of(&self, id: NodeId) -> Option<String> {
        self.voters.iter().find(|v| node_id(v) == id).cloned()
    }

    /// The leader as this agent knows it.
    pub fn view(&self, ctx: &Ctx) -> LeaderView {
        let mismatch = ctx.membership.voter_list_mismatch(self.voters_hash());
        let mut v = LeaderView {
            voters: self.voters.clone(),
            is_voter: self.is_voter,
            leader: None,
            leader_peer_id: None,
            term: 0,
            since_ms: None,
            is_self: false,
            role: if self.voters.is_empty() {
                "none".into()
            } else {
                "member".into()
            },
            note: None,
            voter_list_mismatch: mismatch,
            vote: None,
        };
        if self.voters.is_empty() {
            v.note = Some(format!(
                "no voters configured: name 3 or 5 stable hosts in the config of every host, e.g. voters = [\"gpu-01\", \"gpu-02\", \"gpu-03\"] (a one-host setup names itself: voters = [\"{}\"])",
                self.me
            ));
            return v;
        }
        let known = lock_known(&self.known).clone();
        if let Some(raft) = self.raft.get() {
            let vote = raft.metrics().borrow().vote;
            v.vote = Some(VoteView {
                term: vote.leader_id.term,
                voted_for: vote.leader_id.voted_for.and_then(|id| self.name_of(id)),
                committed: vote.committed,
            });
        }
        if let Some((state, term, leader, fresh)) = self.raft_view() {
            v.role = format!("{state:?}").to_lowercase();
            v.term = term;
            if state == ServerState::Leader {
                if fresh {
                    v.leader = Some(self.me.clone());
                    v.is_self = true;
                } else {
                    v.note = Some("this agent was leader but has not heard from a majority of voters within its lease".into());
                }
            } else {
                v.leader = leader.and_then(|id| self.name_of(id));
            }
        } else {
            v.term = known.term;
            v.leader = known.leader.clone();
        }
        if let Some(l) = &v.leader {
            if *l == known.leader.clone().unwrap_or_default() && v.term == known.term {
                v.since_ms = known.since_ms;
            }
            v.leader_peer_id = if *l == self.me {
                Some(ctx.peer_id.clone())
            } else {
                ctx.membership.peer_by_name(l).map(|p| p.to_base58())
            };
            // A leader the member table holds dead or gone is no leader.
            if *l != self.me && v.leader_peer_id.is_none() {
                v.note = Some(format!("last known leader {l} is not a live member"));
                v.leader = None;
            }
        }
        v
    }
}

/// Start the leader part: Raft on voters, and on every agent the server of
/// `/riftmesh/raft/3` and the follower of `LEADER_ELECTED` events.
pub fn start(ctx: Arc<Ctx>, inbound: mpsc::Receiver<RaftInbound>) {
    let tasks = ctx.tasks.clone();
    tasks.spawn(run(ctx, inbound));
}

async fn run(ctx: Arc<Ctx>, mut inbound: mpsc::Receiver<RaftInbound>) {
    let l = ctx.leader.clone();
    if !l.voters.is_empty() {
        let mut listed: Vec<String> = l.voters.clone();
        listed.sort();
        tracing::info!(voters = ?listed, voter = l.is_voter, "leader election configured");
    }
    if l.is_voter {
        match start_raft(&ctx).await {
            Ok((raft, sm)) => {
                let _ = l.sm.set(sm);
                let _ = l.raft.set(raft.clone());
                ctx.tasks
                    .spawn(elector::watch_leadership(ctx.clone(), raft.clone()));
                ctx.tasks.spawn(elector::elector(ctx.clone(), raft));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the leader election; this agent takes no part")
            }
        }
    }
    ctx.tasks.spawn(elector::follow_elections(ctx.clone()));
    while let Some(msg) = inbound.recv().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let reply = rpc::serve(&ctx, &msg.request).await;
            let body = codec::encode(&reply).unwrap_or_default();
            ctx.net.raft_respond(msg.channel, body).await;
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn start_raft(ctx: &Arc<Ctx>) -> Result<(Raft, raft_log::LockStateMachine), BoxError> {
    let et = ctx.cfg.election_timeout.as_millis() as u64;
    let config = openraft::Config {
        cluster_name: "riftmesh".into(),
        // openraft ticks every 1.5 heartbeats; a fifth of the election
        // timeout keeps that tick from adding much to a failover.
        heartbeat_interval: (et / 5).max(20),
        election_timeout_min: et,
        election_timeout_max: et * 2,
        // Elections are started by [`elector::elector`], with a fresh random delay
        // each time: openraft's own timer draws its delay once per process
        // and fires on its tick, so two voters can collide round after round.
        enable_elect: false,
        ..Default::default()
    }
    .validate()?;
    let durable = ctx.store.durable();
    let log = raft_log::LogStore::open(durable)?;
    let sm = raft_log::LockStateMachine::open(durable)?;
    let factory = rpc::Factory::new(ctx);
    let me = node_id(&ctx.cfg.name);
    let raft = openraft::Raft::new(me, Arc::new(config), factory, log, sm.clone()).await?;
    let members: BTreeMap<NodeId, PeerNode> = ctx
        .cfg
        .voters
        .iter()
        .map(|v| (node_id(v), PeerNode { name: v.clone() }))
        .collect();
    // Every voter initializes with the same membership: safe in openraft, and
    // the cluster forms whichever voters come up first.
    match raft.initialize(members).await {
        Ok(()) => tracing::info!("raft initialized with the configured voters"),
        Err(e) => tracing::debug!(error = %e, "raft already initialized"),
    }
    Ok((raft, sm))
}

#[cfg(test)]
mod tests {

    use super::*;

    /// One leader per term: a voter that voted for one candidate in a term
    /// must not grant another candidate of the same term. openraft's default
    /// leader id orders same-term candidates by node id, so the second
    /// candidate's vote compared greater and was granted, and a term could
    /// have two leaders (seen in the testnet soak: two LEADER_ELECTED for one
    /// term). The `single-term-leader` feature makes them incomparable.
    #[test]
    fn a_vote_in_a_term_excludes_other_candidates_of_that_term() {
        let (a, b) = (node_id("gpu-01"), node_id("gpu-02"));
        let va = openraft::Vote::new(28, a);
        let vb = openraft::Vote::new(28, b);
        assert!(
            va.partial_cmp(&vb).is_none(),
            "same-term votes for different candidates must be incomparable"
        );
        assert!(vb.partial_cmp(&va).is_none(), "in either order");
        assert!(openraft::Vote::new(29, a) > vb, "a later term still wins");
        let mut committed = openraft::Vote::new(28, a);
        committed.commit();
        assert!(
            committed > va,
            "the committed vote of the same leader is greater"
        );
    }

    #[test]
    fn node_ids_and_voter_hash_are_stable() {
        assert_eq!(node_id("gpu-01"), node_id("gpu-01"));
        assert_ne!(node_id("gpu-01"), node_id("gpu-02"));
        let a = vec!["a".to_string(), "b".to_string()];
        let b = vec!["b".to_string(), "a".to_string()];
        assert_ne!(
            voters_hash(&a),
            voters_hash(&b),
            "order is part of the list"
        );
        assert_eq!(voters_hash(&a), voters_hash(&a.clone()));
    }

    /// Version-2 entries (wall time stamped by the leader) replay as the
    /// previous release applied them.
    #[test]
    fn version_2_entries_grant_deny_expire_and_fence_as_before() {
        let mut st = raft_log::LockState::default();
        let acq = |holder: &str, now: u64| LockRequest::Acquire {
            name: "promote".into(),
            holder: holder.into(),
            ttl_ms: 1000,
            now_ms: now,
        };
        let g = st.apply(10, &acq("a", 0));
        assert_eq!(
            g,
            LockResponse::Granted {
                token: 10,
                ttl_ms: 1000,
                replaced_expired: false
            }
        );
        assert_eq!(st.locks["promote"].expires_ms, 1000);
        assert!(matches!(
            st.apply(11, &acq("b", 500)),
            LockResponse::Denied {
                token: 10,
                remaining_ms: 500,
                ..
            }
        ));
        let renew = LockRequest::Renew {
            name: "promote".into(),
            token: 10,
            now_ms: 900,
        };
        assert!(matches!(
            st.apply(12, &renew),
            LockResponse::Granted { token: 10, .. }
        ));
        assert_eq!(st.locks["promote"].expires_ms, 1900);
        // Expired: b takes it with a higher token; a's token no longer works.
        let g = st.apply(13, &acq("b", 2000));
        assert_eq!(
            g,
            LockResponse::Granted {
                token: 13,
                ttl_ms: 1000,
                replaced_expired: true
            }
        );
        let late = LockRequest::Release {
            name: "promote".into(),
            token: 10,
        };
        assert_eq!(st.apply(14, &late), LockResponse::NotHolder);
        let rel = LockRequest::Release {
            name: "promote".into(),
            token: 13,
        };
        assert_eq!(st.apply(15, &rel), LockResponse::Released);
    }

    /// Version 3: a grant is a compare-and-set on what the leader judged
    /// (the lock's version); no clock is read in apply, so a wall time in
    /// the entry, however wrong, changes nothing.
    #[test]
    fn a_grant_applies_only_to_the_state_it_was_judged_on() {
        let mut st = raft_log::LockState::default();
        let grant =
            |holder: &str, expect: Option<(u64, u64, u64)>, stamp_ms: u64| LockRequest::Grant {
                name: "promote".into(),
                holder: holder.into(),
                ttl_ms: 1000,
                expect,
                stamp_ms,
            };
        let version = |st: &raft_log::LockState| st.locks.get("promote").map(|l| l.version());
        // A leader 10 minutes behind or ahead: the stamps don't matter.
        assert!(matches!(
            st.apply(10, &grant("a", None, 0)),
            LockResponse::Granted {
                token: 10,
                replaced_expired: false,
                ..
            }
        ));
        let v1 = version(&st);
        // A second grant judged on "free" is refused: the lock is held.
        assert!(matches!(
            st.apply(11, &grant("b", None, u64::MAX / 2)),
            LockResponse::Denied { token: 10, .. }
        ));
        // A renewal between the judgement and the grant wins, even one with
        // the same stamp (the version holds the renewal's index).
        let extend = LockRequest::Extend {
            name: "promote".into(),
            token: 10,
            stamp_ms: 0,
        };
        assert!(matches!(
            st.apply(12, &extend),
            LockResponse::Granted { token: 10, .. }
        ));
        assert_ne!(version(&st), v1);
        assert!(matches!(
            st.apply(13, &grant("b", v1, 0)),
            LockResponse::Denied { token: 10, .. }
        ));
        // Judged on the renewed grant: taken, with a higher token.
        assert!(matches!(
            st.apply(14, &grant("b", version(&st), 0)),
            LockResponse::Granted {
                token: 14,
                replaced_expired: true,
                ..
            }
        ));
        assert_eq!(
            st.apply(15, &extend),
            LockResponse::NotHolder,
            "the old token renews nothing"
        );
        // A grant judged on a lock that has since been released.
        let v14 = version(&st);
        assert_eq!(
            st.apply(
                16,
                &LockRequest::Release {
                    name: "promote".into(),
                    token: 14
                }
            ),
            LockResponse::Released
        );
        assert_eq!(st.apply(17, &grant("c", v14, 0)), LockResponse::NotHolder);
    }

    /// Replicas that reached one table by different paths (one loaded the
    /// previous release's snapshot, one replayed its log) agree on every
    /// lock's version, so a `Grant` has the same outcome on both.
    #[test]
    fn replicas_from_a_version_2_snapshot_and_from_a_replay_agree() {
        let old = [
            LockRequest::Acquire {
                name: "promote".into(),
                holder: "a".into(),
                ttl_ms: 1000,
                now_ms: 100,
            },
            LockRequest::Renew {
                name: "promote".into(),
                token: 1,
                now_ms: 600,
            },
        ];
        let mut replayed = raft_log::LockState::default();
        for (i, r) in old.iter().enumerate() {
            replayed.apply(i as u64 + 1, r);
        }
        // The snapshot a previous-release voter took after entry 2.
        let mut loaded = raft_log::LockState::default();
        loaded.apply(1, &old[0]);
        let mut from_snapshot = raft_log::LockState {
            locks: loaded
                .locks
                .into_iter()
                .map(|(k, mut l)| {
                    l.expires_ms = 1600;
                    l.generation = 0;
                    (k, l)
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(from_snapshot.locks, replayed.locks);
        let judged = replayed.locks["promote"].version();
        let new = [
            LockRequest::Extend {
                name: "promote".into(),
                token: 1,
                stamp_ms: 5,
            },
            LockRequest::Grant {
                name: "promote".into(),
                holder: "b".into(),
                ttl_ms: 1000,
                expect: Some(judged),
                stamp_ms: 9,
            },
        ];
        for (i, r) in new.iter().enumerate() {
            let a = replayed.apply(i as u64 + 3, r);
            let b = from_snapshot.apply(i as u64 + 3, r);
            assert_eq!(a, b, "{r:?}");
        }
        assert_eq!(from_snapshot.locks, replayed.locks);
        assert_eq!(replayed.locks["promote"].holder, "a", "the renewal won");
    }

    /// Leases run on this agent's monotonic clock from the apply of the
    /// last grant or renewal; a snapshot's grants count from its loading.
    #[test]
    fn leases_count_from_the_local_apply() {
        use std::time::{Duration, Instant};
        let mut leases = raft_log::Leases::default();
        let t0 = Instant::now();
        let l = raft_log::Lock {
            holder: "a".into(),
            token: 3,
            ttl_ms: 1000,
            expires_ms: 0,
            generation: 1,
        };
        let granted = LockResponse::Granted {
            token: 3,
            ttl_ms: 1000,
            replaced_expired: false,
        };
        leases.on_applied("x", &granted, t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(
            leases.remaining("x", &l, at(400)),
            Duration::from_millis(600)
        );
        assert!(leases.remaining("x", &l, at(1000)).is_zero());
        leases.on_applied("x", &granted, at(900));
        assert_eq!(
            leases.remaining("x", &l, at(1000)),
            Duration::from_millis(900)
        );
        // Unknown to this agent's record: counts as granted just now.
        assert_eq!(
            leases.remaining("y", &l, at(5000)),
            Duration::from_millis(1000)
        );
        let mut st = raft_log::LockState::default();
        st.locks.insert("x".into(), l.clone());
        leases.reset(&st, at(7000));
        assert_eq!(
            leases.remaining("x", &l, at(7500)),
            Duration::from_millis(500)
        );
        leases.on_applied("x", &LockResponse::Released, at(7600));
        assert_eq!(
            leases.remaining("x", &l, at(7600)),
            Duration::from_millis(1000)
        );
    }
}
