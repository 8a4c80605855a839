// Kept whole at ~1,110 lines: the code is ~710; the rest are the deterministic replay tests of that code.
//! Sans-IO failure detector and member table (SWIM with Lifeguard's
//! confirmations, fed by what the transport knows). Every input carries a
//! `now`; decisions come out as [`Action`]s. No clock, socket or task here.
//!
//! Per member: silence on a live connection or a closed connection starts a
//! direct probe; a failed direct probe makes the member suspect (privately)
//! and asks up to `indirect_probes` helpers to probe it; helpers that also
//! fail confirm the suspicion, which is then announced (`NODE_SUSPECT`); the
//! member is declared dead (`HOST_OFFLINE`) once the suspicion window, which
//! shrinks with confirmations, has passed. Any direct sign of life cancels a
//! private suspicion; only the member itself ends a public one, by raising
//! its incarnation (refutation). See proto-notes/membership.md.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

#[derive(Clone, Debug)]
pub struct DetectorConfig {
    /// Silence on a live connection before a direct probe.
    pub suspect_after: Duration,
    /// Deadline of one probe (direct, or a helper's).
    pub probe_timeout: Duration,
    /// Helpers asked to probe a suspect.
    pub indirect_probes: usize,
    /// Least time between the announced suspicion and death, when every helper
    /// confirmed and the member went silent (a refused connection needs none).
    pub suspect_min: Duration,
    /// Time between suspicion and death with no helper to confirm (1-2 members)
    /// or with some helpers unable to tell.
    pub suspect_max: Duration,
    /// Dead and left members are kept this long, then forgotten.
    pub forget_after: Duration,
    /// Expected time between ticks; a tick this many times late means the
    /// agent itself stalled, and silence is not held against anyone.
    pub tick: Duration,
    /// Ask the suspect's nearest ring neighbours (membership::ring) among
    /// the members this agent holds alive, whether or not it holds a
    /// connection to them, instead of random members it is connected to.
    /// For the bounded design, where only a suspect's ring neighbours are
    /// sure to hold a connection to it (a helper that must dial the suspect
    /// can lose its SYN and run out its whole deadline). Off while every
    /// agent connects to every other. Before it is turned on in the agent:
    /// a helper reached by an on-demand connection gets no keep-alive (the
    /// idle timeout would keep it open an hour, and it would count as a
    /// link), and an agent cut off from everyone no longer finds its pool
    /// empty (it asks helpers it cannot reach, which answer nothing, so a
    /// refused suspect waits instead of being announced with the longest
    /// window).
    pub helpers_near_target: bool,
}

impl DetectorConfig {
    /// Ring neighbours named on each side of a suspect when
    /// `helpers_near_target` is set: enough for `indirect_probes` helpers
    /// even when this agent is one of the nearest.
    pub fn helpers_per_side(&self) -> usize {
        self.indirect_probes / 2 + 1
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            suspect_after: Duration::from_secs(3),
            probe_timeout: Duration::from_secs(1),
            indirect_probes: 3,
            suspect_min: Duration::from_secs(1),
            suspect_max: Duration::from_secs(5),
            forget_after: Duration::from_secs(24 * 3600),
            tick: Duration::from_millis(250),
            helpers_near_target: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Alive,
    Suspect,
    Dead,
    Left,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Alive => "alive",
            State::Suspect => "suspect",
            State::Dead => "dead",
            State::Left => "left",
        }
    }
}

/// A membership fact, as carried by an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FactKind {
    Online,
    Suspect,
    Offline,
    Recovered,
    Left,
}

