//! The Prometheus registry (prometheus-client, also fed by libp2p-metrics) and
//! the `/metrics` listener. Only metric families live here, no business logic.

use std::net::SocketAddr;
use std::sync::Arc;

pub mod classic;

use axum::{
    http::{header, HeaderMap},
    routing::get,
    Router,
};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub type FGauge = Gauge<f64, AtomicU64>;

pub type Labels = Vec<(&'static str, String)>;

pub fn label(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

/// Register each `name, help, family;` in `r` (the family cloned: every
/// family is an Arc inside).
macro_rules! reg {
    ($r:expr; $($n:literal, $h:literal, $m:expr;)*) => { $( $r.register($n, $h, $m.clone()); )* };
}

/// riftmesh's own families. Cheap to clone (every family is an Arc inside).
#[derive(Clone)]
pub struct Metrics {
    pub events_published: Counter,
    pub events_received: Family<Labels, Counter>,
    pub events_duplicate: Family<Labels, Counter>,
    pub naming_without_blob: Family<Labels, Counter>,
    pub events_rejected: Family<Labels, Counter>,
    pub inbound_dropped: Family<Labels, Counter>,
    pub rate_limited: Family<Labels, Counter>,
    pub connections_refused: Family<Labels, Counter>,
    pub handshake_failures: Family<Labels, Counter>,
    pub consumer_lag: Family<Labels, Gauge>,
    pub store_bytes: Gauge,
    pub store_events: Gauge,
    pub connected_peers: Gauge,
    pub peers_by_via: Family<Labels, Gauge>,
    pub reachability: Family<Labels, Gauge>,
    pub relay_reservations: Gauge,
    pub remote_latency: Histogram,
    pub api_errors: Family<Labels, Counter>,
    pub catchup_events: Counter,
    pub catchup_bytes: Counter,
    pub antientropy_exchanges: Counter,
    pub antientropy_bytes: Counter,
    pub gaps_open: Gauge,
    pub gap_age: Gauge,
    pub order_skipped: Counter,
    pub members: Family<Labels, Gauge>,
    pub member_state: Family<Labels, Gauge>,
    pub member_last_heard: Family<Labels, FGauge>,
    pub member_rtt: Family<Labels, FGauge>,
    pub member_transitions: Family<Labels, Counter>,
    pub incarnation: Gauge,
    pub detector_stalls: Counter,
    pub host_cpu_use: FGauge,
    pub host_load1: FGauge,
    pub host_mem_used: Gauge,
    pub host_mem_total: Gauge,
    pub host_disk_free: Gauge,
    pub host_disk_total: Gauge,
    pub host_gpu_util: Family<Labels, FGauge>,
    pub host_gpu_temp: Family<Labels, FGauge>,
    pub host_gpu_mem_used: Family<Labels, FGauge>,
    pub host_jobs: Family<Labels, FGauge>,
    pub raft_term: Gauge,
    pub leader_term: Gauge,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub election_seconds: Histogram,
    pub lock_ops: Family<Labels, Counter>,
    pub voter_mismatch: Gauge,
    pub transfers_finished: Family<Labels, Counter>,
    pub transfer_place_failed: Counter,
    pub transfer_bytes: Family<Labels, Counter>,
    pub transfer_peer_bytes: Family<Labels, Counter>,
    pub transfer_seconds: Histogram,
    pub transfer_active: Gauge,
    pub transfer_chunks_rejected: Family<Labels, Counter>,
    pub transfer_served: Family<Labels, Counter>,
    pub transfer_serve_checks: Family<Labels, Counter>,
    pub blob_store_bytes: Gauge,
    pub blob_store_blobs: Gauge,
}

impl Metrics {
    pub fn register(reg: &mut Registry) -> Self {
        let m = Metrics::unregistered();
        // Families appear in /metrics in the order they are registered.
        let r = reg.sub_registry_with_prefix("riftmesh");
        m.register_events(r);
        m.register_members(r);
        m.register_leader(r);
        m.register_blobs(r);
        m
    }

    /// Every family, empty, with its buckets.
    fn unregistered() -> Metrics {
        Metrics {
            events_published: Counter::default(),
            events_received: Family::default(),
            events_duplicate: Family::default(),
            naming_without_blob: Family::default(),
            events_rejected: Family::default(),
            inbound_dropped: Family::default(),
            rate_limited: Family::default(),
            connections_refused: Family::default(),
            handshake_failures: Family::default(),
            consumer_lag: Family::default(),
            store_bytes: Gauge::default(),
            store_events: Gauge::default(),
            connected_peers: Gauge::default(),
            peers_by_via: Family::default(),
            reachability: Family::default(),
            relay_reservations: Gauge::default(),
            remote_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            api_errors: Family::default(),
            catchup_events: Counter::default(),
            catchup_bytes: Counter::default(),
            antientropy_exchanges: Counter::default(),
            antientropy_bytes: Counter::default(),
            gaps_open: Gauge::default(),
            gap_age: Gauge::default(),
            order_skipped: Counter::default(),
            members: Family::default(),
            member_state: Family::default(),
            member_last_heard: Family::default(),
            member_rtt: Family::default(),
            member_transitions: Family::default(),
            incarnation: Gauge::default(),
            detector_stalls: Counter::default(),
            host_cpu_use: FGauge::default(),
            host_load1: FGauge::default(),
            host_mem_used: Gauge::default(),
            host_mem_total: Gauge::default(),
            host_disk_free: Gauge::default(),
            host_disk_total: Gauge::default(),
            host_gpu_util: Family::default(),
            host_gpu_temp: Family::default(),
            host_gpu_mem_used: Family::default(),
            host_jobs: Family::default(),
            raft_term: Gauge::default(),
            leader_term: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            election_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 10)),
            lock_ops: Family::default(),
            voter_mismatch: Gauge::default(),
            transfers_finished: Family::default(),
            transfer_place_failed: Counter::default(),
            transfer_bytes: Family::default(),
            transfer_peer_bytes: Family::default(),
            transfer_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 14)),
            transfer_active: Gauge::default(),
            transfer_chunks_rejected: Family::default(),
            transfer_served: Family::default(),
            transfer_serve_checks: Family::default(),
            blob_store_bytes: Gauge::default(),
            blob_store_blobs: Gauge::default(),
        }
    }

    /// The event log, peers and catch-up.
    fn register_events(&self, r: &mut Registry) {
        let m = self;
        reg! { r;
            "events_published", "Events published by local processes and accepted into the log", m.events_published;
            "events_received", "Events from peers accepted into the log, by path", m.events_received;
            "events_duplicate", "Events dropped as duplicates of an accepted content hash, by path", m.events_duplicate;
            "events_rejected", "Events or messages refused, by reason (decode, version, too_large, hash, signature, invalid)", m.events_rejected;
            "inbound_dropped", "Valid inbound messages dropped because a bounded queue was full, by queue", m.inbound_dropped;
            "rate_limited", "Inbound messages refused because their peer or source exceeded its rate, by protocol (gossip, catchup, member, raft, blob) and reason (source_rate, peer_rate)", m.rate_limited;
            "handshake_failures", "Connections that failed in the private-network or Noise handshake (most often a peer with another swarm key), by direction", m.handshake_failures;
            "connections_refused", "Connections refused by a connection limit, by limit (per_peer, total, pending_incoming, pending_outgoing) and direction (in, out)", m.connections_refused;
            "naming_events_without_blob", "Local publishes of a naming type (MODEL_PROMOTED, GAME_BATCH_READY, BLOB_PUBLISHED) with no blob reference: accepted as plain events, nothing transferred, by type", m.naming_without_blob;
            "consumer_lag", "Events after a durable consumer's acknowledged cursor that it matches (counted through at most 20,000 log entries)", m.consumer_lag;
            "store_size_bytes", "Bytes the event store uses on disk", m.store_bytes;
            "store_events", "Events retained in the local log", m.store_events;
            "connected_peers", "Peers with an open connection", m.connected_peers;
            "connected_peers_by_via", "Peers with an open connection, by how the best one reaches them (direct, hole-punched, relayed)", m.peers_by_via;
            "reachability", "Whether peers can dial this agent (AutoNAT): 1 for the current state, 0 for the others, by state (public, private, unknown)", m.reachability;
            "relay_reservations", "Relays holding an accepted reservation for this agent (only while it is private)", m.relay_reservations;
            "remote_event_latency_seconds", "Time from publish at the source to acceptance here, for events from peers", m.remote_latency;
            "api_errors", "Local API requests answered with an error, by status code", m.api_errors;
            "catchup_events", "Verified events fetched from peers by catch-up", m.catchup_events;
            "catchup_bytes", "Approximate bytes of envelopes fetched by catch-up", m.catchup_bytes;
            "antientropy_exchanges", "Anti-entropy rounds started with a peer (a version-vector digest or summary sent)", m.antientropy_exchanges;
            "antientropy_bytes", "Bytes of version-vector digests and summaries sent and received (anti-entropy traffic)", m.antientropy_bytes;
            "order_gaps_open", "Sources whose later events wait for a missing earlier one", m.gaps_open;
            "order_gap_age_seconds", "How long the oldest open gap has waited", m.gap_age;
            "order_gaps_skipped", "Gaps later events were released past (hold expired or buffer full; the missing ones are still fetched), and ranges gone past the source's retention", m.order_skipped;
        }
    }

    /// Membership, the failure detector and host health.
    fn register_members(&self, r: &mut Registry) {
        let m = self;
        reg! { r;
            "members", "Known members by state (this agent counts as alive)", m.members;
            "member_state", "Per known member (this agent too) and state (alive, suspect, dead, left): 1 for its current state, 0 for the others, by peer, name and state", m.member_state;
            "member_last_heard_seconds", "Seconds since this agent last heard directly from a member", m.member_last_heard;
            "member_rtt_seconds", "Last ping round-trip time to a member", m.member_rtt;
            "member_transitions", "Failure-detector state changes, by from and to state", m.member_transitions;
            "incarnation", "This agent's incarnation (raised at each start and each refutation)", m.incarnation;
            "detector_stalls", "Times this agent found itself stalled and gave every member grace (riftmesh_detector_stalls_total)", m.detector_stalls;
            "host_cpu_use_ratio", "Host CPU use, 0-1", m.host_cpu_use;
            "host_load1", "Host 1-minute load average", m.host_load1;
            "host_memory_used_bytes", "Host memory in use", m.host_mem_used;
            "host_memory_total_bytes", "Host memory", m.host_mem_total;
            "host_disk_free_bytes", "Free bytes on the filesystem of the data directory", m.host_disk_free;
            "host_disk_total_bytes", "Size of the filesystem of the data directory", m.host_disk_total;
            "host_gpu_utilization_ratio", "GPU utilization, 0-1, by GPU index", m.host_gpu_util;
            "host_gpu_temperature_celsius", "GPU temperature, by GPU index", m.host_gpu_temp;
            "host_gpu_memory_used_bytes", "GPU memory in use, by GPU index", m.host_gpu_mem_used;
            "host_jobs", "Job counters reported by local processes, by kind (the counter's name)", m.host_jobs;
        }
    }

    /// The Raft leader and its locks.
    fn register_leader(&self, r: &mut Registry) {
        let m = self;
        reg! { r;
            "raft_term", "Current Raft term on this voter (the leadership fencing token)", m.raft_term;
            "leader_term", "Term of the newest LEADER_ELECTED event this agent holds (every agent, voter or not)", m.leader_term;
            "is_leader", "1 while this agent is the Raft leader", m.is_leader;
            "leader_changes", "Times this voter saw a new leader", m.leader_changes;
            "election_duration_seconds", "Time from losing a leader to knowing the next one", m.election_seconds;
            "lock_ops", "Lock outcomes on the leader, by op (grant, deny, expired)", m.lock_ops;
            "voter_list_mismatch", "Live members whose voter list differs from this agent's", m.voter_mismatch;
        }
    }

    /// Blob transfer and the blob store.
    fn register_blobs(&self, r: &mut Registry) {
        let m = self;
        reg! { r;
            "sync_transfers", "Blob fetches finished, by result (completed, failed, forgotten: called off because every name it was for was retracted)", m.transfers_finished;
            "sync_place_failed", "Failed attempts to place a held blob at a want's `place` path, per name (retried every 30 s)", m.transfer_place_failed;
            "sync_bytes", "Blob chunk bytes moved, by direction (in, out)", m.transfer_bytes;
            "sync_active", "Blob fetches in progress", m.transfer_active;
            "sync_peer_bytes", "Blob chunk bytes moved, by peer and direction", m.transfer_peer_bytes;
            "sync_transfer_seconds", "Duration of completed blob fetches", m.transfer_seconds;
            "sync_chunks_rejected", "Chunks thrown away, by reason: hash or size (received), manifest, local_damage (a stored copy found damaged when serving a peer, placing, or reading for a local client)", m.transfer_chunks_rejected;
            "sync_requests_served", "Blob sync requests answered, by kind and result", m.transfer_served;
            "sync_serve_checks", "Chunks served, by how the stored copy was checked: hashed against the manifest, or vouched (verified here before and its file unchanged since; hashed again after 10 min)", m.transfer_serve_checks;
            "blob_store_bytes", "Bytes of blobs held (complete and partial, at full size)", m.blob_store_bytes;
            "blob_store_blobs", "Blobs held (complete and partial)", m.blob_store_blobs;
        }
    }
}

