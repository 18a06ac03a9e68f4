//! Presence: who else runs an agent on this subnet, as a sans-IO state
//! machine.
//!
//! Protocol flow
//!
//! 1. Every agent multicasts a `Presence` announcement on the control group
//!    every interval, with ±10% jitter so a fleet started together does not
//!    announce in lockstep. Its first announcement goes out within a tenth
//!    of an interval, together with a group `Probe` that asks for a group
//!    answer: every peer moves its next announcement to within a twentieth
//!    of an interval (unless it announced very recently), so a new agent
//!    learns the subnet at once, and a thousand agents booting together
//!    cost one extra announcement each, not a million unicast answers.
//! 2. A `Probe` that asks for a unicast answer (`somcast scan --probe`,
//!    suspect probes, neighbour-cache candidates) gets a unicast `Presence`
//!    with `reply_to` set to its nonce, under a token-bucket rate limit: one
//!    host cannot make an agent flood the subnet.
//! 3. The peer table keeps one entry per node id. A peer silent for two of
//!    its intervals is suspect and is probed by unicast every sixteenth of an
//!    interval; one that stays silent for three intervals (plus a jitter
//!    margin) is dropped. With 20% loss three announcements in a row are lost
//!    for 0.8% of peers per interval, which across hundreds of peers would be
//!    constant flapping; the probes make a false drop need some twenty
//!    further losses in a row.
//! 4. An announcement with the same node id and another incarnation is a
//!    restart: the entry is replaced. `Bye` removes an entry at once.
//! 5. Announcements whose source lies outside this agent's subnet are kept in
//!    a separate table: they are visible, but never mixed with the local
//!    peers that elections are made among.
//!
//! Call order: feed [`Presence::handle_datagram`] with every datagram from
//! the control socket(s) and [`Presence::handle_timeout`] when
//! [`Presence::poll_timeout`] is reached; after each call drain
//! [`Presence::poll_transmit`] and [`Presence::poll_event`].

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

mod table;

use multicast::rng::SplitMix64;

use multicast::wire::{self, AddrV4, Announce, Frame, Held, Rank};
pub use table::Peer;
use table::PeerTable;

/// Largest announcement, header and CRC included: one datagram inside a
/// 1500-byte MTU with room for IP and UDP headers and a tunnel or two.
pub const MAX_ANNOUNCE: usize = 1200;

/// Tunables of the presence protocol.
#[derive(Clone, Debug)]
pub struct PresenceConfig {
    /// How often this agent announces itself. Peers expire it after three.
    pub interval: Duration,
    /// Unicast probe answers per second, sustained.
    pub answer_rate: u32,
    /// Answers that may go out in one burst (a fleet probing at once).
    pub answer_burst: u32,
    /// Candidate addresses (neighbour-cache hints) probed per interval.
    pub candidates_per_interval: usize,
    /// Most peers kept, local and foreign each: a spoofing host cannot grow
    /// the table without bound.
    pub max_peers: usize,
    /// Most peers one source address may hold in a table: one host runs one
    /// agent, a lab a handful; a host announcing thousands of node ids
    /// cannot crowd out the rest.
    pub max_peers_per_source: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            answer_rate: 50,
            answer_burst: 400,
            candidates_per_interval: 32,
            max_peers: 4096,
            max_peers_per_source: 32,
        }
    }
}

/// What this agent says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalNode {
    pub node: u64,
    pub version: String,
    pub addrs: Vec<AddrV4>,
    pub api_port: u16,
    pub repair_port: u16,
    pub rank: Rank,
    pub held: Vec<Held>,
}

/// An IPv4 subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// The subnet that `addr/prefix` lies in.
    pub fn of(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Self {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

pub use multicast::transmit::{Dest, Transmit};

/// Why a peer left the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftBecause {
    Silent,
    Bye,
}

/// Changes of the peer table, for logs and for the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceEvent {
    Joined { node: u64, addr: SocketAddr },
    Restarted { node: u64, addr: SocketAddr },
    Left { node: u64, because: LeftBecause },
    Foreign { node: u64, addr: SocketAddr },
}

/// Counters of what came and went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PresenceStats {
    pub datagrams_in: u64,
    pub malformed: u64,
    /// Well-formed datagrams that are not presence traffic (data frames on
    /// the control port, for example).
    pub not_presence: u64,
    pub announcements_sent: u64,
    pub probes_sent: u64,
    pub answers_sent: u64,
    /// Probes left unanswered by the rate limit.
    pub answers_limited: u64,
    pub bytes_sent: u64,
    /// Peers refused because the table was full of live, confirmed peers.
    pub table_full: u64,
    /// Peers refused because their source address holds its share.
    pub source_limited: u64,
    /// Peers dropped to admit a new one: heard once only, or overdue.
    pub evicted: u64,
}

