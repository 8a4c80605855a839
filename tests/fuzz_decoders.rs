//! A mutation fuzzer on the stable toolchain for every decoder of bytes a
//! peer sends: gossip event frames, `/riftmesh/events/1`,
//! `/riftmesh/member/1` and `/2`, `/riftmesh/sync/1` (blob), `/riftmesh/raft/3`, the
//! frame header; and for the type-name normaliser and pattern parser.
//!
//! Seeds: valid encodings built here, plus every file under
//! `tests/corpus/<target>/` (kept in the repository; add an input that once
//! broke a decoder there). Each iteration mutates a seed (bit flips, byte
//! overwrites with boundary values, truncation, extension, splices, length
//! fields set to huge values) and decodes it. A decoder must return, never
//! panic, and never accept a frame above its limit: the targets with limits
//! up to 256 KiB get a valid encoding just above the limit among their seeds
//! and assert the size of whatever they accept; for the larger limits (1-8
//! MiB, too big to mutate 100000 times) `oversized_frames_are_refused`
//! checks one valid encoding above each limit. Deterministic for a
//! seed: `RIFTMESH_FUZZ_SEED` and `RIFTMESH_FUZZ_ITERS` (default 100000 per
//! target) reproduce or lengthen a run; `RIFTMESH_FUZZ_WRITE_CORPUS=1`
//! writes the generated seeds into the corpus directories.

use std::path::{Path, PathBuf};

use rand::{Rng, RngCore, SeedableRng};
use riftmesh::blob::{Manifest, Request as BlobRequest, Response as BlobResponse};
use riftmesh::codec;
use riftmesh::event::{normalize_type, Draft, TypePattern};
use riftmesh::net::wire::{
    self, CatchupRequest, CatchupResponse, MemberMessage, MemberRequest, MemberResponse,
};

fn iters() -> usize {
    std::env::var("RIFTMESH_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn rng(target: &str) -> rand::rngs::StdRng {
    let base: u64 = std::env::var("RIFTMESH_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let mut h = base;
    for b in target.bytes() {
        h = h.wrapping_mul(0x100000001b3).wrapping_add(b as u64);
    }
    rand::rngs::StdRng::seed_from_u64(h)
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target)
}

/// The generated seeds and the corpus files of `target`.
fn seeds(target: &str, generated: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    if std::env::var_os("RIFTMESH_FUZZ_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in generated.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}.bin")), s).unwrap();
        }
    }
    let mut all = generated;
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            all.push(std::fs::read(&f).unwrap());
        }
    }
    assert!(!all.is_empty(), "no seeds for {target}");
    all
}

const BOUNDARY: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xfb, 0xfc, 0xfd, 0xff];

