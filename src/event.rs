//! The event envelope, the type catalog and the content hash. No I/O here.

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::codec;

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

/// A UUIDv7 (time-ordered) from the given time.
pub fn new_event_id(now_ms: u64) -> String {
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        now_ms / 1000,
        ((now_ms % 1000) * 1_000_000) as u32,
    );
    uuid::Uuid::new_v7(ts).to_string()
}

pub use crate::util::now_ms;

/// One entry of the type catalog.
pub struct KnownType {
    pub name: &'static str,
    pub category: &'static str,
    pub aliases: &'static [&'static str],
    pub description: &'static str,
}

macro_rules! catalog {
    ($( $cat:literal : [ $( $name:literal $( | $alias:literal )* => $desc:literal ),* $(,)? ] ),* $(,)?) => {
        pub const CATALOG: &[KnownType] = &[
            $( $( KnownType { name: $name, category: $cat, aliases: &[$($alias),*], description: $desc }, )* )*
        ];
    };
}

// Aliases are listed in normalized form (upper case, '_' separators); the dotted
// and lower-case spellings of every name and alias are accepted by normalization.
catalog! {
    "selfplay": [
        "SELFPLAY_STARTED" => "a selfplay worker started generating games",
        "SELFPLAY_COMPLETED" | "SELFPLAY_COMPLETE" | "SELFPLAY_DONE" => "a selfplay run finished",
        "SELFPLAY_FAILED" => "a selfplay run failed",
        "NEW_GAMES_AVAILABLE" | "NEW_GAMES" => "fresh games are ready to be synced",
    ],
    "sync": [
        "DATA_SYNC_STARTED" | "SYNC_STARTED" => "a data sync began",
        "DATA_SYNC_COMPLETED" | "DATA_SYNC_COMPLETE" | "SYNC_COMPLETE" | "SYNC_COMPLETED" => "a data sync finished (a wanted blob arrived and was placed)",
        "DATA_SYNC_FAILED" | "SYNC_FAILED" => "a data sync failed (a wanted blob could not be fetched or placed)",
        "DATA_SYNC_TRIGGERED" => "a data sync was asked for",
        "ORPHAN_GAMES_DETECTED" => "games were found that no sync has picked up",
        "REPAIR_COMPLETED" | "REPAIR_COMPLETE" => "a repair of damaged data finished",
        "REPAIR_FAILED" => "a repair of damaged data failed",
        "GAME_BATCH_READY" => "a batch of games was published as a blob",
        "BLOB_PUBLISHED" => "a name now points at a blob",
    ],
    "export": [
        "NPZ_EXPORT_STARTED" | "EXPORT_STARTED" => "training arrays export began",
        "NPZ_EXPORT_COMPLETED" | "NPZ_EXPORT_COMPLETE" | "EXPORT_COMPLETE" | "EXPORT_COMPLETED" => "training arrays are ready",
        "NPZ_EXPORT_FAILED" | "EXPORT_FAILED" => "training arrays export failed",
    ],
    "training": [
        "TRAINING_STARTED" | "TRAINING_START" => "a training run began",
        "TRAINING_PROGRESS" => "a training run reports progress",
        "TRAINING_COMPLETED" | "TRAINING_COMPLETE" | "TRAINING_DONE" | "TRAINING_FINISHED" => "a training run produced a model",
        "TRAINING_FAILED" => "a training run failed",
        "TRAINING_EARLY_STOPPED" => "a training run stopped early (no more improvement)",
        "HYPERPARAMETER_UPDATED" => "training hyperparameters were adjusted",
        "ADAPTIVE_PARAMS_CHANGED" => "adaptive training parameters changed in real time",
    ],
    "evaluation": [
        "EVALUATION_STARTED" | "EVAL_STARTED" => "an evaluation began",
        "EVALUATION_COMPLETED" | "EVALUATION_COMPLETE" | "EVAL_COMPLETED" | "EVAL_COMPLETE" => "an evaluation finished with results",
        "EVALUATION_FAILED" | "EVAL_FAILED" => "an evaluation failed",
        "EVALUATION_PROGRESS" | "EVAL_PROGRESS" => "an evaluation reports progress",
        "EVALUATION_RESULT" | "EVAL_RESULT" => "an Elo evaluation produced its result",
        "ELO_UPDATED" => "a model's Elo rating changed",
        "ELO_SIGNIFICANT_CHANGE" => "a model's Elo moved by more than its threshold",
        "ELO_VELOCITY_CHANGED" => "the rate of Elo improvement changed",
        "REGRESSION_DETECTED" => "a model performs worse than the one before it",
        "REGRESSION_CRITICAL" => "a model regressed badly enough to roll back",
    ],
    "promotion": [
        "MODEL_PROMOTED" | "PROMOTION_COMPLETE" | "PROMOTED" => "a model became the current best",
        "PROMOTION_REJECTED" => "a candidate model was not promoted",
        "PROMOTION_FAILED" => "the promotion step failed",
        "MODEL_UPDATED" => "a model's registry metadata changed",
    ],
    "model_distribution": [
        "MODEL_DISTRIBUTED" | "MODEL_DISTRIBUTION_COMPLETE" => "a model arrived on a host",
        "MODEL_DISTRIBUTION_FAILED" => "a model could not be distributed to a host",
    ],
    "cluster": [
        "HOST_ONLINE" | "NODE_ONLINE" | "CLUSTER_NODE_JOINED" => "a host joined or came back",
        "NODE_SUSPECT" | "HOST_SUSPECT" | "CLUSTER_NODE_SUSPECT" => "a host stopped answering and is suspected",
        "HOST_OFFLINE" | "NODE_OFFLINE" | "NODE_DEAD" | "CLUSTER_NODE_LEFT" => "a host was declared dead",
        "NODE_RECOVERED" | "HOST_RECOVERED" | "CLUSTER_NODE_RECOVERED" => "a suspected host answered again",
        "HOST_LEFT" | "NODE_LEFT" | "CLUSTER_HOST_LEFT" => "a host left gracefully",
        "LEADER_ELECTED" | "CLUSTER_LEADER_ELECTED" => "a new leader won a term",
        "IDLE_RESOURCE_DETECTED" | "CLUSTER_IDLE_RESOURCE_DETECTED" => "a host's GPUs (or job counters) stayed idle",
    ],
    "daemon": [
        "DAEMON_STARTED" => "a local daemon started",
        "DAEMON_STOPPED" => "a local daemon stopped",
        "DAEMON_STATUS_CHANGED" => "a local daemon changed state",
        "ALL_CRITICAL_DAEMONS_READY" => "every critical daemon of a host is up",
        "TASK_ABANDONED" => "a job was cancelled or abandoned",
    ],
    "recovery": [
        "RECOVERY_STARTED" => "automatic recovery began",
        "RECOVERY_COMPLETED" | "RECOVERY_COMPLETE" => "automatic recovery finished",
        "RECOVERY_FAILED" => "automatic recovery failed",
    ],
    "quality": [
        "CURRICULUM_UPDATED" => "the curriculum changed its weights",
        "CURRICULUM_ADVANCED" => "the curriculum moved to its next stage",
        "CURRICULUM_REBALANCED" => "the curriculum rebalanced its configurations",
        "QUALITY_DEGRADED" => "data quality went down",
        "QUALITY_SCORE_UPDATED" => "a data quality score was computed",
        "QUALITY_ALERT" | "DATA_QUALITY_ALERT" => "data quality fell below its threshold",
    ],
}

