//! The agent's private files: its identity key, the swarm key, and the
//! owner-only atomic write they (and the incarnation counter) use.

use std::io::Write;
use std::path::Path;

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;

use crate::config::AgentConfig;
use crate::net;
use crate::publisher::NodeError;

pub(crate) fn file_err(what: &'static str, path: &Path, e: impl ToString) -> NodeError {
    NodeError::File {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Write a file readable by the owner only, atomically.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The node's identity: `<data>/identity.key`, made on first start.
pub fn load_identity(data_dir: &Path) -> Result<Keypair, NodeError> {
    let path = data_dir.join("identity.key");
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| file_err("identity key is unreadable (restore it from backup, or delete it to become a new member)", &path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| file_err("cannot encode identity", &path, e))?;
            write_private(&path, &bytes).map_err(|e| file_err("cannot write identity key", &path, e))?;
            tracing::info!(path = %path.display(), "created a new node identity");
            Ok(key)
        }
        Err(e) => Err(file_err("cannot read identity key", &path, e)),
    }
}

/// The swarm key: the configured file, or `<data>/swarm.key` (made if missing).
pub fn load_swarm_key(cfg: &AgentConfig) -> Result<PreSharedKey, NodeError> {
    let (path, may_create) = match &cfg.swarm_key {
        Some(p) => (p.clone(), false),
        None => (cfg.data_dir.join("swarm.key"), true),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => net::parse_psk(&text)
            .map_err(|e| file_err("swarm key is not in /key/swarm/psk/1.0.0/ format", &path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
            let psk = net::generate_psk();
            write_private(&path, psk.to_string().as_bytes())
                .map_err(|e| file_err("cannot write swarm key", &path, e))?;
            tracing::warn!(
                path = %path.display(),
                fingerprint = %psk.fingerprint(),
                "no swarm key given: created a new private network key; copy this file to every host (or pass --swarm-key) so they can join"
            );
            Ok(psk)
        }
        Err(e) => Err(file_err("cannot read swarm key", &path, e)),
    }
}
