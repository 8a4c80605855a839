//! The membership simulation's engine and scenarios: N hosts in virtual
//! time, each running the agent's own failure detector over a modelled
//! network. Used by `benches/simulate.rs` (the report) and `tests/sim.rs`
//! (its assertions at small N); what is modelled is written at the top of
//! benches/simulate.rs and in proto-notes/membership.md.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use riftmesh::membership::detector::{
    Action, Detector, DetectorConfig, Fact, FactKind, Failure, State,
};
use riftmesh::membership::ring::ring_key;
use serde::Serialize;

use crate::common::percentile;

// ------------------------------------------------------------ wire sizes

const PING_BYTES: u64 = 32;
const EXCHANGE_REQ_BYTES: u64 = 203;
const EXCHANGE_RESP_BYTES: u64 = 203;
const MEMBER_PING_BYTES: u64 = 60;
const PROBE_FOR_BYTES: u64 = 90;
const PROBED_BYTES: u64 = 50;
const FACT_BYTES: u64 = 600;
const RECORD_BYTES: u64 = 250;
/// Catch-up's digest (each way), when the two hold the same events.
const DIGEST_BYTES: u64 = 80;
const DIAL_BYTES: u64 = 2000;
/// Gossipsub's D_high: a mesh never grows past it.
const MESH_HIGH: usize = 12;

// ------------------------------------------------------------ the agent's timings

const PING_EVERY: u64 = 2_000_000;
const HEALTH_EVERY: u64 = 5_000_000;
const TICK: u64 = 250_000;
const CATCHUP_EVERY: u64 = 5_000_000;
/// TCP: first retransmission after a lost segment (Linux's minimum RTO).
const RTO: u64 = 200_000;
/// TCP: first SYN retransmission.
const SYN_RTO: u64 = 1_000_000;
/// `bounded`: record versions the whole cluster makes per health
/// interval (each host refreshes its own every N / this intervals), unless
/// RIFTMESH_SIM_RECORD_RATE says otherwise.
const RECORD_VERSIONS_PER_INTERVAL: usize = 10;
/// Seconds (virtual) the cluster runs before anything is measured.
const WARMUP: u64 = 20_000_000;
/// A kill's burst is counted over this long after the kill.
const BURST_WINDOW: u64 = 5_000_000;

type Host = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    Full,
    Bounded,
}

#[derive(Clone, Debug)]
struct Params {
    n: usize,
    topology: Topology,
    /// `bounded`: ring neighbours on each side, random links dialled per host.
    ring: usize,
    random: usize,
    /// Gossip mesh degree (gossipsub's D) and the record fan-out.
    mesh: usize,
    fanout: usize,
    /// One-way latency range, µs.
    lat: (u64, u64),
    loss: f64,
    seed: u64,
    /// `bounded`: record versions the cluster makes per health interval.
    record_rate: usize,
    /// Upper bound of the random delay before a verdict about another host
    /// is published (µs; 0: at once, as the agent does today).
    publish_jitter: u64,
    /// Helpers are the suspect's ring neighbours
    /// (`DetectorConfig::helpers_near_target`), not random linked members.
    helpers_near: bool,
}