/// Whether a canonical name is a catalog type.
pub fn is_known(canonical: &str) -> bool {
    CATALOG.iter().any(|t| t.name == canonical)
}

/// The catalog name a custom name is most likely a typo of: a catalog name
/// or alias within `max(1, len / 8)` edits (optimal string alignment:
/// insertions, deletions, substitutions, adjacent swaps; `len` is the
/// catalog spelling's length, so 1 edit up to 15 characters, 2 from 16).
/// Names under 5 characters are never taken for typos.
pub fn likely_typo(canonical: &str) -> Option<&'static str> {
    if canonical.len() < 5 || is_known(canonical) {
        return None;
    }
    CATALOG
        .iter()
        .flat_map(|t| {
            std::iter::once(t.name)
                .chain(t.aliases.iter().copied())
                .map(move |s| (t.name, s))
        })
        .map(|(name, spelling)| {
            (
                strsim::osa_distance(canonical, spelling),
                spelling.len(),
                name,
            )
        })
        .filter(|&(d, len, _)| d <= (len / 8).max(1))
        .min_by_key(|&(d, _, _)| d)
        .map(|(_, _, name)| name)
}

/// What a *local* publisher or consumer may name (proto-notes/events.md §2,
/// "Names a local process may use"): a catalog type; a declared custom type;
/// or, unless `strict`, any other well-formed name that is not a likely typo
/// of a catalog name (`custom` lets a near name through on purpose). Never
/// applied to events from peers: catalogs differ during a rolling upgrade.
pub fn check_local_type(
    canonical: &str,
    custom: bool,
    strict: bool,
    declared: &[String],
) -> Result<(), String> {
    if is_known(canonical) || declared.iter().any(|d| d == canonical) {
        return Ok(());
    }
    if strict {
        return Err(format!(
            "type {canonical} is not in the catalog (riftmesh types) and strict_types is on: \
             declare it in the config's custom_types"
        ));
    }
    if !custom {
        if let Some(near) = likely_typo(canonical) {
            return Err(format!(
                "unknown type {canonical}: did you mean {near}? (to publish a new type of this \
                 name on purpose, send \"custom_type\": true, or --custom with the CLI)"
            ));
        }
    }
    Ok(())
}

