//! The event envelope: the signed [`Event`] (versions 1 and 2 on the wire
//! and on disk), the [`Draft`] a local publisher supplies, sealing, signing
//! and verification, and event ids.

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::*;
use crate::codec;

/// A signed event as stored and as sent between agents.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Unique, time-ordered id (UUIDv7, text form).
    pub id: String,
    /// Canonical UPPER_SNAKE type.
    pub event_type: String,
    /// Peer id of the agent that published the event (base58).
    pub source: String,
    /// Local process that asked for the publish, if it said (e.g. "trainer").
    pub origin: Option<String>,
    /// Per-source sequence number, contiguous from 1.
    pub seq: u64,
    /// Publish time at the source, ms since the Unix epoch.
    pub ts_ms: u64,
    pub correlation_id: Option<String>,
    pub parent_id: Option<String>,
    /// The publisher's idempotency key (envelope version 2): every publication
    /// with the same type and key is one fact (proto-notes/events.md §13).
    /// None: envelope version 1, deduplicated by content within a short window.
    pub idem_key: Option<String>,
    /// Canonical JSON text of the payload (object keys sorted, no whitespace).
    pub payload: String,
    /// SHA-256 content hash (see [`content_hash`]).
    pub hash: Hash,
    /// Source's signature over [`Event::signing_bytes`].
    pub signature: Vec<u8>,
}

/// Envelope version 1 as encoded: every field of [`Event`] but `idem_key`,
/// in the same order. Events without a key travel and are stored in this
/// form byte for byte as before version 2 existed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EventV1 {
    pub id: String,
    pub event_type: String,
    pub source: String,
    pub origin: Option<String>,
    pub seq: u64,
    pub ts_ms: u64,
    pub correlation_id: Option<String>,
    pub parent_id: Option<String>,
    pub payload: String,
    pub hash: Hash,
    pub signature: Vec<u8>,
}

impl From<EventV1> for Event {
    fn from(e: EventV1) -> Self {
        Event {
            id: e.id,
            event_type: e.event_type,
            source: e.source,
            origin: e.origin,
            seq: e.seq,
            ts_ms: e.ts_ms,
            correlation_id: e.correlation_id,
            parent_id: e.parent_id,
            idem_key: None,
            payload: e.payload,
            hash: e.hash,
            signature: e.signature,
        }
    }
}

impl TryFrom<Event> for EventV1 {
    /// An event with an idempotency key has no version-1 form.
    type Error = Event;
    fn try_from(e: Event) -> Result<Self, Event> {
        if e.idem_key.is_some() {
            return Err(e);
        }
        Ok(EventV1 {
            id: e.id,
            event_type: e.event_type,
            source: e.source,
            origin: e.origin,
            seq: e.seq,
            ts_ms: e.ts_ms,
            correlation_id: e.correlation_id,
            parent_id: e.parent_id,
            payload: e.payload,
            hash: e.hash,
            signature: e.signature,
        })
    }
}

/// Borrowed version-1 form, for encoding without copying.
#[derive(Serialize)]
pub struct EventV1Ref<'a> {
    id: &'a str,
    event_type: &'a str,
    source: &'a str,
    origin: &'a Option<String>,
    seq: u64,
    ts_ms: u64,
    correlation_id: &'a Option<String>,
    parent_id: &'a Option<String>,
    payload: &'a str,
    hash: &'a Hash,
    signature: &'a [u8],
}

/// What a local publisher supplies; sealed into an [`Event`] by the store writer,
/// which owns the per-source sequence.
#[derive(Clone, Debug)]
pub struct Draft {
    pub event_type: String,
    pub origin: Option<String>,
    pub correlation_id: Option<String>,
    pub parent_id: Option<String>,
    /// See [`Event::idem_key`].
    pub idem_key: Option<String>,
    pub payload: String,
    pub hash: Hash,
}