impl Params {
    /// The detector every host runs: the agent's defaults, with helpers
    /// chosen as the topology asks.
    fn detector(&self) -> DetectorConfig {
        DetectorConfig {
            helpers_near_target: self.helpers_near,
            ..DetectorConfig::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proc {
    Up,
    /// The process died; the host's kernel answers (closes, refuses).
    Crashed,
    /// The host vanished: nothing answers.
    Cut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FactKey {
    kind: FactKind,
    peer: Host,
    inc: u64,
}

#[derive(Clone, Debug)]
enum Msg {
    Ping {
        seq: u64,
    },
    PingBack {
        seq: u64,
    },
    /// A dial the target's kernel refused: the request fails.
    Refused {
        probe: u64,
    },
    /// Catch-up: a digest, and the facts the other lacked.
    Digest,
    Facts {
        keys: Vec<FactKey>,
    },
    /// A record exchange half: carries the sender's incarnation.
    Exchange {
        inc: u64,
        respond: bool,
    },
    MemberPing {
        probe: u64,
    },
    Pong {
        probe: u64,
    },
    ProbeFor {
        target: Host,
        probe: u64,
    },
    Probed {
        probe: u64,
        reached: bool,
    },
    Fact {
        key: FactKey,
        publisher: Host,
    },
    Record {
        origin: Host,
        version: u32,
    },
}

impl Msg {
    fn bytes(&self) -> u64 {
        match self {
            Msg::Ping { .. } | Msg::PingBack { .. } => PING_BYTES,
            Msg::Refused { .. } => 0,
            Msg::Digest => DIGEST_BYTES,
            Msg::Facts { keys } => DIGEST_BYTES + FACT_BYTES * keys.len() as u64,
            Msg::Exchange { respond: true, .. } => EXCHANGE_REQ_BYTES,
            Msg::Exchange { respond: false, .. } => EXCHANGE_RESP_BYTES,
            Msg::MemberPing { .. } | Msg::Pong { .. } => MEMBER_PING_BYTES,
            Msg::ProbeFor { .. } => PROBE_FOR_BYTES,
            Msg::Probed { .. } => PROBED_BYTES,
            Msg::Fact { .. } => FACT_BYTES,
            Msg::Record { .. } => RECORD_BYTES,
        }
    }
}

#[derive(Clone, Debug)]
enum Ev {
    Tick(Host),
    /// The next ping of a link's chain (`token`: a replaced link's old
    /// chain stops).
    PingTimer(Host, Host, u64),
    /// libp2p ping's timeout (4 intervals) for ping `seq` on a link.
    PingTimeout(Host, Host, u64),
    Health(Host),
    /// Catch-up's digest to one random link (every 5 s).
    Catchup(Host),
    /// `msg` reaches `to` (sent at `sent`, to `to`'s life `life`: a
    /// message for an earlier life of a restarted host is dropped).
    Deliver {
        from: Host,
        to: Host,
        msg: Msg,
        sent: u64,
        life: u64,
    },
    /// `to` learns that its connection to `from` closed.
    Closed {
        from: Host,
        to: Host,
    },
    /// A dial from `from` to `to` completed: both sides connected.
    Linked {
        from: Host,
        to: Host,
    },
    /// A verdict about another host, published after a random delay
    /// unless it arrived from someone else meanwhile.
    Publish {
        host: Host,
        fact: Fact,
        life: u64,
    },
    /// A probe's own deadline (the agent's tokio timeout).
    ProbeDeadline {
        host: Host,
        probe: u64,
    },
}

/// A scheduled event, ordered by time, then by when it was scheduled.
struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// What a host waits for: its direct probe of `target`, or a helper's
/// answer about `target`, or (as a helper) its ping for an asker.
#[derive(Clone, Debug)]
enum Pending {
    Direct {
        target: Host,
    },
    Helper {
        target: Host,
        helper: Host,
    },
    ForAsker {
        target: Host,
        asker: Host,
        probe: u64,
    },
}

struct HostState {
    det: Detector,
    proc: Proc,
    inc: u64,
    /// Bumped at every restart: events of an earlier life are dropped.
    life: u64,
    /// Per link: the ping in flight (libp2p ping keeps one), and the
    /// current ping chain.
    ping_out: HashMap<Host, u64>,
    ping_chain: HashMap<Host, u64>,
    links: HashSet<Host>,
    mesh: Vec<Host>,
    facts: HashSet<FactKey>,
    seen_msgs: HashSet<(FactKey, Host)>,
    /// `bounded`: newest record version held, per origin (0: none).
    records: Vec<u32>,
    pending: HashMap<u64, Pending>,
    bytes_out: u64,
    bytes_in: u64,
    msgs_out: u64,
    msgs_in: u64,
}

#[derive(Default, Debug, Serialize, Clone)]
pub struct Counts {
    pub suspect_facts: u64,
    pub offline_facts: u64,
}

struct Sim {
    p: Params,
    now: u64,
    base: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    /// Events handled so far.
    handled: u64,
    hosts: Vec<HostState>,
    ids: Vec<PeerId>,
    index: HashMap<PeerId, Host>,
    /// `bounded`: the hosts in ring order, and each host's position in it.
    ring_order: Vec<Host>,
    ring_pos: Vec<usize>,
    rng: StdRng,
    next_probe: u64,
    /// Partition: host -> side; while set, segments across wait in `held`
    /// (TCP retransmits them with backoff) and dials across fail.
    side: Option<Vec<u8>>,
    held: Vec<(Host, Host, Msg, u64)>,
    /// Per directed link: when its first segment stalled in a partition.
    stalled: HashMap<(Host, Host), u64>,
    /// Per directed link: the latest delivery scheduled (one TCP stream:
    /// nothing overtakes what was sent before it).
    fifo: HashMap<(Host, Host), u64>,
    next_ping: u64,
    /// `bounded`: when each origin's current version was made.
    version_made: Vec<Vec<u64>>,
    /// `bounded`: versions made in [from, until) are followed: how many,
    /// and each receipt's delay since it was made.
    record_window: Option<(u64, u64)>,
    records_followed: u64,
    record_delays: Vec<u64>,
    /// First time each host held each fact.
    fact_at: HashMap<FactKey, HashMap<Host, u64>>,
    /// Direct probes started and failed, and helper rounds started.
    probes: u64,
    probes_failed: u64,
    helper_rounds: u64,
    /// HOST_OFFLINE messages published (every publisher's copy).
    offline_published: u64,
    /// Facts about a host at an incarnation that was never signalled
    /// (false).
    false_facts: Counts,
    signalled: HashSet<(Host, u64)>,
}

fn name(h: Host) -> String {
    format!("h{h:05}")
}

impl Sim {
    fn new(p: Params) -> Sim {
        let mut rng = StdRng::seed_from_u64(p.seed);
        let ids: Vec<PeerId> = (0..p.n)
            .map(|_| {
                let mut b = [0u8; 32];
                rng.fill(&mut b);
                libp2p::identity::Keypair::ed25519_from_bytes(b)
                    .expect("32 bytes")
                    .public()
                    .to_peer_id()
            })
            .collect();
        let index = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i as Host))
            .collect();
        let cfg = p.detector();
        let hosts = (0..p.n)
            .map(|i| HostState {
                det: Detector::new(cfg.clone(), ids[i], name(i as Host), 1, p.seed ^ i as u64),
                proc: Proc::Up,
                inc: 1,
                life: 0,
                ping_out: HashMap::new(),
                ping_chain: HashMap::new(),
                links: HashSet::new(),
                mesh: Vec::new(),
                facts: HashSet::new(),
                seen_msgs: HashSet::new(),
                records: if p.topology == Topology::Bounded {
                    vec![0; p.n]
                } else {
                    Vec::new()
                },
                pending: HashMap::new(),
                bytes_out: 0,
                bytes_in: 0,
                msgs_out: 0,
                msgs_in: 0,
            })
            .collect();
        let version_made = if p.topology == Topology::Bounded {
            vec![vec![0; 1]; p.n]
        } else {
            Vec::new()
        };
        let mut sim = Sim {
            p,
            now: 0,
            base: Instant::now(),
            seq: 0,
            queue: BinaryHeap::new(),
            handled: 0,
            hosts,
            ids,
            index,
            ring_order: Vec::new(),
            ring_pos: Vec::new(),
            rng,
            next_probe: 1,
            side: None,
            held: Vec::new(),
            stalled: HashMap::new(),
            fifo: HashMap::new(),
            next_ping: 1,
            version_made,
            record_window: None,
            records_followed: 0,
            record_delays: Vec::new(),
            fact_at: HashMap::new(),
            false_facts: Counts::default(),
            probes: 0,
            probes_failed: 0,
            helper_rounds: 0,
            offline_published: 0,
            signalled: HashSet::new(),
        };
        sim.build_links();
        sim
    }

    fn at(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    fn push(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at: self.now + delay,
            seq: self.seq,
            ev,
        }));
    }

    /// Fixed one-way latency of the pair, from a hash of it.
    fn latency(&self, a: Host, b: Host) -> u64 {
        let (x, y) = (a.min(b) as u64, a.max(b) as u64);
        let mut h = (x << 32 | y) ^ self.p.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        let (lo, hi) = self.p.lat;
        lo + h % (hi - lo + 1)
    }

    /// Time lost to retransmissions of one packet: each loss costs the
    /// current timeout, which doubles.
    fn backoff(&mut self, first_rto: u64) -> u64 {
        let (mut d, mut rto) = (0, first_rto);
        while self.p.loss > 0.0 && self.rng.gen_bool(self.p.loss.min(0.5)) {
            d += rto;
            rto *= 2;
        }
        d
    }

    /// TCP's delay for one segment: latency plus retransmissions (Linux's
    /// timeout: the 200 ms minimum plus the round trip).
    fn transit(&mut self, a: Host, b: Host) -> u64 {
        let lat = self.latency(a, b);
        lat + self.backoff(RTO + 2 * lat)
    }

    fn dial_time(&mut self, a: Host, b: Host) -> u64 {
        let syn = self.backoff(SYN_RTO);
        // SYN/SYN-ACK, then the private-network, Noise and Yamux handshakes.
        syn + 2 * self.latency(a, b) + 2 * self.transit(a, b)
    }

    fn across(&self, a: Host, b: Host) -> bool {
        self.side
            .as_ref()
            .is_some_and(|s| s[a as usize] != s[b as usize])
    }

