//! Host health sampling: CPU, load, memory, disk of the data directory, uptime (sysinfo), GPUs (nvidia-smi).

use crate::util::now_ms;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sysinfo::{DiskRefreshKind, Disks, MemoryRefreshKind, System};

/// One sample of this host's health.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Unix ms of the sample.
    pub sampled_ms: u64,
    pub cpu_count: u32,
    /// Whole-host CPU use, 0..100, since the previous sample.
    pub cpu_use_pct: f32,
    pub load1: f32,
    pub load5: f32,
    pub load15: f32,
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    /// Of the filesystem holding the data directory.
    pub disk_total_bytes: u64,
    /// Available to unprivileged users.
    pub disk_free_bytes: u64,
    /// Host uptime.
    pub uptime_secs: u64,
    pub gpu: GpuStatus,
}

/// GPUs as nvidia-smi reports them, or why there are none.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuStatus {
    /// Why: "nvidia-smi not found", "nvidia-smi failed: ...", "nvidia-smi timed out after 5s", "no GPU reported".
    Absent(String),
    Present(Vec<Gpu>),
}

impl Default for GpuStatus {
    fn default() -> Self {
        GpuStatus::Absent("not sampled yet".into())
    }
}

/// One GPU; `None` where nvidia-smi says "[N/A]" or similar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub util_pct: Option<f32>,
    pub mem_used_mib: Option<u64>,
    pub mem_total_mib: Option<u64>,
    pub temp_c: Option<f32>,
}

/// Keeps sysinfo state between samples (CPU use is a difference of two reads).
pub struct Sampler {
    sys: System,
    disks: Disks,
    data_dir: PathBuf,
    cpu_primed_at: Instant,
    cpu_ready: bool,
}

impl Sampler {
    /// Takes the CPU baseline; creates nothing on disk.
    pub fn new(data_dir: &Path) -> Self {
        let mut sys = System::new();
        sys.refresh_cpu_usage();
        Self {
            sys,
            disks: Disks::new(),
            data_dir: data_dir.to_path_buf(),
            cpu_primed_at: Instant::now(),
            cpu_ready: false,
        }
    }

    /// Blocking (the caller runs it in spawn_blocking). Never panics; fields it cannot read stay 0.
    /// Leaves `gpu` at its default: GPUs are sampled separately.
    pub fn sample(&mut self) -> Health {
        // sysinfo skips a CPU refresh closer than this to the last one; until one
        // happens after the baseline, its figure is the average since boot.
        let cpu_due =
            self.cpu_ready || self.cpu_primed_at.elapsed() >= sysinfo::MINIMUM_CPU_UPDATE_INTERVAL;
        self.sys.refresh_cpu_usage();
        let cpu_use_pct = if cpu_due {
            self.cpu_ready = true;
            clamp_pct(self.sys.global_cpu_usage())
        } else {
            0.0
        };

        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let mem_total_bytes = self.sys.total_memory();
        let mem_used_bytes = self.sys.used_memory().min(mem_total_bytes);

        // sysinfo's Linux parser unwraps /proc/loadavg; keep our no-panic promise.
        let load = std::panic::catch_unwind(System::load_average).unwrap_or_default();

        let (disk_total_bytes, disk_free_bytes) = self.data_disk();

        Health {
            sampled_ms: now_ms(),
            cpu_count: u32::try_from(self.sys.cpus().len()).unwrap_or(u32::MAX),
            cpu_use_pct,
            load1: finite_f32(load.one),
            load5: finite_f32(load.five),
            load15: finite_f32(load.fifteen),
            mem_total_bytes,
            mem_used_bytes,
            disk_total_bytes,
            disk_free_bytes,
            uptime_secs: System::uptime(),
            gpu: GpuStatus::default(),
        }
    }

