//! Pacing over bytes on the wire: a token bucket for the average rate, and a
//! second one that caps how fast lost time is made up.

use std::time::{Duration, Instant};

/// IPv4 (20) + UDP (8) + Ethernet (14) headers: what a datagram costs on a
/// link beyond its payload. Pacing counts them so that `--rate` is the rate a
/// switch port sees.
pub const WIRE_OVERHEAD: usize = 42;

/// How far above the rate the sender may run while it makes up lost time.
pub const CATCH_UP: f64 = 0.03;
/// The most sending time the pacer banks for the sender to make up.
pub const MAX_LAG: Duration = Duration::from_millis(100);
/// Bytes that may go back to back: 2 ms of traffic, at least three frames.
const BURST_SECS: f64 = 0.002;

/// Paces datagrams to a rate in bits per second.
///
/// Two token buckets. The rate bucket keeps the average: while the sender
/// has datagrams waiting, time it could not use (a driver woken late, a
/// thread that waited for a CPU on a busy host) is banked, up to
/// [`MAX_LAG`], and made up later. The peak bucket spaces that making up:
/// never faster than [`CATCH_UP`] above the rate, and at most `burst` bytes
/// back to back. Time with nothing to send ([`Pacer::idle`]) is not banked
/// beyond the burst, so after an idle spell the sender does not run ahead.
#[derive(Debug, Clone)]
pub struct Pacer {
    bytes_per_sec: f64,
    peak_per_sec: f64,
    burst: f64,
    max_lag: f64,
    tokens: f64,
    peak: f64,
    idle: bool,
    last: Instant,
}

impl Pacer {
    /// `rate_bps` of 0 means unpaced.
    pub fn new(now: Instant, rate_bps: u64) -> Self {
        let bytes_per_sec = rate_bps as f64 / 8.0;
        let burst = (bytes_per_sec * BURST_SECS).max(3.0 * 1500.0);
        Self {
            bytes_per_sec,
            peak_per_sec: bytes_per_sec * (1.0 + CATCH_UP),
            burst,
            max_lag: (bytes_per_sec * MAX_LAG.as_secs_f64()).max(burst),
            tokens: burst,
            peak: burst,
            idle: true,
            last: now,
        }
    }

    /// Changes the rate from `now` on; time before `now` counts at the old
    /// one. A rate of 0 stays unpaced.
    pub fn set_rate(&mut self, now: Instant, rate_bps: u64) {
        if self.bytes_per_sec == 0.0 || rate_bps == 0 {
            return;
        }
        self.refill(now);
        let next = Self::new(now, rate_bps);
        self.bytes_per_sec = next.bytes_per_sec;
        self.peak_per_sec = next.peak_per_sec;
        self.burst = next.burst;
        self.max_lag = next.max_lag;
        self.tokens = self.tokens.min(self.max_lag);
        self.peak = self.peak.min(self.burst);
    }

    pub fn rate_bps(&self) -> u64 {
        (self.bytes_per_sec * 8.0) as u64
    }

    fn refill(&mut self, now: Instant) {
        if self.bytes_per_sec == 0.0 {
            return;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        let cap = if self.idle { self.burst } else { self.max_lag };
        self.tokens = (self.tokens + dt * self.bytes_per_sec).min(cap);
        self.peak = (self.peak + dt * self.peak_per_sec).min(self.burst);
    }

    /// Whether a datagram may go now.
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.bytes_per_sec == 0.0 || (self.tokens > 0.0 && self.peak > 0.0)
    }

    /// Accounts for a datagram of `payload` bytes just sent.
    pub fn spend(&mut self, payload: usize) {
        if self.bytes_per_sec != 0.0 {
            let bytes = (payload + WIRE_OVERHEAD) as f64;
            self.tokens -= bytes;
            self.peak -= bytes;
            self.idle = false;
        }
    }

    /// The sender has nothing to send: from `now` until its next datagram,
    /// no time is banked beyond the burst, and what was banked is dropped.
    pub fn idle(&mut self, now: Instant) {
        self.refill(now);
        self.idle = true;
        self.tokens = self.tokens.min(self.burst);
    }

    /// The latest time the pacer was told of.
    pub fn last_seen(&self) -> Instant {
        self.last
    }

