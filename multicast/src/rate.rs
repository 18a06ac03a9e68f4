//! The sender's rate controller, sans-IO: what rate fits the subnet now.
//!
//! # Signals
//!
//! Every receiver reports, each feedback interval, a [`PathReport`]: the
//! symbols the sender sent it by ESI and how many never arrived, the rate
//! that arrived, and the queueing delay (its least one-way delay in the
//! interval above the least it saw lately; DATA carries the send time).
//! The sender keeps a short history of what it sent, so that what arrived
//! is set against what was sent over the same span.
//!
//! # Rounds
//!
//! The controller judges once a round (100 ms, or 2.5 feedback intervals
//! when many receivers stretch them). A receiver is *congested* in a round
//! when its queueing delay passed the mode's target, when less arrived than
//! was sent beyond what its reference loss explains (a queue filling: the
//! first sign, before delay or loss), or when its loss rose clearly above
//! its own *reference loss*: the loss it sees when the sender is not the
//! cause (the random loss of a Wi-Fi link or a bad cable). The
//! reference follows a lower loss quickly and a higher one slowly, and only
//! in rounds without congestion, so random loss alone, even 20%, never
//! reads as congestion and never brings the rate down.
//!
//! - Congested (in `wait`, any receiver; in `leave`, more than a third of
//!   them): the rate falls to what gets through to the worst of them
//!   (its arrival rate, corrected for its reference loss) or by the mode's
//!   decrease factor, whichever is lower, less what drains the queue seen
//!   within about two rounds; the next two rounds are not judged (their
//!   reports still show the queue that the old rate built), nor is a
//!   queue that shrank by 30% since.
//! - Not congested: the rate grows, doubling each round until the first
//!   congestion (so from the safe start rate the link is found within a
//!   second or two), then cautiously near the rate where congestion was
//!   last seen and faster away from it. In background mode the growth
//!   shrinks as the delay nears the target, in the manner of LEDBAT.
//!   After five clear rounds in a row below half the best rate that ran
//!   clear lately (the traffic that congested the path has gone), the rate
//!   resumes at that half and grows as at the start.
//! - In `leave`, a receiver congested alone for [`SLOW_ROUNDS`] rounds in a
//!   row while the rate is more than twice what gets through to it is *left
//!   behind*: the sender tells it (LEAVE) to finish from peers or the origin
//!   after the pass, and no longer waits for it.
//!
//! `min_bps` equal to `max_bps` is a fixed rate: the controller only
//! watches.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::wire::PathReport;

/// How the sender shares the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Yields to other traffic: keeps the queueing delay it causes under
    /// [`BACKGROUND_DELAY`] and backs off hard. The agents' default.
    #[default]
    Background,
    /// Competes like a TCP flow: reacts to loss, and to delay only past
    /// [`FOREGROUND_DELAY`].
    Foreground,
}

/// What the sender does about a receiver far slower than the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlowReceivers {
    /// The rate follows the slowest receiver (the lab CLI's default).
    #[default]
    Wait,
    /// The slow receiver is left to finish from peers (the agents').
    Leave,
}

/// Rate controller settings.
#[derive(Clone, Copy, Debug)]
pub struct RateConfig {
    /// The most the sender may send, bits per second on the wire.
    pub max_bps: u64,
    /// The least it falls to, whatever the signals say.
    pub min_bps: u64,
    pub mode: Mode,
    pub slow: SlowReceivers,
}

impl RateConfig {
    /// A rate that does not adapt.
    pub fn fixed(bps: u64) -> Self {
        Self {
            max_bps: bps,
            min_bps: bps,
            mode: Mode::Background,
            slow: SlowReceivers::Wait,
        }
    }
}

