//! The pace of one unicast transfer (a peer repair upload, an origin
//! fetch), sans-IO: a rate that yields to other traffic, in the manner of
//! LEDBAT (RFC 6817), but set as a rate rather than a window.
//!
//! The caller feeds delay samples: the round-trip time of the connection
//! (a sender that can read its TCP stack's estimate) or the time to the
//! first byte of each ranged request (a fetcher that cannot). The least
//! sample of the last few minutes is the path's base delay; what the
//! median of the last three samples shows above it is queueing. Whoever else
//! fills the path's queue (a TCP download, a video call) raises it; a
//! transfer paced below the path's capacity adds nothing to it.
//!
//! - **Slow start**: from [`START_BPS`] (or half what a transfer on the
//!   same path got through within the last minute, [`PathMemory`], or
//!   what a new TCP connection's first flight carries at the path's RTT,
//!   [`first_flight_bps`], whichever is most), the rate doubles every
//!   [`DOUBLING`] until the queue passes the target, so an idle link
//!   is found within a fraction of a second; then it falls to a little
//!   under what the sender's TCP stack measured the path to deliver
//!   ([`Pace::on_delivery_rate`]), or else under what got through
//!   meanwhile or to half where it got to, whichever is more (the queue
//!   shows the doubling that filled it late).
//! - **Steady**: each sample moves the rate by `gain * off_target * dt`,
//!   where `off_target = (target - queue) / target` in [-1, 1]: up while
//!   the queue is short, down in proportion while it is long, three times
//!   as fast down as up. Under a standing queue the rate halves within
//!   about half a second.
//! - **Back to slow start** once the queue has been under half the
//!   target for [`CLEAR`] while the rate sits below half the best it held:
//!   the other traffic has gone. It starts again from a quarter of that
//!   best (or where it is, if higher), and the link is taken back within
//!   a second or two.
//! - **Foreground** mode does not adapt: the rate is the cap (none by
//!   default), and TCP's own congestion control shares the path.
//!
//! The rate never passes the cap nor falls under the floor, and stays
//! within [`HEADROOM`] times what the caller reports got through
//! ([`Pace::on_delivered`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How a transfer shares the path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Yields to other traffic on measured delay.
    #[default]
    Background,
    /// At the cap (or unpaced): TCP's congestion control alone.
    Foreground,
}

/// Queueing delay a background transfer tolerates before it slows down.
/// One bulk TCP flow keeps 2 to 7 ms of queue on a 100 Mbit/s link, so a
/// longer target would compete with it rather than yield.
pub const TARGET: Duration = Duration::from_millis(3);
/// First rate of a background transfer, bit/s: the signal answers within
/// tens of milliseconds, so a start on the low side of a LAN costs little
/// on a slow link and a gigabit one is found in about 0.1 s.
pub const START_BPS: u64 = 100_000_000;
/// Slow start doubles the rate this often: longer than the signal takes
/// to show a queue (the median of three samples 5 ms apart, so 10-15 ms),
/// so a doubling is seen before the next. At 50 ms the climb to a gigabit
/// cost a first upload on a path 7-10% of a 256 MiB transfer.
pub const DOUBLING: Duration = Duration::from_millis(25);
/// Proportional gains, per second: with no queue the rate rises 100% a
/// second (compounded per sample); with a queue of twice the target or
/// more it falls 150% a second, so it halves within about half a second:
/// yielding must be quicker than the other flow's own reaction.
const GAIN_UP: f64 = 1.0;
const GAIN_DOWN: f64 = 1.5;
/// A queue under half the target for this long, while the rate is under
/// half its best: slow start again.
pub const CLEAR: Duration = Duration::from_millis(300);
/// Base delay: the least sample of each bucket, over this many buckets.
const BASE_BUCKET: Duration = Duration::from_secs(30);
const BASE_BUCKETS: usize = 10;
/// Current delay: the median of this many recent samples (one noisy
/// sample, a delayed ACK or a slow server, is not a queue; a queue that
/// stands is).
const RECENT: usize = 3;
/// How far above what got through the rate may be: room to find more.
pub const HEADROOM: f64 = 2.0;
/// Where slow start leaves the rate when it ends: this share of what got
/// through (rather than half its overshoot, which on an idle gigabit link
/// is 0.7 of the link and takes half a second to climb back).
const EXIT_SHARE: f64 = 0.95;
/// Delivery-rate samples of the sender's TCP stack kept for the end of
/// slow start: the most of them is taken for the path's rate, as BBR takes
/// its bottleneck bandwidth (a sample runs low when the sender paused).
/// Now and then one runs high (ACKs that came bunched: up to 3.8 Gbit/s
/// on the lab's gigabit link); that only leaves the rate over the path
/// for the steady state to bring down, as half where it got to did. At
/// one sample every 5 ms, the last 40 ms.
const RATE_SAMPLES: usize = 8;
/// Longest gap between samples that still counts in full: after a longer
/// silence the rate does not leap.
const MAX_DT: Duration = Duration::from_millis(500);

