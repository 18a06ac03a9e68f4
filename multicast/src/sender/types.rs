//! What a sender is configured with, is handed, and reports.

use super::*;

/// Sender tuning. Every field has a sensible default.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// The most bits per second on the wire, headers included; 0 for
    /// unpaced (and no rate control).
    pub rate_bps: u64,
    /// The least the rate controller goes down to; `rate_bps` for a fixed
    /// rate.
    pub rate_min_bps: u64,
    pub rate_mode: crate::rate::Mode,
    pub slow_receivers: crate::rate::SlowReceivers,
    /// Least share of repair symbols per block in the first pass, percent.
    pub overhead_pct: u32,
    /// Bytes of blocks sent interleaved at once. Receivers buffer about
    /// this much (their default cap is 48 MiB), so keep it well below that.
    pub interleave_bytes: u64,
    pub announce_interval: Duration,
    /// Least interval between a receiver's reports; grows with receivers.
    pub feedback_interval: Duration,
    /// Joins to wait for before data; 0 to start after `startup`.
    pub min_receivers: u32,
    /// Longest wait for `min_receivers`; then data starts anyway.
    pub join_timeout: Duration,
    /// Announce-only time before data when not waiting for joins.
    pub startup: Duration,
    /// A joined receiver silent this long is given up on.
    pub receiver_timeout: Duration,
    /// With nobody joined, how long to wait for feedback after the pass.
    pub linger: Duration,
    /// Bytes the driver adds to every datagram below this machine (the
    /// fleet key's seal): the pacer and the byte counts include them.
    pub seal_overhead: usize,
}

/// The least rate the controller falls to by default: enough to keep a
/// session alive beside traffic that fills the link.
pub const DEFAULT_RATE_MIN: u64 = 1_000_000;

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            rate_bps: 100_000_000,
            rate_min_bps: DEFAULT_RATE_MIN,
            rate_mode: crate::rate::Mode::Background,
            slow_receivers: crate::rate::SlowReceivers::Wait,
            overhead_pct: 5,
            interleave_bytes: 16 << 20,
            announce_interval: Duration::from_millis(100),
            feedback_interval: Duration::from_millis(40),
            min_receivers: 0,
            join_timeout: Duration::from_secs(60),
            startup: Duration::from_millis(300),
            receiver_timeout: Duration::from_secs(10),
            linger: Duration::from_secs(1),
            seal_overhead: 0,
        }
    }
}

/// What a session carries: the file's geometry and hashes.
#[derive(Clone, Debug)]
pub struct SenderObject {
    pub layout: Layout,
    /// SHA-256 of each block's file bytes; `None` for those the encoder is
    /// to hash as it reads them (see [`EncodedBatch::hashes`]).
    pub hashes: Vec<Option<Digest>>,
    /// `None` when the encoder is to hash the file as it reads it.
    pub file_sha256: Option<Digest>,
    /// Shown to receivers; cut to `wire::MAX_NAME_LEN` bytes.
    pub name: String,
}

/// Work for the encoder: symbols of one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodeJob {
    pub block: u32,
    /// Also return the K source symbols (the padded block).
    pub with_source: bool,
    /// First repair ESI (>= K) and how many.
    pub repair_first_esi: u32,
    pub repair_count: u32,
}

/// What the encoder made for a job. An encoder may answer a job in two
/// batches: the source symbols as soon as the block is read (with `more`
/// set), then the repair symbols once they are encoded, so the link need
/// not wait for the encoding.
#[derive(Debug)]
pub struct EncodedBatch {
    pub block: u32,
    /// The padded block, K*T bytes, when the job asked for source symbols.
    pub source: Option<Vec<u8>>,
    pub repair_first_esi: u32,
    /// `repair_count` symbols back to back.
    pub repair: Vec<u8>,
    /// Another batch for the same job follows.
    pub more: bool,
    /// Blocks hashed for the first time by this job's read, for a sender
    /// that was not given their hashes.
    pub hashes: Vec<(u32, Digest)>,
    /// The whole file's hash, once the encoder has read all of it (for a
    /// sender that was not given it).
    pub file_sha256: Option<Digest>,
}

/// Things a driver may want to show or log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderEvent {
    Joined {
        receiver: u64,
        from: SocketAddr,
    },
    DataStarted {
        receivers: u32,
    },
    /// `min_receivers` were not all there when `join_timeout` ran out.
    StartedShort {
        joined: u32,
        wanted: u32,
    },
    PassDone {
        pass: u32,
    },
    ReceiverDone {
        receiver: u64,
    },
    ReceiverLost {
        receiver: u64,
    },
    /// The data paused, or resumed (see [`Sender::set_paused`]).
    Paused,
    Resumed,
    /// The rate controller left this receiver to finish from elsewhere.
    LeftBehind {
        receiver: u64,
    },
    Finished,
}

/// Counters for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SenderStats {
    pub datagrams: u64,
    /// UDP payload bytes sent.
    pub bytes: u64,
    /// Bytes including IP, UDP and Ethernet headers.
    pub wire_bytes: u64,
    /// Of those, DATA's.
    pub data_wire_bytes: u64,
    pub source_symbols: u64,
    pub repair_symbols: u64,
    /// Repair symbols sent because of feedback, beyond the first pass.
    pub feedback_repair_symbols: u64,
    pub feedback_datagrams: u64,
    /// Datagrams that did not parse or belonged to no session of ours.
    pub dropped_datagrams: u64,
    pub receivers_joined: u32,
    pub receivers_done: u32,
    pub receivers_lost: u32,
    /// Largest loss any receiver reported, parts per million.
    pub max_loss_ppm: u32,
    /// Receivers left behind as far slower than the rest.
    pub receivers_left: u32,
    /// The rate now, and why (`None` before the data starts).
    pub rate_bps: u64,
    pub rate_reason: Option<crate::rate::Reason>,
    /// The receivers still receiving that report the most loss, worst
    /// first (at most [`WORST_RECEIVERS`]), as of the last announcement.
    pub worst_receivers: Vec<ReceiverLoss>,
}

/// Receivers [`SenderStats::worst_receivers`] lists.
pub const WORST_RECEIVERS: usize = 8;

/// One receiver's reported loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiverLoss {
    pub receiver: u64,
    /// Since its start, parts per million.
    pub loss_ppm: u32,
    /// Left behind by the rate control.
    pub left: bool,
}