/// Why the rate is what it is, for status and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `--rate-min` equals `--rate`.
    Fixed,
    /// Rising from the safe start rate; no congestion seen yet.
    Starting,
    /// Rising or holding; nothing is congested.
    Clear,
    /// At `--rate`.
    AtMax,
    /// Brought down: a queue built up toward this receiver.
    Delay { receiver: u64 },
    /// Brought down: this receiver lost more than its reference loss.
    Loss { receiver: u64 },
    /// Brought down: less arrived at this receiver than was sent.
    Capacity { receiver: u64 },
    /// At `--rate-min` and still congested.
    AtMin,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Fixed => write!(f, "fixed rate"),
            Reason::Starting => write!(f, "starting: finding the link"),
            Reason::Clear => write!(f, "clear: no congestion reported"),
            Reason::AtMax => write!(f, "at the maximum rate"),
            Reason::Delay { receiver } => {
                write!(f, "queueing delay toward receiver {receiver:016x}")
            }
            Reason::Loss { receiver } => write!(f, "loss toward receiver {receiver:016x}"),
            Reason::Capacity { receiver } => {
                write!(
                    f,
                    "the path to receiver {receiver:016x} carries less than sent"
                )
            }
            Reason::AtMin => write!(f, "at the minimum rate, still congested"),
        }
    }
}

/// What the controller asks of the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateEvent {
    /// Tell this receiver to finish from elsewhere after the pass.
    LeaveBehind { receiver: u64 },
}

/// Where the controller starts: low enough for any office link, found
/// upward within seconds.
pub const START_BPS: u64 = 40_000_000;
/// Background mode keeps the queue it causes below this.
pub const BACKGROUND_DELAY: Duration = Duration::from_millis(3);
/// Foreground mode reacts to delay only past this (a standing queue that
/// long is congestion whatever the loss).
pub const FOREGROUND_DELAY: Duration = Duration::from_millis(100);
/// The shortest round.
pub const MIN_ROUND: Duration = Duration::from_millis(100);
/// Rounds a receiver is congested alone before it is left behind.
pub const SLOW_ROUNDS: u32 = 8;
/// Growth per round before the first congestion.
const STARTUP_GROWTH: f64 = 2.0;
/// Growth per round close to where congestion was last seen, and away
/// from it.
const NEAR_GROWTH: f64 = 1.02;
const FAR_GROWTH: f64 = 1.10;
/// Loss above the reference, beyond its noise, that is congestion.
const LOSS_MARGIN: f64 = 0.03;
/// Fewer symbols than this in a round tell nothing about its loss.
const MIN_SPAN: u32 = 30;
/// How fast the reference loss follows a higher loss (per round).
const REFERENCE_GAIN: f64 = 1.0 / 16.0;
/// How fast it follows a lower one.
const LOWER_GAIN: f64 = 0.5;
/// Symbols over which the reference is a plain mean of the rounds before
/// it follows losses with the gains above: a reference from the first
/// round alone (a few hundred symbols) is off by several points at 20%
/// loss.
const REFERENCE_SPAN: u64 = 4096;
/// Rounds clear of congestion well above the ceiling after which it is
/// forgotten and the rate grows as at the start: the other traffic that
/// caused it is gone.
const CEILING_ROUNDS: u32 = 3;
/// A receiver that reported within this many rounds counts as one of the
/// group when the controller weighs how many are congested.
const HEARD_ROUNDS: u64 = 3;
/// Rounds clear of congestion after which the ceiling is forgotten
/// wherever the rate is.
const RECOVERY_ROUNDS: u32 = 5;
/// How much of the best clear rate is kept each round: it halves in about
/// 7 s.
const BEST_DECAY: f64 = 0.99;
/// Receivers the controller follows; the sender tracks no more.
const MAX_TRACKED: usize = 16_384;
/// Arrivals short of what was sent (less the reference loss) by more than
/// this share are congestion.
const ARRIVAL_MARGIN: f64 = 0.06;
/// A report is set against what was sent only when at least this many
/// bytes went out in its interval (20 full datagrams): too few tell
/// nothing.
const MIN_SENT: f64 = 20.0 * 1466.0;
/// What was sent is kept this long, a sample at most every
/// [`SENT_SAMPLE`].
const SENT_HISTORY: Duration = Duration::from_secs(3);
const SENT_SAMPLE: Duration = Duration::from_millis(2);

