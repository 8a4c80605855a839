//! Which connections the agent holds. Membership names its links
//! ([`NetHandle::try_set_links`](crate::net::NetHandle::try_set_links)): every
//! member while the cluster is small (the loop then dials every peer it
//! hears of, as it always did), or a bounded set above `full_mesh_max`
//! members. With a bounded set the loop dials the links it is not
//! connected to (from its address book, or after a DHT lookup of a peer it
//! has no address for), dials nothing else by itself (peers heard of by the
//! DHT or mDNS, lost peers, bootstrap peers while it holds a link), and
//! closes the connections it dialled to other peers once they have carried
//! no request either way for `NetConfig::link_idle` (a blob transfer, a
//! catch-up fetch, a helper's probe, Raft: connections opened on demand;
//! the periodic catch-up summaries do not count). A connection the peer
//! dialled is the peer's to close; when both dialled, each closes its own.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};

use super::EventLoop;

/// Least time between two DHT lookups of the same peer.
const LOOKUP_GAP: Duration = Duration::from_secs(10);
/// Addresses kept per peer (the newest).
const MAX_ADDRS: usize = 8;
/// Addresses of a peer not connected are forgotten after this long.
const BOOK_FORGET: Duration = Duration::from_secs(3600);

/// The link set and what the loop needs to keep it.
pub(super) struct LinkSet {
    /// How long a connection that is not a link may stay idle.
    idle: Duration,
    /// While links are not bounded, peers heard of are dialled only while
    /// fewer than this many are connected: membership bounds the links
    /// above it, and 100 agents starting at once would otherwise all dial
    /// each other first.
    full_mesh_max: usize,
    /// `None`: every peer is a link.
    bounded: Option<HashSet<PeerId>>,
    /// Last request sent or received per peer.
    used: HashMap<PeerId, Instant>,
    /// Known listen addresses per peer (identify, DHT, mDNS), and when
    /// last confirmed.
    book: HashMap<PeerId, (Vec<Multiaddr>, Instant)>,
    /// DHT lookups started, per peer.
    looked_up: HashMap<PeerId, Instant>,
}

impl LinkSet {
    pub(super) fn new(idle: Duration, full_mesh_max: usize) -> Self {
        LinkSet {
            idle,
            full_mesh_max,
            bounded: None,
            used: HashMap::new(),
            book: HashMap::new(),
            looked_up: HashMap::new(),
        }
    }

    /// Whether `peer` is a link (every peer while links are not bounded).
    pub(super) fn wants(&self, peer: &PeerId) -> bool {
        self.bounded.as_ref().is_none_or(|b| b.contains(peer))
    }

    /// Whether to dial `peer`, heard of (DHT, mDNS), with `connected`
    /// peers connected.
    pub(super) fn dial_heard_of(&self, peer: &PeerId, connected: usize) -> bool {
        match &self.bounded {
            Some(b) => b.contains(peer),
            None => connected < self.full_mesh_max,
        }
    }

    pub(super) fn is_bounded(&self) -> bool {
        self.bounded.is_some()
    }

    /// A request to or from `peer`.
    pub(super) fn used(&mut self, peer: PeerId) {
        self.used.insert(peer, Instant::now());
    }

    /// Addresses `peer` listens on (replacing those known).
    pub(super) fn learn(&mut self, peer: PeerId, mut addrs: Vec<Multiaddr>) {
        addrs.truncate(MAX_ADDRS);
        if !addrs.is_empty() {
            self.book.insert(peer, (addrs, Instant::now()));
        }
    }

    /// One more address of `peer`.
    pub(super) fn learn_one(&mut self, peer: PeerId, addr: Multiaddr) {
        let e = self
            .book
            .entry(peer)
            .or_insert_with(|| (Vec::new(), Instant::now()));
        if !e.0.contains(&addr) {
            if e.0.len() >= MAX_ADDRS {
                e.0.remove(0);
            }
            e.0.push(addr);
        }
        e.1 = Instant::now();
    }

    /// The known addresses of `peer`.
    pub(super) fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.book
            .get(peer)
            .map(|(a, _)| a.clone())
            .unwrap_or_default()
    }
}

impl EventLoop {
    /// Membership's link set: `None` every peer, else these; and peers to
    /// dial now.
    pub(super) fn set_links(&mut self, links: Option<Vec<PeerId>>, dial: Vec<PeerId>) {
        self.links.bounded = links.map(|l| l.into_iter().collect());
        for peer in dial {
            if !self.peers.contains_key(&peer) && peer != *self.swarm.local_peer_id() {
                self.dial_peer(peer);
            }
        }
        self.keep_links(Instant::now());
    }

