//! Membership facts as events: the payload of `HOST_ONLINE`, `NODE_SUSPECT`,
//! `HOST_OFFLINE`, `NODE_RECOVERED` and `HOST_LEFT`, its idempotency key, and
//! the bounded parse of one read back from the log; and the payload of
//! `IDLE_RESOURCE_DETECTED`.

use std::collections::BTreeMap;

use libp2p::PeerId;
use serde_json::{json, Value};

use super::detector::{Fact, FactKind};
use super::health::{GpuStatus, Health};
use super::idle::{Activity, IdleReport};
use super::ORIGIN;
use crate::event::{self, Draft, TypePattern};

/// What `HOST_ONLINE` says about the host besides the fact itself: its
/// configured tags and a summary of its hardware, both from the host's own
/// record. `health` is None before the host's first sample: the event then
/// has no `capabilities` (unknown, never made up).
pub(super) struct HostFacts<'a> {
    pub tags: &'a [(String, String)],
    pub health: Option<&'a Health>,
}

/// The hardware summary of `HOST_ONLINE`: what a scheduler picks a host
/// by, none of the figures that change from one sample to the next.
pub(super) fn capabilities(h: &Health) -> Value {
    let (gpu_count, models, gpu_mem) = match &h.gpu {
        GpuStatus::Present(gpus) => {
            let mut models: Vec<&str> = gpus.iter().map(|g| g.name.as_str()).collect();
            models.sort_unstable();
            models.dedup();
            let mem: u64 = gpus.iter().filter_map(|g| g.mem_total_mib).sum();
            (gpus.len(), models, mem)
        }
        GpuStatus::Absent(_) => (0, Vec::new(), 0),
    };
    json!({
        "cpu_count": h.cpu_count,
        "mem_total_bytes": h.mem_total_bytes,
        "gpu_count": gpu_count,
        "gpu_models": models,
        "gpu_mem_total_mib": gpu_mem,
    })
}

