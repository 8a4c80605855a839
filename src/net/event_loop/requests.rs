//! The request-response protocols in the event loop: catch-up, membership,
//! and the opaque ones (raft, blob transfer). Outbound requests wait for
//! their answer by request id; inbound requests pass their peer's rate and
//! go to the module that answers them.

use libp2p::{request_response, PeerId};

use super::EventLoop;
use crate::limits::{KeyedRate, NetLimits};
use crate::metrics::label;
use crate::net::handle::{Command, Opaque};
use crate::net::wire::MemberMessage;
use crate::net::{wire, Inbound, MemberInbound, OpaqueInbound, RequestError, BUSY};

/// How many consumer counts decoding dropped from a member message.
fn dropped_counts<M: MemberMessage>(m: &M) -> u32 {
    m.beat().map_or(0, |b| b.subs_dropped)
}

/// One token bucket per peer for each request-response protocol.
pub(super) struct PeerRates {
    catchup: KeyedRate<PeerId>,
    member: KeyedRate<PeerId>,
    raft: KeyedRate<PeerId>,
    blob: KeyedRate<PeerId>,
}

impl PeerRates {
    pub(super) fn new(l: &NetLimits) -> Self {
        let r = l.request_rates;
        let bucket = |rate: u32| KeyedRate::new(rate, rate.saturating_mul(2));
        PeerRates {
            catchup: bucket(r.catchup),
            member: bucket(r.member),
            raft: bucket(r.raft),
            blob: bucket(r.blob),
        }
    }

    pub(super) fn forget_idle(&self) {
        for r in [&self.catchup, &self.member, &self.raft, &self.blob] {
            r.forget_idle();
        }
    }
}

/// Label of the catch-up protocol in the rate metrics.
const CATCHUP: &str = "catchup";
/// Label of the membership protocol in the rate metrics.
const MEMBER: &str = "member";

impl EventLoop {
    /// A request is about to go to `peer`: its connection is in use
    /// (`use_it`), and if there is none, the addresses to dial besides
    /// those the DHT and identify know.
    fn request_to(&mut self, peer: PeerId, use_it: bool) -> Vec<libp2p::Multiaddr> {
        if use_it {
            self.links.used(peer);
        }
        if self.peers.contains_key(&peer) {
            Vec::new()
        } else {
            self.links.addrs(&peer)
        }
    }