    /// Dial `peer` at the book's addresses and those the behaviours know
    /// (the DHT, identify), unless connected or being dialled.
    pub(super) fn dial_peer(&mut self, peer: PeerId) {
        let opts = DialOpts::peer_id(peer)
            .addresses(self.links.addrs(&peer))
            .extend_addresses_through_behaviour()
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        let _ = self.swarm.dial(opts);
    }

    /// Every address of `peer` failed: forget them, so that the next try
    /// looks it up in the DHT (a host that came back elsewhere).
    pub(super) fn dial_failed(&mut self, peer: PeerId) {
        if self.links.is_bounded() {
            self.links.book.remove(&peer);
        }
    }

    /// Dial the links not connected, close the connections no longer
    /// needed; at each maintenance tick and when the set changes.
    pub(super) fn keep_links(&mut self, now: Instant) {
        let me = *self.swarm.local_peer_id();
        let connected: HashSet<PeerId> = self.peers.keys().copied().collect();
        self.links
            .book
            .retain(|p, (_, at)| connected.contains(p) || now.duration_since(*at) < BOOK_FORGET);
        self.links
            .looked_up
            .retain(|_, at| now.duration_since(*at) < LOOKUP_GAP);
        let idle = self.links.idle;
        self.links
            .used
            .retain(|p, at| connected.contains(p) && now.duration_since(*at) < idle);
        let Some(want) = self.links.bounded.clone() else {
            return;
        };
        for peer in want.iter().filter(|p| !connected.contains(p) && **p != me) {
            if self.links.addrs(peer).is_empty() {
                self.look_up(*peer, now);
                continue;
            }
            self.dial_peer(*peer);
        }
        // Close only once some links are up: a new agent holds on to its
        // bootstrap peer until then.
        let linked = want.iter().filter(|p| connected.contains(p)).count();
        if linked < want.len().min(2) {
            return;
        }
        // `used` holds only uses younger than `idle` (pruned above).
        let unused = |p: &PeerId| !self.links.used.contains_key(p);
        let close: Vec<(PeerId, Vec<libp2p::swarm::ConnectionId>)> = self
            .peers
            .iter()
            .filter(|(p, st)| {
                !want.contains(p)
                    && !self.reach.is_relay(p)
                    && now.duration_since(st.since) >= idle
                    && unused(p)
            })
            .map(|(p, st)| {
                let ours = st
                    .conns
                    .iter()
                    .filter(|(_, c)| c.dialled)
                    .map(|(id, _)| *id)
                    .collect();
                (*p, ours)
            })
            .filter(|(_, ours): &(PeerId, Vec<_>)| !ours.is_empty())
            .collect();
        for (p, ours) in close {
            tracing::debug!(peer = %p, "closing a connection that is not a link");
            for id in ours {
                self.swarm.close_connection(id);
            }
        }
    }

    /// A DHT lookup of `peer`, unless one started in the last
    /// `LOOKUP_GAP`.
    pub(super) fn look_up(&mut self, peer: PeerId, now: Instant) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.links.looked_up.entry(peer) {
            e.insert(now);
            self.swarm.behaviour_mut().kad.get_closest_peers(peer);
        }
    }

    /// The DHT learned of `peer`: its addresses, and a dial when it is a
    /// link (every peer while links are not bounded: connect to every
    /// member we hear of).
    pub(super) fn on_routing_updated(&mut self, peer: PeerId, addresses: Vec<Multiaddr>) {
        for a in &addresses {
            self.links.learn_one(peer, a.clone());
        }
        if !self.peers.contains_key(&peer)
            && peer != *self.swarm.local_peer_id()
            && self.links.dial_heard_of(&peer, self.peers.len())
        {
            self.dial_peer(peer);
        }
    }

    /// A DHT lookup answered: the addresses of the peers it found, and
    /// a dial of those that are links.
    pub(super) fn on_lookup(&mut self, peers: Vec<libp2p::kad::PeerInfo>) {
        for p in peers {
            if p.addrs.is_empty() {
                continue;
            }
            let addrs: Vec<Multiaddr> = p.addrs.into_iter().filter(super::is_dialable).collect();
            self.links.learn(p.peer_id, addrs);
            if self.links.is_bounded()
                && self.links.wants(&p.peer_id)
                && !self.peers.contains_key(&p.peer_id)
            {
                self.dial_peer(p.peer_id);
            }
        }
    }
}
