//! The catch-up planner: every decision of catch-up as a plain state machine.
//! Inputs carry `now` (and an rng where a peer is drawn); decisions come out
//! as [`Action`]s for the shell ([`super::driver`]) to carry out. Nothing
//! here does I/O, reads a clock or spawns, so a run can be replayed exactly
//! in a unit test.
//!
//! What it decides:
//! - which peer to ask for which range of which source, one fetch chain per
//!   source and one fetch in flight per peer (pacing);
//! - where a gap is asked: of the source itself when connected (it surely
//!   holds its own events; a relay may share the hole), else of the relay
//!   or a connected peer drawn at random, avoiding peers whose fetch of that
//!   source failed in the last [`FETCH_AVOID`];
//! - which released events go to the store at once ("live") and which wait
//!   in the bulk queue, committed a chunk at a time so live events are never
//!   queued behind a whole catch-up;
//! - when a source's own retention floor lets us stop waiting for events.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use rand::Rng;

use super::{wants, Released, Reorder, ReorderConfig, SourceMark};
use crate::event::Event;

/// Events asked for in one fetch.
pub const FETCH_BATCH: u32 = 1000;
/// Catch-up events per store commit.
pub const BULK_CHUNK: usize = 128;
/// Stop fetching while this many fetched events wait for the store.
pub const BULK_HIGH: usize = 8 * FETCH_BATCH as usize;
/// After a failed fetch, that peer is not asked for that source for this long.
pub const FETCH_AVOID: Duration = Duration::from_secs(30);

/// What the shell is asked to do.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Ask `peer` for `source`'s events from `from` on; answer with
    /// [`Planner::fetched`].
    Fetch {
        peer: PeerId,
        source: String,
        from: u64,
    },
    /// Exchange summaries with `peer` (first digests only, if `digest_only`);
    /// their summary comes back through [`Planner::summary`].
    Summary { peer: PeerId, digest_only: bool },
    /// Append these events (in order). A `bulk` commit is answered with
    /// [`Planner::bulk_committed`] (or [`Planner::bulk_failed`]).
    Commit { events: Vec<Event>, bulk: bool },
    /// The source's own floor says its events up to `to` are gone past its
    /// retention: record that, and answer with [`Planner::skipped`].
    SkipTo { source: String, to: u64 },
    /// Later events of `source` went ahead of the missing `from..=to` after
    /// the order hold (they are still fetched): count and log it.
    Overtaken { source: String, from: u64, to: u64 },
}

/// A verified fetch answer.
#[derive(Debug, Default)]
pub struct Fetched {
    pub events: Vec<Event>,
    /// The answering agent's lowest held sequence number of the source.
    pub floor: Option<u64>,
    /// Whether the answer was full (so the chain goes on).
    pub full: bool,
}

/// Catch-up decisions of one agent.
pub struct Planner {
    reorder: Reorder,
    /// Peers with a fetch in flight (one at a time per peer: pacing).
    busy: HashSet<PeerId>,
    /// What to fetch from each peer next: (source, from). Ordered, so that
    /// a run replays exactly.
    queue: BTreeMap<PeerId, VecDeque<(String, u64)>>,
    /// Sources being fetched, and from which peer (one peer per source).
    fetching: HashMap<String, PeerId>,
    /// Released catch-up events waiting for the store, committed a chunk at a
    /// time so live events are never queued behind a whole catch-up.
    bulk: VecDeque<Event>,
    /// Per source, how many of its events are in `bulk` (its later events queue behind).
    bulk_sources: HashMap<String, usize>,
    bulk_inflight: bool,
    /// (peer, source) fetches that failed lately: a gap is then asked of
    /// another peer (a fetch to one peer can hang after a connection was
    /// cut and re-made; root cause not found).
    fetch_failed: HashMap<(PeerId, String), Instant>,
    /// Fetched answers waiting for their source's retention gap to be
    /// recorded ([`Action::SkipTo`]), by source.
    skipping: HashMap<String, (PeerId, Fetched)>,
}

impl Planner {
    /// A planner that knows what the store holds (`held`, its version vector).
    pub fn new(cfg: ReorderConfig, held: &[SourceMark], now: Instant) -> Self {
        let mut reorder = Reorder::new(cfg);
        let mut out = Released::default();
        for m in held {
            reorder.set_contiguous(&m.source, m.contiguous, now, &mut out);
        }
        Planner {
            reorder,
            busy: HashSet::new(),
            queue: BTreeMap::new(),
            fetching: HashMap::new(),
            bulk: VecDeque::new(),
            bulk_sources: HashMap::new(),
            bulk_inflight: false,
            fetch_failed: HashMap::new(),
            skipping: HashMap::new(),
        }
    }

