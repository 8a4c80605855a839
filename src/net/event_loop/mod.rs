//! The task that owns the Swarm: one loop over swarm events, commands from
//! [`NetHandle`](super::NetHandle)s and a maintenance tick. This file keeps the
//! loop, the commands, connections and redialing; [`gossip`] validates gossip
//! events, [`requests`] carries the request-response protocols,
//! [`refusals`] counts and logs what the limits refuse, and [`reach`] keeps
//! track of NAT traversal (AutoNAT, relays, hole punching).

mod gossip;
mod links;
mod reach;
mod refusals;
mod requests;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, mdns, request_response, Multiaddr, PeerId, Swarm};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent};
use super::handle::{Command, Opaque, OpaqueReply};
use super::{
    wire, BlobInbound, Inbound, Inbox, MemberInbound, NetConfig, PeerInfo, RaftInbound,
    RequestError, EVENTS_TOPIC,
};
use crate::limits::{KeyedRate, LogOnce};
use crate::metrics::{label, Metrics};
use links::LinkSet;
use reach::{Reach, Via};
use refusals::error_chain;
use requests::PeerRates;

pub(super) struct EventLoop {
    swarm: Swarm<Behaviour>,
    topic: IdentTopic,
    cmd_rx: mpsc::Receiver<Command>,
    in_tx: mpsc::Sender<Inbound>,
    member_tx: mpsc::Sender<MemberInbound>,
    member_pending: HashMap<
        request_response::OutboundRequestId,
        oneshot::Sender<Result<wire::MemberResponse, RequestError>>,
    >,
    raft_tx: mpsc::Sender<RaftInbound>,
    blob_tx: mpsc::Sender<BlobInbound>,
    opaque_pending: HashMap<(Opaque, request_response::OutboundRequestId), OpaqueReply>,
    /// Addresses we listen on, interfaces expanded.
    local_addrs: Vec<Multiaddr>,
    metrics: Metrics,
    p2p_metrics: libp2p::metrics::Metrics,
    peers: HashMap<PeerId, PeerState>,
    bootstrap: Vec<Multiaddr>,
    maintain_every: Duration,
    max_msg: usize,
    catchup_pending: HashMap<
        request_response::OutboundRequestId,
        oneshot::Sender<Result<wire::CatchupResponse, String>>,
    >,
    last_bootstrap: Option<Instant>,
    /// Peers whose last connection closed: their addresses and since when.
    lost: HashMap<PeerId, (Vec<Multiaddr>, Instant)>,
    ticks: u64,
    /// Inbound requests per peer, per request-response protocol.
    rates: PeerRates,
    /// Gossip events per signing source.
    gossip_rate: KeyedRate<String>,
    /// First refusal per (peer, reason) warns; later ones are summarised.
    log_once: LogOnce,
    /// NAT traversal: our reachability, relay reservations.
    reach: Reach,
    /// Which peers to hold a connection to (membership's links).
    links: LinkSet,
}

struct PeerState {
    since: Instant,
    agent_version: Option<String>,
    listen_addrs: Vec<Multiaddr>,
    rtt: Option<Duration>,
    subscribed: bool,
    /// Each open connection: its remote address, how it reaches the peer,
    /// whether we dialled it.
    conns: HashMap<ConnectionId, Conn>,
    /// It serves as a relay (identify lists the hop protocol).
    relay: bool,
    /// Hole punching tried again (a new relayed connection) this many
    /// times, and when next (only while it is reached through a relay).
    punch_tries: u8,
    punch_at: Option<Instant>,
    /// A hole-punch retry's new circuit, and the relayed connections to
    /// close once it is up.
    retire: Option<(ConnectionId, Vec<ConnectionId>)>,
}

struct Conn {
    addr: Multiaddr,
    via: Via,
    dialled: bool,
}

impl PeerState {
    /// How its best connection reaches it.
    fn via(&self) -> Via {
        self.conns
            .values()
            .map(|c| c.via)
            .min()
            .unwrap_or(Via::Direct)
    }

    /// The remote addresses of its connections, each once.
    fn addresses(&self) -> HashSet<&Multiaddr> {
        self.conns.values().map(|c| &c.addr).collect()
    }

    /// An address we dialled it at directly (not through a relay), while
    /// such a connection is open: where to ask it for a relay reservation.
    fn dialled(&self) -> Option<&Multiaddr> {
        self.conns
            .values()
            .find(|c| c.dialled && c.via != Via::Relayed)
            .map(|c| &c.addr)
    }

