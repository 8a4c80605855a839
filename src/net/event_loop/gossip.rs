//! Gossip events as they arrive: decoded, verified, limited per signing
//! source, and judged for gossipsub (accept, ignore, or reject at a cost to
//! the sender's score) before the node gets them.

use libp2p::gossipsub::{self, MessageAcceptance};

use super::EventLoop;
use crate::metrics::label;
use crate::net::{wire, Inbound};

impl EventLoop {
    pub(super) fn on_gossip(&mut self, ev: gossipsub::Event) {
        match ev {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let verdict = match wire::decode_event(&message.data, self.max_msg) {
                    Err(e) => Err((e.reason(), e.to_string())),
                    Ok(event) => match event.verify() {
                        Err(e) => {
                            let reason = match e {
                                crate::event::EventError::HashMismatch => "hash",
                                crate::event::EventError::BadSignature
                                | crate::event::EventError::BadSource(_) => "signature",
                                _ => "invalid",
                            };
                            Err((reason, e.to_string()))
                        }
                        Ok(()) => Ok(event),
                    },
                };
                // Floods are limited per signing source, never per relay: a
                // relay forwards everyone's events. The excess is ignored
                // (not forwarded, not stored, no score penalty for the
                // relays); catch-up fetches it later at its own paced rate.
                let verdict = match verdict {
                    Ok(event) if !self.gossip_rate.allow(&event.source) => {
                        let source = event.source.clone();
                        self.rate_limited("gossip", "source_rate", source);
                        self.swarm
                            .behaviour_mut()
                            .gossipsub
                            .report_message_validation_result(
                                &message_id,
                                &propagation_source,
                                MessageAcceptance::Ignore,
                            );
                        return;
                    }
                    v => v,
                };
                let gs = &mut self.swarm.behaviour_mut().gossipsub;
                match verdict {
                    Ok(event) => {
                        gs.report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Accept,
                        );
                        let inbound = Inbound::Gossip {
                            event: Box::new(event),
                            from: propagation_source,
                        };
                        if self.in_tx.try_send(inbound).is_err() {
                            self.metrics
                                .inbound_dropped
                                .get_or_create(&label("queue", "gossip"))
                                .inc();
                            tracing::warn!("inbound event queue full; event dropped here (counted in riftmesh_inbound_dropped_total)");
                        }
                    }
                    Err((reason, detail)) => {
                        // A newer wire version is not misbehaviour (rolling upgrades):
                        // ignore it without penalty; anything else costs the sender score.
                        let verdict = if reason == "version" {
                            MessageAcceptance::Ignore
                        } else {
                            MessageAcceptance::Reject
                        };
                        gs.report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            verdict,
                        );
                        self.metrics
                            .events_rejected
                            .get_or_create(&label("reason", reason))
                            .inc();
                        tracing::warn!(peer = %propagation_source, reason, %detail, bytes = message.data.len(), "gossip message refused");
                    }
                }
            }
            gossipsub::Event::Subscribed { peer_id, .. } => {
                if let Some(st) = self.peers.get_mut(&peer_id) {
                    st.subscribed = true;
                }
            }
            _ => {}
        }
    }
}
