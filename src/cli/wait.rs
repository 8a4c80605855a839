//! "What are we waiting for?": a command that waits (`run --if-leader` on
//! a follower, `lock acquire --wait`, `lock run --wait`) says so on stderr
//! when it starts waiting and then every [`EVERY`], with how long it has
//! waited. Always on stderr (scripts read stdout), with `--json` and on a
//! pipe too: a wait that lasts is worth a line in a job's log, and a line
//! every 30 s does not flood it.

use std::time::{Duration, Instant};

/// How often a wait that lasts is told again.
pub const EVERY: Duration = Duration::from_secs(30);

pub struct WaitNote {
    since: Instant,
    last: Option<Instant>,
    every: Duration,
}

impl Default for WaitNote {
    fn default() -> Self {
        Self::new()
    }
}

impl WaitNote {
    pub fn new() -> Self {
        WaitNote {
            since: Instant::now(),
            last: None,
            every: EVERY,
        }
    }

    /// Say `what` (e.g. "waiting for lock job (held by gpu-07, token 12)")
    /// if nothing was said yet or the last line is [`EVERY`] old; `what` is
    /// only built then.
    pub fn tick(&mut self, what: impl FnOnce() -> String) {
        let now = Instant::now();
        if let Some(line) = self.due(now, what) {
            eprintln!("riftmesh: {line}");
        }
    }

    fn due(&mut self, now: Instant, what: impl FnOnce() -> String) -> Option<String> {
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(format!(
            "{} for {}",
            what(),
            waited(now.duration_since(self.since))
        ))
    }

    /// Start over: the next tick says the (new) wait at once.
    pub fn reset(&mut self) {
        *self = WaitNote::new();
    }
}

/// `0s`, `45s`, `1m30s`, `2h5m`: whole seconds, two units at most.
pub fn waited(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_told_at_once_then_every_thirty_seconds() {
        let mut n = WaitNote::new();
        let t0 = n.since;
        let said = |n: &mut WaitNote, secs: u64| {
            n.due(t0 + Duration::from_secs(secs), || "waiting for x".into())
        };
        assert_eq!(said(&mut n, 0).as_deref(), Some("waiting for x for 0s"));
        assert_eq!(said(&mut n, 10), None);
        assert_eq!(said(&mut n, 29), None);
        assert_eq!(said(&mut n, 30).as_deref(), Some("waiting for x for 30s"));
        assert_eq!(said(&mut n, 59), None);
        assert_eq!(said(&mut n, 90).as_deref(), Some("waiting for x for 1m30s"));
        assert_eq!(waited(Duration::from_secs(7505)), "2h05m");
    }
}