/// A transfer's rate.
#[derive(Debug)]
pub struct Pace {
    mode: Mode,
    cap_bps: Option<u64>,
    floor_bps: u64,
    rate: f64,
    slow_start: bool,
    /// Highest rate held in steady state since slow start last ended (0
    /// until it first ends: the start rate is a guess, not a rate held).
    best: f64,
    base: VecDeque<(Instant, Duration)>,
    recent: VecDeque<Duration>,
    last: Option<Instant>,
    clear_since: Option<Instant>,
    queue: Option<Duration>,
    /// [`HEADROOM`] times what got through lately: no growth passes it.
    ceiling: Option<f64>,
    /// What got through lately, bit/s.
    delivered: Option<f64>,
    /// The TCP stack's latest delivery-rate samples, bit/s.
    rate_samples: VecDeque<f64>,
}

impl Pace {
    /// A pace between `floor_bps` and `cap_bps` (`None`: no cap).
    pub fn new(mode: Mode, cap_bps: Option<u64>, floor_bps: u64) -> Self {
        Self::starting_at(mode, cap_bps, floor_bps, START_BPS)
    }

    /// [`Pace::new`], its slow start from `start_bps` (what a recent
    /// transfer on the same path got through: [`PathMemory`]).
    pub fn starting_at(mode: Mode, cap_bps: Option<u64>, floor_bps: u64, start_bps: u64) -> Self {
        let cap_bps = cap_bps.filter(|&c| c > 0);
        let floor_bps = floor_bps.max(1).min(cap_bps.unwrap_or(u64::MAX));
        let start = start_bps.clamp(floor_bps, cap_bps.unwrap_or(u64::MAX));
        Pace {
            mode,
            cap_bps,
            floor_bps,
            rate: start as f64,
            slow_start: true,
            best: 0.0,
            base: VecDeque::new(),
            recent: VecDeque::new(),
            last: None,
            clear_since: None,
            queue: None,
            ceiling: None,
            delivered: None,
            rate_samples: VecDeque::new(),
        }
    }

    /// The rate to hold now, bit/s; `None`: unpaced.
    pub fn rate_bps(&self) -> Option<u64> {
        match self.mode {
            Mode::Foreground => self.cap_bps,
            Mode::Background => Some(self.rate as u64),
        }
    }

    /// The queueing delay of the last sample, once there is a base.
    pub fn queue(&self) -> Option<Duration> {
        self.queue
    }

    /// Whether delay samples change anything (background mode).
    pub fn adapts(&self) -> bool {
        self.mode == Mode::Background
    }

