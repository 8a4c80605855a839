//! Reads of the log, the correlation and per-source indexes and the
//! version vector, straight from sled (the writer is not involved).

use super::layout::*;
use super::{Store, StoreError};
use crate::catchup::SourceMark;
use crate::event::{Event, TypePattern};

impl Store {
    pub fn get(&self, seq: u64) -> Result<Option<Stored>, StoreError> {
        let k = key_l(seq);
        self.tree.get(k)?.map(|v| decode_stored(&k, &v)).transpose()
    }

    pub fn get_by_id(&self, id: &str) -> Result<Option<(u64, Stored)>, StoreError> {
        let Some(v) = self.tree.get(key_i(id))? else {
            return Ok(None);
        };
        let seq = be(&v);
        Ok(self.get(seq)?.map(|s| (seq, s)))
    }

    /// Every retained event with this correlation id, in log order.
    pub fn by_correlation(&self, corr: &str) -> Result<Vec<(u64, Stored)>, StoreError> {
        let prefix = [b"k", corr.as_bytes(), b"\0"].concat();
        let mut out = Vec::new();
        for r in self.tree.scan_prefix(&prefix) {
            let (k, _) = r?;
            if k.len() != prefix.len() + 8 {
                continue;
            }
            let seq = seq_of(&k);
            if let Some(s) = self.get(seq)? {
                out.push((seq, s));
            }
        }
        Ok(out)
    }

    /// Up to `limit` events after `after` whose type matches, scanning at most
    /// `max_scan` entries. Returns them and the last sequence scanned.
    pub fn read_after(
        &self,
        after: u64,
        limit: usize,
        max_scan: usize,
        patterns: &[TypePattern],
    ) -> Result<(Vec<(u64, Stored)>, u64), StoreError> {
        let mut out = Vec::new();
        let mut last = after;
        for (scanned, r) in self
            .tree
            .range(key_l(after.saturating_add(1))..key_l(u64::MAX))
            .enumerate()
        {
            if out.len() >= limit || scanned >= max_scan {
                break;
            }
            let (k, v) = r?;
            let seq = seq_of(&k);
            last = seq;
            let s = decode_stored(&k, &v)?;
            if s.delivered_to(patterns) {
                out.push((seq, s));
            }
        }
        Ok((out, last))
    }

    /// Up to `limit` events before `before` (exclusive) whose type matches,
    /// newest first, scanning at most `max_scan` entries backwards. Returns
    /// them and the lowest sequence scanned (`before` when none was).
    pub fn read_before(
        &self,
        before: u64,
        limit: usize,
        max_scan: usize,
        patterns: &[TypePattern],
    ) -> Result<(Vec<(u64, Stored)>, u64), StoreError> {
        let mut out = Vec::new();
        let mut lowest = before;
        for (scanned, r) in self.tree.range(key_l(0)..key_l(before)).rev().enumerate() {
            if out.len() >= limit || scanned >= max_scan {
                break;
            }
            let (k, v) = r?;
            let seq = seq_of(&k);
            lowest = seq;
            let s = decode_stored(&k, &v)?;
            if s.delivered_to(patterns) {
                out.push((seq, s));
            }
        }
        Ok((out, lowest))
    }

    /// How many events after `cursor` a consumer of `patterns` has still to
    /// see: delivered (not `dup_of`) entries whose type matches. Counts at
    /// most `max_scan` entries; the bool says whether the count is exact
    /// (false: at least this many).
    pub fn pending(
        &self,
        cursor: u64,
        max_scan: usize,
        patterns: &[TypePattern],
    ) -> Result<(u64, bool), StoreError> {
        let mut n = 0;
        for (scanned, r) in self
            .tree
            .range(key_l(cursor.saturating_add(1))..key_l(u64::MAX))
            .enumerate()
        {
            if scanned >= max_scan {
                return Ok((n, false));
            }
            let (k, v) = r?;
            let s = decode_stored(&k, &v)?;
            if s.delivered_to(patterns) {
                n += 1;
            }
        }
        Ok((n, true))
    }

    /// Sequence just before the first event received at or after `ms`.
    pub fn seq_before_time(&self, ms: u64) -> Result<u64, StoreError> {
        seq_before_time(&self.tree, self.first(), self.head() + 1, ms)
    }

    /// The version vector: what this agent holds of every source it knows.
    pub fn version_vector(&self) -> Result<Vec<SourceMark>, StoreError> {
        self.tree
            .scan_prefix(b"s")
            .map(|r| {
                let (k, v) = r?;
                decode_at(&k, &v)
            })
            .collect()
    }

    /// Envelopes of `source` from sequence `from` on, in order, at most
    /// `max_events` of them or about `max_bytes`. Also returns the lowest
    /// sequence of this source still held (or None if none is).
    pub fn source_events(
        &self,
        source: &str,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Event>, Option<u64>), StoreError> {
        let prefix = prefix_o(source);
        let floor = self
            .tree
            .scan_prefix(&prefix)
            .next()
            .transpose()?
            .map(|(k, _)| seq_of(&k));
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let end = [prefix.as_slice(), &[0xff; 9]].concat();
        for r in self.tree.range(key_o(source, from)..end) {
            let (_, v) = r?;
            let k = key_l(be(&v));
            let Some(raw) = self.tree.get(k)? else {
                continue;
            };
            bytes += raw.len();
            let st = decode_stored(&k, &raw)?;
            out.push(st.event);
            if out.len() >= max_events || bytes >= max_bytes {
                break;
            }
        }
        Ok((out, floor))
    }

    /// Source sequence numbers this agent has handed out.
    pub fn source_seq(&self) -> u64 {
        self.tree
            .get(M_SRC)
            .ok()
            .flatten()
            .map(|v| be(&v))
            .unwrap_or(0)
    }
}

/// Bisect the log in [first, end) for the first entry received at or after
/// `ms` (receipt times never decrease along the log) and return the sequence
/// just before it.
pub(super) fn seq_before_time(
    tree: &sled::Tree,
    first: u64,
    end: u64,
    ms: u64,
) -> Result<u64, StoreError> {
    let (mut lo, mut hi) = (first, end);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match tree.range(key_l(mid)..key_l(u64::MAX)).next().transpose()? {
            Some((k, v)) if seq_of(&k) < hi => {
                let s = decode_stored(&k, &v)?;
                if s.received_ms < ms {
                    lo = seq_of(&k) + 1;
                } else {
                    hi = mid;
                }
            }
            _ => hi = mid,
        }
    }
    Ok(lo.saturating_sub(1))
}