    /// A command of the request-response protocols: a request to send (its
    /// reply waits by request id) or an answer to one received.
    pub(super) fn on_request_command(&mut self, cmd: Command) {
        match cmd {
            Command::CatchupRequest {
                peer,
                request,
                reply,
            } => {
                let fetch = matches!(request, wire::CatchupRequest::Fetch { .. });
                let addrs = self.request_to(peer, fetch);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .catchup
                    .send_request_with_addresses(&peer, request, addrs);
                self.catchup_pending.insert(id, reply);
            }
            Command::CatchupRespond { channel, response } => {
                // The requester may have gone; nothing to do then.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .catchup
                    .send_response(channel, response);
            }
            Command::MemberRequest {
                peer,
                request,
                reply,
            } => {
                // With bounded links, a member this agent never met may have
                // no address yet: a dial would fail at once, and a failed
                // dial reads as a refusal (evidence of death). Say so
                // instead, and look it up.
                if self.links.is_bounded()
                    && !self.peers.contains_key(&peer)
                    && self.links.addrs(&peer).is_empty()
                {
                    self.look_up(peer, std::time::Instant::now());
                    let _ = reply.send(Err(RequestError::Other(
                        "no address known for the peer yet".into(),
                    )));
                    return;
                }
                let addrs = self.request_to(peer, true);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .member
                    .send_request_with_addresses(&peer, request, addrs);
                self.member_pending.insert(id, reply);
            }
            Command::MemberRespond { channel, response } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .member
                    .send_response(channel, response);
            }
            Command::OpaqueRequest {
                proto,
                peer,
                request,
                reply,
            } => {
                let addrs = self.request_to(peer, true);
                let b = self.swarm.behaviour_mut();
                let id = match proto {
                    Opaque::Raft => b.raft.send_request_with_addresses(&peer, request, addrs),
                    Opaque::Blob => b.blob.send_request_with_addresses(&peer, request, addrs),
                };
                self.opaque_pending.insert((proto, id), reply);
            }
            Command::OpaqueRespond {
                proto,
                channel,
                response,
            } => {
                let b = self.swarm.behaviour_mut();
                let _ = match proto {
                    Opaque::Raft => b.raft.send_response(channel, response),
                    Opaque::Blob => b.blob.send_response(channel, response),
                };
            }
            _ => unreachable!("not a request-response command"),
        }
    }

    pub(super) fn on_member(
        &mut self,
        ev: request_response::Event<wire::MemberRequest, wire::MemberResponse>,
    ) {
        use request_response::{Event, Message};
        if let Event::Message { peer, .. } = &ev {
            // A request or an answer: the connection is in use.
            self.links.used(*peer);
        }
        match ev {
            Event::Message { peer, message, .. } => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    self.member_counts_dropped(&peer, dropped_counts(&request));
                    if !self.rates.member.allow(&peer) {
                        self.rate_limited(MEMBER, "peer_rate", peer.to_base58());
                        let _ = self.swarm.behaviour_mut().member.send_response(
                            channel,
                            wire::MemberResponse::Refused {
                                reason: BUSY.into(),
                            },
                        );
                        return;
                    }
                    self.send_member(MemberInbound::Request {
                        peer,
                        request,
                        channel,
                    })
                }
                Message::Response {
                    request_id,
                    response,
                } => {
                    self.member_counts_dropped(&peer, dropped_counts(&response));
                    if let Some(reply) = self.member_pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            Event::OutboundFailure {
                request_id, error, ..
            } => {
                let e = request_error(&error);
                if let Some(reply) = self.member_pending.remove(&request_id) {
                    let _ = reply.send(Err(e));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    self.metrics
                        .events_rejected
                        .get_or_create(&label("reason", "member_frame"))
                        .inc();
                    tracing::warn!(%peer, %error, "membership request refused");
                }
            }
            Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn on_opaque(
        &mut self,
        proto: Opaque,
        ev: request_response::Event<Vec<u8>, Vec<u8>>,
    ) {
        use request_response::{Event, Message};
        if let Event::Message { peer, .. } = &ev {
            // A request or an answer: the connection is in use.
            self.links.used(*peer);
        }
        match ev {
            Event::Message { peer, message, .. } => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    let allowed = match proto {
                        Opaque::Raft => self.rates.raft.allow(&peer),
                        Opaque::Blob => self.rates.blob.allow(&peer),
                    };
                    if !allowed {
                        // The body format is the owning module's: the
                        // stream is closed without an answer.
                        self.rate_limited(proto.name(), "peer_rate", peer.to_base58());
                        drop(channel);
                        return;
                    }
                    let msg = OpaqueInbound {
                        peer,
                        request,
                        channel,
                    };
                    let tx = match proto {
                        Opaque::Raft => &self.raft_tx,
                        Opaque::Blob => &self.blob_tx,
                    };
                    if tx.try_send(msg).is_err() {
                        self.metrics
                            .inbound_dropped
                            .get_or_create(&label("queue", proto.name()))
                            .inc();
                    }
                }
                Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.opaque_pending.remove(&(proto, request_id)) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            Event::OutboundFailure {
                request_id, error, ..
            } => {
                let e = request_error(&error);
                if let Some(reply) = self.opaque_pending.remove(&(proto, request_id)) {
                    let _ = reply.send(Err(e));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    let reason = format!("{}_frame", proto.name());
                    self.metrics
                        .events_rejected
                        .get_or_create(&label("reason", &reason))
                        .inc();
                    tracing::warn!(%peer, %error, protocol = proto.name(), "request refused");
                }
            }
            Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn on_catchup(
        &mut self,
        ev: request_response::Event<wire::CatchupRequest, wire::CatchupResponse>,
    ) {
        use request_response::{Event, Message};
        // A fetch, not the periodic summaries: those go to a random
        // connection and would keep every one of them open.
        if let Event::Message {
            peer,
            message:
                Message::Request {
                    request: wire::CatchupRequest::Fetch { .. },
                    ..
                },
            ..
        } = &ev
        {
            self.links.used(*peer);
        }
        match ev {
            Event::Message { peer, message, .. } => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    if !self.rates.catchup.allow(&peer) {
                        self.rate_limited(CATCHUP, "peer_rate", peer.to_base58());
                        let _ = self.swarm.behaviour_mut().catchup.send_response(
                            channel,
                            wire::CatchupResponse::Refused {
                                reason: BUSY.into(),
                            },
                        );
                        return;
                    }
                    let msg = Inbound::Request {
                        peer,
                        request,
                        channel,
                    };
                    if self.in_tx.try_send(msg).is_err() {
                        // The labels "sync" and "sync_frame" predate the name
                        // catch-up; they stay, as metrics do.
                        self.metrics
                            .inbound_dropped
                            .get_or_create(&label("queue", "sync"))
                            .inc();
                    }
                }
                Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.catchup_pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                tracing::debug!(%peer, %error, "catch-up request failed");
                if let Some(reply) = self.catchup_pending.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                // Malformed or oversized frames end here: counted and logged.
                if matches!(error, request_response::InboundFailure::Io(_)) {
                    self.metrics
                        .events_rejected
                        .get_or_create(&label("reason", "sync_frame"))
                        .inc();
                    tracing::warn!(%peer, %error, "catch-up request refused");
                }
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

/// Why an outbound request failed, as the handle's callers see it.
fn request_error(error: &request_response::OutboundFailure) -> RequestError {
    use request_response::OutboundFailure;
    match error {
        OutboundFailure::DialFailure => RequestError::Dial(error.to_string()),
        OutboundFailure::Timeout => RequestError::Timeout,
        other => RequestError::Other(other.to_string()),
    }
}
