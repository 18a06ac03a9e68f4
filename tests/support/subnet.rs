//! Whole agents on one simulated subnet ([`multicast::sim::Net`]): each
//! runs the presence, election, session (sender or receiver) and repair
//! machines the real agent runs, wired as the agent wires them, over a
//! virtual clock with seeded loss. A task reaches every agent: they elect
//! one representative, it fetches the package from the origin and
//! multicasts it after the startup delay, receivers take what the
//! multicast missed from peers (peers' real repair frames, served and
//! checked by the repair machines), and the origin is the last resort.
//!
//! What is not simulated: the fleet key's seals (the machines never see
//! them), files (a verified block is marked held; its bytes are the
//! package's), and TCP (a repair exchange is reliable, ends after the
//! block's time on the link, and fails after a deadline when the peer is
//! dead).

#![allow(dead_code)] // each test takes what it needs

#[path = "subnet_repair.rs"]
mod repair_side;
#[path = "subnet_session.rs"]
mod session_side;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use multicast::codec::{Collector, Layout, Plan, sha256};
use multicast::receiver::{BlockResult, DecodeOutcome, Receiver, ReceiverConfig, ReceiverEvent};
use multicast::sender::{EncodeJob, Sender, SenderConfig, SenderObject};
use multicast::sim::{Datagram, Net, Wake, addr_of, index_of};
use multicast::transmit::{Dest, Transmit};
use multicast::wire::{self, Digest, Frame, Held, Standing};
use repair::{Answer, PlanConfig, RepairPlan, Serving, Want};
use scanner::{LocalNode, Presence, PresenceConfig};
use somcast::election::{Election, ElectionConfig, ElectionEvent, Role as ElectionRole};
use somcast::flow::{self, Next, SessionEnd};
use somcast::topology::SiteKind;

/// The control group's port (presence, claims, offers).
pub const CONTROL: u16 = 7479;
/// Where a repair server listens.
pub const REPAIR: u16 = 7481;
/// The data group's port.
pub const DATA: u16 = 7482;
/// Where a sender takes receivers' feedback.
pub const FEEDBACK: u16 = 7483;

/// How a run is set up.
#[derive(Clone, Debug)]
pub struct Options {
    pub agents: usize,
    pub loss: f64,
    pub seed: u64,
    pub package_bytes: usize,
    pub block_bytes: u32,
    pub symbol_bytes: u16,
    /// The multicast's rate.
    pub rate_bps: u64,
    /// One origin download's rate.
    pub origin_bps: u64,
    /// One repair connection's rate.
    pub repair_bps: u64,
    pub startup_delay: Duration,
    /// Agents (the last ones) the task reaches late, and when.
    pub late: usize,
    pub late_at: Duration,
    /// How long an unanswered repair request waits on a dead peer.
    pub repair_deadline: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            agents: 100,
            loss: 0.0,
            seed: 1,
            package_bytes: 512 << 10,
            block_bytes: 64 << 10,
            symbol_bytes: 1024,
            rate_bps: 20_000_000,
            origin_bps: 50_000_000,
            repair_bps: 100_000_000,
            startup_delay: Duration::from_secs(3),
            late: 0,
            late_at: Duration::ZERO,
            repair_deadline: Duration::from_secs(5),
        }
    }
}

/// The package, as the task's manifest describes it.
pub struct Package {
    pub data: Vec<u8>,
    pub layout: Layout,
    pub plan: Plan,
    pub hashes: Vec<Digest>,
    pub content: Digest,
}

impl Package {
    fn new(o: &Options) -> Self {
        let mut rng = multicast::rng::SplitMix64(o.seed ^ 0x9E37_79B9);
        let data: Vec<u8> = (0..o.package_bytes).map(|_| rng.next_u64() as u8).collect();
        let layout = Layout::for_file(data.len() as u64, o.block_bytes, o.symbol_bytes)
            .expect("a valid layout");
        let hashes = (0..layout.block_count())
            .map(|b| sha256(self_block(&data, &layout, b)))
            .collect();
        Self {
            content: sha256(&data),
            plan: Plan::new(layout),
            layout,
            hashes,
            data,
        }
    }

    fn block(&self, b: u32) -> &[u8] {
        self_block(&self.data, &self.layout, b)
    }
}

