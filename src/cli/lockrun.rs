//! `lock run` and `run --if-leader`: a command run while this agent holds
//! a lock or leads, stopped (its whole process group) when that ends.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use riftmesh::api::{self, Client};

use super::exit::{self};
use super::wait::WaitNote;

/// What a `--wait` for lock `name` waits for, from the refusal (409: held
/// by someone; 503: no leader to grant it).
pub fn waiting_for_lock(name: &str, status: u16, message: &str) -> String {
    let prefix = format!("lock {name} is ");
    match status {
        409 => format!(
            "waiting for lock {name} ({})",
            message.strip_prefix(&prefix).unwrap_or(message)
        ),
        _ => format!("waiting for lock {name} (no leader can grant it now: {message})"),
    }
}

/// Stop a child's process group: SIGTERM, then SIGKILL after 10 s.
async fn stop_child(child: &mut tokio::process::Child) {
    signal_child(child, libc::SIGTERM);
    if tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        kill_child(child).await;
    }
}

/// Signal the child's whole process group (it leads one: `spawn_cmd`), so
/// a shell's or a launcher's own children stop with it.
fn signal_child(child: &tokio::process::Child, sig: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: killpg with a process group id we created and a signal.
        unsafe { libc::killpg(pid as libc::pid_t, sig) };
    }
}

/// SIGKILL the child's process group and reap the child.
async fn kill_child(child: &mut tokio::process::Child) {
    signal_child(child, libc::SIGKILL);
    let _ = child.wait().await;
}

fn spawn_cmd(cmd: &[String], env: &[(&str, String)]) -> anyhow::Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new(&cmd[0]);
    c.args(&cmd[1..]);
    // Its own process group: stopping it stops what it started.
    c.process_group(0);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn()
        .with_context(|| format!("cannot start {:?}", cmd[0]))
}

/// When the holder of a lease must have stopped its command, measured on
/// this host's monotonic clock from *before* the request that got or
/// renewed the lease was sent (the leader's lease starts no earlier than
/// that): SIGTERM at `term`, SIGKILL at `kill`, both before `sent + ttl`
/// (proto-notes/leader.md, "lock run").
#[derive(Clone, Copy, Debug, PartialEq)]
struct HolderDeadline {
    term: tokio::time::Instant,
    kill: tokio::time::Instant,
}

impl HolderDeadline {
    /// Clock-rate drift tolerated between this host and the leader, as a
    /// fraction of the TTL, plus a fixed margin for the kill itself.
    const DRIFT: f64 = 0.05;
    const KILL_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

    /// The grace between SIGTERM and SIGKILL: a quarter of the TTL, at
    /// least 100 ms, at most 10 s.
    fn grace(ttl: f64) -> std::time::Duration {
        std::time::Duration::from_secs_f64((ttl * 0.25).clamp(0.1, 10.0))
    }

    fn new(sent: tokio::time::Instant, ttl: f64) -> Self {
        let usable = std::time::Duration::from_secs_f64(ttl * (1.0 - Self::DRIFT));
        let kill = (sent + usable)
            .checked_sub(Self::KILL_MARGIN)
            .unwrap_or(sent);
        let term = kill.checked_sub(Self::grace(ttl)).unwrap_or(sent);
        HolderDeadline { term, kill }
    }
}