    /// Takes one delay sample measured at `now`.
    pub fn on_delay(&mut self, now: Instant, delay: Duration) {
        if !self.adapts() {
            return;
        }
        self.note_base(now, delay);
        self.recent.push_back(delay);
        if self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        let base = self.base.iter().map(|&(_, d)| d).min().unwrap_or(delay);
        let mut sorted: Vec<Duration> = self.recent.iter().copied().collect();
        sorted.sort();
        let current = sorted[sorted.len() / 2];
        let queue = current.saturating_sub(base);
        self.queue = Some(queue);
        let dt = self
            .last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l))
            .min(MAX_DT);
        self.last = Some(now);
        self.adjust(now, queue, dt);
    }

    /// Takes what got through: `bytes` over `over`, while the transfer
    /// asked for more than that. The rate is held within [`HEADROOM`] of it,
    /// so it follows the path rather than run away from it between delay
    /// samples.
    pub fn on_delivered(&mut self, bytes: u64, over: Duration) {
        if !self.adapts() || over.is_zero() {
            return;
        }
        let got = bytes as f64 * 8.0 / over.as_secs_f64();
        // Held at every step after, not just now: growth between two
        // sparse delay samples would otherwise leap past it again.
        self.ceiling = Some(got * HEADROOM);
        self.delivered = Some(got);
        let cap = self.cap_bps.unwrap_or(u64::MAX) as f64;
        self.rate = self
            .rate
            .min(got * HEADROOM)
            .clamp(self.floor_bps as f64, cap);
    }

    /// Takes the path's delivery rate as the sender's TCP stack measured it
    /// last, bit/s (Linux's `tcpi_delivery_rate`). It moves nothing now;
    /// where slow start ends, it does: the doubling's 100 ms windows of
    /// what got through ([`Pace::on_delivered`]) lag a climb that ends
    /// within one, and the stack's samples do not.
    pub fn on_delivery_rate(&mut self, bps: u64) {
        if !self.adapts() || bps == 0 {
            return;
        }
        self.rate_samples.push_back(bps as f64);
        if self.rate_samples.len() > RATE_SAMPLES {
            self.rate_samples.pop_front();
        }
    }

    fn note_base(&mut self, now: Instant, delay: Duration) {
        match self.base.back_mut() {
            Some((start, least)) if now.saturating_duration_since(*start) < BASE_BUCKET => {
                *least = (*least).min(delay);
            }
            _ => {
                self.base.push_back((now, delay));
                if self.base.len() > BASE_BUCKETS {
                    self.base.pop_front();
                }
            }
        }
    }

    fn adjust(&mut self, now: Instant, queue: Duration, dt: Duration) {
        let secs = dt.as_secs_f64();
        if self.slow_start {
            if queue > TARGET {
                // The queue shows the doubling that filled it late: the rate
                // that fits is about half of where it got to, or, when it is
                // known, a little under what got through meanwhile (the
                // path's rate for this transfer; the little drains the queue
                // the doubling built).
                self.slow_start = false;
                let sampled = self.rate_samples.iter().copied().fold(0.0, f64::max);
                let through = self.delivered.unwrap_or(0.0).max(sampled) * EXIT_SHARE;
                self.rate = if sampled > 0.0 {
                    // The stack measured the path as the doubling filled it:
                    // its rate stands, however far past it the doubling got
                    // (from a first flight at a LAN's RTT, many times over).
                    through
                } else {
                    (self.rate / 2.0).max(through)
                };
                // The start was a guess (a first flight at a LAN's RTT may
                // be many times the path), not a rate held: the best counts
                // from here, once capped, below.
                self.best = 0.0;
            } else {
                self.rate *= 2f64.powf(secs / DOUBLING.as_secs_f64());
            }
        }
        if !self.slow_start {
            let target = TARGET.as_secs_f64();
            let off = ((target - queue.as_secs_f64()) / target).clamp(-1.0, 1.0);
            let gain = if off > 0.0 { GAIN_UP } else { GAIN_DOWN };
            self.rate *= (1.0 + gain * off * secs).max(0.5);
            if queue * 2 < TARGET {
                let since = *self.clear_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= CLEAR && self.rate * 2.0 < self.best {
                    self.slow_start = true;
                    self.rate = self.rate.max(self.best / 4.0);
                    self.clear_since = None;
                }
            } else {
                self.clear_since = None;
            }
        }
        let cap = (self.cap_bps.unwrap_or(u64::MAX) as f64).min(self.ceiling.unwrap_or(f64::MAX));
        self.rate = self.rate.min(cap).max(self.floor_bps as f64);
        if !self.slow_start {
            // Only a rate held counts: the steady state's, once capped.
            self.best = self.best.max(self.rate);
        }
    }
}