/// The presence state machine of one agent on one subnet.
pub struct Presence {
    cfg: PresenceConfig,
    me: LocalNode,
    incarnation: u32,
    seq: u32,
    subnet: Option<Subnet>,
    local: PeerTable,
    foreign: PeerTable,
    candidates: VecDeque<SocketAddr>,
    next_announce: Instant,
    last_announce: Option<Instant>,
    next_candidates: Instant,
    /// When [`Presence::handle_timeout`] next has work, or earlier: worked
    /// out in full by each timeout run, and only brought forward by what
    /// comes between (a datagram costs no walk over the table).
    deadline: Instant,
    greeted: bool,
    tokens: f64,
    tokens_at: Instant,
    rng: SplitMix64,
    out: VecDeque<Transmit>,
    events: VecDeque<PresenceEvent>,
    stats: PresenceStats,
}

impl Presence {
    /// `subnet` is the subnet of the interface the control group is joined
    /// on; `None` treats every sender as local. `seed` feeds the jitter and
    /// the incarnation number: give each agent a different one.
    pub fn new(
        cfg: PresenceConfig,
        me: LocalNode,
        subnet: Option<Subnet>,
        now: Instant,
        seed: u64,
    ) -> Self {
        let mut rng = SplitMix64(seed ^ me.node.rotate_left(17) ^ 0x5DEE_CE66_D1CE_B00C);
        let incarnation = rng.next_u64() as u32;
        let first = now + cfg.interval.mul_f64(rng.unit() / 10.0);
        Self {
            tokens: f64::from(cfg.answer_burst),
            tokens_at: now,
            cfg,
            me,
            incarnation,
            seq: 0,
            subnet,
            local: PeerTable::default(),
            foreign: PeerTable::default(),
            candidates: VecDeque::new(),
            next_announce: first,
            last_announce: None,
            next_candidates: first,
            deadline: first,
            greeted: false,
            rng,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: PresenceStats::default(),
        }
    }

    pub fn node(&self) -> u64 {
        self.me.node
    }

    pub fn incarnation(&self) -> u32 {
        self.incarnation
    }

    /// What this agent announces about itself.
    pub fn local(&self) -> &LocalNode {
        &self.me
    }

    /// Updates what this agent announces (rank inputs, contents held); it
    /// goes out with the next announcement.
    pub fn set_local(&mut self, me: LocalNode) {
        self.me = me;
    }

    /// Whether `node` is a peer on this subnet confirmed by more than one
    /// announcement, and `from` is its address: what an election asks of
    /// a claimant or representative once candidates have wasted its time.
    pub fn vouches_for(&self, node: u64, from: IpAddr) -> bool {
        self.local
            .get(&node)
            .is_some_and(|p| p.confirmed() && p.addr.ip() == from)
    }

