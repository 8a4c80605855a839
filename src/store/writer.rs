//! The writer thread: the one owner of every mutation. It folds the
//! requests waiting when a commit starts into one group, stages them in one
//! sled batch and makes the batch durable with one flush + fsync.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use tokio::sync::{mpsc, oneshot, watch};

use super::dedup::{self, FirstCopy};
use super::layout::*;
use super::{Appended, ConsumerRec, Item, Op, StoreConfig, StoreError};
use crate::catchup::SourceMark;
use crate::codec;
use crate::durable::{Durable, What};
use crate::event::Hash;
use crate::util::now_ms;

pub(super) struct Writer {
    pub(super) db: sled::Db,
    pub(super) durable: Durable,
    pub(super) key: Keypair,
    /// This agent's peer id text, the `source` of its events.
    pub(super) source: String,
    /// Per-source marks (the version vector), persisted under `s`.
    pub(super) sources: HashMap<String, SourceMark>,
    pub(super) cfg: StoreConfig,
    pub(super) next_seq: u64,
    pub(super) source_seq: u64,
    pub(super) log_bytes: u64,
    pub(super) dedup_count: u64,
    pub(super) last_received: u64,
    pub(super) mark_path: PathBuf,
    pub(super) mark_written: Option<std::time::Instant>,
    pub(super) head: watch::Sender<u64>,
    pub(super) first: Arc<AtomicU64>,
    pub(super) steps: super::StepTimers,
}

/// What earlier requests of the same group staged.
pub(super) struct Group<'a> {
    pub(super) batch: &'a mut sled::Batch,
    pub(super) hashes: &'a mut HashMap<Hash, FirstCopy>,
    pub(super) held: &'a mut std::collections::HashSet<(String, u64)>,
    pub(super) touched: &'a mut std::collections::HashSet<String>,
}

/// Outcome of one group before it is durable.
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// Queue the answer to one request of a group: a staged result is sent once
/// the group is durable (or its commit failed); a refusal is sent at once.
fn answer_after_commit<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, StoreError>>,
    staged: Result<T, StoreError>,
    replies: &mut Vec<Reply>,
) {
    match staged {
        Ok(v) => replies.push(Box::new(move |err| {
            let _ = reply.send(match err {
                None => Ok(v),
                Some(e) => Err(e.duplicate()),
            });
        })),
        Err(e) => {
            let _ = reply.send(Err(e));
        }
    }
}

/// The writer's counters before a group, restored when its batch is refused.
struct Saved {
    next_seq: u64,
    source_seq: u64,
    log_bytes: u64,
    dedup_count: u64,
    sources: HashMap<String, SourceMark>,
}

impl Saved {
    fn of(w: &Writer) -> Saved {
        Saved {
            next_seq: w.next_seq,
            source_seq: w.source_seq,
            log_bytes: w.log_bytes,
            dedup_count: w.dedup_count,
            sources: w.sources.clone(),
        }
    }

    fn restore(self, w: &mut Writer) {
        w.next_seq = self.next_seq;
        w.source_seq = self.source_seq;
        w.log_bytes = self.log_bytes;
        w.dedup_count = self.dedup_count;
        w.sources = self.sources;
    }
}

