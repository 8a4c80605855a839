//! Reachability and NAT traversal (proto-notes/nat.md): whether peers can
//! dial us (AutoNAT v2), relay reservations while they can't, the relay
//! server while they can, and how each peer is reached (direct,
//! hole-punched by DCUtR, relayed).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::ConnectionId;
use libp2p::{autonat, dcutr, relay, Multiaddr, PeerId};
use serde::Serialize;

use super::{peer_of, EventLoop};
use crate::metrics::label;
use crate::net::ReachInfo;

/// Relays a host that peers can't dial keeps a reservation with.
pub(super) const RELAYS_WANTED: usize = 2;

/// Hole punching is tried again this many times for a peer still reached
/// only through a relay (DCUtR itself gives up after 3 dials in a row and
/// does not come back): a new relayed connection, whose accepting end starts
/// DCUtR again; the first after [`PUNCH_RETRY_FIRST`], each next after
/// twice as long, each up to half again at random.
pub(super) const PUNCH_RETRIES: u8 = 3;
pub(super) const PUNCH_RETRY_FIRST: Duration = Duration::from_secs(10);

/// A relay whose reservation was refused or ended is not asked again for
/// this long, doubling up to [`RELAY_BACKOFF_MAX`] while it keeps failing
/// (a relay at its limits, or one that just turned private).
pub(super) const RELAY_BACKOFF_FIRST: Duration = Duration::from_secs(30);
pub(super) const RELAY_BACKOFF_MAX: Duration = Duration::from_secs(600);

/// How a connection reaches its peer, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// Dialled or accepted on the peer's own address.
    Direct,
    /// Direct, made by DCUtR's simultaneous open through both NATs.
    HolePunched,
    /// Through a third agent's relay (circuit relay v2).
    Relayed,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::HolePunched => "hole-punched",
            Via::Relayed => "relayed",
        }
    }
}

/// Whether peers can dial us. A peer that sees our connection come from
/// an address that is not one of our own (identify's observed address)
/// sees us through a NAT: then we are private unless AutoNAT confirms one
/// such mapped address (a port forward, a cloud's 1:1 NAT). Without a NAT
/// in the way, we are public once AutoNAT confirms an address. A peer on
/// our own LAN dials us back at our own address even when we are behind a
/// NAT for everyone else, so that confirmation alone never outweighs a
/// mapped address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Nothing tested yet (or the last confirmed address expired).
    Unknown,
    /// A peer dialled one of our addresses back, and no NAT hides us from
    /// others.
    Public,
    /// A peer sees us through a NAT and no mapped address is confirmed; or
    /// a peer failed to dial our own address back and none is confirmed.
    Private,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Public => "public",
            State::Private => "private",
        }
    }
}

struct Reservation {
    listener: ListenerId,
    accepted: bool,
}

pub(super) struct Reach {
    state: State,
    /// Confirmed external addresses that are not relay circuits.
    external: HashSet<Multiaddr>,
    /// A peer saw a connection of ours come from an address that is not
    /// one of our own: a NAT is between us.
    mapped_seen: bool,
    relays: HashMap<PeerId, Reservation>,
    /// Relays not to ask before a time, and the wait after their next
    /// failure.
    relay_backoff: HashMap<PeerId, (Instant, Duration)>,
    /// Since when the state is unknown, and when we last dialled a peer
    /// only to have an AutoNAT server (see [`EventLoop::seek_autonat_server`]).
    unknown_since: Instant,
    server_dial: Option<Instant>,
    /// Peers dialled for that already, so the next try asks another.
    server_tried: HashSet<PeerId>,
}

/// Unknown this long with no connection we dialled (AutoNAT asks only
/// peers we dialled): dial one, at most once per this long.
pub(super) const SEEK_SERVER_AFTER: Duration = Duration::from_secs(20);

