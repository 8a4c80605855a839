//! Progress of a long transfer (`blob add`, `blob get`) on stderr: bytes,
//! rate and ETA, drawn with `indicatif` and only on a terminal. On a pipe
//! (a job's log, journald) or with `--json` nothing is drawn: a redrawn line
//! is noise in a file.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar that exists only when someone watches.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar for `what`, shown when stderr is a terminal and the output is
    /// not JSON; otherwise a no-op.
    pub fn bytes(json_out: bool, what: &str) -> Progress {
        if json_out || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
            .with_style(style)
            .with_message(what.to_string());
        Progress { bar: Some(bar) }
    }

    /// Bytes done of `total` (a total of 0: not known yet).
    pub fn set(&self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            if b.length() != Some(total) {
                b.set_length(total);
            }
            b.set_position(done);
        }
    }

    /// A callback for [`riftmesh::api::Client`]'s `*_with` transfers:
    /// `(done, total)` in bytes.
    pub fn reporter(&self) -> impl Fn(u64, u64) + Send + Sync + 'static {
        let bar = self.bar.clone();
        move |done, total| {
            if let Some(b) = &bar {
                if b.length() != Some(total) {
                    b.set_length(total);
                }
                b.set_position(done);
            }
        }
    }

    pub fn message(&self, what: String) {
        if let Some(b) = &self.bar {
            b.set_message(what);
        }
    }

    /// Start a new phase (from the fetch to the download): the position,
    /// rate and ETA start over.
    pub fn restart(&self, what: String) {
        if let Some(b) = &self.bar {
            b.reset();
            b.set_message(what);
        }
    }

    /// Take the bar off the screen (the command's own lines follow).
    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done();
    }
}
