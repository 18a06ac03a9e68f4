//! Sender and receivers over the shared simulated subnet
//! ([`multicast::sim::Net`]: a virtual clock, seeded loss per receiver, one
//! timer per node): the protocol logic without sockets, deterministically.
//! The sender is node 0, receiver `i` node `i + 1`; each runs when its
//! timer is due or a datagram reaches it. Shared by the session tests
//! (`sim.rs`) and the rate controller's (`rate_sim.rs`).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use multicast::codec::{Layout, Plan, sha256};
use multicast::receiver::{
    BlockResult, DecodeJob, DecodeOutcome, Receiver, ReceiverConfig, ReceiverEvent,
};
use multicast::sender::{EncodedBatch, Sender, SenderConfig, SenderObject};
use multicast::sim::{Datagram, Net, Wake, addr_of};

/// One switch between every node and the next: each datagram arrives this
/// long after it left (or left a receiver's bottleneck [`Link`]).
pub const LINK_DELAY: Duration = Duration::from_micros(200);
/// The sender's node on the subnet.
const SENDER: usize = 0;
/// The session's port: data to the group from it, feedback to it.
const PORT: u16 = 5000;
/// Longest a live node sleeps: the sender's pause starts and ends on time,
/// and every receiver looks at its decode queue.
const TICK: Duration = Duration::from_millis(10);

/// Receiver `i`'s node.
fn node_of(receiver: usize) -> usize {
    receiver + 1
}

pub use multicast::rng::SplitMix64 as Rng;

pub fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

pub struct SimReceiver {
    pub rx: Receiver,
    pub file: Vec<u8>,
    pub loss: f64,
    pub joins_at: Instant,
    pub outcome: Option<Result<(), String>>,
    pub max_buffered: usize,
    /// How long a decode job takes, in virtual time: a slow CPU.
    pub decode_delay: Duration,
    pub decoding: VecDeque<(Instant, DecodeJob)>,
    /// Drops the datagrams it returns true for, besides random loss.
    pub drop: Option<DropFilter>,
    /// The link in front of it, when it is a bottleneck.
    pub link: Option<Link>,
    /// When its outcome came.
    pub done_at: Option<Instant>,
}

/// A bottleneck link in front of one receiver: a FIFO queue of at most
/// `queue_bytes` served at `rate_bps`, which other traffic of
/// `cross_bps` (while `cross` says so) shares.
pub struct Link {
    pub rate_bps: f64,
    pub queue_bytes: f64,
    pub cross_bps: f64,
    /// Virtual seconds since the start during which the cross traffic runs.
    pub cross: std::ops::Range<f64>,
    /// When the queue empties.
    busy_until: Option<Instant>,
    /// When cross traffic was last added to the queue.
    cross_at: Option<Instant>,
    /// Datagrams dropped because the queue was full.
    pub drops: u64,
}

impl Link {
    pub fn new(rate_bps: f64, queue: Duration) -> Self {
        Self {
            rate_bps,
            queue_bytes: rate_bps / 8.0 * queue.as_secs_f64(),
            cross_bps: 0.0,
            cross: 0.0..0.0,
            busy_until: None,
            cross_at: None,
            drops: 0,
        }
    }

    /// When a datagram of `len` bytes that reaches the link at `now`
    /// leaves it, or `None` when the queue is full.
    fn pass(&mut self, start: Instant, now: Instant, len: usize) -> Option<Instant> {
        let secs = |bytes: f64| Duration::from_secs_f64(bytes * 8.0 / self.rate_bps);
        let mut busy = self.busy_until.unwrap_or(now).max(now);
        // Cross traffic that arrived since the last datagram joins the
        // queue first (as much as fits).
        let since = self.cross_at.unwrap_or(now);
        let t = since.saturating_duration_since(start).as_secs_f64();
        if self.cross.contains(&t) {
            let arrived = self.cross_bps / 8.0 * now.saturating_duration_since(since).as_secs_f64();
            let backlog = busy.saturating_duration_since(now).as_secs_f64() * self.rate_bps / 8.0;
            let room = (self.queue_bytes - backlog).max(0.0);
            busy += secs(arrived.min(room));
        }
        self.cross_at = Some(now);
        let bytes = (len + 42) as f64;
        let backlog = busy.saturating_duration_since(now).as_secs_f64() * self.rate_bps / 8.0;
        if backlog + bytes > self.queue_bytes {
            self.busy_until = Some(busy);
            self.drops += 1;
            return None;
        }
        busy += secs(bytes);
        self.busy_until = Some(busy);
        Some(busy)
    }
}

