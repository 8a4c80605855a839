//! The plan of a fetch, sans-IO, driven by the fetch loop with explicit
//! times: which chunk to ask of which source next ([`Sched`]), and when to
//! ask peers who holds what, record progress, switch to index order or
//! give up ([`Search`] before the manifest, [`Pace`] after).
//!
//! - Chunks are taken in an order shuffled per transfer, so receivers of the
//!   same blob hold different chunks early and serve each other. A receiver
//!   that finds itself alone (no other peer fetching the blob) switches to
//!   index order ([`Sched::sequential`]), so the whole-file hash can follow
//!   the arrivals in memory instead of reading the file back.
//! - A source holding the whole blob is asked for the chunks no partial
//!   source holds ("rarest first" toward the origin): with several
//!   receivers, the origin's upload goes to chunks the swarm lacks, not to a
//!   second copy of one a receiver could trade. When the partial sources
//!   cannot keep this receiver busy (fewer than `per_source` requests in
//!   flight), the whole-blob source takes any missing chunk. Among other
//!   receivers, each asks a whole-blob source for at most `per_source /
//!   (partial sources + 1)` chunks at once (rounded up): a request queued behind many
//!   others at a shared origin is invisible to the other receivers, who ask
//!   for the same rare chunk meanwhile.
//! - Each source gets up to `per_source` requests in flight.
//! - A failing source is skipped for a backoff that doubles per failure in a
//!   row (1 s to 30 s): a circuit breaker; a success closes it.
//! - A source that serves a chunk failing verification is dropped for this
//!   transfer after the second such chunk.
//! - Sources are asked again every [`SOURCE_REFRESH`]; a transfer with no
//!   chunk and nothing in flight for its stall time ([`STALL`] unless
//!   configured: `sync_stall`) fails.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::objects::Bitmap;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Bad chunks after which a source is dropped.
const MAX_BAD: u32 = 2;
/// Positions of the order a whole-blob source's pick looks at for a chunk
/// no partial source holds before it falls back (bounds the work of one
/// pick on blobs of many chunks).
const RARE_SCAN: usize = 4096;

#[derive(Debug)]
struct Source {
    /// None: holds the whole blob.
    chunks: Option<Bitmap>,
    inflight: usize,
    fails: u32,
    open_until: Option<Instant>,
    bad: u32,
    /// Position in `order` this source scans from.
    cursor: usize,
}

impl Source {
    fn holds(&self, i: u32) -> bool {
        self.chunks.as_ref().is_none_or(|b| b.get(i))
    }
}

pub struct Sched {
    have: Bitmap,
    order: Vec<u32>,
    inflight: HashMap<u32, PeerId>,
    /// Chunks to ask again (failed or bad), before the order.
    retry: VecDeque<u32>,
    sources: HashMap<PeerId, Source>,
    per_source: usize,
    sequential: bool,
}

impl Sched {
    pub fn new(have: Bitmap, per_source: usize, seed: u64) -> Sched {
        let mut order: Vec<u32> = (0..have.len).filter(|i| !have.get(*i)).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        Sched {
            have,
            order,
            inflight: HashMap::new(),
            retry: VecDeque::new(),
            sources: HashMap::new(),
            per_source: per_source.max(1),
            sequential: false,
        }
    }

    /// From now on, missing chunks in index order (this receiver is alone:
    /// no order to spread among others, and the whole-file hash follows
    /// the arrivals).
    pub fn sequential(&mut self) {
        if !self.sequential {
            self.sequential = true;
            self.order.sort_unstable();
            for s in self.sources.values_mut() {
                s.cursor = 0;
            }
        }
    }

    pub fn is_sequential(&self) -> bool {
        self.sequential
    }

    /// Does a usable partial source hold chunk `i`?
    fn held_by_partial(&self, i: u32, now: Instant) -> bool {
        self.sources
            .values()
            .any(|s| s.chunks.as_ref().is_some_and(|b| b.get(i)) && Self::usable(s, now))
    }

    pub fn have(&self) -> &Bitmap {
        &self.have
    }

