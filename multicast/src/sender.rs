//! Sender session, sans-IO.
//!
//! # Protocol flow
//!
//! 1. *Announcing*: SESSION and the block hashes go to the group each
//!    announce interval. A sender not given the hashes learns them from its
//!    encoder's first read of each block (announced at once, before the
//!    block's symbols), and the file's from the blocks in order (SESSION
//!    carries it from then on). Receivers answer JOIN (unicast, to the
//!    feedback port). With `min_receivers` the sender waits for that many
//!    joins (up to `join_timeout`); otherwise for `startup`.
//! 2. *Sending*: blocks are opened in order, as many at a time as fit in
//!    `interleave_bytes` (at least one, at most 16), and sent
//!    round robin one symbol each, so a burst of loss hits many blocks
//!    lightly. Once the last block has joined, only the two oldest take
//!    turns, so that the blocks finish apart and receivers have decoded all
//!    but the last by the end of the pass. Each block gets its K source
//!    symbols plus an overhead share of repair symbols (the larger of
//!    `--overhead` and the upper quartile of the losses receivers report;
//!    the last two blocks a little more, as every receiver decodes them at
//!    the very end). SESSION and a few hash frames are repeated each
//!    announce interval for late joiners.
//! 3. Receivers report NEEDS every feedback interval: per block, how many
//!    symbols they still need and the highest ESI they saw. ESIs of a block go
//!    out in increasing order, so every symbol above that ESI is still in
//!    flight or queued; the sender counts those as arriving (less the
//!    reported loss) and mints only the shortfall as fresh repair symbols. One
//!    fresh symbol serves every receiver, so reports are merged by block.
//! 4. After the first pass: END-OF-PASS (repeated with every announcement),
//!    then repairs on demand until every receiver that joined has said DONE
//!    (each DONE is acknowledged) or gone silent for `receiver_timeout`;
//!    with nobody joined, after `linger`.
//!    Then three closing END-OF-PASS frames, and the session is finished.
//!
//! # Driving it
//!
//! Feed [`Sender::handle_datagram`] with feedback, [`Sender::handle_batch`]
//! with what the encoder produced for a [`EncodeJob`] taken from
//! [`Sender::poll_job`], and call [`Sender::handle_timeout`] when
//! [`Sender::poll_timeout`] is due. Drain [`Sender::poll_transmit`] (each
//! datagram goes to the group) and [`Sender::poll_event`] after every call.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::codec::Layout;
use crate::pacer::{Pacer, WIRE_OVERHEAD};
use crate::rate::{RateConfig, RateControl, RateEvent};
use crate::wire::{self, Digest, Feedback, Frame, HASHES_PER_FRAME, MAX_ESI, SessionInfo};

/// Blocks at the end of the first pass that get [`Sender::tail_headroom`].
const TAIL_BLOCKS: u32 = 2;

/// First-pass blocks that take turns once the last block has joined the
/// round robin. Left to the whole window, the last three blocks finished
/// within about 150 ms of each other (8-receiver lab, 4 MiB blocks), and
/// receivers were still decoding the one before last when the last one
/// arrived. Two at a time finish about half a block's sending time apart,
/// so only the last block's decode is left after the pass: tail means
/// 0.127 s with the whole window, 0.089 s with two (7 runs each). The cost:
/// a burst of loss in that last stretch falls on one or two blocks.
const DRAIN_INTERLEAVE: usize = 2;

/// Between SESSION beacons while waiting for receivers to join: 2, 4, 8
/// and 16 ms after the first, then every 20 ms. With 5% loss a third of
/// eight receivers' starts lost the first SESSION, and each such start
/// waited a whole 20 ms for the next one.
const BEACON_FIRST_GAP: Duration = Duration::from_millis(2);
const BEACON_INTERVAL: Duration = Duration::from_millis(20);
/// Receivers the sender keeps track of at once.
const MAX_RECEIVERS: usize = 16_384;
/// LEAVE frames repeated with each announcement, at most.
const MAX_LEAVES_PER_ANNOUNCE: usize = 8;
/// Least time between two JOIN_ACKs to one receiver.
const JOIN_ACK_GAP: Duration = Duration::from_millis(100);

mod announce;
mod provision;
mod schedule;
mod types;
pub use types::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Announcing { since: Instant },
    Sending,
    Closing { left: u8 },
    Finished,
}