/// Picks datagrams a receiver loses on purpose.
pub type DropFilter = Box<dyn FnMut(&[u8]) -> bool>;

/// Sees every datagram the sender sends and returns extra ones to inject.
pub type Tamper = Box<dyn FnMut(&mut Rng, &[u8]) -> Vec<Vec<u8>>>;

pub struct Sim {
    pub now: Instant,
    pub start: Instant,
    pub rng: Rng,
    pub data: Vec<u8>,
    pub plan: Plan,
    pub sender: Sender,
    pub receivers: Vec<SimReceiver>,
    /// The subnet: what is in flight, the timers, the loss.
    pub net: Net,
    /// Called on every datagram the sender puts on the wire; may add more.
    pub tamper: Tamper,
    /// The sender's rate each time it changed, by virtual time.
    pub rate_log: Vec<(Duration, u64)>,
    /// Virtual seconds during which the sender is paused.
    pub pause: std::ops::Range<f64>,
    /// When each DATA datagram went out, by virtual time.
    pub data_sent: Vec<Duration>,
    /// Repair symbols of a first-pass block, handed over a step after its
    /// source symbols, as the real encoder does once it has encoded them.
    pub owed: Vec<EncodedBatch>,
    /// For a sender not given the hashes: the blocks the encoder has
    /// hashed, and the next one the whole-file hash needs.
    pub learning: Option<(Vec<bool>, u32)>,
}

impl Sim {
    pub fn new(data: Vec<u8>, block: u32, t: u16, cfg: SenderConfig, seed: u64) -> Self {
        Self::with_hashes(data, block, t, cfg, seed, true)
    }

    /// A sender that is given every hash up front (`given`), or that learns
    /// them from its encoder as it reads the file, as `somcast send` does.
    pub fn with_hashes(
        data: Vec<u8>,
        block: u32,
        t: u16,
        cfg: SenderConfig,
        seed: u64,
        given: bool,
    ) -> Self {
        let layout = Layout::for_file(data.len() as u64, block, t).unwrap();
        let hashes = (0..layout.block_count())
            .map(|b| {
                let at = layout.offset(b) as usize;
                given.then(|| sha256(&data[at..at + layout.block_len(b)]))
            })
            .collect();
        let mut net = Net::new(1, 0.0, seed);
        net.set_latency(LINK_DELAY, LINK_DELAY);
        let now = net.now;
        let sender = Sender::new(
            now,
            cfg,
            0x5EED ^ seed,
            SenderObject {
                layout,
                hashes,
                file_sha256: given.then(|| sha256(&data)),
                name: "sim.bin".into(),
            },
            5000,
        );
        Self {
            now,
            start: now,
            rng: Rng(seed),
            plan: Plan::new(layout),
            data,
            sender,
            receivers: Vec::new(),
            owed: Vec::new(),
            learning: (!given).then(|| (vec![false; layout.block_count() as usize], 0)),
            net,
            tamper: Box::new(|_, _| Vec::new()),
            rate_log: Vec::new(),
            pause: 0.0..0.0,
            data_sent: Vec::new(),
        }
    }

    pub fn add_receiver(&mut self, loss: f64, joins_after: Duration, max_buffered: u64) -> usize {
        let cfg = ReceiverConfig {
            receiver_id: 100 + self.receivers.len() as u64,
            max_buffered_bytes: max_buffered,
            idle_timeout: Duration::from_secs(20),
            ..ReceiverConfig::default()
        };
        let node = self.net.add_node();
        debug_assert_eq!(node, node_of(self.receivers.len()));
        self.net.set_loss(node, loss);
        self.receivers.push(SimReceiver {
            rx: Receiver::new(self.now + joins_after, cfg),
            file: Vec::new(),
            loss,
            joins_at: self.now + joins_after,
            outcome: None,
            max_buffered: 0,
            decode_delay: Duration::ZERO,
            decoding: VecDeque::new(),
            drop: None,
            link: None,
            done_at: None,
        });
        self.receivers.len() - 1
    }