    /// A peer holds the blob (`None`) or these chunks. Ignored for a source
    /// dropped for bad chunks, or with a bitmap of the wrong size.
    pub fn source(&mut self, peer: PeerId, chunks: Option<Bitmap>, _now: Instant) {
        if let Some(b) = &chunks {
            if !b.fits(self.have.len as usize) {
                return;
            }
        }
        match self.sources.get_mut(&peer) {
            Some(s) if s.bad >= MAX_BAD => {}
            Some(s) => {
                // New chunks may lie behind the cursor.
                if s.chunks.is_some() && chunks != s.chunks {
                    s.cursor = 0;
                }
                s.chunks = chunks;
            }
            None => {
                self.sources.insert(
                    peer,
                    Source {
                        chunks,
                        inflight: 0,
                        fails: 0,
                        open_until: None,
                        bad: 0,
                        cursor: 0,
                    },
                );
            }
        }
    }

    fn usable(s: &Source, now: Instant) -> bool {
        s.bad < MAX_BAD && s.open_until.is_none_or(|t| now >= t)
    }

    /// Sources that may be asked now.
    pub fn usable_sources(&self, now: Instant) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self
            .sources
            .iter()
            .filter(|(_, s)| Self::usable(s, now))
            .map(|(p, _)| *p)
            .collect();
        v.sort();
        v
    }

    fn wanted(&self, i: u32) -> bool {
        !self.have.get(i) && !self.inflight.contains_key(&i)
    }

    /// Requests to send now: (source, chunk), at most `per_source` in flight
    /// per source.
    pub fn assign(&mut self, now: Instant) -> Vec<(PeerId, u32)> {
        let mut out = Vec::new();
        let mut peers = self.usable_sources(now);
        // Whole-blob holders last: partial holders' chunks are the scarce ones.
        peers.sort_by_key(|p| self.sources[p].chunks.is_none());
        let partials = peers
            .iter()
            .filter(|p| self.sources[p].chunks.is_some())
            .count();
        // Among other receivers, a whole-blob source's queue is shared:
        // about `per_source` requests in all, split among them.
        let whole_cap = if partials > 0 {
            self.per_source.div_ceil(partials + 1).max(1)
        } else {
            self.per_source
        };
        let partials = partials > 0;
        for p in peers {
            loop {
                let s = &self.sources[&p];
                let cap = if s.chunks.is_none() {
                    whole_cap
                } else {
                    self.per_source
                };
                if s.inflight >= cap {
                    break;
                }
                // Retries first (if this source holds one).
                let pos = self
                    .retry
                    .iter()
                    .position(|i| self.wanted(*i) && self.sources[&p].holds(*i));
                // A whole-blob source, with partial sources about: first
                // a chunk none of them holds, unless they leave this
                // receiver short of work.
                let rare_only =
                    s.chunks.is_none() && partials && self.inflight.len() >= self.per_source;
                let pick = if let Some(k) = pos {
                    self.retry.remove(k)
                } else {
                    self.scan(p, rare_only.then_some(now))
                };
                let Some(i) = pick else { break };
                self.inflight.insert(i, p);
                if let Some(s) = self.sources.get_mut(&p) {
                    s.inflight += 1;
                }
                out.push((p, i));
            }
        }
        out
    }

    /// The first chunk from `p`'s cursor that is wanted and held by `p`;
    /// with `rare` (the time), also held by no usable partial source, looked
    /// for among at most [`RARE_SCAN`] positions. The cursor moves past
    /// chunks that are done, in flight elsewhere (a failure puts them on
    /// `retry`) or not held by `p` (a new bitmap from it rewinds the
    /// cursor), never past one skipped for rarity (`p` may be asked for it
    /// later).
    fn scan(&mut self, p: PeerId, rare: Option<Instant>) -> Option<u32> {
        let s = self.sources.get(&p)?;
        let start = s.cursor;
        let mut c = start;
        let mut settled = start;
        let mut found = None;
        while c < self.order.len() && (rare.is_none() || c - start < RARE_SCAN) {
            let i = self.order[c];
            c += 1;
            let blocked = settled != c - 1;
            if !self.wanted(i) || !s.holds(i) {
                if !blocked {
                    settled = c;
                }
                continue;
            }
            if rare.is_some_and(|now| self.held_by_partial(i, now)) {
                continue;
            }
            found = Some(i);
            if !blocked {
                settled = c;
            }
            break;
        }
        if let Some(s) = self.sources.get_mut(&p) {
            s.cursor = settled;
        }
        found
    }

    fn release(&mut self, peer: PeerId, i: u32) -> Option<&mut Source> {
        if self.inflight.get(&i) == Some(&peer) {
            self.inflight.remove(&i);
        }
        let s = self.sources.get_mut(&peer)?;
        s.inflight = s.inflight.saturating_sub(1);
        Some(s)
    }

    pub fn on_ok(&mut self, peer: PeerId, i: u32) {
        self.have.set(i);
        if let Some(s) = self.release(peer, i) {
            s.fails = 0;
            s.open_until = None;
        }
    }

    /// The source failed to answer: open its breaker for a while.
    pub fn on_fail(&mut self, peer: PeerId, i: u32, now: Instant) {
        if let Some(s) = self.release(peer, i) {
            s.fails += 1;
            let back = BACKOFF_MIN
                .saturating_mul(1 << (s.fails - 1).min(5))
                .min(BACKOFF_MAX);
            s.open_until = Some(now + back);
            // Anything it still has in flight will come back on its own.
        }
        self.retry.push_back(i);
    }

    /// The source is busy: a short pause, no failure counted.
    pub fn on_busy(&mut self, peer: PeerId, i: u32, now: Instant) {
        if let Some(s) = self.release(peer, i) {
            s.open_until = Some(now + Duration::from_millis(200));
        }
        self.retry.push_back(i);
    }

    /// The chunk failed verification: penalize, ask elsewhere.
    pub fn on_bad(&mut self, peer: PeerId, i: u32, now: Instant) {
        if let Some(s) = self.release(peer, i) {
            s.bad += 1;
            s.open_until = Some(now + BACKOFF_MIN);
        }
        self.retry.push_back(i);
    }

    /// The source says it does not hold the chunk (after all).
    pub fn on_missing(&mut self, peer: PeerId, i: u32) {
        let n = self.have.len as usize;
        if let Some(s) = self.release(peer, i) {
            if let Some(b) = s.chunks.as_mut() {
                // Forget that it had it.
                b.bits[(i / 8) as usize] &= !(1 << (i % 8));
            } else {
                // Claimed the whole blob, lacks a chunk: treat as partial
                // knowledge until its next answer.
                let mut b = Bitmap::full(n);
                b.bits[(i / 8) as usize] &= !(1 << (i % 8));
                s.chunks = Some(b);
            }
        }
        self.retry.push_back(i);
    }

    pub fn is_dropped(&self, peer: &PeerId) -> bool {
        self.sources.get(peer).is_some_and(|s| s.bad >= MAX_BAD)
    }
}

