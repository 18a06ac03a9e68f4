//! What a receiver measures of the path from its sender, for the sender's
//! rate controller: how much arrived, how much was lost, and whether a
//! queue is building up (the one-way delay above the least seen lately).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::wire::PathReport;

/// The least one-way delay is kept per bucket of this length...
const BASE_BUCKET: Duration = Duration::from_secs(5);
/// ...for this many buckets: the base delay is the least of the last 20 s.
/// Short enough that a drift of the two clocks (100 ppm at worst) adds
/// at most 2 ms, long enough to outlast a sender's queue building up.
const BASE_BUCKETS: usize = 4;

/// Delay and arrival counters of one interval between reports.
#[derive(Debug)]
pub(crate) struct PathMeter {
    epoch: Instant,
    /// The sender's clock unwrapped: the last raw value and its unwrapped
    /// microseconds.
    last_sent: Option<(u32, i64)>,
    /// Least one-way delay per bucket, newest last.
    base: VecDeque<(Instant, i64)>,
    interval_start: Instant,
    interval_min: Option<i64>,
    bytes: u64,
    /// The receiver's span and symbol counts at the last report.
    span_at: u64,
    symbols_at: u64,
}

impl PathMeter {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            epoch: now,
            last_sent: None,
            base: VecDeque::new(),
            interval_start: now,
            interval_min: None,
            bytes: 0,
            span_at: 0,
            symbols_at: 0,
        }
    }

    /// A data datagram of `bytes` arrived at `now`, sent at `sent_us` by the
    /// sender's clock. Symbols of decoded blocks count too: the path
    /// carried them.
    pub(crate) fn on_data(&mut self, now: Instant, sent_us: u32, bytes: usize) {
        self.bytes += bytes as u64;
        // Consecutive send times are close; a wrap or a reordered datagram
        // shows as a small signed step.
        let sent = match self.last_sent {
            None => i64::from(sent_us),
            Some((raw, unwrapped)) => unwrapped + i64::from(sent_us.wrapping_sub(raw) as i32),
        };
        self.last_sent = Some((sent_us, sent));
        let arrived = now.saturating_duration_since(self.epoch).as_micros() as i64;
        let owd = arrived - sent;
        self.interval_min = Some(self.interval_min.map_or(owd, |m| m.min(owd)));
        match self.base.back_mut() {
            Some((start, min)) if now < *start + BASE_BUCKET => *min = (*min).min(owd),
            _ => {
                self.base.push_back((now, owd));
                if self.base.len() > BASE_BUCKETS {
                    self.base.pop_front();
                }
            }
        }
    }

    /// The report for the interval that ends at `now`, given the receiver's
    /// running counts of symbols spanned by ESI and received; starts the
    /// next interval.
    pub(crate) fn report(&mut self, now: Instant, span: u64, symbols: u64) -> PathReport {
        let elapsed = now.saturating_duration_since(self.interval_start);
        let spanned = span.saturating_sub(self.span_at);
        let got = symbols.saturating_sub(self.symbols_at);
        let base = self.base.iter().map(|&(_, m)| m).min();
        let delay = match (self.interval_min, base) {
            (Some(m), Some(b)) => (m - b).max(0),
            _ => 0,
        };
        let kbps = if elapsed.is_zero() {
            0
        } else {
            (self.bytes as f64 * 8.0 / 1000.0 / elapsed.as_secs_f64()) as u64
        };
        let report = PathReport {
            span: clamp_u32(spanned),
            lost: clamp_u32(spanned.saturating_sub(got)),
            recv_kbps: clamp_u32(kbps),
            delay_us: clamp_u32(delay as u64),
            interval_us: clamp_u32(elapsed.as_micros() as u64),
        };
        self.interval_start = now;
        self.interval_min = None;
        self.bytes = 0;
        self.span_at = span;
        self.symbols_at = symbols;
        report
    }
}

fn clamp_u32(v: u64) -> u32 {
    v.min(u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_growing_queue_shows_as_delay_above_the_base() {
        let start = Instant::now();
        let mut m = PathMeter::new(start);
        // The sender's clock is far ahead of ours: only differences count.
        let offset = 4_000_000_000u32;
        for i in 0..100u64 {
            let sent = offset.wrapping_add((i * 1000) as u32);
            m.on_data(start + ms(i) + ms(2), sent, 1000);
        }
        let r = m.report(start + ms(100), 100, 100);
        assert_eq!(r.delay_us, 0);
        assert_eq!(r.lost, 0);
        assert_eq!(r.interval_us, 100_000);
        // 100 kB in 100 ms.
        assert_eq!(r.recv_kbps, 8000);
        // Now each datagram waits 10 ms more than the fastest did; the
        // sender's clock wraps meanwhile.
        for i in 100..200u64 {
            let sent = offset.wrapping_add((i * 1000) as u32);
            m.on_data(start + ms(i) + ms(12), sent, 1000);
        }
        let r = m.report(start + ms(200), 200, 190);
        assert_eq!(r.delay_us, 10_000);
        assert_eq!((r.span, r.lost), (100, 10));
    }

    #[test]
    fn an_interval_without_data_reports_no_delay_and_no_rate() {
        let start = Instant::now();
        let mut m = PathMeter::new(start);
        let r = m.report(start + ms(40), 0, 0);
        assert_eq!(
            r,
            PathReport {
                interval_us: 40_000,
                ..PathReport::default()
            }
        );
    }

    #[test]
    fn the_base_forgets_delays_older_than_its_window() {
        let start = Instant::now();
        let mut m = PathMeter::new(start);
        m.on_data(start, 0, 1);
        // A route change adds 30 ms for good: after the window it is the
        // new base, not a standing queue.
        let later = start + BASE_BUCKET * (BASE_BUCKETS as u32 + 1);
        for i in 0..=(BASE_BUCKETS as u64 + 1) {
            let at = start + BASE_BUCKET * (i as u32 + 1);
            let sent = at.duration_since(start).as_micros() as u32;
            m.on_data(at + ms(30), sent, 1);
        }
        m.report(later, 0, 0);
        let sent = (later + ms(1)).duration_since(start).as_micros() as u32;
        m.on_data(later + ms(31), sent, 1);
        assert_eq!(m.report(later + ms(40), 0, 0).delay_us, 0);
    }
}