impl Reach {
    pub(super) fn new() -> Self {
        Reach {
            state: State::Unknown,
            external: HashSet::new(),
            mapped_seen: false,
            relays: HashMap::new(),
            relay_backoff: HashMap::new(),
            unknown_since: Instant::now(),
            server_dial: None,
            server_tried: HashSet::new(),
        }
    }

    /// Whether we hold (or asked for) a reservation on `peer`.
    pub(super) fn is_relay(&self, peer: &PeerId) -> bool {
        self.relays.contains_key(peer)
    }

    /// Relays that accepted our reservation.
    fn accepted(&self) -> impl Iterator<Item = &PeerId> {
        self.relays
            .iter()
            .filter(|(_, r)| r.accepted)
            .map(|(p, _)| p)
    }

    pub(super) fn info(&self) -> ReachInfo {
        let mut relays: Vec<String> = self.accepted().map(|p| p.to_base58()).collect();
        relays.sort();
        let mut external: Vec<String> = self.external.iter().map(|a| a.to_string()).collect();
        external.sort();
        ReachInfo {
            state: self.state.as_str(),
            relays,
            external,
        }
    }
}

/// How a new connection reaches its peer: a circuit we dialled has the
/// relay in its remote address, one we accepted in its local address (its
/// remote address is only the peer's id); a hole-punched one is known only
/// later, from DCUtR's event.
pub(super) fn via_of(endpoint: &ConnectedPoint) -> Via {
    if endpoint.is_relayed() {
        Via::Relayed
    } else {
        Via::Direct
    }
}

