//! Files the agent opens because a local request named them: the trust
//! boundary of `POST /v1/blobs {"path": …}` (proto-notes/security.md).
//!
//! The API is a control surface for local processes, not a file server:
//! the agent runs as its own user and can read its keys, its store and
//! `/proc/self`; a request must not borrow those rights. So a named file is
//! read only when
//! - the operator configured roots (`blob_roots`, none by default),
//! - its canonical path (symlinks and `..` resolved) lies under one of them,
//! - that path is not inside the data directory, the swarm key, `/proc`,
//!   `/sys` or `/dev`, and
//! - it is a regular file, checked before opening (a FIFO would block the
//!   open) and again on the open descriptor (the path may have changed in
//!   between), which is opened with `O_NONBLOCK | O_NOFOLLOW`.
//!
//! Everything else sends bytes instead: `POST /v1/blobs/upload`, which the
//! CLI and the Python client use with the caller's own permissions.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a named file is not read. `Forbidden` is a policy answer (403),
/// `Invalid` a request that can never work as given (400).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
}

/// What the agent may read because a request named it.
#[derive(Clone, Debug, Default)]
pub struct FilePolicy {
    /// Canonical directories under which named files may be read.
    pub roots: Vec<PathBuf>,
    /// Canonical paths never read, whatever the roots: the data directory,
    /// the swarm key file, `/proc`, `/sys`, `/dev`.
    pub never: Vec<PathBuf>,
}

impl FilePolicy {
    /// The policy for an agent with these roots (already canonical), this
    /// data directory and this swarm key file.
    pub fn new(roots: Vec<PathBuf>, data_dir: &Path, swarm_key: Option<&Path>) -> Self {
        let mut never: Vec<PathBuf> = ["/proc", "/sys", "/dev"].map(PathBuf::from).into();
        for p in [Some(data_dir), swarm_key].into_iter().flatten() {
            // The canonical form when it exists; the given one as well, so
            // that a path spelled either way is refused.
            if let Ok(c) = std::fs::canonicalize(p) {
                never.push(c);
            }
            never.push(std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
        }
        FilePolicy { roots, never }
    }

    /// Open `requested` for reading if the policy allows it; returns the
    /// open file, its length and the canonical path.
    pub fn open(&self, requested: &str) -> Result<(File, u64, PathBuf), SourceError> {
        let p = Path::new(requested);
        if !p.is_absolute() {
            return Err(SourceError::Invalid(format!(
                "path {requested:?} must be absolute (the agent resolves it, not the caller's directory)"
            )));
        }
        if self.roots.is_empty() {
            return Err(SourceError::Forbidden(format!(
                "the agent reads no file by path: no blob_roots are configured. Send the bytes \
                 instead (`riftmesh blob add FILE` and the Python client do; \
                 POST /v1/blobs/upload), or list a directory in blob_roots ({requested:?} refused)"
            )));
        }
        let canon = std::fs::canonicalize(p)
            .map_err(|e| SourceError::Invalid(format!("cannot resolve {requested:?}: {e}")))?;
        if let Some(n) = self.never.iter().find(|n| canon.starts_with(n)) {
            return Err(SourceError::Forbidden(format!(
                "{requested:?} leads into {}, which the agent never reads for a request",
                n.display()
            )));
        }
        if !self.roots.iter().any(|r| canon.starts_with(r)) {
            return Err(SourceError::Forbidden(format!(
                "{requested:?} leads outside blob_roots {:?}",
                self.roots
            )));
        }
        // Before opening: a FIFO's open blocks until a writer comes.
        let md = std::fs::symlink_metadata(&canon)
            .map_err(|e| SourceError::Invalid(format!("cannot stat {}: {e}", canon.display())))?;
        if !md.file_type().is_file() {
            return Err(SourceError::Invalid(format!(
                "{} is not a regular file ({})",
                canon.display(),
                kind(&md)
            )));
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&canon)
            .map_err(|e| SourceError::Invalid(format!("cannot open {}: {e}", canon.display())))?;
        let fmd = f
            .metadata()
            .map_err(|e| SourceError::Invalid(format!("cannot stat {}: {e}", canon.display())))?;
        if !fmd.file_type().is_file() || (fmd.dev(), fmd.ino()) != (md.dev(), md.ino()) {
            return Err(SourceError::Invalid(format!(
                "{} changed while it was opened; retry",
                canon.display()
            )));
        }
        // The checks above named paths; a directory on the way may have
        // been swapped for a symlink since. What was opened is what the
        // kernel says the descriptor is: its path must pass the same
        // checks, and its filesystem must not be a pseudo one.
        let real = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
            .map_err(|e| SourceError::Invalid(format!("cannot check what was opened: {e}")))?;
        if self.never.iter().any(|n| real.starts_with(n))
            || !self.roots.iter().any(|r| real.starts_with(r))
        {
            return Err(SourceError::Forbidden(format!(
                "{requested:?} changed while it was opened and now leads outside blob_roots"
            )));
        }
        if pseudo_fs(&f) {
            return Err(SourceError::Forbidden(format!(
                "{requested:?} is on a kernel pseudo-filesystem (proc, sysfs, devtmpfs …)"
            )));
        }
        Ok((f, fmd.len(), canon))
    }
}

/// proc, sysfs, devtmpfs, debugfs, securityfs, tracefs, configfs, bpf:
/// never a blob, wherever they are mounted (`/host/proc` in a container).
fn pseudo_fs(f: &File) -> bool {
    const PSEUDO: [i64; 8] = [
        0x9fa0,      // PROC_SUPER_MAGIC
        0x6265_6572, // SYSFS_MAGIC
        0x1cd1,      // DEVPTS_SUPER_MAGIC
        0x6462_6720, // DEBUGFS_MAGIC
        0x7363_6673, // SECURITYFS_MAGIC
        0x7472_6163, // TRACEFS_MAGIC
        0x6265_6570, // CONFIGFS_MAGIC
        0xcafe_4a11, // BPF_FS_MAGIC
    ];
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid open descriptor and a statfs buffer of the right size.
    let r = unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) };
    r == 0 && PSEUDO.contains(&(st.f_type as i64))
}

