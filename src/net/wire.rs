//! Frame and message formats: gossip event frames (`[version][kind][hash]`
//! then the envelope), the request-response frame (`[version][u32 length]`
//! then bincode), and the messages of catch-up (`/riftmesh/events/1`) and
//! membership (`/riftmesh/member/2`, and `/1` for older agents). Bytes
//! only: no I/O here.
use crate::codec;
use crate::event::{Event, EventV1};

/// Version byte of request-response frames, and of event frames of
/// envelope version 1 (event frames of version 2 carry 2).
pub const VERSION: u8 = 1;
pub const KIND_EVENT: u8 = 1;
/// Bytes before the bincode body of an event frame.
pub const EVENT_HEADER: usize = 2 + 32;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("empty or truncated frame")]
    Truncated,
    #[error("unsupported wire version {0}")]
    Version(u8),
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("{0}")]
    Codec(#[from] codec::CodecError),
    #[error("header hash differs from the event's")]
    HeaderHash,
    #[error("a version-2 event frame without an idempotency key")]
    KeylessV2,
}

impl WireError {
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Truncated
            | WireError::Kind(_)
            | WireError::HeaderHash
            | WireError::KeylessV2 => "decode",
            WireError::Version(_) => "version",
            WireError::Codec(codec::CodecError::TooLarge { .. }) => "too_large",
            WireError::Codec(_) => "decode",
        }
    }
}

/// Event frame: version, kind, the 32-byte content hash, then the
/// bincode-encoded envelope. Version 1 (an event without an idempotency
/// key) carries [`EventV1`], byte for byte as before version 2; version 2
/// carries [`Event`] with its key.
pub fn encode_event(ev: &Event) -> Vec<u8> {
    let body = match ev.as_v1() {
        Some(v1) => codec::encode(&v1),
        None => codec::encode(ev),
    }
    .unwrap_or_default();
    let mut out = Vec::with_capacity(EVENT_HEADER + body.len());
    out.push(ev.version());
    out.push(KIND_EVENT);
    out.extend_from_slice(&ev.hash);
    out.extend(body);
    out
}

/// Decode a gossip frame of at most `limit` bytes (version 1 or 2).
pub fn decode_event(data: &[u8], limit: usize) -> Result<Event, WireError> {
    if data.len() < EVENT_HEADER {
        return Err(WireError::Truncated);
    }
    if data[1] != KIND_EVENT && matches!(data[0], 1 | 2) {
        return Err(WireError::Kind(data[1]));
    }
    let body = &data[EVENT_HEADER..];
    let ev: Event = match data[0] {
        1 => codec::decode::<EventV1>(body, limit)?.into(),
        2 => {
            let ev: Event = codec::decode(body, limit)?;
            // Version 2 is the envelope with a key: one encoding per event.
            if ev.idem_key.is_none() {
                return Err(WireError::KeylessV2);
            }
            ev
        }
        v => return Err(WireError::Version(v)),
    };
    if ev.hash[..] != data[2..EVENT_HEADER] {
        return Err(WireError::HeaderHash);
    }
    Ok(ev)
}

/// One source's mark in a summary.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub struct Mark {
    pub source: String,
    pub contiguous: u64,
    pub max_seen: u64,
}

/// Requests of `/riftmesh/events/1`.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub enum CatchupRequest {
    /// "This is what I hold"; answered with the responder's summary.
    Summary { marks: Vec<Mark> },
    /// Envelopes of `source` from sequence `from` on, at most `max_events`.
    Fetch {
        source: String,
        from: u64,
        max_events: u32,
    },
    /// SHA-256 of the sender's summary (see [`marks_digest`]): answered
    /// with `Same`, or with the responder's summary when they differ.
    Digest { digest: [u8; 32] },
}