/// What a new TCP connection sends in its first round trip, as a rate:
/// `segments` (its initial congestion window) of `mss` bytes each per
/// `rtt`. A background transfer that starts at this rate is no quicker off
/// the mark than any TCP flow on the path, whose slow start only sends
/// more from the second round trip on; on a LAN's short RTT it is near
/// the link, on a WAN's long one far under [`START_BPS`].
pub fn first_flight_bps(segments: u32, mss: u32, rtt: Duration) -> u64 {
    if rtt.is_zero() {
        return 0;
    }
    let bits = f64::from(segments) * f64::from(mss) * 8.0;
    (bits / rtt.as_secs_f64()).min(u64::MAX as f64) as u64
}

/// What recent transfers to each address got through, so that the next
/// one on the same path starts its slow start from half of that rather
/// than from [`START_BPS`]: a peer serving one requester after another
/// finds its link again within a doubling. Per address, since another path
/// (a remote site's WAN link) may be far slower. At most [`PATHS`]
/// addresses, each remembered for [`PATH_MEMORY`].
#[derive(Debug)]
pub struct PathMemory<A> {
    paths: std::collections::HashMap<A, (Instant, u64)>,
}

/// Addresses a [`PathMemory`] holds; a new one replaces the oldest.
pub const PATHS: usize = 256;
/// How long what got through on a path stands for it.
pub const PATH_MEMORY: Duration = Duration::from_secs(60);

impl<A: std::hash::Hash + Eq + Copy> PathMemory<A> {
    pub fn new() -> Self {
        PathMemory {
            paths: std::collections::HashMap::new(),
        }
    }

    /// A transfer to `addr` got `delivered_bps` through, measured at `now`.
    pub fn note(&mut self, now: Instant, addr: A, delivered_bps: u64) {
        if self.paths.len() >= PATHS && !self.paths.contains_key(&addr) {
            let oldest = self
                .paths
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(a, _)| *a);
            if let Some(a) = oldest {
                self.paths.remove(&a);
            }
        }
        self.paths.insert(addr, (now, delivered_bps));
    }

    /// Where a transfer to `addr` starting at `now` begins its slow start.
    pub fn start_for(&self, now: Instant, addr: A) -> u64 {
        match self.paths.get(&addr) {
            Some(&(at, got)) if now.saturating_duration_since(at) < PATH_MEMORY => {
                (got / 2).max(START_BPS)
            }
            _ => START_BPS,
        }
    }
}

impl<A: std::hash::Hash + Eq + Copy> Default for PathMemory<A> {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds a transfer to a rate: how long to wait before the next `bytes`,
/// so that what passes averages the rate with at most [`BURST`] ahead.
#[derive(Debug)]
pub struct Bucket {
    /// When the bytes sent so far are paid for at the rate.
    free_at: Option<Instant>,
}

/// How far ahead of its rate a paced transfer may be after idling.
pub const BURST: Duration = Duration::from_millis(5);

impl Bucket {
    pub fn new() -> Self {
        Bucket { free_at: None }
    }

