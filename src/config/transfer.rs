//! Blob transfer settings (`want`, `blob_*`, `sync_*` keys): what to fetch
//! and where to place it, chunk sizes, budgets and rates. Here, with the
//! rest of the configuration, so that config does not depend on blob; the
//! blob module re-exports these types.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Smallest and largest chunk a manifest may use (config `blob_chunk_size`
/// is checked against them).
pub const MIN_CHUNK: u32 = 64 << 10;
pub const MAX_CHUNK: u32 = 8 << 20;

/// One `want` entry of the configuration: names matching `names` are
/// fetched (on hosts carrying every tag of `if_tags`) and, with `place`,
/// copied to a path.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Want {
    /// Name pattern, `*` matching any run of characters (`/` included).
    pub names: String,
    /// Where to put it: `{name}` is what `*` matched (the whole name if the
    /// pattern has none), `{full}` the whole name, `{blob}` the hex id.
    #[serde(default)]
    pub place: Option<String>,
    #[serde(default)]
    pub if_tags: BTreeMap<String, String>,
}

impl Want {
    pub fn check(&self) -> Result<(), String> {
        check_name(&self.names.replace('*', "x"))?;
        if let Some(p) = &self.place {
            if !p.starts_with('/') {
                return Err(format!("place {p:?} must be an absolute path"));
            }
        }
        Ok(())
    }

    /// What `*` matched, if the name matches.
    pub fn matches(&self, name: &str) -> Option<String> {
        match self.names.split_once('*') {
            None => (self.names == name).then(|| name.to_string()),
            Some((pre, post)) => {
                if !wildmatch::WildMatch::new(&self.names).matches(name) {
                    return None;
                }
                let rest = name.strip_prefix(pre)?;
                // With one '*' the match is what lies between; with more,
                // everything after the prefix up to the final literal part.
                let post_lit = post.rsplit('*').next().unwrap_or("");
                Some(rest.strip_suffix(post_lit).unwrap_or(rest).to_string())
            }
        }
    }

    pub fn path_for(&self, name: &str, id: &[u8; 32]) -> Option<PathBuf> {
        let t = self.place.as_ref()?;
        let m = self.matches(name)?;
        Some(PathBuf::from(
            t.replace("{name}", &m)
                .replace("{full}", name)
                .replace("{blob}", &hex::encode(id)),
        ))
    }
}

/// Names: 1-256 bytes of letters, digits and `-_./:+`, no `..` segment, no
/// leading `/`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && !name.starts_with('/')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:+".contains(c))
        && !name
            .split('/')
            .any(|seg| seg == ".." || seg == "." || seg.is_empty());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad blob name {name:?}: use 1-256 letters, digits and -_./:+ in non-empty segments, no '.' or '..' segments, no leading '/'"
        ))
    }
}

#[derive(Clone, Debug)]
pub struct TransferConfig {
    pub wants: Vec<Want>,
    /// Preferred chunk size (doubled for blobs that would need more than
    /// 65,536 chunks).
    pub chunk_size: u32,
    /// Most bytes the blob store may hold (0: no limit but the disk's).
    pub budget: u64,
    /// Free bytes always left on the data directory's filesystem.
    pub reserve: u64,
    /// Fetches running at once.
    pub transfers: usize,
    /// Bytes per second, 0: unlimited.
    pub upload_rate: u64,
    pub download_rate: u64,
    /// How long a blob no name points at is kept.
    pub retention: Duration,
    /// Chunk requests in flight per source.
    pub per_source: usize,
    /// How long after its time a retraction of a name is kept: twice the
    /// event log's `retention_age` (set with it), past which a naming it
    /// covers is no longer held to be caught up (proto-notes/sync.md,
    /// "Forgetting a name").
    pub forgotten_kept: Duration,
    /// A transfer that receives no chunk for this long, with nothing in
    /// flight, gives up (and is retried with the name's next attempt).
    pub stall: Duration,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            wants: Vec::new(),
            chunk_size: 1 << 20,
            budget: 0,
            reserve: 1 << 30,
            transfers: 4,
            upload_rate: 0,
            download_rate: 0,
            retention: Duration::from_secs(24 * 3600),
            per_source: 8,
            forgotten_kept: Duration::from_secs(2 * 7 * 24 * 3600),
            stall: crate::blob::sched::STALL,
        }
    }
}