/// Responses of `/riftmesh/events/1`.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub enum CatchupResponse {
    Summary {
        marks: Vec<Mark>,
    },
    /// In sequence order, every one of envelope version 1 (see
    /// `EventsV2`). `floor`: the lowest sequence of the source the
    /// responder still holds (None: none), so a requester asking below it
    /// learns those are gone past retention there.
    Events {
        events: Vec<EventV1>,
        floor: Option<u64>,
    },
    Refused {
        reason: String,
    },
    /// The digests match: nothing to exchange.
    Same,
    /// As `Events`, when any of them is of envelope version 2 (carries an
    /// idempotency key). An agent from before version 2 cannot decode it
    /// and counts a failed fetch; it reads these events after upgrading.
    EventsV2 {
        events: Vec<Event>,
        floor: Option<u64>,
    },
}

impl CatchupResponse {
    /// The answer carrying `events`: `Events` when all are version 1.
    pub fn events(events: Vec<Event>, floor: Option<u64>) -> CatchupResponse {
        if events.iter().all(|e| e.idem_key.is_none()) {
            let events = events
                .into_iter()
                .filter_map(|e| EventV1::try_from(e).ok())
                .collect();
            CatchupResponse::Events { events, floor }
        } else {
            CatchupResponse::EventsV2 { events, floor }
        }
    }
}

/// Digest of a summary: SHA-256 over the bincode of each mark, sorted by source.
pub fn marks_digest(marks: &[Mark]) -> [u8; 32] {
    use sha2::Digest;
    let mut sorted: Vec<&Mark> = marks.iter().collect();
    sorted.sort_by(|a, b| a.source.cmp(&b.source));
    let mut h = sha2::Sha256::new();
    for m in sorted {
        h.update(codec::encode(m).unwrap_or_default());
    }
    h.finalize().into()
}

/// The static part of a member's record: sent when it changed, or to a
/// peer that does not hold this `version` yet.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub struct MemberInfo {
    /// Bumped by the member whenever a field below changes.
    pub version: u64,
    pub name: String,
    pub agent_version: String,
    /// Unix ms when the agent started.
    pub started_ms: u64,
    pub addrs: Vec<String>,
    pub tags: Vec<(String, String)>,
    /// SHA-256 of the member's voter list, if it has one.
    pub voters_hash: Option<[u8; 32]>,
}

/// The changing part, sent at every exchange.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub incarnation: u64,
    /// The version of the sender's [`MemberInfo`].
    pub info_version: u64,
    pub health: crate::membership::health::Health,
    /// Job counters and gauges reported by local processes.
    pub jobs: Vec<(String, f64)>,
    /// Durable consumers of the sender per type pattern, sorted by pattern
    /// (at most [`MAX_SUB_PATTERNS`]). Not part of the bincode of the
    /// heartbeat itself: `/riftmesh/member/2` carries it after the message
    /// (see [`encode_member`]); `None` from a `/riftmesh/member/1` peer.
    #[serde(skip)]
    pub subs: Option<SubCounts>,
    /// Counts the sender sent that [`decode_member`] dropped (a pattern
    /// over [`MAX_SUB_PATTERN_BYTES`] or not a type pattern, or beyond
    /// [`MAX_SUB_PATTERNS`]), for the network to count and log. Never
    /// sent; 0 on every heartbeat made here.
    #[serde(skip)]
    pub subs_dropped: u32,
}

/// Consumers per type pattern (`*` for a consumer of every type).
pub type SubCounts = Vec<(String, u32)>;

/// Most type patterns one heartbeat carries counts for.
pub const MAX_SUB_PATTERNS: usize = 128;
/// Longest type pattern a heartbeat carries a count for (a consumer's
/// pattern is at most this long: `event::MAX_TYPE_LEN`).
pub const MAX_SUB_PATTERN_BYTES: usize = crate::event::MAX_TYPE_LEN;

/// Keep the counts a receiver accepts: the first [`MAX_SUB_PATTERNS`],
/// each of a pattern of at most [`MAX_SUB_PATTERN_BYTES`] that parses as a
/// type pattern. Returns how many were dropped.
pub fn check_sub_counts(subs: &mut SubCounts) -> u32 {
    let before = subs.len();
    subs.truncate(MAX_SUB_PATTERNS);
    subs.retain(|(p, _)| {
        p.len() <= MAX_SUB_PATTERN_BYTES && crate::event::TypePattern::parse(p).is_ok()
    });
    u32::try_from(before - subs.len()).unwrap_or(u32::MAX)
}

