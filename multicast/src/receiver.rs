//! Receiver session, sans-IO.
//!
//! # Protocol flow
//!
//! 1. Waits for a SESSION (of any session, or the one it was told to
//!    follow), validates its geometry, and sends JOIN to the sender's
//!    feedback port. Told which session to follow, it follows it at once;
//!    following the first one heard, it binds to the first sender that
//!    answers its JOIN with a JOIN_ACK, so replayed announcements of a
//!    session that is not running (or not serving it) cannot capture it.
//!    Datagrams of other sessions are counted and ignored.
//! 2. Collects symbols per block, each checked (block index, ESI, length,
//!    duplicate) before it is kept. At most `max_buffered_bytes` of symbols
//!    are held: a symbol of a new block beyond that is dropped (and the block
//!    asked for again later), so memory does not grow with the file.
//! 3. A block whose hash is known becomes a [`DecodeJob`] (decode and
//!    SHA-256 check, off the receiving thread) once it holds K plus the
//!    layout's fast margin (large blocks decode faster with a few spare
//!    symbols), or K+2 once it has *settled*: no symbol for it arrived in a
//!    whole feedback interval, so the sender has moved on. A block that does
//!    not decode yet waits for two more symbols; one that fails its hash is
//!    discarded and collected again.
//! 4. Every feedback interval it reports NEEDS: blocks it is collecting
//!    (counted to K+2, so nobody is sent symbols only to decode faster), and
//!    blocks the sender has gone past that it lacks (as many as it has room
//!    to buffer), with its loss rate.
//! 5. When every block is written, the driver checks the whole file against
//!    the SESSION's hash (a sender that hashes as it sends announces it
//!    once it has read the whole file; a later SESSION may fill it in, and
//!    nothing else) and calls [`Receiver::handle_file_verified`]; the
//!    receiver says DONE until
//!    the sender acknowledges (or a short linger ends). A closing END-OF-PASS
//!    while blocks are still missing fails the session.
//!
//! # Driving it
//!
//! Feed datagrams from the group to [`Receiver::handle_datagram`], decode
//! results to [`Receiver::handle_decoded`], and call
//! [`Receiver::handle_timeout`] when [`Receiver::poll_timeout`] is due. Drain
//! [`Receiver::poll_job`], [`Receiver::poll_transmit`] (datagrams to the
//! sender) and [`Receiver::poll_event`] after every call.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::codec::{Collector, Layout, MIN_DECODE_MARGIN};
use crate::transmit::{Dest, Transmit};
use crate::wire::{self, Digest, Feedback, Frame, MAX_NEEDS_PER_FRAME, Need, SessionInfo};

mod decode;
mod feedback;
mod path;
mod stats;
pub use decode::{BlockResult, DecodeJob, DecodeOutcome};
use path::PathMeter;
pub use stats::ReceiverStats;