#[derive(Debug, Default)]
struct Track {
    /// This round's reports, summed.
    span: u64,
    lost: u64,
    /// Largest delay and mean arrival rate over this round's reports.
    delay_us: Option<u32>,
    kbps_sum: u64,
    reports: u32,
    /// Of the reports that could be set against what was sent: arrived and
    /// sent, bits per second, summed.
    arrived_bps: f64,
    sent_bps: f64,
    /// Its loss when the sender is not the cause.
    reference: Option<f64>,
    /// Symbols the reference rests on (up to [`REFERENCE_SPAN`]): while
    /// they are few, it is the mean of the rounds so far and its own
    /// error widens the noise.
    reference_span: u64,
    /// Consecutive rounds congested while most others were not.
    alone: u32,
    left: bool,
    /// The last round it reported in.
    heard_in: u64,
}

#[derive(Debug, Clone, Copy)]
struct Judged {
    receiver: u64,
    delayed: bool,
    lossy: bool,
    short: bool,
    /// Its queueing delay, seconds.
    delay: f64,
    /// What gets through to it, bits per second, when congested.
    capacity: f64,
}

/// The rate controller. Feed it reports, call [`RateControl::handle_timeout`]
/// at [`RateControl::poll_timeout`], read [`RateControl::rate_bps`].
#[derive(Debug)]
pub struct RateControl {
    cfg: RateConfig,
    rate: f64,
    round: Duration,
    next_round: Instant,
    /// Skip judging until then: reports still describe an older rate.
    hold_until: Instant,
    /// The rate at which congestion was last seen, if ever.
    ceiling: Option<f64>,
    /// Rounds in a row clear of congestion above the ceiling.
    above_ceiling: u32,
    /// Rounds judged or not so far.
    rounds: u64,
    /// The queueing delay that the last decrease answered, until a round
    /// is clear again.
    draining: Option<f64>,
    /// Rounds clear of congestion since the last decrease.
    clear_rounds: u32,
    /// The highest rate that ran clear lately, forgotten slowly.
    best: f64,
    reason: Reason,
    tracks: HashMap<u64, Track>,
    events: Vec<RateEvent>,
    /// (when, data bytes sent on the wire so far), oldest first.
    sent: VecDeque<(Instant, u64)>,
}

impl RateControl {
    pub fn new(now: Instant, cfg: RateConfig) -> Self {
        let max = cfg.max_bps.max(cfg.min_bps);
        let start = START_BPS.clamp(cfg.min_bps, max) as f64;
        let reason = if cfg.min_bps >= max {
            Reason::Fixed
        } else {
            Reason::Starting
        };
        Self {
            cfg: RateConfig {
                max_bps: max,
                ..cfg
            },
            rate: start,
            round: MIN_ROUND,
            next_round: now + MIN_ROUND,
            hold_until: now,
            ceiling: None,
            above_ceiling: 0,
            rounds: 0,
            draining: None,
            clear_rounds: 0,
            best: 0.0,
            reason,
            tracks: HashMap::new(),
            events: Vec::new(),
            sent: VecDeque::new(),
        }
    }

    pub fn rate_bps(&self) -> u64 {
        self.rate as u64
    }

    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// Whether the rate is fixed (`min_bps` equal to `max_bps`).
    pub fn is_fixed(&self) -> bool {
        self.reason == Reason::Fixed
    }

    /// The loss this receiver sees when the sender is not the cause, once
    /// known: what the first pass provisions repair for. `None` also for a
    /// receiver the rate does not answer to (left behind, or congested
    /// alone while the rest are not): its loss is its link's, not the
    /// group's.
    pub fn reference_loss(&self, receiver: u64) -> Option<f64> {
        let t = self.tracks.get(&receiver)?;
        if t.left || t.alone > 0 {
            return None;
        }
        t.reference
    }

    /// Whether the rate answers to this receiver's reports.
    pub fn follows(&self, receiver: u64) -> bool {
        self.tracks
            .get(&receiver)
            .is_none_or(|t| !t.left && t.alone == 0)
    }

    /// Receivers left behind so far.
    pub fn left_behind(&self) -> usize {
        self.tracks.values().filter(|t| t.left).count()
    }

