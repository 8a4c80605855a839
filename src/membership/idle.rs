//! When this host is idle (`IDLE_RESOURCE_DETECTED`): its GPUs all below a
//! utilization threshold, or, on a host without GPUs, every job counter at
//! zero, for `idle_after`; reported once per idle period. Decisions only:
//! the task feeds each health sample with the time and publishes what
//! [`IdleTracker::observe`] returns.

use std::time::Duration;

use super::health::{GpuStatus, Health};

/// One GPU found idle, with its utilization when sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct IdleGpu {
    pub index: u32,
    pub name: String,
    pub util_pct: f32,
}

/// What one sample says about the host.
#[derive(Clone, Debug, PartialEq)]
pub enum Activity {
    /// Every GPU below the threshold.
    IdleGpus(Vec<IdleGpu>),
    /// No GPU, and every job counter (at least one) at zero.
    IdleJobs(Vec<(String, f64)>),
    /// A GPU at or above the threshold, or (without GPUs) a job counter
    /// other than zero.
    Busy,
    /// Nothing to judge by: a GPU without a utilization figure, GPU
    /// sampling failing, or no GPU and no job counter.
    Unknown,
}

/// Whether `why` (of `GpuStatus::Absent`) means the host has no GPU to
/// sample (not found, none reported, sampling off), as opposed to a
/// sampler that failed or has not run yet.
fn has_no_gpu(why: &str) -> bool {
    why.contains("not found") || why == "no GPU reported" || why.starts_with("GPU sampling is off")
}

/// Judge one sample: GPUs when the host has them, else its job counters.
pub fn activity(health: &Health, jobs: &[(String, f64)], gpu_util_below: f32) -> Activity {
    match &health.gpu {
        GpuStatus::Present(gpus) if !gpus.is_empty() => {
            let mut idle = Vec::with_capacity(gpus.len());
            for g in gpus {
                match g.util_pct {
                    None => return Activity::Unknown,
                    Some(u) if u >= gpu_util_below => return Activity::Busy,
                    Some(u) => idle.push(IdleGpu {
                        index: g.index,
                        name: g.name.clone(),
                        util_pct: u,
                    }),
                }
            }
            Activity::IdleGpus(idle)
        }
        GpuStatus::Absent(why) if !has_no_gpu(why) => Activity::Unknown,
        _ if jobs.is_empty() => Activity::Unknown,
        _ if jobs.iter().all(|(_, v)| *v == 0.0) => Activity::IdleJobs(jobs.to_vec()),
        _ => Activity::Busy,
    }
}

/// An idle period long enough to report.
#[derive(Clone, Debug, PartialEq)]
pub struct IdleReport {
    /// Unix ms of the first idle sample of the period.
    pub idle_since_ms: u64,
    pub idle_for_ms: u64,
    /// The idle sample that crossed `idle_after`: `IdleGpus` or `IdleJobs`.
    pub what: Activity,
}

/// The idle period in progress, and whether it was reported.
#[derive(Debug, Default)]
pub struct IdleTracker {
    since_ms: Option<u64>,
    reported: bool,
}