    /// Charges `bytes` at `rate_bps` (`None`: free); the instant to wait
    /// until before they go, if any.
    pub fn charge(&mut self, now: Instant, bytes: usize, rate_bps: Option<u64>) -> Option<Instant> {
        let rate = rate_bps.filter(|&r| r > 0)?;
        let cost = Duration::from_secs_f64(bytes as f64 * 8.0 / rate as f64);
        // Idle time is not saved up beyond a short burst.
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let start = self.free_at.map_or(earliest, |f| f.max(earliest));
        self.free_at = Some(start + cost);
        (start > now).then_some(start)
    }
}

impl Default for Bucket {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// One bottleneck link, sans-IO: the paced transfer and a cross flow
    /// that keeps `cross_queue` of queue standing while it runs. Samples
    /// every 10 ms; returns the rate trace (s, Mbit/s).
    fn run(
        pace: &mut Pace,
        link_bps: f64,
        secs: f64,
        cross: impl Fn(f64) -> Option<Duration>,
    ) -> Vec<(f64, f64)> {
        let t0 = Instant::now();
        let base = 2 * MS;
        let mut own_queue = 0.0f64; // seconds of our own backlog
        let mut trace = Vec::new();
        let step = 0.01;
        let mut t = 0.0;
        while t < secs {
            let rate = pace.rate_bps().unwrap_or(u64::MAX) as f64;
            let cross_q = cross(t);
            // What the link gives us: all of it alone, a fifth beside TCP.
            let share = if cross_q.is_some() {
                link_bps * 0.2
            } else {
                link_bps
            };
            own_queue = (own_queue + (rate - share) / link_bps * step).clamp(0.0, 0.05);
            let q = Duration::from_secs_f64(own_queue) + cross_q.unwrap_or_default();
            pace.on_delay(t0 + Duration::from_secs_f64(t), base + q);
            trace.push((t, rate.min(share) / 1e6));
            t += step;
        }
        trace
    }

    fn mean(trace: &[(f64, f64)], from: f64, to: f64) -> f64 {
        let v: Vec<f64> = trace
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|&(_, r)| r)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    }

    #[test]
    fn an_idle_link_is_found_within_two_seconds_and_held() {
        let mut p = Pace::new(Mode::Background, None, 1_000_000);
        let trace = run(&mut p, 100e6, 10.0, |_| None);
        let m = mean(&trace, 2.0, 10.0);
        assert!(m >= 80.0, "mean {m:.1} Mbit/s of 100");
    }

    /// Slow start overshoots an idle gigabit link (its delay samples lag
    /// the queue it builds): told what got through, by its own windows or
    /// by the TCP stack's delivery-rate samples, it goes on a little under
    /// that, not at half where it got to. Told nothing, it halves.
    #[test]
    fn slow_start_ends_near_what_got_through() {
        let t0 = Instant::now();
        for told in ["windows", "stack", "nothing"] {
            let mut p = Pace::new(Mode::Background, None, 1_000_000);
            let mut i = 0u32;
            // No queue seen yet while the rate doubles past the link.
            while p.rate_bps().unwrap() < 1_200_000_000 {
                p.on_delay(t0 + i * 10 * MS, 2 * MS);
                let got = p.rate_bps().unwrap().min(950_000_000);
                match told {
                    "windows" => p.on_delivered(got / 8 / 100, 10 * MS),
                    // One sample in three low (the sender paused): the
                    // most of them counts.
                    "stack" => p.on_delivery_rate(if i.is_multiple_of(3) { got / 3 } else { got }),
                    _ => {}
                }
                i += 1;
            }
            // Then the queue it built shows (in two samples of three: one is
            // noise); the stack's samples go on meanwhile.
            let stack = told == "stack";
            if stack {
                p.on_delivery_rate(950_000_000);
            }
            p.on_delay(t0 + i * 10 * MS, 6 * MS);
            let peak = p.rate_bps().unwrap();
            if stack {
                p.on_delivery_rate(950_000_000 / 3);
            }
            p.on_delay(t0 + (i + 1) * 10 * MS, 6 * MS);
            let after = p.rate_bps().unwrap();
            if told == "nothing" {
                assert!(after <= peak / 2 + 1, "{after} after {peak}");
            } else {
                assert!(
                    (880_000_000..=950_000_000).contains(&after),
                    "{after} bit/s after slow start, 950M got through ({told})"
                );
            }
        }
    }

