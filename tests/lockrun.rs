//! `riftmesh lock run` never overlaps (proto-notes/leader.md, "lock run"):
//! with the holder's agent cut off from the voters, its command is stopped
//! (SIGKILL included, for a command that ignores SIGTERM) before the
//! majority is granted the same lock, and the majority gets it within
//! TTL + election time + a margin. Real agents on loopback; the partition
//! is the agents' own fault injection. The same with one voter's wall clock
//! 10 minutes behind and one 10 minutes ahead (libfaketime): lock lifetimes
//! are measured on monotonic clocks, so the skew changes nothing.
//!
//! `RIFTMESH_LOCKRUN_ROUNDS=N` runs N rounds of each kind instead of CI's
//! few (benches/results/lockrun.txt holds a 10-round run's margins).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{mesh_with, mesh_with_env, now_ms, wait_for, Agent, BIN};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

async fn leader_of(agents: &[&Agent]) -> usize {
    wait_for("every agent to agree on one leader", LONG, || async {
        let mut names = Vec::new();
        for a in agents {
            names.push(
                a.get("/v1/leader").await.ok()?["leader"]
                    .as_str()?
                    .to_string(),
            );
        }
        names.dedup();
        (names.len() == 1)
            .then(|| agents.iter().position(|a| a.name == names[0]))
            .flatten()
    })
    .await
}

async fn block(from: &Agent, peers: Vec<String>, on: bool) {
    from.post("/v1/debug/block", &json!({ "peers": peers, "block": on }))
        .await
        .unwrap();
}

/// Cut `x` off from every other agent, both ways (or heal).
async fn cut(agents: &[&Agent], x: usize, on: bool) {
    let others: Vec<String> = (0..agents.len())
        .filter(|&i| i != x)
        .map(|i| agents[i].peer_id.clone())
        .collect();
    block(agents[x], others, on).await;
    for (i, a) in agents.iter().enumerate() {
        if i != x {
            block(a, vec![agents[x].peer_id.clone()], on).await;
        }
    }
}

/// A command whose work runs in a child of its own (as `sh -c`, torchrun
/// or make would), ignoring SIGTERM, writing the time (ns) every 20 ms.
fn start_lock_run(a: &Agent, lock: &str, ttl: f64, beat: &Path) -> Child {
    let b = beat.display();
    let script = format!(
        "trap '' TERM; (trap '' TERM; while :; do date +%s%N > {b}.t && mv {b}.t {b}; sleep 0.02; done) & wait"
    );
    Command::new(BIN)
        .args(["lock", "run", lock, "--ttl", &format!("{ttl}s")])
        .args(["--api", a.api.trim_start_matches("http://")])
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Whether a process whose command line names `beat` is alive.
fn command_alive(beat: &Path) -> bool {
    let needle = beat.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains(&needle))
}

/// One round; `lead`: the agent that must be the leader (steered there).
async fn round(
    agents: &[&Agent],
    root: &Path,
    ttl: f64,
    n: usize,
    lead: Option<usize>,
) -> (i64, u64) {
    let x = leader_of(agents).await;
    if let Some(want) = lead {
        assert_eq!(
            agents[x].name, agents[want].name,
            "the leader changed after it was steered"
        );
    }
    let lock = format!("job-{n}");
    let beat = root.join(format!("beat-{n}"));
    let mut run = start_lock_run(agents[x], &lock, ttl, &beat);
    wait_for("the command to run", LONG, || async {
        beat.exists().then_some(())
    })
    .await;
    // The holder's agent (the leader) is cut off: its renewals can't commit.
    let cut_ms = now_ms();
    cut(agents, x, true).await;
    let other = agents[(x + 1) % agents.len()];
    // The grant's time by this test's clock: the send time of the request
    // that was granted (a lower bound, so the margin below is too).
    let (_grant, granted_ms): (Value, u64) =
        wait_for("the majority to be granted the lock", LONG, || async {
            let sent = now_ms();
            let (s, v) = other
                .send(
                    reqwest::Method::POST,
                    &format!("/v1/locks/{lock}/acquire"),
                    &json!({ "ttl_secs": ttl }),
                )
                .await
                .ok()?;
            (s == 200).then_some((v, sent))
        })
        .await;
    let st = wait_for("lock run to stop", LONG, || {
        let r = run.try_wait().unwrap();
        async move { r }
    })
    .await;
    assert_eq!(st.code(), Some(3), "lock run reports the lost lock");
    // Every process of the command is gone (its own children included),
    // so the last beat is final.
    wait_for(
        "every process of the command to be gone",
        Duration::from_secs(5),
        || {
            let alive = command_alive(&beat);
            async move { (!alive).then_some(()) }
        },
    )
    .await;
    let last_ns: u64 = std::fs::read_to_string(&beat)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let margin = granted_ms as i64 - (last_ns / 1_000_000) as i64;
    assert!(
        margin > 0,
        "ttl {ttl}: the command ran {} ms after the majority was granted the lock",
        -margin
    );
    cut(agents, x, false).await;
    (margin, granted_ms - cut_ms)
}

