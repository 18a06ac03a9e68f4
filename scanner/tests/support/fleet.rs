//! A simulated subnet of presence agents with a virtual clock and seeded
//! loss: every datagram is delivered (or lost) per receiver, after a small
//! random latency. Shared by the fleet tests and the presence benchmark.

#![allow(dead_code)] // each user takes what it needs

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use scanner::{Dest, LocalNode, Presence, PresenceConfig, PresenceEvent};

/// Ethernet + IPv4 + UDP headers: what a datagram costs beyond its payload.
pub const WIRE_OVERHEAD: u64 = 14 + 20 + 8;

enum Wake {
    Timer(usize),
    Deliver {
        to: usize,
        from: SocketAddr,
        bytes: std::rc::Rc<Vec<u8>>,
    },
}

pub struct Fleet {
    pub agents: Vec<Presence>,
    pub silenced: Vec<bool>,
    pub now: Instant,
    pub t0: Instant,
    /// Probability that one receiver loses one datagram (group or unicast).
    pub loss: f64,
    /// Bytes each agent put on the wire, headers included.
    pub wire_bytes: Vec<u64>,
    pub events: Vec<(Instant, usize, PresenceEvent)>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    wakes: std::collections::HashMap<u64, Wake>,
    next_id: u64,
    rng: multicast::rng::SplitMix64,
}

pub fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250 + 1) as u8], 7479))
}

fn index_of(addr: SocketAddr) -> Option<usize> {
    match addr {
        SocketAddr::V4(a) => {
            let o = a.ip().octets();
            Some(o[2] as usize * 250 + o[3] as usize - 1)
        }
        SocketAddr::V6(_) => None,
    }
}

impl Fleet {
    /// `n` agents started together at the fleet's time zero.
    pub fn new(n: usize, cfg: PresenceConfig, loss: f64, seed: u64) -> Self {
        let t0 = Instant::now();
        let mut fleet = Fleet {
            agents: Vec::with_capacity(n),
            silenced: vec![false; n],
            now: t0,
            t0,
            loss,
            wire_bytes: vec![0; n],
            events: Vec::new(),
            queue: BinaryHeap::new(),
            wakes: std::collections::HashMap::new(),
            next_id: 0,
            rng: multicast::rng::SplitMix64(seed ^ 0xA076_1D64_78BD_642F),
        };
        for i in 0..n {
            let me = LocalNode {
                node: 1000 + i as u64,
                version: "0.1.0".into(),
                api_port: 7480,
                ..LocalNode::default()
            };
            let p = Presence::new(cfg.clone(), me, None, t0, seed.wrapping_add(i as u64));
            let at = p.poll_timeout().expect("presence always has a timer");
            fleet.agents.push(p);
            fleet.push(at, Wake::Timer(i));
        }
        fleet
    }

    fn push(&mut self, at: Instant, wake: Wake) {
        let id = self.next_id;
        self.next_id += 1;
        self.wakes.insert(id, wake);
        self.queue.push(Reverse((at, id)));
    }

    fn next_random(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn lost(&mut self) -> bool {
        self.loss > 0.0 && (self.next_random() >> 11) as f64 / (1u64 << 53) as f64 <= self.loss
    }

    fn latency(&mut self) -> Duration {
        Duration::from_micros(200 + self.next_random() % 1800)
    }

    /// Runs the virtual clock up to `until`.
    pub fn run_until(&mut self, until: Instant) {
        while let Some(Reverse((at, id))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            let wake = self.wakes.remove(&id).expect("every queued id has a wake");
            self.now = at;
            match wake {
                Wake::Timer(i) => {
                    if self.silenced[i] {
                        continue;
                    }
                    self.agents[i].handle_timeout(at);
                    let next = self.agents[i]
                        .poll_timeout()
                        .expect("presence always has a timer");
                    self.push(next.max(at + Duration::from_micros(1)), Wake::Timer(i));
                    self.flush(i);
                }
                Wake::Deliver { to, from, bytes } => {
                    if self.silenced[to] {
                        continue;
                    }
                    // Deliveries only push deadlines later, so the agent's
                    // scheduled timer stays valid (at worst early).
                    self.agents[to].handle_datagram(at, from, &bytes);
                    self.flush(to);
                }
            }
        }
        self.now = until;
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    fn flush(&mut self, i: usize) {
        while let Some(ev) = self.agents[i].poll_event() {
            self.events.push((self.now, i, ev));
        }
        let from = addr_of(i);
        while let Some(t) = self.agents[i].poll_transmit() {
            self.wire_bytes[i] += t.bytes.len() as u64 + WIRE_OVERHEAD;
            let bytes = std::rc::Rc::new(t.bytes);
            match t.dest {
                Dest::Group => {
                    for to in 0..self.agents.len() {
                        // Loopback of one's own group traffic is on, as on
                        // a real host; the agent must ignore it.
                        if self.lost() {
                            continue;
                        }
                        let at = self.now + self.latency();
                        let bytes = bytes.clone();
                        self.push(at, Wake::Deliver { to, from, bytes });
                    }
                }
                Dest::To(addr) => {
                    let Some(to) = index_of(addr).filter(|&t| t < self.agents.len()) else {
                        continue;
                    };
                    if self.lost() {
                        continue;
                    }
                    let at = self.now + self.latency();
                    self.push(at, Wake::Deliver { to, from, bytes });
                }
            }
        }
    }

    /// Stops an agent dead: it neither sends nor hears anything more.
    pub fn silence(&mut self, i: usize) {
        self.silenced[i] = true;
    }

    /// Node ids in agent `i`'s table.
    pub fn table(&self, i: usize) -> HashSet<u64> {
        self.agents[i].peers().map(|p| p.node()).collect()
    }

    /// Node ids of every live agent but `i`.
    pub fn expected(&self, i: usize) -> HashSet<u64> {
        (0..self.agents.len())
            .filter(|&j| j != i && !self.silenced[j])
            .map(|j| self.agents[j].node())
            .collect()
    }

    /// Live agents whose table is not exactly every other live agent.
    pub fn unconverged(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| !self.silenced[i] && self.table(i) != self.expected(i))
            .collect()
    }

    /// How many times any agent dropped a peer that was not silenced.
    pub fn false_departures(&self) -> usize {
        self.events
            .iter()
            .filter(|(_, _, ev)| match ev {
                PresenceEvent::Left { node, .. } => {
                    let j = (*node - 1000) as usize;
                    !self.silenced[j]
                }
                _ => false,
            })
            .count()
    }
}
