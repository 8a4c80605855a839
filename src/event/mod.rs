//! Events: the envelope, the type catalog and the content hash. No I/O here.
//!
//! By concept: `envelope` (the signed event, its version-1 form, drafts,
//! sealing and verification), `digest` (canonical JSON, the content hash,
//! the idempotency digest), `types` (the catalog, aliases, normalization,
//! what a local process may name), `pattern` (type patterns).

mod digest;
mod envelope;
mod pattern;
#[cfg(test)]
mod tests;
mod types;

pub use digest::*;
pub use envelope::*;
pub use pattern::*;
pub use types::*;

/// Domain separation for the content hash and for signatures.
pub const HASH_DOMAIN: &[u8] = b"riftmesh/event-hash/1\0";
pub const SIGN_DOMAIN: &[u8] = b"riftmesh/event-sig/1\0";
/// Signature domain of envelope version 2 (an event with an idempotency key).
pub const SIGN_DOMAIN_V2: &[u8] = b"riftmesh/event-sig/2\0";
/// Domain of the dedup digest of an idempotency key.
pub const IDEM_DOMAIN: &[u8] = b"riftmesh/idem/1\0";
/// Longest accepted type name.
pub const MAX_TYPE_LEN: usize = 128;
/// Longest accepted id-like field (correlation, parent, origin, idempotency key).
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    #[error("event type {0:?} is not a well-formed name (letters, digits, '_', '.', '-'; starts with a letter; at most 128 characters)")]
    BadType(String),
    #[error("{field} is longer than {max} characters")]
    FieldTooLong { field: &'static str, max: usize },
    #[error("payload is not canonical JSON")]
    NonCanonicalPayload,
    #[error("type {0:?} is not in canonical form")]
    NonCanonicalType(String),
    #[error("content hash does not match type and payload")]
    HashMismatch,
    #[error("source {0:?} is not a peer id with an embedded public key")]
    BadSource(String),
    #[error("signature does not verify against the source's key")]
    BadSignature,
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("idempotency key must be 1 to 128 bytes without control characters")]
    BadIdemKey,
}

pub type Hash = [u8; 32];

pub use crate::util::now_ms;