fn self_block<'a>(data: &'a [u8], layout: &Layout, b: u32) -> &'a [u8] {
    let at = layout.offset(b) as usize;
    &data[at..at + layout.block_len(b)]
}

/// What an agent is doing about the task.
enum Phase {
    /// The task has not reached it yet.
    Idle,
    Electing,
    /// Taking from peers what they hold, then `then`.
    Repair {
        plan: Box<RepairPlan<usize>>,
        then: AfterRepair,
    },
    Represent(Box<Represent>),
    Receive(Box<Receiver>),
    Done,
}

enum AfterRepair {
    /// A receiver: the rest from the origin, then done.
    Origin,
    /// A representative: the rest from the origin as the multicast runs.
    Represent { session: u64, start: Instant },
}

/// A representative: fetching from the origin, block by block, and from
/// `start` multicasting what it holds.
struct Represent {
    session: u64,
    start: Instant,
    /// Blocks still to fetch, in order; the first one lands at `fetch_at`.
    fetching: VecDeque<u32>,
    fetch_at: Option<Instant>,
    sender: Option<Sender>,
    /// Encode jobs for blocks not fetched yet.
    owed: VecDeque<EncodeJob>,
}

pub struct Agent {
    pub presence: Presence,
    pub election: Option<Election>,
    phase: Phase,
    pub joins_at: Instant,
    pub done: Vec<bool>,
    /// Symbols of blocks a session left unfinished.
    leftovers: Vec<(u32, Box<Collector>)>,
    /// The representative it follows and its session's start.
    following: Option<(u64, Instant)>,
    pub origin_bytes: u64,
    pub peer_bytes: u64,
    pub multicast_blocks: u32,
    pub completed_at: Option<Instant>,
    /// Times it won an election.
    pub elected: u32,
    /// Multicast sessions it sent (from their start).
    pub sent_sessions: u32,
    standing: Standing,
    node: u64,
    /// Repair exchanges out: (token, peer, block).
    asked: Vec<(u64, usize, u32)>,
}

impl Agent {
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    pub fn is_representing(&self) -> bool {
        matches!(self.phase, Phase::Represent(_))
    }

    pub fn is_sending(&self) -> bool {
        matches!(&self.phase, Phase::Represent(r) if r.sender.is_some())
    }

    fn held(&self) -> u32 {
        self.done.iter().filter(|d| **d).count() as u32
    }

    fn held_permille(&self) -> u16 {
        (self.held() * 1000 / self.done.len() as u32) as u16
    }

    /// The earliest any of its machines wants to run.
    fn next_timer(&self) -> Option<Instant> {
        let mut at = self.presence.poll_timeout();
        let mut min = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        if matches!(self.phase, Phase::Idle) {
            min(Some(self.joins_at));
        }
        min(self.election.as_ref().and_then(Election::poll_timeout));
        match &self.phase {
            Phase::Repair { plan, .. } => min(plan.poll_timeout()),
            Phase::Represent(r) => {
                min(r.fetch_at);
                match &r.sender {
                    Some(s) => min(s.poll_timeout()),
                    None => min(Some(r.start)),
                }
            }
            Phase::Receive(rx) => min(rx.poll_timeout()),
            Phase::Idle | Phase::Electing | Phase::Done => {}
        }
        at
    }
}

/// The subnet and its agents.
pub struct Subnet {
    pub net: Net,
    pub agents: Vec<Agent>,
    pub pkg: Package,
    pub o: Options,
    tokens: u64,
    /// The most agents sending a session at once, past each one's start.
    pub most_sending: usize,
    /// Agents the data group does not reach (a switch that prunes it):
    /// they hear the control group only.
    pub deaf: Vec<bool>,
}

