//! The I/O of the detector's probes over `/riftmesh/member/2` (`/1` with older agents): a direct
//! ping, asking helpers to probe a suspect (`ProbeFor`), and this agent's
//! answer when it is the helper. Results go back into the task's loop; what
//! they mean is the detector's business.

use std::time::Duration;

use libp2p::request_response::ResponseChannel;
use libp2p::PeerId;
use tokio::sync::mpsc::UnboundedSender;

use super::detector::Failure;
use crate::net::wire::{MemberRequest, MemberResponse};
use crate::net::{NetHandle, RequestError};

/// Results of the requests the loop sent, back into the loop.
pub(super) enum Internal {
    Direct(PeerId, Result<(), Failure>),
    Indirect {
        target: PeerId,
        helper: PeerId,
        reached: Option<bool>,
    },
    Exchanged {
        peer: PeerId,
        sent_info: u64,
        response: Box<MemberResponse>,
    },
}

/// What a ping's outcome tells the detector: a pong is life, a refused
/// connection is evidence of death, anything else is silence.
pub(super) fn direct_outcome<E>(
    r: Result<Result<MemberResponse, RequestError>, E>,
) -> Result<(), Failure> {
    match r {
        Ok(Ok(MemberResponse::Pong { .. })) => Ok(()),
        Ok(Err(RequestError::Dial(_))) => Err(Failure::Refused),
        _ => Err(Failure::Silent),
    }
}

/// Ping `peer` once, within `timeout`.
pub(super) fn direct(
    net: NetHandle,
    tx: UnboundedSender<Internal>,
    peer: PeerId,
    incarnation: u64,
    timeout: Duration,
) {
    tokio::spawn(async move {
        let r = tokio::time::timeout(
            timeout,
            net.member_request(peer, MemberRequest::Ping { incarnation }),
        )
        .await;
        let _ = tx.send(Internal::Direct(peer, direct_outcome(r)));
    });
}

/// Ask each helper to probe `target`; a helper gets twice the probe timeout
/// (its own ping to the target runs inside it).
pub(super) fn indirect(
    net: &NetHandle,
    tx: &UnboundedSender<Internal>,
    target: PeerId,
    helpers: Vec<PeerId>,
    timeout: Duration,
) {
    for helper in helpers {
        let net = net.clone();
        let tx = tx.clone();
        let bytes = target.to_bytes();
        tokio::spawn(async move {
            let r = tokio::time::timeout(
                timeout * 2,
                net.member_request(helper, MemberRequest::ProbeFor { target: bytes }),
            )
            .await;
            let reached = match r {
                Ok(Ok(MemberResponse::Probed { reached })) => Some(reached),
                _ => None,
            };
            let _ = tx.send(Internal::Indirect {
                target,
                helper,
                reached,
            });
        });
    }
}

/// A helper's answer that needs no ping: it is the target itself (reached),
/// or it holds the target settled dead or left (not reached). `None`: ping.
pub(super) fn answer_without_ping(target: PeerId, me: PeerId, gone: bool) -> Option<bool> {
    if target == me {
        Some(true)
    } else if gone {
        Some(false)
    } else {
        None
    }
}

/// Answer a peer's `ProbeFor`: `target` as parsed (`None`: not a peer id),
/// `gone` whether this agent holds it settled dead or left.
pub(super) fn answer_for(
    net: NetHandle,
    channel: ResponseChannel<MemberResponse>,
    target: Option<PeerId>,
    me: PeerId,
    gone: bool,
    incarnation: u64,
    timeout: Duration,
) {
    let Some(target) = target else {
        tokio::spawn(async move {
            net.member_respond(
                channel,
                MemberResponse::Refused {
                    reason: "target is not a peer id".into(),
                },
            )
            .await
        });
        return;
    };
    tokio::spawn(async move {
        let reached = match answer_without_ping(target, me, gone) {
            Some(r) => r,
            None => matches!(
                tokio::time::timeout(
                    timeout,
                    net.member_request(target, MemberRequest::Ping { incarnation })
                )
                .await,
                Ok(Ok(MemberResponse::Pong { .. }))
            ),
        };
        net.member_respond(channel, MemberResponse::Probed { reached })
            .await
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_dial_is_evidence_and_anything_else_silence() {
        let ok: Result<_, ()> = Ok(Ok(MemberResponse::Pong { incarnation: 1 }));
        assert_eq!(direct_outcome(ok), Ok(()));
        let refused: Result<_, ()> = Ok(Err(RequestError::Dial("refused".into())));
        assert_eq!(direct_outcome(refused), Err(Failure::Refused));
        let timeout: Result<_, ()> = Ok(Err(RequestError::Timeout));
        assert_eq!(direct_outcome(timeout), Err(Failure::Silent));
        let late: Result<Result<MemberResponse, RequestError>, ()> = Err(());
        assert_eq!(direct_outcome(late), Err(Failure::Silent));
        let odd: Result<_, ()> = Ok(Ok(MemberResponse::Done));
        assert_eq!(direct_outcome(odd), Err(Failure::Silent));
    }

    #[test]
    fn a_helper_answers_for_itself_and_the_settled_dead_without_a_ping() {
        let (me, other) = (PeerId::random(), PeerId::random());
        assert_eq!(answer_without_ping(me, me, false), Some(true));
        assert_eq!(answer_without_ping(me, me, true), Some(true));
        assert_eq!(answer_without_ping(other, me, true), Some(false));
        assert_eq!(answer_without_ping(other, me, false), None);
    }
}
