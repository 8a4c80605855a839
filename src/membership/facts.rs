//! Membership facts as events: the payload of `HOST_ONLINE`, `NODE_SUSPECT`,
//! `HOST_OFFLINE`, `NODE_RECOVERED` and `HOST_LEFT`, its idempotency key, and
//! the bounded parse of one read back from the log.

use libp2p::PeerId;
use serde_json::json;

use super::detector::{Fact, FactKind};
use super::ORIGIN;
use crate::event::{self, Draft, TypePattern};

/// Incarnations further than this ahead of our clock are refused (a forged
/// fact at u64::MAX could never be refuted).
const MAX_INCARNATION_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// The event types membership follows in the log.
pub(super) fn fact_patterns() -> Vec<TypePattern> {
    [
        "HOST_ONLINE",
        "NODE_SUSPECT",
        "HOST_OFFLINE",
        "NODE_RECOVERED",
        "HOST_LEFT",
    ]
    .iter()
    .filter_map(|p| TypePattern::parse(p).ok())
    .collect()
}

pub(super) fn fact_draft(f: &Fact) -> Option<Draft> {
    let payload = json!({
        "node": f.peer.to_base58(),
        "name": f.name,
        "incarnation": f.incarnation,
    });
    // Several hosts report one observation: one fact per node and
    // incarnation whoever reports it and however late (events.md §13).
    Draft::new(
        f.kind.event_type(),
        &payload,
        Some(ORIGIN.to_string()),
        None,
        None,
    )
    .and_then(|d| d.with_idem_key(Some(format!("{}/{}", f.peer.to_base58(), f.incarnation))))
    .ok()
}

#[derive(serde::Deserialize)]
struct FactPayload {
    node: String,
    name: String,
    incarnation: u64,
}

pub(super) fn parse_fact(event_type: &str, payload: &str) -> Result<Option<Fact>, String> {
    let Some(kind) = FactKind::from_event_type(event_type) else {
        return Ok(None);
    };
    let p: FactPayload = serde_json::from_str(payload).map_err(|e| e.to_string())?;
    let peer = p
        .node
        .parse::<PeerId>()
        .map_err(|e| format!("node {:?}: {e}", p.node))?;
    if p.incarnation > event::now_ms().saturating_add(MAX_INCARNATION_AHEAD_MS) {
        return Err(format!(
            "incarnation {} is far ahead of the clock",
            p.incarnation
        ));
    }
    Ok(Some(Fact {
        kind,
        peer,
        name: p.name,
        incarnation: p.incarnation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fact_payloads_are_identical_wherever_they_are_made() {
        let peer = PeerId::random();
        let f = Fact {
            kind: FactKind::Offline,
            peer,
            name: "gpu-07".into(),
            incarnation: 1_763_900_000_000,
        };
        let a = fact_draft(&f).expect("draft");
        let b = fact_draft(&f.clone()).expect("draft");
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.event_type, "HOST_OFFLINE");
        let back = parse_fact(&a.event_type, &a.payload).expect("parse");
        assert_eq!(back, Some(f.clone()));
        let other = Fact {
            incarnation: f.incarnation + 1,
            ..f
        };
        assert_ne!(fact_draft(&other).expect("draft").hash, a.hash);
    }

    #[test]
    fn forged_facts_are_refused() {
        assert!(parse_fact("HOST_OFFLINE", "{}").is_err());
        assert!(parse_fact(
            "HOST_OFFLINE",
            r#"{"ctx":"nope","name":"x","incarnation":1}"#
        )
        .is_err());
        let far = format!(
            r#"{{"ctx":"{}","name":"x","incarnation":{}}}"#,
            PeerId::random(),
            u64::MAX
        );
        assert!(parse_fact("HOST_LEFT", &far).is_err());
        assert_eq!(parse_fact("MODEL_PROMOTED", "{}"), Ok(None));
    }
}