    fn build_links(&mut self) {
        let n = self.p.n;
        let mut pairs: Vec<(Host, Host)> = Vec::new();
        match self.p.topology {
            Topology::Full => {
                for a in 0..n {
                    for b in a + 1..n {
                        pairs.push((a as Host, b as Host));
                    }
                }
            }
            Topology::Bounded => {
                let mut order: Vec<Host> = (0..n as Host).collect();
                order.sort_by_key(|&h| ring_key(&self.ids[h as usize]));
                self.ring_pos = vec![0; n];
                for (i, &h) in order.iter().enumerate() {
                    self.ring_pos[h as usize] = i;
                }
                self.ring_order = order.clone();
                for (i, &a) in order.iter().enumerate() {
                    for k in 1..=self.p.ring.min(n - 1) {
                        pairs.push((a, order[(i + k) % n]));
                    }
                    for _ in 0..self.p.random {
                        let b = self.rng.gen_range(0..n) as Host;
                        if b != a {
                            pairs.push((a, b));
                        }
                    }
                }
            }
        }
        for (a, b) in pairs {
            self.hosts[a as usize].links.insert(b);
            self.hosts[b as usize].links.insert(a);
        }
        for h in 0..n {
            self.choose_mesh(h as Host);
        }
        // Every host starts knowing its linked peers (their records came
        // with the first exchange) and pinging them.
        let now = self.at();
        for h in 0..n as Host {
            let mut links: Vec<Host> = self.hosts[h as usize].links.iter().copied().collect();
            links.sort();
            for l in links {
                let id = self.ids[l as usize];
                let det = &mut self.hosts[h as usize].det;
                det.connected(id, now);
                det.record(id, &name(l), 1, now);
                self.know_ring_of(h, l);
                let jitter = self.rng.gen_range(0..PING_EVERY);
                self.start_pings(h, l, jitter);
            }
            let j = self.rng.gen_range(0..TICK);
            self.push(j, Ev::Tick(h));
            let j = self.rng.gen_range(0..HEALTH_EVERY);
            self.push(j, Ev::Health(h));
            let j = self.rng.gen_range(0..CATCHUP_EVERY);
            self.push(j, Ev::Catchup(h));
        }
    }

    /// `bounded`: the members `h` holds besides its links, for its link `l`
    /// (called per link as it is made). In the design
    /// every host holds every member (joins arrive as facts, records by
    /// gossip); what the detector's choice of helpers reads of that table
    /// is the ring around each member it may probe, its links: their
    /// nearest ring neighbours on each side, as many as it would ask. Only
    /// those are entered (not every member: 5,000 tables of 5,000), so the
    /// helpers are the ones a full table would give.
    fn know_ring_of(&mut self, h: Host, l: Host) {
        if !self.p.helpers_near {
            return;
        }
        let n = self.ring_order.len();
        let per_side = self.p.detector().helpers_per_side();
        let now = self.at();
        let at = self.ring_pos[l as usize];
        for i in 1..=per_side.min(n / 2) {
            for q in [
                self.ring_order[(at + i) % n],
                self.ring_order[(at + n - i) % n],
            ] {
                let up = self.hosts[q as usize].proc == Proc::Up;
                if up && q != h && !self.hosts[h as usize].links.contains(&q) {
                    let (id, inc) = (self.ids[q as usize], self.hosts[q as usize].inc);
                    self.hosts[h as usize].det.record(id, &name(q), inc, now);
                }
            }
        }
    }

    /// Gossipsub's mesh: symmetric (a GRAFT adds both sides), topped up
    /// to `mesh` from the host's links when it falls short.
    /// A new ping chain on the link `h` → `l` (a new connection), the old
    /// one (if any) abandoned.
    fn start_pings(&mut self, h: Host, l: Host, after: u64) {
        self.seq += 1;
        let token = self.seq;
        let s = &mut self.hosts[h as usize];
        s.ping_chain.insert(l, token);
        s.ping_out.remove(&l);
        self.push(after, Ev::PingTimer(h, l, token));
    }

    /// The next ping of the current chain on `h` → `l`, `after` µs from now.
    fn next_ping_in(&mut self, h: Host, l: Host, after: u64) {
        if let Some(&token) = self.hosts[h as usize].ping_chain.get(&l) {
            self.push(after, Ev::PingTimer(h, l, token));
        }
    }

    fn choose_mesh(&mut self, h: Host) {
        let links = &self.hosts[h as usize].links;
        let mut kept: Vec<Host> = self.hosts[h as usize]
            .mesh
            .iter()
            .copied()
            .filter(|m| links.contains(m))
            .collect();
        let mut cand: Vec<Host> = links
            .iter()
            .copied()
            .filter(|l| !kept.contains(l))
            .collect();
        cand.sort();
        cand.shuffle(&mut self.rng);
        for c in cand {
            if kept.len() >= self.p.mesh {
                break;
            }
            let other = &mut self.hosts[c as usize].mesh;
            if other.len() >= MESH_HIGH && !other.contains(&h) {
                // Full (gossipsub's D_high): it would prune us.
                continue;
            }
            kept.push(c);
            if !other.contains(&h) {
                other.push(h);
            }
        }
        self.hosts[h as usize].mesh = kept;
    }

    fn send(&mut self, from: Host, to: Host, msg: Msg) {
        let b = msg.bytes();
        let s = &mut self.hosts[from as usize];
        s.bytes_out += b;
        s.msgs_out += 1;
        self.transmit(from, to, msg);
    }

    /// One message on the `from` → `to` TCP stream: held while a partition
    /// separates them, never before what was sent on it earlier.
    fn transmit(&mut self, from: Host, to: Host, msg: Msg) {
        let sent = self.now;
        if self.across(from, to) {
            self.hold(from, to, msg, sent);
            return;
        }
        let d = self.transit(from, to);
        let at = (self.now + d).max(self.fifo.get(&(from, to)).copied().unwrap_or(0));
        self.fifo.insert((from, to), at);
        self.deliver_at(at, from, to, msg, sent);
    }

    /// A segment a partition stops: TCP retransmits it after the heal, its
    /// stream's timer running from the first one that stalled.
    fn hold(&mut self, from: Host, to: Host, msg: Msg, sent: u64) {
        self.stalled.entry((from, to)).or_insert(sent);
        self.held.push((from, to, msg, sent));
    }

    /// `msg` reaches `to` at `at`, for the life `to` is in now.
    fn deliver_at(&mut self, at: u64, from: Host, to: Host, msg: Msg, sent: u64) {
        let life = self.hosts[to as usize].life;
        self.push(
            at - self.now,
            Ev::Deliver {
                from,
                to,
                msg,
                sent,
                life,
            },
        );
    }

    /// The partition ends: each stalled stream resumes at its next
    /// retransmission (the timeout doubling from when it stalled), with
    /// everything held on it, in order.
    fn heal(&mut self) {
        self.side = None;
        let mut held = std::mem::take(&mut self.held);
        // In send order on each stream (a segment caught in flight is held
        // when it would have arrived, after later ones held at sending).
        held.sort_by_key(|(f, t, _, sent)| (*f, *t, *sent));
        let mut resume: HashMap<(Host, Host), u64> = HashMap::new();
        let mut stalled: Vec<((Host, Host), u64)> = self.stalled.drain().collect();
        stalled.sort();
        for (pair, since) in stalled {
            // Linux: the minimum RTO plus the round trip, doubling.
            let mut rto = RTO + 2 * self.latency(pair.0, pair.1);
            let mut t = since + rto;
            while t < self.now {
                rto *= 2;
                t += rto;
            }
            let at = t + self.latency(pair.0, pair.1);
            resume.insert(pair, at);
            let f = self.fifo.entry(pair).or_insert(0);
            *f = (*f).max(at);
        }
        for (from, to, msg, sent) in held {
            if !self.hosts[from as usize].links.contains(&to)
                || !self.hosts[to as usize].links.contains(&from)
            {
                continue;
            }
            let at = resume[&(from, to)];
            self.deliver_at(at, from, to, msg, sent);
        }
    }