impl Subnet {
    pub fn new(o: Options) -> Self {
        let mut net = Net::new(o.agents, o.loss, o.seed);
        let pkg = Package::new(&o);
        let t0 = net.t0;
        let blocks = pkg.layout.block_count() as usize;
        let mut agents = Vec::with_capacity(o.agents);
        for i in 0..o.agents {
            let node = 1000 + i as u64;
            let rng = net.rng();
            let standing = Standing {
                preference: 0,
                held_permille: 0,
                wired: true,
                free_disk_gib: (rng.next_u64() % 500) as u32,
                uptime_h: (rng.next_u64() % 100) as u32,
                node,
            };
            let me = LocalNode {
                node,
                version: "sim".into(),
                repair_port: REPAIR,
                ..LocalNode::default()
            };
            let seed = rng.next_u64();
            let presence = Presence::new(PresenceConfig::default(), me, None, t0, seed);
            let joins_at = if i >= o.agents - o.late {
                t0 + o.late_at
            } else {
                t0
            };
            agents.push(Agent {
                presence,
                election: None,
                phase: Phase::Idle,
                joins_at,
                done: vec![false; blocks],
                leftovers: Vec::new(),
                following: None,
                origin_bytes: 0,
                peer_bytes: 0,
                multicast_blocks: 0,
                completed_at: None,
                elected: 0,
                sent_sessions: 0,
                standing,
                node,
                asked: Vec::new(),
            });
            net.wake_at(i, agents[i].next_timer());
        }
        Self {
            net,
            agents,
            pkg,
            tokens: 0,
            most_sending: 0,
            deaf: vec![false; o.agents],
            o,
        }
    }

    /// Runs until every live agent is done, or `limit` of virtual time
    /// since the start.
    pub fn run(&mut self, limit: Duration) {
        let until = self.net.t0 + limit;
        while !self.all_done() && self.step(until) {}
    }