impl IdleTracker {
    /// Feed one sample taken at `now_ms`. Returns a report the first time
    /// an idle period reaches `after` (never when `after` is zero). A busy
    /// sample ends the period and allows the next report; an unknown one
    /// ends the period without allowing another report (a sampler that
    /// failed once is no sign the host was used).
    pub fn observe(&mut self, after: Duration, now_ms: u64, a: Activity) -> Option<IdleReport> {
        match a {
            Activity::Busy => {
                self.since_ms = None;
                self.reported = false;
                None
            }
            Activity::Unknown => {
                self.since_ms = None;
                None
            }
            Activity::IdleGpus(_) | Activity::IdleJobs(_) => {
                let since = *self.since_ms.get_or_insert(now_ms);
                let idle_for_ms = now_ms.saturating_sub(since);
                let due = u128::from(idle_for_ms) >= after.as_millis();
                if after.is_zero() || self.reported || !due {
                    return None;
                }
                self.reported = true;
                Some(IdleReport {
                    idle_since_ms: since,
                    idle_for_ms,
                    what: a,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::health::Gpu;

    fn gpus(utils: &[Option<f32>]) -> Health {
        Health {
            gpu: GpuStatus::Present(
                utils
                    .iter()
                    .enumerate()
                    .map(|(i, u)| Gpu {
                        index: i as u32,
                        name: "NVIDIA H100".into(),
                        util_pct: *u,
                        mem_used_mib: None,
                        mem_total_mib: Some(81920),
                        temp_c: None,
                    })
                    .collect(),
            ),
            ..Health::default()
        }
    }

    fn no_gpu() -> Health {
        Health {
            gpu: GpuStatus::Absent("nvidia-smi not found".into()),
            ..Health::default()
        }
    }

    fn jobs(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        v.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn activity_of_gpus_and_of_job_counters() {
        let idle = activity(&gpus(&[Some(0.0), Some(4.9)]), &[], 5.0);
        assert!(
            matches!(&idle, Activity::IdleGpus(g) if g.len() == 2 && g[1].util_pct == 4.9),
            "{idle:?}"
        );
        assert_eq!(
            activity(&gpus(&[Some(0.0), Some(5.0)]), &[], 5.0),
            Activity::Busy
        );
        assert_eq!(
            activity(&gpus(&[Some(0.0), None]), &[], 5.0),
            Activity::Unknown
        );
        // GPUs decide on a GPU host, whatever the counters say.
        assert_eq!(
            activity(&gpus(&[Some(90.0)]), &jobs(&[("training_jobs", 0.0)]), 5.0),
            Activity::Busy
        );
        let z = jobs(&[("selfplay_jobs", 0.0), ("training_jobs", 0.0)]);
        assert_eq!(activity(&no_gpu(), &z, 5.0), Activity::IdleJobs(z.clone()));
        let one = jobs(&[("selfplay_jobs", 0.0), ("training_jobs", 1.0)]);
        assert_eq!(activity(&no_gpu(), &one, 5.0), Activity::Busy);
        assert_eq!(activity(&no_gpu(), &[], 5.0), Activity::Unknown);
        let off = Health {
            gpu: GpuStatus::Absent("GPU sampling is off (nvidia_smi = \"\")".into()),
            ..Health::default()
        };
        assert_eq!(activity(&off, &z, 5.0), Activity::IdleJobs(z.clone()));
        // A failing or not yet run sampler is no evidence either way.
        let failed = Health {
            gpu: GpuStatus::Absent("nvidia-smi timed out after 5s".into()),
            ..Health::default()
        };
        assert_eq!(activity(&failed, &z, 5.0), Activity::Unknown);
        assert_eq!(activity(&Health::default(), &z, 5.0), Activity::Unknown);
    }

    #[test]
    fn one_report_per_idle_period() {
        let after = Duration::from_secs(600);
        let idle = || activity(&gpus(&[Some(0.0)]), &[], 5.0);
        let mut t = IdleTracker::default();
        let mut reports = Vec::new();
        // Idle from t=1000 for 30 minutes, sampled every 5 s.
        for s in 0..360u64 {
            let now = 1_000 + s * 5_000;
            reports.extend(t.observe(after, now, idle()));
        }
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].idle_since_ms, 1_000);
        assert_eq!(reports[0].idle_for_ms, 600_000);
        // Unknown in between does not open a new period's report.
        let now = 1_000 + 360 * 5_000;
        assert!(t.observe(after, now, Activity::Unknown).is_none());
        assert!(t.observe(after, now + 1, idle()).is_none());
        assert!(t.observe(after, now + 700_000, idle()).is_none());
        // Busy once, then idle again long enough: a second report, with
        // its own start.
        assert!(t.observe(after, now + 800_000, Activity::Busy).is_none());
        assert!(t.observe(after, now + 805_000, idle()).is_none());
        assert!(t.observe(after, now + 1_404_999, idle()).is_none());
        let r = t
            .observe(after, now + 1_405_000, idle())
            .expect("second period");
        assert_eq!(r.idle_since_ms, now + 805_000);
        assert!(t.observe(after, now + 2_000_000, idle()).is_none());
    }

    #[test]
    fn zero_idle_after_turns_it_off() {
        let mut t = IdleTracker::default();
        let idle = activity(&gpus(&[Some(0.0)]), &[], 5.0);
        for now in [0, 1, 10_000_000] {
            assert!(t.observe(Duration::ZERO, now, idle.clone()).is_none());
        }
    }
}