impl Writer {
    pub(super) fn run(&mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(op) = rx.blocking_recv() {
            let mut ops = vec![op];
            let mut n_items = 0usize;
            while n_items < self.cfg.max_group {
                match rx.try_recv() {
                    Ok(op) => {
                        if let Op::Append { items, .. } = &op {
                            n_items += items.len();
                        } else {
                            n_items += 1;
                        }
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(ops);
            if self
                .mark_written
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.write_mark();
            }
        }
        if self.db.flush().is_ok() {
            self.write_mark();
        }
    }

    fn write_mark(&mut self) {
        let tmp = self.mark_path.with_extension("tmp");
        let head = self.next_seq - 1;
        if std::fs::write(&tmp, head.to_string())
            .and_then(|_| std::fs::rename(&tmp, &self.mark_path))
            .is_ok()
        {
            self.mark_written = Some(std::time::Instant::now());
        }
    }

    /// Returns false when the group could not be made durable.
    fn commit_group(&mut self, ops: Vec<Op>) -> bool {
        let started = Instant::now();
        let mut batch = sled::Batch::default();
        let mut replies: Vec<Reply> = Vec::new();
        // Hashes and consumers written earlier in this same group.
        let mut hashes: HashMap<Hash, FirstCopy> = HashMap::new();
        let mut held: std::collections::HashSet<(String, u64)> = Default::default();
        let mut touched: std::collections::HashSet<String> = Default::default();
        let mut consumers: HashMap<String, Option<ConsumerRec>> = HashMap::new();
        let saved = Saved::of(self);
        let mut prune = false;
        let mut durable = true;
        let mut dirty = false;
        for op in ops {
            match op {
                Op::Append { items, reply } => {
                    let mut g = Group {
                        batch: &mut batch,
                        hashes: &mut hashes,
                        held: &mut held,
                        touched: &mut touched,
                    };
                    let r = self.stage_append(items, &mut g);
                    dirty = true;
                    answer_after_commit(reply, r, &mut replies);
                }
                Op::Consumer {
                    name,
                    change,
                    reply,
                } => {
                    let r = self.stage_consumer(&name, change, &mut batch, &mut consumers);
                    dirty = true;
                    answer_after_commit(reply, r, &mut replies);
                }
                Op::Prune => prune = true,
                Op::SkipTo { source, to, reply } => {
                    dirty = true;
                    let r = self.advance_source(&source, to, true, &held).map(|()| {
                        touched.insert(source.clone());
                        self.sources.get(&source).cloned().unwrap_or_default()
                    });
                    answer_after_commit(reply, r, &mut replies);
                }
            }
        }
        if dirty {
            let err = self.apply_group(batch, &touched, saved, started).err().map(|e| {
                tracing::error!(error = %e, path = %self.mark_path.display(), "store commit failed");
                StoreError::CommitFailed {
                    path: self.mark_path.with_file_name(""),
                    reason: e.to_string(),
                }
            });
            durable = err.is_none();
            for r in replies {
                r(err.as_ref());
            }
        }
        if prune {
            if let Err(e) = self.prune() {
                tracing::warn!(error = %e, "retention pass failed");
            }
        }
        durable
    }

    /// Write the group's counters and source marks into its batch, apply it
    /// and make it durable. On a refused batch the counters go back to
    /// `saved`.
    fn apply_group(
        &mut self,
        mut batch: sled::Batch,
        touched: &std::collections::HashSet<String>,
        saved: Saved,
        started: Instant,
    ) -> Result<(), StoreError> {
        for src in touched {
            if let Some(m) = self.sources.get(src) {
                if let Ok(v) = codec::encode(m) {
                    batch.insert(key_s(src), v);
                }
            }
        }
        batch.insert(M_NEXT, &self.next_seq.to_be_bytes());
        batch.insert(M_SRC, &self.source_seq.to_be_bytes());
        batch.insert(M_BYTES, &self.log_bytes.to_be_bytes());
        batch.insert(M_DEDUP, &self.dedup_count.to_be_bytes());
        let prepared = started.elapsed();
        let applied = self
            .durable
            .room()
            .map_err(StoreError::from)
            .and_then(|()| {
                let applying = Instant::now();
                let r = self.db.apply_batch(batch).map_err(|e| {
                    self.durable.write_failed(&e);
                    StoreError::from(e)
                });
                r.map(|()| applying.elapsed())
            });
        match applied {
            Err(e) => {
                // Nothing applied: the sequence numbers are free again.
                saved.restore(self);
                Err(e)
            }
            // Applied in memory: keep the counters so no sequence is reused,
            // even if making it durable failed.
            Ok(apply) => {
                let syncing = Instant::now();
                let r = self.sync();
                // Timed only when applied; a failed sync took its time too.
                self.steps.observe(prepared, apply, syncing.elapsed());
                if r.is_ok() {
                    // Wake long-polls only when the log grew (not on acks).
                    let head = self.next_seq - 1;
                    self.head
                        .send_if_modified(|h| std::mem::replace(h, head) != head);
                }
                r
            }
        }
    }

    /// The durability point of a group: nothing is answered before it.
    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        Ok(self.durable.commit(What::Events)?)
    }

    fn stage_append(
        &mut self,
        items: Vec<Item>,
        g: &mut Group,
    ) -> Result<Vec<Appended>, StoreError> {
        let now = now_ms();
        // Receipt times never go backwards along the log, so time seeks can bisect.
        let received_ms = now.max(self.last_received);
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Item::Remote(e) = &item {
                let k = (e.source.clone(), e.seq);
                if g.held.contains(&k) || self.db.contains_key(key_o(&e.source, e.seq))? {
                    out.push(Appended::Held);
                    continue;
                }
            }
            // The dedup digest: the idempotency key's when there is one
            // (one fact whatever its age within the index), else the
            // content hash, a duplicate only within the type's window of
            // publication times (proto-notes/events.md §13).
            let (h, keyed, event_type, ts_ms) = match &item {
                Item::Local(d) => (d.dedup_digest(), d.idem_key.is_some(), &d.event_type, now),
                Item::Remote(e) => (
                    e.dedup_digest(),
                    e.idem_key.is_some(),
                    &e.event_type,
                    e.ts_ms,
                ),
            };
            let earlier = dedup::earlier_copy(&self.db, &h, g.hashes)?;
            let window = self.cfg.repeat_window_ms(event_type);
            let first_copy = dedup::repeats(&self.db, earlier.clone(), keyed, window, ts_ms)?;
            let event = match (item, &first_copy) {
                // A local duplicate gets no sequence number: nothing to store.
                (Item::Local(_), Some((seq, id, ts))) => {
                    out.push(Appended::Duplicate {
                        seq: *seq,
                        id: id.clone(),
                        ts_ms: *ts,
                        by_key: keyed,
                    });
                    continue;
                }
                (Item::Local(d), None) => {
                    let ev = d.seal_as(&self.key, &self.source, self.source_seq + 1, now)?;
                    self.source_seq += 1;
                    ev
                }
                (Item::Remote(e), _) => e,
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            let (source, source_seq) = (event.source.clone(), event.seq);
            let stored = Stored {
                received_ms,
                event,
                dup_of: first_copy.as_ref().map(|(s, _, _)| *s),
            };
            let bytes = stored.encode().map_err(|source| StoreError::Corrupt {
                key: format!("l{seq}"),
                source,
            })?;
            self.log_bytes += bytes.len() as u64;
            g.batch.insert(&key_l(seq), bytes);
            g.batch
                .insert(key_o(&source, source_seq), &seq.to_be_bytes());
            g.held.insert((source.clone(), source_seq));
            self.advance_source(&source, source_seq, false, g.held)?;
            if let Some(m) = self.sources.get_mut(&source) {
                m.last_ms = received_ms;
            }
            g.touched.insert(source);
            if let Some((first, id, ts)) = first_copy {
                // Another envelope of a fact we hold: kept for catch-up only.
                out.push(Appended::Duplicate {
                    seq: first,
                    id,
                    ts_ms: ts,
                    by_key: keyed,
                });
                continue;
            }
            let first = FirstCopy {
                seq,
                received_ms,
                ts_ms: stored.event.ts_ms,
                id: Some(stored.event.id.clone()),
            };
            dedup::take_over(
                &mut self.dedup_count,
                h,
                earlier.as_ref(),
                first,
                g.batch,
                g.hashes,
            );
            g.batch.insert(key_i(&stored.event.id), &seq.to_be_bytes());
            if let Some(c) = &stored.event.correlation_id {
                g.batch.insert(key_k(c, seq), &[]);
            }
            out.push(Appended::New {
                seq,
                event: Arc::new(stored.event),
            });
        }
        self.last_received = received_ms;
        Ok(out)
    }

    /// Record that `seq` of `source` is now held (`skip`: or given up, with
    /// everything before it), then move the contiguous mark over every
    /// sequence held after it.
    fn advance_source(
        &mut self,
        source: &str,
        seq: u64,
        skip: bool,
        held: &std::collections::HashSet<(String, u64)>,
    ) -> Result<(), StoreError> {
        let m = self
            .sources
            .entry(source.to_string())
            .or_insert_with(|| SourceMark {
                source: source.to_string(),
                ..Default::default()
            });
        m.max_seen = m.max_seen.max(seq);
        if seq == m.contiguous + 1 || (skip && seq > m.contiguous) {
            m.contiguous = seq;
        } else {
            return Ok(());
        }
        loop {
            let next = m.contiguous + 1;
            if held.contains(&(source.to_string(), next))
                || self.db.contains_key(key_o(source, next))?
            {
                m.contiguous = next;
                m.max_seen = m.max_seen.max(next);
            } else {
                return Ok(());
            }
        }
    }
}
