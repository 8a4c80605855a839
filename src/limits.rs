//! Bounds against a misbehaving member: connection limits, per-peer request
//! rates, per-source gossip rates, and the log-once rule for what they refuse.
//! Plain data and decisions, no I/O: `net` applies them (see
//! proto-notes/security.md).

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

/// Default: established connections, all peers together.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Default: established connections to one peer.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: u32 = 8;
/// Default: incoming connections still in their handshake.
pub const DEFAULT_MAX_PENDING_INCOMING: u32 = 128;
/// Default: inbound `/riftmesh/events/1` (catch-up) requests per second per peer.
pub const DEFAULT_RATE_CATCHUP: u32 = 500;
/// Default: inbound `/riftmesh/member/2` and `/1` requests per second per peer.
pub const DEFAULT_RATE_MEMBER: u32 = 200;
/// Default: inbound `/riftmesh/raft/1` requests per second per peer.
pub const DEFAULT_RATE_RAFT: u32 = 2000;
/// Default: inbound `/riftmesh/sync/1` (blob) requests per second per peer.
pub const DEFAULT_RATE_BLOB: u32 = 5000;
/// Default: gossip events per second accepted from one signing source.
pub const DEFAULT_GOSSIP_SOURCE_RATE: u32 = 10_000;
/// Default: gossip events one signing source may send at once.
pub const DEFAULT_GOSSIP_SOURCE_BURST: u32 = 20_000;

/// How often the refusals counted after the first are summarised in the log.
pub const LOG_SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// A (who, reason) quiet this long is forgotten: its next refusal warns again.
pub const LOG_FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most (who, reason) pairs remembered by the log-once rule; beyond, new
/// pairs share one entry (`who` = "other").
pub const LOG_MAX_KEYS: usize = 4096;

/// Inbound requests per second per peer, per request-response protocol. The
/// burst (what a peer may send at once) is twice the rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRates {
    pub catchup: u32,
    pub member: u32,
    pub raft: u32,
    pub blob: u32,
}

impl Default for RequestRates {
    fn default() -> Self {
        RequestRates {
            catchup: DEFAULT_RATE_CATCHUP,
            member: DEFAULT_RATE_MEMBER,
            raft: DEFAULT_RATE_RAFT,
            blob: DEFAULT_RATE_BLOB,
        }
    }
}

/// The network's bounds against one member's floods (every value > 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetLimits {
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    pub max_pending_incoming: u32,
    pub request_rates: RequestRates,
    pub gossip_source_rate: u32,
    pub gossip_source_burst: u32,
}

impl Default for NetLimits {
    fn default() -> Self {
        NetLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_pending_incoming: DEFAULT_MAX_PENDING_INCOMING,
            request_rates: RequestRates::default(),
            gossip_source_rate: DEFAULT_GOSSIP_SOURCE_RATE,
            gossip_source_burst: DEFAULT_GOSSIP_SOURCE_BURST,
        }
    }
}

impl NetLimits {
    /// libp2p's connection limits for these values.
    pub fn connection_limits(&self) -> libp2p::connection_limits::ConnectionLimits {
        libp2p::connection_limits::ConnectionLimits::default()
            .with_max_established(Some(self.max_connections))
            .with_max_established_per_peer(Some(self.max_connections_per_peer))
            .with_max_pending_incoming(Some(self.max_pending_incoming))
    }
}

/// Which connection limit a denial hit, as the metric label names it.
/// libp2p only exposes the kind through the error's text.
pub fn connection_limit_kind(text: &str) -> &'static str {
    if text.contains("per peer") {
        "per_peer"
    } else if text.contains("pending incoming") {
        "pending_incoming"
    } else if text.contains("pending outgoing") {
        "pending_outgoing"
    } else if text.contains("established connections") {
        "total"
    } else {
        "other"
    }
}

/// A token bucket per key (peer or source): `rate` per second, `burst` at once.
pub struct KeyedRate<K: Hash + Eq + Clone> {
    limiter: governor::DefaultKeyedRateLimiter<K>,
}

impl<K: Hash + Eq + Clone> KeyedRate<K> {
    pub fn new(rate: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(rate.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        KeyedRate {
            limiter: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
        }
    }

    /// Take one token for `key`; false: over the rate, refuse.
    pub fn allow(&self, key: &K) -> bool {
        self.limiter.check_key(key).is_ok()
    }

    /// Forget keys whose bucket is full again (bounds the memory to the keys
    /// active in the last burst's worth of time).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

struct Seen {
    /// Refusals since the last line logged for this pair.
    suppressed: u64,
    last_logged: Instant,
    last_seen: Instant,
}

/// What to do with a refusal: warn now (the first of its (who, reason)), or
/// only count it (a summary follows at most every [`LOG_SUMMARY_EVERY`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Log {
    First,
    Counted,
}

/// A summary line: `count` more refusals of `who` for `reason`.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub who: String,
    pub reason: &'static str,
    pub count: u64,
}