    /// Receivers report about every `interval`: a round spans a few of
    /// their reports.
    pub fn set_report_interval(&mut self, interval: Duration) {
        self.round = MIN_ROUND.max(interval * 5 / 2);
    }

    /// The sender has put `total` bytes of DATA on the wire so far
    /// (headers included); called as it goes.
    pub fn handle_sent(&mut self, now: Instant, total: u64) {
        if self
            .sent
            .back()
            .is_some_and(|&(t, _)| now < t + SENT_SAMPLE)
        {
            return;
        }
        self.sent.push_back((now, total));
        while self.sent.len() > 2 && self.sent[1].0 + SENT_HISTORY < now {
            self.sent.pop_front();
        }
    }

    /// Bytes sent between `from` and `to`, if the history reaches back.
    fn sent_between(&self, from: Instant, to: Instant) -> Option<f64> {
        let at = |when: Instant| {
            let i = self.sent.partition_point(|&(t, _)| t <= when);
            (i > 0).then(|| self.sent[i - 1].1)
        };
        Some(at(to)?.saturating_sub(at(from)?) as f64)
    }

    /// A receiver's report, arrived at `now`.
    pub fn handle_report(&mut self, now: Instant, receiver: u64, report: PathReport) {
        if !self.tracks.contains_key(&receiver) && self.tracks.len() >= MAX_TRACKED {
            return;
        }
        // The span it covers, moved back by the queue it saw: a datagram
        // that waited in a queue was sent that much earlier.
        let interval = Duration::from_micros(u64::from(report.interval_us));
        let to = now
            .checked_sub(Duration::from_micros(u64::from(report.delay_us)))
            .unwrap_or(now);
        let sent = (!interval.is_zero())
            .then(|| to.checked_sub(interval))
            .flatten()
            .and_then(|from| self.sent_between(from, to))
            .filter(|&bytes| bytes >= MIN_SENT);
        let t = self.tracks.entry(receiver).or_default();
        if let Some(bytes) = sent {
            t.sent_bps += bytes * 8.0 / interval.as_secs_f64();
            t.arrived_bps += f64::from(report.recv_kbps) * 1000.0;
        }
        t.span += u64::from(report.span);
        t.lost += u64::from(report.lost.min(report.span));
        // Each report's delay is already the least of its interval (jitter
        // filtered out); the largest of them is the queue at its highest.
        t.delay_us = Some(
            t.delay_us
                .map_or(report.delay_us, |d| d.max(report.delay_us)),
        );
        t.kbps_sum += u64::from(report.recv_kbps);
        t.reports += 1;
    }

    /// A receiver is done, or gone: it no longer counts.
    pub fn forget(&mut self, receiver: u64) {
        self.tracks.remove(&receiver);
    }

    pub fn poll_event(&mut self) -> Option<RateEvent> {
        self.events.pop()
    }

    pub fn poll_timeout(&self) -> Instant {
        self.next_round
    }