/// How often a transfer asks its peers who holds what.
pub const SOURCE_REFRESH: Duration = Duration::from_millis(500);
/// A starved transfer (no usable source, nothing in flight) asks again
/// after this long, whatever [`SOURCE_REFRESH`] says.
const STARVED_REFRESH: Duration = Duration::from_millis(500);
/// A transfer with no chunk and nothing in flight for this long fails
/// (the default of `sync_stall`).
pub const STALL: Duration = Duration::from_secs(60);
/// Longest time verified chunks wait to be made durable and recorded; also
/// how often the transfer's status is refreshed.
pub const CHECKPOINT: Duration = Duration::from_secs(1);
/// The span over which the transfer rate is averaged.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Before the manifest: peers are asked who holds the blob every
/// [`SOURCE_REFRESH`] until one serves a manifest matching the signed
/// root; the search gives up when no peer has held it for [`STALL`].
pub struct Search {
    last_seen: Instant,
    stall: Duration,
}

impl Search {
    pub fn new(now: Instant, stall: Duration) -> Search {
        Search {
            last_seen: now,
            stall,
        }
    }

    /// A round of asking ended at `now` without a manifest; `found`: some
    /// peer said it holds the blob. The wait before the next round, or
    /// `None`: give up.
    pub fn next_round(&mut self, found: bool, now: Instant) -> Option<Duration> {
        if found {
            self.last_seen = now;
        }
        (now.duration_since(self.last_seen) <= self.stall).then_some(SOURCE_REFRESH)
    }
}

/// After the manifest, beside [`Sched`]: when to ask peers who holds what,
/// when to record verified chunks and refresh the status, whether to take
/// chunks in index order, and when to give up.
pub struct Pace {
    last_refresh: Instant,
    /// The last status refresh (and the clock of the checkpoint's timer).
    last_status: Instant,
    last_progress: Instant,
    /// Chunks received in the last [`RATE_WINDOW`]: (when, bytes).
    window: Vec<(Instant, u64)>,
    /// Whether another peer fetches this blob too (a source with only some
    /// chunks), decided at the first source refresh (every receiver of a
    /// fan-out has begun by then).
    others: bool,
    order_decided: bool,
    stall: Duration,
}

impl Pace {
    pub fn new(now: Instant, stall: Duration) -> Pace {
        Pace {
            stall,
            last_refresh: now,
            last_status: now,
            last_progress: now,
            window: Vec::new(),
            others: false,
            order_decided: false,
        }
    }

