//! The dedup index: for each digest (the idempotency key's, else the
//! content hash) the first copy of the fact, and its expiry order. The
//! writer consults it while staging appends; retention expires it.

use super::layout::*;
use super::{StoreConfig, StoreError};
use crate::event::Hash;
use std::collections::HashMap;

/// The first copy of a fact, as the dedup index holds it.
#[derive(Clone)]
pub(super) struct FirstCopy {
    pub(super) seq: u64,
    pub(super) received_ms: u64,
    /// Its publication time (layout-1 entries: its receipt time).
    pub(super) ts_ms: u64,
    /// Known when staged in this group; read from the log when needed.
    pub(super) id: Option<String>,
}

/// The first copy of digest `h` already held: `staged` earlier in this
/// group, else in the index.
pub(super) fn earlier_copy(
    db: &sled::Db,
    h: &Hash,
    staged: &HashMap<Hash, FirstCopy>,
) -> Result<Option<FirstCopy>, StoreError> {
    Ok(match staged.get(h) {
        Some(f) => Some(f.clone()),
        None => db.get(key_h(h))?.map(|v| FirstCopy {
            seq: be(&v),
            received_ms: be(&v[8..]),
            ts_ms: if v.len() >= 24 {
                be(&v[16..])
            } else {
                be(&v[8..])
            },
            id: None,
        }),
    })
}

/// Whether a copy published at `ts_ms` repeats the `earlier` one: then
/// the first copy's (seq, id, publication time).
pub(super) fn repeats(
    db: &sled::Db,
    earlier: Option<FirstCopy>,
    keyed: bool,
    window: u64,
    ts_ms: u64,
) -> Result<Option<(u64, String, u64)>, StoreError> {
    Ok(match earlier {
        // A window of 0 means never, also within one millisecond.
        Some(f) if keyed || (window > 0 && f.ts_ms.abs_diff(ts_ms) <= window) => {
            let id = match f.id {
                Some(id) => id,
                None => db
                    .get(key_l(f.seq))?
                    .and_then(|v| Stored::decode(&v).ok())
                    .map(|s| s.event.id)
                    .unwrap_or_default(),
            };
            Some((f.seq, id, f.ts_ms))
        }
        // Outside the window: a new fact (it takes over the entry
        // below when it is the later one).
        _ => None,
    })
}

/// Stage `new` as the index entry of digest `h` if it is the later fact.
pub(super) fn take_over(
    count: &mut u64,
    h: Hash,
    earlier: Option<&FirstCopy>,
    new: FirstCopy,
    batch: &mut sled::Batch,
    staged: &mut HashMap<Hash, FirstCopy>,
) {
    // The entry holds the latest publication of the digest: a new
    // fact published later takes it over; an older one (a late
    // catch-up copy) leaves it, so later repeats are judged against
    // the newest fact.
    if earlier.is_some_and(|f| new.ts_ms <= f.ts_ms) {
        return;
    }
    let mut hv = new.seq.to_be_bytes().to_vec();
    hv.extend(new.received_ms.to_be_bytes());
    hv.extend(new.ts_ms.to_be_bytes());
    batch.insert(key_h(&h).as_slice(), hv);
    match earlier {
        // One expiry entry per digest, the count unchanged.
        Some(f) => {
            if f.received_ms != new.received_ms {
                batch.remove(key_x(f.received_ms, &h).as_slice());
            }
        }
        None => *count += 1,
    }
    batch.insert(key_x(new.received_ms, &h).as_slice(), &[]);
    staged.insert(h, new);
}

/// Stage the removal of dedup entries past the window or beyond the
/// most kept, oldest first, while `work` stays under `max_work`.
pub(super) fn expire(
    db: &sled::Db,
    cfg: &StoreConfig,
    count: &mut u64,
    batch: &mut sled::Batch,
    now: u64,
    work: &mut usize,
    max_work: usize,
) -> Result<(), StoreError> {
    let dedup_cut = now.saturating_sub(cfg.dedup_window.as_millis() as u64);
    for r in db.scan_prefix(b"x") {
        if *work >= max_work {
            break;
        }
        let (k, _) = r?;
        let ms = be(&k[1..9]);
        if ms >= dedup_cut && *count <= cfg.dedup_max_entries {
            break;
        }
        let mut h = [0u8; 32];
        h.copy_from_slice(&k[9..41]);
        batch.remove(&*k);
        batch.remove(key_h(&h).as_slice());
        *count = count.saturating_sub(1);
        *work += 1;
    }
    Ok(())
}