/// Whether `addr` goes through a relay.
pub(super) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The relay a `/p2p-circuit` address goes through (the peer id before
/// `p2p-circuit`), or none for a direct address.
pub(super) fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => last = Some(id),
            Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

/// `addr` (the relay's own address, with or without its `/p2p/<id>`) as
/// the address to listen on through it.
fn circuit_through(addr: &Multiaddr, relay: PeerId) -> Multiaddr {
    let mut base: Multiaddr = addr
        .iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect();
    base.push(Protocol::P2p(relay));
    base.push(Protocol::P2pCircuit);
    base
}

/// What AutoNAT found so far.
#[derive(Clone, Copy, Debug)]
struct Findings {
    /// A peer sees us through a NAT.
    mapped_seen: bool,
    /// A peer dialled us back at an address a NAT maps to us (a port
    /// forward).
    mapped_confirmed: bool,
    /// A peer dialled us back at some address.
    any_confirmed: bool,
    was: State,
}

/// The reachability [`Findings`] make (the rule is in [`State`]'s text).
fn decide(f: Findings) -> State {
    if f.mapped_seen && !f.mapped_confirmed {
        State::Private
    } else if f.any_confirmed {
        State::Public
    } else if f.was == State::Private {
        // Our own address failed and nothing is confirmed.
        State::Private
    } else {
        State::Unknown
    }
}

/// An order of relays particular to this agent: a hash of both ids.
fn spread(me: &PeerId, relay: &PeerId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    me.hash(&mut h);
    relay.hash(&mut h);
    h.finish()
}

/// The IP address in `addr`.
fn ip_in(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

impl EventLoop {
    /// Whether `addr` is one a NAT maps to us: its IP is none of the
    /// addresses we listen on.
    fn is_mapped(&self, addr: &Multiaddr) -> bool {
        let Some(ip) = ip_in(addr) else {
            return false;
        };
        !self
            .local_addrs
            .iter()
            .chain(self.swarm.listeners())
            .any(|a| !is_relayed(a) && ip_in(a) == Some(ip))
    }

    /// The state the findings so far make.
    fn reach_now(&self) -> State {
        decide(Findings {
            mapped_seen: self.reach.mapped_seen,
            mapped_confirmed: self.reach.external.iter().any(|a| self.is_mapped(a)),
            any_confirmed: !self.reach.external.is_empty(),
            was: self.reach.state,
        })
    }

    pub(super) fn on_external_confirmed(&mut self, addr: Multiaddr) {
        if is_relayed(&addr) {
            return;
        }
        if self.reach.external.insert(addr.clone()) {
            // At debug: the state change below says it once per start
            // (the quiet round counts every info line).
            tracing::debug!(%addr, "a peer dialled this agent back at this address (AutoNAT)");
        }
        self.set_reach(self.reach_now());
    }

    pub(super) fn on_external_expired(&mut self, addr: &Multiaddr) {
        if self.reach.external.remove(addr) {
            self.set_reach(self.reach_now());
        }
    }

    /// A peer told us (identify) the address it sees our connection come
    /// from; over a relay that says nothing about NAT.
    pub(super) fn on_observed(&mut self, peer: PeerId, conn: ConnectionId, observed: &Multiaddr) {
        let relayed = self
            .peers
            .get(&peer)
            .and_then(|p| p.conns.get(&conn))
            .is_none_or(|c| c.via == Via::Relayed);
        if relayed || is_relayed(observed) || !self.is_mapped(observed) {
            return;
        }
        if !self.reach.mapped_seen {
            tracing::info!(%peer, %observed, "a peer sees this agent at an address that is not its own: a NAT is in the way");
            self.reach.mapped_seen = true;
        }
        self.set_reach(self.reach_now());
    }

    pub(super) fn on_autonat(&mut self, ev: autonat::v2::client::Event) {
        match ev.result {
            Ok(()) => {
                tracing::debug!(addr = %ev.tested_addr, server = %ev.server, "AutoNAT: dialled back")
            }
            Err(e) => {
                tracing::debug!(addr = %ev.tested_addr, server = %ev.server, error = %e, "AutoNAT: not dialled back");
                // Only a failure at our own address says something the
                // observed addresses don't (a peer that cannot reach our
                // network at all); a candidate without an IP (a relayed
                // connection's) says nothing.
                let own = ip_in(&ev.tested_addr).is_some()
                    && !is_relayed(&ev.tested_addr)
                    && !self.is_mapped(&ev.tested_addr);
                if own && self.reach.external.is_empty() {
                    self.set_reach(State::Private);
                }
            }
        }
    }

    /// The reachability gauges, set at each maintenance tick.
    pub(super) fn reach_metrics(&self) {
        let m = &self.metrics;
        for st in [State::Public, State::Private, State::Unknown] {
            m.reachability
                .get_or_create(&label("state", st.as_str()))
                .set(i64::from(st == self.reach.state));
        }
        m.relay_reservations
            .set(self.reach.accepted().count() as i64);
        for via in [Via::Direct, Via::HolePunched, Via::Relayed] {
            let n = self.peers.values().filter(|p| p.via() == via).count();
            m.peers_by_via
                .get_or_create(&label("via", via.as_str()))
                .set(n as i64);
        }
    }

    fn set_reach(&mut self, state: State) {
        if self.reach.state == state {
            return;
        }
        tracing::info!(
            from = self.reach.state.as_str(),
            to = state.as_str(),
            external = ?self.reach.external.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "reachability changed"
        );
        self.reach.state = state;
        if state == State::Unknown {
            self.reach.unknown_since = Instant::now();
        }
        // Serve as a relay exactly while peers can dial us.
        self.swarm
            .behaviour_mut()
            .relay
            .set_status(Some(if state == State::Public {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
        if state == State::Public {
            for (_, r) in self.reach.relays.drain() {
                self.swarm.remove_listener(r.listener);
            }
        } else if state == State::Private {
            self.keep_relays();
        }
    }

    /// While peers can't dial us, keep [`RELAYS_WANTED`] reservations with
    /// connected peers that serve as relays and that we reach directly.
    /// Called when that changes and at each maintenance tick.
    pub(super) fn keep_relays(&mut self) {
        if self.reach.state != State::Private || self.reach.relays.len() >= RELAYS_WANTED {
            return;
        }
        let now = Instant::now();
        let me = *self.swarm.local_peer_id();
        // In an order of our own (a hash of both ids), so that the fleet's
        // private agents spread over the relays (bootstrap peers first
        // would put every one of them on the same two).
        let mut candidates: Vec<(u64, PeerId, Multiaddr)> = self
            .peers
            .iter()
            .filter(|(id, p)| p.relay && !self.reach.relays.contains_key(id))
            .filter(|(id, _)| {
                self.reach
                    .relay_backoff
                    .get(id)
                    .is_none_or(|(t, _)| *t <= now)
            })
            .filter_map(|(id, p)| p.dialled().map(|a| (spread(&me, id), *id, a.clone())))
            .collect();
        candidates.sort();
        for (_, peer, addr) in candidates {
            if self.reach.relays.len() >= RELAYS_WANTED {
                break;
            }
            let circuit = circuit_through(&addr, peer);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    tracing::debug!(relay = %peer, addr = %circuit, "asking for a relay reservation");
                    self.reach.relays.insert(
                        peer,
                        Reservation {
                            listener,
                            accepted: false,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(relay = %peer, addr = %circuit, error = %e, "cannot listen through relay")
                }
            }
        }
    }

    /// Don't ask `relay` again for a while (longer each time in a row).
    fn back_off(&mut self, relay: PeerId) {
        let wait = self
            .reach
            .relay_backoff
            .get(&relay)
            .map_or(RELAY_BACKOFF_FIRST, |(_, w)| *w);
        self.reach.relay_backoff.insert(
            relay,
            (Instant::now() + wait, (wait * 2).min(RELAY_BACKOFF_MAX)),
        );
    }

    /// A listener closed: if it was a relay reservation, that relay is
    /// left alone for a while ([`RELAY_BACKOFF_FIRST`]) and another is
    /// sought at the next maintenance tick, never at once (a relay that
    /// refuses would otherwise be asked again at round-trip speed).
    pub(super) fn on_listener_closed(&mut self, id: ListenerId) {
        let gone = self
            .reach
            .relays
            .iter()
            .find(|(_, r)| r.listener == id)
            .map(|(p, _)| *p);
        if let Some(p) = gone {
            let accepted = self.reach.relays.remove(&p).is_some_and(|r| r.accepted);
            self.back_off(p);
            tracing::info!(relay = %p, accepted, "relay reservation ended");
        }
    }

    /// The last connection to `peer` closed: its reservation went with it.
    pub(super) fn drop_relay(&mut self, peer: &PeerId) {
        if let Some(r) = self.reach.relays.remove(peer) {
            self.swarm.remove_listener(r.listener);
            tracing::info!(relay = %peer, "relay gone; reservation dropped");
        }
    }

    pub(super) fn on_relay_client(&mut self, ev: relay::client::Event) {
        match ev {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            } => {
                if let Some(r) = self.reach.relays.get_mut(&relay_peer_id) {
                    r.accepted = true;
                    self.reach.relay_backoff.remove(&relay_peer_id);
                }
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted: peers can reach this agent through it");
                }
            }
            relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                tracing::debug!(relay = %relay_peer_id, "circuit out through relay")
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                tracing::debug!(peer = %src_peer_id, "circuit in through relay")
            }
        }
    }

    pub(super) fn on_dcutr(&mut self, ev: dcutr::Event) {
        let peer = ev.remote_peer_id;
        match ev.result {
            Ok(conn) => {
                tracing::info!(%peer, "hole punched: direct connection through both NATs");
                // The swarm hands out a connection's `ConnectionEstablished`
                // before any behaviour event that follows it, so the
                // connection is known here (or already closed).
                if let Some(c) = self
                    .peers
                    .get_mut(&peer)
                    .and_then(|p| p.conns.get_mut(&conn))
                {
                    c.via = Via::HolePunched;
                }
                self.drop_relayed_if_direct(peer);
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "hole punching failed; the relayed connection stays");
                if let Some(p) = self.peers.get_mut(&peer) {
                    if p.via() == Via::Relayed
                        && p.punch_tries < PUNCH_RETRIES
                        && p.punch_at.is_none()
                    {
                        // Up to half again at random: peers that failed
                        // together (two behind one NAT) retry apart.
                        let wait = PUNCH_RETRY_FIRST * (1u32 << p.punch_tries);
                        let jitter = wait.mul_f64(rand::random::<f64>() / 2.0);
                        p.punch_at = Some(Instant::now() + wait + jitter);
                    }
                }
            }
        }
    }

    /// AutoNAT asks only peers we dialled, and a public agent that
    /// restarted may hold only connections its peers dialled (they redial
    /// it): then it would stay unknown and never relay. After
    /// [`SEEK_SERVER_AFTER`] so, dial a connected peer directly once more.
    pub(super) fn seek_autonat_server(&mut self, now: Instant) {
        if self.reach.state != State::Unknown
            || now.duration_since(self.reach.unknown_since) < SEEK_SERVER_AFTER
            || self
                .reach
                .server_dial
                .is_some_and(|t| now.duration_since(t) < SEEK_SERVER_AFTER)
            || self.peers.values().any(|p| p.dialled().is_some())
        {
            return;
        }
        // Connected bootstrap peers at their configured addresses first
        // (reachable by design), then other peers at their listen
        // addresses, each asked once in turn.
        let boot = self.bootstrap.iter().filter_map(|a| {
            peer_of(a)
                .filter(|p| self.peers.contains_key(p))
                .map(|p| (p, vec![a.clone()]))
        });
        let others = self.peers.iter().filter_map(|(id, p)| {
            let addrs: Vec<Multiaddr> = p
                .listen_addrs
                .iter()
                .filter(|a| !is_relayed(a) && ip_in(a).is_some_and(|ip| !ip.is_unspecified()))
                .cloned()
                .collect();
            (!addrs.is_empty()).then_some((*id, addrs))
        });
        let mut target = boot
            .chain(others)
            .find(|(p, _)| !self.reach.server_tried.contains(p));
        if target.is_none() {
            self.reach.server_tried.clear();
        }
        if let Some((peer, addrs)) = target.take() {
            self.reach.server_tried.insert(peer);
            self.reach.server_dial = Some(now);
            tracing::debug!(%peer, "reachability unknown and no connection dialled: dialling a peer to ask AutoNAT");
            self.dial_another(peer, addrs);
        }
    }

    /// Peers whose hole punching failed and whose retry is due: a new
    /// connection through one of their relays, so that DCUtR runs again.
    pub(super) fn punch_again(&mut self, now: Instant) {
        let due: Vec<PeerId> = self
            .peers
            .iter_mut()
            .filter(|(_, p)| p.punch_at.is_some_and(|t| t <= now))
            .map(|(id, p)| {
                p.punch_at = None;
                *id
            })
            .collect();
        for peer in due {
            let Some(p) = self.peers.get(&peer) else {
                continue;
            };
            let addrs: Vec<Multiaddr> = p
                .listen_addrs
                .iter()
                .filter(|a| is_relayed(a))
                .cloned()
                .collect();
            if addrs.is_empty() || p.via() != Via::Relayed {
                continue;
            }
            let old = p.relayed();
            tracing::debug!(%peer, "hole punching again: a new connection through its relay");
            if let Some(new) = self.dial_another(peer, addrs) {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.punch_tries += 1;
                    // The new circuit replaces these once it is up.
                    p.retire = Some((new, old));
                }
            }
        }
    }

    /// A new connection to `peer` is up: if it is a hole-punch retry's
    /// circuit, the relayed connections it replaces are closed (only by the
    /// side that retried; the new one carries the next punch).
    pub(super) fn retire_replaced(&mut self, peer: PeerId, new: ConnectionId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some((_, old)) = p.retire.take_if(|(id, _)| *id == new) else {
            return;
        };
        for id in old {
            if p.conns.contains_key(&id) {
                self.swarm.close_connection(id);
            }
        }
    }

    /// Once a peer is reached directly (or hole-punched), its relayed
    /// connections only cost the relay: close them.
    pub(super) fn drop_relayed_if_direct(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.via() == Via::Relayed {
            return;
        }
        p.punch_at = None;
        for id in p.relayed() {
            self.swarm.close_connection(id);
        }
    }

    /// Dial `peer` at `addrs` even though we are connected to it (a new
    /// circuit for a punch, a connection for AutoNAT): the new
    /// connection's id, if the dial started.
    fn dial_another(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) -> Option<ConnectionId> {
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::Always)
            .build();
        let id = opts.connection_id();
        self.swarm.dial(opts).ok().map(|_| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(mapped_seen: bool, mapped_confirmed: bool, any_confirmed: bool) -> State {
        decide(Findings {
            mapped_seen,
            mapped_confirmed,
            any_confirmed,
            was: State::Unknown,
        })
    }

    #[test]
    fn a_neighbour_behind_the_same_nat_does_not_make_us_public() {
        // Our own LAN address dialled back by a neighbour while a peer
        // outside sees us at an address the NAT maps to us: private.
        assert_eq!(found(true, false, true), State::Private);
        // A port forward (or a cloud's 1:1 NAT): the mapped address dialled
        // back.
        assert_eq!(found(true, true, true), State::Public);
        // A flat network: our own address confirmed, nothing mapped.
        assert_eq!(found(false, false, true), State::Public);
        assert_eq!(found(false, false, false), State::Unknown);
        // Our own address failed, nothing confirmed: stays private.
        let f = Findings {
            mapped_seen: false,
            mapped_confirmed: false,
            any_confirmed: false,
            was: State::Private,
        };
        assert_eq!(decide(f), State::Private);
        // The last confirmed address expired: no longer public.
        let f = Findings {
            was: State::Public,
            ..f
        };
        assert_eq!(decide(f), State::Unknown);
    }

    #[test]
    fn an_accepted_circuit_is_relayed_though_its_remote_address_is_a_peer_id() {
        let peer = PeerId::random();
        let relay = PeerId::random();
        let relay_addr: Multiaddr = "/ip4/10.0.0.5/tcp/4001".parse().unwrap();
        let circuit = circuit_through(&relay_addr, relay);
        assert_eq!(
            circuit.to_string(),
            format!("/ip4/10.0.0.5/tcp/4001/p2p/{relay}/p2p-circuit")
        );
        // With the relay's id already on its address: not doubled.
        let with_id = relay_addr.clone().with(Protocol::P2p(relay));
        assert_eq!(circuit_through(&with_id, relay), circuit);

        // The relay a circuit address goes through; none for a direct one.
        assert_eq!(
            relay_of(&circuit.clone().with(Protocol::P2p(peer))),
            Some(relay)
        );
        assert_eq!(
            relay_of(&relay_addr.clone().with(Protocol::P2p(relay))),
            None
        );
        let accepted = ConnectedPoint::Listener {
            local_addr: circuit.clone(),
            send_back_addr: Multiaddr::empty().with(Protocol::P2p(peer)),
        };
        assert_eq!(via_of(&accepted), Via::Relayed);
        let dialled = ConnectedPoint::Dialer {
            address: circuit.with(Protocol::P2p(peer)),
            role_override: libp2p::core::Endpoint::Dialer,
            port_use: libp2p::core::transport::PortUse::Reuse,
        };
        assert_eq!(via_of(&dialled), Via::Relayed);
        let direct = ConnectedPoint::Dialer {
            address: relay_addr,
            role_override: libp2p::core::Endpoint::Dialer,
            port_use: libp2p::core::transport::PortUse::Reuse,
        };
        assert_eq!(via_of(&direct), Via::Direct);
        // The best connection names the peer's way.
        assert!(Via::Direct < Via::HolePunched && Via::HolePunched < Via::Relayed);
    }
}