    /// When the next datagram may go, if it may not go now.
    pub fn next_ready(&self) -> Option<Instant> {
        if self.bytes_per_sec == 0.0 || (self.tokens > 0.0 && self.peak > 0.0) {
            return None;
        }
        let wait = ((1.0 - self.tokens) / self.bytes_per_sec)
            .max((1.0 - self.peak) / self.peak_per_sec)
            .max(0.0);
        Some(self.last + Duration::from_secs_f64(wait))
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;

    #[test]
    fn long_run_average_matches_the_rate() {
        let start = Instant::now();
        let mut now = start;
        let mut pacer = Pacer::new(now, 100_000_000);
        let mut sent = 0usize;
        while now < start + Duration::from_secs(1) {
            if pacer.ready(now) {
                pacer.spend(1400);
                sent += 1400 + WIRE_OVERHEAD;
            } else {
                now = pacer.next_ready().unwrap();
            }
        }
        let bits = sent as f64 * 8.0;
        assert!((bits / 100e6 - 1.0).abs() < 0.01, "sent {bits} bits in 1 s");
    }

    #[test]
    fn waking_every_half_millisecond_keeps_the_rate() {
        // The send loop sleeps at least 0.5 ms and then sends what the
        // bucket allows: several datagrams a wake, the same average.
        let start = Instant::now();
        let mut pacer = Pacer::new(start, 190_000_000);
        let mut sent = 0usize;
        let mut now = start;
        while now < start + Duration::from_secs(1) {
            while pacer.ready(now) {
                pacer.spend(1420);
                sent += 1420 + WIRE_OVERHEAD;
            }
            now += Duration::from_micros(500);
        }
        let bits = sent as f64 * 8.0;
        assert!((bits / 190e6 - 1.0).abs() < 0.01, "sent {bits} bits in 1 s");
    }

    #[test]
    fn idle_time_does_not_bank_more_than_the_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, 8_000_000);
        let later = start + Duration::from_secs(10);
        let mut burst = 0;
        while pacer.ready(later) {
            pacer.spend(1400);
            burst += 1;
        }
        assert!(burst <= 4, "{burst} frames in a burst");
    }

    #[derive(Clone, Copy)]
    enum Loop {
        /// Awake, with datagrams waiting.
        Sending,
        /// Datagrams waiting, but the thread does not run.
        Stalled,
        /// Awake, with nothing to send.
        Idle,
    }

    const FRAME: usize = 1420;

    const RATE: u64 = 190_000_000;

    /// Drives a pacer at [`RATE`] as the send loop does: a wake every 0.5 ms
    /// that sends what the pacer allows, for `secs` seconds, except that
    /// during `gap` (seconds in) the loop is in state `during`. Returns the
    /// wire bytes sent at each wake, by its time in seconds.
    fn drive(secs: f64, gap: Range<f64>, during: Loop) -> Vec<(f64, usize)> {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, RATE);
        let mut sent = Vec::new();
        let mut t = 0.0;
        while t < secs {
            let now = start + Duration::from_secs_f64(t);
            let state = if gap.contains(&t) {
                during
            } else {
                Loop::Sending
            };
            match state {
                Loop::Stalled => {}
                Loop::Idle => pacer.idle(now),
                Loop::Sending => {
                    let mut bytes = 0;
                    while pacer.ready(now) {
                        pacer.spend(FRAME);
                        bytes += FRAME + WIRE_OVERHEAD;
                    }
                    sent.push((t, bytes));
                }
            }
            t += 0.0005;
        }
        sent
    }

    /// Checks that `sent` is `secs` seconds' worth at [`RATE`], within 0.5%.
    fn assert_sent_for(sent: &[(f64, usize)], secs: f64) {
        let bits: f64 = sent.iter().map(|&(_, b)| b as f64 * 8.0).sum();
        let expected = RATE as f64 * secs;
        assert!(
            (bits / expected - 1.0).abs() < 0.005,
            "sent {bits} bits, {secs} s at the rate is {expected}"
        );
    }

    /// Checks that no 10 ms of `sent` ran faster than `factor` times the
    /// rate, beyond `burst` bits.
    fn assert_peak(sent: &[(f64, usize)], factor: f64, burst: f64) {
        let window = 0.01;
        let limit = RATE as f64 * factor * window + burst;
        for (i, &(from, _)) in sent.iter().enumerate() {
            let bits: f64 = sent[i..]
                .iter()
                .take_while(|&&(t, _)| t < from + window)
                .map(|&(_, b)| b as f64 * 8.0)
                .sum();
            assert!(
                bits <= limit,
                "{bits} bits in 10 ms from {from} s, limit {limit}"
            );
        }
    }

    #[test]
    fn a_stalled_sender_makes_up_the_time_no_faster_than_the_peak() {
        // 30 ms without a CPU, 0.2 s in: made up at 3% within about 1 s.
        let sent = drive(1.5, 0.2..0.23, Loop::Stalled);
        assert_sent_for(&sent, 1.5);
        let frame_bits = ((FRAME + WIRE_OVERHEAD) * 8) as f64;
        assert_peak(
            &sent,
            1.0 + CATCH_UP,
            RATE as f64 * BURST_SECS + 2.0 * frame_bits,
        );
    }

    #[test]
    fn lag_beyond_the_cap_is_not_made_up() {
        // 0.3 s lost, of which MAX_LAG is made up.
        let sent = drive(5.0, 0.1..0.4, Loop::Stalled);
        assert_sent_for(&sent, 5.0 - 0.3 + MAX_LAG.as_secs_f64());
    }

    #[test]
    fn idle_time_is_not_made_up() {
        let sent = drive(1.6, 0.5..0.6, Loop::Idle);
        assert_sent_for(&sent, 1.5);
        assert_peak(&sent, 1.0, 2.0 * RATE as f64 * BURST_SECS);
    }
}
