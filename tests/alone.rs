//! Default-config safety: an agent with no bootstrap address that has found
//! no peer after `alone_warning_after` says so, once, with the fix; an agent
//! with a bootstrap address, or one a peer reached in time, says nothing.
//! (Its log, written to a file, also shows that text logs carry no ANSI
//! colour codes off a terminal.)

mod common;

use std::path::Path;
use std::time::Duration;

use common::{keygen, log_lines, wait_for, Agent};

const LONG: Duration = Duration::from_secs(60);
const NEEDLE: &str = "this agent is a cluster of one";

fn config(root: &Path, name: &str, after: &str) -> Vec<String> {
    let p = root.join(format!("{name}.toml"));
    std::fs::write(&p, format!("alone_warning_after = \"{after}\"\n")).unwrap();
    vec!["--config".into(), p.display().to_string()]
}

/// Wait until the agent has been up at least `secs` (by its own account).
async fn up_for(a: &Agent, secs: u64) {
    wait_for(&format!("{} to be up {secs} s", a.name), LONG, || async {
        let v = a.get("/v1/status").await.ok()?;
        (v["uptime_secs"].as_u64()? >= secs).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_alone_says_so_once_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    keygen(&key);

    let alone = Agent::start_with(
        dir.path(),
        "alone",
        &key,
        &[],
        &config(dir.path(), "alone", "1s"),
    )
    .await;
    let line = wait_for("the warning of an agent alone", LONG, || async {
        log_lines(&alone, &[NEEDLE]).into_iter().next()
    })
    .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("bootstrap = ["), "the fix is named: {line}");
    assert!(line.contains("mDNS is off"), "{line}");
    // stderr is a file here: no ANSI colour codes in it.
    let log = std::fs::read_to_string(alone.dir.join("agent.log")).unwrap();
    assert!(!log.contains('\x1b'), "escape codes in a log file");

    // A peer that dials in before the time: nothing said.
    let reached = Agent::start_with(
        dir.path(),
        "reached",
        &key,
        &[],
        &config(dir.path(), "reached", "4s"),
    )
    .await;
    let dialer = Agent::start_with(
        dir.path(),
        "dialer",
        &key,
        &[reached.p2p_addr().await],
        &config(dir.path(), "dialer", "1s"),
    )
    .await;
    wait_for("reached to have a peer", LONG, || async {
        (reached.connected_peers().await > 0).then_some(())
    })
    .await;

    // Several times the delay later: still one warning, and none from
    // the others (the dialer has a bootstrap address, and `reached` a peer).
    up_for(&alone, 6).await;
    up_for(&reached, 6).await;
    up_for(&dialer, 3).await;
    assert_eq!(log_lines(&alone, &[NEEDLE]).len(), 1);
    assert!(log_lines(&reached, &[NEEDLE]).is_empty());
    assert!(log_lines(&dialer, &[NEEDLE]).is_empty());
}