    /// A pace past slow start from a 6 Gbit/s first flight on a path whose
    /// stack measures 250 Mbit/s: five samples 5 ms apart, the queue over
    /// the target in the last two. Returns it and the first sample's time.
    fn past_a_first_flight() -> (Pace, Instant) {
        let t0 = Instant::now();
        let mut p = Pace::starting_at(Mode::Background, None, 1, 6_000_000_000);
        for (i, delay) in [2, 2, 2, 8, 8].into_iter().enumerate() {
            p.on_delivery_rate(250_000_000);
            p.on_delay(t0 + i as u32 * 5 * MS, delay * MS);
        }
        (p, t0)
    }

    /// From a first flight far past the path (a LAN's RTT, a 250 Mbit/s
    /// uplink), slow start ends a little under what the stack measured,
    /// not at half where it got to (still ten times the path).
    #[test]
    fn slow_start_from_a_first_flight_ends_at_the_stacks_measure() {
        let (p, _) = past_a_first_flight();
        let after = p.rate_bps().unwrap();
        assert!(
            (225_000_000..=240_000_000).contains(&after),
            "{after} bit/s after slow start on a 250 Mbit/s path"
        );
    }

    /// After a first flight many times the path, a queue that stays clear
    /// is this transfer alone on the path, not others gone: no new slow
    /// start from a quarter of the first flight.
    #[test]
    fn a_clear_queue_after_a_first_flight_start_is_no_restart() {
        let (mut p, t0) = past_a_first_flight();
        let exit = p.rate_bps().unwrap();
        // 400 ms of no queue, well past CLEAR.
        for i in 5..85u32 {
            p.on_delay(t0 + i * 5 * MS, 2 * MS);
        }
        let after = p.rate_bps().unwrap();
        assert!(
            after > exit && after < 2 * exit,
            "{after} bit/s after 400 ms of clear queue from {exit} bit/s"
        );
    }

    #[test]
    fn the_first_flight_is_near_a_lan_link_and_far_under_a_wan_one() {
        // Ten segments of 1448 bytes: 0.1 ms on a LAN, 20 ms across a WAN.
        let lan = first_flight_bps(10, 1448, Duration::from_micros(100));
        assert_eq!(lan, 1_158_400_000);
        let wan = first_flight_bps(10, 1448, 20 * MS);
        assert!(wan < START_BPS / 10, "{wan}");
        assert_eq!(first_flight_bps(10, 1448, Duration::ZERO), 0);
        // As a start it never passes the cap.
        let p = Pace::starting_at(Mode::Background, Some(300_000_000), 1, lan);
        assert_eq!(p.rate_bps(), Some(300_000_000));
    }

    #[test]
    fn a_standing_queue_of_others_brings_it_down_and_their_leaving_back_up() {
        let mut p = Pace::new(Mode::Background, None, 1_000_000);
        // TCP keeps 6 ms of queue from 3 s to 13 s.
        let trace = run(&mut p, 100e6, 20.0, |t| {
            (3.0..13.0).contains(&t).then_some(6 * MS)
        });
        let during = mean(&trace, 11.0, 13.0);
        assert!(during <= 10.0, "still at {during:.1} Mbit/s beside TCP");
        let after = mean(&trace, 16.0, 20.0);
        assert!(after >= 80.0, "only {after:.1} Mbit/s after TCP left");
    }

