//! Checks of request parameters that several resources share: type
//! patterns, a `since` time, page sizes.

use crate::event::{self, TypePattern};

use super::error::{ApiError, ApiResult};

/// Most events one page of history or one consumer fetch returns.
pub(super) const MAX_FETCH: usize = 1000;
/// Most log entries one page of events reads through looking for matches.
pub(super) const MAX_SCAN: usize = 50_000;

/// Most type patterns one request or consumer may carry.
pub const MAX_PATTERNS: usize = 256;

pub(super) fn patterns(list: &[String]) -> ApiResult<Vec<TypePattern>> {
    if list.len() > MAX_PATTERNS {
        return Err(ApiError::bad(format!(
            "{} type patterns given; at most {MAX_PATTERNS}",
            list.len()
        )));
    }
    list.iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| TypePattern::parse(s).map_err(|e| ApiError::bad(format!("type pattern: {e}"))))
        .collect()
}

/// A time as RFC 3339, milliseconds since the epoch, or a duration ago.
pub fn parse_since(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0));
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(event::now_ms().saturating_sub(d.as_millis() as u64));
    }
    Err(format!("since {s:?}: write an RFC 3339 time (2026-11-23T10:00:00Z), milliseconds since the epoch, or a duration ago (10m)"))
}

/// A page size: 1..=MAX_FETCH, default 100; 0 is refused (it would
/// otherwise read as "one"), larger values are capped (proto-notes/api.md).
pub(super) fn page_size(key: &str, v: Option<usize>) -> Result<usize, ApiError> {
    match v {
        Some(0) => Err(ApiError::bad(format!(
            "{key}=0: give 1..={MAX_FETCH} (default 100)"
        ))),
        v => Ok(v.unwrap_or(100).min(MAX_FETCH)),
    }
}