#[derive(Debug)]
struct Chunk {
    first_esi: u32,
    count: u32,
    next: u32,
    bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct BlockTx {
    /// ESIs below this are allocated (sent, queued or being encoded).
    next_esi: u32,
    /// ESIs below this have been transmitted (they go out in order).
    sent_upto: u32,
    queue: VecDeque<Chunk>,
    /// In the round-robin list.
    active: bool,
    /// Its first-pass symbols are not all sent yet.
    first_pass: bool,
    /// When its latest symbol went out.
    last_sent: Option<Instant>,
    /// Symbols of its first pass, and how many of them went out.
    first_total: u32,
    first_sent: u32,
    /// Its encoder still owes a batch: running out of symbols to send
    /// does not end its first pass.
    owed: bool,
}

impl BlockTx {
    /// Whether it has sent 1/`window` of its first pass (or all of it), so
    /// that the next block may join the round robin.
    fn spread(&self, window: u32) -> bool {
        !self.first_pass
            || u64::from(self.first_sent) * u64::from(window) >= u64::from(self.first_total)
    }
}

#[derive(Debug)]
struct Peer {
    last_heard: Instant,
    /// When its JOIN was last acknowledged: one JOIN_ACK per receiver per
    /// `JOIN_ACK_GAP`, however many JOINs come.
    join_acked: Option<Instant>,
    done: bool,
    lost: bool,
    /// Left behind by the rate controller: not waited for, not repaired.
    left: bool,
    loss_ppm: u32,
}

/// One multicast transfer from the sending side. See the module docs.
pub struct Sender {
    cfg: SenderConfig,
    session: u64,
    layout: Layout,
    info: SessionInfo,
    hashes: Vec<Option<Digest>>,
    phase: Phase,
    pacer: Pacer,
    rate: RateControl,
    /// DATA carries the time since this, for receivers' delay trend.
    epoch: Instant,
    next_announce: Instant,
    /// While announcing, SESSION alone also goes out this often.
    next_beacon: Instant,
    /// SESSION frames sent while announcing, for the beacon gap.
    beacons: u32,
    hash_cursor: usize,
    blocks: Vec<BlockTx>,
    next_new_block: u32,
    /// Blocks 0..available may be read; the rest is still being fetched.
    available: u32,
    first_pass_open: u32,
    active: VecDeque<u32>,
    staged: VecDeque<u32>,
    /// The block most recently moved into the round robin.
    youngest: Option<u32>,
    jobs: VecDeque<EncodeJob>,
    jobs_out: u32,
    control: VecDeque<Vec<u8>>,
    peers: HashMap<u64, Peer>,
    pass_done_at: Option<Instant>,
    events: VecDeque<SenderEvent>,
    stats: SenderStats,
    buf: Vec<u8>,
}

impl Sender {
    /// A session for `object`. Feedback is expected on `feedback_port`.
    pub fn new(
        now: Instant,
        cfg: SenderConfig,
        session: u64,
        object: SenderObject,
        feedback_port: u16,
    ) -> Self {
        let SenderObject {
            layout,
            hashes,
            file_sha256,
            mut name,
        } = object;
        assert_eq!(hashes.len(), layout.block_count() as usize);
        while name.len() > wire::MAX_NAME_LEN {
            name.pop();
        }

        let info = SessionInfo {
            file_size: layout.file_size(),
            block_size: layout.block_size(),
            symbol_size: layout.symbol_size(),
            block_count: layout.block_count(),
            file_sha256,
            feedback_port,
            feedback_interval_ms: cfg.feedback_interval.as_millis() as u32,
            name,
            paused: false,
        };
        let blocks = (0..layout.block_count())
            .map(|_| BlockTx::default())
            .collect();
        let rate = RateControl::new(
            now,
            RateConfig {
                max_bps: cfg.rate_bps,
                min_bps: cfg.rate_min_bps.min(cfg.rate_bps),
                mode: cfg.rate_mode,
                slow: cfg.slow_receivers,
            },
        );
        Self {
            pacer: Pacer::new(now, rate.rate_bps()),
            rate,
            epoch: now,
            phase: Phase::Announcing { since: now },
            next_announce: now,
            next_beacon: now,
            beacons: 0,
            cfg,
            session,
            layout,
            info,
            hashes,
            hash_cursor: 0,
            blocks,
            next_new_block: 0,
            available: layout.block_count(),
            first_pass_open: 0,
            active: VecDeque::new(),
            staged: VecDeque::new(),
            youngest: None,
            jobs: VecDeque::new(),
            jobs_out: 0,
            control: VecDeque::new(),
            peers: HashMap::new(),
            pass_done_at: None,
            events: VecDeque::new(),
            stats: SenderStats::default(),
            buf: Vec::with_capacity(2048),
        }
    }

