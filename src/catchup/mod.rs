//! Catch-up between agents, as plain state machines fed with inputs and a
//! `now` (no I/O): per-source version vectors, what to fetch from a peer, and
//! the reorder buffer that keeps each source's events in sequence order.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::event::Event;

pub mod driver;
pub mod plan;

/// What an agent holds of one source: every sequence number up to
/// `contiguous` (less those removed by retention), and nothing above `max_seen`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceMark {
    pub source: String,
    pub contiguous: u64,
    pub max_seen: u64,
    /// When an event of this source was last accepted (ms since epoch); local only,
    /// not sent on the wire meaningfully (receivers ignore it).
    pub last_ms: u64,
}

/// Ranges to ask a peer for: for every source the peer holds further than we
/// do, start right after our contiguous mark. One entry per source.
pub fn wants(local: &[SourceMark], remote: &[SourceMark]) -> Vec<(String, u64)> {
    let mine: HashMap<&str, u64> = local
        .iter()
        .map(|m| (m.source.as_str(), m.contiguous))
        .collect();
    let mut out: Vec<(String, u64)> = remote
        .iter()
        .filter_map(|r| {
            let have = mine.get(r.source.as_str()).copied().unwrap_or(0);
            (r.contiguous > have).then(|| (r.source.clone(), have + 1))
        })
        .collect();
    out.sort();
    out
}

#[derive(Clone, Debug)]
pub struct ReorderConfig {
    /// How long an event waits for a missing earlier one of its source,
    /// counted from the last progress on that source.
    pub hold: Duration,
    /// Most events held across all sources; beyond it the oldest gap gives way.
    pub max_held: usize,
}

impl Default for ReorderConfig {
    fn default() -> Self {
        Self {
            hold: Duration::from_secs(10),
            max_held: 100_000,
        }
    }
}

#[derive(Default)]
struct Pending {
    /// Next sequence number this source may append.
    next: u64,
    held: BTreeMap<u64, Event>,
    /// Last time this source made progress (an event released or arrived in order).
    progress: Option<Instant>,
    /// Ranges (first → last, inclusive) that later events were released past
    /// when the hold expired: still wanted, fetched and stored when they come.
    missing: BTreeMap<u64, u64>,
}

impl Pending {
    /// One missing event arrived.
    fn arrived(&mut self, seq: u64) {
        let Some((&first, &last)) = self.missing.range(..=seq).next_back() else {
            return;
        };
        if seq > last {
            return;
        }
        self.missing.remove(&first);
        if first < seq {
            self.missing.insert(first, seq - 1);
        }
        if seq < last {
            self.missing.insert(seq + 1, last);
        }
    }

    /// Everything up to `upto` is stored (or gone past retention).
    fn settled(&mut self, upto: u64) {
        let mut keep = self.missing.split_off(&upto.saturating_add(1));
        if let Some((_, &last)) = self.missing.iter().next_back() {
            if last > upto {
                keep.insert(upto + 1, last);
            }
        }
        self.missing = keep;
    }
}

/// What the reorder buffer decided for one input.
#[derive(Debug, Default)]
pub struct Released {
    /// Events to append, in order.
    pub ready: Vec<Event>,
    /// Gaps to fetch: (source, from, to) inclusive.
    pub gaps: Vec<(String, u64, u64)>,
    /// Gaps later events were released past (hold expired or buffer full):
    /// (source, from, to) inclusive. The missing events are still wanted.
    pub skipped: Vec<(String, u64, u64)>,
}

/// Holds a source's event n+1 until its event n is appended, for at most
/// `hold` after the source last made progress.
pub struct Reorder {
    cfg: ReorderConfig,
    /// Ordered by source, so that the planner built on it replays exactly.
    sources: BTreeMap<String, Pending>,
    held: usize,
}

impl Reorder {
    pub fn new(cfg: ReorderConfig) -> Self {
        Self {
            cfg,
            sources: BTreeMap::new(),
            held: 0,
        }
    }

    pub fn held(&self) -> usize {
        self.held
    }

    /// The lowest sequence of `source` still wanted (1 if unknown): the first
    /// one released past and not yet arrived, else the next one expected.
    pub fn next_expected(&self, source: &str) -> u64 {
        self.sources.get(source).map_or(1, |p| {
            p.missing.keys().next().map_or(p.next, |&m| m.min(p.next))
        })
    }

    /// Sources with events released past and not yet arrived, and the first
    /// such sequence.
    pub fn missing(&self) -> Vec<(String, u64)> {
        self.sources
            .iter()
            .filter_map(|(s, p)| p.missing.keys().next().map(|&m| (s.clone(), m)))
            .collect()
    }

    /// Whether this source is known to the buffer (its next sequence set).
    pub fn knows(&self, source: &str) -> bool {
        self.sources.contains_key(source)
    }