impl Draft {
    pub fn new(
        event_type: &str,
        payload: &Value,
        origin: Option<String>,
        correlation_id: Option<String>,
        parent_id: Option<String>,
    ) -> Result<Self, EventError> {
        let event_type = normalize_type(event_type)?;
        for (field, v) in [
            ("origin", &origin),
            ("correlation_id", &correlation_id),
            ("parent_id", &parent_id),
        ] {
            if v.as_ref().is_some_and(|s| s.len() > MAX_ID_LEN) {
                return Err(EventError::FieldTooLong {
                    field,
                    max: MAX_ID_LEN,
                });
            }
        }
        let payload = canonical_json(payload);
        let hash = content_hash(&event_type, &payload);
        Ok(Self {
            event_type,
            origin,
            correlation_id,
            parent_id,
            idem_key: None,
            payload,
            hash,
        })
    }

    /// Give the draft an idempotency key (at most [`MAX_ID_LEN`] bytes, not
    /// empty, no control characters).
    pub fn with_idem_key(mut self, key: Option<String>) -> Result<Self, EventError> {
        if let Some(k) = &key {
            check_idem_key(k)?;
        }
        self.idem_key = key;
        Ok(self)
    }

    /// The dedup digest of this draft (see [`dedup_digest`]).
    pub fn dedup_digest(&self) -> Hash {
        dedup_digest(&self.event_type, self.idem_key.as_deref(), &self.hash)
    }

    /// Assign id, sequence and time, and sign.
    pub fn seal(self, key: &Keypair, seq: u64, now_ms: u64) -> Result<Event, EventError> {
        let source = key.public().to_peer_id().to_base58();
        self.seal_as(key, &source, seq, now_ms)
    }

    /// [`Draft::seal`] with the source's peer id text already computed.
    pub fn seal_as(
        self,
        key: &Keypair,
        source: &str,
        seq: u64,
        now_ms: u64,
    ) -> Result<Event, EventError> {
        let mut ev = Event {
            id: new_event_id(now_ms),
            event_type: self.event_type,
            source: source.to_string(),
            origin: self.origin,
            seq,
            ts_ms: now_ms,
            correlation_id: self.correlation_id,
            parent_id: self.parent_id,
            idem_key: self.idem_key,
            payload: self.payload,
            hash: self.hash,
            signature: Vec::new(),
        };
        ev.signature = key
            .sign(&ev.signing_bytes())
            .map_err(|e| EventError::Signing(e.to_string()))?;
        Ok(ev)
    }
}

#[derive(Serialize)]
struct Signed<'a> {
    id: &'a str,
    event_type: &'a str,
    source: &'a str,
    origin: &'a Option<String>,
    seq: u64,
    ts_ms: u64,
    correlation_id: &'a Option<String>,
    parent_id: &'a Option<String>,
    payload: &'a str,
    hash: &'a Hash,
}

/// What version 2 signs: version 1's fields with the key after `parent_id`.
#[derive(Serialize)]
struct SignedV2<'a> {
    id: &'a str,
    event_type: &'a str,
    source: &'a str,
    origin: &'a Option<String>,
    seq: u64,
    ts_ms: u64,
    correlation_id: &'a Option<String>,
    parent_id: &'a Option<String>,
    idem_key: &'a str,
    payload: &'a str,
    hash: &'a Hash,
}

impl Event {
    /// Envelope version: 2 when the event carries an idempotency key, else 1.
    pub fn version(&self) -> u8 {
        if self.idem_key.is_some() {
            2
        } else {
            1
        }
    }

