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
        if !self.peers.contains_key(&receiver) && self.peers.len() >= MAX_RECEIVERS {
            // Ids are the receivers' own: a flood of made-up ones must not
            // grow the table. A newcomer takes the place of a receiver
            // gone silent, or is not heard.
            let lost = self.peers.iter().find(|(_, p)| p.lost).map(|(&id, _)| id);
            let Some(lost) = lost else {
                self.stats.dropped_datagrams += 1;
                return;
            };
            self.peers.remove(&lost);
            self.stats.receivers_lost -= 1;
        }
        self.stats.feedback_datagrams += 1;
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
                self.stats.max_loss_ppm = self.stats.max_loss_ppm.max(loss_ppm);
                if self.phase != Phase::Sending {
                    return;
                }
                self.rate.handle_report(now, receiver, path);
                if self.pass_done_at.is_none() && !self.rate.follows(receiver) {
                    // Congested alone while the rest are not: what it lost
                    // to its own link is repaired after the pass, if it is
                    // not left behind by then, not at the group's expense
                    // now.
                    return;
                }
                // A receiver claiming more than half its symbols lost gets
                // repair as if it lost half: one report cannot make the
                // sender mint more than about twice a block.
                let delivery = 1.0 - (f64::from(loss_ppm) / 1e6).min(0.5);
                for need in needs {
                    self.handle_need(now, need, delivery);
                }
            }
        }
    }

    fn handle_need(&mut self, now: Instant, need: wire::Need, delivery: f64) {
        let k = self.layout.k();
        let Some(tx) = self.blocks.get(need.block as usize) else {
            return;
        };
        if need.need == 0 || need.need > k + self.layout.decode_margin() + 64 {
            return;
        }
        // Symbols the receiver has not seen yet but that are on their way:
        // those still queued, and, while the block is being sent, those sent
        // above the receiver's highest ESI (they may still be in a socket
        // buffer). Once the block has been quiet for a feedback interval,
        // anything sent and not seen is lost.
        let queued = tx.next_esi - tx.sent_upto;
        let sending = tx
            .last_sent
            .is_some_and(|at| now < at + self.cfg.feedback_interval);
        let coming = match need.highest_esi {
            Some(e) if sending => tx.next_esi.saturating_sub(e.saturating_add(1)).max(queued),
            _ => queued,
        };
        let expected = f64::from(coming) * delivery;
        let short = f64::from(need.need) - expected;
        if short <= 0.0 {
            return;
        }
        let count = (short / delivery).ceil() as u32;
        self.request_repair(need.block, count);
    }

    fn request_repair(&mut self, block: u32, count: u32) {
        let tx = &mut self.blocks[block as usize];
        let first = tx.next_esi.max(self.layout.k());
        let count = count.min((MAX_ESI + 1).saturating_sub(first));
        if count == 0 {
            return;
        }
        tx.next_esi = first + count;
        self.queue_job(EncodeJob {
            block,
            with_source: false,
            repair_first_esi: first,
            repair_count: count,
        });
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

    /// Repair symbols for a block of `data` data symbols in the first pass.
    fn first_pass_repair(&self, data: u32) -> u32 {
        let data = u64::from(data);
        let floor = (data * u64::from(self.cfg.overhead_pct)).div_ceil(100);
        let p = self.planning_loss();
        if p == 0.0 {
            return floor as u32;
        }
        // Just enough that such a receiver expects the K+2 symbols it can
        // decode from: its loss with 2% headroom and three symbols in a
        // thousand. Blocks that fall a few symbols short are topped up by
        // feedback, which costs less than a larger margin on every block.
        // (Receivers that get K + the fast margin decode sooner and faster;
        // the others decode from what they have once the block settles.)
        let per_mille = (p / (1.0 - p) * 1020.0 + 3.0).ceil() as u64;
        floor.max((data * per_mille).div_ceil(1000)) as u32
    }

    /// The loss the first pass provides for: the upper quartile of what the
    /// receivers report (the largest when there are three or fewer). A
    /// receiver that really loses more needs as many symbols sent either
    /// way, and gets them from its NEEDS (one fresh symbol serves all),
    /// while provisioning for the largest figure let one receiver's
    /// transient burst inflate every later block for all (one lab run: a
    /// receiver reported 24% for a moment, and the sender put 1.35x the file
    /// on the wire instead of 1.11x).
    fn planning_loss(&self) -> f64 {
        let mut losses: Vec<u32> = (self.peers.iter())
            .filter(|(id, p)| !p.done && !p.lost && !p.left && self.rate.follows(**id))
            .map(|(&id, p)| match self.rate.reference_loss(id) {
                // The loss the rate controller finds the path's own, not
                // what its own probing caused.
                Some(loss) if !self.rate.is_fixed() => (loss * 1e6) as u32,
                _ => p.loss_ppm,
            })
            .collect();
        losses.sort_unstable();
        let loss = match losses.len() {
            0 => 0,
            n => losses[(n * 3).div_ceil(4) - 1],
        };
        (f64::from(loss) / 1e6).min(0.5)
    }

    /// More repair for the last [`TAIL_BLOCKS`] blocks of the first pass:
    /// every receiver decodes them at the very end, when nothing else is
    /// left to overlap with. A receiver short of K+2 there waits a whole
    /// feedback round, and one below the fast margin decodes more slowly.
    /// So each receiver expects the fast margin plus two standard deviations
    /// of its loss (4 MiB blocks at 5%: 44 symbols, 0.1% of 64 MiB each).
    fn tail_headroom(&self, data: u32) -> u32 {
        let p = self.planning_loss();
        let sd = (f64::from(data) * p * (1.0 - p)).sqrt();
        self.layout.decode_margin() + (2.0 * sd).ceil() as u32
    }

    /// Blocks sent interleaved: as many as fit in `interleave_bytes`, so a
    /// burst of loss spreads over them, within what receivers buffer.
    pub fn interleave(&self) -> u32 {
        let blocks = self.cfg.interleave_bytes / u64::from(self.layout.block_size());
        blocks.clamp(1, 16) as u32
    }

    /// Blocks of the first pass that are sending or prepared at once: the
    /// window and two more. Feedback during the pass asks for more repair
    /// of any of them, so the encoder keeps that many encoders at hand.
    pub fn blocks_in_flight(&self) -> u32 {
        self.interleave() + 2
    }

    /// Starts encoding blocks of the first pass while the window has room,
    /// already while announcing, so data starts with a block ready.
    fn open_blocks(&mut self) {
        if !matches!(self.phase, Phase::Announcing { .. } | Phase::Sending) {
            return;
        }
        // Two blocks beyond the window are prepared ahead, so the encoder
        // runs while the window sends and the link never waits for it.
        let depth = self.blocks_in_flight();
        while self.first_pass_open < depth && self.next_new_block < self.available {
            let block = self.next_new_block;
            self.next_new_block += 1;
            self.first_pass_open += 1;
            let k = self.layout.k();
            let data = self.layout.data_symbols(block);
            let mut repair = self.first_pass_repair(data);
            if block + TAIL_BLOCKS >= self.layout.block_count() {
                repair += self.tail_headroom(data);
            }
            let tx = &mut self.blocks[block as usize];
            tx.first_pass = true;
            tx.next_esi = k + repair;
            tx.first_total = self.layout.data_symbols(block) + repair;
            self.queue_job(EncodeJob {
                block,
                with_source: true,
                repair_first_esi: k,
                repair_count: repair,
            });
        }
        if self.phase != Phase::Sending {
            return;
        }
        // Move prepared blocks into the round robin while it has room, one
        // at a time: each after the one before has sent 1/window of its
        // first pass. Blocks then finish one after another rather than a
        // window at once, so receivers decode at an even pace during the
        // pass (not a window's worth of decodes in a burst that starves the
        // sender of CPU) and only the last block is left at its end.
        let in_window = self
            .active
            .iter()
            .filter(|&&b| self.blocks[b as usize].first_pass)
            .count() as u32;
        let youngest_spread = self
            .youngest
            .is_none_or(|b| self.blocks[b as usize].spread(self.interleave()));
        if in_window < self.interleave()
            && youngest_spread
            && let Some(block) = self.staged.pop_front()
        {
            let tx = &mut self.blocks[block as usize];
            if !tx.active {
                tx.active = true;
                self.active.push_back(block);
            }
            self.youngest = Some(block);
        }
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

    /// The next datagram to send to the group, if the pacer allows one now.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<&[u8]> {
        if self.phase == Phase::Finished || !self.pacer.ready(now) {
            return None;
        }
        if let Some(bytes) = self.control.pop_front() {
            self.buf = bytes;
        } else if let Phase::Closing { left } = self.phase {
            if left == 0 {
                self.phase = Phase::Finished;
                self.events.push_back(SenderEvent::Finished);
                return None;
            }
            self.phase = Phase::Closing { left: left - 1 };
            self.buf = Frame::EndOfPass {
                pass: 1,
                closing: true,
            }
            .encode(self.session);
        } else if self.info.paused || !self.next_symbol(now) {
            self.pacer.idle(now);
            return None;
        }
        let len = self.buf.len() + self.cfg.seal_overhead;
        self.pacer.spend(len);
        self.stats.datagrams += 1;
        self.stats.bytes += len as u64;
        self.stats.wire_bytes += (len + WIRE_OVERHEAD) as u64;
        Some(&self.buf)
    }

    /// Puts the next data symbol (round robin over active blocks) in `buf`.
    fn next_symbol(&mut self, now: Instant) -> bool {
        let t = usize::from(self.layout.symbol_size());
        let k = self.layout.k();
        let window = self.interleave();
        while let Some(block) = self.active.pop_front() {
            if !self.may_send_now(block) {
                self.active.push_back(block);
                continue;
            }
            let tx = &mut self.blocks[block as usize];
            let Some(chunk) = tx.queue.front_mut() else {
                tx.active = false;
                if !tx.owed {
                    self.close_first_pass(block);
                }
                continue;
            };
            let esi = chunk.first_esi + chunk.next;
            let at = chunk.next as usize * t;
            let sent_us = now.saturating_duration_since(self.epoch).as_micros() as u32;
            let data = wire::Data {
                block,
                esi,
                sent_us,
                payload: &chunk.bytes[at..at + t],
            };
            wire::encode_data(self.session, &data, &mut self.buf);
            self.stats.data_wire_bytes +=
                (self.buf.len() + self.cfg.seal_overhead + WIRE_OVERHEAD) as u64;
            chunk.next += 1;
            if chunk.next == chunk.count {
                tx.queue.pop_front();
            }
            tx.sent_upto = tx.sent_upto.max(esi + 1);
            tx.last_sent = Some(now);
            // The next block may join when the youngest becomes spread.
            let was_spread = tx.spread(window);
            if tx.first_pass {
                tx.first_sent += 1;
            }
            let admit_next = self.youngest == Some(block) && !was_spread && tx.spread(window);
            if esi < k {
                self.stats.source_symbols += 1;
            } else {
                self.stats.repair_symbols += 1;
                if !tx.first_pass {
                    self.stats.feedback_repair_symbols += 1;
                }
            }
            if tx.queue.is_empty() {
                tx.active = false;
                if !tx.owed {
                    self.close_first_pass(block);
                }
            } else {
                self.active.push_back(block);
                if admit_next {
                    self.open_blocks();
                }
            }
            return true;
        }
        false
    }

    /// Whether `block`, just taken from the round robin, has its turn: once
    /// the last block has joined, only the [`DRAIN_INTERLEAVE`] oldest
    /// first-pass blocks do; repair for finished blocks always does. The
    /// oldest block in the round robin always has its turn, so the caller's
    /// loop ends.
    fn may_send_now(&self, block: u32) -> bool {
        let draining = self
            .youngest
            .is_some_and(|b| b + 1 == self.layout.block_count());
        if !draining || !self.blocks[block as usize].first_pass {
            return true;
        }
        let older = self
            .active
            .iter()
            .filter(|&&b| b < block && self.blocks[b as usize].first_pass)
            .count();
        older < DRAIN_INTERLEAVE
    }

    fn close_first_pass(&mut self, block: u32) {
        let tx = &mut self.blocks[block as usize];
        if tx.first_pass {
            tx.first_pass = false;
            self.first_pass_open -= 1;
            self.open_blocks();
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