    /// Its relayed connections.
    fn relayed(&self) -> Vec<ConnectionId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.via == Via::Relayed)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Lost peers are redialed at every maintenance tick for this long,
const LOST_FAST: Duration = Duration::from_secs(300);
/// then at every this many ticks,
const LOST_SLOW_EVERY: u64 = 15;
/// and forgotten after this long.
const LOST_FORGET: Duration = Duration::from_secs(3600);

/// With bounded links, new connections start DHT rounds only while the
/// agent holds fewer connections than this.
const JOINING_PEERS: usize = 4;

/// Least time between two DHT bootstrap rounds started by new connections.
const DHT_BOOTSTRAP_GAP: Duration = Duration::from_secs(10);

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

impl EventLoop {
    /// The loop over `swarm`, the queue its handles send commands on, and
    /// the receivers of what it hands to the rest of the agent.
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        cfg: NetConfig,
        registry: &mut Registry,
        metrics: Metrics,
    ) -> (Self, mpsc::Sender<Command>, Inbox) {
        let limits = cfg.limits;
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (in_tx, in_rx) = mpsc::channel(cfg.inbound_queue);
        let (member_tx, member_rx) = mpsc::channel(4096);
        let (raft_tx, raft_rx) = mpsc::channel(1024);
        let (blob_tx, blob_rx) = mpsc::channel(1024);
        let event_loop = EventLoop {
            swarm,
            topic: IdentTopic::new(EVENTS_TOPIC),
            cmd_rx,
            in_tx,
            member_tx,
            member_pending: HashMap::new(),
            raft_tx,
            blob_tx,
            opaque_pending: HashMap::new(),
            local_addrs: Vec::new(),
            metrics,
            p2p_metrics: libp2p::metrics::Metrics::new(registry),
            peers: HashMap::new(),
            bootstrap: cfg.bootstrap,
            maintain_every: cfg.maintain_every,
            max_msg: cfg.max_message_bytes,
            catchup_pending: HashMap::new(),
            last_bootstrap: None,
            lost: HashMap::new(),
            ticks: 0,
            rates: PeerRates::new(&limits),
            gossip_rate: KeyedRate::new(limits.gossip_source_rate, limits.gossip_source_burst),
            log_once: LogOnce::default(),
            reach: Reach::new(),
            links: LinkSet::new(cfg.link_idle, cfg.full_mesh_max),
        };
        let inbox = Inbox {
            events: in_rx,
            member: member_rx,
            raft: raft_rx,
            blob: blob_rx,
        };
        (event_loop, cmd_tx, inbox)
    }

    /// Largest gossip message (whole frame).
    pub(super) fn max_msg(&self) -> usize {
        self.max_msg
    }

    pub(super) async fn run(mut self) {
        let mut tick = tokio::time::interval(self.maintain_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let done = loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Command::Shutdown(done)) => break Some(done),
                    Some(cmd) => self.on_command(cmd),
                    None => break None,
                },
                _ = tick.tick() => self.maintain(),
            }
        };
        drop(self);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn maintain(&mut self) {
        let now = Instant::now();
        for s in self.log_once.due(now) {
            tracing::warn!(peer = %s.who, what = s.reason, count = s.count, "refused again since the last report (counted in the metrics)");
        }
        self.rates.forget_idle();
        self.gossip_rate.forget_idle();
        // Peers we lost: every tick for LOST_FAST, then every LOST_SLOW_EVERY
        // ticks, and forgotten after LOST_FORGET.
        self.ticks += 1;
        self.lost
            .retain(|_, (_, since)| now.duration_since(*since) < LOST_FORGET);
        // Through a relay only while we are connected to it, and only every
        // LOST_SLOW_EVERY ticks: each try takes one of the relay's circuit
        // tokens (30, then one per 2 minutes, per source).
        let slow = self.ticks % LOST_SLOW_EVERY == 0;
        let redial: Vec<(PeerId, Vec<Multiaddr>)> = self
            .lost
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) < LOST_FAST || slow)
            .filter(|(p, _)| self.links.wants(p))
            .map(|(p, (a, _))| {
                let addrs = a
                    .iter()
                    .filter(|a| match reach::relay_of(a) {
                        None => true,
                        Some(relay) => slow && self.peers.contains_key(&relay),
                    })
                    .cloned()
                    .collect::<Vec<_>>();
                (*p, addrs)
            })
            .filter(|(_, a)| !a.is_empty())
            .collect();
        for (peer, addrs) in redial {
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            let _ = self.swarm.dial(opts);
        }
        self.keep_links(now);
        self.keep_relays();
        self.punch_again(now);
        self.seek_autonat_server(now);
        self.reach_metrics();
        // Bootstrap addresses we are not connected to are dialed again, so an
        // agent that restarted or a healed partition reconnects by itself.
        let connected_addrs: HashSet<Multiaddr> = self
            .peers
            .values()
            .flat_map(|p| p.addresses().into_iter().cloned())
            .collect();
        // With bounded links, only while no peer is connected: the links
        // are dialled by themselves, and a bootstrap peer every agent
        // kept a connection to would hold one to every member.
        if self.links.is_bounded() && !self.peers.is_empty() {
            return;
        }
        for addr in self.bootstrap.clone() {
            if let Some(peer) = peer_of(&addr) {
                if self.peers.contains_key(&peer) || peer == *self.swarm.local_peer_id() {
                    continue;
                }
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                let _ = self.swarm.dial(opts);
            } else if !connected_addrs.contains(&addr) {
                let _ = self.swarm.dial(addr);
            }
        }
    }

    /// A DHT lookup round to learn peers from peers, at most every
    /// `DHT_BOOTSTRAP_GAP` (kad also runs one every 60 s by itself).
    fn bootstrap_dht(&mut self) {
        if self
            .last_bootstrap
            .is_some_and(|t| t.elapsed() < DHT_BOOTSTRAP_GAP)
        {
            return;
        }
        if self.swarm.behaviour_mut().kad.bootstrap().is_ok() {
            self.last_bootstrap = Some(Instant::now());
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish { frames, reply } => {
                let _ = reply.send(frames.into_iter().map(|f| self.publish(f)).collect());
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peer_list());
            }
            Command::Reach(reply) => {
                let _ = reply.send(self.reach.info());
            }
            Command::ListenAddrs(reply) => {
                let addrs = if self.local_addrs.is_empty() {
                    self.swarm.listeners().cloned().collect()
                } else {
                    self.local_addrs.clone()
                };
                let _ = reply.send(addrs);
            }
            cmd @ (Command::CatchupRequest { .. }
            | Command::CatchupRespond { .. }
            | Command::MemberRequest { .. }
            | Command::MemberRespond { .. }
            | Command::OpaqueRequest { .. }
            | Command::OpaqueRespond { .. }) => self.on_request_command(cmd),
            Command::Shutdown(_) => {}
            Command::Block(peers) => {
                for p in peers {
                    self.swarm.behaviour_mut().blocked.block_peer(p);
                    tracing::warn!(peer = %p, "fault injection: peer blocked");
                }
            }
            Command::Unblock(peers) => {
                for p in peers {
                    self.swarm.behaviour_mut().blocked.unblock_peer(p);
                    tracing::warn!(peer = %p, "fault injection: peer unblocked");
                }
            }
            Command::SetLinks { bounded, dial } => self.set_links(bounded, dial),
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!(%addr, error = %e, "dial failed");
                }
            }
        }
    }

    fn publish(&mut self, data: Vec<u8>) -> Result<(), String> {
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), data)
        {
            Ok(_) => Ok(()),
            // Alone, or peers not subscribed yet: the event is durable here and
            // peers that connect later do not get it until catch-up exists (issue 3);
            // not an error for the caller.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
            | Err(gossipsub::PublishError::Duplicate) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Connected peers, sorted by id.
    fn peer_list(&self) -> Vec<PeerInfo> {
        let subscribed: HashSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(|(_, topics)| topics.iter().any(|t| **t == self.topic.hash()))
            .map(|(p, _)| *p)
            .collect();
        let mut out: Vec<PeerInfo> = self
            .peers
            .iter()
            .map(|(id, p)| PeerInfo {
                peer_id: id.to_base58(),
                addresses: p.addresses().iter().map(|a| a.to_string()).collect(),
                agent_version: p.agent_version.clone(),
                listen_addrs: p.listen_addrs.iter().map(|a| a.to_string()).collect(),
                connected_secs: p.since.elapsed().as_secs(),
                rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
                gossip_subscribed: subscribed.contains(id),
                via: p.via().as_str(),
            })
            .collect();
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.p2p_metrics.record(&ev);
        match ev {
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.local_addrs.retain(|a| *a != address);
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                if !self.local_addrs.contains(&address) {
                    self.local_addrs.push(address.clone());
                }
                tracing::info!(%address, peer_id = %self.swarm.local_peer_id(), "listening for peers");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                cause,
            } => self.on_closed(peer_id, connection_id, &endpoint, num_established, cause),
            SwarmEvent::ExternalAddrConfirmed { address } => self.on_external_confirmed(address),
            SwarmEvent::ExternalAddrExpired { address } => self.on_external_expired(&address),
            SwarmEvent::ListenerClosed { listener_id, .. } => self.on_listener_closed(listener_id),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if let libp2p::swarm::DialError::Denied { cause } = &error {
                    let who = peer_id.map(|p| p.to_base58()).unwrap_or_default();
                    self.connection_denied(cause, "out", who);
                }
                if let libp2p::swarm::DialError::Transport(errs) = &error {
                    for (addr, e) in errs {
                        self.handshake_failed(addr.to_string(), "out", &error_chain(e));
                    }
                }
                if let (
                    Some(p),
                    libp2p::swarm::DialError::Transport(_) | libp2p::swarm::DialError::NoAddresses,
                ) = (peer_id, &error)
                {
                    self.dial_failed(p);
                }
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => {
                if let libp2p::swarm::ListenError::Denied { cause } = &error {
                    // Before the handshake the peer is unknown: its IP address.
                    let who = peer_id
                        .map(|p| p.to_base58())
                        .unwrap_or_else(|| ip_of(&send_back_addr).unwrap_or_default());
                    self.connection_denied(cause, "in", who);
                }
                if let libp2p::swarm::ListenError::Transport(_) = &error {
                    // The remote's port is ephemeral: one line per IP.
                    let ip = ip_of(&send_back_addr).unwrap_or_else(|| send_back_addr.to_string());
                    self.handshake_failed(ip, "in", &error_chain(&error));
                }
                tracing::debug!(%send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_connected(&mut self, peer_id: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let addr = endpoint.get_remote_address().clone();
        let new = !self.peers.contains_key(&peer_id);
        self.lost.remove(&peer_id);
        let via = reach::via_of(endpoint);
        let st = self.peers.entry(peer_id).or_insert_with(|| PeerState {
            since: Instant::now(),
            agent_version: None,
            listen_addrs: Vec::new(),
            rtt: None,
            subscribed: false,
            conns: HashMap::new(),
            relay: false,
            punch_tries: 0,
            punch_at: None,
            retire: None,
        });
        st.conns.insert(
            id,
            Conn {
                addr: addr.clone(),
                via,
                dialled: endpoint.is_dialer(),
            },
        );
        self.drop_relayed_if_direct(peer_id);
        self.retire_replaced(peer_id, id);
        if new {
            tracing::info!(peer = %peer_id, %addr, via = via.as_str(), dialled = endpoint.is_dialer(), "peer connected");
            let _ = self.in_tx.try_send(Inbound::Connected(peer_id));
            self.send_member(MemberInbound::Connected(peer_id));
            if endpoint.is_dialer() {
                self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
            }
            // With bounded links only while joining: a DHT round dials
            // peers that are not links, each new connection would start
            // another, and the closing of idle ones would never catch up.
            if !self.links.is_bounded() || self.peers.len() < JOINING_PEERS {
                self.bootstrap_dht();
            }
        }
        self.metrics.connected_peers.set(self.peers.len() as i64);
    }

    fn on_closed(
        &mut self,
        peer_id: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: u32,
        cause: Option<libp2p::swarm::ConnectionError>,
    ) {
        if num_established == 0 {
            self.drop_relay(&peer_id);
            if let Some(st) = self.peers.remove(&peer_id) {
                // Keep dialing it for a while: a healed partition or a
                // restarted peer reconnects without waiting for the DHT.
                let mut addrs: Vec<Multiaddr> =
                    st.listen_addrs.into_iter().filter(is_dialable).collect();
                if endpoint.is_dialer() {
                    addrs.push(endpoint.get_remote_address().clone());
                }
                if !addrs.is_empty() {
                    self.lost.insert(peer_id, (addrs, Instant::now()));
                }
            }
            tracing::info!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "peer disconnected");
            self.send_member(MemberInbound::Disconnected(peer_id));
        } else if let Some(st) = self.peers.get_mut(&peer_id) {
            st.conns.remove(&id);
        }
        self.metrics.connected_peers.set(self.peers.len() as i64);
    }

    /// Hand `msg` to membership, or count it dropped if its queue is full.
    fn send_member(&mut self, msg: MemberInbound) {
        if self.member_tx.try_send(msg).is_err() {
            self.metrics
                .inbound_dropped
                .get_or_create(&label("queue", "member"))
                .inc();
        }
    }

    fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        use libp2p::metrics::Recorder;
        match ev {
            BehaviourEvent::Gossipsub(ev) => {
                self.p2p_metrics.record(&ev);
                self.on_gossip(ev);
            }
            BehaviourEvent::Identify(ev) => {
                self.p2p_metrics.record(&ev);
                if let identify::Event::Received {
                    peer_id,
                    connection_id,
                    info,
                } = ev
                {
                    self.on_observed(peer_id, connection_id, &info.observed_addr);
                    self.links.learn(
                        peer_id,
                        info.listen_addrs
                            .iter()
                            .filter(|a| is_dialable(a))
                            .cloned()
                            .collect(),
                    );
                    for addr in &info.listen_addrs {
                        if is_dialable(addr) {
                            self.swarm
                                .behaviour_mut()
                                .kad
                                .add_address(&peer_id, addr.clone());
                        }
                    }
                    let mut stopped_relaying = false;
                    if let Some(st) = self.peers.get_mut(&peer_id) {
                        st.agent_version = Some(info.agent_version);
                        st.listen_addrs = info.listen_addrs;
                        // Over a relayed connection a relay lists no hop
                        // protocol (its handler there is a dummy): only a
                        // direct connection's identify says.
                        if st
                            .conns
                            .get(&connection_id)
                            .is_some_and(|c| c.via != Via::Relayed)
                        {
                            let relay = info.protocols.contains(&libp2p::relay::HOP_PROTOCOL_NAME);
                            stopped_relaying = st.relay && !relay;
                            st.relay = relay;
                        }
                    }
                    if stopped_relaying {
                        self.drop_relay(&peer_id);
                    }
                    self.keep_relays();
                }
            }
            BehaviourEvent::Ping(ev) => {
                self.p2p_metrics.record(&ev);
                if let Ok(rtt) = ev.result {
                    if let Some(st) = self.peers.get_mut(&ev.peer) {
                        st.rtt = Some(rtt);
                    }
                    self.send_member(MemberInbound::Rtt(ev.peer, rtt));
                }
            }
            BehaviourEvent::Kad(ev) => {
                self.p2p_metrics.record(&ev);
                match ev {
                    kad::Event::RoutingUpdated {
                        peer, addresses, ..
                    } => self.on_routing_updated(peer, addresses.into_vec()),
                    kad::Event::OutboundQueryProgressed {
                        result: kad::QueryResult::GetClosestPeers(r),
                        ..
                    } => self.on_lookup(match r {
                        Ok(ok) => ok.peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    }),
                    _ => {}
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    tracing::debug!(%peer, %addr, "mDNS discovered");
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    self.links.learn_one(peer, addr.clone());
                    if !self.peers.contains_key(&peer)
                        && self.links.dial_heard_of(&peer, self.peers.len())
                    {
                        self.dial_peer(peer);
                    }
                }
            }
            BehaviourEvent::Mdns(_) => {}
            BehaviourEvent::Catchup(ev) => self.on_catchup(ev),
            BehaviourEvent::Member(ev) => self.on_member(ev),
            BehaviourEvent::Raft(ev) => self.on_opaque(Opaque::Raft, ev),
            BehaviourEvent::Blob(ev) => self.on_opaque(Opaque::Blob, ev),
            BehaviourEvent::Blocked(v) => match v {},
            BehaviourEvent::Limits(v) => match v {},
            BehaviourEvent::Autonat(ev) => self.on_autonat(ev),
            BehaviourEvent::AutonatServer(ev) => {
                tracing::debug!(client = %ev.client, addr = %ev.tested_addr, result = ?ev.result.as_ref().map_err(|e| e.to_string()), "AutoNAT: dialled a peer back")
            }
            BehaviourEvent::Relay(ev) => {
                self.p2p_metrics.record(&ev);
                tracing::debug!(event = ?ev, "relay server");
            }
            BehaviourEvent::RelayClient(ev) => self.on_relay_client(ev),
            BehaviourEvent::Dcutr(ev) => {
                self.p2p_metrics.record(&ev);
                self.on_dcutr(ev);
            }
        }
    }
}

fn is_dialable(addr: &Multiaddr) -> bool {
    // Skip unspecified addresses a peer may report.
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// The IP address in `addr`, as text.
fn ip_of(addr: &Multiaddr) -> Option<String> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.to_string()),
        Protocol::Ip6(ip) => Some(ip.to_string()),
        _ => None,
    })
}