/// Normalize any accepted spelling to the canonical UPPER_SNAKE name.
/// `training.completed`, `training_complete` and `TRAINING_COMPLETED` all give
/// `TRAINING_COMPLETED`; unknown well-formed names become custom types.
pub fn normalize_type(raw: &str) -> Result<String, EventError> {
    let out = type_spelling(raw)?;
    for t in CATALOG {
        if t.name == out || t.aliases.contains(&out.as_str()) {
            return Ok(t.name.to_string());
        }
    }
    Ok(out)
}

/// The UPPER_SNAKE spelling of a well-formed type name, without the
/// catalog's aliases: what a receiver requires of an event's type. A peer
/// with another catalog (a rolling upgrade that made a name its own type,
/// as CURRICULUM_ADVANCED) sends names this agent would alias; they are
/// kept as sent, never refused.
pub fn type_spelling(raw: &str) -> Result<String, EventError> {
    let bad = || EventError::BadType(raw.chars().take(MAX_TYPE_LEN + 8).collect());
    let s = raw.trim();
    if s.is_empty() || s.len() > MAX_TYPE_LEN || !s.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(bad());
    }
    let mut out = String::with_capacity(s.len());
    let mut prev_sep = false;
    for c in s.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' => {
                out.push(c.to_ascii_uppercase());
                prev_sep = false;
            }
            '_' | '.' | '-' => {
                if prev_sep {
                    return Err(bad());
                }
                out.push('_');
                prev_sep = true;
            }
            _ => return Err(bad()),
        }
    }
    if prev_sep {
        return Err(bad());
    }
    Ok(out)
}

/// A type pattern matched against canonical names. Patterns are normalized like
/// names (so `training.*` equals `TRAINING_*`); `*` matches any run, `?` one character.
#[derive(Clone, Debug)]
pub struct TypePattern {
    text: String,
    matcher: wildmatch::WildMatch,
    /// Catalog names the pattern matches through one of their aliases
    /// (`CLUSTER_*` matches HOST_ONLINE, alias CLUSTER_NODE_JOINED).
    by_alias: Vec<&'static str>,
}