fn rounds(ci: usize) -> usize {
    std::env::var("RIFTMESH_LOCKRUN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci)
}

/// Liveness: TTL + the election (350-700 ms, then a commit) + margin.
fn check_wait(ttl: f64, wait: u64) {
    let bound = (ttl * 1000.0) as u64 + 3_000;
    assert!(
        wait <= bound,
        "ttl {ttl}: majority waited {wait} ms (bound {bound})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_holders_command_is_stopped_before_the_lock_is_granted_elsewhere() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("cluster.toml");
    std::fs::write(&cfg, "voters = [\"a0\", \"a1\", \"a2\"]\n").unwrap();
    let cfg = cfg.display().to_string();
    let agents = mesh_with(t.path(), 3, &["--config", &cfg, "--fault-injection"]).await;
    let all: Vec<&Agent> = agents.iter().collect();
    let started = Instant::now();
    let n = rounds(1);
    let ttls = std::iter::repeat_n([2.0, 6.0], n).flatten();
    for (i, ttl) in ttls.enumerate() {
        let (margin, wait) = round(&all, t.path(), ttl, i, None).await;
        eprintln!("lockrun flat ttl={ttl}s margin_ms={margin} wait_ms={wait}");
        check_wait(ttl, wait);
    }
    eprintln!("{} rounds in {:?}", 2 * n, started.elapsed());
}

/// Debian's libfaketime, wherever the multiarch directory is.
fn faketime_lib() -> Option<String> {
    let dirs = std::fs::read_dir("/usr/lib").ok()?;
    dirs.filter_map(Result::ok)
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
}

/// Make `want` the leader: cut whoever leads off until `want` wins an
/// election among the others, healing after each try.
async fn steer(agents: &[&Agent], want: usize) {
    for _ in 0..20 {
        let x = leader_of(agents).await;
        if x == want {
            return;
        }
        cut(agents, x, true).await;
        let others: Vec<&Agent> = (0..agents.len())
            .filter(|&i| i != x)
            .map(|i| agents[i])
            .collect();
        wait_for("a new leader among the others", LONG, || async {
            let v = others[0].get("/v1/leader").await.ok()?;
            let name = v["leader"].as_str()?;
            (name != agents[x].name).then_some(())
        })
        .await;
        cut(agents, x, false).await;
    }
    panic!("{} never became leader in 20 elections", agents[want].name);
}

/// Lock lifetimes don't trust wall clocks: a0 runs 10 minutes behind, a1
/// 10 minutes ahead (libfaketime on the agent processes; the commands and
/// this test keep the true time). Each skewed voter leads and is cut off
/// while its host's `lock run` holds a lock: the command stops before the
/// majority is granted the lock, and the majority gets it within the same
/// bound as with true clocks. Before monotonic leases, the behind leader's
/// side ran its command on after the grant (its grants looked already
/// expired to the others) and the ahead one's grants blocked the majority
/// for the 10 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_lifetimes_do_not_depend_on_the_voters_wall_clocks() {
    let Some(lib) = faketime_lib() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "libfaketime.so.1 is missing (Debian's libfaketime): .ci/run installs it"
        );
        eprintln!("skipped: libfaketime.so.1 missing (apt-get install libfaketime)");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("cluster.toml");
    std::fs::write(&cfg, "voters = [\"a0\", \"a1\", \"a2\"]\n").unwrap();
    let cfg = cfg.display().to_string();
    let skew = |i: usize| -> Vec<(String, String)> {
        let offset = match i {
            0 => "-10m",
            1 => "+10m",
            _ => return Vec::new(),
        };
        vec![
            ("LD_PRELOAD".into(), lib.clone()),
            ("FAKETIME".into(), offset.into()),
            // Wall clocks only: a host's monotonic clock is not what drifts.
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    };
    let agents = mesh_with_env(t.path(), 3, &["--config", &cfg, "--fault-injection"], skew).await;
    let all: Vec<&Agent> = agents.iter().collect();
    // The skew took: events published by a0 and a1 carry their clocks.
    for (i, sign) in [(0usize, -1i64), (1, 1)] {
        let v = all[i].publish("CLOCK_PROBE", json!({})).await.unwrap();
        let id = v["id"].as_str().unwrap().to_string();
        let e = all[i].get(&format!("/v1/events/{id}")).await.unwrap();
        let off = e["ts_ms"].as_i64().unwrap() - now_ms() as i64;
        assert!(
            (off * sign) > 9 * 60_000,
            "{}'s clock is off by {off} ms, not 10 min",
            all[i].name
        );
    }
    let n = rounds(1);
    let mut k = 0;
    for _ in 0..n {
        for (lead, label) in [(0usize, "behind"), (1, "ahead")] {
            for ttl in [2.0, 6.0] {
                steer(&all, lead).await;
                let (margin, wait) = round(&all, t.path(), ttl, 100 + k, Some(lead)).await;
                k += 1;
                eprintln!("lockrun skew={label} ttl={ttl}s margin_ms={margin} wait_ms={wait}");
                check_wait(ttl, wait);
            }
        }
    }
}