fn tags_object(tags: &[(String, String)]) -> BTreeMap<&str, &str> {
    tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

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

/// The event of a fact. `host` adds `tags` and `capabilities` to a
/// `HOST_ONLINE` (the other facts carry exactly node, name, incarnation).
pub(super) fn fact_draft(f: &Fact, host: Option<HostFacts<'_>>) -> Option<Draft> {
    let mut payload = json!({
        "node": f.peer.to_base58(),
        "name": f.name,
        "incarnation": f.incarnation,
    });
    if let (FactKind::Online, Some(h)) = (f.kind, host) {
        payload["tags"] = json!(tags_object(h.tags));
        if let Some(health) = h.health {
            payload["capabilities"] = capabilities(health);
        }
    }
    // Several hosts report one observation: one fact per node and
    // incarnation whoever reports it and however late (events.md §13).
    // The key leaves tags and capabilities out: the first copy stored is
    // the fact.
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

/// `IDLE_RESOURCE_DETECTED` about this host (`node`, `name`, `tags`),
/// keyed by node and the start of the idle period: one event per period
/// however often it is published.
pub(super) fn idle_draft(
    node: &PeerId,
    name: &str,
    tags: &[(String, String)],
    gpu_util_below_pct: f32,
    r: &IdleReport,
) -> Option<Draft> {
    let mut payload = json!({
        "node": node.to_base58(),
        "name": name,
        "idle_since_ms": r.idle_since_ms,
        "idle_for_ms": r.idle_for_ms,
        "tags": tags_object(tags),
    });
    match &r.what {
        Activity::IdleGpus(gpus) => {
            payload["resource"] = json!("gpus");
            payload["gpu_util_below_pct"] = json!(gpu_util_below_pct);
            payload["gpus"] = gpus
                .iter()
                .map(|g| json!({"index": g.index, "name": g.name, "util_pct": g.util_pct}))
                .collect();
        }
        Activity::IdleJobs(jobs) => {
            payload["resource"] = json!("jobs");
            payload["jobs"] = json!(jobs.iter().cloned().collect::<BTreeMap<String, f64>>());
        }
        Activity::Busy | Activity::Unknown => return None,
    }
    Draft::new(
        "IDLE_RESOURCE_DETECTED",
        &payload,
        Some(ORIGIN.to_string()),
        None,
        None,
    )
    .and_then(|d| {
        d.with_idem_key(Some(format!(
            "{}/idle/{}",
            node.to_base58(),
            r.idle_since_ms
        )))
    })
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
        let a = fact_draft(&f, None).expect("draft");
        let b = fact_draft(&f.clone(), None).expect("draft");
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.event_type, "HOST_OFFLINE");
        let back = parse_fact(&a.event_type, &a.payload).expect("parse");
        assert_eq!(back, Some(f.clone()));
        let other = Fact {
            incarnation: f.incarnation + 1,
            ..f
        };
        assert_ne!(fact_draft(&other, None).expect("draft").hash, a.hash);
    }

    fn h100s() -> Health {
        let gpu = |index| crate::membership::health::Gpu {
            index,
            name: "NVIDIA H100 80GB HBM3".into(),
            util_pct: Some(3.0),
            mem_used_mib: Some(10),
            mem_total_mib: Some(81559),
            temp_c: Some(40.0),
        };
        Health {
            cpu_count: 64,
            mem_total_bytes: 1 << 40,
            gpu: GpuStatus::Present(vec![gpu(0), gpu(1)]),
            ..Health::default()
        }
    }

    #[test]
    fn host_online_carries_tags_and_capabilities_outside_its_key() {
        let f = Fact {
            kind: FactKind::Online,
            peer: PeerId::random(),
            name: "gpu-07".into(),
            incarnation: 1_763_900_000_000,
        };
        let tags = vec![("role".to_string(), "training".to_string())];
        let health = h100s();
        let full = fact_draft(
            &f,
            Some(HostFacts {
                tags: &tags,
                health: Some(&health),
            }),
        )
        .expect("draft");
        let v: Value = serde_json::from_str(&full.payload).expect("json");
        assert_eq!(v["tags"]["role"], "training");
        assert_eq!(v["capabilities"]["gpu_count"], 2);
        assert_eq!(
            v["capabilities"]["gpu_models"],
            json!(["NVIDIA H100 80GB HBM3"])
        );
        assert_eq!(v["capabilities"]["gpu_mem_total_mib"], 2 * 81559);
        assert_eq!(v["capabilities"]["cpu_count"], 64);
        assert_eq!(v["capabilities"]["mem_total_bytes"], 1u64 << 40);
        // The same fact without them has the same key: one fact.
        let bare = fact_draft(&f, None).expect("draft");
        assert_eq!(full.idem_key, bare.idem_key);
        assert_eq!(back_of(&full), back_of(&bare));
        // Before the first health sample: the tags, no capabilities.
        let early = fact_draft(
            &f,
            Some(HostFacts {
                tags: &tags,
                health: None,
            }),
        )
        .expect("draft");
        let v: Value = serde_json::from_str(&early.payload).expect("json");
        assert_eq!(v["tags"]["role"], "training");
        assert!(v.get("capabilities").is_none(), "{v}");
        assert_eq!(early.idem_key, bare.idem_key);
        // Only HOST_ONLINE carries them.
        let off = Fact {
            kind: FactKind::Offline,
            ..f
        };
        let d = fact_draft(
            &off,
            Some(HostFacts {
                tags: &tags,
                health: Some(&health),
            }),
        )
        .expect("draft");
        let v: Value = serde_json::from_str(&d.payload).expect("json");
        assert!(
            v.get("tags").is_none() && v.get("capabilities").is_none(),
            "{v}"
        );
    }

    fn back_of(d: &Draft) -> Option<Fact> {
        parse_fact(&d.event_type, &d.payload).expect("parses")
    }

    #[test]
    fn idle_payload_and_key() {
        use crate::membership::idle::IdleGpu;
        let node = PeerId::random();
        let r = IdleReport {
            idle_since_ms: 1_763_900_000_000,
            idle_for_ms: 600_000,
            what: Activity::IdleGpus(vec![IdleGpu {
                index: 1,
                name: "NVIDIA H100".into(),
                util_pct: 2.0,
            }]),
        };
        let tags = vec![("role".to_string(), "selfplay".to_string())];
        let d = idle_draft(&node, "gpu-07", &tags, 5.0, &r).expect("draft");
        assert_eq!(d.event_type, "IDLE_RESOURCE_DETECTED");
        assert_eq!(
            d.idem_key.as_deref(),
            Some(format!("{node}/idle/1763900000000").as_str())
        );
        let v: Value = serde_json::from_str(&d.payload).expect("json");
        assert_eq!(v["resource"], "gpus");
        assert_eq!(v["gpus"][0]["index"], 1);
        assert_eq!(v["tags"]["role"], "selfplay");
        let jobs = IdleReport {
            what: Activity::IdleJobs(vec![("training_jobs".into(), 0.0)]),
            ..r
        };
        let v: Value = serde_json::from_str(
            &idle_draft(&node, "cpu-01", &[], 5.0, &jobs)
                .expect("draft")
                .payload,
        )
        .expect("json");
        assert_eq!(v["resource"], "jobs");
        assert_eq!(v["jobs"]["training_jobs"], 0.0);
        assert_eq!(v["tags"], json!({}));
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
