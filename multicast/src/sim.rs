//! A simulated subnet for the sans-IO machines: nodes at addresses
//! `10.x.y.z`, a virtual clock, seeded loss and latency per receiver, one
//! timer per node, and reliable exchanges (a TCP request and its answer)
//! delivered after a delay. Deterministic per seed: the same seed gives the
//! same run, datagram for datagram.
//!
//! What runs on each node is the test's: it takes the next [`Wake`] from
//! [`Net::next`], hands it to its machines, sends what they transmit with
//! [`Net::multicast`] / [`Net::unicast`], and asks for its next timer with
//! [`Net::wake_at`]. Shared by the presence fleet tests (`scanner/`), the
//! session and rate-control tests (`multicast/tests/`), the election tests
//! and the whole-subnet tests of the agent (the root package).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::codec::{Plan, pad_block};
use crate::rng::SplitMix64;
use crate::sender::{EncodeJob, EncodedBatch};

/// Ethernet + IPv4 + UDP headers: what a datagram costs beyond its payload.
pub const WIRE_OVERHEAD: u64 = 14 + 20 + 8;

/// What happens next on the subnet.
#[derive(Debug)]
pub enum Wake {
    /// Node `.0`'s timer is due.
    Timer(usize),
    /// A datagram arrives.
    Datagram(Datagram),
    /// A reliable exchange node `to` started ends now: `token` is the
    /// test's, to tell which.
    Reply { to: usize, token: u64 },
}

/// A datagram arriving at node `to`.
#[derive(Debug)]
pub struct Datagram {
    pub to: usize,
    pub from: SocketAddr,
    /// The port it was sent to (which machine of the node takes it).
    pub port: u16,
    pub bytes: Rc<[u8]>,
}

/// What the queue holds: one entry per group datagram (every receiver
/// hears it at the same instant, as through one switch; each loses it on
/// its own), so a datagram to a thousand nodes costs one queue entry.
enum Due {
    Wake(Wake),
    Group {
        from: SocketAddr,
        port: u16,
        bytes: Rc<[u8]>,
        to: Vec<u32>,
    },
}

