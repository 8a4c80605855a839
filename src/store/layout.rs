//! The store's key layout in its one sled tree, the encoding of log
//! records, and the layout versions.
//!
//! Layout (one sled tree, one-byte key prefixes, so a batch is atomic):
//! - `l` seq:u64be                 → Stored (bincode)
//! - `h` digest:32                 → (seq, accepted_ms, ts_ms)   dedup index
//!   (digest: the idempotency key's, else the content hash; layout-1
//!   entries lack ts_ms)
//! - `x` accepted_ms:u64be digest:32 → ()          dedup expiry order, one per digest
//! - `i` event-id                  → seq
//! - `k` correlation 0x00 seq      → ()            trace index
//! - `o` len:u8 source seq:u64be   → log seq       per-source index (catch-up)
//! - `s` source                    → SourceMark    per-source version vector
//! - `c` consumer-name             → ConsumerRec
//! - `d` consumer 0x00 seq         → DeadLetter
//! - `m` name                      → counters (u64be)

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::codec;
use crate::event::{self, Event, Hash, TypePattern};

/// File beside sled's holding a committed head, to detect a store that lost data.
pub(super) const HEAD_MARK: &str = "riftmesh.head";
pub(super) const M_NEXT: &[u8] = b"mnext_seq";
/// On-disk layout version; a store of another version is refused by path.
pub(super) const M_FORMAT: &[u8] = b"mformat";
/// Layout 2: log records of envelope version 2 ([`RECORD_V2`]); dedup
/// entries with the first copy's publication time. Layout 1 is read and
/// upgraded in place (its records stay as they are).
pub(super) const STORE_FORMAT: u64 = 2;
pub(super) const M_SRC: &[u8] = b"msource_seq";
pub(super) const M_BYTES: &[u8] = b"mlog_bytes";
pub(super) const M_DEDUP: &[u8] = b"mdedup_count";

/// An event as the log holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stored {
    pub received_ms: u64,
    pub event: Event,
    /// Set when this envelope repeats a fact already in the log (same dedup
    /// digest within its window; another source or sequence): kept for
    /// catch-up, never delivered.
    pub dup_of: Option<u64>,
}

/// A log record written before envelope version 2 (store layout 1).
#[derive(Deserialize)]
struct StoredV1 {
    received_ms: u64,
    event: event::EventV1,
    dup_of: Option<u64>,
}

/// First bytes of a record of layout 2. A layout-1 record is bare bincode
/// of [`StoredV1`], whose first byte starts a varint: never 0xFF.
const RECORD_V2: [u8; 2] = [0xFF, 2];

impl Stored {
    /// Whether a consumer of `patterns` is given this entry (not a
    /// duplicate's envelope, and of a matching type).
    pub fn delivered_to(&self, patterns: &[TypePattern]) -> bool {
        self.dup_of.is_none() && event::matches_any(patterns, &self.event.event_type)
    }

    /// Layout 2: [`RECORD_V2`], then the bincode of [`Stored`] (its event in
    /// envelope version 2's field order, with `idem_key`).
    pub fn encode(&self) -> Result<Vec<u8>, codec::CodecError> {
        let body = codec::encode(self)?;
        let mut out = Vec::with_capacity(RECORD_V2.len() + body.len());
        out.extend_from_slice(&RECORD_V2);
        out.extend(body);
        Ok(out)
    }

    /// Either layout.
    pub fn decode(v: &[u8]) -> Result<Stored, codec::CodecError> {
        match v.strip_prefix(&RECORD_V2) {
            Some(body) => codec::decode(body, codec::MAX_DECODE),
            None => {
                let old: StoredV1 = codec::decode(v, codec::MAX_DECODE)?;
                Ok(Stored {
                    received_ms: old.received_ms,
                    event: old.event.into(),
                    dup_of: old.dup_of,
                })
            }
        }
    }
}

