//! Retention: events removed by age, count and bytes, dedup entries
//! expired, and sources forgotten once nothing of theirs is left.

use std::sync::atomic::Ordering;

use super::layout::*;
use super::writer::Writer;
use super::StoreError;
use crate::util::now_ms;

impl Writer {
    /// Retention by age, count and bytes; dedup expiry by window and count.
    /// Bounded work per pass; each pass is one durable batch.
    pub(super) fn prune(&mut self) -> Result<(), StoreError> {
        const MAX_WORK: usize = 20_000;
        let now = now_ms();
        let age_cut = now.saturating_sub(self.cfg.retention_age.as_millis() as u64);
        let mut batch = sled::Batch::default();
        let mut first = self.first.load(Ordering::Acquire);
        let mut work = 0;
        let saved = (self.log_bytes, self.dedup_count);
        for r in self.db.scan_prefix(b"l") {
            if work >= MAX_WORK {
                break;
            }
            let (k, v) = r?;
            let count = self.next_seq - first;
            let s = decode_stored(&k, &v)?;
            let over = s.received_ms < age_cut
                || count > self.cfg.retention_max_events
                || self.log_bytes > self.cfg.retention_max_bytes;
            if !over {
                break;
            }
            let seq = seq_of(&k);
            batch.remove(&*k);
            batch.remove(key_o(&s.event.source, s.event.seq));
            batch.remove(key_i(&s.event.id));
            if let Some(c) = &s.event.correlation_id {
                batch.remove(key_k(c, seq));
            }
            self.log_bytes = self.log_bytes.saturating_sub(v.len() as u64);
            first = seq + 1;
            work += 1;
        }
        super::dedup::expire(
            &self.db,
            &self.cfg,
            &mut self.dedup_count,
            &mut batch,
            now,
            &mut work,
            MAX_WORK,
        )?;
        // A source not heard from within retention, with nothing left in the
        // log, is forgotten.
        let forget: Vec<String> = self
            .sources
            .values()
            .filter(|m| m.last_ms < age_cut && m.source != self.source)
            .map(|m| m.source.clone())
            .collect();
        for src in forget {
            if self.db.scan_prefix(prefix_o(&src)).next().is_none() {
                batch.remove(key_s(&src));
                self.sources.remove(&src);
                work += 1;
            }
        }
        if work == 0 {
            return Ok(());
        }
        batch.insert(M_BYTES, &self.log_bytes.to_be_bytes());
        batch.insert(M_DEDUP, &self.dedup_count.to_be_bytes());
        if let Err(e) = self.db.apply_batch(batch) {
            (self.log_bytes, self.dedup_count) = saved;
            return Err(e.into());
        }
        self.sync()?;
        self.first.store(first, Ordering::Release);
        tracing::debug!(removed = work, first, "retention pass");
        Ok(())
    }
}
