//! What the API answers with that its client decodes too: events,
//! publish answers, consumer views and fetched batches, trace nodes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::Event;
use crate::store::Stored;

/// An event as the API shows it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct EventView {
    pub seq: u64,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The publishing component's name, as the publisher gave it
    /// (`"training_daemon"`, `"riftmesh/membership"`); empty when it gave
    /// none. On the wire this is the envelope's `origin`.
    pub source: String,
    /// The peer id of the agent that signed the event (the envelope's
    /// signed `source`).
    pub node: String,
    /// Deprecated: the same name as `source` (null when none was given),
    /// kept for clients written before `source` meant the component.
    pub origin: Option<String>,
    /// The event's sequence number in `node`'s own log.
    pub source_seq: u64,
    pub ts_ms: u64,
    pub time: String,
    pub received_ms: u64,
    pub correlation_id: Option<String>,
    pub parent_id: Option<String>,
    /// The publisher's idempotency key, if it gave one (envelope version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub payload: Value,
    pub hash: String,
}

pub(super) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl EventView {
    pub fn new(seq: u64, s: &Stored) -> Self {
        let e: &Event = &s.event;
        EventView {
            seq,
            id: e.id.clone(),
            event_type: e.event_type.clone(),
            source: e.origin.clone().unwrap_or_default(),
            node: e.source.clone(),
            origin: e.origin.clone(),
            source_seq: e.seq,
            ts_ms: e.ts_ms,
            time: rfc3339(e.ts_ms),
            received_ms: s.received_ms,
            correlation_id: e.correlation_id.clone(),
            parent_id: e.parent_id.clone(),
            idempotency_key: e.idem_key.clone(),
            payload: e.payload_value(),
            hash: e.hash_hex(),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PublishResp {
    pub id: String,
    pub hash: String,
    pub seq: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub duplicate: bool,
    /// For a duplicate: how long before this answer the first copy was
    /// published, by its publication time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// For a duplicate: "idempotency_key" or "content".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_by: Option<String>,
    /// Accepted, but probably not what was meant (a MODEL_PROMOTED without
    /// a blob reference: nothing will be transferred).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FetchResp {
    pub consumer: String,
    pub events: Vec<EventView>,
    /// Events removed by retention before this consumer acknowledged them.
    pub missed: u64,
    pub cursor: u64,
    pub head: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ConsumerView {
    pub name: String,
    pub types: Vec<String>,
    pub cursor: u64,
    /// Events after the cursor that this consumer matches (not every log
    /// entry): what it has still to handle.
    pub lag: u64,
    /// False when `lag` stopped counting at [`LAG_SCAN`](super::LAG_SCAN) entries (at least
    /// that many).
    #[serde(default = "yes")]
    pub lag_exact: bool,
    pub dead_letters: u64,
    pub created: String,
    pub last_ack: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TraceNode {
    pub depth: usize,
    pub event: EventView,
}

pub(super) fn yes() -> bool {
    true
}
