//! A receiver's counters.

/// Counters for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    pub datagrams: u64,
    pub data_symbols: u64,
    pub repair_symbols: u64,
    /// Symbols of blocks already done or being decoded.
    pub redundant_symbols: u64,
    /// Symbols dropped because the buffer cap was reached.
    pub dropped_no_buffer: u64,
    /// Datagrams that did not parse, or failed a check.
    pub malformed: u64,
    pub other_session: u64,
    /// Sessions heard, joined and not (yet) acknowledged, while following
    /// the first one that answers.
    pub unanswered_sessions: u64,
    pub blocks_done: u32,
    /// Blocks that decoded to the wrong hash and were collected again.
    pub hash_failures: u32,
    pub decode_retries: u32,
    /// Blocks decoded from fewer than the fast margin, after settling.
    pub settled_decodes: u32,
    pub feedback_sent: u64,
    /// Symbols the sender sent for blocks we tracked (ESI gaps included).
    pub span: u64,
}

impl ReceiverStats {
    /// Share of data symbols lost on the way, 0..=1.
    pub fn loss(&self) -> f64 {
        if self.span == 0 {
            return 0.0;
        }
        1.0 - (self.data_symbols as f64 / self.span as f64).min(1.0)
    }

    /// The loss rate less one standard error: what the receiver reports to
    /// the sender, which sizes its first pass for the upper quartile of the
    /// reports. Early estimates are noisy and the larger of several noisy
    /// estimates run high (eight receivers at 5% reported up to 8.8% in the
    /// lab); this keeps a noisy receiver from inflating every block for all.
    /// A receiver left short by it is topped up from its NEEDS.
    pub fn reported_loss(&self) -> f64 {
        if self.span == 0 {
            return 0.0;
        }
        let p = self.loss();
        (p - (p * (1.0 - p) / self.span as f64).sqrt()).max(0.0)
    }
}