/// One mutation of `input`, with `other` for splices.
fn mutate(r: &mut impl Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..r.gen_range(1..=4) {
        match r.gen_range(0..8) {
            0 if !v.is_empty() => {
                let i = r.gen_range(0..v.len());
                v[i] ^= 1 << r.gen_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = r.gen_range(0..v.len());
                v[i] = BOUNDARY[r.gen_range(0..BOUNDARY.len())];
            }
            2 if !v.is_empty() => {
                let n = r.gen_range(0..v.len());
                v.truncate(n);
            }
            3 => {
                let n = r.gen_range(1..64);
                let mut extra = vec![0u8; n];
                r.fill_bytes(&mut extra);
                v.extend(extra);
            }
            4 if !other.is_empty() => {
                // Splice: our head, the other's tail.
                let a = r.gen_range(0..=v.len());
                let b = r.gen_range(0..other.len());
                v.truncate(a);
                v.extend_from_slice(&other[b..]);
            }
            5 if v.len() >= 8 => {
                // A length-like field made huge (bincode varint 0xfd/0xfc
                // prefixes, or a u32 frame length).
                let i = r.gen_range(0..=v.len() - 8);
                let huge = [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
                v[i..i + 8].copy_from_slice(&huge);
            }
            6 if !v.is_empty() => {
                let i = r.gen_range(0..v.len());
                let n = r.gen_range(1..=16.min(v.len() - i));
                v.drain(i..i + n);
            }
            _ => {
                let i = r.gen_range(0..=v.len());
                v.insert(i, r.gen());
            }
        }
    }
    v
}

/// Run `decode` on the seeds and on `iters()` mutations of them; returns how
/// many inputs decoded, so a run that accepts nothing (a broken harness)
/// shows.
fn fuzz(target: &str, generated: Vec<Vec<u8>>, mut decode: impl FnMut(&[u8]) -> bool) -> usize {
    let seeds = seeds(target, generated);
    let mut ok = 0;
    for s in &seeds {
        ok += decode(s) as usize;
    }
    let mut r = rng(target);
    for _ in 0..iters() {
        let a = &seeds[r.gen_range(0..seeds.len())];
        let b = &seeds[r.gen_range(0..seeds.len())];
        let m = mutate(&mut r, a, b);
        ok += decode(&m) as usize;
    }
    ok
}

fn sealed_event(ty: &str, payload: serde_json::Value) -> riftmesh::event::Event {
    let key = libp2p::identity::Keypair::generate_ed25519();
    Draft::new(
        ty,
        &payload,
        Some("fuzz".into()),
        Some("corr-1".into()),
        None,
    )
    .unwrap()
    .seal(&key, 7, 1_700_000_000_000)
    .unwrap()
}

/// An envelope of version 2 (with an idempotency key).
fn keyed_event(ty: &str, payload: serde_json::Value) -> riftmesh::event::Event {
    let key = libp2p::identity::Keypair::generate_ed25519();
    Draft::new(ty, &payload, Some("fuzz".into()), None, None)
        .unwrap()
        .with_idem_key(Some("job-7/attempt-1".into()))
        .unwrap()
        .seal(&key, 8, 1_700_000_000_000)
        .unwrap()
}

#[test]
fn gossip_event_frames() {
    let limit = 256 << 10;
    let seeds = vec![
        wire::encode_event(&sealed_event(
            "TRAINING_COMPLETED",
            serde_json::json!({"config": "hex8_2p", "epochs": 3}),
        )),
        wire::encode_event(&sealed_event("HOST_OFFLINE", serde_json::json!({}))),
        wire::encode_event(&keyed_event(
            "DAEMON_STATUS_CHANGED",
            serde_json::json!({"daemon": "sync", "status": "running"}),
        )),
    ];
    assert_eq!(seeds[0][0], 1, "a key-less event travels as version 1");
    assert_eq!(seeds[2][0], 2, "a keyed event travels as version 2");
    let valid = seeds.len();
    // A valid frame whose body is just above the limit: refused as it is,
    // and its mutations (truncated, spliced) exercise the edge.
    let big = wire::encode_event(&sealed_event(
        "CUSTOM_BIG",
        serde_json::json!({ "pad": "x".repeat(limit) }),
    ));
    assert!(big.len() - wire::EVENT_HEADER > limit);
    assert!(wire::decode_event(&big, big.len()).is_ok());
    assert!(
        wire::decode_event(&big, limit).is_err(),
        "an oversized frame decoded"
    );
    let mut seeds = seeds;
    seeds.push(big);
    let ok = fuzz("gossip_event", seeds, |b| {
        match wire::decode_event(b, limit) {
            Ok(ev) => {
                assert!(
                    b.len() - wire::EVENT_HEADER <= limit,
                    "a {}-byte frame accepted under a {limit} limit",
                    b.len()
                );
                // Whatever decodes is then checked by signature; a mutated
                // frame that still decodes must not also verify unless it
                // is byte-identical in the signed fields.
                let _ = ev.verify();
                true
            }
            Err(e) => {
                let _ = e.reason();
                false
            }
        }
    });
    assert!(ok >= valid, "the valid seeds must decode ({ok})");
}

/// A signature check rejects every mutation of a signed event's fields,
/// in both envelope versions.
#[test]
fn mutated_events_never_verify() {
    for ev in [
        sealed_event("MODEL_PROMOTED", serde_json::json!({"model": "m.pth"})),
        keyed_event("MODEL_PROMOTED", serde_json::json!({"model": "m.pth"})),
    ] {
        mutated_event_never_verifies(ev);
    }
}

fn mutated_event_never_verifies(ev: riftmesh::event::Event) {
    let frame = wire::encode_event(&ev);
    let mut r = rng("mutated_events_never_verify");
    let mut decoded = 0;
    for _ in 0..iters() / 8 {
        let m = mutate(&mut r, &frame, &frame);
        if let Ok(got) = wire::decode_event(&m, 256 << 10) {
            decoded += 1;
            if got.verify().is_ok() {
                assert_eq!(
                    got.signing_bytes(),
                    ev.signing_bytes(),
                    "a mutated event verified"
                );
            }
        }
    }
    assert!(decoded > 0, "some mutations should still decode");
}

#[test]
fn frame_headers() {
    let mut r = rng("frame_headers");
    for _ in 0..iters() {
        let mut h = [0u8; 5];
        r.fill_bytes(&mut h);
        if r.gen_bool(0.5) {
            h[0] = wire::VERSION;
        }
        let limit = r.gen_range(0..(16 << 20));
        if let Ok(n) = wire::frame_len(&h, limit) {
            assert!(n <= limit, "frame of {n} accepted under a {limit} limit");
            assert_eq!(h[0], wire::VERSION);
        }
    }
}

fn framed<T: serde::Serialize>(v: &T) -> Vec<u8> {
    wire::encode_frame(v).unwrap()
}

/// Header then body, as the request-response codecs read them.
fn decode_framed<T: serde::de::DeserializeOwned>(b: &[u8], limit: usize) -> bool {
    let Some(h) = b.get(..5) else { return false };
    let h: [u8; 5] = h.try_into().unwrap();
    let Ok(n) = wire::frame_len(&h, limit) else {
        return false;
    };
    let Some(body) = b.get(5..5 + n) else {
        return false;
    };
    let ok = wire::decode_body::<T>(body, limit).is_ok();
    assert!(
        !ok || body.len() <= limit,
        "a {}-byte body accepted under a {limit} limit",
        body.len()
    );
    ok
}

/// A frame whose header states the body's true length, above `limit`.
fn oversized_framed<T: serde::Serialize>(v: &T, limit: usize) -> Vec<u8> {
    let f = framed(v);
    assert!(f.len() - 5 > limit, "{} <= {limit}", f.len() - 5);
    f
}

#[test]
fn catchup_messages() {
    let mark = wire::Mark {
        source: "12D3KooWsource".into(),
        contiguous: 10,
        max_seen: 12,
    };
    let reqs = vec![
        framed(&CatchupRequest::Summary {
            marks: vec![mark.clone(), mark.clone()],
        }),
        framed(&CatchupRequest::Fetch {
            source: "s".into(),
            from: 3,
            max_events: 1000,
        }),
        framed(&CatchupRequest::Digest { digest: [7; 32] }),
    ];
    let ok = fuzz("catchup_request", reqs, |b| {
        decode_framed::<CatchupRequest>(b, wire::MAX_CATCHUP_REQUEST)
    });
    assert!(ok >= 3);
    let resps = vec![
        framed(&CatchupResponse::events(
            vec![sealed_event(
                "SELFPLAY_COMPLETE",
                serde_json::json!({"games": 12}),
            )],
            Some(1),
        )),
        framed(&CatchupResponse::events(
            vec![
                sealed_event("SELFPLAY_COMPLETE", serde_json::json!({"games": 13})),
                keyed_event("SELFPLAY_COMPLETE", serde_json::json!({"games": 14})),
            ],
            Some(1),
        )),
        framed(&CatchupResponse::Summary { marks: vec![mark] }),
        framed(&CatchupResponse::Refused {
            reason: "busy".into(),
        }),
        framed(&CatchupResponse::Same),
    ];
    // One version-2 event makes the answer EventsV2; all version 1, Events.
    for (i, v2) in [(0, false), (1, true)] {
        let got = wire::decode_body::<CatchupResponse>(&resps[i][5..], wire::MAX_CATCHUP_RESPONSE);
        assert_eq!(
            matches!(got, Ok(CatchupResponse::EventsV2 { .. })),
            v2,
            "{i}"
        );
    }
    let ok = fuzz("catchup_response", resps, |b| {
        decode_framed::<CatchupResponse>(b, wire::MAX_CATCHUP_RESPONSE)
    });
    assert!(ok >= 5);
}

#[test]
fn membership_messages() {
    let beat = wire::Heartbeat {
        incarnation: 3,
        info_version: 2,
        health: Default::default(),
        jobs: vec![("selfplay_jobs".into(), 6.0)],
        subs: Some(vec![("*".into(), 1), ("TRAINING_COMPLETED".into(), 3)]),
        subs_dropped: 0,
    };
    let info = wire::MemberInfo {
        version: 2,
        name: "gpu-07".into(),
        agent_version: "riftmesh/0.1.0".into(),
        started_ms: 1,
        addrs: vec!["/ip4/10.0.0.7/tcp/4001".into()],
        tags: vec![("role".into(), "training".into())],
        voters_hash: Some([1; 32]),
    };
    let reqs = vec![
        framed(&MemberRequest::Exchange {
            beat: Box::new(beat.clone()),
            info: Some(Box::new(info.clone())),
            have_yours: 0,
        }),
        framed(&MemberRequest::Ping { incarnation: 9 }),
        framed(&MemberRequest::ProbeFor {
            target: vec![0, 36, 8, 1],
        }),
        framed(&MemberRequest::Leave { incarnation: 4 }),
    ];
    let mut big_info = info.clone();
    big_info.tags = (0..2000)
        .map(|i| (format!("tag-{i:04}"), "v".repeat(32)))
        .collect();
    let big = oversized_framed(
        &MemberRequest::Exchange {
            beat: Box::new(beat.clone()),
            info: Some(Box::new(big_info)),
            have_yours: 0,
        },
        wire::MAX_MEMBER_MESSAGE,
    );
    assert!(decode_framed::<MemberRequest>(&big, big.len()));
    assert!(!decode_framed::<MemberRequest>(
        &big,
        wire::MAX_MEMBER_MESSAGE
    ));
    let mut reqs = reqs;
    reqs.push(big);
    let ok = fuzz("member_request", reqs, |b| {
        decode_framed::<MemberRequest>(b, wire::MAX_MEMBER_MESSAGE)
    });
    assert!(ok >= 4);
    let resps = vec![
        framed(&MemberResponse::Exchange {
            beat: Box::new(beat.clone()),
            info: Some(Box::new(info)),
        }),
        framed(&MemberResponse::Pong { incarnation: 1 }),
        framed(&MemberResponse::Probed { reached: true }),
        framed(&MemberResponse::Done),
    ];
    let ok = fuzz("member_response", resps, |b| {
        decode_framed::<MemberResponse>(b, wire::MAX_MEMBER_MESSAGE)
    });
    assert!(ok >= 4);

    // `/riftmesh/member/2`: the message, then the heartbeat's consumer counts.
    let v2 = vec![
        wire::encode_member(
            &MemberRequest::Exchange {
                beat: Box::new(beat.clone()),
                info: None,
                have_yours: 2,
            },
            true,
        )
        .unwrap(),
        wire::encode_member(&MemberRequest::Ping { incarnation: 9 }, true).unwrap(),
        wire::encode_member(
            &MemberResponse::Exchange {
                beat: Box::new(beat),
                info: None,
            },
            true,
        )
        .unwrap(),
    ];
    let ok = fuzz("member_v2", v2, |b| {
        let Some(h) = b.get(..5) else { return false };
        let Ok(n) = wire::frame_len(&h.try_into().unwrap(), wire::MAX_MEMBER_MESSAGE) else {
            return false;
        };
        let Some(body) = b.get(5..5 + n) else {
            return false;
        };
        let req = wire::decode_member::<MemberRequest>(body, wire::MAX_MEMBER_MESSAGE, true);
        let resp = wire::decode_member::<MemberResponse>(body, wire::MAX_MEMBER_MESSAGE, true);
        for beat in [
            req.as_ref().ok().and_then(|m| m.beat()),
            resp.as_ref().ok().and_then(|m| m.beat()),
        ]
        .into_iter()
        .flatten()
        {
            assert!(beat
                .subs
                .as_ref()
                .is_none_or(|s| s.len() <= wire::MAX_SUB_PATTERNS));
        }
        req.is_ok() || resp.is_ok()
    });
    assert!(ok >= 3);
}

#[test]
fn blob_sync_messages() {
    let id = [0xab; 32];
    let reqs = vec![
        codec::encode(&BlobRequest::Have {
            blobs: vec![id, [1; 32]],
        })
        .unwrap(),
        codec::encode(&BlobRequest::Manifest { blob: id }).unwrap(),
        codec::encode(&BlobRequest::Chunk { blob: id, index: 5 }).unwrap(),
    ];
    let limit = riftmesh::net::MAX_BLOB_REQUEST;
    let big = codec::encode(&BlobRequest::Have {
        blobs: vec![id; limit / 32 + 1],
    })
    .unwrap();
    assert!(big.len() > limit);
    assert!(codec::decode::<BlobRequest>(&big, big.len()).is_ok());
    assert!(codec::decode::<BlobRequest>(&big, limit).is_err());
    let mut reqs = reqs;
    reqs.push(big);
    let ok = fuzz("blob_request", reqs, |b| {
        let ok = codec::decode::<BlobRequest>(b, limit).is_ok();
        assert!(
            !ok || b.len() <= limit,
            "a {}-byte request accepted under a {limit} limit",
            b.len()
        );
        ok
    });
    assert!(ok >= 3);
    let resps = vec![
        codec::encode(&BlobResponse::Manifest(Manifest {
            size: 3 << 20,
            chunk_size: 1 << 20,
            chunks: vec![[1; 32], [2; 32], [3; 32]],
        }))
        .unwrap(),
        codec::encode(&BlobResponse::Chunk(vec![9; 4096])).unwrap(),
        codec::encode(&BlobResponse::NotFound).unwrap(),
        codec::encode(&BlobResponse::Busy { retry_ms: 200 }).unwrap(),
    ];
    let ok = fuzz("blob_response", resps, |b| {
        codec::decode::<BlobResponse>(b, riftmesh::net::MAX_BLOB_RESPONSE).is_ok()
    });
    assert!(ok >= 4);
}

/// One valid encoding just above each large limit is refused, and decodes
/// under a limit of its own size (so the size is what refused it).
#[test]
fn oversized_frames_are_refused() {
    let mark = |i: usize| wire::Mark {
        source: format!("12D3KooW{i:040}"),
        contiguous: 1,
        max_seen: 2,
    };
    // /riftmesh/events/1 request: a summary above 1 MiB.
    let n = wire::MAX_CATCHUP_REQUEST / 48 + 1;
    let req = oversized_framed(
        &CatchupRequest::Summary {
            marks: (0..n).map(mark).collect(),
        },
        wire::MAX_CATCHUP_REQUEST,
    );
    assert!(decode_framed::<CatchupRequest>(&req, req.len()));
    assert!(!decode_framed::<CatchupRequest>(
        &req,
        wire::MAX_CATCHUP_REQUEST
    ));
    // Its response: a summary above 8 MiB.
    let n = wire::MAX_CATCHUP_RESPONSE / 48 + 1;
    let resp = oversized_framed(
        &CatchupResponse::Summary {
            marks: (0..n).map(mark).collect(),
        },
        wire::MAX_CATCHUP_RESPONSE,
    );
    assert!(decode_framed::<CatchupResponse>(&resp, resp.len()));
    assert!(!decode_framed::<CatchupResponse>(
        &resp,
        wire::MAX_CATCHUP_RESPONSE
    ));
    // /riftmesh/sync/1 response: a chunk above its limit.
    let limit = riftmesh::net::MAX_BLOB_RESPONSE;
    let chunk = codec::encode(&BlobResponse::Chunk(vec![7; limit])).unwrap();
    assert!(chunk.len() > limit);
    assert!(codec::decode::<BlobResponse>(&chunk, chunk.len()).is_ok());
    assert!(codec::decode::<BlobResponse>(&chunk, limit).is_err());
    // (/riftmesh/raft/3's envelope types are not built outside the crate;
    // its decoder is the same codec::decode with MAX_RAFT_MESSAGE, the size
    // check the chunk above exercises.)
}

#[test]
fn raft_envelopes() {
    let seeds = riftmesh::leader::sample_envelopes();
    let n = seeds.len();
    let ok = fuzz(
        "raft_envelope",
        seeds,
        riftmesh::leader::decodes_as_envelope,
    );
    assert!(ok >= n);
}

#[test]
fn type_names_and_patterns() {
    let seeds: Vec<Vec<u8>> = [
        "training.completed",
        "TRAINING_COMPLETE",
        "model_promoted",
        "selfplay.*",
        "TRAINING_*",
        "*",
        "custom.thing-2",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let ok = fuzz("type_names", seeds, |b| {
        let s = String::from_utf8_lossy(b);
        let mut ok = false;
        if let Ok(n) = normalize_type(&s) {
            // Canonical names are fixed points of the normaliser.
            assert_eq!(normalize_type(&n).unwrap(), n, "{s:?}");
            assert!(n.len() <= 128, "{n}");
            ok = true;
        }
        if let Ok(p) = TypePattern::parse(&s) {
            let _ = p.matches("TRAINING_COMPLETED");
            ok = true;
        }
        ok
    });
    assert!(ok >= 7);
}