    /// The version-1 encoding's borrowed form; None for a version-2 event.
    pub fn as_v1(&self) -> Option<EventV1Ref<'_>> {
        if self.idem_key.is_some() {
            return None;
        }
        Some(EventV1Ref {
            id: &self.id,
            event_type: &self.event_type,
            source: &self.source,
            origin: &self.origin,
            seq: self.seq,
            ts_ms: self.ts_ms,
            correlation_id: &self.correlation_id,
            parent_id: &self.parent_id,
            payload: &self.payload,
            hash: &self.hash,
            signature: &self.signature,
        })
    }

    /// The dedup digest of this event (see [`dedup_digest`]).
    pub fn dedup_digest(&self) -> Hash {
        dedup_digest(&self.event_type, self.idem_key.as_deref(), &self.hash)
    }

    /// The bytes the source signs. Version 1: SIGN_DOMAIN followed by the
    /// bincode encoding of every field but the signature, in declaration
    /// order. Version 2: SIGN_DOMAIN_V2 and the same with the idempotency key
    /// after `parent_id`.
    pub fn signing_bytes(&self) -> Vec<u8> {
        if let Some(key) = &self.idem_key {
            let signed = SignedV2 {
                id: &self.id,
                event_type: &self.event_type,
                source: &self.source,
                origin: &self.origin,
                seq: self.seq,
                ts_ms: self.ts_ms,
                correlation_id: &self.correlation_id,
                parent_id: &self.parent_id,
                idem_key: key,
                payload: &self.payload,
                hash: &self.hash,
            };
            let mut out = SIGN_DOMAIN_V2.to_vec();
            out.extend(codec::encode(&signed).unwrap_or_default());
            return out;
        }
        let signed = Signed {
            id: &self.id,
            event_type: &self.event_type,
            source: &self.source,
            origin: &self.origin,
            seq: self.seq,
            ts_ms: self.ts_ms,
            correlation_id: &self.correlation_id,
            parent_id: &self.parent_id,
            payload: &self.payload,
            hash: &self.hash,
        };
        let mut out = SIGN_DOMAIN.to_vec();
        // Encoding plain strings and integers cannot fail.
        out.extend(codec::encode(&signed).unwrap_or_default());
        out
    }

    /// Full check of an event received from anywhere: canonical forms, content
    /// hash, and the source's signature.
    pub fn verify(&self) -> Result<(), EventError> {
        if type_spelling(&self.event_type)? != self.event_type {
            return Err(EventError::NonCanonicalType(self.event_type.clone()));
        }
        for (field, v) in [
            ("id", Some(&self.id)),
            ("origin", self.origin.as_ref()),
            ("correlation_id", self.correlation_id.as_ref()),
            ("parent_id", self.parent_id.as_ref()),
        ] {
            if v.is_some_and(|s| s.len() > MAX_ID_LEN) {
                return Err(EventError::FieldTooLong {
                    field,
                    max: MAX_ID_LEN,
                });
            }
        }
        if let Some(k) = &self.idem_key {
            check_idem_key(k)?;
        }
        let parsed: Value =
            serde_json::from_str(&self.payload).map_err(|_| EventError::NonCanonicalPayload)?;
        if canonical_json(&parsed) != self.payload {
            return Err(EventError::NonCanonicalPayload);
        }
        if content_hash(&self.event_type, &self.payload) != self.hash {
            return Err(EventError::HashMismatch);
        }
        let key = source_key(&self.source)?;
        if !key.verify(&self.signing_bytes(), &self.signature) {
            return Err(EventError::BadSignature);
        }
        Ok(())
    }

    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn payload_value(&self) -> Value {
        serde_json::from_str(&self.payload).unwrap_or(Value::Null)
    }
}

/// The public key embedded in an Ed25519 peer id (identity multihash).
pub fn source_key(source: &str) -> Result<PublicKey, EventError> {
    let bad = || EventError::BadSource(source.chars().take(80).collect());
    let peer: PeerId = source.parse().map_err(|_| bad())?;
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return Err(bad());
    }
    PublicKey::try_decode_protobuf(mh.digest()).map_err(|_| bad())
}

/// A UUIDv7 (time-ordered) from the given time.
pub fn new_event_id(now_ms: u64) -> String {
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        now_ms / 1000,
        ((now_ms % 1000) * 1_000_000) as u32,
    );
    uuid::Uuid::new_v7(ts).to_string()
}