struct Entry {
    at: Instant,
    seq: u64,
    due: Due,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// The subnet.
pub struct Net {
    /// The virtual clock.
    pub now: Instant,
    /// When the run began.
    pub t0: Instant,
    /// Probability that one receiver loses one datagram (unless it has a
    /// loss of its own, [`Net::set_loss`]).
    pub loss: f64,
    /// Each node's own loss, where it has one.
    node_loss: Vec<Option<f64>>,
    /// One-way latency: the least, and the spread above it (random).
    latency: (Duration, Duration),
    /// Bytes each node put on the wire, headers included.
    pub wire_bytes: Vec<u64>,
    silenced: Vec<bool>,
    /// Each node's next timer, and whether it is queued.
    timers: Vec<Option<Instant>>,
    queue: BinaryHeap<Reverse<Entry>>,
    /// A group datagram being handed out, receiver by receiver.
    handing: Option<(Datagram, std::vec::IntoIter<u32>)>,
    seq: u64,
    rng: SplitMix64,
}

/// The address of node `i`: 250 to a /24, from 10.1.0.1 on.
pub fn addr_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        1 + (i / 62_500) as u8,
        (i / 250 % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

/// The node at `ip`, if it is one of [`addr_of`]'s.
pub fn index_of(ip: IpAddr) -> Option<usize> {
    let IpAddr::V4(ip) = ip else { return None };
    let [ten, a, b, c] = ip.octets();
    (ten == 10 && a >= 1 && b < 250 && (1..=250).contains(&c))
        .then(|| (a as usize - 1) * 62_500 + b as usize * 250 + c as usize - 1)
}

impl Net {
    /// A subnet of `nodes` nodes at time zero.
    pub fn new(nodes: usize, loss: f64, seed: u64) -> Self {
        let t0 = Instant::now();
        Self {
            now: t0,
            t0,
            loss,
            node_loss: vec![None; nodes],
            latency: (Duration::from_micros(200), Duration::from_micros(1800)),
            wire_bytes: vec![0; nodes],
            silenced: vec![false; nodes],
            timers: vec![None; nodes],
            queue: BinaryHeap::new(),
            handing: None,
            seq: 0,
            rng: SplitMix64(seed ^ 0xA076_1D64_78BD_642F),
        }
    }

    pub fn nodes(&self) -> usize {
        self.silenced.len()
    }

    /// One more node (the next index).
    pub fn add_node(&mut self) -> usize {
        self.node_loss.push(None);
        self.wire_bytes.push(0);
        self.silenced.push(false);
        self.timers.push(None);
        self.nodes() - 1
    }

    /// Node `i` loses `loss` of what it is sent, whatever the subnet's.
    pub fn set_loss(&mut self, i: usize, loss: f64) {
        self.node_loss[i] = Some(loss);
    }

    /// Every datagram takes from `least` to `most` to arrive (random in
    /// between; exactly `least` when they are equal). The default is 0.2
    /// to 2 ms.
    pub fn set_latency(&mut self, least: Duration, most: Duration) {
        self.latency = (least, most.saturating_sub(least));
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// The subnet's random numbers (for the test's own choices, so a run
    /// stays one function of its seed).
    pub fn rng(&mut self) -> &mut SplitMix64 {
        &mut self.rng
    }

    fn push(&mut self, at: Instant, wake: Wake) {
        self.push_due(at, Due::Wake(wake));
    }

    fn push_due(&mut self, at: Instant, due: Due) {
        self.seq += 1;
        self.queue.push(Reverse(Entry {
            at,
            seq: self.seq,
            due,
        }));
    }

    /// Whether node `to` loses the datagram it is being sent.
    fn lost(&mut self, to: usize) -> bool {
        let loss = self.node_loss[to].unwrap_or(self.loss);
        loss > 0.0 && self.rng.unit() < loss
    }

    fn latency(&mut self) -> Duration {
        let (least, spread) = self.latency;
        let spread = spread.as_micros() as u64;
        if spread == 0 {
            return least;
        }
        least + Duration::from_micros(self.rng.next_u64() % spread)
    }

    /// Node `i` wants its timer at `at` (its machines' earliest
    /// `poll_timeout`): kept if earlier than the one it has. A timer that
    /// fires before anything is due does no harm; the node asks again.
    pub fn wake_at(&mut self, i: usize, at: Option<Instant>) {
        let Some(at) = at else { return };
        // Never in the past: a machine that asks for "now" again after its
        // timeout ran must not stop the clock.
        let at = at.max(self.now + Duration::from_micros(1));
        if self.timers[i].is_none_or(|t| at < t) {
            self.timers[i] = Some(at);
            self.push(at, Wake::Timer(i));
        }
    }

    /// Node `from` sends `bytes` to a group on `port`, heard by each of `to`
    /// (its own loopback included, if listed) unless lost.
    pub fn multicast(
        &mut self,
        from: usize,
        port: u16,
        bytes: Vec<u8>,
        to: impl IntoIterator<Item = usize>,
    ) {
        self.multicast_at(self.now, from, port, bytes, to);
    }

    /// [`Net::multicast`], sent at `at` (now or later): a schedule of
    /// datagrams from outside the machines (a forger's).
    pub fn multicast_at(
        &mut self,
        at: Instant,
        from: usize,
        port: u16,
        bytes: Vec<u8>,
        to: impl IntoIterator<Item = usize>,
    ) {
        self.wire_bytes[from] += bytes.len() as u64 + WIRE_OVERHEAD;
        let at = at.max(self.now) + self.latency();
        let due = Due::Group {
            from: SocketAddr::new(addr_of(from).into(), port),
            port,
            bytes: bytes.into(),
            to: to.into_iter().map(|t| t as u32).collect(),
        };
        self.push_due(at, due);
    }

    /// Node `from` sends `bytes` from its `port` to one address, unless
    /// lost; addresses that are no node's go nowhere.
    pub fn unicast(&mut self, from: usize, port: u16, to: SocketAddr, bytes: Vec<u8>) {
        self.wire_bytes[from] += bytes.len() as u64 + WIRE_OVERHEAD;
        let Some(t) = index_of(to.ip()).filter(|&t| t < self.nodes()) else {
            return;
        };
        if self.lost(t) {
            return;
        }
        let at = self.now + self.latency();
        let d = Datagram {
            to: t,
            from: SocketAddr::new(addr_of(from).into(), port),
            port: to.port(),
            bytes: bytes.into(),
        };
        self.push(at, Wake::Datagram(d));
    }

    /// A reliable exchange of node `to` ends at `at` (the test computes
    /// when, from the bytes and the link).
    pub fn reply(&mut self, at: Instant, to: usize, token: u64) {
        self.push(at, Wake::Reply { to, token });
    }

    /// Stops node `i` dead: it neither hears nor wakes any more.
    pub fn silence(&mut self, i: usize) {
        self.silenced[i] = true;
    }

    pub fn is_silenced(&self, i: usize) -> bool {
        self.silenced[i]
    }

    /// The next thing that happens no later than `until`, with the clock
    /// set to it; `None` (the clock at `until`) when nothing does.
    pub fn next(&mut self, until: Instant) -> Option<Wake> {
        loop {
            if let Some(d) = self.hand_out() {
                return Some(Wake::Datagram(d));
            }
            let Some(Reverse(e)) = self.queue.peek() else {
                break;
            };
            if e.at > until {
                break;
            }
            let Reverse(Entry { at, due, .. }) = self.queue.pop().expect("peeked");
            self.now = at;
            let wake = match due {
                Due::Wake(w) => w,
                Due::Group {
                    from,
                    port,
                    bytes,
                    to,
                } => {
                    let d = Datagram {
                        to: 0,
                        from,
                        port,
                        bytes,
                    };
                    self.handing = Some((d, to.into_iter()));
                    continue;
                }
            };
            let to = match &wake {
                Wake::Timer(i) => {
                    if self.timers[*i] != Some(at) {
                        continue; // replaced by an earlier one
                    }
                    self.timers[*i] = None;
                    *i
                }
                Wake::Datagram(d) => d.to,
                Wake::Reply { to, .. } => *to,
            };
            if self.silenced[to] {
                continue;
            }
            return Some(wake);
        }
        self.now = self.now.max(until);
        None
    }

    /// The group datagram being handed out, to its next receiver that
    /// hears it.
    fn hand_out(&mut self) -> Option<Datagram> {
        loop {
            let (d, to) = self.handing.as_mut()?;
            let Some(t) = to.next() else {
                self.handing = None;
                return None;
            };
            let t = t as usize;
            let (from, port, bytes) = (d.from, d.port, d.bytes.clone());
            if self.silenced[t] || self.lost(t) {
                continue;
            }
            return Some(Datagram {
                to: t,
                from,
                port,
                bytes,
            });
        }
    }
}

/// What a sender's encoder makes of `job` for the file `data`: the
/// padded block when asked for, and the repair symbols, in one batch (the
/// hashes are the sender's own, given up front).
pub fn encode(plan: &Plan, data: &[u8], job: &EncodeJob) -> EncodedBatch {
    let layout = plan.layout();
    let at = layout.offset(job.block) as usize;
    let padded = pad_block(
        &layout,
        job.block,
        &data[at..at + layout.block_len(job.block)],
    );
    let repair = if job.repair_count > 0 {
        plan.encoder(&padded)
            .repair(job.repair_first_esi, job.repair_count)
    } else {
        Vec::new()
    };
    EncodedBatch {
        block: job.block,
        source: job.with_source.then_some(padded),
        repair_first_esi: job.repair_first_esi,
        repair,
        more: false,
        hashes: Vec::new(),
        file_sha256: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for i in [0, 1, 249, 250, 999, 62_499, 62_500, 100_000] {
            assert_eq!(index_of(addr_of(i).into()), Some(i), "node {i}");
        }
        assert_eq!(index_of(Ipv4Addr::new(192, 168, 1, 1).into()), None);
    }

    #[test]
    fn a_node_added_has_its_own_loss_and_a_fixed_latency_is_exact() {
        let mut net = Net::new(1, 0.5, 2);
        net.set_latency(Duration::from_micros(200), Duration::from_micros(200));
        let deaf = net.add_node();
        let clear = net.add_node();
        assert_eq!((deaf, clear, net.nodes()), (1, 2, 3));
        net.set_loss(deaf, 1.0);
        net.set_loss(clear, 0.0);
        let t0 = net.now;
        for i in 0..100u8 {
            net.multicast(0, 7, vec![i], [deaf, clear]);
        }
        let mut heard = 0;
        while let Some(w) = net.next(t0 + Duration::from_secs(1)) {
            let Wake::Datagram(d) = w else {
                panic!("only datagrams were sent")
            };
            assert_eq!(d.to, clear, "the node that loses everything heard one");
            assert_eq!(net.now - t0, Duration::from_micros(200));
            heard += 1;
        }
        // The subnet's 50% is not theirs.
        assert_eq!(heard, 100);
    }

    #[test]
    fn timers_keep_the_earliest_and_silenced_nodes_hear_nothing() {
        let mut net = Net::new(3, 0.0, 1);
        let t0 = net.now;
        net.wake_at(0, Some(t0 + Duration::from_secs(2)));
        net.wake_at(0, Some(t0 + Duration::from_secs(1)));
        net.wake_at(1, Some(t0 + Duration::from_secs(3)));
        net.multicast(2, 7, vec![1, 2, 3], [0, 1, 2]);
        net.silence(1);
        let mut seen = Vec::new();
        while let Some(w) = net.next(t0 + Duration::from_secs(10)) {
            seen.push(match w {
                Wake::Timer(i) => format!("timer {i}"),
                Wake::Datagram(d) => format!("datagram to {} from {}", d.to, d.from),
                Wake::Reply { to, .. } => format!("reply {to}"),
            });
        }
        // The datagram to each listener but the silenced one, then the
        // earlier timer only.
        assert_eq!(
            seen,
            [
                "datagram to 0 from 10.1.0.3:7",
                "datagram to 2 from 10.1.0.3:7",
                "timer 0"
            ]
        );
        assert_eq!(net.now, t0 + Duration::from_secs(10));
    }

    #[test]
    fn loss_is_seeded() {
        let run = |seed| {
            let mut net = Net::new(2, 0.3, seed);
            for _ in 0..200 {
                net.multicast(0, 1, vec![0], [1]);
            }
            std::iter::from_fn(|| net.next(net.t0 + Duration::from_secs(1))).count()
        };
        assert_eq!(run(5), run(5));
        let heard = run(5);
        assert!(
            (110..170).contains(&heard),
            "about 70% of 200 heard: {heard}"
        );
    }
}
