//! A simulated subnet of presence agents with a virtual clock and seeded
//! loss: every datagram is delivered (or lost) per receiver, after a small
//! random latency. Shared by the fleet tests and the presence benchmark.

#![allow(dead_code)] // each user takes what it needs

use std::collections::HashSet;
use std::time::{Duration, Instant};

use multicast::sim::{Net, Wake};
use scanner::{Dest, LocalNode, Presence, PresenceConfig, PresenceEvent};

/// The presence port.
const PORT: u16 = 7479;

pub struct Fleet {
    pub agents: Vec<Presence>,
    pub net: Net,
    pub events: Vec<(Instant, usize, PresenceEvent)>,
}

impl Fleet {
    /// `n` agents started together at the fleet's time zero.
    pub fn new(n: usize, cfg: PresenceConfig, loss: f64, seed: u64) -> Self {
        let mut net = Net::new(n, loss, seed);
        let t0 = net.t0;
        let mut agents = Vec::with_capacity(n);
        for i in 0..n {
            let me = LocalNode {
                node: 1000 + i as u64,
                version: "0.1.0".into(),
                api_port: 7480,
                ..LocalNode::default()
            };
            let p = Presence::new(cfg.clone(), me, None, t0, seed.wrapping_add(i as u64));
            net.wake_at(i, p.poll_timeout());
            agents.push(p);
        }
        Fleet {
            agents,
            net,
            events: Vec::new(),
        }
    }

    /// Bytes each agent put on the wire, headers included.
    pub fn wire_bytes(&self) -> &[u64] {
        &self.net.wire_bytes
    }

    /// Runs the virtual clock up to `until`.
    pub fn run_until(&mut self, until: Instant) {
        while let Some(wake) = self.net.next(until) {
            let now = self.net.now;
            let i = match wake {
                Wake::Timer(i) => {
                    self.agents[i].handle_timeout(now);
                    i
                }
                Wake::Datagram(d) => {
                    self.agents[d.to].handle_datagram(now, d.from, &d.bytes);
                    d.to
                }
                Wake::Reply { to, .. } => to,
            };
            self.flush(i);
            self.net.wake_at(i, self.agents[i].poll_timeout());
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.net.now + d;
        self.run_until(until);
    }

    fn flush(&mut self, i: usize) {
        while let Some(ev) = self.agents[i].poll_event() {
            self.events.push((self.net.now, i, ev));
        }
        let n = self.agents.len();
        while let Some(t) = self.agents[i].poll_transmit() {
            match t.dest {
                // Loopback of one's own group traffic is on, as on a real
                // host; the agent must ignore it.
                Dest::Group => self.net.multicast(i, PORT, t.bytes, 0..n),
                Dest::To(addr) => self.net.unicast(i, PORT, addr, t.bytes),
            }
        }
    }

    /// Stops an agent dead: it neither sends nor hears anything more.
    pub fn silence(&mut self, i: usize) {
        self.net.silence(i);
    }

    /// Node ids in agent `i`'s table.
    pub fn table(&self, i: usize) -> HashSet<u64> {
        self.agents[i].peers().map(|p| p.node()).collect()
    }

    /// Node ids of every live agent but `i`.
    pub fn expected(&self, i: usize) -> HashSet<u64> {
        (0..self.agents.len())
            .filter(|&j| j != i && !self.net.is_silenced(j))
            .map(|j| self.agents[j].node())
            .collect()
    }

    /// Live agents whose table is not exactly every other live agent.
    pub fn unconverged(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| !self.net.is_silenced(i) && self.table(i) != self.expected(i))
            .collect()
    }

    /// How many times any agent dropped a peer that was not silenced.
    pub fn false_departures(&self) -> usize {
        self.events
            .iter()
            .filter(|(_, _, ev)| match ev {
                PresenceEvent::Left { node, .. } => {
                    let j = (*node - 1000) as usize;
                    !self.net.is_silenced(j)
                }
                _ => false,
            })
            .count()
    }
}
