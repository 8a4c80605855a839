//! The Prometheus series membership keeps: per member state, last heard
//! and RTT, the member counts, the voter-list mismatch, and this host's
//! health and job counters.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use libp2p::PeerId;

use super::health::GpuStatus;
use super::mismatched;
use super::task::Task;
use crate::metrics::{label, Labels};

impl Task {
    /// `riftmesh_member_state`: per member, one series per state (the
    /// kube-state-metrics pattern): 1 for its current state, 0 for the
    /// others, so a change of state changes values, not series. The series
    /// of a forgotten member, or of its old name, are removed.
    pub(super) fn update_member_state(&mut self) {
        const STATES: [&str; 4] = ["alive", "suspect", "dead", "left"];
        let now: HashMap<PeerId, (Labels, &'static str)> = {
            let g = self.inner();
            g.det
                .members()
                .map(|m| {
                    let l = peer_labels(&m.peer, m.name.as_deref().unwrap_or(""));
                    let state = STATES
                        .iter()
                        .find(|s| **s == m.state.as_str())
                        .copied()
                        .unwrap_or("dead");
                    (m.peer, (l, state))
                })
                .chain(std::iter::once((
                    self.me,
                    (peer_labels(&self.me, &g.me.info.name), "alive"),
                )))
                .collect()
        };
        let with_state = |l: &Labels, s: &str| -> Labels {
            let mut l = l.clone();
            l.push(("state", s.to_string()));
            l
        };
        let mx = &self.ctx.metrics;
        for (peer, old) in &self.state_series {
            if now.get(peer).map(|(l, _)| l) != Some(old) {
                for s in STATES {
                    mx.member_state.remove(&with_state(old, s));
                }
            }
        }
        for (l, current) in now.values() {
            for s in STATES {
                mx.member_state
                    .get_or_create(&with_state(l, s))
                    .set(i64::from(s == *current));
            }
        }
        self.state_series = now.into_iter().map(|(p, (l, _))| (p, l)).collect();
    }

    pub(super) fn update_metrics(&mut self) {
        self.update_member_state();
        let g = self.inner();
        let now = Instant::now();
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for s in ["alive", "suspect", "dead", "left"] {
            counts.insert(s, 0);
        }
        *counts.entry("alive").or_default() += 1; // this agent
        let mx = &self.ctx.metrics;
        for m in g.det.members() {
            *counts.entry(m.state.as_str()).or_default() += 1;
            let l = peer_labels(&m.peer, m.name.as_deref().unwrap_or(""));
            if let Some(h) = m.last_heard {
                mx.member_last_heard
                    .get_or_create(&l)
                    .set(now.saturating_duration_since(h).as_secs_f64());
            }
            if let Some(r) = m.rtt {
                mx.member_rtt.get_or_create(&l).set(r.as_secs_f64());
            }
        }
        for (s, n) in counts {
            mx.members.get_or_create(&label("state", s)).set(n);
        }
        mx.incarnation.set(g.det.incarnation() as i64);
        // Members with another voter list: reported loudly, every minute.
        let odd = mismatched(&g, g.me.info.voters_hash);
        mx.voter_mismatch.set(odd.len() as i64);
        let every_minute = self.m.started.elapsed().as_secs() % 60 == 0;
        if !odd.is_empty() && every_minute {
            tracing::error!(members = ?odd, "these members have a different voter list than this agent: fix the config so every host has the same `voters`; raft traffic between different lists is refused");
        }
        // The detector counts stalls; the counter follows it.
        let stalls = g.det.stalls;
        let seen = mx.detector_stalls.get();
        if stalls > seen {
            mx.detector_stalls.inc_by(stalls - seen);
        }
    }

    pub(super) fn update_host_metrics(&mut self) {
        let g = self.inner();
        let h = &g.me.beat.health;
        let mx = &self.ctx.metrics;
        mx.host_cpu_use.set(h.cpu_use_pct as f64 / 100.0);
        mx.host_load1.set(h.load1 as f64);
        mx.host_mem_used.set(h.mem_used_bytes as i64);
        mx.host_mem_total.set(h.mem_total_bytes as i64);
        mx.host_disk_free.set(h.disk_free_bytes as i64);
        mx.host_disk_total.set(h.disk_total_bytes as i64);
        if let GpuStatus::Present(gpus) = &h.gpu {
            for gpu in gpus {
                let l = label("gpu", gpu.index.to_string());
                if let Some(u) = gpu.util_pct {
                    mx.host_gpu_util.get_or_create(&l).set(u as f64 / 100.0);
                }
                if let Some(t) = gpu.temp_c {
                    mx.host_gpu_temp.get_or_create(&l).set(t as f64);
                }
                if let Some(m) = gpu.mem_used_mib {
                    mx.host_gpu_mem_used
                        .get_or_create(&l)
                        .set((m as f64) * 1048576.0);
                }
            }
        }
        // `kind`, not `job`: Prometheus' own `job` label would rename ours.
        let jobs: BTreeSet<String> = g.me.beat.jobs.iter().map(|(k, _)| k.clone()).collect();
        for gone in self.job_series.difference(&jobs) {
            mx.host_jobs.remove(&label("kind", gone.clone()));
        }
        for (k, v) in &g.me.beat.jobs {
            mx.host_jobs
                .get_or_create(&label("kind", k.clone()))
                .set(*v);
        }
        drop(g);
        self.job_series = jobs;
    }
}

pub(super) fn peer_labels(peer: &PeerId, name: &str) -> Vec<(&'static str, String)> {
    vec![("peer", peer.to_base58()), ("name", name.to_string())]
}
