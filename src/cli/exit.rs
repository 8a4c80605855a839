//! Exit status of every command (README.md, "Exit codes") and the errors
//! that carry one. `run` and `lock run` exit with their command's status
//! once it has started.

use riftmesh::api;

/// Anything else that went wrong (the agent failed the request, a local
/// file could not be written, a wait gave up).
pub const FAILED: i32 = 1;
/// Bad arguments or configuration, or a request the agent calls malformed.
pub const USAGE: i32 = 2;
/// `lock run`: the lock was lost or not renewed in time; the command was stopped.
pub const LOCK_LOST: i32 = 3;
/// No riftmesh agent answers at the API address.
pub const UNREACHABLE: i32 = 4;
/// What was named does not exist (event, consumer, blob, lock, member).
pub const NOT_FOUND: i32 = 5;
/// It exists already or is taken: a lock held, a token that does not hold
/// the lock, a file that exists, a duplicate name.
pub const CONFLICT: i32 = 6;
/// Refused by the agent's policy (fault injection off, a path outside
/// the blob roots, a strict type list, a missing or wrong API token).
pub const POLICY: i32 = 7;

/// A mistake in how the command was called (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// An error with its exit status chosen where it happened.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Classed {
    pub code: i32,
    pub msg: String,
}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

/// The exit status for an error: the first cause in its chain that has a class.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<api::ClientError>() {
            return match c {
                api::ClientError::Unreachable { .. } | api::ClientError::NotApi { .. } => {
                    UNREACHABLE
                }
                api::ClientError::Refused { status, .. } => match status {
                    400 | 411 | 413 | 415 | 422 => USAGE,
                    401 | 403 => POLICY,
                    404 => NOT_FOUND,
                    409 => CONFLICT,
                    _ => FAILED,
                },
                api::ClientError::Protocol(_) | api::ClientError::Local(_) => FAILED,
            };
        }
        if cause.is::<Usage>() || cause.is::<riftmesh::config::ConfigError>() {
            return USAGE;
        }
        if let Some(c) = cause.downcast_ref::<Classed>() {
            return c.code;
        }
    }
    FAILED
}