    /// Sources were learnt (at the start, or from a refresh); `partial`:
    /// one of them holds only some chunks (it is fetching the blob too).
    pub fn on_sources(&mut self, partial: bool) {
        self.others |= partial;
    }

    /// A source refresh came back (after [`Pace::on_sources`] for what it
    /// found). True once, at the first: nobody else fetches the blob, so
    /// take the chunks in index order ([`Sched::sequential`]).
    pub fn on_refreshed(&mut self) -> bool {
        if self.order_decided {
            return false;
        }
        self.order_decided = true;
        !self.others
    }

    /// A verified chunk of `len` bytes arrived.
    pub fn on_chunk(&mut self, len: u64, now: Instant) {
        self.window.push((now, len));
        self.last_progress = now;
    }

    /// Whether to start a checkpoint (make verified chunks durable and
    /// record them) with `unrecorded` chunks verified since the last one
    /// and none `running`: once half a source window has piled up (a crash
    /// loses about a window of received work at most), or every
    /// [`CHECKPOINT`], or when the blob is `full`.
    pub fn checkpoint_due(
        &self,
        running: bool,
        unrecorded: usize,
        per_source: usize,
        full: bool,
        now: Instant,
    ) -> bool {
        !running
            && (unrecorded >= (per_source / 2).max(1)
                || (unrecorded > 0 && (now.duration_since(self.last_status) >= CHECKPOINT || full)))
    }

    /// Every [`CHECKPOINT`], and when the blob is `full`: time to refresh
    /// the status, at this rate (bytes per second over [`RATE_WINDOW`]).
    pub fn status_due(&mut self, full: bool, now: Instant) -> Option<f64> {
        if now.duration_since(self.last_status) < CHECKPOINT && !full {
            return None;
        }
        self.last_status = now;
        self.window
            .retain(|(t, _)| now.duration_since(*t) < RATE_WINDOW);
        let bytes: u64 = self.window.iter().map(|(_, l)| *l).sum();
        Some(bytes as f64 / RATE_WINDOW.as_secs_f64())
    }

    /// Whether to ask peers who holds what now, none such request
    /// `running`; `starved`: no usable source and nothing in flight.
    pub fn refresh_due(&mut self, running: bool, starved: bool, now: Instant) -> bool {
        let since = now.duration_since(self.last_refresh);
        let due = !running && (since >= SOURCE_REFRESH || (starved && since >= STARVED_REFRESH));
        if due {
            self.last_refresh = now;
        }
        due
    }

    /// Give up: nothing in flight (`idle`) and no chunk for the stall time.
    pub fn stalled(&self, idle: bool, now: Instant) -> bool {
        idle && now.duration_since(self.last_progress) > self.stall
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    fn drain(s: &mut Sched, now: Instant) -> usize {
        let mut n = 0;
        loop {
            let a = s.assign(now);
            if a.is_empty() {
                return n;
            }
            for (p, i) in a {
                s.on_ok(p, i);
                n += 1;
            }
        }
    }

    #[test]
    fn fetches_every_missing_chunk_once() {
        let mut have = Bitmap::new(100);
        have.set(3);
        let mut s = Sched::new(have, 4, 1);
        let (a, b) = (peer(), peer());
        let now = Instant::now();
        s.source(a, None, now);
        s.source(b, None, now);
        let first = s.assign(now);
        assert_eq!(first.len(), 8);
        let mut seen: Vec<u32> = first.iter().map(|x| x.1).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 8);
        assert!(!seen.contains(&3));
        for (p, i) in first {
            s.on_ok(p, i);
        }
        assert_eq!(drain(&mut s, now), 99 - 8);
        assert!(s.have().is_full());
    }

    #[test]
    fn partial_sources_get_only_what_they_hold() {
        let mut s = Sched::new(Bitmap::new(10), 8, 2);
        let p = peer();
        let mut held = Bitmap::new(10);
        held.set(2);
        held.set(7);
        let now = Instant::now();
        s.source(p, Some(held.clone()), now);
        let a = s.assign(now);
        let mut got: Vec<u32> = a.iter().map(|x| x.1).collect();
        got.sort();
        assert_eq!(got, vec![2, 7]);
        for (p, i) in a {
            s.on_ok(p, i);
        }
        assert!(s.assign(now).is_empty());
        // It got more chunks: new ones are found, even behind its cursor.
        held.set(0);
        held.set(9);
        s.source(p, Some(held), now);
        let mut got: Vec<u32> = s.assign(now).iter().map(|x| x.1).collect();
        got.sort();
        assert_eq!(got, vec![0, 9]);
    }