    /// `bytes` from the sender to every receiver: through its link, if
    /// it has one (and not at all when the link's queue is full).
    fn send_to_receivers(&mut self, bytes: &[u8]) {
        let mut plain = Vec::new();
        for i in 0..self.receivers.len() {
            match self.receivers[i].link.as_mut() {
                None => plain.push(node_of(i)),
                Some(link) => {
                    if let Some(left) = link.pass(self.start, self.now, bytes.len()) {
                        let to = [node_of(i)];
                        self.net
                            .multicast_at(left, SENDER, PORT, bytes.to_vec(), to);
                    }
                }
            }
        }
        self.net.multicast(SENDER, PORT, bytes.to_vec(), plain);
    }

    pub fn encode(&mut self, job: multicast::sender::EncodeJob) -> EncodedBatch {
        let mut batch = multicast::sim::encode(&self.plan, &self.data, &job);
        let layout = self.plan.layout();
        let at = layout.offset(job.block) as usize;
        let mut hashes = Vec::new();
        let mut file_sha256 = None;
        if let Some((known, next)) = self.learning.as_mut() {
            if !known[job.block as usize] {
                known[job.block as usize] = true;
                hashes.push((
                    job.block,
                    sha256(&self.data[at..at + layout.block_len(job.block)]),
                ));
            }
            if job.block == *next {
                *next += 1;
                if *next == layout.block_count() {
                    file_sha256 = Some(sha256(&self.data));
                }
            }
        }
        batch.hashes = hashes;
        batch.file_sha256 = file_sha256;
        batch
    }

    /// Runs until the sender finishes and every receiver is over, or `limit`.
    pub fn run(&mut self, limit: Duration) {
        let until = self.start + limit;
        self.net.wake_at(SENDER, Some(self.now));
        for i in 0..self.receivers.len() {
            let at = self.receivers[i].joins_at;
            self.net.wake_at(node_of(i), Some(at));
        }
        while let Some(wake) = self.net.next(until) {
            self.now = self.net.now;
            match wake {
                Wake::Timer(SENDER) => self.sender_turn(),
                Wake::Timer(n) => self.receiver_turn(n - 1),
                Wake::Datagram(d) if d.to == SENDER => {
                    self.sender.handle_datagram(self.now, d.from, &d.bytes);
                    self.sender_turn();
                }
                Wake::Datagram(d) => self.deliver(d),
                Wake::Reply { .. } => unreachable!("no exchanges in a session"),
            }
            if self.sender.is_finished() && self.receivers.iter().all(|r| r.outcome.is_some()) {
                return;
            }
        }
        panic!(
            "simulation did not finish within {limit:?}: sender {} {:?}; receivers {:?}",
            self.sender.debug_phase(),
            self.sender.stats(),
            self.receivers
                .iter()
                .map(|r| (
                    r.outcome.clone(),
                    r.rx.stats().clone(),
                    r.rx.missing_blocks()
                ))
                .collect::<Vec<_>>()
        );
    }

    /// The sender's turn: its timers, its encoder's batches, what it sends.
    fn sender_turn(&mut self) {
        let t = (self.now - self.start).as_secs_f64();
        self.sender.set_paused(self.pause.contains(&t));
        self.sender.handle_timeout(self.now);
        for batch in std::mem::take(&mut self.owed) {
            self.sender.handle_batch(batch);
        }
        while let Some(job) = self.sender.poll_job() {
            let mut batch = self.encode(job);
            if batch.source.is_some() && !batch.repair.is_empty() {
                self.owed.push(EncodedBatch {
                    block: batch.block,
                    source: None,
                    repair_first_esi: batch.repair_first_esi,
                    repair: std::mem::take(&mut batch.repair),
                    more: false,
                    hashes: Vec::new(),
                    file_sha256: None,
                });
                batch.more = true;
            }
            self.sender.handle_batch(batch);
        }
        let mut out = Vec::new();
        while let Some(bytes) = self.sender.poll_transmit(self.now) {
            out.push(bytes.to_vec());
        }
        for bytes in out {
            // Byte 3 is the kind; 3 is DATA.
            if bytes.get(3) == Some(&3) {
                self.data_sent.push(self.now - self.start);
            }
            let extra = (self.tamper)(&mut self.rng, &bytes);
            self.send_to_receivers(&bytes);
            for e in &extra {
                self.send_to_receivers(e);
            }
        }
        while self.sender.poll_event().is_some() {}
        let rate = self.sender.stats().rate_bps;
        if self.rate_log.last().is_none_or(|&(_, r)| r != rate) {
            self.rate_log.push((self.now - self.start, rate));
        }
        // Owed batches go in at the next turn, as the encoder's would.
        let next = match self.sender.poll_timeout() {
            _ if !self.owed.is_empty() => self.now,
            Some(t) => t.min(self.now + TICK),
            None => self.now + TICK,
        };
        self.net.wake_at(SENDER, Some(next));
    }