    fn account_dial(&mut self, a: Host, b: Host) {
        self.hosts[a as usize].bytes_out += DIAL_BYTES;
        self.hosts[a as usize].bytes_in += DIAL_BYTES;
        self.hosts[b as usize].bytes_out += DIAL_BYTES;
        self.hosts[b as usize].bytes_in += DIAL_BYTES;
    }

    /// A member request that dials if there is no link: the reply path for
    /// a dead or unreachable target is decided here.
    fn request(&mut self, from: Host, to: Host, msg: Msg, probe: u64) {
        if self.hosts[from as usize].links.contains(&to) {
            self.send(from, to, msg);
            return;
        }
        let up = self.hosts[to as usize].proc;
        let reachable = !self.across(from, to) && up != Proc::Cut;
        if !reachable {
            // Nothing answers: the caller's deadline decides.
            return;
        }
        if up == Proc::Crashed {
            // The kernel refuses: the request fails after one round trip.
            let at = self.now + 2 * self.latency(from, to);
            self.deliver_at(at, to, from, Msg::Refused { probe }, self.now);
            return;
        }
        // An on-demand connection, modelled as closed after the request
        // (the agent keeps idle connections for an hour today; the bounded
        // design closes those it does not need, so only the dial's bytes
        // count here).
        self.account_dial(from, to);
        let d = self.dial_time(from, to);
        let b = msg.bytes();
        self.hosts[from as usize].bytes_out += b;
        self.hosts[from as usize].msgs_out += 1;
        let at = self.now + d + self.transit(from, to);
        self.deliver_at(at, from, to, msg, self.now);
    }

