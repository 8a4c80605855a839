//! The agent's private files: its identity key, the swarm key, the local
//! API's token, and the owner-only atomic write they (and the incarnation
//! counter) use.

use std::io::Write;
use std::path::Path;

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use sha2::{Digest, Sha256};

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

/// The file name of the API token the agent makes in its data directory.
pub const API_TOKEN_FILE: &str = "api.token";
/// Fewest characters an API token may have (the agent's own has 64).
pub const MIN_API_TOKEN_LEN: usize = 16;
/// Most characters an API token may have.
pub const MAX_API_TOKEN_LEN: usize = 4096;

/// The local API's bearer token (proto-notes/security.md): only its
/// SHA-256 is kept, and a presented token is compared by digest in
/// constant time, so neither its bytes nor its length leak through timing.
#[derive(Clone)]
pub struct ApiToken {
    digest: [u8; 32],
    /// The file it was read from.
    pub path: std::path::PathBuf,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ApiToken {
    pub fn new(token: &str, path: std::path::PathBuf) -> Self {
        ApiToken {
            digest: Sha256::digest(token.as_bytes()).into(),
            path,
        }
    }

    /// Whether `presented` is this token (constant time).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(presented).into();
        subtle::ConstantTimeEq::ct_eq(&d[..], &self.digest[..]).into()
    }
}

/// The token in a token file's text: one line (surrounding whitespace and
/// the final newline are dropped) of 16 to 4096 visible ASCII characters,
/// what an `Authorization` header carries unchanged.
pub fn parse_api_token(text: &str) -> Result<&str, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err(
            "the file is empty: write one line with the token (e.g. `openssl rand -hex 32`)".into(),
        );
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the token must be one line of visible ASCII characters (no spaces or control characters)"
                .into(),
        );
    }
    if t.len() < MIN_API_TOKEN_LEN || t.len() > MAX_API_TOKEN_LEN {
        return Err(format!(
            "the token has {} characters; it must have {MIN_API_TOKEN_LEN} to {MAX_API_TOKEN_LEN} \
             (e.g. `openssl rand -hex 32`)",
            t.len()
        ));
    }
    Ok(t)
}

/// Whether the API needs a token: one is configured, or the API is bound
/// elsewhere than loopback (then `<data>/api.token` by default).
pub fn api_token_needed(cfg: &AgentConfig) -> bool {
    cfg.api_token_file.is_some() || !cfg.api.ip().is_loopback()
}

/// The path of the token file the agent would use, if it needs one.
pub fn api_token_path(cfg: &AgentConfig) -> Option<std::path::PathBuf> {
    if !api_token_needed(cfg) {
        return None;
    }
    Some(
        cfg.api_token_file
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join(API_TOKEN_FILE)),
    )
}

/// Read a token file the agent is to check requests against: it must be a
/// regular file that neither group nor others can write (whoever can
/// change it can let themselves in), holding a token ([`parse_api_token`]).
pub fn read_api_token_file(path: &Path) -> Result<ApiToken, NodeError> {
    let bad = |e: String| file_err("API token file is unusable", path, e);
    let md = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !md.is_file() {
        return Err(bad("not a regular file".into()));
    }
    #[cfg(unix)]
    {
        let mode = std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777;
        if mode & 0o022 != 0 {
            return Err(bad(format!(
                "it is writable by group or others (mode {mode:04o}), so someone else could \
                 replace the token; `chmod go-w` it (0600 or 0640)"
            )));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = parse_api_token(&text).map_err(bad)?;
    Ok(ApiToken::new(token, path.to_path_buf()))
}

/// The token the API checks, if it needs one ([`api_token_needed`]): the
/// configured file (which must exist), else `<data>/api.token`, made on
/// first start (32 random bytes as hex, owner-only).
pub fn load_api_token(cfg: &AgentConfig) -> Result<Option<ApiToken>, NodeError> {
    let Some(path) = api_token_path(cfg) else {
        return Ok(None);
    };
    if cfg.api_token_file.is_none() && !path.exists() {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| file_err("cannot create data directory", &cfg.data_dir, e))?;
        let token = hex::encode(rand::random::<[u8; 32]>());
        write_private(&path, format!("{token}\n").as_bytes())
            .map_err(|e| file_err("cannot write API token", &path, e))?;
        tracing::info!(
            path = %path.display(),
            "created an API token: the API is not on loopback, so every request must carry \
             `Authorization: Bearer <token>` (the CLI: --api-token-file)"
        );
    }
    read_api_token_file(&path).map(Some)
}