fn kind(md: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, FilePolicy) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let data = t.path().join("data");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(root.join("ok.bin"), b"hello").unwrap();
        std::fs::write(data.join("swarm.key"), b"secret").unwrap();
        std::fs::write(t.path().join("outside.bin"), b"x").unwrap();
        let pol = FilePolicy::new(vec![std::fs::canonicalize(&root).unwrap()], &data, None);
        (t, pol)
    }

    fn forbidden(r: Result<(File, u64, PathBuf), SourceError>) -> bool {
        matches!(r, Err(SourceError::Forbidden(_)))
    }

    #[test]
    fn a_file_under_a_root_is_read_and_everything_else_is_refused() {
        let (t, pol) = setup();
        let root = t.path().join("root");
        let (_, len, _) = pol.open(root.join("ok.bin").to_str().unwrap()).unwrap();
        assert_eq!(len, 5);
        // Outside, through `..`, through a symlink, the data dir, /proc.
        let s = |p: PathBuf| p.display().to_string();
        assert!(forbidden(pol.open(&s(t.path().join("outside.bin")))));
        assert!(forbidden(pol.open(&s(root.join("../outside.bin")))));
        assert!(forbidden(pol.open(&s(root.join("../data/swarm.key")))));
        std::os::unix::fs::symlink(t.path().join("data/swarm.key"), root.join("link")).unwrap();
        assert!(forbidden(pol.open(&s(root.join("link")))));
        assert!(forbidden(pol.open("/proc/self/environ")));
        // Relative: invalid; no roots: forbidden.
        assert!(matches!(pol.open("ok.bin"), Err(SourceError::Invalid(_))));
        let none = FilePolicy::new(vec![], &t.path().join("data"), None);
        assert!(forbidden(none.open(&s(root.join("ok.bin")))));
    }

    #[test]
    fn a_root_over_the_data_dir_still_never_reads_it() {
        let (t, _) = setup();
        let pol = FilePolicy::new(
            vec![std::fs::canonicalize(t.path()).unwrap()],
            &t.path().join("data"),
            None,
        );
        assert!(forbidden(
            pol.open(&t.path().join("data/swarm.key").display().to_string())
        ));
        pol.open(&t.path().join("outside.bin").display().to_string())
            .unwrap();
    }

    #[test]
    fn a_fifo_or_a_directory_is_refused_without_blocking() {
        let (t, pol) = setup();
        let root = t.path().join("root");
        let fifo = root.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Would block forever in open(2) without the check (no writer).
        let e = pol.open(fifo.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = pol.open(root.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }
}