    /// A gossiped event from `from`. `connected` tells whether a peer is
    /// connected now.
    pub fn gossip(
        &mut self,
        event: Event,
        from: PeerId,
        now: Instant,
        connected: impl Fn(&PeerId) -> bool,
        acts: &mut Vec<Action>,
    ) {
        let mut out = Released::default();
        self.reorder.offer(event, now, &mut out);
        // Ask the source itself for what is missing when it is connected (it
        // surely holds its own events; a relay may share the hole: gossipsub
        // drops an envelope whose content it already saw from another
        // source), else the relay.
        for (s, f, _) in std::mem::take(&mut out.gaps) {
            let peer = s
                .parse::<PeerId>()
                .ok()
                .filter(|p| connected(p))
                .unwrap_or(from);
            self.ask_for(peer, s, f, acts);
        }
        self.release(out, false, acts);
    }

    /// A new connection: exchange full summaries.
    pub fn connected(&mut self, peer: PeerId, acts: &mut Vec<Action>) {
        acts.push(Action::Summary {
            peer,
            digest_only: false,
        });
    }

    /// The periodic digest exchange: with one of `peers`, drawn at random.
    pub fn summary_due(&mut self, peers: &[PeerId], rng: &mut impl Rng, acts: &mut Vec<Action>) {
        if peers.is_empty() {
            return;
        }
        acts.push(Action::Summary {
            peer: peers[rng.gen_range(0..peers.len())],
            digest_only: true,
        });
    }

    /// A peer's summary (`theirs`) against what the store holds (`ours`).
    pub fn summary(
        &mut self,
        peer: PeerId,
        ours: &[SourceMark],
        theirs: &[SourceMark],
        acts: &mut Vec<Action>,
    ) {
        for (source, from) in wants(ours, theirs) {
            self.ask_for(peer, source, from, acts);
        }
    }

    /// Every second: the order hold runs out, and gaps are asked again.
    ///
    /// A source still waiting behind a gap with no fetch under way is asked
    /// again, of the source itself when connected, else of a connected peer
    /// chosen at random (an earlier relay may have had the same hole).
    /// Events later ones were released past (the hold ended) are asked of the
    /// source itself when connected; otherwise the summary exchanges find the
    /// peers that hold them.
    pub fn tick(
        &mut self,
        now: Instant,
        connected: &[PeerId],
        rng: &mut impl Rng,
        acts: &mut Vec<Action>,
    ) {
        let mut out = Released::default();
        self.reorder.tick(now, &mut out);
        self.release(out, false, acts);
        if connected.is_empty() {
            return;
        }
        self.fetch_failed
            .retain(|_, at| now.duration_since(*at) < FETCH_AVOID);
        for (source, next) in self.reorder.gapped() {
            if self.fetching.contains_key(&source) {
                continue;
            }
            let ok = |p: &PeerId| !self.fetch_failed.contains_key(&(*p, source.clone()));
            let others: Vec<PeerId> = connected.iter().copied().filter(|p| ok(p)).collect();
            let peer = source
                .parse::<PeerId>()
                .ok()
                .filter(|p| connected.contains(p) && ok(p))
                .or_else(|| (!others.is_empty()).then(|| others[rng.gen_range(0..others.len())]))
                .unwrap_or_else(|| connected[rng.gen_range(0..connected.len())]);
            self.ask_for(peer, source, next, acts);
        }
        for (source, first) in self.reorder.missing() {
            if self.fetching.contains_key(&source) {
                continue;
            }
            let Some(peer) = source.parse::<PeerId>().ok().filter(|p| {
                connected.contains(p) && !self.fetch_failed.contains_key(&(*p, source.clone()))
            }) else {
                continue;
            };
            self.ask_for(peer, source, first, acts);
        }
    }

    /// Gaps open now and how long the oldest has waited (for the gauges).
    pub fn open_gaps(&self, now: Instant) -> (usize, Duration) {
        self.reorder.open_gaps(now)
    }