pub(super) fn decode_stored(key: &[u8], v: &[u8]) -> Result<Stored, StoreError> {
    Stored::decode(v).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

pub(super) fn key_l(seq: u64) -> [u8; 9] {
    let mut k = [b'l'; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}
pub(super) fn key_h(h: &Hash) -> [u8; 33] {
    let mut k = [b'h'; 33];
    k[1..].copy_from_slice(h);
    k
}
pub(super) fn key_x(ms: u64, h: &Hash) -> [u8; 41] {
    let mut k = [b'x'; 41];
    k[1..9].copy_from_slice(&ms.to_be_bytes());
    k[9..].copy_from_slice(h);
    k
}
pub(super) fn key_i(id: &str) -> Vec<u8> {
    [b"i", id.as_bytes()].concat()
}
pub(super) fn key_k(corr: &str, seq: u64) -> Vec<u8> {
    [b"k", corr.as_bytes(), b"\0", &seq.to_be_bytes()].concat()
}
pub(super) fn key_o(source: &str, seq: u64) -> Vec<u8> {
    let b = source.as_bytes();
    let mut k = Vec::with_capacity(2 + b.len() + 8);
    k.push(b'o');
    k.push(b.len().min(255) as u8);
    k.extend_from_slice(&b[..b.len().min(255)]);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}
pub(super) fn prefix_o(source: &str) -> Vec<u8> {
    let mut k = key_o(source, 0);
    k.truncate(k.len() - 8);
    k
}
pub(super) fn key_s(source: &str) -> Vec<u8> {
    [b"s", source.as_bytes()].concat()
}
pub(super) fn key_c(name: &str) -> Vec<u8> {
    [b"c", name.as_bytes()].concat()
}
pub(super) fn key_d(name: &str, seq: u64) -> Vec<u8> {
    [b"d", name.as_bytes(), b"\0", &seq.to_be_bytes()].concat()
}
/// Every dead letter of consumer `name`.
pub(super) fn prefix_d(name: &str) -> Vec<u8> {
    [b"d", name.as_bytes(), b"\0"].concat()
}
pub(super) fn be(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[..n].copy_from_slice(&v[..n]);
    u64::from_be_bytes(b)
}
/// A counter kept under an `m` key (0 when absent).
pub(super) fn counter(db: &sled::Db, k: &[u8]) -> Result<u64, StoreError> {
    Ok(db.get(k)?.map(|v| be(&v)).unwrap_or(0))
}
pub(super) fn seq_of(key: &[u8]) -> u64 {
    be(&key[key.len().saturating_sub(8)..])
}

pub(super) fn decode_at<T: serde::de::DeserializeOwned>(
    key: &[u8],
    v: &[u8],
) -> Result<T, StoreError> {
    codec::decode(v, codec::MAX_DECODE).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Draft;
    use libp2p::identity::Keypair;

    fn sealed(key: Option<&str>) -> Event {
        let k = Keypair::generate_ed25519();
        Draft::new("CUSTOM_T", &serde_json::json!({"n": 1}), None, None, None)
            .unwrap()
            .with_idem_key(key.map(str::to_string))
            .unwrap()
            .seal(&k, 3, 1_700_000_000_000)
            .unwrap()
    }

    /// A record written before envelope version 2 (bare bincode of the
    /// layout-1 struct) still reads, whatever its receipt time; records of
    /// layout 2 read back with their key.
    #[test]
    fn records_of_both_layouts_read() {
        #[derive(Serialize)]
        struct OldStored<'a> {
            received_ms: u64,
            event: event::EventV1Ref<'a>,
            dup_of: Option<u64>,
        }
        let ev = sealed(None);
        for received_ms in [0, 1, 250, 1 << 20, 1_700_000_000_123, u64::MAX] {
            let old = codec::encode(&OldStored {
                received_ms,
                event: ev.as_v1().unwrap(),
                dup_of: Some(9),
            })
            .unwrap();
            assert_ne!(old[0], RECORD_V2[0]);
            let got = Stored::decode(&old).unwrap();
            assert_eq!((got.received_ms, got.dup_of), (received_ms, Some(9)));
            assert_eq!(got.event, ev);
            got.event.verify().unwrap();
        }
        let keyed = sealed(Some("job-1"));
        let rec = Stored {
            received_ms: 5,
            event: keyed.clone(),
            dup_of: None,
        };
        let got = Stored::decode(&rec.encode().unwrap()).unwrap();
        assert_eq!(got.event, keyed);
        assert_eq!(got.event.idem_key.as_deref(), Some("job-1"));
        got.event.verify().unwrap();
    }
}
