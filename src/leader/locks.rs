//! Distributed locks: the calls a client makes ([`LockCall`]), their answers
//! and errors, and how a call is run — here when this agent leads, else
//! forwarded to the leader over `/riftmesh/raft/2`.

use std::time::Duration;

use libp2p::PeerId;
use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::rpc::{Envelope, Msg, Reply};
use super::{raft_log, Ctx, Leader, LockRequest, LockResponse};
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
    List(Vec<(String, raft_log::Lock)>),
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
    fn stamp(call: LockCall) -> Option<LockRequest> {
        let now_ms = event::now_ms();
        Some(match call {
            LockCall::Acquire {
                name,
                holder,
                ttl_ms,
            } => LockRequest::Acquire {
                name,
                holder,
                ttl_ms,
                now_ms,
            },
            LockCall::Renew { name, token } => LockRequest::Renew {
                name,
                token,
                now_ms,
            },
            LockCall::Release { name, token } => LockRequest::Release { name, token },
            LockCall::List => return None,
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
        let Some(req) = Self::stamp(call) else {
            // A list is read on the leader after checking it still leads.
            tokio::time::timeout(Duration::from_secs(3), raft.ensure_linearizable())
                .await
                .map_err(|_| LockError::Timeout("leadership check".into()))?
                .map_err(|e| LockError::Other(e.to_string()))?;
            let now = event::now_ms();
            let locks = self
                .sm
                .get()
                .map(|sm| sm.locks())
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, l)| l.expires_ms > now)
                .collect();
            return Ok(LockAnswer::List(locks));
        };
        let r = tokio::time::timeout(Duration::from_secs(3), raft.client_write(req))
            .await
            .map_err(|_| LockError::Timeout("3 s".into()))?;
        let m = &ctx.metrics;
        match r {
            Ok(resp) => {
                match &resp.data {
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
                    LockResponse::Denied { .. } => {
                        m.lock_ops.get_or_create(&vec![("op", "deny".into())]).inc();
                    }
                    _ => {}
                }
                Ok(LockAnswer::One(resp.data))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(LockError::NoLeader)
            }
            Err(e) => Err(LockError::Other(e.to_string())),
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