    /// (total, free) of the mount holding the data directory, or (0, 0).
    fn data_disk(&mut self) -> (u64, u64) {
        let Some(dir) = existing_canonical(&self.data_dir) else {
            return (0, 0);
        };
        // Re-list mounts (reads /proc/mounts, no statvfs), then statvfs only the one we need.
        self.disks
            .refresh_specifics(true, DiskRefreshKind::nothing());
        let Some(i) = pick_mount(&dir, self.disks.list().iter().map(|d| d.mount_point())) else {
            return (0, 0);
        };
        let Some(disk) = self.disks.list_mut().get_mut(i) else {
            return (0, 0);
        };
        disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
        let total = disk.total_space();
        (total, disk.available_space().min(total))
    }
}

/// Free bytes on the filesystem holding `dir` (None if unknown). Reads the
/// mount table and one statvfs: call it off the async threads.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let dir = existing_canonical(dir)?;
    let mut disks = Disks::new();
    disks.refresh_specifics(true, DiskRefreshKind::nothing());
    let i = pick_mount(&dir, disks.list().iter().map(|d| d.mount_point()))?;
    let disk = disks.list_mut().get_mut(i)?;
    disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
    Some(disk.available_space())
}

/// The data directory, or its nearest existing ancestor, canonicalized.
fn existing_canonical(dir: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    abs.ancestors().find_map(|p| p.canonicalize().ok())
}

/// Index of the mount point that is the longest (component-wise) prefix of `dir`;
/// on a tie the last one, as the later mount hides the earlier.
fn pick_mount<'a>(dir: &Path, mounts: impl IntoIterator<Item = &'a Path>) -> Option<usize> {
    mounts
        .into_iter()
        .enumerate()
        .filter(|(_, m)| dir.starts_with(m))
        .max_by_key(|(_, m)| m.components().count())
        .map(|(i, _)| i)
}

fn clamp_pct(v: f32) -> f32 {
    if v.is_finite() {
        v.clamp(0.0, 100.0)
    } else {
        0.0
    }
}

fn finite_f32(v: f64) -> f32 {
    if v.is_finite() {
        v as f32
    } else {
        0.0
    }
}

const NVIDIA_SMI_ARGS: [&str; 2] = [
    "--query-gpu=index,name,utilization.gpu,memory.used,memory.total,temperature.gpu",
    "--format=csv,noheader,nounits",
];

/// Runs `<cmd> --query-gpu=index,name,utilization.gpu,memory.used,memory.total,temperature.gpu --format=csv,noheader,nounits`
/// under `timeout`. Never fails: a missing binary, a non-zero exit, unparsable output or a timeout give `Absent(reason)`.
pub async fn sample_gpus(cmd: &str, timeout: Duration) -> GpuStatus {
    let mut command = tokio::process::Command::new(cmd);
    command
        .args(NVIDIA_SMI_ARGS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return GpuStatus::Absent(format!("{cmd} not found"));
        }
        Err(e) => return GpuStatus::Absent(format!("{cmd} failed: {e}")),
    };
    // On timeout the future, and with it the child, is dropped: kill_on_drop kills it.
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => return GpuStatus::Absent(format!("{cmd} timed out after {timeout:?}")),
        Ok(Err(e)) => return GpuStatus::Absent(format!("{cmd} failed: {e}")),
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let why = match first_line(&output.stderr).or_else(|| first_line(&output.stdout)) {
            Some(line) => format!("{cmd} failed: {}: {line}", output.status),
            None => format!("{cmd} failed: {}", output.status),
        };
        return GpuStatus::Absent(why);
    }
    match parse_nvidia_smi(&String::from_utf8_lossy(&output.stdout)) {
        Ok(gpus) if gpus.is_empty() => GpuStatus::Absent("no GPU reported".into()),
        Ok(gpus) => GpuStatus::Present(gpus),
        Err(e) => GpuStatus::Absent(format!("{cmd} output unparsable: {e}")),
    }
}

/// First non-blank line of a command's output, cut to 200 characters.
fn first_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(200).collect())
}

