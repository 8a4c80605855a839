//! Canonical JSON, the content hash and the dedup digest (idempotency
//! key or content).

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::*;

/// SHA-256 over HASH_DOMAIN, the canonical type, a zero byte and the canonical
/// payload. Id, timestamp, source, sequence and links are left out: two copies
/// of the same fact hash alike wherever they were published.
pub fn content_hash(event_type: &str, canonical_payload: &str) -> Hash {
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    h.update(event_type.as_bytes());
    h.update([0u8]);
    h.update(canonical_payload.as_bytes());
    h.finalize().into()
}

/// What the dedup index is keyed by (proto-notes/events.md §13): with an
/// idempotency key, SHA-256 over IDEM_DOMAIN, the type, a zero byte and the
/// key (every publication of that type and key is one fact, whatever its
/// content); without one, the content hash.
pub fn dedup_digest(event_type: &str, idem_key: Option<&str>, content: &Hash) -> Hash {
    match idem_key {
        None => *content,
        Some(k) => {
            let mut h = Sha256::new();
            h.update(IDEM_DOMAIN);
            h.update(event_type.as_bytes());
            h.update([0u8]);
            h.update(k.as_bytes());
            h.finalize().into()
        }
    }
}

/// An idempotency key: 1 to [`MAX_ID_LEN`] bytes, no control characters.
pub fn check_idem_key(k: &str) -> Result<(), EventError> {
    if k.is_empty() || k.len() > MAX_ID_LEN || k.chars().any(char::is_control) {
        return Err(EventError::BadIdemKey);
    }
    Ok(())
}

/// JSON with object keys sorted by their UTF-8 bytes, no insignificant
/// whitespace, strings escaped as serde_json does, numbers as serde_json prints them.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}