    /// The answer to an [`Action::Fetch`]: verified events, or why it failed.
    pub fn fetched(
        &mut self,
        peer: PeerId,
        source: String,
        from: u64,
        result: Result<Fetched, String>,
        now: Instant,
        acts: &mut Vec<Action>,
    ) {
        self.busy.remove(&peer);
        self.fetching.remove(&source);
        let f = match result {
            Err(_) => {
                self.fetch_failed.insert((peer, source), now);
                return self.pump(peer, acts);
            }
            Ok(f) => f,
        };
        // Below the source's own floor, its events are gone past retention:
        // stop waiting for them, before the fetched events are offered (so
        // they are released with the floor, in bulk). Another peer's floor
        // may only mean that peer has a hole too.
        let first = f.events.first().map(|e| e.seq);
        let from_source = source.parse::<PeerId>().ok() == Some(peer);
        if let (Some(floor), true) = (f.floor, from_source) {
            if floor > from && first.is_none_or(|s| s > from) {
                acts.push(Action::SkipTo {
                    source: source.clone(),
                    to: floor - 1,
                });
                // The source's chain stays taken until the store answers.
                self.fetching.insert(source.clone(), peer);
                self.skipping.insert(source, (peer, f));
                return;
            }
        }
        self.take_fetched(peer, source, f, now, Released::default(), acts);
    }

    /// The answer to an [`Action::SkipTo`]: the store's contiguous mark now,
    /// or `None` if the store could not record the gap. The fetched events
    /// that waited for it are offered then.
    pub fn skipped(
        &mut self,
        source: &str,
        contiguous: Option<u64>,
        now: Instant,
        acts: &mut Vec<Action>,
    ) {
        let mut out = Released::default();
        if let Some(c) = contiguous {
            self.reorder.set_contiguous(source, c, now, &mut out);
        }
        match self.skipping.remove(source) {
            Some((peer, f)) => {
                self.fetching.remove(source);
                self.take_fetched(peer, source.to_string(), f, now, out, acts);
            }
            None => self.release(out, true, acts),
        }
    }

    /// Offer fetched events (after `out`, what a skip released), go on
    /// with the chain if the answer was full, start the peer's next fetch,
    /// then hand what was released to the store in bulk.
    fn take_fetched(
        &mut self,
        peer: PeerId,
        source: String,
        f: Fetched,
        now: Instant,
        mut out: Released,
        acts: &mut Vec<Action>,
    ) {
        let last = f.events.last().map(|e| e.seq);
        for ev in f.events {
            self.reorder.offer(ev, now, &mut out);
        }
        // Gaps inside a fetched range are left to the chain and the tick:
        // the chain goes on from the last event it got.
        out.gaps.clear();
        if f.full {
            if let Some(last) = last {
                self.fetching.insert(source.clone(), peer);
                self.queue
                    .entry(peer)
                    .or_default()
                    .push_front((source, last + 1));
            }
        }
        // The peer's next fetch is decided before this answer's events join
        // the bulk queue (its high-water mark counts what waited before).
        self.pump(peer, acts);
        self.release(out, true, acts);
    }

    /// A bulk [`Action::Commit`] is done: the next chunk may go, and fetches
    /// held back by a full bulk queue resume.
    pub fn bulk_committed(&mut self, acts: &mut Vec<Action>) {
        self.bulk_inflight = false;
        if self.bulk.len() < BULK_HIGH {
            let peers: Vec<PeerId> = self.queue.keys().copied().collect();
            for p in peers {
                self.pump(p, acts);
            }
        }
        self.pump_bulk(acts);
    }

    /// A bulk [`Action::Commit`] could not be queued on the store.
    pub fn bulk_failed(&mut self) {
        self.bulk_inflight = false;
    }

    /// Events waiting for the store in the bulk queue.
    pub fn bulk_len(&self) -> usize {
        self.bulk.len()
    }

    fn ask_for(&mut self, peer: PeerId, source: String, from: u64, acts: &mut Vec<Action>) {
        // One fetch chain per source: a chain continues by itself while answers
        // are full, and asking two peers for the same range doubles the work.
        if self.fetching.contains_key(&source) {
            return;
        }
        let from = from.max(self.reorder.next_expected(&source));
        let q = self.queue.entry(peer).or_default();
        if let Some(w) = q.iter_mut().find(|(s, _)| *s == source) {
            w.1 = w.1.min(from);
        } else {
            q.push_back((source, from));
        }
        self.pump(peer, acts);
    }

