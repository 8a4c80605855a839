//! What the limits refuse, counted in the metrics and logged once per
//! (who, what): request and gossip rates, connection limits, and handshakes
//! that fail (the one visible sign of a swarm-key mismatch).

use std::time::Instant;

use super::EventLoop;
use crate::limits::Log;
use crate::metrics::{label, Labels};

/// An error and its sources, as one line (libp2p's transport errors keep
/// the cause in `source()`, their own text is often empty).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

impl EventLoop {
    /// Consumer counts of `peer`'s heartbeat that decoding dropped
    /// (`wire::check_sub_counts`): counted and logged once per peer.
    pub(super) fn member_counts_dropped(&mut self, peer: &libp2p::PeerId, dropped: u32) {
        if dropped == 0 {
            return;
        }
        self.metrics
            .events_rejected
            .get_or_create(&label("reason", "member_subs"))
            .inc_by(u64::from(dropped));
        let who = peer.to_base58();
        if self.log_once.note(&who, "member_subs", Instant::now()) == Log::First {
            tracing::warn!(peer = %who, dropped, "consumer counts dropped from a member heartbeat: a pattern over 128 bytes or not a type pattern, or beyond 128 patterns (counted in riftmesh_events_rejected_total{{reason=\"member_subs\"}}; later ones from this peer are summarised once a minute)");
        }
    }

    /// Count a refusal by rate and log it once per (who, protocol).
    pub(super) fn rate_limited(
        &mut self,
        protocol: &'static str,
        reason: &'static str,
        who: String,
    ) {
        let labels: Labels = vec![("protocol", protocol.into()), ("reason", reason.into())];
        self.metrics.rate_limited.get_or_create(&labels).inc();
        if self.log_once.note(&who, protocol, Instant::now()) == Log::First {
            tracing::warn!(peer = %who, protocol, reason, "rate limit exceeded: message refused (counted in riftmesh_rate_limited_total; later refusals are summarised once a minute)");
        }
    }

    /// A connection that failed in the handshake (private network, then
    /// Noise): with the swarm key XOR-ing every byte, a peer with another
    /// key is read as garbage and the handshake fails, so this is the one
    /// visible sign of a key mismatch. Warned once per address.
    pub(super) fn handshake_failed(&mut self, who: String, direction: &'static str, error: &str) {
        if !crate::limits::is_handshake_failure(error) {
            return;
        }
        self.metrics
            .handshake_failures
            .get_or_create(&label("direction", direction))
            .inc();
        if self.log_once.note(&who, "handshake", Instant::now()) == Log::First {
            tracing::warn!(addr = %who, direction, error, "connection failed in its handshake: the peer most likely uses another swarm key (compare the fingerprint this agent logs at start, \"private network key loaded\", with the peer's); counted in riftmesh_handshake_failures_total, later failures from this address are summarised once a minute");
        }
    }

    /// Count a connection refused by a connection limit and log it once per
    /// (who, limit).
    pub(super) fn connection_denied(
        &mut self,
        cause: &libp2p::swarm::ConnectionDenied,
        direction: &'static str,
        who: String,
    ) {
        let Some(exceeded) = cause.downcast_ref::<libp2p::connection_limits::Exceeded>() else {
            return;
        };
        let text = exceeded.to_string();
        let limit = crate::limits::connection_limit_kind(&text);
        let labels: Labels = vec![("limit", limit.into()), ("direction", direction.into())];
        self.metrics
            .connections_refused
            .get_or_create(&labels)
            .inc();
        let what = match limit {
            "per_peer" => "connections_per_peer",
            "total" => "connections_total",
            "pending_incoming" => "connections_pending_incoming",
            "pending_outgoing" => "connections_pending_outgoing",
            _ => "connections_other",
        };
        if self.log_once.note(&who, what, Instant::now()) == Log::First {
            tracing::warn!(peer = %who, limit, direction, detail = %text, "connection refused by a connection limit (counted in riftmesh_connections_refused_total; later refusals are summarised once a minute)");
        }
    }
}