    /// Ends a round when it is due: judges the reports and sets the rate.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_round {
            return;
        }
        self.next_round = now + self.round;
        self.rounds += 1;
        self.best *= BEST_DECAY;
        let judging = now >= self.hold_until && !self.is_fixed();
        let target = match self.cfg.mode {
            Mode::Background => BACKGROUND_DELAY,
            Mode::Foreground => FOREGROUND_DELAY,
        };
        let rate = self.rate;
        let mut judged = Vec::new();
        // Receivers still receiving: those that reported lately, whether
        // or not a report fell in this round (a receiver done is
        // forgotten).
        let mut heard = 0usize;
        let mut headroom = Vec::new();
        let rounds = self.rounds;
        for (&receiver, t) in self.tracks.iter_mut() {
            let round = std::mem::replace(
                t,
                Track {
                    reference: t.reference,
                    reference_span: t.reference_span,
                    alone: t.alone,
                    left: t.left,
                    heard_in: t.heard_in,
                    ..Track::default()
                },
            );
            if round.reports > 0 {
                t.heard_in = rounds;
            }
            if !t.left && rounds.saturating_sub(t.heard_in) < HEARD_ROUNDS {
                heard += 1;
            }
            if t.left || round.reports == 0 {
                continue;
            }
            let delay = Duration::from_micros(u64::from(round.delay_us.unwrap_or(0)));
            headroom.push((receiver, 1.0 - delay.as_secs_f64() / target.as_secs_f64()));
            judged.extend(judge(receiver, t, &round, delay > target, rate));
        }
        if !judging || heard == 0 {
            return;
        }
        let acting = self.acting_on(&judged, heard);
        match acting
            .iter()
            .min_by(|a, b| a.capacity.total_cmp(&b.capacity))
        {
            Some(worst) => self.decrease(now, worst),
            None => {
                // Receivers congested alone (in `leave`) do not hold the
                // growth back either.
                let ignored = |id: &u64| judged.iter().any(|j| j.receiver == *id);
                let least = (headroom.iter())
                    .filter(|(id, _)| !ignored(id))
                    .map(|&(_, h)| h)
                    .fold(1.0f64, f64::min);
                self.increase(least.max(0.0));
            }
        }
    }

    /// The congested receivers the rate answers to: all of them in `wait`;
    /// in `leave`, all when more than a third are congested, else none,
    /// and those congested alone for long at well under the rate are left
    /// behind.
    fn acting_on(&mut self, judged: &[Judged], heard: usize) -> Vec<Judged> {
        let congested: Vec<u64> = judged.iter().map(|j| j.receiver).collect();
        for (id, t) in self.tracks.iter_mut() {
            if !congested.contains(id) {
                t.alone = 0;
            }
        }
        if self.cfg.slow == SlowReceivers::Wait || judged.len() * 3 > heard {
            for j in judged {
                if let Some(t) = self.tracks.get_mut(&j.receiver) {
                    t.alone = 0;
                }
            }
            return judged.to_vec();
        }
        for j in judged {
            let Some(t) = self.tracks.get_mut(&j.receiver) else {
                continue;
            };
            t.alone += 1;
            if t.alone >= SLOW_ROUNDS && j.capacity * 2.0 < self.rate {
                t.left = true;
                self.events.push(RateEvent::LeaveBehind {
                    receiver: j.receiver,
                });
            }
        }
        Vec::new()
    }

    fn decrease(&mut self, now: Instant, worst: &Judged) {
        if worst.delayed && !worst.lossy && !worst.short {
            // Only a queue, shrinking since the last decrease: the rate
            // already drains it.
            if self.draining.is_some_and(|d| worst.delay < d * 0.7) {
                self.draining = Some(worst.delay);
                return;
            }
        }
        let factor = match self.cfg.mode {
            Mode::Background => 0.8,
            Mode::Foreground => 0.875,
        };
        // Where congestion set in: no higher than what got through.
        self.ceiling = Some(self.rate.min(worst.capacity));
        // Below what gets through, by enough to drain the queue seen in
        // about two rounds (at most half of it).
        let drain = (worst.delay / (2.0 * self.round.as_secs_f64())).min(0.5);
        let target = (self.rate * factor).min(worst.capacity * (0.95 - drain));
        self.clear_rounds = 0;
        self.draining = Some(worst.delay);
        self.rate = target.max(self.cfg.min_bps as f64);
        // The queue built up drains over the next round, and its reports
        // still show it: judging again only after two rounds keeps one
        // congestion from being answered twice.
        self.hold_until = now + self.round * 2;
        self.reason = if self.rate <= self.cfg.min_bps as f64 {
            Reason::AtMin
        } else if worst.delayed && !worst.lossy {
            Reason::Delay {
                receiver: worst.receiver,
            }
        } else if worst.short && !worst.lossy {
            Reason::Capacity {
                receiver: worst.receiver,
            }
        } else {
            Reason::Loss {
                receiver: worst.receiver,
            }
        };
    }

    /// Grows the rate after a round without congestion; `headroom` is the
    /// share of the delay target still free (1 with no queue at all).
    fn increase(&mut self, headroom: f64) {
        self.draining = None;
        self.clear_rounds += 1;
        if self.ceiling.is_some_and(|c| self.rate > 1.1 * c) {
            self.above_ceiling += 1;
        } else {
            self.above_ceiling = 0;
        }
        let recovering = self.clear_rounds >= RECOVERY_ROUNDS && self.rate < 0.5 * self.best;
        if self.ceiling.is_some() && (self.above_ceiling >= CEILING_ROUNDS || recovering) {
            // The traffic that congested the path is gone: far below the
            // best rate that ran clear lately, resume at half of it.
            self.ceiling = None;
            self.rate = self.rate.max(self.best * 0.5);
        }
        if headroom >= 0.5 {
            self.best = self.best.max(self.rate);
        }
        let growth = match self.ceiling {
            None => STARTUP_GROWTH,
            Some(c) if self.rate < 0.9 * c || self.rate > 1.1 * c => FAR_GROWTH,
            Some(_) => NEAR_GROWTH,
        };
        let growth = match self.cfg.mode {
            Mode::Background => 1.0 + (growth - 1.0) * headroom,
            Mode::Foreground => growth,
        };
        let max = self.cfg.max_bps as f64;
        self.rate = (self.rate * growth).min(max);
        self.reason = if self.rate >= max {
            Reason::AtMax
        } else if self.ceiling.is_none() {
            Reason::Starting
        } else {
            Reason::Clear
        };
    }
}

