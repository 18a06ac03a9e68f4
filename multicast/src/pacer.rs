//! Token bucket over bytes on the wire.

use std::time::{Duration, Instant};

/// IPv4 (20) + UDP (8) + Ethernet (14) headers: what a datagram costs on a
/// link beyond its payload. Pacing counts them so that `--rate` is the rate a
/// switch port sees.
pub const WIRE_OVERHEAD: usize = 42;

/// Paces datagrams to a rate in bits per second.
///
/// The bucket holds at most `burst` bytes, so after an idle spell the sender
/// does not flood the link; within that it lets a driver that wakes late
/// catch up, which keeps the average exact even with coarse sleeps.
#[derive(Debug, Clone)]
pub struct Pacer {
    bytes_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    /// `rate_bps` of 0 means unpaced.
    pub fn new(now: Instant, rate_bps: u64) -> Self {
        let bytes_per_sec = rate_bps as f64 / 8.0;
        // 2 ms of traffic, and at least three full frames.
        let burst = (bytes_per_sec * 0.002).max(3.0 * 1500.0);
        Self {
            bytes_per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.bytes_per_sec == 0.0 {
            return;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.bytes_per_sec).min(self.burst);
    }

    /// Whether a datagram may go now.
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.bytes_per_sec == 0.0 || self.tokens > 0.0
    }

    /// Accounts for a datagram of `payload` bytes just sent.
    pub fn spend(&mut self, payload: usize) {
        if self.bytes_per_sec != 0.0 {
            self.tokens -= (payload + WIRE_OVERHEAD) as f64;
        }
    }

    /// The latest time the pacer was told of.
    pub fn last_seen(&self) -> Instant {
        self.last
    }

    /// When the next datagram may go, if it may not go now.
    pub fn next_ready(&self) -> Option<Instant> {
        if self.bytes_per_sec == 0.0 || self.tokens > 0.0 {
            return None;
        }
        let wait = (-self.tokens + 1.0) / self.bytes_per_sec;
        Some(self.last + Duration::from_secs_f64(wait))
    }
}

#[cfg(test)]
mod tests {
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
}