    #[test]
    fn failing_source_backs_off_and_others_take_over() {
        let mut s = Sched::new(Bitmap::new(4), 1, 3);
        let (bad, good) = (peer(), peer());
        let t0 = Instant::now();
        s.source(bad, None, t0);
        let a = s.assign(t0);
        assert_eq!(a.len(), 1);
        s.on_fail(bad, a[0].1, t0);
        assert!(s.usable_sources(t0).is_empty());
        s.source(good, None, t0);
        let b = s.assign(t0);
        assert_eq!(
            b,
            vec![(good, a[0].1)],
            "the failed chunk is retried first, elsewhere"
        );
        s.on_ok(good, a[0].1);
        // A second failure in a row doubles the pause.
        let t1 = t0 + Duration::from_millis(1000);
        assert!(s.usable_sources(t1).contains(&bad));
        let c = s.assign(t1);
        let (p, i) = *c.iter().find(|x| x.0 == bad).unwrap();
        s.on_fail(p, i, t1);
        assert!(!s
            .usable_sources(t1 + Duration::from_millis(1500))
            .contains(&bad));
        assert!(s
            .usable_sources(t1 + Duration::from_millis(2000))
            .contains(&bad));
    }

    #[test]
    fn a_source_serving_bad_chunks_is_dropped() {
        let mut s = Sched::new(Bitmap::new(4), 1, 4);
        let (liar, honest) = (peer(), peer());
        let mut t = Instant::now();
        s.source(liar, None, t);
        for _ in 0..2 {
            let a = s.assign(t);
            let (p, i) = a[0];
            assert_eq!(p, liar);
            s.on_bad(p, i, t);
            t += Duration::from_secs(2);
        }
        assert!(s.is_dropped(&liar));
        assert!(s.assign(t).is_empty());
        s.source(liar, None, t);
        assert!(s.is_dropped(&liar), "its next Have does not bring it back");
        s.source(honest, None, t);
        assert_eq!(drain(&mut s, t), 4);
    }

    #[test]
    fn alone_a_receiver_takes_chunks_in_index_order() {
        let mut have = Bitmap::new(64);
        for i in [0, 5, 6, 40] {
            have.set(i);
        }
        let mut s = Sched::new(have, 4, 7);
        let now = Instant::now();
        let (a, b) = (peer(), peer());
        s.source(a, None, now);
        // Shuffled before: some chunk of the first batch is out of order.
        let first: Vec<u32> = s.assign(now).iter().map(|x| x.1).collect();
        assert_eq!(first.len(), 4);
        for i in &first {
            s.on_ok(a, *i);
        }
        s.sequential();
        assert!(s.is_sequential());
        s.source(b, None, now);
        let mut got = Vec::new();
        loop {
            let batch = s.assign(now);
            if batch.is_empty() {
                break;
            }
            for (p, i) in batch {
                got.push(i);
                s.on_ok(p, i);
            }
        }
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(got, sorted, "every chunk after the switch in index order");
        assert_eq!(got.len(), 64 - 4 - first.len());
        assert!(s.have().is_full());
    }

    #[test]
    fn the_origin_is_asked_for_what_no_partial_source_holds() {
        let n = 32;
        let mut s = Sched::new(Bitmap::new(n), 4, 9);
        let now = Instant::now();
        let (origin, peer_a) = (peer(), peer());
        s.source(origin, None, now);
        let mut traded = Bitmap::new(n);
        for i in 0..16 {
            traded.set(i);
        }
        s.source(peer_a, Some(traded), now);
        let a = s.assign(now);
        let from_peer: Vec<u32> = a.iter().filter(|x| x.0 == peer_a).map(|x| x.1).collect();
        let from_origin: Vec<u32> = a.iter().filter(|x| x.0 == origin).map(|x| x.1).collect();
        assert_eq!(from_peer.len(), 4);
        assert!(from_peer.iter().all(|i| *i < 16));
        assert_eq!(
            from_origin.len(),
            2,
            "one other receiver: the origin's share of per_source is halved"
        );
        assert!(
            from_origin.iter().all(|i| *i >= 16),
            "the origin serves only chunks the swarm lacks: {from_origin:?}"
        );
        // Every rare chunk asked for: the origin gets nothing more while
        // the partial source keeps this receiver busy...
        for (p, i) in a.iter().filter(|x| x.0 == origin) {
            s.on_ok(*p, *i);
        }
        loop {
            let more = s.assign(now);
            if more.is_empty() {
                break;
            }
            assert!(more.iter().all(|x| x.0 == origin && x.1 >= 16));
            for (p, i) in more {
                s.on_ok(p, i);
            }
        }
        // ...and once the partial source cannot (it failed), the origin
        // takes the rest.
        for i in from_peer {
            s.on_fail(peer_a, i, now);
        }
        assert_eq!(drain(&mut s, now), 16);
        assert!(s.have().is_full());
    }

