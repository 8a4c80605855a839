//! The health sampling loop (host figures on the blocking pool, GPUs through
//! `nvidia-smi`) and what counts as a change worth telling every peer now.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::health::{self, GpuStatus, Health};

/// A change worth telling every peer at once rather than at the next round:
/// GPUs appearing or vanishing, CPU use moving by 25 points, memory by a
/// tenth of the total, free disk by a twentieth.
pub(super) fn significant_change(old: &Health, new: &Health) -> bool {
    if old.sampled_ms == 0 {
        return true;
    }
    let gpus = |h: &Health| match &h.gpu {
        GpuStatus::Present(g) => g.len(),
        GpuStatus::Absent(_) => 0,
    };
    // |a - b| >= total / parts
    let moved = |a: u64, b: u64, total: u64, parts: u64| {
        total > 0 && u128::from(a.abs_diff(b)) * u128::from(parts) >= u128::from(total)
    };
    gpus(old) != gpus(new)
        || (old.cpu_use_pct - new.cpu_use_pct).abs() >= 25.0
        || moved(
            old.mem_used_bytes,
            new.mem_used_bytes,
            new.mem_total_bytes,
            10,
        )
        || moved(
            old.disk_free_bytes,
            new.disk_free_bytes,
            new.disk_total_bytes,
            20,
        )
}

/// When GPUs are sampled next: at the next tick, or a minute on when
/// `nvidia-smi` was not found.
fn gpu_recheck_at(gpu: &GpuStatus, now: Instant) -> Instant {
    match gpu {
        GpuStatus::Absent(why) if why.contains("not found") => now + Duration::from_secs(60),
        _ => now,
    }
}

/// Sample health every `every`; GPUs through `nvidia_smi` ("" = off). A
/// missing `nvidia-smi` is looked for again once a minute only.
pub(super) async fn sample_loop(
    data_dir: std::path::PathBuf,
    nvidia_smi: String,
    every: Duration,
    tx: mpsc::Sender<Health>,
) {
    let mut sampler = Some(health::Sampler::new(&data_dir));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gpu = GpuStatus::default();
    let mut gpu_next = Instant::now();
    loop {
        tick.tick().await;
        let Some(s) = sampler.take() else { return };
        let Ok((s, mut h)) = tokio::task::spawn_blocking(move || {
            let mut s = s;
            let h = s.sample();
            (s, h)
        })
        .await
        else {
            return;
        };
        sampler = Some(s);
        if nvidia_smi.is_empty() {
            gpu = GpuStatus::Absent("GPU sampling is off (nvidia_smi = \"\")".into());
        } else if Instant::now() >= gpu_next {
            gpu = health::sample_gpus(&nvidia_smi, Duration::from_secs(5)).await;
            gpu_next = gpu_recheck_at(&gpu, Instant::now());
        }
        h.gpu = gpu.clone();
        if tx.send(h).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_health_changes() {
        let base = Health {
            sampled_ms: 1,
            cpu_use_pct: 10.0,
            mem_total_bytes: 1000,
            mem_used_bytes: 100,
            disk_total_bytes: 1000,
            disk_free_bytes: 500,
            ..Default::default()
        };
        assert!(!significant_change(&base, &base.clone()));
        let busy = Health {
            cpu_use_pct: 40.0,
            ..base.clone()
        };
        assert!(significant_change(&base, &busy));
        let mem = Health {
            mem_used_bytes: 200,
            ..base.clone()
        };
        assert!(significant_change(&base, &mem));
        let mem_small = Health {
            mem_used_bytes: 150,
            ..base.clone()
        };
        assert!(!significant_change(&base, &mem_small));
        let disk = Health {
            disk_free_bytes: 440,
            ..base.clone()
        };
        assert!(significant_change(&base, &disk));
        let gpu = Health {
            gpu: GpuStatus::Present(vec![]),
            ..base.clone()
        };
        assert!(!significant_change(&base, &gpu), "0 GPUs either way");
        assert!(
            significant_change(&Health::default(), &base),
            "first sample"
        );
    }

    #[test]
    fn a_missing_nvidia_smi_is_looked_for_once_a_minute() {
        let now = Instant::now();
        let missing = GpuStatus::Absent("nvidia-smi not found".into());
        assert_eq!(gpu_recheck_at(&missing, now), now + Duration::from_secs(60));
        let failed = GpuStatus::Absent("nvidia-smi exited with 9".into());
        assert_eq!(gpu_recheck_at(&failed, now), now);
        assert_eq!(gpu_recheck_at(&GpuStatus::Present(vec![]), now), now);
    }
}