    fn run_until(&mut self, t: u64) {
        while self.queue.peek().is_some_and(|q| q.0.at <= t) {
            let Some(Reverse(q)) = self.queue.pop() else {
                break;
            };
            self.now = q.at;
            self.handled += 1;
            self.handle(q.ev);
        }
        self.now = t;
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick(h) => {
                self.push(TICK, Ev::Tick(h));
                if self.hosts[h as usize].proc != Proc::Up {
                    return;
                }
                let now = self.at();
                self.hosts[h as usize].det.tick(now);
                self.run_actions(h);
            }
            Ev::PingTimer(h, l, token) => {
                let s = &self.hosts[h as usize];
                if !s.links.contains(&l)
                    || s.proc != Proc::Up
                    || s.ping_out.contains_key(&l)
                    || s.ping_chain.get(&l) != Some(&token)
                {
                    return;
                }
                let seq = self.next_ping;
                self.next_ping += 1;
                self.hosts[h as usize].ping_out.insert(l, seq);
                self.push(4 * PING_EVERY, Ev::PingTimeout(h, l, seq));
                self.send(h, l, Msg::Ping { seq });
            }
            Ev::PingTimeout(h, l, seq) => {
                // libp2p ping reports the failure and pings again after
                // the interval.
                if self.hosts[h as usize].ping_out.get(&l) == Some(&seq) {
                    self.hosts[h as usize].ping_out.remove(&l);
                    self.next_ping_in(h, l, PING_EVERY);
                }
            }
            Ev::Health(h) => self.on_health(h),
            Ev::Publish { host, fact, life } => {
                let s = &self.hosts[host as usize];
                if s.proc == Proc::Up && s.life == life {
                    self.publish(host, fact);
                    self.run_actions(host);
                }
            }
            Ev::Catchup(h) => self.on_catchup(h),
            Ev::Deliver {
                from,
                to,
                msg,
                sent,
                life,
            } => self.deliver(from, to, msg, sent, life),
            Ev::Closed { from, to } => {
                let s = &mut self.hosts[to as usize];
                if s.proc != Proc::Up || !s.links.remove(&from) {
                    return;
                }
                s.ping_out.remove(&from);
                if s.mesh.contains(&from) {
                    s.mesh.retain(|&m| m != from);
                    self.choose_mesh(to);
                }
                let now = self.at();
                // Requests in flight on the closed connection fail at once
                // (ConnectionClosed: silence to the detector).
                let mut failed: Vec<(u64, Pending)> = self.hosts[to as usize]
                    .pending
                    .iter()
                    .filter(|(_, p)| match p {
                        Pending::Direct { target } => *target == from,
                        Pending::Helper { helper, .. } => *helper == from,
                        Pending::ForAsker { target, .. } => *target == from,
                    })
                    .map(|(k, p)| (*k, p.clone()))
                    .collect();
                failed.sort_by_key(|(k, _)| *k);
                for (k, p) in failed {
                    self.hosts[to as usize].pending.remove(&k);
                    let det = &mut self.hosts[to as usize].det;
                    match p {
                        Pending::Direct { target } => {
                            det.probe_result(self.ids[target as usize], Err(Failure::Silent), now);
                            self.probes_failed += 1;
                        }
                        Pending::Helper { target, helper } => det.indirect_result(
                            self.ids[target as usize],
                            self.ids[helper as usize],
                            None,
                            now,
                        ),
                        // Our ping for an asker failed: not reached.
                        Pending::ForAsker { asker, probe, .. } => self.send(
                            to,
                            asker,
                            Msg::Probed {
                                probe,
                                reached: false,
                            },
                        ),
                    }
                }
                let id = self.ids[from as usize];
                self.hosts[to as usize].det.disconnected(id, now);
                self.run_actions(to);
            }
            Ev::Linked { from, to } => {
                if self.hosts[from as usize].proc != Proc::Up
                    || self.hosts[to as usize].proc != Proc::Up
                {
                    return;
                }
                for (a, b) in [(from, to), (to, from)] {
                    // A link the other side still held (a host that vanished
                    // and came back) is replaced by the new connection.
                    if self.hosts[a as usize].links.insert(b) {
                        let now = self.at();
                        let id = self.ids[b as usize];
                        self.hosts[a as usize].det.connected(id, now);
                        self.know_ring_of(a, b);
                    }
                    self.start_pings(a, b, PING_EVERY);
                    self.choose_mesh(a);
                }
                self.account_dial(from, to);
                // Both sides exchange records on a new connection.
                for (a, b) in [(from, to), (to, from)] {
                    let inc = self.hosts[a as usize].inc;
                    self.send(a, b, Msg::Exchange { inc, respond: true });
                }
            }
            Ev::ProbeDeadline { host, probe } => {
                let Some(pend) = self.hosts[host as usize].pending.remove(&probe) else {
                    return;
                };
                let now = self.at();
                match pend {
                    Pending::Direct { target } => {
                        let id = self.ids[target as usize];
                        let det = &mut self.hosts[host as usize].det;
                        det.probe_result(id, Err(Failure::Silent), now);
                        self.probes_failed += 1;
                    }
                    Pending::Helper { target, helper } => {
                        let (t, hp) = (self.ids[target as usize], self.ids[helper as usize]);
                        let det = &mut self.hosts[host as usize].det;
                        det.indirect_result(t, hp, None, now);
                    }
                    Pending::ForAsker { asker, probe, .. } => {
                        self.send(
                            host,
                            asker,
                            Msg::Probed {
                                probe,
                                reached: false,
                            },
                        );
                    }
                }
                self.run_actions(host);
            }
        }
    }

    fn on_health(&mut self, h: Host) {
        self.push(HEALTH_EVERY, Ev::Health(h));
        if self.hosts[h as usize].proc != Proc::Up {
            return;
        }
        match self.p.topology {
            Topology::Full => {
                // One exchange per pair: the side whose id sorts lower.
                let me = self.ids[h as usize].to_bytes();
                let mut peers: Vec<Host> = self.hosts[h as usize]
                    .links
                    .iter()
                    .copied()
                    .filter(|&l| self.ids[l as usize].to_bytes() > me)
                    .collect();
                peers.sort();
                let inc = self.hosts[h as usize].inc;
                for l in peers {
                    self.send(h, l, Msg::Exchange { inc, respond: true });
                }
            }
            Topology::Bounded => {
                // A new version every `scale` intervals (phase spread by host).
                let scale = (self.p.n / self.p.record_rate).max(1) as u64;
                let round = self.now / HEALTH_EVERY;
                if (round + h as u64) % scale != 0 {
                    return;
                }
                let v = self.hosts[h as usize].records[h as usize] + 1;
                self.hosts[h as usize].records[h as usize] = v;
                self.version_made[h as usize].push(self.now);
                if self
                    .record_window
                    .is_some_and(|(a, b)| (a..b).contains(&self.now))
                {
                    self.records_followed += 1;
                }
                self.spread_record(h, h, v, None);
            }
        }
    }

    /// Catch-up: a digest to one random link, which answers with the facts
    /// it holds and this host lacks. (The agent also fetches a gap as soon
    /// as a gossiped event shows one; not modelled.)
    fn on_catchup(&mut self, h: Host) {
        self.push(CATCHUP_EVERY, Ev::Catchup(h));
        if self.hosts[h as usize].proc != Proc::Up {
            return;
        }
        let mut links: Vec<Host> = self.hosts[h as usize].links.iter().copied().collect();
        if links.is_empty() {
            return;
        }
        links.sort();
        let l = links[self.rng.gen_range(0..links.len())];
        self.send(h, l, Msg::Digest);
    }

    /// Catch-up's answer arrives: the facts `h` lacked (stored, not
    /// gossiped again).
    fn on_facts(&mut self, h: Host, keys: Vec<FactKey>) {
        for key in keys {
            self.hold_fact(h, key);
        }
    }

    fn spread_record(&mut self, h: Host, origin: Host, version: u32, except: Option<Host>) {
        let mut l: Vec<Host> = self.hosts[h as usize]
            .links
            .iter()
            .copied()
            .filter(|&x| Some(x) != except && x != origin)
            .collect();
        l.sort();
        l.shuffle(&mut self.rng);
        l.truncate(self.p.fanout);
        for to in l {
            self.send(h, to, Msg::Record { origin, version });
        }
    }

    fn deliver(&mut self, from: Host, to: Host, msg: Msg, sent: u64, life: u64) {
        if self.hosts[to as usize].proc != Proc::Up || self.hosts[to as usize].life != life {
            return;
        }
        if self.across(from, to) {
            // Cut off in flight (its timer started when it was sent).
            self.hold(from, to, msg, sent);
            return;
        }
        let linked = self.hosts[to as usize].links.contains(&from);
        {
            let s = &mut self.hosts[to as usize];
            s.bytes_in += msg.bytes();
            s.msgs_in += 1;
        }
        let now = self.at();
        let from_id = self.ids[from as usize];
        match msg {
            Msg::Ping { seq } => self.send(to, from, Msg::PingBack { seq }),
            Msg::PingBack { seq } => {
                if self.hosts[to as usize].ping_out.get(&from) == Some(&seq) {
                    self.hosts[to as usize].ping_out.remove(&from);
                    // The next ping goes one interval after this answer.
                    self.next_ping_in(to, from, PING_EVERY);
                    if linked {
                        let rtt = Duration::from_micros(2 * self.latency(from, to));
                        self.hosts[to as usize].det.rtt(from_id, rtt, now);
                    }
                }
            }
            Msg::Refused { probe } => match self.hosts[to as usize].pending.remove(&probe) {
                Some(Pending::Direct { target }) => {
                    let id = self.ids[target as usize];
                    self.hosts[to as usize]
                        .det
                        .probe_result(id, Err(Failure::Refused), now);
                    self.probes_failed += 1;
                }
                // A helper that could not be reached gives no answer.
                Some(Pending::Helper { target, helper }) => {
                    let (t, hp) = (self.ids[target as usize], self.ids[helper as usize]);
                    self.hosts[to as usize]
                        .det
                        .indirect_result(t, hp, None, now);
                }
                // The helper's own ping was refused: not reached.
                Some(Pending::ForAsker { asker, probe, .. }) => self.send(
                    to,
                    asker,
                    Msg::Probed {
                        probe,
                        reached: false,
                    },
                ),
                None => {}
            },
            Msg::Digest => {
                let mut keys: Vec<FactKey> = self.hosts[to as usize]
                    .facts
                    .difference(&self.hosts[from as usize].facts)
                    .copied()
                    .collect();
                keys.sort_by_key(|k| (k.peer, k.inc, k.kind as u8));
                self.send(to, from, Msg::Facts { keys });
            }
            Msg::Facts { keys } => self.on_facts(to, keys),
            Msg::Exchange { inc, respond } => {
                self.hosts[to as usize]
                    .det
                    .record(from_id, &name(from), inc, now);
                if respond {
                    let inc = self.hosts[to as usize].inc;
                    self.send(
                        to,
                        from,
                        Msg::Exchange {
                            inc,
                            respond: false,
                        },
                    );
                }
            }
            Msg::MemberPing { probe } => {
                self.hosts[to as usize].det.heard(from_id, now);
                self.send(to, from, Msg::Pong { probe });
            }
            Msg::Pong { probe } => match self.hosts[to as usize].pending.remove(&probe) {
                Some(Pending::Direct { target }) => {
                    let id = self.ids[target as usize];
                    self.hosts[to as usize].det.probe_result(id, Ok(()), now);
                }
                Some(Pending::ForAsker { asker, probe, .. }) => self.send(
                    to,
                    asker,
                    Msg::Probed {
                        probe,
                        reached: true,
                    },
                ),
                other => {
                    if let Some(o) = other {
                        self.hosts[to as usize].pending.insert(probe, o);
                    }
                }
            },
            Msg::ProbeFor { target, probe } => {
                let gone = self.hosts[to as usize]
                    .det
                    .settled_gone(&self.ids[target as usize]);
                if gone {
                    self.send(
                        to,
                        from,
                        Msg::Probed {
                            probe,
                            reached: false,
                        },
                    );
                } else {
                    let mine = self.next_probe;
                    self.next_probe += 1;
                    self.hosts[to as usize].pending.insert(
                        mine,
                        Pending::ForAsker {
                            target,
                            asker: from,
                            probe,
                        },
                    );
                    let t = DetectorConfig::default().probe_timeout.as_micros() as u64;
                    self.push(
                        t,
                        Ev::ProbeDeadline {
                            host: to,
                            probe: mine,
                        },
                    );
                    self.request(to, target, Msg::MemberPing { probe: mine }, mine);
                }
            }
            Msg::Probed { probe, reached } => {
                // A helper's answer about a suspect of ours.
                if let Some(Pending::Helper { target, helper }) =
                    self.hosts[to as usize].pending.get(&probe).cloned()
                {
                    self.hosts[to as usize].pending.remove(&probe);
                    let (t, hp) = (self.ids[target as usize], self.ids[helper as usize]);
                    self.hosts[to as usize]
                        .det
                        .indirect_result(t, hp, Some(reached), now);
                }
            }
            Msg::Fact { key, publisher } => self.on_fact(to, key, publisher, Some(from)),
            Msg::Record { origin, version } => {
                let held = &mut self.hosts[to as usize].records[origin as usize];
                if version > *held {
                    *held = version;
                    let made = self.version_made[origin as usize][version as usize];
                    if self
                        .record_window
                        .is_some_and(|(a, b)| (a..b).contains(&made))
                    {
                        self.record_delays.push(self.now - made);
                    }
                    self.spread_record(to, origin, version, Some(from));
                }
            }
        }
        self.run_actions(to);
    }

    /// A gossiped fact message reaches `h` (or `h` publishes it: `via` None).
    fn on_fact(&mut self, h: Host, key: FactKey, publisher: Host, via: Option<Host>) {
        if !self.hosts[h as usize].seen_msgs.insert((key, publisher)) {
            return;
        }
        // Gossipsub's flood publishing: the publisher sends its own message
        // to every connected subscriber; others forward along the mesh.
        let mut mesh: Vec<Host> = match via {
            None => self.hosts[h as usize].links.iter().copied().collect(),
            Some(_) => self.hosts[h as usize]
                .mesh
                .iter()
                .copied()
                .filter(|&m| Some(m) != via && self.hosts[h as usize].links.contains(&m))
                .collect(),
        };
        mesh.sort();
        for m in mesh {
            self.send(h, m, Msg::Fact { key, publisher });
        }
        self.hold_fact(h, key);
    }

    /// `h` stores a fact it did not hold and feeds it to its detector (as
    /// the agent's membership task follows its event log).
    fn hold_fact(&mut self, h: Host, key: FactKey) {
        if !self.hosts[h as usize].facts.insert(key) {
            return;
        }
        self.fact_at
            .entry(key)
            .or_default()
            .entry(h)
            .or_insert(self.now);
        let f = self.fact_of(key);
        let now = self.at();
        self.hosts[h as usize].det.fact(&f, now);
    }

    fn fact_of(&self, key: FactKey) -> Fact {
        Fact {
            kind: key.kind,
            peer: self.ids[key.peer as usize],
            name: name(key.peer),
            incarnation: key.inc,
        }
    }

    fn publish(&mut self, h: Host, f: Fact) {
        let peer = self.index[&f.peer];
        let key = FactKey {
            kind: f.kind,
            peer,
            inc: f.incarnation,
        };
        // The publisher finds a fact it already holds in its store.
        if self.hosts[h as usize].facts.contains(&key) {
            return;
        }
        if f.kind == FactKind::Offline {
            self.offline_published += 1;
        }
        if !self.signalled.contains(&(peer, f.incarnation)) {
            match f.kind {
                FactKind::Suspect => self.false_facts.suspect_facts += 1,
                FactKind::Offline => self.false_facts.offline_facts += 1,
                _ => {}
            }
        }
        self.on_fact(h, key, h, None);
    }

    fn run_actions(&mut self, h: Host) {
        loop {
            let actions = self.hosts[h as usize].det.take_actions();
            if actions.is_empty() {
                return;
            }
            for a in actions {
                self.action(h, a);
            }
        }
    }

    fn action(&mut self, h: Host, a: Action) {
        let timeout = DetectorConfig::default().probe_timeout.as_micros() as u64;
        match a {
            Action::ProbeDirect(p) => {
                self.probes += 1;
                let target = self.index[&p];
                let probe = self.next_probe;
                self.next_probe += 1;
                self.hosts[h as usize]
                    .pending
                    .insert(probe, Pending::Direct { target });
                self.push(timeout, Ev::ProbeDeadline { host: h, probe });
                self.request(h, target, Msg::MemberPing { probe }, probe);
            }
            Action::ProbeIndirect { target, helpers } => {
                self.helper_rounds += 1;
                let target = self.index[&target];
                for hp in helpers {
                    let helper = self.index[&hp];
                    let probe = self.next_probe;
                    self.next_probe += 1;
                    self.hosts[h as usize]
                        .pending
                        .insert(probe, Pending::Helper { target, helper });
                    self.push(2 * timeout, Ev::ProbeDeadline { host: h, probe });
                    self.request(h, helper, Msg::ProbeFor { target, probe }, probe);
                }
            }
            Action::Announce(f) => {
                let other = f.peer != self.ids[h as usize];
                let verdict = matches!(f.kind, FactKind::Suspect | FactKind::Offline);
                if other && verdict && self.p.publish_jitter > 0 {
                    let d = self.rng.gen_range(0..self.p.publish_jitter);
                    let life = self.hosts[h as usize].life;
                    self.push(
                        d,
                        Ev::Publish {
                            host: h,
                            fact: f,
                            life,
                        },
                    );
                } else {
                    self.publish(h, f);
                }
            }
            Action::Refute { incarnation } => {
                self.hosts[h as usize].inc = incarnation;
                let mut links: Vec<Host> = self.hosts[h as usize].links.iter().copied().collect();
                links.sort();
                for l in links {
                    self.send(
                        h,
                        l,
                        Msg::Exchange {
                            inc: incarnation,
                            respond: true,
                        },
                    );
                }
            }
            Action::Transition { .. } | Action::Forget(_) => {}
        }
    }

    // -------------------------------------------------------- faults

    fn crash(&mut self, v: Host, mode: Proc) {
        let inc = self.hosts[v as usize].inc;
        self.signalled.insert((v, inc));
        self.hosts[v as usize].proc = mode;
        self.hosts[v as usize].pending.clear();
        self.hosts[v as usize].ping_out.clear();
        let mut links: Vec<Host> = self.hosts[v as usize].links.drain().collect();
        links.sort();
        if mode == Proc::Crashed {
            for l in links {
                // The FIN/RST comes after what was sent before it.
                let at = (self.now + self.latency(v, l))
                    .max(self.fifo.get(&(v, l)).copied().unwrap_or(0));
                self.push(at - self.now, Ev::Closed { from: v, to: l });
            }
        }
    }

    /// The host comes back (same data dir): a higher incarnation, its
    /// links dialled again, HOST_ONLINE.
    fn restart(&mut self, v: Host, links: &[Host]) {
        let inc = self.hosts[v as usize].inc + 1;
        let cfg = self.p.detector();
        let seed = self.rng.gen();
        let s = &mut self.hosts[v as usize];
        s.proc = Proc::Up;
        s.inc = inc;
        s.life += 1;
        s.det = Detector::new(cfg, self.ids[v as usize], name(v), inc, seed);
        s.links.clear();
        s.mesh.clear();
        s.ping_out.clear();
        // Gossipsub's seen cache and the records of others lived in memory.
        s.seen_msgs.clear();
        for (o, r) in s.records.iter_mut().enumerate() {
            if o != v as usize {
                *r = 0;
            }
        }
        // The agent replays its stored membership facts into the new
        // detector at start (membership::task, replay_cursor).
        let mut keys: Vec<FactKey> = s.facts.iter().copied().collect();
        keys.sort_by_key(|k| (k.peer, k.inc, k.kind as u8));
        let now = self.at();
        for key in keys {
            let f = self.fact_of(key);
            self.hosts[v as usize].det.fact(&f, now);
        }
        self.run_actions(v);
        for &l in links {
            if self.hosts[l as usize].proc == Proc::Up {
                let d = self.dial_time(v, l);
                self.push(d, Ev::Linked { from: v, to: l });
            }
        }
        let f = Fact {
            kind: FactKind::Online,
            peer: self.ids[v as usize],
            name: name(v),
            incarnation: inc,
        };
        let d = 2 * self.latency(v, *links.first().unwrap_or(&v)) + 100_000;
        self.run_until(self.now + d);
        self.publish(v, f);
    }

    fn alive_hosts(&self) -> Vec<Host> {
        (0..self.p.n as Host)
            .filter(|&h| self.hosts[h as usize].proc == Proc::Up)
            .collect()
    }

    /// Runs until every other live host holds HOST_OFFLINE of `v` at
    /// `inc`, or `limit` µs pass; returns each host's delay (None: missing).
    fn wait_offline(&mut self, v: Host, inc: u64, start: u64, limit: u64) -> Vec<Option<u64>> {
        let key = FactKey {
            kind: FactKind::Offline,
            peer: v,
            inc,
        };
        let step = 100_000;
        loop {
            let others: Vec<Host> = self.alive_hosts();
            let held = self.fact_at.get(&key);
            let all = others
                .iter()
                .all(|h| held.is_some_and(|m| m.contains_key(h)));
            if all || self.now >= start + limit {
                return others
                    .iter()
                    .map(|h| held.and_then(|m| m.get(h)).map(|t| t.saturating_sub(start)))
                    .collect();
            }
            self.run_until(self.now + step);
        }
    }

    /// Start counting probes and verdicts afresh.
    fn reset_counts(&mut self) {
        self.false_facts = Counts::default();
        self.probes = 0;
        self.probes_failed = 0;
        self.helper_rounds = 0;
    }

    fn traffic(&self) -> Vec<(u64, u64, u64, u64)> {
        self.hosts
            .iter()
            .map(|s| (s.bytes_in, s.bytes_out, s.msgs_in, s.msgs_out))
            .collect()
    }
}