    #[test]
    fn wrong_size_bitmaps_are_ignored() {
        let mut s = Sched::new(Bitmap::new(10), 1, 5);
        let p = peer();
        s.source(p, Some(Bitmap::new(11)), Instant::now());
        assert!(s.usable_sources(Instant::now()).is_empty());
    }

    #[test]
    fn the_search_gives_up_after_a_stall_with_no_holder() {
        let t0 = Instant::now();
        let mut s = Search::new(t0, STALL);
        let secs = |n: u64| t0 + Duration::from_secs(n);
        assert_eq!(s.next_round(false, secs(1)), Some(SOURCE_REFRESH));
        assert_eq!(s.next_round(false, secs(60)), Some(SOURCE_REFRESH));
        // A holder whose manifest does not match keeps the search going.
        assert!(s.next_round(true, secs(30)).is_some());
        assert!(s.next_round(false, secs(90)).is_some());
        assert_eq!(s.next_round(false, secs(91)), None);
    }

    #[test]
    fn sources_are_refreshed_every_half_second_one_request_at_a_time() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0, STALL);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert!(!p.refresh_due(false, true, ms(499)));
        assert!(!p.refresh_due(true, true, ms(500)), "one already running");
        assert!(p.refresh_due(false, false, ms(500)));
        assert!(!p.refresh_due(false, false, ms(900)));
        assert!(p.refresh_due(false, false, ms(1000)));
    }

    #[test]
    fn checkpoints_follow_half_a_window_or_a_second() {
        let t0 = Instant::now();
        let p = Pace::new(t0, STALL);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert!(p.checkpoint_due(false, 4, 8, false, ms(10)));
        assert!(!p.checkpoint_due(true, 4, 8, false, ms(10)), "one running");
        assert!(!p.checkpoint_due(false, 3, 8, false, ms(999)));
        assert!(p.checkpoint_due(false, 3, 8, false, ms(1000)));
        assert!(
            p.checkpoint_due(false, 1, 8, true, ms(10)),
            "the last chunks"
        );
        assert!(!p.checkpoint_due(false, 0, 8, true, ms(5000)));
        assert!(p.checkpoint_due(false, 1, 1, false, ms(0)));
    }

    #[test]
    fn the_status_is_refreshed_every_second_with_the_rate_over_five_seconds() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0, STALL);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        p.on_chunk(5 << 20, ms(100));
        assert_eq!(p.status_due(false, ms(999)), None);
        assert_eq!(p.status_due(false, ms(1000)), Some((1 << 20) as f64));
        assert_eq!(p.status_due(false, ms(1500)), None);
        assert!(p.status_due(true, ms(1500)).is_some(), "at the end");
        // The chunk of 0.1 s is out of the window at 5.1 s.
        assert_eq!(p.status_due(false, ms(5100)), Some(0.0));
    }

    #[test]
    fn chunks_go_in_index_order_when_the_first_refresh_finds_no_other_receiver() {
        let mut alone = Pace::new(Instant::now(), STALL);
        alone.on_sources(false);
        alone.on_sources(false);
        assert!(alone.on_refreshed());
        assert!(!alone.on_refreshed(), "decided once");
        let mut shared = Pace::new(Instant::now(), STALL);
        shared.on_sources(true);
        shared.on_sources(false);
        assert!(!shared.on_refreshed());
    }

    #[test]
    fn a_fetch_stalls_only_idle_a_minute_after_its_last_chunk() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0, STALL);
        let secs = |n: u64| t0 + Duration::from_secs(n);
        assert!(!p.stalled(true, secs(60)));
        assert!(p.stalled(true, secs(61)));
        assert!(!p.stalled(false, secs(61)), "something in flight");
        p.on_chunk(1, secs(61));
        assert!(!p.stalled(true, secs(121)));
        assert!(p.stalled(true, secs(122)));
    }
}