    #[doc(hidden)]
    pub fn debug_phase(&self) -> String {
        format!(
            "{:?} active={:?} staged={:?} jobs_out={} open={} next_new={} pacer={:?} ctl={}",
            self.phase,
            self.active,
            self.staged,
            self.jobs_out,
            self.first_pass_open,
            self.next_new_block,
            self.pacer,
            self.control.len()
        )
    }

    pub fn session_id(&self) -> u64 {
        self.session
    }
    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }
    /// Ends the session early (the user or the task stopped it): no more
    /// data, only the closing END-OF-PASS frames, so that receivers stop
    /// at once with "sender closed" instead of waiting out their idle
    /// timeout. Then [`Sender::is_finished`].
    pub fn close(&mut self) {
        if !matches!(self.phase, Phase::Closing { .. } | Phase::Finished) {
            self.phase = Phase::Closing { left: 3 };
        }
    }
    /// Pauses or resumes the data (an operator's order). While paused the
    /// session goes on announcing itself, marked paused, acknowledging
    /// joins and taking feedback, so receivers wait rather than give up;
    /// no DATA goes out and the rate control does not judge. Resuming
    /// carries on where the pass stood.
    pub fn set_paused(&mut self, paused: bool) {
        if self.info.paused != paused {
            self.info.paused = paused;
            self.queue_control(&Frame::Session(self.info.clone()));
            self.events.push_back(if paused {
                SenderEvent::Paused
            } else {
                SenderEvent::Resumed
            });
        }
    }

    pub fn is_paused(&self) -> bool {
        self.info.paused
    }

    /// Waiting for `min_receivers` joins: the next JOIN may start the data.
    pub fn awaiting_joins(&self) -> bool {
        matches!(self.phase, Phase::Announcing { .. }) && self.cfg.min_receivers > 0
    }
    /// Blocks whose first pass is fully sent.
    /// Sends only blocks below `blocks` in the first pass until told more:
    /// the representative multicasts a package while it is still fetching
    /// it, in order. All blocks are available unless this is called.
    pub fn set_available(&mut self, blocks: u32) {
        self.available = blocks.min(self.layout.block_count());
    }

    /// Blocks in the round robin now: this many data datagrams in a row
    /// belong to as many different blocks.
    pub fn blocks_in_round(&self) -> usize {
        self.active.len().max(1)
    }

    pub fn blocks_sent(&self) -> u32 {
        self.next_new_block - self.first_pass_open
    }