    /// Tell the buffer that everything up to `contiguous` of `source` is stored.
    pub fn set_contiguous(
        &mut self,
        source: &str,
        contiguous: u64,
        now: Instant,
        out: &mut Released,
    ) {
        let p = self.sources.entry(source.to_string()).or_default();
        if contiguous + 1 > p.next {
            p.next = contiguous + 1;
            p.progress = Some(now);
        }
        p.settled(contiguous);
        Self::drain(p, source, &mut self.held, out);
    }

    /// Offer one verified event. Earlier-than-expected events pass through (the
    /// store drops what it already holds, and keeps a late one rather than lose it).
    pub fn offer(&mut self, ev: Event, now: Instant, out: &mut Released) {
        let source = ev.source.clone();
        let p = self
            .sources
            .entry(source.clone())
            .or_insert_with(|| Pending {
                next: 1,
                ..Default::default()
            });
        if ev.seq < p.next {
            p.arrived(ev.seq);
            out.ready.push(ev);
            return;
        }
        if ev.seq == p.next {
            p.next += 1;
            p.progress = Some(now);
            out.ready.push(ev);
            Self::drain(p, &source, &mut self.held, out);
            return;
        }
        // A gap: hold it and ask for what is missing.
        let from = p.next;
        let first_hold = p.held.is_empty();
        if p.held.insert(ev.seq, ev).is_none() {
            self.held += 1;
        }
        if p.progress.is_none() {
            p.progress = Some(now);
        }
        let to = *p.held.keys().next().unwrap_or(&from) - 1;
        if first_hold || to >= from {
            out.gaps.push((source, from, to));
        }
        while self.held > self.cfg.max_held {
            if !self.give_up_oldest(out) {
                break;
            }
        }
    }

    /// Sources waiting on a gap, and how long the oldest has waited.
    pub fn open_gaps(&self, now: Instant) -> (usize, Duration) {
        let waiting = self.sources.values().filter(|p| !p.held.is_empty());
        let mut n = 0;
        let mut age = Duration::ZERO;
        for p in waiting {
            n += 1;
            if let Some(t) = p.progress {
                age = age.max(now.duration_since(t));
            }
        }
        (n, age)
    }

    /// Sources holding events behind a gap, and the sequence they wait for.
    pub fn gapped(&self) -> Vec<(String, u64)> {
        self.sources
            .iter()
            .filter(|(_, p)| !p.held.is_empty())
            .map(|(s, p)| (s.clone(), p.next))
            .collect()
    }

    /// Release sources whose hold expired.
    pub fn tick(&mut self, now: Instant, out: &mut Released) {
        let hold = self.cfg.hold;
        let expired: Vec<String> = self
            .sources
            .iter()
            .filter(|(_, p)| {
                !p.held.is_empty() && p.progress.is_none_or(|t| now.duration_since(t) >= hold)
            })
            .map(|(s, _)| s.clone())
            .collect();
        for s in expired {
            self.skip_gap(&s, now, out);
        }
    }

    fn give_up_oldest(&mut self, out: &mut Released) -> bool {
        let oldest = self
            .sources
            .iter()
            .filter(|(_, p)| !p.held.is_empty())
            .min_by_key(|(_, p)| p.progress)
            .map(|(s, p)| (s.clone(), p.progress));
        match oldest {
            Some((s, progress)) => {
                self.skip_gap(&s, progress.unwrap_or_else(Instant::now), out);
                true
            }
            None => false,
        }
    }

    /// Stop holding back `source` behind its first gap: release its held
    /// events from the first one on. The gap is remembered as missing, so it is
    /// still fetched (and stored, after its successors, when it comes).
    fn skip_gap(&mut self, source: &str, now: Instant, out: &mut Released) {
        let Some(p) = self.sources.get_mut(source) else {
            return;
        };
        let Some(&first) = p.held.keys().next() else {
            return;
        };
        out.skipped.push((source.to_string(), p.next, first - 1));
        p.missing.insert(p.next, first - 1);
        p.next = first;
        p.progress = Some(now);
        Self::drain(p, source, &mut self.held, out);
    }