/// Parses nvidia-smi's `csv,noheader,nounits` output. "[N/A]", "[Not Supported]" or empty fields
/// become `None`; a line with too few fields or a bad index is an error naming the line.
pub fn parse_nvidia_smi(csv: &str) -> Result<Vec<Gpu>, String> {
    let mut gpus = Vec::new();
    for (i, raw) in csv.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let too_few = || {
            format!(
                "line {}: expected 6 comma-separated fields, got {}: {line:?}",
                i + 1,
                line.split(',').count()
            )
        };
        let (index, rest) = line.split_once(',').ok_or_else(too_few)?;
        // The name may itself hold commas: take the four numbers from the end.
        let mut back = rest.rsplitn(5, ',').map(str::trim);
        let (Some(temp), Some(mem_total), Some(mem_used), Some(util), Some(name)) = (
            back.next(),
            back.next(),
            back.next(),
            back.next(),
            back.next(),
        ) else {
            return Err(too_few());
        };
        let index = index
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("line {}: bad GPU index {:?}: {line:?}", i + 1, index.trim()))?;
        gpus.push(Gpu {
            index,
            name: name.to_string(),
            util_pct: number(util).map(|v| v as f32),
            mem_used_mib: number(mem_used).and_then(to_u64),
            mem_total_mib: number(mem_total).and_then(to_u64),
            temp_c: number(temp).map(|v| v as f32),
        });
    }
    Ok(gpus)
}

/// A finite number at the start of a field ("37", "37 %"); anything else ("[N/A]", "") is `None`.
fn number(field: &str) -> Option<f64> {
    let v: f64 = field.split_whitespace().next()?.parse().ok()?;
    v.is_finite().then_some(v)
}