    /// Start the next fetch from `peer` if none is in flight.
    fn pump(&mut self, peer: PeerId, acts: &mut Vec<Action>) {
        loop {
            if self.busy.contains(&peer) || self.bulk.len() >= BULK_HIGH {
                return;
            }
            let Some((source, from)) = self.queue.get_mut(&peer).and_then(|q| q.pop_front()) else {
                return;
            };
            if self.fetching.get(&source).is_some_and(|p| *p != peer) {
                continue;
            }
            // What arrived since this want was queued is not asked for again.
            let from = from.max(self.reorder.next_expected(&source));
            self.fetching.insert(source.clone(), peer);
            self.busy.insert(peer);
            acts.push(Action::Fetch { peer, source, from });
            return;
        }
    }

    /// Hand what the reorder buffer released to the store. Live events go at
    /// once; catch-up events (`bulk`), and any later event of a source that
    /// still has some waiting, go a chunk at a time.
    fn release(&mut self, out: Released, bulk: bool, acts: &mut Vec<Action>) {
        // The hold ended: later events go ahead, but the missing ones stay
        // wanted (the store's contiguous mark stays below them, so summaries
        // and the gap refetch keep asking for them). Only a source's own
        // retention floor gives events up (see `fetched`).
        for (source, from, to) in out.skipped {
            acts.push(Action::Overtaken { source, from, to });
        }
        let mut live = Vec::new();
        for ev in out.ready {
            let waiting = self.bulk_sources.get(&ev.source).copied().unwrap_or(0);
            if !bulk && waiting > 0 && waiting <= BULK_CHUNK {
                // A live event whose source has a few fetched events still
                // queued: take those along rather than wait behind the backlog.
                let (mine, rest): (VecDeque<Event>, VecDeque<Event>) =
                    std::mem::take(&mut self.bulk)
                        .into_iter()
                        .partition(|e| e.source == ev.source);
                self.bulk = rest;
                self.bulk_sources.remove(&ev.source);
                live.extend(mine);
                live.push(ev);
            } else if bulk || waiting > 0 {
                *self.bulk_sources.entry(ev.source.clone()).or_default() += 1;
                self.bulk.push_back(ev);
            } else {
                live.push(ev);
            }
        }
        if !live.is_empty() {
            acts.push(Action::Commit {
                events: live,
                bulk: false,
            });
        }
        self.pump_bulk(acts);
    }

    fn pump_bulk(&mut self, acts: &mut Vec<Action>) {
        if self.bulk_inflight || self.bulk.is_empty() {
            return;
        }
        let n = self.bulk.len().min(BULK_CHUNK);
        let chunk: Vec<Event> = self.bulk.drain(..n).collect();
        for ev in &chunk {
            if let Some(c) = self.bulk_sources.get_mut(&ev.source) {
                *c -= 1;
                if *c == 0 {
                    self.bulk_sources.remove(&ev.source);
                }
            }
        }
        self.bulk_inflight = true;
        acts.push(Action::Commit {
            events: chunk,
            bulk: true,
        });
    }
}

#[cfg(test)]
mod tests {
    //! The planner in virtual time: `Instant`s are built by arithmetic and
    //! the rng is seeded, so each run is the same.
    use super::*;
    use crate::catchup::tests::ev;
    use libp2p::identity::Keypair;
    use rand::SeedableRng;