    /// Peers on this agent's subnet.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.local.values()
    }

    /// Agents heard from outside this agent's subnet.
    pub fn foreign_peers(&self) -> impl Iterator<Item = &Peer> {
        self.foreign.values()
    }

    pub fn stats(&self) -> PresenceStats {
        self.stats
    }

    /// Addresses that may hold agents (the neighbour cache): each is probed
    /// once by unicast, a few per interval, so agents are found even where
    /// multicast does not reach.
    pub fn add_candidates(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        for a in addrs {
            if !self.candidates.contains(&a) && !self.local.values().any(|p| p.addr == a) {
                self.candidates.push_back(a);
            }
        }
        if !self.candidates.is_empty() {
            self.deadline = self.deadline.min(self.next_candidates);
        }
    }

    /// Takes one datagram received on the control group or the unicast
    /// control socket.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        match wire::decode(bytes) {
            Ok(d) => self.handle_frame(now, from, d.frame),
            Err(e) => {
                self.stats.datagrams_in += 1;
                self.stats.malformed += 1;
                tracing::trace!("presence: dropped datagram from {from}: {e}");
            }
        }
    }

    /// Takes one frame already decoded (the agent decodes each control
    /// datagram once and hands out its frames).
    pub fn handle_frame(&mut self, now: Instant, from: SocketAddr, frame: Frame<'_>) {
        self.stats.datagrams_in += 1;
        match frame {
            Frame::Presence(a) => self.heard(now, from, a),
            Frame::Probe {
                nonce,
                from_node,
                unicast_reply,
            } => {
                if from_node == Some(self.me.node) {
                    return; // our own group probe, looped back
                }
                if unicast_reply {
                    // An agent asks whether this one is alive; a person
                    // (scan) wants to see what it holds.
                    self.answer(now, from, nonce, from_node.is_some());
                } else {
                    self.announce_soon(now);
                }
            }
            Frame::Bye { node, incarnation } => {
                let gone = self
                    .local
                    .get(&node)
                    .is_some_and(|p| p.announce.incarnation == incarnation);
                if gone {
                    self.local.remove(&node);
                    self.events.push_back(PresenceEvent::Left {
                        node,
                        because: LeftBecause::Bye,
                    });
                }
                self.foreign
                    .retain(|n, p| !(*n == node && p.announce.incarnation == incarnation));
            }
            _ => self.stats.not_presence += 1,
        }
    }

    /// Runs the timers: announcements, suspect probes, expiry, candidates.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_announce {
            self.announce(now);
            if !self.greeted {
                self.greeted = true;
                let nonce = self.rng.next_u64();
                self.queue(Dest::Group, &self.probe_frame(nonce, false));
                self.stats.probes_sent += 1;
            }
            let jitter = 0.9 + self.rng.unit() * 0.2;
            self.next_announce = now + self.cfg.interval.mul_f64(jitter);
        }
        self.check_peers(now);
        if now >= self.next_candidates {
            self.next_candidates = now + self.cfg.interval;
            for _ in 0..self.cfg.candidates_per_interval {
                let Some(addr) = self.candidates.pop_front() else {
                    break;
                };
                let nonce = self.rng.next_u64();
                self.queue(Dest::To(addr), &self.probe_frame(nonce, true));
                self.stats.probes_sent += 1;
            }
        }
        self.deadline = self.next_deadline();
    }

    /// When [`Presence::handle_timeout`] wants to run next: always some
    /// time, as an agent announces itself for as long as it runs (the
    /// `Option` is the contract every machine shares). It may come early
    /// (a peer heard since then is due later): the timeout then does
    /// nothing but work out the next one.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.deadline)
    }

    /// The earliest timer: the next announcement, candidate probes, and
    /// each peer's probe and expiry.
    fn next_deadline(&self) -> Instant {
        let mut at = self.next_announce;
        if !self.candidates.is_empty() {
            at = at.min(self.next_candidates);
        }
        for p in self.local.values() {
            let due = p.next_probe.unwrap_or(p.last_heard + p.suspect_after());
            at = at.min(due).min(p.last_heard + p.expire_after());
        }
        for p in self.foreign.values() {
            at = at.min(p.last_heard + p.expire_after());
        }
        at
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<PresenceEvent> {
        self.events.pop_front()
    }

    /// A clean shutdown: tells the subnet this agent is leaving.
    pub fn leave(&mut self) {
        let frame = Frame::Bye {
            node: self.me.node,
            incarnation: self.incarnation,
        };
        self.queue(Dest::Group, &frame);
    }

    fn heard(&mut self, now: Instant, from: SocketAddr, a: Announce) {
        if a.node == self.me.node {
            // Our own announcement looped back, or a copy of this node with
            // the same id (a cloned disk image): never a peer of ourselves.
            return;
        }
        let local = match (self.subnet, from.ip()) {
            (None, _) => true,
            (Some(s), IpAddr::V4(ip)) => s.contains(ip),
            (Some(_), IpAddr::V6(_)) => false,
        };
        let node = a.node;
        let table = if local {
            &mut self.local
        } else {
            &mut self.foreign
        };
        let fresh = |announce| Peer {
            addr: from,
            announce,
            first_seen: now,
            last_heard: now,
            next_probe: None,
        };
        match table.get(&node).map(|p| p.announce.incarnation) {
            Some(incarnation) if incarnation == a.incarnation => {
                table.refresh(node, from, now, |p| {
                    // A late or duplicated copy must not roll the entry
                    // back, and an answer to a probe only says "alive"
                    // (agents answer each other without their contents, to
                    // keep it small).
                    if a.reply_to.is_none() && a.seq.wrapping_sub(p.announce.seq) as i32 >= 0 {
                        p.announce = a;
                    }
                });
            }
            Some(_) => {
                table.insert(node, fresh(a));
                if local {
                    self.events
                        .push_back(PresenceEvent::Restarted { node, addr: from });
                }
            }
            None => {
                if table.held_by_source(from.ip()) as usize >= self.cfg.max_peers_per_source {
                    self.stats.source_limited += 1;
                    return;
                }
                if table.len() >= self.cfg.max_peers {
                    match table.admission_victim(now) {
                        Some(victim) => {
                            table.remove(&victim);
                            self.stats.evicted += 1;
                        }
                        None => {
                            self.stats.table_full += 1;
                            return;
                        }
                    }
                }
                table.insert(node, fresh(a));
                self.candidates.retain(|c| *c != from);
                self.events.push_back(if local {
                    PresenceEvent::Joined { node, addr: from }
                } else {
                    PresenceEvent::Foreign { node, addr: from }
                });
            }
        }
        // Its next check (a probe when it falls silent) may be the
        // earliest timer now.
        let table = if local { &self.local } else { &self.foreign };
        if let Some(p) = table.get(&node) {
            self.deadline = self.deadline.min(p.last_heard + p.suspect_after());
        }
    }

    /// Brings the next group announcement forward, unless one went out
    /// within the last eighth of an interval (it already answered).
    fn announce_soon(&mut self, now: Instant) {
        let recent = self
            .last_announce
            .is_some_and(|t| now.saturating_duration_since(t) < self.cfg.interval / 8);
        let soon = now + self.cfg.interval.mul_f64(self.rng.unit() / 20.0);
        if !recent && soon < self.next_announce {
            self.next_announce = soon;
            self.deadline = self.deadline.min(soon);
        }
    }

    fn answer(&mut self, now: Instant, to: SocketAddr, nonce: u64, short: bool) {
        let rate = f64::from(self.cfg.answer_rate);
        let elapsed = now.saturating_duration_since(self.tokens_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(self.cfg.answer_burst));
        self.tokens_at = now;
        if self.tokens < 1.0 {
            self.stats.answers_limited += 1;
            return;
        }
        self.tokens -= 1.0;
        let mut a = self.announcement(Some(nonce));
        if short {
            a.held.clear();
        }
        self.queue(Dest::To(to), &Frame::Presence(a));
        self.stats.answers_sent += 1;
    }

    fn announce(&mut self, now: Instant) {
        self.last_announce = Some(now);
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::Presence(self.announcement(None));
        self.queue(Dest::Group, &frame);
        self.stats.announcements_sent += 1;
    }

    /// This agent's announcement, cut to fit [`MAX_ANNOUNCE`] bytes: HAVE
    /// ranges of the oldest contents go first (they then read as counts),
    /// then the oldest contents.
    fn announcement(&self, reply_to: Option<u64>) -> Announce {
        let mut a = self.full_announcement(reply_to);
        let fits = |a: &Announce| Frame::Presence(a.clone()).encode(0).len() <= MAX_ANNOUNCE;
        let mut i = a.held.len();
        while !fits(&a) && i > 0 {
            i -= 1;
            a.held[i].have.clear();
        }
        while !fits(&a) && a.held.pop().is_some() {}
        a
    }

    fn full_announcement(&self, reply_to: Option<u64>) -> Announce {
        let interval_ms = self.cfg.interval.as_millis().clamp(
            u128::from(wire::MIN_INTERVAL_MS),
            u128::from(wire::MAX_INTERVAL_MS),
        ) as u32;
        let mut version = self.me.version.clone();
        version.truncate(wire::MAX_VERSION_LEN);
        Announce {
            node: self.me.node,
            incarnation: self.incarnation,
            seq: self.seq,
            interval_ms,
            version,
            addrs: self
                .me
                .addrs
                .iter()
                .take(wire::MAX_ADDRS)
                .copied()
                .collect(),
            api_port: self.me.api_port,
            repair_port: self.me.repair_port,
            rank: self.me.rank,
            held: self.me.held.iter().take(wire::MAX_HELD).cloned().collect(),
            reply_to,
        }
    }

    fn probe_frame(&self, nonce: u64, unicast_reply: bool) -> Frame<'static> {
        Frame::Probe {
            nonce,
            from_node: Some(self.me.node),
            unicast_reply,
        }
    }

    fn check_peers(&mut self, now: Instant) {
        let mut gone = Vec::new();
        let mut probes = Vec::new();
        self.local.for_each_probe(|node, p, next_probe| {
            let silent = now.saturating_duration_since(p.last_heard);
            if silent >= p.expire_after() {
                gone.push(*node);
            } else if silent >= p.suspect_after() && next_probe.is_none_or(|t| now >= t) {
                probes.push(p.addr);
                *next_probe = Some(now + p.interval() / 16);
            }
        });
        for node in gone {
            self.local.remove(&node);
            self.events.push_back(PresenceEvent::Left {
                node,
                because: LeftBecause::Silent,
            });
        }
        for addr in probes {
            let nonce = self.rng.next_u64();
            self.queue(Dest::To(addr), &self.probe_frame(nonce, true));
            self.stats.probes_sent += 1;
        }
        self.foreign
            .retain(|_, p| now.saturating_duration_since(p.last_heard) < p.expire_after());
    }

    fn queue(&mut self, dest: Dest, frame: &Frame<'_>) {
        // Control frames carry no session: the header's session field is 0.
        let bytes = frame.encode(0);
        self.stats.bytes_sent += bytes.len() as u64;
        self.out.push_back(Transmit { dest, bytes });
    }
}

#[cfg(test)]
mod tests;
