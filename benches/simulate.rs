//! Membership at scale, simulated: `cargo bench --bench simulate`.
//!
//! A discrete-event simulation with virtual time of N hosts, each running
//! the agent's own sans-IO failure detector (`membership::detector`, fed
//! the inputs `membership::task` feeds it) over a modelled network. The
//! engine is benches/sim/ (tests/sim.rs uses it too); the model and its
//! limits are written in proto-notes/membership.md ("Membership at
//! scale"); in short:
//!
//! - **Links** are TCP connections, one ordered stream each way: `full`
//!   links every pair (the agent today); `bounded` links each host to its
//!   ring neighbours (hosts sorted by a hash of their id) and a few random
//!   hosts it dials (the design to build). Each link carries libp2p ping
//!   both ways (one in flight, the next 2 s after the answer).
//! - **Loss** is TCP loss: a lost segment is not dropped but resent after the
//!   retransmission timeout (200 ms, doubling), holding up what follows it;
//!   a lost SYN delays a dial by 1 s. One-way latency is fixed per link,
//!   uniform in a range. A partition holds segments until the heal, then
//!   each stream resumes at its next retransmission.
//! - **Records** (a host's health and info): `full` exchanges them per pair
//!   every 5 s (request and response, as the agent does); `bounded` makes a
//!   new version of a host's record every 5 s × max(1, N / 10) (so the
//!   cluster makes about 2 versions a second at any N), each host passing a
//!   version it has not seen to `fanout` random links.
//! - **Facts** (NODE_SUSPECT, HOST_OFFLINE, NODE_RECOVERED, HOST_ONLINE)
//!   are gossipsub messages: the publisher sends to every link, others
//!   forward along their mesh (`mesh` links), each message id once per
//!   host; several publishers of one fact are several messages, stored
//!   once. Catch-up fetches missed facts from one random link every 5 s.
//! - **Probes**: a direct probe uses the link if there is one, else dials
//!   (refused at once by a host whose process died, silent for a host cut
//!   off); helpers do the same, as `membership::probe` does.
//!
//! Bytes are application bytes on streams, which is what the agent's
//! `libp2p_bandwidth_bytes_total` counts (the membership bench's idle row),
//! with sizes taken from the wire: ping 32 B each way, an exchange 406 B
//! (request + response, stream negotiation included; fitted to the 20-agent
//! bench), a member Ping/Pong 60 B each, ProbeFor 90 B and Probed 50 B, a
//! gossiped fact 600 B, a record version 250 B, a new connection 2 KB each
//! way (identify and negotiations).
//!
//! Scenarios per N: an idle window (per-host bytes/s and messages/s), kill
//! trials (the process dies: its kernel closes its connections and refuses
//! dials; time until every other host holds its HOST_OFFLINE), cut trials
//! (the host vanishes silently), a run with packet loss counting false
//! HOST_OFFLINE and NODE_SUSPECT, and a partition of two halves that heals
//! (time until every host holds every other alive again).
//!
//! Environment (defaults): RIFTMESH_SIM_SIZES ("20,50,100,1000,5000"),
//! RIFTMESH_SIM_TOPOLOGIES ("full,bounded"; `full` runs only up to
//! RIFTMESH_SIM_FULL_MAX = 200 hosts), RIFTMESH_SIM_LOSS_SECS (600: the
//! lossy run at every N up to RIFTMESH_SIM_LOSS_MAX = 1000; 0 skips it),
//! RIFTMESH_SIM_LOSS (0.01), RIFTMESH_SIM_KILLS (10 kills, half as many
//! cuts), RIFTMESH_SIM_HEAL_MAX (1000: the partition runs up to this N),
//! RIFTMESH_SIM_SEED (1); the design's knobs: RIFTMESH_SIM_FANOUT (3),
//! RIFTMESH_SIM_RECORD_RATE (10 record versions per 5 s cluster-wide),
//! RIFTMESH_SIM_PUBLISH_JITTER_MS (0: a verdict about another host is
//! published at once, as the agent does), RIFTMESH_SIM_HELPERS (`near`: the
//! bounded design's helpers are the suspect's ring neighbours; `linked`:
//! random members linked to the prober, the agent's choice today).
//! Writes benches/results/simulate.txt and simulate.json.
mod common;
mod sim;

use std::fmt::Write as _;
use std::time::Instant;

use common::percentile;
use sim::{env, run_one, Plan, Topology};

/// Median and max of a trial's times (nearest rank: with 10 trials a p99
/// would be the max).
fn ms(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let p50 = percentile(&v, 50.0);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{:.0} / {:.0}", p50, max)
}