// ------------------------------------------------------------ scenarios

#[derive(Debug, Serialize, Default, Clone)]
pub struct Row {
    pub topology: Option<Topology>,
    pub n: usize,
    pub links_mean: f64,
    pub links_max: usize,
    /// Idle, per host: bytes/s (in + out), messages/s (in + out).
    pub idle_bps_mean: f64,
    pub idle_bps_max: f64,
    pub idle_msgs_mean: f64,
    /// How often a host's record is renewed, s.
    pub record_refresh_s: f64,
    /// `bounded`: of the versions made in the idle window, the share of
    /// the other hosts each reached, and the p99 delay of a receipt (ms).
    pub record_reach: Option<f64>,
    pub record_spread_p99_ms: Option<f64>,
    /// kill (process dies): per trial, max over hosts of the time until
    /// HOST_OFFLINE was held, ms; and how many hosts missed it.
    pub kill_ms: Vec<f64>,
    pub kill_missing: usize,
    /// cut (host vanishes): the same.
    pub cut_ms: Vec<f64>,
    pub cut_missing: usize,
    /// Per kill trial: bytes per surviving host beyond the idle rate in
    /// the 5 s after the kill (mean over hosts).
    pub kill_burst_bytes: Vec<f64>,
    pub loss: Option<LossRow>,
    pub heal: Option<HealRow>,
    pub false_during_trials: Counts,
    pub wall_secs: f64,
}

