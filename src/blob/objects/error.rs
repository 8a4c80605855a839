//! The blob store's error, and the helper that names the file an I/O
//! error happened on.

use std::path::Path;

use crate::durable::DurableError;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("blob store database: {0}")]
    Db(#[from] sled::Error),
    #[error("{0}")]
    ReadOnly(#[from] DurableError),
    #[error("damaged blob store record {tree}/{key}: {reason}")]
    Damaged {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("blob {0} is not held here")]
    NotHeld(String),
    #[error("chunk {index} of {path} does not match its manifest: the stored copy is damaged")]
    DamagedChunk { path: String, index: u32 },
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}