    /// A datagram reaches a receiver (past the subnet's loss).
    fn deliver(&mut self, d: Datagram) {
        let i = d.to - 1;
        let r = &mut self.receivers[i];
        if self.now < r.joins_at
            || r.outcome.is_some()
            || r.drop.as_mut().is_some_and(|drop| drop(&d.bytes))
        {
            return;
        }
        r.rx.handle_datagram(self.now, d.from, &d.bytes);
        r.max_buffered = r.max_buffered.max(r.rx.buffered_blocks());
        self.receiver_turn(i);
    }

    /// Receiver `i`'s turn: its timers, its decodes that are due, its
    /// events, and its feedback to the sender.
    fn receiver_turn(&mut self, i: usize) {
        let now = self.now;
        let sender_addr = SocketAddr::new(addr_of(SENDER).into(), PORT);
        let r = &mut self.receivers[i];
        if now < r.joins_at || r.outcome.is_some() {
            return;
        }
        r.rx.handle_timeout(now);
        loop {
            while let Some(job) = r.rx.poll_job() {
                r.decoding.push_back((now + r.decode_delay, job));
            }
            while r.decoding.front().is_some_and(|(t, _)| *t <= now) {
                let (_, job) = r.decoding.pop_front().expect("a job is due");
                let result = match job.run() {
                    DecodeOutcome::Verified {
                        block,
                        offset,
                        len,
                        data,
                    } => {
                        let at = offset as usize;
                        r.file[at..at + len].copy_from_slice(&data[..len]);
                        BlockResult::Written { block }
                    }
                    DecodeOutcome::NeedMore { block, collector } => {
                        BlockResult::NeedMore { block, collector }
                    }
                    DecodeOutcome::Corrupt { block } => BlockResult::Corrupt { block },
                };
                r.rx.handle_decoded(result);
            }
            let Some(event) = r.rx.poll_event() else {
                break;
            };
            match event {
                ReceiverEvent::SessionFound { info, .. } => {
                    r.file = vec![0; info.file_size as usize];
                }
                ReceiverEvent::AllBlocksWritten => {
                    let ok = Some(sha256(&r.file)) == r.rx.file_sha256();
                    r.rx.handle_file_verified(now, ok);
                }
                ReceiverEvent::Complete => {
                    r.outcome = Some(Ok(()));
                    r.done_at = Some(now);
                }
                ReceiverEvent::Failed(f) => {
                    r.outcome = Some(Err(f.to_string()));
                    r.done_at = Some(now);
                }
            }
        }
        let mut feedback = Vec::new();
        while let Some(t) = r.rx.poll_transmit() {
            assert_eq!(t.dest, multicast::transmit::Dest::To(sender_addr));
            feedback.push(t.bytes);
        }
        let mut next = None;
        if r.outcome.is_none() {
            let mut at = now + TICK;
            if let Some(t) = r.rx.poll_timeout() {
                at = at.min(t);
            }
            if let Some((t, _)) = r.decoding.front() {
                at = at.min(*t);
            }
            next = Some(at);
        }
        for bytes in feedback {
            self.net.unicast(node_of(i), PORT, sender_addr, bytes);
        }
        self.net.wake_at(node_of(i), next);
    }

    pub fn assert_all_verified(&self) {
        for (i, r) in self.receivers.iter().enumerate() {
            assert_eq!(r.outcome, Some(Ok(())), "receiver {i}");
            assert!(r.file == self.data, "receiver {i} has different bytes");
        }
    }

    /// UDP payload bytes the sender sent, over the file size.
    pub fn wire_ratio(&self) -> f64 {
        self.sender.stats().bytes as f64 / self.data.len().max(1) as f64
    }
}