/// A member message whose heartbeat (if it has one) carries consumer counts
/// on `/riftmesh/member/2`.
pub trait MemberMessage: serde::Serialize + serde::de::DeserializeOwned {
    fn beat(&self) -> Option<&Heartbeat>;
    fn beat_mut(&mut self) -> Option<&mut Heartbeat>;
}

impl MemberMessage for MemberRequest {
    fn beat(&self) -> Option<&Heartbeat> {
        match self {
            MemberRequest::Exchange { beat, .. } => Some(beat),
            _ => None,
        }
    }
    fn beat_mut(&mut self) -> Option<&mut Heartbeat> {
        match self {
            MemberRequest::Exchange { beat, .. } => Some(beat),
            _ => None,
        }
    }
}

impl MemberMessage for MemberResponse {
    fn beat(&self) -> Option<&Heartbeat> {
        match self {
            MemberResponse::Exchange { beat, .. } => Some(beat),
            _ => None,
        }
    }
    fn beat_mut(&mut self) -> Option<&mut Heartbeat> {
        match self {
            MemberResponse::Exchange { beat, .. } => Some(beat),
            _ => None,
        }
    }
}

/// A member frame. `v2` (`/riftmesh/member/2`): the body is the bincode of
/// the message followed by the bincode of `Option<SubCounts>` (the
/// heartbeat's consumer counts, `None` for a message without a heartbeat);
/// otherwise (`/riftmesh/member/1`) the message alone, byte for byte as
/// before, the counts left out.
pub fn encode_member<T: MemberMessage>(msg: &T, v2: bool) -> Result<Vec<u8>, WireError> {
    if v2 {
        let subs = msg.beat().and_then(|b| b.subs.as_ref());
        encode_frame(&(msg, subs))
    } else {
        encode_frame(msg)
    }
}

/// Decode a member frame body of at most `limit` bytes ([`encode_member`]).
/// Counts [`check_sub_counts`] refuses are dropped and their number left in
/// the heartbeat's `subs_dropped`.
pub fn decode_member<T: MemberMessage>(
    body: &[u8],
    limit: usize,
    v2: bool,
) -> Result<T, WireError> {
    if !v2 {
        return decode_body(body, limit);
    }
    let (mut msg, subs): (T, Option<SubCounts>) = decode_body(body, limit)?;
    if let Some(beat) = msg.beat_mut() {
        beat.subs = subs.map(|mut s| {
            beat.subs_dropped = check_sub_counts(&mut s);
            s
        });
    }
    Ok(msg)
}

/// Requests of `/riftmesh/member/2` (and `/1`).
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub enum MemberRequest {
    /// "Here is my record"; answered with the responder's. `have_yours`:
    /// the version of the responder's info the sender holds (0: none).
    Exchange {
        beat: Box<Heartbeat>,
        info: Option<Box<MemberInfo>>,
        have_yours: u64,
    },
    /// A direct probe.
    Ping { incarnation: u64 },
    /// Probe `target` (peer id bytes) for me and tell me if it answered.
    ProbeFor { target: Vec<u8> },
    /// The sender is leaving the cluster for good (until it restarts).
    Leave { incarnation: u64 },
}

/// Responses of `/riftmesh/member/2` (and `/1`).
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub enum MemberResponse {
    Exchange {
        beat: Box<Heartbeat>,
        info: Option<Box<MemberInfo>>,
    },
    Pong {
        incarnation: u64,
    },
    Probed {
        reached: bool,
    },
    Done,
    Refused {
        reason: String,
    },
}

/// Largest member message body either way.
pub const MAX_MEMBER_MESSAGE: usize = 64 << 10;

/// Largest catch-up request frame body.
pub const MAX_CATCHUP_REQUEST: usize = 1 << 20;
/// Largest catch-up response frame body.
pub const MAX_CATCHUP_RESPONSE: usize = 8 << 20;

/// Frame: version byte, body length as u32 big-endian, bincode body.
pub fn encode_frame<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, WireError> {
    let body = codec::encode(v)?;
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(VERSION);
    out.extend((body.len() as u32).to_be_bytes());
    out.extend(body);
    Ok(out)
}