impl TypePattern {
    pub fn parse(raw: &str) -> Result<Self, EventError> {
        let bad = || EventError::BadType(raw.chars().take(MAX_TYPE_LEN + 8).collect());
        let s = raw.trim();
        if s.is_empty() || s.len() > MAX_TYPE_LEN {
            return Err(bad());
        }
        if !s.contains(['*', '?']) {
            let text = normalize_type(s)?;
            return Ok(Self {
                matcher: wildmatch::WildMatch::new(&text),
                text,
                by_alias: Vec::new(),
            });
        }
        let mut text = String::with_capacity(s.len());
        for c in s.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '*' | '?' => text.push(c.to_ascii_uppercase()),
                '_' | '.' | '-' => text.push('_'),
                _ => return Err(bad()),
            }
        }
        let matcher = wildmatch::WildMatch::new(&text);
        let by_alias = CATALOG
            .iter()
            .filter(|t| !matcher.matches(t.name) && t.aliases.iter().any(|a| matcher.matches(a)))
            .map(|t| t.name)
            .collect();
        Ok(Self {
            matcher,
            text,
            by_alias,
        })
    }

    /// Whether the canonical name, or one of its catalog aliases, matches.
    pub fn matches(&self, canonical: &str) -> bool {
        self.matcher.matches(canonical) || self.by_alias.contains(&canonical)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// True when `patterns` is empty or any of them matches.
pub fn matches_any(patterns: &[TypePattern], canonical: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(canonical))
}

#[cfg(test)]
mod tests {
    #[test]
    fn typos_of_catalog_names_are_caught_and_other_names_are_custom() {
        use super::{check_local_type, likely_typo};
        assert_eq!(likely_typo("TRAINING_COMPLTED"), Some("TRAINING_COMPLETED"));
        assert_eq!(
            likely_typo("TRAINIGN_COMPLETED"),
            Some("TRAINING_COMPLETED")
        );
        assert_eq!(likely_typo("MODEL_PROMTED"), Some("MODEL_PROMOTED"));
        // An alias's typo names the canonical type.
        assert_eq!(likely_typo("TRAINING_DNOE"), Some("TRAINING_COMPLETED"));
        for custom in [
            "MY_OWN_STEP",
            "TRAINING",
            "SYNC",
            "ABCD",
            "DATA_SYNC_FAILURES_SEEN",
        ] {
            assert_eq!(likely_typo(custom), None, "{custom}");
        }
        assert!(check_local_type("TRAINING_COMPLETED", false, true, &[]).is_ok());
        assert!(check_local_type("TRAINING_COMPLTED", false, false, &[]).is_err());
        assert!(check_local_type("TRAINING_COMPLTED", true, false, &[]).is_ok());
        assert!(check_local_type("MY_OWN_STEP", false, false, &[]).is_ok());
        assert!(check_local_type("MY_OWN_STEP", false, true, &[]).is_err());
        assert!(check_local_type("MY_OWN_STEP", false, true, &["MY_OWN_STEP".into()]).is_ok());
    }

    #[test]
    fn an_event_whose_type_this_catalog_would_alias_still_verifies() {
        // A peer whose catalog has CURRICULUM_UPDATED as its own type and
        // one spelled as an alias here: both verify (rolling upgrades).
        let key = libp2p::identity::Keypair::generate_ed25519();
        for t in ["CURRICULUM_ADVANCED", "SELFPLAY_DONE"] {
            let payload = "{}".to_string();
            let d = super::Draft {
                event_type: t.into(),
                origin: None,
                correlation_id: None,
                parent_id: None,
                idem_key: None,
                hash: super::content_hash(t, &payload),
                payload,
            };
            let ev = d.seal(&key, 1, 1).unwrap();
            ev.verify().unwrap();
        }
        // Not upper snake: still refused.
        let payload = "{}".to_string();
        let d = super::Draft {
            event_type: "selfplay.done".into(),
            origin: None,
            correlation_id: None,
            parent_id: None,
            idem_key: None,
            hash: super::content_hash("selfplay.done", &payload),
            payload,
        };
        assert!(d.seal(&key, 1, 1).unwrap().verify().is_err());
    }