impl FactKind {
    pub fn event_type(self) -> &'static str {
        match self {
            FactKind::Online => "HOST_ONLINE",
            FactKind::Suspect => "NODE_SUSPECT",
            FactKind::Offline => "HOST_OFFLINE",
            FactKind::Recovered => "NODE_RECOVERED",
            FactKind::Left => "HOST_LEFT",
        }
    }

    pub fn from_event_type(t: &str) -> Option<FactKind> {
        Some(match t {
            "HOST_ONLINE" => FactKind::Online,
            "NODE_SUSPECT" => FactKind::Suspect,
            "HOST_OFFLINE" => FactKind::Offline,
            "NODE_RECOVERED" => FactKind::Recovered,
            "HOST_LEFT" => FactKind::Left,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    pub kind: FactKind,
    pub peer: PeerId,
    pub name: String,
    pub incarnation: u64,
}

/// How a direct probe failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The member's host answered that nothing listens (or the dial failed at
    /// once): the process is gone.
    Refused,
    /// No answer before the deadline.
    Silent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Probe this member directly (dialing if needed) and report with
    /// [`Detector::probe_result`].
    ProbeDirect(PeerId),
    /// Ask these helpers to probe `target`; report each answer with
    /// [`Detector::indirect_result`].
    ProbeIndirect {
        target: PeerId,
        helpers: Vec<PeerId>,
    },
    /// Publish this fact as an event.
    Announce(Fact),
    /// Someone suspects or buried this agent: it now runs with this higher
    /// incarnation and must tell every member at once.
    Refute { incarnation: u64 },
    /// A member changed state (for logs and metrics).
    Transition {
        peer: PeerId,
        from: State,
        to: State,
    },
    /// Forget this member (kept past `forget_after`).
    Forget(PeerId),
}

#[derive(Clone, Debug)]
enum Phase {
    Direct {
        deadline: Instant,
    },
    Indirect {
        deadline: Instant,
        asked: Vec<PeerId>,
        answered: Vec<PeerId>,
        confirmed: usize,
    },
    /// Round over without a verdict: probe again at `next`.
    Wait {
        next: Instant,
    },
}

#[derive(Clone, Debug)]
pub struct Member {
    pub peer: PeerId,
    pub name: Option<String>,
    pub incarnation: u64,
    pub state: State,
    pub since: Instant,
    /// Last direct sign of life.
    pub last_heard: Option<Instant>,
    pub connected: bool,
    pub rtt: Option<Duration>,
    probe: Option<Phase>,
    evidence: Failure,
    /// When the suspicion was announced, and the window from then to death.
    announced: Option<(Instant, Duration)>,
}

impl Member {
    /// Since when nothing was heard from it: its last sign of life, or
    /// when it entered its state if that is later (or nothing was heard).
    pub fn quiet_since(&self) -> Instant {
        self.last_heard.unwrap_or(self.since).max(self.since)
    }
}

pub struct Detector {
    cfg: DetectorConfig,
    self_id: PeerId,
    self_name: String,
    self_incarnation: u64,
    members: HashMap<PeerId, Member>,
    actions: Vec<Action>,
    last_tick: Option<Instant>,
    grace_until: Option<Instant>,
    rng: StdRng,
    /// Times the agent itself was found stalled.
    pub stalls: u64,
    /// The members this agent watches when it holds a bounded set of links
    /// ([`Detector::set_links`]); `None`: it connects to every member and
    /// watches every connected one.
    links: Option<HashSet<PeerId>>,
}

impl Detector {
    pub fn new(
        cfg: DetectorConfig,
        self_id: PeerId,
        self_name: String,
        self_incarnation: u64,
        seed: u64,
    ) -> Self {
        Detector {
            cfg,
            self_id,
            self_name,
            self_incarnation,
            members: HashMap::new(),
            actions: Vec::new(),
            last_tick: None,
            grace_until: None,
            rng: StdRng::seed_from_u64(seed),
            stalls: 0,
            links: None,
        }
    }

    /// The members this agent keeps a link to (the bounded design of
    /// proto-notes/membership.md), or `None` while it connects to every
    /// member. With links, only they are watched: a link that closes is
    /// probed at once, a link that stays silent or that this agent cannot
    /// open is probed after `suspect_after`, and a closed connection to any
    /// other member is no hint at all (connections that are not links open
    /// for one transfer or request and close when idle; the member's own
    /// ring neighbours watch it). A suspect's helpers are then its ring
    /// neighbours, as with `helpers_near_target`.
    pub fn set_links(&mut self, links: Option<HashSet<PeerId>>) {
        self.links = links;
    }

    /// Whether this agent holds a bounded set of links.
    pub fn links_bounded(&self) -> bool {
        self.links.is_some()
    }

    /// Whether this agent watches `peer` (a link, or every member while it
    /// holds no bounded set).
    pub fn is_link(&self, peer: &PeerId) -> bool {
        self.links.as_ref().is_none_or(|l| l.contains(peer))
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    pub fn incarnation(&self) -> u64 {
        self.self_incarnation
    }

    pub fn member(&self, peer: &PeerId) -> Option<&Member> {
        self.members.get(peer)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The actions decided since the last call.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    fn entry(&mut self, peer: PeerId, now: Instant) -> &mut Member {
        self.members.entry(peer).or_insert_with(|| Member {
            peer,
            name: None,
            incarnation: 0,
            state: State::Alive,
            since: now,
            last_heard: None,
            connected: false,
            rtt: None,
            probe: None,
            evidence: Failure::Silent,
            announced: None,
        })
    }

    fn set_state(&mut self, peer: PeerId, to: State, now: Instant) {
        let Some(m) = self.members.get_mut(&peer) else {
            return;
        };
        let from = m.state;
        if from == to {
            return;
        }
        m.state = to;
        m.since = now;
        if to != State::Suspect {
            m.probe = None;
            m.announced = None;
        }
        self.actions.push(Action::Transition { peer, from, to });
    }

    fn announce(&mut self, kind: FactKind, peer: PeerId) {
        let Some(m) = self.members.get(&peer) else {
            return;
        };
        // Same fact, same content hash everywhere: only announce what every
        // agent words the same way (the member's own name and incarnation).
        if let Some(name) = &m.name {
            self.actions.push(Action::Announce(Fact {
                kind,
                peer,
                name: name.clone(),
                incarnation: m.incarnation,
            }));
        }
    }

    /// A member came back at a higher incarnation: recovered if we had
    /// given up on it (or suspected it).
    fn raise_incarnation(&mut self, peer: PeerId, inc: u64, now: Instant) {
        let m = self.entry(peer, now);
        if inc <= m.incarnation {
            return;
        }
        let was = m.state;
        let known = m.incarnation > 0;
        m.incarnation = inc;
        if was != State::Alive {
            self.set_state(peer, State::Alive, now);
            if known && matches!(was, State::Suspect | State::Dead) {
                self.announce(FactKind::Recovered, peer);
            }
        }
    }

    /// A direct sign of life (ping answer, message from it).
    pub fn heard(&mut self, peer: PeerId, now: Instant) {
        if peer == self.self_id {
            return;
        }
        let m = self.entry(peer, now);
        m.last_heard = Some(now);
        match m.state {
            State::Alive => m.probe = None,
            // Direct evidence ends our suspicion; a public one is ended for
            // everyone by the member itself (it raises its incarnation).
            State::Suspect => self.set_state(peer, State::Alive, now),
            State::Dead | State::Left => {}
        }
    }

    pub fn rtt(&mut self, peer: PeerId, rtt: Duration, now: Instant) {
        self.heard(peer, now);
        if let Some(m) = self.members.get_mut(&peer) {
            m.rtt = Some(rtt);
        }
    }

    /// First connection to `peer` established.
    pub fn connected(&mut self, peer: PeerId, now: Instant) {
        if peer == self.self_id {
            return;
        }
        self.entry(peer, now).connected = true;
        self.heard(peer, now);
    }

    /// Last connection to `peer` closed: a strong hint, checked at once.
    pub fn disconnected(&mut self, peer: PeerId, now: Instant) {
        let probe_timeout = self.cfg.probe_timeout;
        let watched = self.is_link(&peer);
        let Some(m) = self.members.get_mut(&peer) else {
            return;
        };
        m.connected = false;
        if watched && m.state == State::Alive && m.probe.is_none() {
            m.probe = Some(Phase::Direct {
                deadline: now + probe_timeout * 2,
            });
            self.actions.push(Action::ProbeDirect(peer));
        }
    }

    /// The member's own record: its name and incarnation.
    pub fn record(&mut self, peer: PeerId, name: &str, incarnation: u64, now: Instant) {
        if peer == self.self_id {
            return;
        }
        let m = self.entry(peer, now);
        if m.name.as_deref() != Some(name) {
            m.name = Some(name.to_string());
        }
        self.raise_incarnation(peer, incarnation, now);
        self.heard(peer, now);
    }

    /// A membership fact from the event log (ours or a peer's).
    pub fn fact(&mut self, f: &Fact, now: Instant) {
        if f.peer == self.self_id {
            if matches!(f.kind, FactKind::Suspect | FactKind::Offline)
                && f.incarnation >= self.self_incarnation
            {
                self.self_incarnation = f.incarnation.saturating_add(1);
                self.actions.push(Action::Refute {
                    incarnation: self.self_incarnation,
                });
                self.actions.push(Action::Announce(Fact {
                    kind: FactKind::Recovered,
                    peer: self.self_id,
                    name: self.self_name.clone(),
                    incarnation: self.self_incarnation,
                }));
            }
            return;
        }
        let new = !self.members.contains_key(&f.peer);
        let probe_timeout = self.cfg.probe_timeout;
        let watched = self.is_link(&f.peer);
        let m = self.entry(f.peer, now);
        if m.name.is_none() {
            m.name = Some(f.name.clone());
        }
        if new {
            // Known only from the log so far.
            m.incarnation = f.incarnation;
            let to = match f.kind {
                FactKind::Online | FactKind::Recovered | FactKind::Suspect => State::Alive,
                FactKind::Offline => State::Dead,
                FactKind::Left => State::Left,
            };
            m.state = to;
            return;
        }
        match f.kind {
            FactKind::Online | FactKind::Recovered => {
                self.raise_incarnation(f.peer, f.incarnation, now)
            }
            FactKind::Suspect => {
                // Someone suspects it: check for ourselves (it refutes if
                // alive). With bounded links, only its links check: every
                // agent dialling a struggling host would undo the bound.
                if f.incarnation >= m.incarnation {
                    m.incarnation = f.incarnation;
                    if watched && m.state == State::Alive && m.probe.is_none() {
                        m.probe = Some(Phase::Direct {
                            deadline: now + probe_timeout * 2,
                        });
                        self.actions.push(Action::ProbeDirect(f.peer));
                    }
                }
            }
            FactKind::Offline | FactKind::Left => {
                let to = if f.kind == FactKind::Offline {
                    State::Dead
                } else {
                    State::Left
                };
                let settled = matches!(m.state, State::Dead | State::Left);
                if f.incarnation > m.incarnation || (f.incarnation == m.incarnation && !settled) {
                    m.incarnation = f.incarnation;
                    self.set_state(f.peer, to, now);
                }
            }
        }
    }

    /// The member told us it is leaving.
    pub fn left(&mut self, peer: PeerId, incarnation: u64, now: Instant) {
        let m = self.entry(peer, now);
        if incarnation < m.incarnation || m.state == State::Left {
            return;
        }
        m.incarnation = incarnation;
        self.set_state(peer, State::Left, now);
        self.announce(FactKind::Left, peer);
    }

    /// Outcome of our direct probe.
    pub fn probe_result(&mut self, peer: PeerId, result: Result<(), Failure>, now: Instant) {
        match result {
            Ok(()) => self.heard(peer, now),
            Err(failure) => {
                let Some(m) = self.members.get_mut(&peer) else {
                    return;
                };
                if !matches!(m.probe, Some(Phase::Direct { .. })) {
                    return;
                }
                match m.state {
                    State::Alive => {
                        m.evidence = failure;
                        self.set_state(peer, State::Suspect, now);
                        self.ask_helpers(peer, now);
                    }
                    State::Suspect => {
                        if failure == Failure::Refused {
                            if let Some(m) = self.members.get_mut(&peer) {
                                m.evidence = Failure::Refused;
                            }
                        }
                        self.ask_helpers(peer, now);
                    }
                    State::Dead | State::Left => {}
                }
            }
        }
    }

    fn ask_helpers(&mut self, target: PeerId, now: Instant) {
        let near = self.cfg.helpers_near_target || self.links.is_some();
        let mut pool: Vec<PeerId> = self
            .members
            .values()
            .filter(|m| m.peer != target && m.state == State::Alive && (near || m.connected))
            .map(|m| m.peer)
            .collect();
        if near {
            // This agent is on the ring too but cannot help itself.
            pool.push(self.self_id);
            let per_side = self.cfg.helpers_per_side();
            pool = super::ring::ring_neighbours(&target, &pool, per_side);
            pool.retain(|p| *p != self.self_id);
        } else {
            // Sorted first: the same members and seed give the same helpers.
            pool.sort();
            pool.shuffle(&mut self.rng);
        }
        pool.truncate(self.cfg.indirect_probes);
        let deadline = now + self.cfg.probe_timeout * 2;
        let others = self
            .members
            .values()
            .filter(|m| m.peer != target && matches!(m.state, State::Alive | State::Suspect))
            .count();
        let Some(m) = self.members.get_mut(&target) else {
            return;
        };
        if pool.is_empty() {
            m.probe = Some(Phase::Wait {
                next: now + self.cfg.probe_timeout,
            });
            if others > 0 && m.evidence == Failure::Silent {
                // Every other member is unreachable too: this agent may be
                // the one cut off. Silence alone buries nobody then.
                return;
            }
            // Nobody to confirm with (two members), or the member's host
            // refused us: announce, and wait the longest window.
            if m.announced.is_none() {
                m.announced = Some((now, self.cfg.suspect_max));
                self.announce(FactKind::Suspect, target);
            }
            return;
        }
        m.probe = Some(Phase::Indirect {
            deadline,
            asked: pool.clone(),
            answered: Vec::new(),
            confirmed: 0,
        });
        self.actions.push(Action::ProbeIndirect {
            target,
            helpers: pool,
        });
    }

    /// A helper's answer: `Some(true)` it reached the target, `Some(false)`
    /// it could not, `None` the helper did not answer.
    pub fn indirect_result(
        &mut self,
        target: PeerId,
        helper: PeerId,
        reached: Option<bool>,
        now: Instant,
    ) {
        let Some(m) = self.members.get_mut(&target) else {
            return;
        };
        let Some(Phase::Indirect {
            asked,
            answered,
            confirmed,
            ..
        }) = &mut m.probe
        else {
            return;
        };
        if !asked.contains(&helper) || answered.contains(&helper) {
            return;
        }
        answered.push(helper);
        if reached == Some(false) {
            *confirmed += 1;
        }
        if reached == Some(true) {
            // Alive through someone else: not ours to suspect.
            m.last_heard = Some(now);
            self.set_state(target, State::Alive, now);
            return;
        }
        if answered.len() == asked.len() {
            self.finish_round(target, now);
        }
    }

    fn window(&self, evidence: Failure, confirmed: usize, asked: usize) -> Duration {
        let (min, max) = (self.cfg.suspect_min, self.cfg.suspect_max);
        if confirmed >= asked {
            return if evidence == Failure::Refused {
                Duration::ZERO
            } else {
                min
            };
        }
        // Lifeguard: the window shrinks with the log of independent confirmations.
        let k = asked as f64;
        let frac = ((confirmed as f64) + 1.0).ln() / (k + 1.0).ln();
        let span = max.saturating_sub(min).as_secs_f64();
        min + Duration::from_secs_f64(span * (1.0 - frac))
    }

    fn finish_round(&mut self, target: PeerId, now: Instant) {
        let next = now + self.cfg.probe_timeout;
        let Some(m) = self.members.get(&target) else {
            return;
        };
        let Some(Phase::Indirect {
            asked, confirmed, ..
        }) = &m.probe
        else {
            return;
        };
        let (asked, confirmed, evidence) = (asked.len(), *confirmed, m.evidence);
        let already = m.announced;
        // The window runs from when this agent began to suspect (its direct
        // probe failed), so the helpers' round counts towards it.
        let since = m.since;
        if confirmed > 0 {
            let mut w = self.window(evidence, confirmed, asked);
            if already.is_none() && evidence == Failure::Silent {
                // Announced now: the member gets at least `suspect_min`
                // from now to refute, however long the helpers' round
                // took (on a saturated host it can outlast the window).
                w = w.max(now.saturating_duration_since(since) + self.cfg.suspect_min);
            }
            let m = self.members.get_mut(&target).expect("present");
            m.announced = Some(match already {
                Some((at, old)) => (at, old.min(w)),
                None => (since, w),
            });
            m.probe = Some(Phase::Wait { next });
            if already.is_none() {
                self.announce(FactKind::Suspect, target);
            }
            self.maybe_bury(target, now);
        } else if let Some(m) = self.members.get_mut(&target) {
            // Nobody could tell (we may be the one cut off): keep it private
            // and probe again later.
            m.probe = Some(Phase::Wait { next });
        }
    }

    fn maybe_bury(&mut self, target: PeerId, now: Instant) {
        let Some(m) = self.members.get(&target) else {
            return;
        };
        if m.state != State::Suspect {
            return;
        }
        if let Some((at, w)) = m.announced {
            if now >= at + w {
                self.set_state(target, State::Dead, now);
                self.announce(FactKind::Offline, target);
            }
        }
    }

    /// Periodic step: silence checks, probe deadlines, suspicion windows,
    /// forgetting.
    pub fn tick(&mut self, now: Instant) {
        if let Some(last) = self.last_tick {
            if now.saturating_duration_since(last) > self.cfg.tick * 4 {
                // We were not running: nobody's silence counts for a while.
                self.stalls += 1;
                self.grace_until = Some(now + self.cfg.suspect_after);
            }
        }
        self.last_tick = Some(now);
        let in_grace = self.grace_until.is_some_and(|g| now < g);
        let bounded = self.links.is_some();
        // In a fixed order: one member's verdict can change another's (the
        // helpers a suspect gets), and the same inputs must give the same
        // decisions.
        let mut peers: Vec<PeerId> = self.members.keys().copied().collect();
        peers.sort();
        for peer in peers {
            let Some(m) = self.members.get_mut(&peer) else {
                continue;
            };
            if m.state == State::Suspect {
                self.maybe_bury(peer, now);
            }
            let link = self.is_link(&peer);
            let Some(m) = self.members.get_mut(&peer) else {
                continue;
            };
            match (&m.state, m.probe.clone()) {
                (State::Alive, None) => {
                    let silent_since =
                        |t: Instant| now.saturating_duration_since(t) > self.cfg.suspect_after;
                    let watch = if bounded {
                        // A link, connected or not: one this agent cannot
                        // open is checked like one that went silent.
                        link && silent_since(m.quiet_since())
                    } else {
                        // Every connected member, silent since last heard.
                        m.connected && m.last_heard.is_some_and(silent_since)
                    };
                    if watch && !in_grace {
                        m.evidence = Failure::Silent;
                        m.probe = Some(Phase::Direct {
                            deadline: now + self.cfg.probe_timeout * 2,
                        });
                        self.actions.push(Action::ProbeDirect(peer));
                    }
                }
                (State::Alive | State::Suspect, Some(Phase::Direct { deadline }))
                    if now >= deadline =>
                {
                    self.probe_result(peer, Err(Failure::Silent), now);
                }
                (State::Suspect, Some(Phase::Indirect { deadline, .. })) if now >= deadline => {
                    self.finish_round(peer, now);
                }
                (State::Suspect, Some(Phase::Wait { next })) => {
                    let Some(m) = self.members.get_mut(&peer) else {
                        continue;
                    };
                    if m.state == State::Suspect && now >= next {
                        m.probe = Some(Phase::Direct {
                            deadline: now + self.cfg.probe_timeout * 2,
                        });
                        self.actions.push(Action::ProbeDirect(peer));
                    }
                }
                (State::Dead | State::Left, _)
                    if now.saturating_duration_since(m.since) > self.cfg.forget_after =>
                {
                    self.members.remove(&peer);
                    self.actions.push(Action::Forget(peer));
                }
                _ => {}
            }
        }
    }

    /// Should this agent, asked by a peer, report `target` unreachable
    /// without probing (it already buried it)?
    pub fn settled_gone(&self, target: &PeerId) -> bool {
        self.members
            .get(target)
            .is_some_and(|m| matches!(m.state, State::Dead | State::Left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid() -> PeerId {
        PeerId::random()
    }

    struct T {
        d: Detector,
        t0: Instant,
    }

    impl T {
        fn new(cfg: DetectorConfig) -> Self {
            T {
                d: Detector::new(cfg, pid(), "me".into(), 100, 7),
                t0: Instant::now(),
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn join(&mut self, name: &str, inc: u64, ms: u64) -> PeerId {
            let p = pid();
            let now = self.at(ms);
            self.d.connected(p, now);
            self.d.record(p, name, inc, now);
            p
        }
        fn announced(&mut self) -> Vec<(FactKind, PeerId, u64)> {
            self.d
                .take_actions()
                .into_iter()
                .filter_map(|a| match a {
                    Action::Announce(f) => Some((f.kind, f.peer, f.incarnation)),
                    _ => None,
                })
                .collect()
        }
        fn state(&self, p: &PeerId) -> State {
            self.d.member(p).expect("member").state
        }
        /// Tick every 250 ms from `from` to `to`, answering every direct
        /// probe of `dead` with `fail` and every other one with success.
        fn run(&mut self, from: u64, to: u64) -> Vec<Action> {
            let mut all = Vec::new();
            let mut t = from;
            while t <= to {
                self.d.tick(self.at(t));
                all.extend(self.d.take_actions());
                t += 250;
            }
            all
        }
    }

    /// A member `x` joined among 12 others, and the helpers its ring
    /// neighbours make: the three nearest on the ring (this agent
    /// included in the ring, left out of the helpers), nearest first,
    /// alternating sides.
    fn suspect_among_twelve(t: &mut T) -> (PeerId, Vec<PeerId>) {
        let me = t.d.self_id;
        let x = t.join("x", 5, 0);
        let others: Vec<PeerId> = (0..12).map(|i| t.join(&format!("h{i}"), 1, 0)).collect();
        let mut ring: Vec<PeerId> = others.iter().copied().chain([x, me]).collect();
        ring.sort_by_key(crate::membership::ring::ring_key);
        let at = ring.iter().position(|p| *p == x).unwrap();
        let n = ring.len();
        let want = [1, n - 1, 2, n - 2]
            .iter()
            .map(|d| ring[(at + d) % n])
            .filter(|p| *p != me)
            .take(3)
            .collect();
        (x, want)
    }

    /// After `x`'s direct probe (already sent) fails silent: the helpers
    /// asked to probe it.
    fn helpers_asked(t: &mut T, x: PeerId) -> Vec<PeerId> {
        t.d.probe_result(x, Err(Failure::Silent), t.at(110));
        match t.d.take_actions().pop() {
            Some(Action::ProbeIndirect { target, helpers }) => {
                assert_eq!(target, x);
                helpers
            }
            other => panic!("expected indirect probes, got {other:?}"),
        }
    }

    fn probes(actions: &[Action]) -> Vec<PeerId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ProbeDirect(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn with_helpers_near_target_the_suspects_ring_neighbours_are_asked() {
        let cfg = DetectorConfig {
            helpers_near_target: true,
            ..Default::default()
        };
        let mut t = T::new(cfg);
        let (x, want) = suspect_among_twelve(&mut t);
        // The nearest one is not connected to this agent: asked all the same.
        t.d.disconnected(want[0], t.at(50));
        t.d.take_actions();
        t.d.disconnected(x, t.at(100));
        assert_eq!(t.d.take_actions(), vec![Action::ProbeDirect(x)]);
        assert_eq!(helpers_asked(&mut t, x), want);
    }

    #[test]
    fn killed_member_dies_at_once_when_helpers_confirm_refusal() {
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        let helpers: Vec<PeerId> = (0..4).map(|i| t.join(&format!("h{i}"), 1, 0)).collect();
        t.d.take_actions();
        t.d.disconnected(x, t.at(100));
        assert_eq!(t.d.take_actions(), vec![Action::ProbeDirect(x)]);
        t.d.probe_result(x, Err(Failure::Refused), t.at(110));
        assert_eq!(t.state(&x), State::Suspect);
        let asked = match t.d.take_actions().pop() {
            Some(Action::ProbeIndirect { target, helpers: h }) => {
                assert_eq!(target, x);
                h
            }
            other => panic!("expected indirect probes, got {other:?}"),
        };
        assert_eq!(asked.len(), 3);
        assert!(asked.iter().all(|h| helpers.contains(h)));
        for h in &asked {
            t.d.indirect_result(x, *h, Some(false), t.at(120));
        }
        assert_eq!(t.state(&x), State::Dead);
        assert_eq!(
            t.announced(),
            vec![(FactKind::Suspect, x, 5), (FactKind::Offline, x, 5)]
        );
    }

    #[test]
    fn silent_member_gets_the_suspicion_window() {
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        let h = t.join("h", 1, 0);
        t.d.take_actions();
        // h keeps answering; x goes silent after t=0.
        let mut t_ms = 250;
        let mut saw_probe = None;
        while t_ms <= 4000 && saw_probe.is_none() {
            t.d.heard(h, t.at(t_ms));
            t.d.tick(t.at(t_ms));
            if probes(&t.d.take_actions()).contains(&x) {
                saw_probe = Some(t_ms);
            }
            t_ms += 250;
        }
        let probed = saw_probe.expect("a direct probe after the silence");
        assert!(probed > 3000 && probed <= 3250, "probed at {probed}");
        t.d.probe_result(x, Err(Failure::Silent), t.at(probed + 1000));
        assert_eq!(t.state(&x), State::Suspect);
        assert!(
            t.announced().is_empty(),
            "suspicion stays private until confirmed"
        );
        t.d.indirect_result(x, h, Some(false), t.at(probed + 1500));
        assert_eq!(t.announced(), vec![(FactKind::Suspect, x, 5)]);
        assert_eq!(t.state(&x), State::Suspect);
        // suspect_min = 1 s from the failed direct probe, and at least
        // suspect_min from the public suspicion (announced at +1500).
        t.d.heard(h, t.at(probed + 2250));
        t.d.tick(t.at(probed + 2250));
        assert_eq!(t.state(&x), State::Suspect);
        t.d.heard(h, t.at(probed + 2500));
        t.d.tick(t.at(probed + 2500));
        assert_eq!(t.state(&x), State::Dead);
        assert_eq!(t.announced(), vec![(FactKind::Offline, x, 5)]);
    }

    #[test]
    fn refutation_inside_the_window_saves_the_member() {
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        let h = t.join("h", 1, 0);
        t.d.take_actions();
        t.d.disconnected(x, t.at(10));
        t.d.probe_result(x, Err(Failure::Silent), t.at(1010));
        t.d.indirect_result(x, h, Some(false), t.at(1500));
        assert_eq!(t.announced(), vec![(FactKind::Suspect, x, 5)]);
        // x saw the suspicion and raised its incarnation.
        t.d.record(x, "x", 6, t.at(1800));
        assert_eq!(t.state(&x), State::Alive);
        assert_eq!(t.announced(), vec![(FactKind::Recovered, x, 6)]);
        let later = t.run(2000, 6000);
        assert!(
            !later
                .iter()
                .any(|a| matches!(a, Action::Announce(f) if f.kind == FactKind::Offline)),
            "{later:?}"
        );
    }

    #[test]
    fn direct_sign_of_life_cancels_a_private_suspicion() {
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        let _h = t.join("h", 1, 0);
        t.d.take_actions();
        t.d.disconnected(x, t.at(10));
        t.d.probe_result(x, Err(Failure::Silent), t.at(1010));
        assert_eq!(t.state(&x), State::Suspect);
        t.d.connected(x, t.at(1100));
        assert_eq!(t.state(&x), State::Alive);
        assert!(t.announced().is_empty());
    }

    #[test]
    fn helper_reaching_target_ends_suspicion_without_events() {
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        let h1 = t.join("h1", 1, 0);
        let h2 = t.join("h2", 1, 0);
        t.d.take_actions();
        t.d.disconnected(x, t.at(10));
        t.d.probe_result(x, Err(Failure::Silent), t.at(1010));
        t.d.take_actions();
        t.d.indirect_result(x, h1, Some(false), t.at(1200));
        t.d.indirect_result(x, h2, Some(true), t.at(1300));
        assert_eq!(t.state(&x), State::Alive);
        assert!(t.announced().is_empty());
    }

    #[test]
    fn an_isolated_observer_never_buries_anyone() {
        // Every helper fails to answer: we are the one cut off.
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        let hs: Vec<PeerId> = (0..3).map(|i| t.join(&format!("h{i}"), 1, 0)).collect();
        t.d.take_actions();
        t.d.disconnected(x, t.at(10));
        t.d.probe_result(x, Err(Failure::Silent), t.at(1010));
        for h in &hs {
            t.d.indirect_result(x, *h, None, t.at(2000));
        }
        let later = t.run(2000, 60_000);
        for a in &later {
            if let Action::ProbeIndirect { target, helpers } = a {
                for h in helpers {
                    t.d.indirect_result(*target, *h, None, t.at(60_000));
                }
            }
            if let Action::ProbeDirect(p) = a {
                t.d.probe_result(*p, Err(Failure::Silent), t.at(60_000));
            }
        }
        assert_ne!(t.state(&x), State::Dead);
        assert!(t.announced().is_empty());
    }

    #[test]
    fn two_member_cluster_uses_the_longest_window() {
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        t.d.take_actions();
        t.d.disconnected(x, t.at(0));
        t.d.probe_result(x, Err(Failure::Refused), t.at(10));
        assert_eq!(t.announced(), vec![(FactKind::Suspect, x, 5)]);
        t.d.tick(t.at(4000));
        assert_eq!(t.state(&x), State::Suspect);
        t.d.tick(t.at(5010));
        assert_eq!(t.state(&x), State::Dead);
    }

    #[test]
    fn window_shrinks_with_confirmations() {
        let t = T::new(DetectorConfig::default());
        let w = |c| t.d.window(Failure::Silent, c, 3);
        assert_eq!(w(3), Duration::from_secs(1));
        assert!(w(0) == Duration::from_secs(5));
        assert!(
            w(1) < w(0) && w(2) < w(1) && w(3) < w(2),
            "{:?}",
            [w(0), w(1), w(2), w(3)]
        );
        assert_eq!(t.d.window(Failure::Refused, 3, 3), Duration::ZERO);
    }

    #[test]
    fn offline_fact_is_accepted_and_only_a_higher_incarnation_revives() {
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        t.d.take_actions();
        let f = |kind, inc| Fact {
            kind,
            peer: x,
            name: "x".into(),
            incarnation: inc,
        };
        t.d.fact(&f(FactKind::Offline, 5), t.at(100));
        assert_eq!(t.state(&x), State::Dead);
        // Old news and same-incarnation records do not revive it.
        t.d.record(x, "x", 5, t.at(200));
        t.d.fact(&f(FactKind::Online, 4), t.at(200));
        assert_eq!(t.state(&x), State::Dead);
        t.d.record(x, "x", 9, t.at(300));
        assert_eq!(t.state(&x), State::Alive);
        assert_eq!(t.announced(), vec![(FactKind::Recovered, x, 9)]);
        // A stale death does not bury the newer incarnation.
        t.d.fact(&f(FactKind::Offline, 5), t.at(400));
        assert_eq!(t.state(&x), State::Alive);
    }

    #[test]
    fn suspicion_of_self_is_refuted_with_a_higher_incarnation() {
        let mut t = T::new(DetectorConfig::default());
        let me = t.d.self_id;
        let f = |kind, inc| Fact {
            kind,
            peer: me,
            name: "me".into(),
            incarnation: inc,
        };
        t.d.fact(&f(FactKind::Suspect, 99), t.at(0));
        assert!(t.d.take_actions().is_empty(), "older suspicion is ignored");
        t.d.fact(&f(FactKind::Suspect, 100), t.at(0));
        let a = t.d.take_actions();
        assert_eq!(a[0], Action::Refute { incarnation: 101 });
        assert_eq!(
            a[1],
            Action::Announce(Fact {
                kind: FactKind::Recovered,
                peer: me,
                name: "me".into(),
                incarnation: 101
            })
        );
        t.d.fact(&f(FactKind::Offline, 101), t.at(0));
        assert_eq!(t.d.incarnation(), 102);
    }

    #[test]
    fn graceful_leave_is_announced_and_not_suspected() {
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        t.d.take_actions();
        t.d.left(x, 5, t.at(100));
        t.d.disconnected(x, t.at(110));
        assert_eq!(t.state(&x), State::Left);
        let a = t.d.take_actions();
        assert!(probes(&a).is_empty(), "{a:?}");
        assert!(a.contains(&Action::Announce(Fact {
            kind: FactKind::Left,
            peer: x,
            name: "x".into(),
            incarnation: 5
        })));
        // Back with a new incarnation: alive, and no "recovered" (it left).
        t.d.record(x, "x", 6, t.at(200));
        assert_eq!(t.state(&x), State::Alive);
        assert!(t.announced().is_empty());
    }

    #[test]
    fn own_stall_is_not_held_against_members() {
        let mut t = T::new(DetectorConfig::default());
        let x = t.join("x", 5, 0);
        t.d.take_actions();
        t.d.tick(t.at(250));
        // The agent froze for 10 s (e.g. SIGSTOP, swap): on waking, x's
        // silence is our own.
        t.d.tick(t.at(10_250));
        assert!(probes(&t.d.take_actions()).is_empty());
        assert_eq!(t.d.stalls, 1);
        // Still silent once the grace is over: probed.
        let a = t.run(10_500, 14_000);
        assert!(probes(&a).contains(&x), "{a:?}");
    }

    #[test]
    fn dead_members_are_forgotten_and_may_rejoin() {
        let cfg = DetectorConfig {
            forget_after: Duration::from_secs(60),
            ..Default::default()
        };
        let mut t = T::new(cfg);
        let x = t.join("x", 5, 0);
        t.d.fact(
            &Fact {
                kind: FactKind::Offline,
                peer: x,
                name: "x".into(),
                incarnation: 5,
            },
            t.at(0),
        );
        t.d.take_actions();
        t.d.tick(t.at(61_000));
        assert!(t.d.member(&x).is_none());
        assert!(t.d.take_actions().contains(&Action::Forget(x)));
        t.d.connected(x, t.at(70_000));
        t.d.record(x, "x", 7, t.at(70_000));
        assert_eq!(t.state(&x), State::Alive);
        assert!(
            t.announced().is_empty(),
            "a forgotten member rejoins as new"
        );
    }

    /// Regression (found by tests/properties.rs `detector_invariants`): the
    /// tick walked members in hash-map order, so when several went silent
    /// at once, who was already suspect when another asked for helpers
    /// differed between two detectors fed the same inputs.
    #[test]
    fn same_inputs_same_decisions_when_several_go_silent() {
        let me = pid();
        let peers: Vec<PeerId> = (0..4).map(|_| pid()).collect();
        let run = || {
            let mut d = Detector::new(DetectorConfig::default(), me, "me".into(), 1, 9);
            let t0 = Instant::now();
            for (i, p) in peers.iter().enumerate() {
                d.record(*p, &format!("h{i}"), 1, t0);
                d.connected(*p, t0);
            }
            let mut log = Vec::new();
            let mut now = t0;
            for _ in 0..40 {
                now += Duration::from_millis(250);
                d.tick(now);
                log.push(d.take_actions());
            }
            log
        };
        let first = run();
        assert!(
            first
                .iter()
                .flatten()
                .any(|a| matches!(a, Action::ProbeIndirect { .. })),
            "the members were never probed: {first:?}"
        );
        for _ in 0..16 {
            assert_eq!(run(), first);
        }
    }

    #[test]
    fn with_bounded_links_only_links_are_watched() {
        let mut t = T::new(DetectorConfig::default());
        let link = t.join("link", 1, 0);
        let other = t.join("other", 1, 0);
        t.d.set_links(Some([link].into_iter().collect()));
        t.d.take_actions();
        // A connection to a member that is not a link closes: no hint.
        t.d.disconnected(other, t.at(100));
        assert_eq!(t.d.take_actions(), vec![]);
        // Nor is its silence.
        t.d.connected(other, t.at(200));
        t.d.heard(link, t.at(4_000));
        assert!(!probes(&t.run(250, 4_000)).contains(&other));
        // A link that closes is checked at once.
        t.d.disconnected(link, t.at(4_100));
        assert_eq!(t.d.take_actions(), vec![Action::ProbeDirect(link)]);
    }

    #[test]
    fn with_bounded_links_a_link_never_reached_is_probed() {
        let mut t = T::new(DetectorConfig::default());
        // Known from the log only (its HOST_ONLINE), never connected.
        let far = pid();
        let fact = Fact {
            kind: FactKind::Online,
            peer: far,
            name: "far".into(),
            incarnation: 3,
        };
        t.d.fact(&fact, t.at(0));
        assert!(probes(&t.run(250, 10_000)).is_empty(), "not a link yet");
        t.d.set_links(Some([far].into_iter().collect()));
        let p = probes(&t.run(10_250, 10_500));
        assert_eq!(p, vec![far], "a link that cannot be opened is checked");
    }

    #[test]
    fn with_bounded_links_a_suspects_helpers_are_its_ring_neighbours() {
        let mut t = T::new(DetectorConfig::default());
        let (x, want) = suspect_among_twelve(&mut t);
        t.d.set_links(Some([x].into_iter().collect()));
        // The helpers are not links and not connected: asked all the same.
        for h in &want {
            t.d.disconnected(*h, t.at(50));
        }
        t.d.take_actions();
        t.d.disconnected(x, t.at(100));
        assert_eq!(t.d.take_actions(), vec![Action::ProbeDirect(x)]);
        assert_eq!(helpers_asked(&mut t, x), want);
    }

    /// Regression (100 agents on 2 cores): when the helpers' round outlasts
    /// the window, the suspicion and the death went out together, leaving
    /// the member no time to refute.
    #[test]
    fn a_silent_member_gets_suspect_min_after_the_public_suspicion() {
        let cfg = DetectorConfig::default();
        let min = cfg.suspect_min.as_millis() as u64;
        let mut t = T::new(cfg);
        let x = t.join("x", 5, 0);
        let helpers: Vec<PeerId> = (0..3).map(|i| t.join(&format!("h{i}"), 1, 0)).collect();
        t.d.take_actions();
        t.d.disconnected(x, t.at(100));
        t.d.probe_result(x, Err(Failure::Silent), t.at(200));
        t.d.take_actions();
        // Every helper confirms, the last one 3 s later (the window is 1 s).
        for (i, h) in helpers.iter().enumerate() {
            t.d.indirect_result(x, *h, Some(false), t.at(3_000 + i as u64));
        }
        assert_eq!(t.announced(), vec![(FactKind::Suspect, x, 5)]);
        assert_eq!(t.state(&x), State::Suspect, "buried with its suspicion");
        t.d.tick(t.at(3_002 + min - 10));
        assert_eq!(t.state(&x), State::Suspect);
        t.d.tick(t.at(3_002 + min + 10));
        assert_eq!(t.state(&x), State::Dead);
    }
}
