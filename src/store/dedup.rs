//! The dedup index: for each digest (the idempotency key's, else the
//! content hash) the first copy of the fact, and its expiry order.

/// The first copy of a fact, as the dedup index holds it.
#[derive(Clone)]
pub(super) struct FirstCopy {
    pub(super) seq: u64,
    pub(super) received_ms: u64,
    /// Its publication time (layout-1 entries: its receipt time).
    pub(super) ts_ms: u64,
    /// Known when staged in this group; read from the log when needed.
    pub(super) id: Option<String>,
}