fn main() -> anyhow::Result<()> {
    let parse_list = |k: &str, d: &str| -> Vec<String> {
        std::env::var(k)
            .unwrap_or_else(|_| d.to_string())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let plan = Plan {
        sizes: parse_list("RIFTMESH_SIM_SIZES", "20,50,100,1000,5000")
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
        topologies: parse_list("RIFTMESH_SIM_TOPOLOGIES", "full,bounded")
            .iter()
            .filter_map(|s| match s.as_str() {
                "full" => Some(Topology::Full),
                "bounded" => Some(Topology::Bounded),
                _ => None,
            })
            .collect(),
        full_max: env("RIFTMESH_SIM_FULL_MAX", 200),
        loss_secs: env("RIFTMESH_SIM_LOSS_SECS", 600),
        loss_max: env("RIFTMESH_SIM_LOSS_MAX", 1000),
        loss: env("RIFTMESH_SIM_LOSS", 0.01),
        kills: env("RIFTMESH_SIM_KILLS", 10),
        heal_max: env("RIFTMESH_SIM_HEAL_MAX", 1000),
        seed: env("RIFTMESH_SIM_SEED", 1),
        linked_helpers: match std::env::var("RIFTMESH_SIM_HELPERS").as_deref() {
            Err(_) | Ok("near") => false,
            Ok("linked") => true,
            Ok(other) => panic!("RIFTMESH_SIM_HELPERS={other}: `near` or `linked`"),
        },
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    for &t in &plan.topologies {
        for &n in &plan.sizes {
            if t == Topology::Full && n > plan.full_max {
                continue;
            }
            eprintln!("simulating {t:?} at {n} hosts");
            let r = run_one(&plan, n, t);
            eprintln!("  done in {:.1} s: {r:?}", r.wall_secs);
            rows.push(r);
        }
    }
    let mut out = String::new();
    let (command, source, date) = common::run_header("RIFTMESH_SIM_", "simulate");
    writeln!(
        out,
        "riftmesh membership simulation (virtual time; the agent's own detector); {date}"
    )?;
    writeln!(out, "command: {command}  (source: git {source})")?;
    writeln!(
        out,
        "{:<8} {:>5} {:>7} {:>14} {:>9} {:>20} {:>15} {:>15} {:>24} {:>16} {:>9}",
        "topology",
        "N",
        "links",
        "idle B/s",
        "msg/s",
        "records",
        "kill p50/max ms",
        "cut p50/max ms",
        "false (loss)",
        "heal ms, MB/host",
        "wall s"
    )?;
    for r in &rows {
        let t = match r.topology {
            Some(Topology::Full) => "full",
            _ => "bounded",
        };
        let loss = r.loss.as_ref().map_or("-".to_string(), |l| {
            format!(
                "{}/{} in {:.0}s ({} rounds)",
                l.false_offline, l.false_suspect, l.secs, l.helper_rounds
            )
        });
        let heal = r
            .heal
            .as_ref()
            .map_or("-".to_string(), |h| match h.converged_ms {
                Some(ms) => format!("{ms:.0}, {:.1}", h.bytes_mean / 1e6),
                None => format!("never, {:.1}", h.bytes_mean / 1e6),
            });
        let age = match (r.record_reach, r.record_spread_p99_ms) {
            (Some(reach), Some(p)) => {
                format!(
                    "{:.0}s {:.1}% {:.0}ms",
                    r.record_refresh_s,
                    reach * 100.0,
                    p
                )
            }
            _ => format!("{:.0}s all", r.record_refresh_s),
        };
        writeln!(
            out,
            "{:<8} {:>5} {:>7.1} {:>14} {:>9.1} {:>20} {:>15} {:>15} {:>24} {:>16} {:>9.1}",
            t,
            r.n,
            r.links_mean,
            format!("{:.0} / {:.0}", r.idle_bps_mean, r.idle_bps_max),
            r.idle_msgs_mean,
            age,
            ms(&r.kill_ms),
            ms(&r.cut_ms),
            loss,
            heal,
            r.wall_secs
        )?;
        if r.kill_missing + r.cut_missing > 0 {
            writeln!(
                out,
                "         {} hosts never held a victim's HOST_OFFLINE within 30 s",
                r.kill_missing + r.cut_missing
            )?;
        }
        if r.false_during_trials.offline_facts > 0 {
            writeln!(
                out,
                "         {} HOST_OFFLINE about hosts never signalled during the trials",
                r.false_during_trials.offline_facts
            )?;
        }
    }
    writeln!(
        out,
        "idle B/s: application bytes on streams per host, in + out, mean / max (what libp2p_bandwidth_bytes_total counts). \
records: how often each host renews its record; bounded: the share of the other hosts a new version reached and the p99 delay of those receipts (a host it missed gets the next one); full: every pair exchanges every 5 s. \
kill: the process dies (connections closed, dials refused); cut: the host vanishes; median/max over trials of the time until every live host held HOST_OFFLINE (a host that never did counts as 30 s). \
false (loss): HOST_OFFLINE/NODE_SUSPECT published about hosts never signalled, at the given TCP segment loss, and the helper rounds the run started (how much it exercised the detector). \
heal: two halves apart for 30 s, then the time until every host holds every other alive, and the bytes per host from the cut until then."
    )?;
    writeln!(out, "total {:.0} s", started.elapsed().as_secs_f64())?;
    print!("{out}");
    let dir = common::results_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results"),
    );
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("simulate.txt"), &out)?;
    std::fs::write(
        dir.join("simulate.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    eprintln!("wrote {}", dir.join("simulate.txt").display());
    Ok(())
}