    /// Runs for `d` of virtual time, whatever is done.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.net.now + d;
        while self.step(until) {}
    }

    /// Handles the next thing that happens before `until`; false when
    /// nothing does.
    fn step(&mut self, until: Instant) -> bool {
        let Some(wake) = self.net.next(until) else {
            return false;
        };
        let i = match wake {
            Wake::Timer(i) => {
                self.on_timer(i);
                i
            }
            Wake::Datagram(d) => {
                let i = d.to;
                self.on_datagram(d);
                i
            }
            Wake::Reply { to, token } => {
                self.on_reply(to, token);
                to
            }
        };
        self.pump(i);
        let at = self.agents[i].next_timer();
        self.net.wake_at(i, at);
        true
    }

    pub fn all_done(&self) -> bool {
        (0..self.agents.len()).all(|i| self.net.is_silenced(i) || self.agents[i].is_done())
    }

    pub fn origin_bytes(&self) -> u64 {
        self.agents.iter().map(|a| a.origin_bytes).sum()
    }

    /// Agents that represented the subnet: sent a multicast session.
    pub fn representatives(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| self.agents[i].sent_sessions > 0)
            .collect()
    }

    /// Agents that won an election at some point (two may win at once,
    /// before either sends, and one then steps down).
    pub fn elected(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| self.agents[i].elected > 0)
            .collect()
    }

    fn on_timer(&mut self, i: usize) {
        let now = self.net.now;
        let a = &mut self.agents[i];
        a.presence.handle_timeout(now);
        if matches!(a.phase, Phase::Idle) && now >= a.joins_at {
            self.join(i);
        }
        let a = &mut self.agents[i];
        if let Some(e) = a.election.as_mut()
            && e.poll_timeout().is_some_and(|t| t <= now)
        {
            e.handle_timeout(now);
        }
        match &mut a.phase {
            Phase::Repair { plan, .. } => plan.handle_timeout(now),
            Phase::Receive(rx) => rx.handle_timeout(now),
            Phase::Represent(_) => self.represent_timer(i),
            _ => {}
        }
    }

    /// The task reaches agent `i`: its election starts.
    fn join(&mut self, i: usize) {
        let now = self.net.now;
        let a = &mut self.agents[i];
        let mut standing = a.standing;
        standing.held_permille = a.held_permille();
        let session = self.net.rng().next_u64();
        let seed = self.net.rng().next_u64();
        a.election = Some(Election::new(
            ElectionConfig {
                startup_delay: self.o.startup_delay,
                ..ElectionConfig::default()
            },
            self.pkg.content,
            standing,
            session,
            data_group(&self.pkg.content),
            now,
            seed,
        ));
        a.phase = Phase::Electing;
    }

    fn on_datagram(&mut self, d: Datagram) {
        let now = self.net.now;
        let a = &mut self.agents[d.to];
        match d.port {
            CONTROL => {
                // Decoded once, handed to each machine, as the agent does.
                let Ok(decoded) = wire::decode(&d.bytes) else {
                    return;
                };
                let node = match &decoded.frame {
                    Frame::Claim(c) => Some(c.standing.node),
                    Frame::Offer(o) => Some(o.standing.node),
                    _ => None,
                };
                match node {
                    Some(node) => {
                        let vouched = a.presence.vouches_for(node, d.from.ip());
                        if let Some(e) = a.election.as_mut() {
                            let _ = e.handle_frame_vouched(now, &decoded.frame, vouched);
                        }
                    }
                    None => a.presence.handle_frame(now, d.from, decoded.frame),
                }
            }
            DATA if !self.deaf[d.to] => {
                if let Phase::Receive(rx) = &mut a.phase {
                    rx.handle_datagram(now, d.from, &d.bytes);
                }
            }
            FEEDBACK => {
                if let Phase::Represent(r) = &mut a.phase
                    && let Some(s) = r.sender.as_mut()
                {
                    s.handle_datagram(now, d.from, &d.bytes);
                }
            }
            _ => {}
        }
    }

    /// Drains every machine of agent `i` until none has more to say.
    fn pump(&mut self, i: usize) {
        loop {
            let mut more = false;
            more |= self.pump_presence(i);
            more |= self.pump_election(i);
            more |= match self.agents[i].phase {
                Phase::Receive(_) => self.pump_receiver(i),
                Phase::Represent(_) => self.pump_sender(i),
                Phase::Repair { .. } => self.pump_repair(i),
                _ => false,
            };
            if !more {
                break;
            }
        }
    }

    fn send(&mut self, i: usize, port: u16, t: Transmit) {
        let n = self.agents.len();
        match t.dest {
            Dest::Group => self.net.multicast(i, port, t.bytes, 0..n),
            Dest::To(to) => self.net.unicast(i, port, to, t.bytes),
        }
    }

    fn pump_presence(&mut self, i: usize) -> bool {
        let mut more = false;
        while let Some(t) = self.agents[i].presence.poll_transmit() {
            self.send(i, CONTROL, t);
            more = true;
        }
        while self.agents[i].presence.poll_event().is_some() {}
        more
    }

    fn pump_election(&mut self, i: usize) -> bool {
        let Some(e) = self.agents[i].election.as_mut() else {
            return false;
        };
        let mut out = Vec::new();
        while let Some(t) = e.poll_transmit() {
            out.push(t);
        }
        let mut events = Vec::new();
        while let Some(ev) = e.poll_event() {
            events.push(ev);
        }
        let more = !out.is_empty() || !events.is_empty();
        for t in out {
            self.send(i, CONTROL, t);
        }
        for ev in events {
            self.on_election(i, ev);
        }
        more
    }

    fn on_election(&mut self, i: usize, ev: ElectionEvent) {
        let now = self.net.now;
        let a = &mut self.agents[i];
        match ev {
            ElectionEvent::Elected { session, start, .. } => {
                if !matches!(a.phase, Phase::Electing | Phase::Receive(_)) {
                    return;
                }
                a.elected += 1;
                // What the subnet already holds comes from peers; only the
                // rest from the origin.
                self.start_repair(i, AfterRepair::Represent { session, start });
            }
            ElectionEvent::Follow {
                representative,
                session,
                start,
                ..
            } => {
                if matches!(a.phase, Phase::Done | Phase::Repair { .. }) {
                    return;
                }
                a.following = Some((representative, start));
                if let Phase::Receive(rx) = &mut a.phase {
                    a.leftovers.extend(rx.take_collectors());
                }
                let wait = start.saturating_duration_since(now);
                let rx = Receiver::new(
                    now,
                    ReceiverConfig {
                        receiver_id: a.node,
                        session: Some(session),
                        idle_timeout: wait + Duration::from_secs(5),
                        ..ReceiverConfig::default()
                    },
                );
                a.phase = Phase::Receive(Box::new(rx));
            }
            ElectionEvent::RepresentativeLost { representative } => {
                if let Phase::Receive(rx) = &mut a.phase {
                    a.leftovers.extend(rx.take_collectors());
                    let since = a
                        .following
                        .map_or(Duration::ZERO, |(_, s)| now.saturating_duration_since(s));
                    let end = flow::lost_representative_ends(rx.session().is_none(), since);
                    if self.after_session(i, representative, end) {
                        return;
                    }
                }
                // Stand on what is held now.
                let a = &mut self.agents[i];
                let mut standing = a.standing;
                standing.held_permille = a.held_permille();
                if let Some(e) = a.election.as_mut() {
                    e.set_standing(standing);
                }
            }
            ElectionEvent::SteppedDown => {
                if matches!(a.phase, Phase::Represent(_)) {
                    a.phase = Phase::Electing;
                }
            }
        }
    }

    /// Agent `i`'s session from `representative` ended so: what the
    /// agent's task flow does next ([`flow::after_session`]), done here.
    /// Whether it left the election (for peers and the origin, or done).
    pub(super) fn after_session(&mut self, i: usize, representative: u64, end: SessionEnd) -> bool {
        let now = self.net.now;
        let a = &mut self.agents[i];
        let holds =
            end == SessionEnd::NoShow && holds_some(&a.presence, &self.pkg.content, representative);
        match flow::after_session(end, SiteKind::Wired, holds) {
            Next::Done => {
                self.finish(i);
                true
            }
            // The simulated peers do not stall: what none holds comes from
            // the origin either way.
            Next::PeersThenOrigin | Next::PeersOnly { .. } => {
                a.election = None;
                self.start_repair(i, AfterRepair::Origin);
                true
            }
            Next::Elect { abandon } => {
                a.phase = Phase::Electing;
                if abandon && let Some(e) = a.election.as_mut() {
                    e.abandon(now, representative);
                }
                false
            }
        }
    }

    /// Agent `i` holds block `b`, verified: it says so in its next
    /// announcement.
    fn block_done(&mut self, i: usize, b: u32) {
        let a = &mut self.agents[i];
        if a.done[b as usize] {
            return;
        }
        a.done[b as usize] = true;
        let mut have: Vec<[u32; 2]> = Vec::new();
        for (k, d) in a.done.iter().enumerate() {
            let k = k as u32;
            match have.last_mut() {
                Some(r) if *d && r[1] == k => r[1] = k + 1,
                _ if *d => have.push([k, k + 1]),
                _ => {}
            }
        }
        let mut me = a.presence.local().clone();
        me.held = vec![Held {
            content: self.pkg.content[..8].try_into().expect("8 bytes"),
            blocks_done: a.held(),
            block_count: a.done.len() as u32,
            have,
        }];
        a.presence.set_local(me);
    }

    fn finish(&mut self, i: usize) {
        let now = self.net.now;
        let a = &mut self.agents[i];
        assert!(
            a.done.iter().all(|d| *d),
            "agent {i} done without every block"
        );
        a.phase = Phase::Done;
        a.completed_at = Some(now);
        // The task is over here: its election ends with it.
        a.election = None;
    }

    /// Agents whose election says they represent, and are alive.
    pub fn live_representatives(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| !self.net.is_silenced(i))
            .filter(|&i| {
                self.agents[i]
                    .election
                    .as_ref()
                    .is_some_and(|e| e.role() == ElectionRole::Representative)
            })
            .collect()
    }

    /// A digest of the run's outcome: the same seed must give the same.
    pub fn fingerprint(&self) -> Digest {
        let mut s = Vec::new();
        for a in &self.agents {
            let t = a.completed_at.map_or(0, |t| (t - self.net.t0).as_nanos());
            s.extend_from_slice(&t.to_le_bytes());
            s.extend_from_slice(&a.origin_bytes.to_le_bytes());
            s.extend_from_slice(&a.peer_bytes.to_le_bytes());
            s.extend_from_slice(&a.multicast_blocks.to_le_bytes());
            s.extend_from_slice(&a.elected.to_le_bytes());
        }
        sha256(&s)
    }
}

/// Whether presence says `node` (confirmed) holds blocks of `content`.
fn holds_some(presence: &Presence, content: &Digest, node: u64) -> bool {
    presence.peers().any(|p| {
        p.node() == node
            && p.confirmed()
            && p.announce
                .held
                .iter()
                .any(|h| h.content == content[..8] && h.blocks_done > 0)
    })
}

fn data_group(content: &Digest) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(239, 193, content[0], content[1].max(1)), DATA)
}

/// The address of agent `i`'s repair server.
pub fn repair_addr(i: usize) -> SocketAddr {
    SocketAddr::new(addr_of(i).into(), REPAIR)
}