    /// The key is signed: a relay can neither strip it (turning a keyed
    /// fact into a key-less one), add one, nor change it.
    #[test]
    fn the_idempotency_key_is_signed() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let d = Draft::new("CUSTOM_T", &json!({"a": 1}), None, None, None).unwrap();
        let plain = d.clone().seal(&key, 1, 5).unwrap();
        let keyed = d
            .with_idem_key(Some("k-1".into()))
            .unwrap()
            .seal(&key, 1, 5)
            .unwrap();
        plain.verify().unwrap();
        keyed.verify().unwrap();
        assert_ne!(plain.dedup_digest(), keyed.dedup_digest());
        let mut stripped = keyed.clone();
        stripped.idem_key = None;
        assert_eq!(stripped.verify(), Err(EventError::BadSignature));
        let mut added = plain.clone();
        added.idem_key = Some("k-1".into());
        assert_eq!(added.verify(), Err(EventError::BadSignature));
        let mut changed = keyed.clone();
        changed.idem_key = Some("k-2".into());
        assert_eq!(changed.verify(), Err(EventError::BadSignature));
        for bad in ["", "a\nb", &"k".repeat(129)] {
            let mut e = keyed.clone();
            e.idem_key = Some(bad.to_string());
            assert_eq!(e.verify(), Err(EventError::BadIdemKey), "{bad:?}");
        }
    }

    #[test]
    fn every_name_of_the_seeds_is_a_catalog_type() {
        for n in [
            "ADAPTIVE_PARAMS_CHANGED",
            "ALL_CRITICAL_DAEMONS_READY",
            "CURRICULUM_REBALANCED",
            "DATA_SYNC_TRIGGERED",
            "ELO_SIGNIFICANT_CHANGE",
            "ELO_UPDATED",
            "ELO_VELOCITY_CHANGED",
            "EVALUATION_PROGRESS",
            "EVALUATION_RESULT",
            "HYPERPARAMETER_UPDATED",
            "IDLE_RESOURCE_DETECTED",
            "MODEL_UPDATED",
            "ORPHAN_GAMES_DETECTED",
            "QUALITY_DEGRADED",
            "REGRESSION_CRITICAL",
            "REGRESSION_DETECTED",
            "REPAIR_COMPLETED",
            "REPAIR_FAILED",
            "TASK_ABANDONED",
            "TRAINING_EARLY_STOPPED",
            "CURRICULUM_ADVANCED",
        ] {
            assert_eq!(super::normalize_type(n).unwrap(), n, "{n}");
            assert!(super::is_known(n), "{n}");
        }
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn three_spellings_one_type() {
        for s in [
            "training.completed",
            "training_complete",
            "TRAINING_COMPLETED",
            "Training-Done",
        ] {
            assert_eq!(normalize_type(s).unwrap(), "TRAINING_COMPLETED", "{s}");
        }
        assert_eq!(
            normalize_type("my.custom_thing").unwrap(),
            "MY_CUSTOM_THING"
        );
        for bad in [
            "",
            "1abc",
            "a..b",
            "a b",
            "trailing_",
            "ümlaut",
            &"x".repeat(129),
        ] {
            assert!(normalize_type(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn catalog_names_are_canonical_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for t in CATALOG {
            assert_eq!(normalize_type(t.name).unwrap(), t.name);
            assert!(seen.insert(t.name), "duplicate {}", t.name);
            for a in t.aliases {
                assert!(seen.insert(a), "alias {a} used twice");
                assert_eq!(
                    normalize_type(&a.to_lowercase().replace('_', ".")).unwrap(),
                    t.name
                );
            }
        }
    }

    /// The seeds' `cluster.*` names are aliases of the agent's cluster
    /// events, and a pattern matches a name through its aliases.
    #[test]
    fn cluster_patterns_match_the_agents_cluster_events_through_aliases() {
        assert_eq!(
            normalize_type("cluster.node_joined").unwrap(),
            "HOST_ONLINE"
        );
        assert_eq!(
            normalize_type("cluster.leader_elected").unwrap(),
            "LEADER_ELECTED"
        );
        let p = TypePattern::parse("cluster.*").unwrap();
        for t in CATALOG.iter().filter(|t| t.category == "cluster") {
            assert!(p.matches(t.name), "{}", t.name);
        }
        assert!(!p.matches("TRAINING_COMPLETED"));
        assert!(!p.matches("MY_CLUSTER_THING"));
        // An alias-only match for other patterns too, never a prefix guess.
        let p = TypePattern::parse("*_DONE").unwrap();
        assert!(p.matches("TRAINING_COMPLETED") && p.matches("SELFPLAY_COMPLETED"));
        assert!(!p.matches("EVALUATION_COMPLETED"));
    }

    #[test]
    fn patterns_match_canonical_names() {
        let p = TypePattern::parse("training.*").unwrap();
        assert!(p.matches("TRAINING_COMPLETED"));
        assert!(!p.matches("EVALUATION_COMPLETED"));
        let p = TypePattern::parse("training_complete").unwrap();
        assert!(p.matches("TRAINING_COMPLETED"));
        assert!(TypePattern::parse("bad pattern").is_err());
    }

    #[test]
    fn hash_ignores_key_order_and_metadata() {
        let a = Draft::new(
            "training.completed",
            &json!({"b": 1, "a": {"y": [1, 2], "x": "s"}}),
            None,
            None,
            None,
        )
        .unwrap();
        let b = Draft::new(
            "TRAINING_COMPLETED",
            &json!({"a": {"x": "s", "y": [1, 2]}, "b": 1}),
            Some("trainer".into()),
            Some("c".into()),
            None,
        )
        .unwrap();
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.payload, r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
        let c = Draft::new("TRAINING_COMPLETED", &json!({"b": 2}), None, None, None).unwrap();
        assert_ne!(a.hash, c.hash);
        // Known vector: documented in proto-notes/events.md.
        let e = Draft::new(
            "TRAINING_COMPLETED",
            &json!({"config": "hex8_2p"}),
            None,
            None,
            None,
        )
        .unwrap();
        let mut h = Sha256::new();
        h.update(b"riftmesh/event-hash/1\0TRAINING_COMPLETED\0{\"config\":\"hex8_2p\"}");
        let want: [u8; 32] = h.finalize().into();
        assert_eq!(e.hash, want);
    }

    #[test]
    fn sealed_events_verify_and_tampering_is_caught() {
        let key = Keypair::generate_ed25519();
        let ev = Draft::new("MODEL_PROMOTED", &json!({"model": "m1"}), None, None, None)
            .unwrap()
            .seal(&key, 1, 1_700_000_000_000)
            .unwrap();
        ev.verify().unwrap();
        assert_eq!(ev.source, key.public().to_peer_id().to_base58());

        let mut t = ev.clone();
        t.payload = r#"{"model":"m2"}"#.into();
        assert_eq!(t.verify(), Err(EventError::HashMismatch));
        let mut t = ev.clone();
        t.payload = r#"{"model":"m2"}"#.into();
        t.hash = content_hash(&t.event_type, &t.payload);
        assert_eq!(t.verify(), Err(EventError::BadSignature));
        let mut t = ev.clone();
        t.seq = 2;
        assert_eq!(t.verify(), Err(EventError::BadSignature));
        let mut t = ev.clone();
        t.source = Keypair::generate_ed25519()
            .public()
            .to_peer_id()
            .to_base58();
        assert_eq!(t.verify(), Err(EventError::BadSignature));
        let mut t = ev;
        t.payload = r#"{ "model": "m1" }"#.into();
        assert_eq!(t.verify(), Err(EventError::NonCanonicalPayload));
    }

    #[test]
    fn floats_survive_the_receivers_canonical_check() {
        let key = Keypair::generate_ed25519();
        for v in [
            json!({"eps": 1e-30}),
            json!({"x": 1e-24, "y": 0.1, "z": -0.0, "w": 1e16, "big": 1.7976931348623157e308}),
        ] {
            let ev = Draft::new("CUSTOM_FLOAT", &v, None, None, None)
                .unwrap()
                .seal(&key, 1, 1)
                .unwrap();
            ev.verify()
                .unwrap_or_else(|e| panic!("{v}: {e} ({})", ev.payload));
        }
    }

    #[test]
    fn event_ids_are_time_ordered() {
        let a = new_event_id(1_000);
        let b = new_event_id(2_000);
        assert!(a < b);
    }
}
