//! Distributed locks: the calls a client makes ([`LockCall`]), their answers
//! and errors, and how a call is run — here when this agent leads, else
//! forwarded to the leader over `/riftmesh/raft/3`.

use std::time::Duration;

use libp2p::PeerId;
use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::rpc::{Envelope, Msg, Reply};
use super::{Ctx, Leader, LockRequest, LockResponse};
use crate::codec;
use crate::event;
use crate::net::MAX_RAFT_MESSAGE;

/// A lock call from a client, before the leader stamps its clock on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LockCall {
    Acquire {
        name: String,
        holder: String,
        ttl_ms: u64,
    },
    Renew {
        name: String,
        token: u64,
    },
    Release {
        name: String,
        token: u64,
    },
    List,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LockAnswer {
    One(LockResponse),
    List(Vec<LockInfo>),
}

/// A lock in force, as the leader sees it: times as durations (each agent
/// turns them into its own clock's time).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    pub name: String,
    pub holder: String,
    pub token: u64,
    pub ttl_ms: u64,
    /// What the grant has left by the leader's monotonic clock.
    pub remaining_ms: u64,
}

/// What the leader makes of a call: an entry to commit, or an answer at
/// once (a lock held by a running grant, a renewal of one that ran out).
enum Judged {
    Write(LockRequest),
    Answer(LockResponse),
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("no voters are configured: this cluster has no leader and no locks (set `voters = [...]` in the config of every host)")]
    NoVoters,
    #[error("no leader is known right now (an election may be under way, or this side of the network has no majority of the voters); retry")]
    NoLeader,
    #[error("the leader did not commit the call in time (no majority of voters reachable?): {0}")]
    Timeout(String),
    /// The leader could not be reached or answered that it can't serve
    /// now: retry (503, as NoLeader and Timeout).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

impl LockError {
    /// A forwarded call's error as the leader worded it: the reasons a
    /// retry can cure (no leader there, no majority in time) stay 503 on
    /// this side instead of becoming a 502. The wire carries the text
    /// only (Reply::Lock is a string error for compatibility).
    fn from_leader(text: String) -> Self {
        let no_leader = LockError::NoLeader.to_string();
        let timeout = LockError::Timeout(String::new()).to_string();
        if text == no_leader || text.starts_with(timeout.trim_end()) {
            LockError::Unavailable(text)
        } else {
            LockError::Other(text)
        }
    }
}

impl Leader {
    /// Judge a call against the table as applied here and this agent's
    /// monotonic leases (raft_log::Leases): whether a grant still runs is
    /// never read from a wall clock. A `Grant` carries the (token,
    /// generation) it was judged against, so a renewal committed in between
    /// makes it fail instead of taking a running lock.
    fn judge(&self, call: LockCall) -> Option<Judged> {
        let sm = self.sm.get()?;
        let stamp_ms = event::now_ms();
        let now = std::time::Instant::now();
        let st = crate::util::lock(&sm.state);
        let leases = crate::util::lock(&sm.leases);
        Some(match call {
            LockCall::Acquire {
                name,
                holder,
                ttl_ms,
            } => {
                let expect = match st.locks.get(&name) {
                    None => None,
                    Some(l) => {
                        let left = leases.remaining(&name, l, now);
                        if !left.is_zero() {
                            return Some(Judged::Answer(LockResponse::Denied {
                                holder: l.holder.clone(),
                                token: l.token,
                                remaining_ms: (left.as_millis() as u64).max(1),
                            }));
                        }
                        Some(l.version())
                    }
                };
                Judged::Write(LockRequest::Grant {
                    name,
                    holder,
                    ttl_ms,
                    expect,
                    stamp_ms,
                })
            }
            LockCall::Renew { name, token } => match st.locks.get(&name) {
                Some(l) if l.token == token && !leases.remaining(&name, l, now).is_zero() => {
                    Judged::Write(LockRequest::Extend {
                        name,
                        token,
                        stamp_ms,
                    })
                }
                _ => Judged::Answer(LockResponse::NotHolder),
            },
            LockCall::Release { name, token } => {
                Judged::Write(LockRequest::Release { name, token })
            }
            LockCall::List => Judged::Answer(LockResponse::Noop),
        })
    }

    /// Run a lock call here if this agent leads, else at the leader.
    pub async fn call(&self, ctx: &Ctx, call: LockCall) -> Result<LockAnswer, LockError> {
        if self.voters.is_empty() {
            return Err(LockError::NoVoters);
        }
        if let Some((ServerState::Leader, _, _, _)) = self.raft_view() {
            return self.call_local(ctx, call).await;
        }
        let view = self.view(ctx);
        let Some(peer) = view
            .leader_peer_id
            .as_deref()
            .and_then(|p| p.parse::<PeerId>().ok())
        else {
            return Err(LockError::NoLeader);
        };
        let body = codec::encode(&Envelope {
            voters_hash: self.hash,
            msg: Msg::Lock(call),
        })
        .map_err(|e| LockError::Other(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), ctx.net.raft_request(peer, body))
            .await
            .map_err(|_| LockError::Timeout("no answer from the leader in 5 s".into()))?
            .map_err(|e| LockError::Unavailable(format!("cannot reach the leader: {e}")))?;
        match codec::decode::<Reply>(&resp, MAX_RAFT_MESSAGE) {
            Ok(Reply::Lock(r)) => r.map_err(LockError::from_leader),
            Ok(Reply::Mismatch) => Err(LockError::Other(
                "the leader has a different voter list than this agent; fix the config".into(),
            )),
            Ok(_) => Err(LockError::Other("unexpected answer from the leader".into())),
            Err(e) => Err(LockError::Other(format!("bad answer from the leader: {e}"))),
        }
    }