#[derive(Debug, Serialize, Default, Clone)]
pub struct LossRow {
    pub loss: f64,
    pub secs: f64,
    pub false_offline: u64,
    pub false_suspect: u64,
    /// Direct probes started, and those that failed (the suspicions the
    /// helpers then had to settle).
    pub probes: u64,
    pub probes_failed: u64,
    /// Helper rounds started (a failed direct probe that stood).
    pub helper_rounds: u64,
}

#[derive(Debug, Serialize, Default, Clone)]
pub struct HealRow {
    pub partition_secs: f64,
    /// From the heal until every host holds every other alive (ms), or None.
    pub converged_ms: Option<f64>,
    /// HOST_OFFLINE copies published during the cut (each side burying
    /// the other).
    pub offline_published: u64,
    /// Bytes per host from the cut until convergence (mean, max).
    pub bytes_mean: f64,
    pub bytes_max: f64,
}

fn idle(sim: &mut Sim, row: &mut Row, secs: u64) {
    let before = sim.traffic();
    // Versions made in all but the last 10 s are followed to the end.
    sim.record_window = Some((sim.now, sim.now + (secs.saturating_sub(10)) * 1_000_000));
    sim.run_until(sim.now + secs * 1_000_000);
    let after = sim.traffic();
    let n = sim.p.n as f64;
    let mut bps = Vec::new();
    let mut msgs = 0.0;
    for (b, a) in before.iter().zip(&after) {
        bps.push(((a.0 - b.0) + (a.1 - b.1)) as f64 / secs as f64);
        msgs += ((a.2 - b.2) + (a.3 - b.3)) as f64 / secs as f64;
    }
    row.idle_bps_mean = bps.iter().sum::<f64>() / n;
    row.idle_bps_max = bps.iter().copied().fold(0.0, f64::max);
    row.idle_msgs_mean = msgs / n;
    let degrees: Vec<usize> = sim.hosts.iter().map(|s| s.links.len()).collect();
    row.links_mean = degrees.iter().sum::<usize>() as f64 / n;
    row.links_max = degrees.into_iter().max().unwrap_or(0);
    if sim.p.topology == Topology::Bounded {
        let made = sim.records_followed as f64 * (n - 1.0);
        let mut d: Vec<f64> = sim
            .record_delays
            .iter()
            .map(|&x| x as f64 / 1000.0)
            .collect();
        d.sort_by(|a, b| a.total_cmp(b));
        row.record_reach = Some(d.len() as f64 / made.max(1.0));
        row.record_spread_p99_ms = Some(percentile(&d, 99.0));
    }
    row.record_refresh_s = match sim.p.topology {
        Topology::Full => HEALTH_EVERY as f64 / 1e6,
        Topology::Bounded => {
            (sim.p.n / sim.p.record_rate).max(1) as f64 * HEALTH_EVERY as f64 / 1e6
        }
    };
}