/// `riftmesh_agent_info{name, peer_id, version} 1`: who answers on this
/// listener (an OpenMetrics info family).
pub fn register_agent_info(reg: &mut Registry, name: &str, peer_id: &str) {
    let labels: Labels = vec![
        ("name", name.to_string()),
        ("peer_id", peer_id.to_string()),
        ("version", env!("CARGO_PKG_VERSION").to_string()),
    ];
    reg.sub_registry_with_prefix("riftmesh").register(
        "agent",
        "This agent's name, peer id and version (value 1)",
        Info::new(labels),
    );
}

/// The body and content type of `/metrics` for a request's `Accept` header:
/// OpenMetrics when asked for (Prometheus does), else the classic 0.0.4 text
/// format (`promtool check metrics`, curl).
pub fn render(registry: &Registry, accept: Option<&str>) -> (&'static str, String) {
    let mut body = String::new();
    if encode(&mut body, registry).is_err() {
        body.clear();
    }
    if classic::wants_openmetrics(accept) {
        (classic::OPENMETRICS_CONTENT_TYPE, body)
    } else {
        (classic::CONTENT_TYPE, classic::from_openmetrics(&body))
    }
}

/// Serve `GET /metrics` on its own listener until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let registry = registry.clone();
            async move {
                let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                let (ctype, body) = render(&registry, accept);
                (
                    [(header::CONTENT_TYPE, ctype), (header::VARY, "Accept")],
                    body,
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

pub fn local_addr(l: &tokio::net::TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}