    #[test]
    fn the_cap_and_the_floor_hold() {
        let mut p = Pace::new(Mode::Background, Some(30_000_000), 2_000_000);
        let trace = run(&mut p, 100e6, 5.0, |_| None);
        assert!(trace.iter().all(|&(_, r)| r <= 30.0 + 1e-9));
        assert_eq!(p.rate_bps(), Some(30_000_000));
        let mut p = Pace::new(Mode::Background, None, 2_000_000);
        run(&mut p, 100e6, 20.0, |t| (t >= 1.0).then_some(20 * MS));
        assert_eq!(p.rate_bps(), Some(2_000_000));
    }

    #[test]
    fn the_rate_stays_within_reach_of_what_got_through() {
        // A short queue whatever the rate (a fast LAN, a noisy server): only
        // what got through holds the rate near the path.
        let mut p = Pace::new(Mode::Background, None, 1_000_000);
        let t0 = Instant::now();
        for i in 0..200u32 {
            p.on_delay(t0 + i * 10 * MS, 2 * MS);
            p.on_delivered(12_500_000 / 10, Duration::from_millis(100)); // 100 Mbit/s
        }
        assert!(
            p.rate_bps().unwrap() <= (100e6 * HEADROOM) as u64,
            "{:?}",
            p.rate_bps()
        );
    }

    #[test]
    fn foreground_is_the_cap_and_ignores_delay() {
        let mut p = Pace::new(Mode::Foreground, None, 1);
        p.on_delay(Instant::now(), 50 * MS);
        assert_eq!(p.rate_bps(), None);
        let p = Pace::new(Mode::Foreground, Some(5_000_000), 1);
        assert_eq!(p.rate_bps(), Some(5_000_000));
    }

    #[test]
    fn one_noisy_sample_is_not_a_queue() {
        let mut p = Pace::new(Mode::Background, None, 1_000_000);
        let t0 = Instant::now();
        for i in 0..100u32 {
            // Every tenth sample 40 ms late (a delayed ACK).
            let d = if i % 10 == 9 { 42 * MS } else { 2 * MS };
            p.on_delay(t0 + i * 10 * MS, d);
        }
        assert!(p.rate_bps().unwrap() > START_BPS * 8, "{:?}", p.rate_bps());
    }

    #[test]
    fn a_path_used_lately_starts_from_half_what_got_through() {
        let t0 = Instant::now();
        let mut m = PathMemory::new();
        assert_eq!(m.start_for(t0, 1u32), START_BPS);
        m.note(t0, 1u32, 900_000_000);
        m.note(t0, 2u32, 50_000_000);
        assert_eq!(m.start_for(t0 + Duration::from_secs(5), 1), 450_000_000);
        // A slow path starts no lower than anyone; a stale one as new.
        assert_eq!(m.start_for(t0, 2), START_BPS);
        assert_eq!(m.start_for(t0 + PATH_MEMORY, 1), START_BPS);
        // Bounded: the oldest goes.
        for a in 3..(PATHS as u32 + 3) {
            m.note(t0 + Duration::from_millis(u64::from(a)), a, 800_000_000);
        }
        assert_eq!(m.paths.len(), PATHS);
        assert_eq!(m.start_for(t0, 1), START_BPS, "the oldest was replaced");
        let p = Pace::starting_at(Mode::Background, Some(300_000_000), 1, 450_000_000);
        assert_eq!(p.rate_bps(), Some(300_000_000), "never past the cap");
    }

    #[test]
    fn the_bucket_spaces_bytes_at_the_rate() {
        let mut b = Bucket::new();
        let t0 = Instant::now();
        assert_eq!(b.charge(t0, 1000, None), None);
        // 1 MB at 8 Mbit/s: the next bytes wait a second.
        assert_eq!(b.charge(t0, 1_000_000, Some(8_000_000)), None);
        let w = b.charge(t0, 1000, Some(8_000_000)).unwrap();
        assert!(w >= t0 + Duration::from_millis(990), "{:?}", w - t0);
        // Long idle time is not saved up.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.charge(later, 10_000, Some(8_000_000)), None);
        assert!(b.charge(later, 10_000, Some(8_000_000)).is_some());
    }
}