/// `count` trials of `mode`; each victim restarts before the next trial.
fn trials(sim: &mut Sim, row: &mut Row, count: usize, mode: Proc) {
    for _ in 0..count {
        let alive = sim.alive_hosts();
        let v = alive[sim.rng.gen_range(0..alive.len())];
        let inc = sim.hosts[v as usize].inc;
        let mut links: Vec<Host> = sim.hosts[v as usize].links.iter().copied().collect();
        links.sort();
        let before = sim.traffic();
        let start = sim.now;
        sim.crash(v, mode);
        let got = sim.wait_offline(v, inc, start, 30_000_000);
        let missing = got.iter().filter(|g| g.is_none()).count();
        // A host that never held it counts as the whole 30 s.
        let worst = got
            .iter()
            .map(|g| g.unwrap_or(30_000_000))
            .max()
            .unwrap_or(0) as f64
            / 1000.0;
        if mode == Proc::Crashed {
            row.kill_ms.push(worst);
            row.kill_missing += missing;
            // Bytes per surviving host beyond its idle rate, over the 5 s
            // after the kill (the verdict's copies included).
            sim.run_until((start + BURST_WINDOW).max(sim.now));
            let after = sim.traffic();
            let secs = (sim.now - start) as f64 / 1e6;
            let alive = sim.alive_hosts();
            let extra: f64 = alive
                .iter()
                .map(|&h| {
                    let (b, a) = (before[h as usize], after[h as usize]);
                    ((a.0 - b.0) + (a.1 - b.1)) as f64 - row.idle_bps_mean * secs
                })
                .sum::<f64>()
                / alive.len().max(1) as f64;
            row.kill_burst_bytes.push(extra.max(0.0));
        } else {
            row.cut_ms.push(worst);
            row.cut_missing += missing;
        }
        // Settle, then the victim comes back.
        sim.run_until(sim.now + 5_000_000);
        sim.restart(v, &links);
        sim.run_until(sim.now + 10_000_000);
    }
}

/// Two halves cut apart for `secs`, then healed: time until every host
/// holds every other alive.
fn partition(sim: &mut Sim, secs: u64) -> HealRow {
    let n = sim.p.n;
    let side: Vec<u8> = (0..n).map(|h| (h % 2) as u8).collect();
    // Every verdict from here on is expected: nobody counts as false.
    for h in 0..n {
        let inc = sim.hosts[h].inc;
        sim.signalled.insert((h as Host, inc));
    }
    // Who knows whom before: convergence is every host holding those alive
    // again (a bounded host need not know every other).
    let known: Vec<Vec<Host>> = (0..n)
        .map(|h| {
            let det = &sim.hosts[h].det;
            (0..n as Host)
                .filter(|&o| o as usize != h)
                .filter(|&o| {
                    det.member(&sim.ids[o as usize])
                        .is_some_and(|m| m.state == State::Alive)
                })
                .collect()
        })
        .collect();
    sim.side = Some(side);
    let before = sim.traffic();
    let buried_before = sim.offline_published;
    sim.run_until(sim.now + secs * 1_000_000);
    let offline_published = sim.offline_published - buried_before;
    // Connections stay open through the cut (libp2p ping failures do not
    // close them); TCP resumes each stream at its next retransmission.
    sim.heal();
    let healed = sim.now;
    let deadline = healed + 120_000_000;
    let converged_ms = loop {
        let all_alive = (0..n).all(|h| {
            let det = &sim.hosts[h].det;
            known[h].iter().all(|&o| {
                det.member(&sim.ids[o as usize])
                    .is_some_and(|m| m.state == State::Alive)
            })
        });
        if all_alive {
            break Some((sim.now - healed) as f64 / 1000.0);
        }
        if sim.now >= deadline {
            break None;
        }
        sim.run_until(sim.now + 250_000);
    };
    let after = sim.traffic();
    let bytes: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| ((a.0 - b.0) + (a.1 - b.1)) as f64)
        .collect();
    HealRow {
        partition_secs: secs as f64,
        converged_ms,
        offline_published,
        bytes_mean: bytes.iter().sum::<f64>() / n as f64,
        bytes_max: bytes.iter().copied().fold(0.0, f64::max),
    }
}

pub struct Plan {
    pub sizes: Vec<usize>,
    pub topologies: Vec<Topology>,
    pub full_max: usize,
    pub loss_secs: u64,
    pub loss_max: usize,
    pub loss: f64,
    pub kills: usize,
    pub heal_max: usize,
    pub seed: u64,
    /// `bounded` with the agent's helper choice today (random members
    /// linked to the prober) instead of the suspect's ring neighbours.
    pub linked_helpers: bool,
}

pub fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn params(plan: &Plan, n: usize, topology: Topology, loss: f64, seed: u64) -> Params {
    Params {
        n,
        topology,
        ring: 4,
        random: 4,
        mesh: 6,
        fanout: env("RIFTMESH_SIM_FANOUT", 3),
        lat: (2_000, 40_000),
        loss,
        seed,
        record_rate: env("RIFTMESH_SIM_RECORD_RATE", RECORD_VERSIONS_PER_INTERVAL).max(1),
        publish_jitter: env("RIFTMESH_SIM_PUBLISH_JITTER_MS", 0u64) * 1000,
        // The bounded design asks the suspect's ring neighbours (they hold
        // a link to it).
        helpers_near: topology == Topology::Bounded && !plan.linked_helpers,
    }
}

pub fn run_one(plan: &Plan, n: usize, topology: Topology) -> Row {
    let wall = Instant::now();
    let mut row = Row {
        topology: Some(topology),
        n,
        ..Row::default()
    };
    let mut sim = Sim::new(params(plan, n, topology, 0.0, plan.seed));
    sim.run_until(WARMUP);
    idle(&mut sim, &mut row, 60);
    sim.reset_counts();
    trials(&mut sim, &mut row, plan.kills, Proc::Crashed);
    trials(&mut sim, &mut row, plan.kills.div_ceil(2), Proc::Cut);
    row.false_during_trials = sim.false_facts.clone();
    eprintln!(
        "  idle and trials: {} events, {:.1} s",
        sim.handled,
        wall.elapsed().as_secs_f64()
    );
    if plan.loss_secs > 0 && n <= plan.loss_max {
        let t = Instant::now();
        let mut sim = Sim::new(params(plan, n, topology, plan.loss, plan.seed + 1));
        sim.run_until(WARMUP);
        sim.reset_counts();
        sim.run_until(sim.now + plan.loss_secs * 1_000_000);
        eprintln!(
            "  loss: {} events, {:.1} s",
            sim.handled,
            t.elapsed().as_secs_f64()
        );
        row.loss = Some(LossRow {
            loss: plan.loss,
            secs: plan.loss_secs as f64,
            false_offline: sim.false_facts.offline_facts,
            false_suspect: sim.false_facts.suspect_facts,
            probes: sim.probes,
            probes_failed: sim.probes_failed,
            helper_rounds: sim.helper_rounds,
        });
    }
    if n <= plan.heal_max {
        let t = Instant::now();
        let mut sim = Sim::new(params(plan, n, topology, 0.0, plan.seed + 2));
        sim.run_until(WARMUP);
        row.heal = Some(partition(&mut sim, 30));
        eprintln!(
            "  partition: {} events, {:.1} s",
            sim.handled,
            t.elapsed().as_secs_f64()
        );
    }
    row.wall_secs = wall.elapsed().as_secs_f64();
    row
}