/// Receiver tuning.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Random id that tells this receiver apart in feedback.
    pub receiver_id: u64,
    /// Follow only this session; `None` follows the first one heard.
    pub session: Option<u64>,
    /// Cap on symbols held in partly received blocks.
    pub max_buffered_bytes: u64,
    /// Fail when nothing of the session arrives for this long.
    pub idle_timeout: Duration,
    /// After DONE, how long to wait for the sender's acknowledgement.
    pub done_linger: Duration,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            receiver_id: 0,
            session: None,
            max_buffered_bytes: 48 << 20,
            idle_timeout: Duration::from_secs(120),
            done_linger: Duration::from_secs(2),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiverEvent {
    SessionFound {
        session: u64,
        info: SessionInfo,
    },
    /// Every block is written; the driver should check the whole file.
    AllBlocksWritten,
    /// Verified and acknowledged (or the linger ran out): done.
    Complete,
    Failed(ReceiveFailure),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveFailure {
    #[error(
        "no sender heard within {0:?}: check the group, the interface and that the sender runs"
    )]
    NoSender(Duration),
    #[error("the sender fell silent for {idle:?} with {missing} of {blocks} blocks missing")]
    SenderSilent {
        idle: Duration,
        missing: u32,
        blocks: u32,
    },
    #[error("the sender closed the session with {missing} of {blocks} blocks missing")]
    SenderClosed { missing: u32, blocks: u32 },
    #[error(
        "the sender left this receiver behind as far slower than the rest, with {missing} of {blocks} blocks missing after its pass"
    )]
    LeftBehind { missing: u32, blocks: u32 },
    #[error("the whole-file SHA-256 does not match the announced one")]
    FileHashMismatch,
    #[error("announced session is not valid: {0}")]
    BadSession(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockState {
    Missing,
    Collecting,
    Decoding,
    Done,
}

struct Active {
    session: u64,
    sender: SocketAddr,
    layout: Layout,
    info: SessionInfo,
    hashes: Vec<Option<Digest>>,
    state: Vec<BlockState>,
    collectors: BTreeMap<u32, Box<Collector>>,
    /// Extra symbols wanted over K+margin, for blocks that failed to decode.
    extra: HashMap<u32, u32>,
    /// Symbols each collecting block held at the last feedback tick.
    held_at_tick: HashMap<u32, u32>,
    /// Blocks whose symbols stopped coming: decoded from K+2.
    settled: HashSet<u32>,
    max_collectors: usize,
    /// Blocks handed out as decode jobs and not yet back.
    decoding: usize,
    highest_block_seen: Option<u32>,
    pass_over: bool,
    missing: u32,
    next_feedback: Instant,
    feedback_interval: Duration,
    last_heard: Instant,
    phase: Phase,
    path: PathMeter,
    /// The sender left us behind (LEAVE): the pass is all we get.
    left: bool,
}

impl Active {
    /// Symbols block `block` is decoded from: K plus the fast margin while
    /// its symbols still flow, K+2 once it has settled, plus two for every
    /// failed attempt.
    fn want(&self, block: u32) -> u32 {
        let margin = if self.settled.contains(&block) {
            MIN_DECODE_MARGIN
        } else {
            self.layout.decode_margin()
        };
        self.layout.k() + margin + self.extra.get(&block).copied().unwrap_or(0)
    }
}

/// Whether a collector is decoded short of the layout's fast margin.
fn below_fast_margin(layout: &Layout, c: &Collector) -> bool {
    !c.has_all_source() && c.held() < layout.k() + layout.decode_margin()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Receiving,
    Verifying,
    Done { since: Instant },
    Over,
}

/// Sessions a receiver waits on for a JOIN_ACK at once; the oldest gives way.
const MAX_CANDIDATES: usize = 8;

/// A session joined and not yet acknowledged.
struct Candidate {
    session: u64,
    /// Where its SESSION came from, and its feedback address.
    from: SocketAddr,
    sender: SocketAddr,
    info: SessionInfo,
    joined: Option<Instant>,
}

/// One multicast transfer from the receiving side. See the module docs.
pub struct Receiver {
    cfg: ReceiverConfig,
    started: Instant,
    active: Option<Active>,
    /// Sessions joined and waiting for their JOIN_ACK (following the first
    /// that answers), newest last, at most `MAX_CANDIDATES`.
    candidates: VecDeque<Candidate>,
    jobs: VecDeque<DecodeJob>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<ReceiverEvent>,
    stats: ReceiverStats,
}

impl Receiver {
    pub fn new(now: Instant, cfg: ReceiverConfig) -> Self {
        Self {
            cfg,
            started: now,
            active: None,
            candidates: VecDeque::new(),
            jobs: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: ReceiverStats::default(),
        }
    }

    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }
    pub fn layout(&self) -> Option<Layout> {
        self.active.as_ref().map(|a| a.layout)
    }
    pub fn session(&self) -> Option<(u64, &SessionInfo)> {
        self.active.as_ref().map(|a| (a.session, &a.info))
    }
    pub fn is_over(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.phase == Phase::Over)
    }

    /// Takes one datagram from the group.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams += 1;
        let Ok(dgram) = wire::decode(bytes) else {
            self.stats.malformed += 1;
            return;
        };
        let Some(active) = self.active.as_mut() else {
            self.before_session(now, from, dgram);
            return;
        };
        if dgram.session != active.session {
            self.stats.other_session += 1;
            return;
        }
        active.last_heard = now;
        match dgram.frame {
            Frame::Data(d) => {
                active
                    .path
                    .on_data(now, d.sent_us, bytes.len() + crate::pacer::WIRE_OVERHEAD);
                self.handle_data(d.block, d.esi, d.payload)
            }
            Frame::Leave { receiver } if receiver == self.cfg.receiver_id => active.left = true,
            Frame::Hashes {
                first_block,
                hashes,
            } => self.handle_hashes(first_block, &hashes),
            Frame::EndOfPass { closing, .. } => self.handle_end_of_pass(now, closing),
            Frame::DoneAck { receiver } if receiver == self.cfg.receiver_id => {
                if let Phase::Done { .. } = active.phase {
                    active.phase = Phase::Over;
                    self.events.push_back(ReceiverEvent::Complete);
                }
            }
            Frame::Session(info) => {
                // The file's hash, from a sender that hashes as it sends;
                // nothing else of a session may change.
                let a = &active.info;
                let same = (a.file_size, a.block_size, a.symbol_size, a.block_count)
                    == (
                        info.file_size,
                        info.block_size,
                        info.symbol_size,
                        info.block_count,
                    );
                if same && a.file_sha256.is_none() && info.file_sha256.is_some() {
                    active.info.file_sha256 = info.file_sha256;
                }
            }
            Frame::DoneAck { .. } | Frame::JoinAck { .. } | Frame::Leave { .. } => {}
            Frame::Feedback { .. }
            | Frame::Presence(_)
            | Frame::Probe { .. }
            | Frame::Bye { .. }
            | Frame::Claim(_)
            | Frame::Offer(_) => self.stats.other_session += 1,
        }
    }

    /// A datagram before any session is joined: the configured session's
    /// SESSION starts it; without one, the first sender that answers a
    /// JOIN is followed.
    fn before_session(&mut self, now: Instant, from: SocketAddr, dgram: wire::Datagram<'_>) {
        match (dgram.frame, self.cfg.session) {
            (Frame::Session(info), Some(s)) if s == dgram.session => {
                self.start(now, from, dgram.session, info);
            }
            (Frame::Session(info), None) => self.candidate(now, from, dgram.session, info),
            (Frame::JoinAck { receiver }, None) if receiver == self.cfg.receiver_id => {
                if let Some(i) = self
                    .candidates
                    .iter()
                    .position(|c| c.session == dgram.session && c.sender.ip() == from.ip())
                {
                    let c = self.candidates.remove(i).expect("position is in range");
                    self.candidates.clear();
                    self.start(now, c.from, c.session, c.info);
                } else {
                    self.stats.other_session += 1;
                }
            }
            _ => self.stats.other_session += 1,
        }
    }

    /// The sender's END_OF_PASS: a closing one ends the session (done,
    /// failed, or left for peers); otherwise feedback goes at once and
    /// every block that holds enough is decoded.
    fn handle_end_of_pass(&mut self, now: Instant, closing: bool) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        active.pass_over = true;
        if closing && let Phase::Done { .. } = active.phase {
            // The sender is gone; no acknowledgement will come.
            active.phase = Phase::Over;
            self.events.push_back(ReceiverEvent::Complete);
            return;
        }
        if closing && active.left {
            self.leave_if_missing();
        } else if closing && active.phase == Phase::Receiving {
            let failure = ReceiveFailure::SenderClosed {
                missing: active.missing,
                blocks: active.layout.block_count(),
            };
            self.fail(failure);
        } else if active.phase == Phase::Receiving {
            // Report at once rather than at the next tick, and decode what
            // holds K+2 now: the first pass is over, so only repair asked
            // for (to K+2) is still coming.
            active.next_feedback = now;
            let blocks: Vec<u32> = active.collectors.keys().copied().collect();
            active.settled.extend(blocks.iter().copied());
            for block in blocks {
                self.maybe_dispatch(block);
            }
        }
    }

    /// A SESSION heard while following the first sender that answers: JOIN
    /// it (again, when its last JOIN is a feedback interval old) and wait
    /// for its JOIN_ACK. The sender repeats SESSION while it runs, so a
    /// lost JOIN or JOIN_ACK is made good on the next one.
    fn candidate(&mut self, now: Instant, from: SocketAddr, session: u64, info: SessionInfo) {
        if let Err(e) = Layout::from_session(&info) {
            self.stats.malformed += 1;
            tracing::debug!("ignoring session {session:x}: {e}");
            return;
        }
        let sender = SocketAddr::new(from.ip(), info.feedback_port);
        let gap = Duration::from_millis(u64::from(info.feedback_interval_ms.clamp(5, 5000)));
        let i = match self
            .candidates
            .iter()
            .position(|c| c.session == session && c.sender == sender)
        {
            Some(i) => i,
            None => {
                if self.candidates.len() == MAX_CANDIDATES {
                    self.candidates.pop_front();
                }
                self.stats.unanswered_sessions += 1;
                self.candidates.push_back(Candidate {
                    session,
                    from,
                    sender,
                    info: info.clone(),
                    joined: None,
                });
                self.candidates.len() - 1
            }
        };
        let c = &mut self.candidates[i];
        // The newest announcement (a late file hash) is the one to start from.
        c.info = info;
        c.from = from;
        if c.joined
            .is_some_and(|t| now.saturating_duration_since(t) < gap)
        {
            return;
        }
        c.joined = Some(now);
        let frame = Frame::Feedback {
            receiver: self.cfg.receiver_id,
            feedback: Feedback::Join,
        };
        self.stats.feedback_sent += 1;
        self.transmits.push_back((sender, frame.encode(session)));
    }

    fn start(&mut self, now: Instant, from: SocketAddr, session: u64, info: SessionInfo) {
        let layout = match Layout::from_session(&info) {
            Ok(l) => l,
            Err(e) => {
                // Not ours to follow: a broken or hostile announcement.
                self.stats.malformed += 1;
                tracing::debug!("ignoring session {session:x}: {e}");
                return;
            }
        };
        let blocks = layout.block_count() as usize;
        let per_block = u64::from(layout.block_size()) + 64;
        let max_collectors = (self.cfg.max_buffered_bytes / per_block).max(2) as usize;
        let sender = SocketAddr::new(from.ip(), info.feedback_port);
        let feedback_interval =
            Duration::from_millis(u64::from(info.feedback_interval_ms.clamp(5, 5000)));
        self.events.push_back(ReceiverEvent::SessionFound {
            session,
            info: info.clone(),
        });
        self.active = Some(Active {
            session,
            sender,
            layout,
            hashes: vec![None; blocks],
            state: vec![BlockState::Missing; blocks],
            collectors: BTreeMap::new(),
            extra: HashMap::new(),
            held_at_tick: HashMap::new(),
            settled: HashSet::new(),
            max_collectors,
            decoding: 0,
            highest_block_seen: None,
            pass_over: false,
            missing: layout.block_count(),
            next_feedback: now + feedback_interval,
            feedback_interval,
            last_heard: now,
            phase: Phase::Receiving,
            path: PathMeter::new(now),
            left: false,
            info,
        });
        self.send_feedback(Feedback::Join);
        if blocks == 0 {
            self.all_written();
        }
    }

    fn handle_data(&mut self, block: u32, esi: u32, payload: &[u8]) {
        let active = self.active.as_mut().expect("called with an active session");
        let Some(state) = active.state.get(block as usize).copied() else {
            self.stats.malformed += 1;
            return;
        };
        if payload.len() != usize::from(active.layout.symbol_size()) {
            self.stats.malformed += 1;
            return;
        }
        active.highest_block_seen = active.highest_block_seen.max(Some(block));
        match state {
            BlockState::Done | BlockState::Decoding => {
                self.stats.redundant_symbols += 1;
                return;
            }
            BlockState::Missing => {
                // Blocks queued for decoding still hold their symbols.
                if active.collectors.len() + active.decoding >= active.max_collectors {
                    self.stats.dropped_no_buffer += 1;
                    return;
                }
                active
                    .collectors
                    .insert(block, Box::new(Collector::for_block(&active.layout, block)));
                active.state[block as usize] = BlockState::Collecting;
            }
            BlockState::Collecting => {}
        }
        let collector = active
            .collectors
            .get_mut(&block)
            .expect("a Collecting block has a collector");
        let before = collector.highest_esi();
        if collector.insert(esi, payload).is_err() {
            // Wrong length was caught above; this is a duplicate (a replay).
            self.stats.redundant_symbols += 1;
            return;
        }
        self.stats.data_symbols += 1;
        if esi >= active.layout.k() {
            self.stats.repair_symbols += 1;
        }
        // Loss is the share of ESIs the sender used that never arrived. The
        // padding ESIs of a short last block are never sent, so positions
        // skip them; a gap wider than K is a late join or a forged ESI.
        let k = active.layout.k();
        let data = active.layout.data_symbols(block);
        let pos = |e: u32| if e < data { e } else { e - (k - data) };
        self.stats.span += match before {
            Some(b) if esi > b => u64::from((pos(esi) - pos(b)).min(k)),
            Some(_) => 0,
            None => 1,
        };
        self.maybe_dispatch(block);
    }

    fn handle_hashes(&mut self, first: u32, hashes: &[Digest]) {
        let active = self.active.as_mut().expect("called with an active session");
        let mut ready = Vec::new();
        for (i, h) in hashes.iter().enumerate() {
            let block = first as usize + i;
            let Some(slot) = active.hashes.get_mut(block) else {
                self.stats.malformed += 1;
                return;
            };
            if slot.is_none() {
                *slot = Some(*h);
                ready.push(block as u32);
            }
        }
        for block in ready {
            self.maybe_dispatch(block);
        }
    }

    fn maybe_dispatch(&mut self, block: u32) {
        let active = self.active.as_mut().expect("called with an active session");
        let Some(expected) = active.hashes[block as usize] else {
            return;
        };
        let Some(c) = active.collectors.get(&block) else {
            return;
        };
        // Called for every symbol: the cheap test first.
        let least = active.layout.k() + MIN_DECODE_MARGIN;
        if !c.has_all_source() && (c.held() < least || c.held() < active.want(block)) {
            return;
        }
        let collector = active.collectors.remove(&block).expect("checked above");
        active.held_at_tick.remove(&block);
        if below_fast_margin(&active.layout, &collector) {
            self.stats.settled_decodes += 1;
        }
        active.state[block as usize] = BlockState::Decoding;
        active.decoding += 1;
        self.jobs.push_back(DecodeJob {
            block,
            layout: active.layout,
            expected,
            collector,
        });
    }

    /// For a resumed download, right after `SessionFound`: the block hashes
    /// known from a manifest (trusted over the sender's) and the blocks
    /// already held and verified, which are then neither collected nor
    /// asked for.
    pub fn preset(&mut self, hashes: &[Digest], done: &[bool]) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if hashes.len() == active.hashes.len() {
            for (slot, h) in active.hashes.iter_mut().zip(hashes) {
                *slot = Some(*h);
            }
        }
        let mut changed = false;
        for (block, _) in done.iter().enumerate().filter(|(_, d)| **d) {
            if active.state.get(block) == Some(&BlockState::Missing) {
                active.state[block] = BlockState::Done;
                active.collectors.remove(&(block as u32));
                active.missing -= 1;
                changed = true;
            }
        }
        if changed && active.missing == 0 && active.phase == Phase::Receiving {
            self.all_written();
        }
    }

    /// After [`Receiver::preset`]: symbols collected earlier for blocks not
    /// yet done (an earlier session of the same object: a symbol is the
    /// same whichever sender minted it), within the buffer cap.
    pub fn preload(&mut self, collectors: Vec<(u32, Box<Collector>)>) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut ready = Vec::new();
        for (block, c) in collectors {
            let missing = active.state.get(block as usize) == Some(&BlockState::Missing);
            if !missing || active.collectors.len() + active.decoding >= active.max_collectors {
                continue;
            }
            active.state[block as usize] = BlockState::Collecting;
            active.collectors.insert(block, c);
            ready.push(block);
        }
        for block in ready {
            self.maybe_dispatch(block);
        }
    }

    /// The symbols collected for blocks that are not done, for a receiver
    /// that goes on from peers after the session (they hold k of K and ask
    /// for the rest only). Leaves the session without them.
    pub fn take_collectors(&mut self) -> Vec<(u32, Box<Collector>)> {
        self.active
            .as_mut()
            .map(|a| std::mem::take(&mut a.collectors).into_iter().collect())
            .unwrap_or_default()
    }

    /// Takes the outcome of a decode job.
    pub fn handle_decoded(&mut self, result: BlockResult) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        active.decoding -= 1;
        match result {
            BlockResult::Written { block } => {
                active.state[block as usize] = BlockState::Done;
                active.extra.remove(&block);
                active.settled.remove(&block);
                active.missing -= 1;
                self.stats.blocks_done += 1;
                if active.missing == 0 {
                    self.all_written();
                }
            }
            BlockResult::NeedMore { block, collector } => {
                self.stats.decode_retries += 1;
                *active.extra.entry(block).or_default() += 2;
                active.state[block as usize] = BlockState::Collecting;
                active.collectors.insert(block, collector);
            }
            BlockResult::Corrupt { block } => {
                self.stats.hash_failures += 1;
                tracing::warn!("block {block} failed its SHA-256 check; collecting it again");
                active.state[block as usize] = BlockState::Missing;
                active.extra.remove(&block);
            }
        }
    }

    fn all_written(&mut self) {
        let active = self.active.as_mut().expect("called with an active session");
        active.phase = Phase::Verifying;
        self.events.push_back(ReceiverEvent::AllBlocksWritten);
    }

    /// The driver's verdict on the whole file, after `AllBlocksWritten`.
    pub fn handle_file_verified(&mut self, now: Instant, ok: bool) {
        if !ok {
            self.fail(ReceiveFailure::FileHashMismatch);
            return;
        }
        if let Some(active) = self.active.as_mut() {
            active.phase = Phase::Done { since: now };
            active.next_feedback = now;
        }
        self.handle_timeout(now);
    }

    /// Checks the whole file's expected hash (for drivers).
    pub fn file_sha256(&self) -> Option<Digest> {
        self.active.as_ref().and_then(|a| a.info.file_sha256)
    }

    fn fail(&mut self, failure: ReceiveFailure) {
        if let Some(active) = self.active.as_mut() {
            active.phase = Phase::Over;
        }
        self.events.push_back(ReceiverEvent::Failed(failure));
    }

    /// Periodic work: feedback, DONE repeats, idle checks.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(active) = self.active.as_mut() else {
            if now >= self.started + self.cfg.idle_timeout && self.events.is_empty() {
                self.events
                    .push_back(ReceiverEvent::Failed(ReceiveFailure::NoSender(
                        self.cfg.idle_timeout,
                    )));
                // Report it once only.
                self.started = now + Duration::from_secs(365 * 24 * 3600);
            }
            return;
        };
        match active.phase {
            Phase::Receiving | Phase::Verifying => {
                if now >= active.last_heard + self.cfg.idle_timeout {
                    let failure = ReceiveFailure::SenderSilent {
                        idle: self.cfg.idle_timeout,
                        missing: active.missing,
                        blocks: active.layout.block_count(),
                    };
                    self.fail(failure);
                    return;
                }
                if now >= active.next_feedback {
                    active.next_feedback = now + active.feedback_interval;
                    if active.left && active.pass_over && active.decoding == 0 {
                        self.leave_if_missing();
                    } else if active.phase == Phase::Receiving {
                        self.send_needs(now);
                    } else {
                        // Checking a large file takes a while: keep the
                        // sender from giving up on us meanwhile.
                        self.send_feedback(Feedback::Join);
                    }
                }
            }
            Phase::Done { since } => {
                if now >= since + self.cfg.done_linger {
                    active.phase = Phase::Over;
                    self.events.push_back(ReceiverEvent::Complete);
                } else if now >= active.next_feedback {
                    active.next_feedback = now + active.feedback_interval;
                    self.send_feedback(Feedback::Done);
                }
            }
            Phase::Over => {}
        }
    }

    pub fn poll_job(&mut self) -> Option<DecodeJob> {
        self.jobs.pop_front()
    }
    /// Feedback, always by unicast to the sender.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let (to, bytes) = self.transmits.pop_front()?;
        Some(Transmit {
            dest: Dest::To(to),
            bytes,
        })
    }
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let Some(active) = self.active.as_ref() else {
            return Some(self.started + self.cfg.idle_timeout);
        };
        match active.phase {
            Phase::Receiving => Some(
                active
                    .next_feedback
                    .min(active.last_heard + self.cfg.idle_timeout),
            ),
            Phase::Verifying => Some(
                active
                    .next_feedback
                    .min(active.last_heard + self.cfg.idle_timeout),
            ),
            Phase::Done { since } => Some(active.next_feedback.min(since + self.cfg.done_linger)),
            Phase::Over => None,
        }
    }

    /// Blocks whose symbols are held in memory: being collected or decoded.
    pub fn buffered_blocks(&self) -> usize {
        self.active
            .as_ref()
            .map_or(0, |a| a.collectors.len() + a.decoding)
    }

    /// Blocks still missing.
    pub fn missing_blocks(&self) -> u32 {
        self.active.as_ref().map_or(0, |a| a.missing)
    }
}

#[cfg(test)]
mod tests;
