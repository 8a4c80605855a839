//! Tests of events: envelopes, hashes, types and patterns.

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
use libp2p::identity::Keypair;
use serde_json::json;
use sha2::{Digest, Sha256};

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