    /// Takes one datagram that arrived on the feedback port.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Ok(dgram) = wire::decode(bytes) else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        let Frame::Feedback { receiver, feedback } = dgram.frame else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        if dgram.session != self.session {
            self.stats.dropped_datagrams += 1;
            return;
        }
        if !self.admit(now, receiver, from) {
            self.stats.dropped_datagrams += 1;
            return;
        }
        self.stats.feedback_datagrams += 1;
        let peer = self.peers.get_mut(&receiver).expect("admitted above");
        match feedback {
            Feedback::Join => {
                if peer
                    .join_acked
                    .is_none_or(|t| now.saturating_duration_since(t) >= JOIN_ACK_GAP)
                {
                    peer.join_acked = Some(now);
                    self.queue_control(&Frame::JoinAck { receiver });
                }
            }
            Feedback::Done => {
                if !peer.done {
                    peer.done = true;
                    self.rate.forget(receiver);
                    self.stats.receivers_done += 1;
                    self.events
                        .push_back(SenderEvent::ReceiverDone { receiver });
                }
                self.queue_control(&Frame::DoneAck { receiver });
            }
            Feedback::Needs {
                loss_ppm,
                path,
                needs,
            } => {
                if peer.left {
                    return;
                }
                peer.loss_ppm = loss_ppm;
                self.handle_needs(now, receiver, loss_ppm, path, needs);
            }
        }
    }

    /// Takes `receiver` into the table (or notes it heard again): `false`
    /// when the table is full of live receivers. Ids are the receivers'
    /// own, so a flood of made-up ones must not grow the table: a newcomer
    /// takes the place of a receiver gone silent, or is not heard.
    fn admit(&mut self, now: Instant, receiver: u64, from: SocketAddr) -> bool {
        if !self.peers.contains_key(&receiver) && self.peers.len() >= MAX_RECEIVERS {
            let lost = self.peers.iter().find(|(_, p)| p.lost).map(|(&id, _)| id);
            let Some(lost) = lost else {
                return false;
            };
            self.peers.remove(&lost);
            self.stats.receivers_lost -= 1;
        }
        if !self.peers.contains_key(&receiver) {
            self.stats.receivers_joined += 1;
            self.events
                .push_back(SenderEvent::Joined { receiver, from });
        }
        let peer = self.peers.entry(receiver).or_insert(Peer {
            last_heard: now,
            join_acked: None,
            done: false,
            lost: false,
            left: false,
            loss_ppm: 0,
        });
        peer.last_heard = now;
        if peer.lost {
            // It came back: count it as live again.
            peer.lost = false;
            self.stats.receivers_lost -= 1;
        }
        true
    }

    /// A receiver's report while sending: its path goes to the rate
    /// control, its needs to repair (unless it is congested alone during
    /// the pass).
    fn handle_needs(
        &mut self,
        now: Instant,
        receiver: u64,
        loss_ppm: u32,
        path: wire::PathReport,
        needs: Vec<wire::Need>,
    ) {
        self.stats.max_loss_ppm = self.stats.max_loss_ppm.max(loss_ppm);
        if self.phase != Phase::Sending {
            return;
        }
        self.rate.handle_report(now, receiver, path);
        if self.pass_done_at.is_none() && !self.rate.follows(receiver) {
            // Congested alone while the rest are not: what it lost to its
            // own link is repaired after the pass, if it is not left
            // behind by then, not at the group's expense now.
            return;
        }
        // A receiver claiming more than half its symbols lost gets repair
        // as if it lost half: one report cannot make the sender mint more
        // than about twice a block.
        let delivery = 1.0 - (f64::from(loss_ppm) / 1e6).min(0.5);
        for need in needs {
            self.handle_need(now, need, delivery);
        }
    }

    fn queue_job(&mut self, job: EncodeJob) {
        self.jobs.push_back(job);
        self.jobs_out += 1;
    }

    /// Takes what the encoder made for a job.
    pub fn handle_batch(&mut self, mut batch: EncodedBatch) {
        if !batch.more {
            self.jobs_out = self.jobs_out.saturating_sub(1);
        }
        self.learn_hashes(std::mem::take(&mut batch.hashes), batch.file_sha256);
        let t = usize::from(self.layout.symbol_size());
        let Some(tx) = self.blocks.get_mut(batch.block as usize) else {
            return;
        };
        tx.owed = batch.more;
        let staging = batch.source.is_some() && tx.first_pass;
        if let Some(source) = batch.source {
            // Zero padding past the file's end is never sent.
            tx.queue.push_back(Chunk {
                first_esi: 0,
                count: self.layout.data_symbols(batch.block),
                next: 0,
                bytes: source,
            });
        }
        if !batch.repair.is_empty() {
            tx.queue.push_back(Chunk {
                first_esi: batch.repair_first_esi,
                count: (batch.repair.len() / t) as u32,
                next: 0,
                bytes: batch.repair,
            });
        }
        if staging {
            // A first-pass block joins the round robin in turn.
            self.staged.push_back(batch.block);
        } else if !tx.active && !tx.queue.is_empty() && !self.staged.contains(&batch.block) {
            tx.active = true;
            self.active.push_back(batch.block);
        }
        if !tx.owed && tx.queue.is_empty() && !tx.active {
            // Its symbols all went out before this (empty) batch came.
            self.close_first_pass(batch.block);
        }
    }

    /// Work for the encoder.
    pub fn poll_job(&mut self) -> Option<EncodeJob> {
        self.jobs.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Advances timers: announcements, phase changes, silent receivers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Announcing { since } => {
                let joined = self.stats.receivers_joined;
                let start = if self.cfg.min_receivers > 0 {
                    if joined >= self.cfg.min_receivers {
                        true
                    } else if now >= since + self.cfg.join_timeout {
                        self.events.push_back(SenderEvent::StartedShort {
                            joined,
                            wanted: self.cfg.min_receivers,
                        });
                        true
                    } else {
                        false
                    }
                } else {
                    now >= since + self.cfg.startup
                };
                if start {
                    self.phase = Phase::Sending;
                    self.events
                        .push_back(SenderEvent::DataStarted { receivers: joined });
                }
            }
            Phase::Sending if self.info.paused => {}
            Phase::Sending => {
                self.adapt_rate(now);
                self.check_finished(now);
            }
            Phase::Closing { .. } | Phase::Finished => {}
        }
        if now >= self.next_announce
            && matches!(self.phase, Phase::Announcing { .. } | Phase::Sending)
        {
            self.announce();
            self.check_silent_peers(now);
            self.next_announce = now + self.cfg.announce_interval;
            self.next_beacon = now + self.beacon_gap();
        }
        if matches!(self.phase, Phase::Announcing { .. }) && now >= self.next_beacon {
            // A receiver that lost the SESSION joins on the next beacon, not
            // a whole announce interval later, and data starts sooner.
            self.queue_control(&Frame::Session(self.info.clone()));
            self.next_beacon = now + self.beacon_gap();
        }
        self.open_blocks();
    }

    /// Lets the rate controller judge a round when one is due, and paces at
    /// what it decided; leaves behind the receivers it gives up waiting for.
    fn adapt_rate(&mut self, now: Instant) {
        self.rate.handle_sent(now, self.stats.data_wire_bytes);
        self.rate.set_report_interval(self.feedback_interval());
        self.rate.handle_timeout(now);
        self.pacer.set_rate(now, self.rate.rate_bps());
        self.stats.rate_bps = self.pacer.rate_bps();
        self.stats.rate_reason = Some(self.rate.reason());
        while let Some(RateEvent::LeaveBehind { receiver }) = self.rate.poll_event() {
            if let Some(peer) = self.peers.get_mut(&receiver)
                && !peer.left
            {
                peer.left = true;
                self.stats.receivers_left += 1;
                self.queue_control(&Frame::Leave { receiver });
                self.events.push_back(SenderEvent::LeftBehind { receiver });
            }
        }
    }

    /// The whole file's hash, when known (given, or found by the encoder).
    pub fn file_sha256(&self) -> Option<Digest> {
        self.info.file_sha256
    }

    fn queue_control(&mut self, frame: &Frame) {
        self.control.push_back(frame.encode(self.session));
    }

    fn check_silent_peers(&mut self, now: Instant) {
        for (&id, peer) in self.peers.iter_mut() {
            if !peer.done && !peer.lost && now >= peer.last_heard + self.cfg.receiver_timeout {
                peer.lost = true;
                self.rate.forget(id);
                self.stats.receivers_lost += 1;
                self.events
                    .push_back(SenderEvent::ReceiverLost { receiver: id });
            }
        }
    }

    fn check_finished(&mut self, now: Instant) {
        let first_pass_over =
            self.next_new_block == self.layout.block_count() && self.first_pass_open == 0;
        if !first_pass_over {
            return;
        }
        let pass_done_at = *self.pass_done_at.get_or_insert_with(|| {
            self.events.push_back(SenderEvent::PassDone { pass: 1 });
            self.control.push_back(
                Frame::EndOfPass {
                    pass: 1,
                    closing: false,
                }
                .encode(self.session),
            );
            now
        });
        let idle = self.active.is_empty() && self.jobs_out == 0 && self.jobs.is_empty();
        let pending = self.peers.values().any(|p| !p.done && !p.lost && !p.left);
        let finished = if self.peers.is_empty() {
            now >= pass_done_at + self.cfg.linger
        } else {
            !pending && idle
        };
        if finished {
            self.phase = Phase::Closing { left: 3 };
        }
    }

    /// When the driver should call again: the pacer, an announcement, or a
    /// phase timer. `None` when finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Finished {
            return None;
        }
        let has_output = !self.control.is_empty()
            || (!self.active.is_empty() && !self.info.paused)
            || matches!(self.phase, Phase::Closing { .. });
        let pacing = if has_output {
            Some(self.pacer.next_ready().unwrap_or(self.pacer.last_seen()))
        } else {
            None
        };
        let mut t = self.next_announce;
        if let Some(p) = pacing {
            t = t.min(p);
        }
        match self.phase {
            Phase::Announcing { since } => {
                t = t.min(self.next_beacon);
                let limit = if self.cfg.min_receivers > 0 {
                    self.cfg.join_timeout
                } else {
                    self.cfg.startup
                };
                t = t.min(since + limit);
            }
            Phase::Sending if self.info.paused => {}
            Phase::Sending => {
                t = t.min(self.rate.poll_timeout());
                // Silent receivers are checked at each announcement.
                if let Some(at) = self.pass_done_at
                    && self.peers.is_empty()
                {
                    t = t.min(at + self.cfg.linger);
                }
            }
            _ => {}
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests;