/// One receiver's round (`t` its track, `round` what the round brought):
/// a verdict if it was congested (lossy, `delayed`, or short of what was
/// sent), with its capacity; its loss reference moves on.
fn judge(receiver: u64, t: &mut Track, round: &Track, delayed: bool, rate: f64) -> Option<Judged> {
    let delay = Duration::from_micros(u64::from(round.delay_us.unwrap_or(0)));
    let loss = (round.span >= u64::from(MIN_SPAN)).then(|| round.lost as f64 / round.span as f64);
    let reference = t.reference.or(loss).unwrap_or(0.0);
    // A round's loss (and with it its arrivals) differs from the reference
    // by chance this much, three standard deviations of the difference: the
    // round's own sampling error and, while it rests on few symbols, the
    // reference's. Within it, more loss or fewer arrivals are not a queue.
    let span = round.span.max(1) as f64;
    let behind = t.reference_span.max(1) as f64;
    // A first reference is this round's own loss: no error against itself.
    let reference_error = if t.reference.is_some() {
        1.0 / behind
    } else {
        0.0
    };
    let noise = 3.0 * (reference * (1.0 - reference) * (1.0 / span + reference_error)).sqrt();
    let lossy = loss.is_some_and(|p| p > reference + LOSS_MARGIN + noise);
    let short = round.sent_bps > 0.0
        && round.arrived_bps < round.sent_bps * (1.0 - reference - noise) * (1.0 - ARRIVAL_MARGIN);
    if let Some(p) = loss {
        let clear = !lossy && !delayed && !short;
        let pooled = t.reference_span < REFERENCE_SPAN;
        // At first the mean of the clear rounds; then a lower loss is the
        // path's own soon, a higher one only slowly, and never from a
        // congested round.
        t.reference = Some(match t.reference {
            None => p,
            Some(r) if pooled && clear => {
                (r * behind + round.lost as f64) / (behind + round.span as f64)
            }
            Some(r) if p < r => r + (p - r) * LOWER_GAIN,
            Some(r) if clear => r + (p - r) * REFERENCE_GAIN,
            Some(r) => r,
        });
        if clear || t.reference_span == 0 {
            t.reference_span = (t.reference_span + round.span).min(REFERENCE_SPAN);
        }
    }
    if !(lossy || delayed || short) {
        return None;
    }
    let arrived = round.kbps_sum as f64 * 1000.0 / f64::from(round.reports);
    let delivered = loss.map_or(1.0, |p| (1.0 - p) / (1.0 - reference).max(0.05));
    let capacity = (arrived / (1.0 - reference).max(0.05))
        .min(rate * delivered)
        .max(1.0);
    Some(Judged {
        receiver,
        delayed,
        lossy,
        short,
        delay: delay.as_secs_f64(),
        capacity,
    })
}

#[cfg(test)]
mod tests;