pub async fn lock_run(
    client: &Client,
    name: &str,
    ttl: f64,
    wait: bool,
    cmd: &[String],
) -> anyhow::Result<i32> {
    use tokio::time::{sleep_until, Instant};
    let path = format!("/v1/locks/{name}/acquire");
    let mut note = WaitNote::new();
    let (grant, sent) = loop {
        let sent = Instant::now();
        match client.post(&path, &json!({ "ttl_secs": ttl })).await {
            Ok(v) => break (v, sent),
            Err(api::ClientError::Refused {
                status: status @ (409 | 503),
                message,
            }) if wait => note.tick(|| waiting_for_lock(name, status, &message)),
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(std::time::Duration::from_secs_f64(
            (ttl / 6.0).clamp(0.2, 2.0),
        ))
        .await;
    };
    let token = grant["token"].as_u64().context("no token in the grant")?;
    let mut deadline = HolderDeadline::new(sent, ttl);
    if Instant::now() >= deadline.term {
        let _ = client
            .post(
                &format!("/v1/locks/{name}/release"),
                &json!({ "token": token }),
            )
            .await;
        bail!("lock {name} was granted too late to use (the grant took longer than its TTL allows); try a longer --ttl");
    }
    eprintln!("riftmesh: holding lock {name} with token {token}");
    let mut child = spawn_cmd(cmd, &[("RIFTMESH_LOCK_TOKEN", token.to_string())])?;
    let mut renew = tokio::time::interval(std::time::Duration::from_secs_f64(ttl / 3.0));
    renew.tick().await;
    let stop = stop_signal();
    tokio::pin!(stop);
    // One renew in flight at a time; it never holds up the deadlines (a
    // renew on the minority side of a partition blocks for seconds).
    type Renewal<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = (Instant, Result<Value, api::ClientError>)> + 'a>,
    >;
    let mut renewing: Option<Renewal> = None;
    let mut termed = false;
    let renew_path = format!("/v1/locks/{name}/renew");
    let code = loop {
        tokio::select! {
            st = child.wait() => {
                let st = st?;
                // Killed by a signal: 128 + the signal, as shells report it.
                break st.code().unwrap_or_else(|| {
                    128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)
                });
            }
            _ = &mut stop => {
                // Stopped by the user: SIGTERM, and SIGKILL no later than
                // the lease allows (renewals stop here).
                signal_child(&child, libc::SIGTERM);
                let by = deadline.kill.min(Instant::now() + std::time::Duration::from_secs(10));
                if tokio::time::timeout_at(by, child.wait()).await.is_err() {
                    kill_child(&mut child).await;
                }
                break 143;
            }
            _ = sleep_until(deadline.term), if !termed => {
                eprintln!("riftmesh: lock {name} was not renewed in time; stopping the command (SIGTERM)");
                signal_child(&child, libc::SIGTERM);
                termed = true;
            }
            _ = sleep_until(deadline.kill) => {
                eprintln!("riftmesh: lock {name} expires: killing the command (SIGKILL)");
                kill_child(&mut child).await;
                return Ok(exit::LOCK_LOST);
            }
            _ = renew.tick(), if renewing.is_none() && !termed => {
                let (c, p) = (client, renew_path.clone());
                renewing = Some(Box::pin(async move {
                    let sent = Instant::now();
                    (sent, c.post(&p, &json!({ "token": token })).await)
                }));
            }
            (sent, r) = async { renewing.as_mut().expect("guarded").await }, if renewing.is_some() => {
                renewing = None;
                match r {
                    Ok(_) if !termed => deadline = HolderDeadline::new(sent, ttl),
                    Ok(_) => {}
                    Err(e @ api::ClientError::Refused { status: 409, .. }) => {
                        eprintln!("riftmesh: lost lock {name} ({e}); stopping the command");
                        if !termed {
                            signal_child(&child, libc::SIGTERM);
                            termed = true;
                        }
                        // The lock is known gone: SIGKILL after a short
                        // grace, not at the lease's deadline.
                        let soon = Instant::now() + HolderDeadline::grace(ttl).min(std::time::Duration::from_secs(1));
                        deadline.kill = deadline.kill.min(soon);
                    }
                    Err(e) => eprintln!("riftmesh: cannot renew lock {name} yet ({e}); retrying"),
                }
            }
        }
    };
    if termed {
        return Ok(exit::LOCK_LOST);
    }
    let _ = client
        .post(
            &format!("/v1/locks/{name}/release"),
            &json!({ "token": token }),
        )
        .await;
    Ok(code)
}

/// SIGTERM or SIGINT.
pub async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub async fn run_if_leader(client: &Client, cmd: &[String]) -> anyhow::Result<i32> {
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(250));
    let mut child: Option<tokio::process::Child> = None;
    let mut note = WaitNote::new();
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            _ = &mut stop => {
                if let Some(c) = &mut child {
                    stop_child(c).await;
                }
                return Ok(143);
            }
        }
        let lead = client.get("/v1/leader").await;
        let is_leader = matches!(&lead, Ok(v) if v["is_self"] == true);
        match (&mut child, is_leader) {
            (None, true) => {
                let term = lead
                    .as_ref()
                    .map(|v| v["term"].to_string())
                    .unwrap_or_default();
                eprintln!("riftmesh: this agent leads (term {term}); starting the command");
                child = Some(spawn_cmd(cmd, &[("RIFTMESH_LEADER_TERM", term)])?);
            }
            (Some(c), false) => {
                eprintln!("riftmesh: leadership lost; stopping the command");
                stop_child(c).await;
                child = None;
                note.reset();
            }
            (Some(c), true) => {
                if let Some(st) = c.try_wait()? {
                    return Ok(st.code().unwrap_or(1));
                }
            }
            (None, false) => note.tick(|| waiting_to_lead(&lead)),
        }
    }
}

/// What `run --if-leader` waits for, from the agent's leader view.
fn waiting_to_lead(lead: &Result<Value, api::ClientError>) -> String {
    let v = match lead {
        Ok(v) => v,
        Err(e) => return format!("waiting to become leader (the agent does not answer: {e})"),
    };
    let leader = match v["leader"].as_str() {
        Some(l) => format!("leader is {l}, term {}", v["term"]),
        None => "no leader known".to_string(),
    };
    let role = match v["role"].as_str() {
        Some("none") => "; no voters are configured",
        Some("member") => "; this agent is not a voter",
        _ => "",
    };
    format!("waiting to become leader ({leader}{role})")
}

#[cfg(test)]
mod tests {
    use super::HolderDeadline;
    use std::time::Duration;

    #[test]
    fn the_holder_stops_its_command_before_the_lease_can_end() {
        let sent = tokio::time::Instant::now();
        for ttl in [0.5, 2.0, 6.0, 30.0, 600.0] {
            let d = HolderDeadline::new(sent, ttl);
            let lease_end = sent + Duration::from_secs_f64(ttl);
            // SIGKILL before the lease ends, with room for clock-rate drift.
            let slack = lease_end - d.kill;
            assert!(
                slack >= Duration::from_secs_f64(ttl * HolderDeadline::DRIFT),
                "{ttl}"
            );
            // SIGTERM a grace before, and the grace scales with the TTL.
            assert_eq!(
                d.kill - d.term,
                HolderDeadline::grace(ttl).min(d.kill - sent)
            );
            assert!(d.term >= sent);
        }
        assert_eq!(HolderDeadline::grace(2.0), Duration::from_millis(500));
        assert_eq!(HolderDeadline::grace(600.0), Duration::from_secs(10));
    }
}