/// Check a frame header; returns the body length if acceptable.
pub fn frame_len(header: &[u8; 5], limit: usize) -> Result<usize, WireError> {
    if header[0] != VERSION {
        return Err(WireError::Version(header[0]));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > limit {
        return Err(WireError::Codec(codec::CodecError::TooLarge { len, limit }));
    }
    Ok(len)
}

pub fn decode_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    limit: usize,
) -> Result<T, WireError> {
    Ok(codec::decode(body, limit)?)
}

/// The gossipsub message id: SHA-256 of the whole frame, so one signed
/// envelope (one source position) is one message. The same content from
/// two sources travels as two messages and the store drops the second by
/// its content hash; an id made of the content hash alone would let
/// gossipsub drop the second copy and leave a hole in that source's
/// sequence (see proto-notes/events.md, section 10).
pub fn message_id(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Draft;
    use libp2p::identity::Keypair;

    fn exchange(subs: Option<SubCounts>) -> MemberRequest {
        MemberRequest::Exchange {
            beat: Box::new(Heartbeat {
                incarnation: 1_763_900_000_000,
                info_version: 3,
                health: crate::membership::health::Health::default(),
                jobs: vec![("selfplay_jobs".into(), 4.0)],
                subs,
                subs_dropped: 0,
            }),
            info: None,
            have_yours: 2,
        }
    }

    /// A typical host: ten durable consumers over these patterns.
    fn ten_consumers() -> SubCounts {
        [
            ("HOST_ONLINE", 2),
            ("HOST_OFFLINE", 1),
            ("IDLE_RESOURCE_DETECTED", 1),
            ("MODEL_PROMOTED", 2),
            ("SELFPLAY_*", 1),
            ("TRAINING_COMPLETED", 2),
            ("*", 1),
        ]
        .iter()
        .map(|(p, n)| (p.to_string(), *n))
        .collect()
    }

    #[test]
    fn member_v1_frames_leave_the_counts_out_byte_for_byte() {
        let with = exchange(Some(ten_consumers()));
        let without = exchange(None);
        let v1 = encode_member(&with, false).unwrap();
        assert_eq!(v1, encode_frame(&without).unwrap());
        // What an agent of /1 decodes: the message, no counts.
        let back: MemberRequest = decode_member(&v1[5..], MAX_MEMBER_MESSAGE, false).unwrap();
        assert_eq!(back.beat().unwrap().subs, None);
        // /2 carries them after the message.
        let v2 = encode_member(&with, true).unwrap();
        let back: MemberRequest = decode_member(&v2[5..], MAX_MEMBER_MESSAGE, true).unwrap();
        assert_eq!(back.beat().unwrap().subs, Some(ten_consumers()));
        assert_eq!(back.beat().unwrap().jobs, with.beat().unwrap().jobs);
        let none = encode_member(&without, true).unwrap();
        assert_eq!(none.len(), v1.len() + 1, "None costs one byte");
        // Messages without a heartbeat carry a None.
        let ping = MemberRequest::Ping { incarnation: 7 };
        let v2 = encode_member(&ping, true).unwrap();
        assert!(matches!(
            decode_member::<MemberRequest>(&v2[5..], MAX_MEMBER_MESSAGE, true).unwrap(),
            MemberRequest::Ping { incarnation: 7 }
        ));
        // A /2 body read as /1 is refused (trailing bytes), never misread.
        let v2 = encode_member(&with, true).unwrap();
        assert!(decode_member::<MemberRequest>(&v2[5..], MAX_MEMBER_MESSAGE, false).is_err());
        // The figure proto-notes/membership.md gives: ten consumers over
        // seven patterns add 104 bytes to an exchange.
        assert_eq!(ten_consumers().len(), 7);
        assert_eq!(ten_consumers().iter().map(|(_, n)| n).sum::<u32>(), 10);
        assert_eq!(v2.len() - v1.len(), 104);
    }

    #[test]
    fn member_counts_are_bounded() {
        let many: SubCounts = (0..MAX_SUB_PATTERNS + 50)
            .map(|i| (format!("T{i}"), 1))
            .collect();
        let v2 = encode_member(&exchange(Some(many)), true).unwrap();
        let back: MemberRequest = decode_member(&v2[5..], MAX_MEMBER_MESSAGE, true).unwrap();
        assert_eq!(
            back.beat().unwrap().subs.as_ref().unwrap().len(),
            MAX_SUB_PATTERNS
        );
        assert_eq!(back.beat().unwrap().subs_dropped, 50);
        // The largest heartbeat counts fit a member frame with room to spare.
        let widest: SubCounts = (0..MAX_SUB_PATTERNS)
            .map(|i| (format!("{i:0>128}"), u32::MAX))
            .collect();
        let v2 = encode_member(&exchange(Some(widest)), true).unwrap();
        assert!(v2.len() < MAX_MEMBER_MESSAGE / 2, "{}", v2.len());
    }

    #[test]
    fn member_counts_of_patterns_no_consumer_has_are_dropped() {
        let at_most = format!("T{}", "X".repeat(MAX_SUB_PATTERN_BYTES - 1));
        let subs: SubCounts = vec![
            ("*".into(), 1),
            ("A".repeat(MAX_SUB_PATTERN_BYTES + 1), 1),
            (at_most.clone(), 4),
            ("bad pattern!".into(), 2),
            ("TRAINING_COMPLETED".into(), 3),
            // One pattern of 60 KB: the frame still fits 64 KiB.
            ("B".repeat(60_000), u32::MAX),
        ];
        let v2 = encode_member(&exchange(Some(subs)), true).unwrap();
        assert!(v2.len() > 60_000 && v2.len() - 5 <= MAX_MEMBER_MESSAGE);
        let back: MemberRequest = decode_member(&v2[5..], MAX_MEMBER_MESSAGE, true).unwrap();
        let beat = back.beat().unwrap();
        assert_eq!(
            beat.subs,
            Some(vec![
                ("*".into(), 1),
                (at_most, 4),
                ("TRAINING_COMPLETED".into(), 3)
            ])
        );
        assert_eq!(beat.subs_dropped, 3);
        // A response carries them the same way.
        let resp = MemberResponse::Exchange {
            beat: Box::new(Heartbeat {
                subs: Some(vec![("C".repeat(200), 1)]),
                ..beat.clone()
            }),
            info: None,
        };
        let v2 = encode_member(&resp, true).unwrap();
        let back: MemberResponse = decode_member(&v2[5..], MAX_MEMBER_MESSAGE, true).unwrap();
        assert_eq!(back.beat().unwrap().subs, Some(vec![]));
        assert_eq!(back.beat().unwrap().subs_dropped, 1);
    }

    #[test]
    fn frames_roundtrip_and_refuse_damage() {
        let key = Keypair::generate_ed25519();
        let ev = Draft::new(
            "TRAINING_COMPLETED",
            &serde_json::json!({"a": 1}),
            None,
            None,
            None,
        )
        .unwrap()
        .seal(&key, 1, 5)
        .unwrap();
        let f = encode_event(&ev);
        // One envelope, one id; the same content from another source (or at
        // another seq) is another message.
        let other = Draft::new(
            "TRAINING_COMPLETED",
            &serde_json::json!({"a": 1}),
            None,
            None,
            None,
        )
        .unwrap()
        .seal(&key, 2, 5)
        .unwrap();
        assert_eq!(other.hash, ev.hash);
        assert_eq!(message_id(&f), message_id(&encode_event(&ev)));
        assert_ne!(message_id(&f), message_id(&encode_event(&other)));
        assert_eq!(decode_event(&f, 1 << 20).unwrap(), ev);
        let mut g = f.clone();
        g[0] = 9;
        assert_eq!(decode_event(&g, 1 << 20).unwrap_err().reason(), "version");
        let mut g = f.clone();
        g[5] ^= 1;
        assert!(decode_event(&g, 1 << 20).is_err());
        assert_eq!(decode_event(&f, 10).unwrap_err().reason(), "too_large");
        assert!(decode_event(&f[..f.len() - 3], 1 << 20).is_err());
        assert!(decode_event(&[1, 1], 1 << 20).is_err());
        // Garbage still gets a deterministic id.
        assert_eq!(message_id(b"xyz").len(), 32);
    }
}