/// The log-once rule: the first refusal per (who, reason) is logged, later
/// ones are counted and summarised at most once a minute, so a flood writes
/// a few lines, not one per message.
#[derive(Default)]
pub struct LogOnce {
    seen: HashMap<(String, &'static str), Seen>,
}

impl LogOnce {
    pub fn note(&mut self, who: &str, reason: &'static str, now: Instant) -> Log {
        let mut key = (who.to_string(), reason);
        if !self.seen.contains_key(&key) && self.seen.len() >= LOG_MAX_KEYS {
            key.0 = "other".into();
        }
        match self.seen.get_mut(&key) {
            Some(s) => {
                s.suppressed += 1;
                s.last_seen = now;
                Log::Counted
            }
            None => {
                self.seen.insert(
                    key,
                    Seen {
                        suppressed: 0,
                        last_logged: now,
                        last_seen: now,
                    },
                );
                Log::First
            }
        }
    }

    /// Summaries due at `now`; pairs quiet for [`LOG_FORGET_AFTER`] are forgotten.
    pub fn due(&mut self, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        for ((who, reason), s) in self.seen.iter_mut() {
            if s.suppressed > 0 && now.duration_since(s.last_logged) >= LOG_SUMMARY_EVERY {
                out.push(Summary {
                    who: who.clone(),
                    reason,
                    count: s.suppressed,
                });
                s.suppressed = 0;
                s.last_logged = now;
            }
        }
        self.seen
            .retain(|_, s| s.suppressed > 0 || now.duration_since(s.last_seen) < LOG_FORGET_AFTER);
        out.sort_by(|a, b| (&a.who, a.reason).cmp(&(&b.who, b.reason)));
        out
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Whether a transport error text is a failed handshake (the private
/// network's or Noise's), as a peer with another swarm key causes. A refused
/// or timed-out TCP connection is not.
pub fn is_handshake_failure(error: &str) -> bool {
    error.contains("Handshake failed") || error.contains("Failed to negotiate transport")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_refusal_warns_then_one_summary_a_minute() {
        let t0 = Instant::now();
        let mut l = LogOnce::default();
        assert_eq!(l.note("p1", "peer_rate", t0), Log::First);
        for i in 0..1000 {
            assert_eq!(
                l.note("p1", "peer_rate", t0 + Duration::from_millis(i)),
                Log::Counted
            );
        }
        // Another peer, or another reason, is its own first.
        assert_eq!(l.note("p2", "peer_rate", t0), Log::First);
        assert_eq!(l.note("p1", "source_rate", t0), Log::First);
        assert!(l.due(t0 + Duration::from_secs(59)).is_empty());
        let s = l.due(t0 + LOG_SUMMARY_EVERY);
        assert_eq!(
            s,
            vec![Summary {
                who: "p1".into(),
                reason: "peer_rate",
                count: 1000
            }]
        );
        // Nothing new: nothing to say, and the pair stays remembered a while.
        assert!(l.due(t0 + 2 * LOG_SUMMARY_EVERY).is_empty());
        assert_eq!(
            l.note("p1", "peer_rate", t0 + 2 * LOG_SUMMARY_EVERY),
            Log::Counted
        );
        // Long quiet: forgotten, the next refusal warns again.
        let later = t0 + 2 * LOG_SUMMARY_EVERY + LOG_FORGET_AFTER + LOG_SUMMARY_EVERY;
        assert_eq!(l.due(later).len(), 1);
        let much_later = later + LOG_FORGET_AFTER;
        assert!(l.due(much_later).is_empty());
        assert!(l.is_empty());
        assert_eq!(l.note("p1", "peer_rate", much_later), Log::First);
    }

    #[test]
    fn log_once_memory_is_bounded() {
        let t0 = Instant::now();
        let mut l = LogOnce::default();
        for i in 0..LOG_MAX_KEYS + 100 {
            l.note(&format!("p{i}"), "peer_rate", t0);
        }
        assert_eq!(l.len(), LOG_MAX_KEYS + 1);
    }

    #[test]
    fn keyed_rate_refuses_beyond_the_burst_per_key() {
        let r: KeyedRate<u32> = KeyedRate::new(1, 5);
        let allowed = (0..50).filter(|_| r.allow(&1)).count();
        // 5 at once, maybe one more if a second passed on a loaded machine.
        assert!((5..=6).contains(&allowed), "{allowed}");
        // Another key has its own bucket.
        assert!(r.allow(&2));
    }

    #[test]
    fn limit_kinds_from_libp2p_text() {
        assert_eq!(
            connection_limit_kind(
                "connection limit exceeded: at most 8 established connections per peer are allowed"
            ),
            "per_peer"
        );
        assert_eq!(
            connection_limit_kind(
                "connection limit exceeded: at most 9 established connections are allowed"
            ),
            "total"
        );
        assert_eq!(
            connection_limit_kind(
                "connection limit exceeded: at most 1 pending incoming connections are allowed"
            ),
            "pending_incoming"
        );
    }
}