    pub(super) async fn call_local(
        &self,
        ctx: &Ctx,
        call: LockCall,
    ) -> Result<LockAnswer, LockError> {
        let Some(raft) = self.raft.get() else {
            return Err(LockError::NoLeader);
        };
        if matches!(call, LockCall::List) {
            // A list is read on the leader after checking it still leads.
            tokio::time::timeout(Duration::from_secs(3), raft.ensure_linearizable())
                .await
                .map_err(|_| LockError::Timeout("leadership check".into()))?
                .map_err(|e| LockError::Other(e.to_string()))?;
            let Some(sm) = self.sm.get() else {
                return Ok(LockAnswer::List(Vec::new()));
            };
            let now = std::time::Instant::now();
            let st = crate::util::lock(&sm.state);
            let leases = crate::util::lock(&sm.leases);
            let locks = st
                .locks
                .iter()
                .filter_map(|(name, l)| {
                    let left = leases.remaining(name, l, now);
                    (!left.is_zero()).then(|| LockInfo {
                        name: name.clone(),
                        holder: l.holder.clone(),
                        token: l.token,
                        ttl_ms: l.ttl_ms,
                        remaining_ms: (left.as_millis() as u64).max(1),
                    })
                })
                .collect();
            return Ok(LockAnswer::List(locks));
        }
        // A refusal judged on this leader's applied table could be stale (a
        // new leader that has not applied its predecessor's last commits):
        // before refusing, the leader confirms it leads and has applied
        // everything committed (a read index), and judges again. A grant
        // that missed its compare-and-set (renewed, released or granted
        // since) is judged again once on the table that includes it.
        let mut confirmed = false;
        let mut missed = false;
        let m = &ctx.metrics;
        loop {
            let req = match self.judge(call.clone()) {
                None => return Err(LockError::NoLeader),
                Some(Judged::Answer(_)) if !confirmed => {
                    tokio::time::timeout(Duration::from_secs(3), raft.ensure_linearizable())
                        .await
                        .map_err(|_| LockError::Timeout("leadership check".into()))?
                        .map_err(|e| LockError::Other(e.to_string()))?;
                    confirmed = true;
                    continue;
                }
                Some(Judged::Answer(a)) => {
                    if matches!(a, LockResponse::Denied { .. }) {
                        m.lock_ops.get_or_create(&vec![("op", "deny".into())]).inc();
                    }
                    return Ok(LockAnswer::One(a));
                }
                Some(Judged::Write(req)) => req,
            };
            let is_grant = matches!(req, LockRequest::Grant { .. });
            let r = tokio::time::timeout(Duration::from_secs(3), raft.client_write(req))
                .await
                .map_err(|_| LockError::Timeout("3 s".into()))?;
            let resp = match r {
                Ok(resp) => resp.data,
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    return Err(LockError::NoLeader)
                }
                Err(e) => return Err(LockError::Other(e.to_string())),
            };
            match &resp {
                LockResponse::Granted {
                    replaced_expired, ..
                } => {
                    m.lock_ops
                        .get_or_create(&vec![("op", "grant".into())])
                        .inc();
                    if *replaced_expired {
                        m.lock_ops
                            .get_or_create(&vec![("op", "expired".into())])
                            .inc();
                    }
                }
                LockResponse::Denied { .. } | LockResponse::NotHolder if is_grant && !missed => {
                    missed = true;
                    continue;
                }
                LockResponse::NotHolder if is_grant => {
                    // Released or changed again while granting: no holder
                    // to name, and a retry will likely get it.
                    return Err(LockError::Unavailable(
                        "the lock changed twice while it was being granted; retry".into(),
                    ));
                }
                LockResponse::Denied { .. } => {
                    m.lock_ops.get_or_create(&vec![("op", "deny".into())]).inc();
                }
                _ => {}
            }
            return Ok(LockAnswer::One(resp));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_forwarded_refusal_a_retry_can_cure_stays_unavailable() {
        use super::LockError;
        let from = |e: LockError| LockError::from_leader(e.to_string());
        assert!(matches!(
            from(LockError::NoLeader),
            LockError::Unavailable(_)
        ));
        assert!(matches!(
            from(LockError::Timeout("3 s".into())),
            LockError::Unavailable(_)
        ));
        assert!(matches!(
            from(LockError::Other("lock held".into())),
            LockError::Other(_)
        ));
    }
}