    fn drain(p: &mut Pending, _source: &str, held: &mut usize, out: &mut Released) {
        // Drop held events the store already has, then release the run that follows.
        while let Some((&s, _)) = p.held.first_key_value() {
            if s < p.next {
                if let Some((_, ev)) = p.held.pop_first() {
                    *held -= 1;
                    out.ready.push(ev);
                }
            } else if s == p.next {
                if let Some((_, ev)) = p.held.pop_first() {
                    *held -= 1;
                    p.next += 1;
                    out.ready.push(ev);
                }
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::Draft;
    use libp2p::identity::Keypair;

    /// A sealed event of `key`'s source with sequence number `seq`.
    pub(crate) fn ev(key: &Keypair, seq: u64) -> Event {
        Draft::new(
            "CUSTOM_T",
            &serde_json::json!({ "n": seq }),
            None,
            None,
            None,
        )
        .unwrap()
        .seal(key, seq, 1)
        .unwrap()
    }

    #[test]
    fn later_event_waits_for_earlier_then_both_go_in_order() {
        let k = Keypair::generate_ed25519();
        let mut r = Reorder::new(ReorderConfig::default());
        let t0 = Instant::now();
        let mut out = Released::default();
        r.offer(ev(&k, 1), t0, &mut out);
        r.offer(ev(&k, 3), t0, &mut out);
        r.offer(ev(&k, 4), t0, &mut out);
        assert_eq!(out.ready.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(out.gaps[0].1..=out.gaps[0].2, 2..=2);
        assert_eq!(r.held(), 2);
        let mut out = Released::default();
        r.offer(ev(&k, 2), t0, &mut out);
        assert_eq!(
            out.ready.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(r.held(), 0);
        // A copy of an old one passes through to the store (which drops it).
        let mut out = Released::default();
        r.offer(ev(&k, 2), t0, &mut out);
        assert_eq!(out.ready.len(), 1);
    }

    #[test]
    fn hold_expires_and_the_gap_is_skipped_in_order() {
        let k = Keypair::generate_ed25519();
        let mut r = Reorder::new(ReorderConfig {
            hold: Duration::from_secs(10),
            max_held: 100,
        });
        let t0 = Instant::now();
        let mut out = Released::default();
        r.set_contiguous(&k.public().to_peer_id().to_base58(), 5, t0, &mut out);
        r.offer(ev(&k, 8), t0, &mut out);
        r.offer(ev(&k, 7), t0, &mut out);
        assert!(out.ready.is_empty());
        r.tick(t0 + Duration::from_secs(9), &mut out);
        assert!(out.ready.is_empty());
        r.tick(t0 + Duration::from_secs(10), &mut out);
        assert_eq!(
            out.ready.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![7, 8]
        );
        assert_eq!(out.skipped[0].1..=out.skipped[0].2, 6..=6);
    }

    #[test]
    fn a_gap_released_past_is_still_wanted_until_it_arrives() {
        let k = Keypair::generate_ed25519();
        let src = k.public().to_peer_id().to_base58();
        let mut r = Reorder::new(ReorderConfig {
            hold: Duration::from_secs(10),
            max_held: 100,
        });
        let t0 = Instant::now();
        let mut out = Released::default();
        r.set_contiguous(&src, 5, t0, &mut out);
        r.offer(ev(&k, 9), t0, &mut out);
        r.tick(t0 + Duration::from_secs(10), &mut out);
        assert_eq!(out.skipped[0].1..=out.skipped[0].2, 6..=8);
        // Released past, but still the first sequence to fetch.
        assert_eq!(r.next_expected(&src), 6);
        assert_eq!(r.missing(), vec![(src.clone(), 6)]);
        let mut out = Released::default();
        r.offer(ev(&k, 7), t0, &mut out);
        assert_eq!(out.ready.len(), 1);
        assert_eq!(r.next_expected(&src), 6);
        r.offer(ev(&k, 6), t0, &mut out);
        assert_eq!(r.next_expected(&src), 8);
        r.offer(ev(&k, 8), t0, &mut out);
        assert_eq!(r.next_expected(&src), 10);
        assert!(r.missing().is_empty());
        // The store's mark settles what it covers (e.g. a retention floor).
        r.offer(ev(&k, 12), t0, &mut out);
        r.tick(t0 + Duration::from_secs(30), &mut out);
        assert_eq!(r.next_expected(&src), 10);
        r.set_contiguous(&src, 10, t0, &mut out);
        assert_eq!(r.next_expected(&src), 11);
        r.set_contiguous(&src, 12, t0, &mut out);
        assert_eq!(r.next_expected(&src), 13);
        assert!(r.missing().is_empty());
    }

    #[test]
    fn buffer_bound_gives_way() {
        let k = Keypair::generate_ed25519();
        let mut r = Reorder::new(ReorderConfig {
            hold: Duration::from_secs(600),
            max_held: 3,
        });
        let t0 = Instant::now();
        let mut out = Released::default();
        for s in [10, 11, 12, 13] {
            r.offer(ev(&k, s), t0, &mut out);
        }
        assert!(r.held() <= 3);
        assert_eq!(
            out.ready.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![10, 11, 12, 13]
        );
    }

    #[test]
    fn wants_asks_only_for_what_the_peer_has_beyond_us() {
        let m = |s: &str, c: u64| SourceMark {
            source: s.into(),
            contiguous: c,
            max_seen: c,
            last_ms: 0,
        };
        let w = wants(&[m("a", 5), m("b", 9)], &[m("a", 7), m("b", 3), m("c", 2)]);
        assert_eq!(w, vec![("a".to_string(), 6), ("c".to_string(), 1)]);
    }
}
