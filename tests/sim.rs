//! The membership simulation's verdicts at small N, in virtual time (the
//! same engine as `cargo bench --bench simulate`; see benches/simulate.rs
//! and proto-notes/membership.md): the agent's own failure detector, run on
//! 50 simulated hosts, full mesh and the bounded design. Deterministic (a
//! fixed seed, no wall clock): these assert what the detector promises of
//! a cluster, not how fast this machine is.

#[path = "../benches/common/mod.rs"]
mod common;
#[path = "../benches/sim/mod.rs"]
mod sim;

use sim::{run_one, Plan, Row, Topology};

fn plan(kills: usize, loss_secs: u64, loss: f64, heal: bool) -> Plan {
    Plan {
        sizes: vec![],
        topologies: vec![],
        full_max: 1000,
        loss_secs,
        loss_max: 1000,
        loss,
        kills,
        heal_max: if heal { 1000 } else { 0 },
        seed: 7,
        linked_helpers: false,
    }
}

fn both(p: &Plan, n: usize) -> Vec<Row> {
    [Topology::Full, Topology::Bounded]
        .into_iter()
        .map(|t| run_one(p, n, t))
        .collect()
}

#[test]
fn a_killed_host_is_offline_everywhere_within_a_second_and_a_vanished_one_within_six() {
    for r in both(&plan(4, 0, 0.0, false), 50) {
        let t = r.topology;
        assert_eq!(r.kill_ms.len(), 4, "{t:?}");
        assert_eq!(r.kill_missing + r.cut_missing, 0, "{t:?}: {r:?}");
        // The transport's hint: a closed connection and a refused dial.
        assert!(
            r.kill_ms.iter().all(|&ms| ms < 1000.0),
            "{t:?}: {:?}",
            r.kill_ms
        );
        // suspect_after 3 s + the direct probe + the helpers' round.
        assert!(
            r.cut_ms.iter().all(|&ms| ms < 6000.0),
            "{t:?}: {:?}",
            r.cut_ms
        );
        let f = &r.false_during_trials;
        assert_eq!((f.offline_facts, f.suspect_facts), (0, 0), "{t:?}");
    }
}

/// Today's full mesh. A suspicion all three helpers confirm is published
/// and then refuted by the member; what must not happen is a burial, or
/// suspicions published without the helpers' round (fewer than 1 in 100
/// rounds may end in one: the run has about 1,900 rounds and 1).
#[test]
fn twenty_percent_segment_loss_in_a_full_mesh_buries_nobody_and_helpers_keep_suspicions_private() {
    let r = run_one(&plan(0, 300, 0.2, false), 50, Topology::Full);
    let l = r.loss.expect("the lossy run ran");
    // The run tests something: retransmissions (head-of-line on each
    // connection) made links fall silent, direct probes failed, and
    // helpers were asked to settle them.
    assert!(l.helper_rounds > 100, "{l:?}");
    assert_eq!(l.false_offline, 0, "{l:?}");
    assert!(l.false_suspect * 100 < l.helper_rounds, "{l:?}");
}

#[test]
fn both_sides_of_a_healed_partition_hold_everyone_alive_again() {
    for r in both(&plan(0, 0, 0.0, true), 20) {
        let h = r.heal.expect("the partition ran");
        // Each side buried the other: there was something to heal.
        assert!(h.offline_published > 0, "{:?}: {h:?}", r.topology);
        let ms = h.converged_ms.expect("converged within 120 s");
        // TCP resumes each stalled stream at its next retransmission
        // (~21 s after a 30 s cut); catch-up and the refutations follow.
        assert!(ms < 30_000.0, "{:?}: {ms} ms", r.topology);
    }
}

/// The bounded design under the same 20 % loss, with both helper choices:
/// the suspect's ring neighbours (`DetectorConfig::helpers_near_target`,
/// what the agent asks with bounded links) and random members linked to
/// the prober. Before the suspicion window lasted `suspect_min` past the
/// published `NODE_SUSPECT`, a helpers' round slowed by retransmissions
/// often outlasted the window, the suspicion and the death went out
/// together, and live hosts were buried over seeds 1 to 6: 2 with ring
/// neighbours, 13 with linked helpers. With it, the member has time to
/// refute, and none may be buried.
#[test]
fn in_the_bounded_design_no_live_host_is_buried_under_loss() {
    let buried = |linked: bool| -> u64 {
        let mut buried = 0;
        for seed in 1..=6 {
            let p = Plan {
                seed,
                linked_helpers: linked,
                ..plan(0, 300, 0.2, false)
            };
            let l = run_one(&p, 50, Topology::Bounded)
                .loss
                .expect("the lossy run ran");
            // Each run exercised the detector.
            assert!(l.helper_rounds > 600, "seed {seed}, linked {linked}: {l:?}");
            buried += l.false_offline;
        }
        buried
    };
    let near = buried(false);
    let linked = buried(true);
    assert_eq!(
        (near, linked),
        (0, 0),
        "live hosts buried (ring neighbours, linked helpers)"
    );
}
