//! Consumers: named cursors over the log with their type patterns, and
//! the dead letters they gave up on. Reads here go straight to sled;
//! changes go through the writer ([`Writer::stage_consumer`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::layout::*;
use super::read::seq_before_time;
use super::writer::Writer;
use super::{Op, Store, StoreError};
use crate::codec;
use crate::util::now_ms;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConsumerRec {
    pub name: String,
    pub types: Vec<String>,
    /// Every log entry at or below this sequence is acknowledged.
    pub cursor: u64,
    pub created_ms: u64,
    pub acked_ms: u64,
    pub dead_letters: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub reason: String,
    pub at_ms: u64,
}

/// Where a consumer (re)starts.
#[derive(Clone, Debug, PartialEq)]
pub enum StartAt {
    /// Only events appended after now.
    New,
    /// The oldest retained event.
    Start,
    /// The first event received at or after this time (ms since epoch).
    Since(u64),
    /// After this log sequence number.
    After(u64),
}

pub(super) enum ConsumerChange {
    Upsert {
        types: Option<Vec<String>>,
        start: Option<StartAt>,
    },
    Ack(u64),
    Nack {
        seq: u64,
        reason: String,
    },
    Delete,
}

/// Most log entries a consumer's lag counts through.
pub const LAG_SCAN: usize = 20_000;

impl Store {
    /// A consumer's matching events after its cursor, and whether that count
    /// is exact (it stops at [`LAG_SCAN`] entries of the log).
    pub fn consumer_lag(&self, c: &ConsumerRec) -> (u64, bool) {
        let pats: Vec<crate::event::TypePattern> = c
            .types
            .iter()
            .filter_map(|t| crate::event::TypePattern::parse(t).ok())
            .collect();
        self.pending(c.cursor, LAG_SCAN, &pats)
            .unwrap_or((self.head().saturating_sub(c.cursor), false))
    }

    pub fn consumer(&self, name: &str) -> Result<Option<ConsumerRec>, StoreError> {
        let k = key_c(name);
        self.tree.get(&k)?.map(|v| decode_at(&k, &v)).transpose()
    }

    pub fn consumers(&self) -> Result<Vec<ConsumerRec>, StoreError> {
        self.tree
            .scan_prefix(b"c")
            .map(|r| {
                let (k, v) = r?;
                decode_at(&k, &v)
            })
            .collect()
    }

    pub fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let prefix = prefix_d(name);
        self.tree
            .scan_prefix(prefix)
            .map(|r| {
                let (k, v) = r?;
                decode_at(&k, &v)
            })
            .collect()
    }

    pub async fn upsert_consumer(
        &self,
        name: &str,
        types: Option<Vec<String>>,
        start: Option<StartAt>,
    ) -> Result<ConsumerRec, StoreError> {
        let name = name.to_string();
        self.call(|reply| Op::Consumer {
            name,
            change: ConsumerChange::Upsert { types, start },
            reply,
        })
        .await
    }

    pub async fn ack(&self, name: &str, seq: u64) -> Result<ConsumerRec, StoreError> {
        let name = name.to_string();
        self.call(|reply| Op::Consumer {
            name,
            change: ConsumerChange::Ack(seq),
            reply,
        })
        .await
    }

    pub async fn nack(
        &self,
        name: &str,
        seq: u64,
        reason: String,
    ) -> Result<ConsumerRec, StoreError> {
        let name = name.to_string();
        self.call(|reply| Op::Consumer {
            name,
            change: ConsumerChange::Nack { seq, reason },
            reply,
        })
        .await
    }

    pub async fn delete_consumer(&self, name: &str) -> Result<ConsumerRec, StoreError> {
        let name = name.to_string();
        self.call(|reply| Op::Consumer {
            name,
            change: ConsumerChange::Delete,
            reply,
        })
        .await
    }
}

impl Writer {
    pub(super) fn stage_consumer(
        &mut self,
        name: &str,
        change: ConsumerChange,
        batch: &mut sled::Batch,
        consumers: &mut HashMap<String, Option<ConsumerRec>>,
    ) -> Result<ConsumerRec, StoreError> {
        let current = match consumers.get(name) {
            Some(c) => c.clone(),
            None => {
                let k = key_c(name);
                self.db.get(&k)?.map(|v| decode_at(&k, &v)).transpose()?
            }
        };
        let head = self.next_seq - 1;
        let now = now_ms();
        let check = |seq: u64| {
            if seq > head {
                Err(StoreError::BeyondHead { seq, head })
            } else {
                Ok(())
            }
        };
        let rec = match change {
            ConsumerChange::Upsert { types, start } => {
                let mut rec = current.unwrap_or_else(|| ConsumerRec {
                    name: name.to_string(),
                    types: Vec::new(),
                    cursor: head,
                    created_ms: now,
                    acked_ms: 0,
                    dead_letters: 0,
                });
                if let Some(t) = types {
                    rec.types = t;
                }
                match start {
                    None => {}
                    Some(StartAt::New) => rec.cursor = head,
                    Some(StartAt::Start) => {
                        rec.cursor = self.first.load(Ordering::Acquire).saturating_sub(1)
                    }
                    Some(StartAt::After(s)) => {
                        check(s)?;
                        rec.cursor = s;
                    }
                    Some(StartAt::Since(ms)) => {
                        rec.cursor = seq_before_time(
                            &self.db,
                            self.first.load(Ordering::Acquire),
                            self.next_seq,
                            ms,
                        )?
                    }
                }
                rec
            }
            ConsumerChange::Ack(seq) => {
                let mut rec = current.ok_or_else(|| StoreError::UnknownConsumer(name.into()))?;
                check(seq)?;
                rec.cursor = rec.cursor.max(seq);
                rec.acked_ms = now;
                rec
            }
            ConsumerChange::Nack { seq, reason } => {
                let mut rec = current.ok_or_else(|| StoreError::UnknownConsumer(name.into()))?;
                check(seq)?;
                let dl = DeadLetter {
                    seq,
                    reason,
                    at_ms: now,
                };
                let v = codec::encode(&dl).map_err(|source| StoreError::Corrupt {
                    key: format!("d{name}"),
                    source,
                })?;
                batch.insert(key_d(name, seq), v);
                rec.dead_letters += 1;
                rec.cursor = rec.cursor.max(seq);
                rec.acked_ms = now;
                rec
            }
            ConsumerChange::Delete => {
                let rec = current.ok_or_else(|| StoreError::UnknownConsumer(name.into()))?;
                batch.remove(key_c(name));
                for r in self.db.scan_prefix(prefix_d(name)) {
                    batch.remove(r?.0);
                }
                consumers.insert(name.to_string(), None);
                return Ok(rec);
            }
        };
        let v = codec::encode(&rec).map_err(|source| StoreError::Corrupt {
            key: format!("c{name}"),
            source,
        })?;
        batch.insert(key_c(name), v);
        consumers.insert(name.to_string(), Some(rec.clone()));
        Ok(rec)
    }
}
