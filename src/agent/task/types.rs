//! What a task is and what its status shows: the API's JSON.

use super::*;

/// What `POST /v1/tasks` takes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Chosen by the console so one id names the task on every agent;
    /// generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    pub manifest: Manifest,
    #[serde(default)]
    pub cache_only: bool,
    /// Shell command run with the verified file's path as `$1` (and in
    /// SOMCAST_FILE); never with `cache_only`.
    #[serde(default)]
    pub run: Option<String>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub pin_days: Option<u32>,
    /// Multicast rate in bit/s on the wire.
    #[serde(default)]
    pub rate_bps: Option<u64>,
    /// Higher first among this agent's tasks.
    #[serde(default)]
    pub priority: u8,
    #[serde(default)]
    pub run_timeout_s: Option<u64>,
    /// The publisher key that signed the task; `None`: unsigned (lab mode).
    #[serde(default)]
    pub signed_by: Option<String>,
    /// Encrypt the package on the LAN when this agent multicasts it.
    #[serde(default)]
    pub encrypt: bool,
    /// Where the agent POSTs its report when the task ends.
    #[serde(default)]
    pub report_url: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Electing,
    Fetching,
    Waiting,
    Sending,
    Receiving,
    Repairing,
    Installing,
    Done,
    Failed,
    Cancelled,
}

impl State {
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Done | State::Failed | State::Cancelled)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bytes {
    pub multicast: u64,
    pub peers: u64,
    pub origin: u64,
    /// From the site's rendezvous points (see `crate::topology`).
    #[serde(default)]
    pub rendezvous: u64,
    /// Repair bytes by the node id of the peer that served them.
    #[serde(default)]
    pub by_peer: std::collections::BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstallResult {
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub output_tail: String,
}

/// What `GET /v1/tasks/{id}` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskStatus {
    pub id: String,
    pub node: String,
    pub content_id: String,
    pub name: String,
    pub size: u64,
    pub cache_only: bool,
    pub state: State,
    /// representative, receiver or cached.
    pub role: Option<String>,
    /// The agent's site in the topology when the task started, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub blocks_done: u32,
    pub block_count: u32,
    pub bytes: Bytes,
    pub created: u64,
    pub finished: Option<u64>,
    pub seconds: Option<f64>,
    pub error: Option<String>,
    pub install: Option<InstallResult>,
    /// When the install command was started (unix seconds), recorded on
    /// disk before it starts: a restarted agent that finds it set without
    /// a result never starts the command again.
    #[serde(default)]
    pub install_started: Option<u64>,
    /// Time spent fetching from peers (wall clock of the repair rounds).
    #[serde(default)]
    pub repair_seconds: f64,
    pub path: Option<String>,
    pub pinned_until: Option<u64>,
    /// The publisher key that signed the task; `None`: unsigned (lab mode).
    #[serde(default)]
    pub signed_by: Option<String>,
    /// Why the task went the way it did: its role, and each time it moved
    /// on (a peer dropped, a representative abandoned or lost, the origin
    /// asked), oldest first, the newest `MAX_HISTORY` kept.
    #[serde(default)]
    pub history: Vec<Step>,
    /// Held by an operator's pause order until a resume: no multicast, no
    /// fetching, no install; what it holds is kept.
    #[serde(default)]
    pub paused: bool,
    /// As representative: what its multicast is doing (the rate and why,
    /// the receivers and the loss they report).
    #[serde(default)]
    pub multicast: Option<MulticastView>,
}

/// A representative's multicast, for status and metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MulticastView {
    pub rate_bps: u64,
    /// Why the rate is what it is: starting, clear, at the maximum, delay
    /// or loss toward a receiver, at the minimum, fixed.
    pub rate_reason: Option<String>,
    pub receivers_joined: u32,
    pub receivers_done: u32,
    /// Left behind as far slower than the rest: they finish from peers.
    pub receivers_left: u32,
    /// The receivers reporting the most loss, worst first.
    pub worst_receivers: Vec<ReceiverLossView>,
    pub wire_bytes: u64,
    /// Since the data started.
    pub data_seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReceiverLossView {
    pub receiver: String,
    pub loss: f64,
    pub left: bool,
}

impl From<&multicast::sender::SenderStats> for MulticastView {
    fn from(s: &multicast::sender::SenderStats) -> Self {
        Self {
            rate_bps: s.rate_bps,
            rate_reason: s.rate_reason.map(|r| r.to_string()),
            receivers_joined: s.receivers_joined,
            receivers_done: s.receivers_done,
            receivers_left: s.receivers_left,
            worst_receivers: (s.worst_receivers.iter())
                .map(|r| ReceiverLossView {
                    receiver: format!("{:016x}", r.receiver),
                    loss: f64::from(r.loss_ppm) / 1e6,
                    left: r.left,
                })
                .collect(),
            wire_bytes: s.wire_bytes,
            data_seconds: 0.0,
        }
    }
}

/// Steps a task status keeps.
pub const MAX_HISTORY: usize = 32;

/// One entry of a task's history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    /// Unix seconds.
    pub at: u64,
    pub what: String,
}

/// A task as it is kept on disk.
#[derive(Serialize, Deserialize)]
pub(super) struct Stored {
    pub spec: TaskSpec,
    pub status: TaskStatus,
}

/// Why a task cannot be accepted.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("bad manifest: {0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("a cache-only task never runs a command: drop `run` or `cache_only`")]
    RunWithCacheOnly,
    #[error("task id {0:?} must be 1-64 characters of a-z, A-Z, 0-9, - and _")]
    BadId(String),
    #[error("task {0} exists with another manifest or options")]
    Conflict(String),
    #[error("delay {0} ms is more than a day")]
    Delay(u64),
    #[error("the command ({0} bytes) must be 1-{MAX_COMMAND} bytes")]
    Command(usize),
    #[error("the task asks for --encrypt, but this agent has no fleet key to encrypt with")]
    EncryptWithoutKey,
    #[error("cannot record the task on disk ({0}); nothing was started")]
    Storage(String),
}
