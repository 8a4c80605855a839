//! The incarnation: this start's number, persisted in the data directory,
//! above every earlier one so a restarted agent outranks its old self.

use std::path::Path;

use crate::event;
use crate::keys::write_private;

/// This start's incarnation: above the last one written and at least the
/// wall clock in ms, so a restarted agent always outranks its old self.
pub fn next_incarnation(data_dir: &Path) -> std::io::Result<u64> {
    let path = data_dir.join("incarnation");
    let last = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let inc = last.saturating_add(1).max(event::now_ms());
    write_private(&path, inc.to_string().as_bytes())?;
    Ok(inc)
}

pub(super) fn save_incarnation(data_dir: &Path, inc: u64) {
    if let Err(e) = write_private(&data_dir.join("incarnation"), inc.to_string().as_bytes()) {
        tracing::error!(error = %e, dir = %data_dir.display(), "cannot record the incarnation");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incarnation_grows_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = next_incarnation(dir.path()).expect("first");
        let b = next_incarnation(dir.path()).expect("second");
        assert!(b > a);
        // A clock behind the recorded value still yields a higher one.
        std::fs::write(dir.path().join("incarnation"), format!("{}", u64::MAX / 2)).expect("w");
        assert_eq!(
            next_incarnation(dir.path()).expect("third"),
            u64::MAX / 2 + 1
        );
    }
}