    fn fetches(acts: &[Action]) -> Vec<(PeerId, String, u64)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Fetch { peer, source, from } => Some((*peer, source.clone(), *from)),
                _ => None,
            })
            .collect()
    }

    fn committed(acts: &[Action]) -> Vec<(u64, bool)> {
        acts.iter()
            .flat_map(|a| match a {
                Action::Commit { events, bulk } => {
                    events.iter().map(|e| (e.seq, *bulk)).collect::<Vec<_>>()
                }
                _ => Vec::new(),
            })
            .collect()
    }

    fn planner(t0: Instant) -> Planner {
        Planner::new(ReorderConfig::default(), &[], t0)
    }

    #[test]
    fn a_gap_is_asked_of_the_source_when_connected_else_of_the_relay() {
        let t0 = Instant::now();
        let src = Keypair::generate_ed25519();
        let src_id = src.public().to_peer_id();
        let relay = PeerId::random();
        for (source_connected, asked) in [(true, src_id), (false, relay)] {
            let mut p = planner(t0);
            let mut acts = Vec::new();
            p.gossip(ev(&src, 1), relay, t0, |_| false, &mut acts);
            assert_eq!(committed(&acts), vec![(1, false)]);
            let mut acts = Vec::new();
            p.gossip(
                ev(&src, 4),
                relay,
                t0,
                |q| source_connected && *q == src_id,
                &mut acts,
            );
            assert!(committed(&acts).is_empty(), "4 waits for 2 and 3");
            assert_eq!(fetches(&acts), vec![(asked, src_id.to_base58(), 2)]);
        }
    }

    #[test]
    fn one_chain_per_source_one_fetch_per_peer_and_a_full_answer_goes_on() {
        let t0 = Instant::now();
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        let peer = PeerId::random();
        let other = PeerId::random();
        let (sa, sb) = (
            a.public().to_peer_id().to_base58(),
            b.public().to_peer_id().to_base58(),
        );
        let mut p = planner(t0);
        let mut acts = Vec::new();
        let theirs = |s: &str| SourceMark {
            source: s.into(),
            contiguous: 5000,
            max_seen: 5000,
            last_ms: 0,
        };
        p.summary(peer, &[], &[theirs(&sa), theirs(&sb)], &mut acts);
        // One fetch in flight per peer: only the first source is asked.
        assert_eq!(fetches(&acts).len(), 1);
        let (_, first, from) = fetches(&acts)[0].clone();
        assert_eq!(from, 1);
        // Another peer offering the same source does not start a second chain.
        let mut acts = Vec::new();
        p.summary(other, &[], &[theirs(&first)], &mut acts);
        assert!(fetches(&acts).is_empty());
        // A full answer continues the chain from after its last event, ahead
        // of the peer's queued source.
        let key = if first == sa { &a } else { &b };
        let events: Vec<Event> = (1..=FETCH_BATCH as u64).map(|s| ev(key, s)).collect();
        let mut acts = Vec::new();
        p.fetched(
            peer,
            first.clone(),
            1,
            Ok(Fetched {
                events,
                floor: Some(1),
                full: true,
            }),
            t0,
            &mut acts,
        );
        assert_eq!(
            fetches(&acts),
            vec![(peer, first.clone(), FETCH_BATCH as u64 + 1)]
        );
        // The fetched events go to the store in bulk, a chunk at a time.
        let c = committed(&acts);
        assert_eq!(c.len(), BULK_CHUNK);
        assert!(c.iter().all(|(_, bulk)| *bulk));
        assert_eq!(c.first(), Some(&(1, true)));
        let mut acts = Vec::new();
        p.bulk_committed(&mut acts);
        assert_eq!(
            committed(&acts).first(),
            Some(&(BULK_CHUNK as u64 + 1, true))
        );
        assert_eq!(p.bulk_len(), FETCH_BATCH as usize - 2 * BULK_CHUNK);
    }

    #[test]
    fn a_failed_peer_is_avoided_for_that_source_until_the_avoid_time_passes() {
        let t0 = Instant::now();
        let src = Keypair::generate_ed25519();
        let s = src.public().to_peer_id().to_base58();
        let (bad, good) = (PeerId::random(), PeerId::random());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // A hold longer than the avoid time: the gap is still waited for.
        let cfg = ReorderConfig {
            hold: FETCH_AVOID * 4,
            ..ReorderConfig::default()
        };
        let mut p = Planner::new(cfg, &[], t0);
        let mut acts = Vec::new();
        p.gossip(ev(&src, 1), bad, t0, |_| false, &mut acts);
        p.gossip(ev(&src, 3), bad, t0, |_| false, &mut acts);
        assert_eq!(fetches(&acts), vec![(bad, s.clone(), 2)]);
        let mut acts = Vec::new();
        p.fetched(bad, s.clone(), 2, Err("timed out".into()), t0, &mut acts);
        // Every tick within the avoid time asks the other peer, never the failed one.
        for i in 1..=10u64 {
            let mut acts = Vec::new();
            let now = t0 + Duration::from_millis(100 * i);
            p.tick(now, &[bad, good], &mut rng, &mut acts);
            for (peer, _, _) in fetches(&acts) {
                assert_eq!(peer, good, "tick {i}");
            }
            // The good peer answers, without the missing event: still a gap.
            if let Some((peer, source, from)) = fetches(&acts).pop() {
                let nothing = Ok(Fetched::default());
                p.fetched(peer, source, from, nothing, now, &mut Vec::new());
            }
        }
        // Once the avoid time has passed, the failed peer may be drawn again.
        let mut seen_bad = false;
        for i in 0..20u64 {
            let mut acts = Vec::new();
            let now = t0 + FETCH_AVOID + Duration::from_secs(i);
            p.tick(now, &[bad, good], &mut rng, &mut acts);
            for (peer, source, from) in fetches(&acts) {
                seen_bad |= peer == bad;
                p.fetched(
                    peer,
                    source,
                    from,
                    Ok(Fetched::default()),
                    now,
                    &mut Vec::new(),
                );
            }
        }
        assert!(seen_bad, "the avoid time ends");
    }

    #[test]
    fn only_the_source_s_own_floor_gives_events_up() {
        let t0 = Instant::now();
        let src = Keypair::generate_ed25519();
        let src_id = src.public().to_peer_id();
        let s = src_id.to_base58();
        let relay = PeerId::random();
        for (peer, skips) in [(relay, false), (src_id, true)] {
            let mut p = planner(t0);
            let mut acts = Vec::new();
            p.fetched(
                peer,
                s.clone(),
                1,
                Ok(Fetched {
                    events: vec![ev(&src, 50), ev(&src, 51)],
                    floor: Some(50),
                    full: false,
                }),
                t0,
                &mut acts,
            );
            let skip = acts.iter().find_map(|a| match a {
                Action::SkipTo { source, to } => Some((source.clone(), *to)),
                _ => None,
            });
            assert_eq!(skip.is_some(), skips, "floor from {peer}");
            if let Some((source, to)) = skip {
                assert_eq!((source.as_str(), to), (s.as_str(), 49));
                assert!(committed(&acts).is_empty(), "the events wait for the skip");
                // The store answers: contiguous 49. The fetched events go, in bulk.
                let mut acts = Vec::new();
                p.skipped(&s, Some(to), t0, &mut acts);
                assert_eq!(committed(&acts), vec![(50, true), (51, true)]);
            } else {
                assert!(committed(&acts).is_empty(), "50 and 51 wait for 1..=49");
            }
        }
    }

    #[test]
    fn a_live_event_takes_its_source_s_few_waiting_events_along() {
        let t0 = Instant::now();
        let src = Keypair::generate_ed25519();
        let s = src.public().to_peer_id().to_base58();
        let peer = PeerId::random();
        let mut p = planner(t0);
        // A bulk chunk in flight, then a few more of the source's events wait.
        let first: Vec<Event> = (1..=BULK_CHUNK as u64 + 3).map(|n| ev(&src, n)).collect();
        let mut acts = Vec::new();
        p.fetched(
            peer,
            s.clone(),
            1,
            Ok(Fetched {
                events: first,
                floor: Some(1),
                full: false,
            }),
            t0,
            &mut acts,
        );
        assert_eq!(committed(&acts).len(), BULK_CHUNK);
        assert_eq!(p.bulk_len(), 3);
        // Gossip brings the next one: it goes live with the 3 waiting, in order.
        let mut acts = Vec::new();
        let next = BULK_CHUNK as u64 + 4;
        p.gossip(ev(&src, next), peer, t0, |_| true, &mut acts);
        let c = committed(&acts);
        assert_eq!(
            c,
            (BULK_CHUNK as u64 + 1..=next)
                .map(|n| (n, false))
                .collect::<Vec<_>>()
        );
        assert_eq!(p.bulk_len(), 0);
    }

    #[test]
    fn the_same_inputs_give_the_same_actions() {
        let t0 = Instant::now();
        let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let events: Vec<Vec<Event>> = keys
            .iter()
            .map(|k| (1..=40).map(|n| ev(k, n)).collect())
            .collect();
        let run = || {
            let mut p = planner(t0);
            let mut rng = rand::rngs::StdRng::seed_from_u64(42);
            let mut log = Vec::new();
            for step in 0..40u64 {
                let now = t0 + Duration::from_millis(250 * step);
                let mut acts = Vec::new();
                for (k, evs) in events.iter().enumerate() {
                    // Every third event of each source is lost in gossip.
                    if step % 3 != 1 {
                        let from = peers[(step as usize + k) % peers.len()];
                        p.gossip(
                            evs[step as usize].clone(),
                            from,
                            now,
                            |q| *q != peers[0],
                            &mut acts,
                        );
                    }
                }
                p.tick(now, &peers, &mut rng, &mut acts);
                p.summary_due(&peers, &mut rng, &mut acts);
                for (peer, source, from) in fetches(&acts) {
                    p.fetched(peer, source, from, Err("lost".into()), now, &mut acts);
                }
                log.push(format!("{acts:?}"));
            }
            log
        };
        assert_eq!(run(), run());
    }
}
