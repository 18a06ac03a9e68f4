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

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use multicast::rng::SplitMix64;
use multicast::wire::{self, AddrV4, Announce, Frame, Held, Rank};

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

/// One agent this agent has heard.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Where its datagrams come from; probes go there.
    pub addr: SocketAddr,
    pub announce: Announce,
    pub first_seen: Instant,
    pub last_heard: Instant,
    next_probe: Option<Instant>,
}

impl Peer {
    pub fn node(&self) -> u64 {
        self.announce.node
    }

    /// Heard more than once: not a one-off (perhaps forged) announcement.
    pub fn confirmed(&self) -> bool {
        self.last_heard > self.first_seen
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.announce.interval_ms))
    }

    /// Silent this long: probe it. Two intervals of up to 1.1 each (the
    /// jitter) can pass with only one announcement lost; beyond 2.25 two
    /// were.
    fn suspect_after(&self) -> Duration {
        self.interval() * 2 + self.interval() / 4
    }

    /// Silent this long: gone (three missed intervals plus the jitter).
    fn expire_after(&self) -> Duration {
        self.interval() * 3 + self.interval() / 4
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
    local: HashMap<u64, Peer>,
    foreign: HashMap<u64, Peer>,
    candidates: VecDeque<SocketAddr>,
    next_announce: Instant,
    last_announce: Option<Instant>,
    next_candidates: Instant,
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
            local: HashMap::new(),
            foreign: HashMap::new(),
            candidates: VecDeque::new(),
            next_announce: first,
            last_announce: None,
            next_candidates: first,
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
    }

    /// When [`Presence::handle_timeout`] wants to run next: always some
    /// time, as an agent announces itself for as long as it runs (the
    /// `Option` is the contract every machine shares).
    pub fn poll_timeout(&self) -> Option<Instant> {
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
        Some(at)
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
        match table.get_mut(&node) {
            Some(p) if p.announce.incarnation == a.incarnation => {
                // A late or duplicated copy must not roll the entry back,
                // and an answer to a probe only says "alive" (agents answer
                // each other without their contents, to keep it small).
                if a.reply_to.is_none() && a.seq.wrapping_sub(p.announce.seq) as i32 >= 0 {
                    p.announce = a;
                }
                p.addr = from;
                p.last_heard = now;
                p.next_probe = None;
            }
            Some(p) => {
                *p = Peer {
                    addr: from,
                    announce: a,
                    first_seen: now,
                    last_heard: now,
                    next_probe: None,
                };
                if local {
                    self.events
                        .push_back(PresenceEvent::Restarted { node, addr: from });
                }
            }
            None => {
                let from_source = table.values().filter(|p| p.addr.ip() == from.ip()).count();
                if from_source >= self.cfg.max_peers_per_source {
                    self.stats.source_limited += 1;
                    return;
                }
                if table.len() >= self.cfg.max_peers {
                    match admission_victim(table, now) {
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
                table.insert(
                    node,
                    Peer {
                        addr: from,
                        announce: a,
                        first_seen: now,
                        last_heard: now,
                        next_probe: None,
                    },
                );
                self.candidates.retain(|c| *c != from);
                self.events.push_back(if local {
                    PresenceEvent::Joined { node, addr: from }
                } else {
                    PresenceEvent::Foreign { node, addr: from }
                });
            }
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
        for (node, p) in self.local.iter_mut() {
            let silent = now.saturating_duration_since(p.last_heard);
            if silent >= p.expire_after() {
                gone.push(*node);
            } else if silent >= p.suspect_after() && p.next_probe.is_none_or(|t| now >= t) {
                probes.push(p.addr);
                p.next_probe = Some(now + p.interval() / 16);
            }
        }
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

/// The peer a full table gives up for a newcomer: of those heard only once
/// (never confirmed by a second announcement), the least recently heard;
/// else one overdue (silent past its own interval and a half); else none,
/// and the newcomer waits. So a burst of forged one-off announcements
/// cannot keep a live agent out, and live peers are never pushed out.
fn admission_victim(table: &HashMap<u64, Peer>, now: Instant) -> Option<u64> {
    let unconfirmed = table
        .iter()
        .filter(|(_, p)| !p.confirmed())
        .min_by_key(|(_, p)| p.last_heard);
    if let Some((&node, _)) = unconfirmed {
        return Some(node);
    }
    table
        .iter()
        .filter(|(_, p)| {
            let interval = Duration::from_millis(u64::from(p.announce.interval_ms));
            now.saturating_duration_since(p.last_heard) > interval + interval / 2
        })
        .min_by_key(|(_, p)| p.last_heard)
        .map(|(&node, _)| node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> LocalNode {
        LocalNode {
            node: id,
            version: "test".into(),
            ..LocalNode::default()
        }
    }

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 7479))
    }

    fn drain(p: &mut Presence) -> Vec<Transmit> {
        std::iter::from_fn(|| p.poll_transmit()).collect()
    }

    #[test]
    fn first_announcement_and_group_probe_come_within_a_tenth_of_an_interval() {
        let t0 = Instant::now();
        let mut p = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
        assert!(p.poll_timeout().unwrap() <= t0 + Duration::from_millis(500));
        p.handle_timeout(p.poll_timeout().unwrap());
        let sent = drain(&mut p);
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|t| t.dest == Dest::Group));
        let kinds: Vec<_> = sent
            .iter()
            .map(|t| match wire::decode(&t.bytes).unwrap().frame {
                Frame::Presence(_) => "presence",
                Frame::Probe { .. } => "probe",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["presence", "probe"]);
    }

    #[test]
    fn a_restart_replaces_the_entry_and_a_bye_removes_it() {
        let t0 = Instant::now();
        let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
        let mut b1 = Presence::new(PresenceConfig::default(), node(2), None, t0, 2);
        let mut b2 = Presence::new(PresenceConfig::default(), node(2), None, t0, 3);
        assert_ne!(b1.incarnation(), b2.incarnation());
        let hello1 = Frame::Presence(b1.announcement(None)).encode(0);
        let hello2 = Frame::Presence(b2.announcement(None)).encode(0);
        a.handle_datagram(t0, addr(2), &hello1);
        a.handle_datagram(t0, addr(3), &hello2);
        assert_eq!(a.peers().count(), 1);
        assert_eq!(a.peers().next().unwrap().addr, addr(3));
        let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(matches!(
            events[1],
            PresenceEvent::Restarted { node: 2, .. }
        ));
        // A bye from the old incarnation does not remove the new one.
        b1.leave();
        a.handle_datagram(t0, addr(2), &drain(&mut b1)[0].bytes);
        assert_eq!(a.peers().count(), 1);
        b2.leave();
        a.handle_datagram(t0, addr(3), &drain(&mut b2)[0].bytes);
        assert_eq!(a.peers().count(), 0);
    }

    #[test]
    fn other_subnets_are_kept_apart() {
        let t0 = Instant::now();
        let subnet = Subnet::of(Ipv4Addr::new(10, 0, 0, 1), 24);
        let mut a = Presence::new(PresenceConfig::default(), node(1), Some(subnet), t0, 1);
        let b = Presence::new(PresenceConfig::default(), node(2), None, t0, 2);
        let hello = Frame::Presence(b.announcement(None)).encode(0);
        a.handle_datagram(t0, SocketAddr::from(([10, 0, 1, 2], 7479)), &hello);
        assert_eq!(a.peers().count(), 0);
        assert_eq!(a.foreign_peers().count(), 1);
        a.handle_datagram(t0, addr(2), &hello);
        assert_eq!(a.peers().count(), 1);
    }

    #[test]
    fn probes_are_answered_by_unicast_under_a_rate_limit() {
        let t0 = Instant::now();
        let cfg = PresenceConfig {
            answer_rate: 10,
            answer_burst: 5,
            ..PresenceConfig::default()
        };
        let mut a = Presence::new(cfg, node(1), None, t0, 1);
        let probe = Frame::Probe {
            nonce: 77,
            from_node: None,
            unicast_reply: true,
        }
        .encode(0);
        for _ in 0..20 {
            a.handle_datagram(t0, addr(9), &probe);
        }
        let sent = drain(&mut a);
        assert_eq!(sent.len(), 5);
        assert_eq!(a.stats().answers_limited, 15);
        let Frame::Presence(ans) = wire::decode(&sent[0].bytes).unwrap().frame else {
            panic!("answer is not a presence frame");
        };
        assert_eq!(ans.reply_to, Some(77));
        assert_eq!(sent[0].dest, Dest::To(addr(9)));
        // A second later the bucket has refilled by the rate.
        for _ in 0..20 {
            a.handle_datagram(t0 + Duration::from_secs(1), addr(9), &probe);
        }
        assert_eq!(drain(&mut a).len(), 5);
    }

    #[test]
    fn a_group_probe_brings_the_next_announcement_forward_once() {
        let t0 = Instant::now();
        let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
        let first = a.poll_timeout().unwrap();
        a.handle_timeout(first);
        drain(&mut a);
        let greeting = Frame::Probe {
            nonce: 5,
            from_node: Some(2),
            unicast_reply: false,
        }
        .encode(0);
        // Just after an announcement: it already answered.
        a.handle_datagram(first + Duration::from_millis(10), addr(2), &greeting);
        assert!(a.poll_timeout().unwrap() >= first + Duration::from_millis(4500));
        let later = first + Duration::from_secs(2);
        a.handle_datagram(later, addr(2), &greeting);
        let soon = a.poll_timeout().unwrap();
        assert!(soon >= later && soon <= later + Duration::from_millis(250));
        assert!(
            drain(&mut a).is_empty(),
            "no unicast answer to a group probe"
        );
    }

    #[test]
    fn malformed_and_foreign_datagrams_are_counted_not_fatal() {
        let t0 = Instant::now();
        let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
        a.handle_datagram(t0, addr(2), b"garbage");
        a.handle_datagram(t0, addr(2), &[]);
        let data = Frame::EndOfPass {
            pass: 1,
            closing: false,
        }
        .encode(5);
        a.handle_datagram(t0, addr(2), &data);
        let s = a.stats();
        assert_eq!((s.datagrams_in, s.malformed, s.not_presence), (3, 2, 1));
        assert_eq!(a.peers().count(), 0);
    }

    #[test]
    fn a_silent_peer_is_probed_then_dropped_after_three_intervals() {
        let t0 = Instant::now();
        let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
        let b = Presence::new(PresenceConfig::default(), node(2), None, t0, 2);
        a.handle_datagram(
            t0,
            addr(2),
            &Frame::Presence(b.announcement(None)).encode(0),
        );
        let mut now = t0;
        let mut probes_to_b = 0;
        while a.peers().count() == 1 {
            now = a.poll_timeout().unwrap();
            a.handle_timeout(now);
            probes_to_b += drain(&mut a)
                .iter()
                .filter(|t| t.dest == Dest::To(addr(2)))
                .count();
            assert!(now < t0 + Duration::from_secs(60), "never expired");
        }
        let silent = now - t0;
        assert!(
            silent >= Duration::from_secs(15),
            "dropped after {silent:?}"
        );
        assert!(
            silent <= Duration::from_millis(16_500),
            "dropped after {silent:?}"
        );
        assert!(probes_to_b >= 15, "only {probes_to_b} probes");
    }

    #[test]
    fn an_announcement_with_many_contents_stays_inside_one_datagram() {
        let t0 = Instant::now();
        let mut me = node(1);
        // Sixteen contents, each with the most ranges: far over the budget.
        me.held = (0..16u8)
            .map(|c| Held {
                content: [c; 8],
                blocks_done: 32,
                block_count: 100_000,
                have: (0..32).map(|r| [r * 3000, r * 3000 + 1]).collect(),
            })
            .collect();
        let p = Presence::new(PresenceConfig::default(), me, None, t0, 1);
        let a = p.announcement(None);
        let bytes = Frame::Presence(a.clone()).encode(0);
        assert!(bytes.len() <= MAX_ANNOUNCE, "{} bytes", bytes.len());
        // The newest contents keep their ranges; none is dropped while
        // clearing ranges suffices.
        assert_eq!(a.held.len(), 16);
        assert!(!a.held[0].have.is_empty());
        assert!(a.held[15].have.is_empty());
        assert!(wire::decode(&bytes).is_ok());
    }

    #[test]
    fn answers_to_agents_are_short_and_keep_what_the_table_knows() {
        let t0 = Instant::now();
        let mut me = node(2);
        me.held = vec![Held {
            content: [9; 8],
            blocks_done: 1,
            block_count: 4,
            have: vec![[0, 1]],
        }];
        let mut b = Presence::new(PresenceConfig::default(), me, None, t0, 2);
        let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
        a.handle_datagram(
            t0,
            addr(2),
            &Frame::Presence(b.announcement(None)).encode(0),
        );
        let probe = |from_node| {
            Frame::Probe {
                nonce: 1,
                from_node,
                unicast_reply: true,
            }
            .encode(0)
        };
        // An agent's probe: the answer has no contents...
        b.handle_datagram(t0, addr(1), &probe(Some(1)));
        let answer = drain(&mut b).remove(0).bytes;
        let Frame::Presence(ans) = wire::decode(&answer).unwrap().frame else {
            panic!("not a presence answer")
        };
        assert!(ans.held.is_empty());
        // ...and does not erase what the last announcement said.
        a.handle_datagram(t0 + Duration::from_secs(1), addr(2), &answer);
        let peer = a.peers().next().unwrap();
        assert_eq!(peer.announce.held.len(), 1);
        assert_eq!(peer.last_heard, t0 + Duration::from_secs(1));
        // A scan's probe sees the contents.
        b.handle_datagram(t0, addr(9), &probe(None));
        let Frame::Presence(ans) = wire::decode(&drain(&mut b)[0].bytes).unwrap().frame else {
            panic!("not a presence answer")
        };
        assert_eq!(ans.held.len(), 1);
    }

    #[test]
    fn subnet_membership() {
        let s = Subnet::of(Ipv4Addr::new(192, 168, 7, 200), 23);
        assert_eq!(s.to_string(), "192.168.6.0/23");
        assert!(s.contains(Ipv4Addr::new(192, 168, 7, 1)));
        assert!(!s.contains(Ipv4Addr::new(192, 168, 8, 1)));
        assert!(Subnet::of(Ipv4Addr::new(1, 2, 3, 4), 0).contains(Ipv4Addr::new(9, 9, 9, 9)));
    }
}
