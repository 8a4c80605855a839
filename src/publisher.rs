//! The one way a local event enters the cluster: size check, durable append
//! (dedup by idempotency key or content hash), then gossip. A cheap clone is
//! handed to every part that publishes (the API, membership, the leader,
//! blob transfer), so none of them needs the whole node.

use crate::event::{self, Draft};
use crate::metrics::{label, Metrics};
use crate::net::{self, NetHandle};
use crate::store::{Appended, Store, StoreError};

/// Room left in a gossip frame for the envelope around the payload
/// (ids, signature, gossipsub's own framing).
pub const ENVELOPE_ALLOWANCE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Event(#[from] event::EventError),
    #[error("event of about {size} bytes exceeds the limit of {limit} bytes (max_event_bytes minus {ENVELOPE_ALLOWANCE} bytes of envelope); send large data as a blob")]
    TooLarge { size: usize, limit: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("{what} at {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
}

/// Publishes local events: the store's writer, then the network.
#[derive(Clone)]
pub struct Publisher {
    store: Store,
    net: NetHandle,
    metrics: Metrics,
    max_event_bytes: usize,
}

impl Publisher {
    pub fn new(store: Store, net: NetHandle, metrics: Metrics, max_event_bytes: usize) -> Self {
        Publisher {
            store,
            net,
            metrics,
            max_event_bytes,
        }
    }

    /// Largest payload-plus-metadata a local event may carry.
    pub fn max_event_size(&self) -> usize {
        self.max_event_bytes.saturating_sub(ENVELOPE_ALLOWANCE)
    }

    /// Accept local events: size check, durable append (dedup by content hash),
    /// then gossip the new ones.
    pub async fn publish(&self, drafts: Vec<Draft>) -> Result<Vec<Appended>, NodeError> {
        let limit = self.max_event_size();
        for d in &drafts {
            let size = d.payload.len()
                + d.event_type.len()
                + d.origin.as_ref().map_or(0, |s| s.len())
                + d.correlation_id.as_ref().map_or(0, |s| s.len())
                + d.parent_id.as_ref().map_or(0, |s| s.len());
            if size > limit {
                return Err(NodeError::TooLarge { size, limit });
            }
        }
        let out = self.store.append_local(drafts).await?;
        let mut fresh = Vec::new();
        for a in &out {
            match a {
                Appended::New { event, .. } => {
                    self.metrics.events_published.inc();
                    fresh.push(event);
                }
                Appended::Duplicate { .. } | Appended::Held => {
                    self.metrics
                        .events_duplicate
                        .get_or_create(&label("via", "api"))
                        .inc();
                }
            }
        }
        // All new events of the request in one hand-over to the network task.
        let frames = fresh.iter().map(|e| net::wire::encode_event(e)).collect();
        match self.net.publish_frames(frames).await {
            Ok(results) => {
                for (event, r) in fresh.iter().zip(results) {
                    if let Err(e) = r {
                        tracing::warn!(id = %event.id, error = %e, "gossip publish failed; peers get the event through catch-up");
                    }
                }
            }
            // Only when there were frames: none is answered without asking.
            Err(e) => {
                tracing::warn!(events = fresh.len(), error = %e, "gossip publish failed; peers get the events through catch-up");
            }
        }
        Ok(out)
    }
}