fn to_u64(v: f64) -> Option<u64> {
    (v >= 0.0).then(|| v.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const TWO_GPUS: &str = "0, NVIDIA A100-SXM4-80GB, 37, 1024, 81920, 41\n\
                            1, NVIDIA A100-SXM4-80GB, [N/A], [Not Supported], 81920, \n";

    fn a100(index: u32) -> Gpu {
        Gpu {
            index,
            name: "NVIDIA A100-SXM4-80GB".into(),
            util_pct: Some(37.0),
            mem_used_mib: Some(1024),
            mem_total_mib: Some(81920),
            temp_c: Some(41.0),
        }
    }

    #[test]
    fn parses_two_gpus_with_missing_fields() {
        let gpus = parse_nvidia_smi(TWO_GPUS).expect("parses");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0], a100(0));
        assert_eq!(
            gpus[1],
            Gpu {
                index: 1,
                name: "NVIDIA A100-SXM4-80GB".into(),
                util_pct: None,
                mem_used_mib: None,
                mem_total_mib: Some(81920),
                temp_c: None,
            }
        );
    }

    #[test]
    fn parse_tolerates_crlf_units_and_commas_in_name() {
        let gpus = parse_nvidia_smi("3, Odd, GPU, 5 %, 10 MiB, 20 MiB, 30\r\n").expect("parses");
        assert_eq!(
            gpus,
            vec![Gpu {
                index: 3,
                name: "Odd, GPU".into(),
                util_pct: Some(5.0),
                mem_used_mib: Some(10),
                mem_total_mib: Some(20),
                temp_c: Some(30.0),
            }]
        );
    }

    #[test]
    fn parse_rejects_garbage_naming_the_line() {
        let e = parse_nvidia_smi("garbage").expect_err("garbage");
        assert!(e.contains("line 1"), "{e}");
        let e = parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate")
            .expect_err("error text");
        assert!(e.contains("line 1"), "{e}");
        let e = parse_nvidia_smi("0, A, 1, 2, 3, 4\n1, B, 1, 2\n").expect_err("short line");
        assert!(e.contains("line 2") && e.contains("got 4"), "{e}");
        let e = parse_nvidia_smi("x, A, 1, 2, 3, 4").expect_err("bad index");
        assert!(e.contains("line 1") && e.contains("bad GPU index"), "{e}");
        let e = parse_nvidia_smi("-1, A, 1, 2, 3, 4").expect_err("negative index");
        assert!(e.contains("bad GPU index"), "{e}");
    }

    #[test]
    fn parse_empty_output_is_no_gpus() {
        assert_eq!(parse_nvidia_smi(""), Ok(vec![]));
        assert_eq!(parse_nvidia_smi("\n  \n"), Ok(vec![]));
    }

    #[test]
    fn pick_mount_takes_longest_component_prefix() {
        let mounts = [
            Path::new("/"),
            Path::new("/data"),
            Path::new("/data/fast"),
            Path::new("/database"),
            Path::new("/data"),
        ];
        let pick = |d: &str| pick_mount(Path::new(d), mounts.iter().copied());
        assert_eq!(pick("/data/fast/node"), Some(2));
        assert_eq!(pick("/database/x"), Some(3));
        assert_eq!(pick("/data/slow"), Some(4), "the later of two same mounts");
        assert_eq!(pick("/var/lib"), Some(0));
        assert_eq!(pick_mount(Path::new("/x"), [Path::new("/y")]), None);
    }

    #[test]
    fn existing_canonical_walks_up_without_creating() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = tmp.path().join("not").join("yet");
        let got = existing_canonical(&missing).expect("an ancestor exists");
        assert_eq!(got, tmp.path().canonicalize().expect("canonical"));
        assert!(!missing.exists());
    }

    #[test]
    fn samples_this_host() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let mut sampler = Sampler::new(&data_dir);
        let first = sampler.sample();
        std::thread::sleep(Duration::from_millis(250));
        let h = sampler.sample();
        for h in [&first, &h] {
            assert!(h.sampled_ms > 1_600_000_000_000, "{h:?}");
            assert!(h.cpu_count >= 1, "{h:?}");
            assert!((0.0..=100.0).contains(&h.cpu_use_pct), "{h:?}");
            assert!(h.load1 >= 0.0 && h.load5 >= 0.0 && h.load15 >= 0.0, "{h:?}");
            assert!(h.mem_total_bytes > 0, "{h:?}");
            assert!(h.mem_used_bytes <= h.mem_total_bytes, "{h:?}");
            assert!(h.disk_total_bytes > 0, "{h:?}");
            assert!(h.disk_free_bytes <= h.disk_total_bytes, "{h:?}");
            assert!(h.uptime_secs > 0, "{h:?}");
            assert_eq!(h.gpu, GpuStatus::default());
        }
        assert!(h.sampled_ms >= first.sampled_ms);
        assert!(!data_dir.exists(), "sampling must create nothing");
    }

    #[test]
    fn sampler_is_send() {
        fn send<T: Send + 'static>() {}
        send::<Sampler>();
    }

    /// Writes `script` as an executable in a fresh temp dir and samples it.
    async fn fake_smi(script: &str, timeout: Duration) -> GpuStatus {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fake-nvidia-smi");
        std::fs::write(&path, script).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let cmd = path.to_str().expect("utf-8 path");
        // Another test thread forking while our write fd was open can make exec fail
        // with ETXTBSY for a moment; that is a test artefact, so retry.
        for _ in 0..50 {
            let status = sample_gpus(cmd, timeout).await;
            match &status {
                GpuStatus::Absent(why) if why.contains("Text file busy") => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return status,
            }
        }
        panic!("{cmd} stayed busy");
    }

    fn absent(status: &GpuStatus) -> &str {
        match status {
            GpuStatus::Absent(why) => why,
            GpuStatus::Present(gpus) => panic!("expected Absent, got {gpus:?}"),
        }
    }

    #[tokio::test]
    async fn gpus_missing_binary() {
        let s = sample_gpus("riftmesh-no-such-nvidia-smi", Duration::from_secs(5)).await;
        assert_eq!(absent(&s), "riftmesh-no-such-nvidia-smi not found");
        let s = sample_gpus("/nonexistent/nvidia-smi", Duration::from_secs(5)).await;
        assert!(absent(&s).contains("not found"), "{s:?}");
    }

    #[tokio::test]
    async fn gpus_failing_command() {
        let s = sample_gpus("false", Duration::from_secs(5)).await;
        assert!(absent(&s).starts_with("false failed"), "{s:?}");
        let s = fake_smi(
            "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n",
            Duration::from_secs(5),
        )
        .await;
        let why = absent(&s);
        assert!(
            why.contains("failed") && why.contains("exit status: 9"),
            "{why}"
        );
        assert!(why.contains("could not communicate"), "{why}");
    }

    #[tokio::test]
    async fn gpus_from_fake_nvidia_smi() {
        let script = format!("#!/bin/sh\nprintf '%s' '{TWO_GPUS}'\n");
        let s = fake_smi(&script, Duration::from_secs(5)).await;
        match s {
            GpuStatus::Present(gpus) => {
                assert_eq!(gpus.len(), 2);
                assert_eq!(gpus[0], a100(0));
                assert_eq!(gpus[1].index, 1);
            }
            other => panic!("expected two GPUs, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn gpus_passes_the_query_arguments() {
        let script = "#!/bin/sh\n\
            [ \"$1\" = '--query-gpu=index,name,utilization.gpu,memory.used,memory.total,temperature.gpu' ] || exit 3\n\
            [ \"$2\" = '--format=csv,noheader,nounits' ] || exit 4\n\
            [ $# -eq 2 ] || exit 5\n\
            echo '0, T4, 1, 2, 3, 4'\n";
        let s = fake_smi(script, Duration::from_secs(5)).await;
        assert!(matches!(&s, GpuStatus::Present(g) if g.len() == 1), "{s:?}");
    }

    #[tokio::test]
    async fn gpus_empty_or_garbage_output() {
        let s = fake_smi("#!/bin/sh\nexit 0\n", Duration::from_secs(5)).await;
        assert_eq!(absent(&s), "no GPU reported");
        let s = fake_smi("#!/bin/sh\necho hello\n", Duration::from_secs(5)).await;
        assert!(absent(&s).contains("unparsable"), "{s:?}");
    }

    #[tokio::test]
    async fn gpus_timeout_kills_the_command() {
        let started = Instant::now();
        let s = fake_smi("#!/bin/sh\nexec sleep 30\n", Duration::from_millis(300)).await;
        assert!(absent(&s).contains("timed out after 300ms"), "{s:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    fn health_with_gpus() -> Health {
        Health {
            sampled_ms: 1_700_000_000_123,
            cpu_count: 96,
            cpu_use_pct: 12.5,
            load1: 1.25,
            load5: 0.5,
            load15: 0.1,
            mem_total_bytes: 1 << 40,
            mem_used_bytes: 1 << 38,
            disk_total_bytes: 4 << 40,
            disk_free_bytes: 3 << 40,
            uptime_secs: 86_400,
            gpu: GpuStatus::Present(parse_nvidia_smi(TWO_GPUS).expect("parses")),
        }
    }

    #[test]
    fn bincode_round_trip() {
        let cfg = bincode::config::standard();
        for h in [
            health_with_gpus(),
            Health::default(),
            Health {
                gpu: GpuStatus::Absent("nvidia-smi not found".into()),
                ..health_with_gpus()
            },
        ] {
            let bytes = bincode::serde::encode_to_vec(&h, cfg).expect("encode");
            let (back, used): (Health, usize) =
                bincode::serde::decode_from_slice(&bytes, cfg).expect("decode");
            assert_eq!(used, bytes.len());
            assert_eq!(back, h);
        }
    }

    #[test]
    fn json_form() {
        let h = health_with_gpus();
        let v = serde_json::to_value(&h).expect("to json");
        assert_eq!(v["cpu_count"], 96);
        assert_eq!(v["gpu"]["present"][0]["name"], "NVIDIA A100-SXM4-80GB");
        assert_eq!(v["gpu"]["present"][0]["mem_total_mib"], 81920);
        assert!(v["gpu"]["present"][1]["util_pct"].is_null());
        let back: Health = serde_json::from_value(v).expect("from json");
        assert_eq!(back, h);

        let absent = serde_json::to_string(&GpuStatus::default()).expect("to json");
        assert_eq!(absent, r#"{"absent":"not sampled yet"}"#);
    }
}
