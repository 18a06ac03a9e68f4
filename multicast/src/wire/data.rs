//! The data plane's bodies: what a session announces, its symbols, and
//! the receivers' feedback.

use serde::{Deserialize, Serialize};

use super::Digest;

/// What a session announces about the object it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub file_size: u64,
    /// Bytes per block in the file; a multiple of `symbol_size`.
    pub block_size: u32,
    /// T: bytes of every symbol payload.
    pub symbol_size: u16,
    /// Redundant with the sizes above, and checked against them.
    pub block_count: u32,
    /// SHA-256 of the whole file. A sender that hashes the file as it sends
    /// it (rather than before) announces `None` until it has read all of
    /// it, then this in every SESSION; receivers check the file against it
    /// once they hold every block.
    pub file_sha256: Option<Digest>,
    /// UDP port on the sender's address that takes receiver feedback.
    pub feedback_port: u16,
    /// How often receivers report what they need, in milliseconds.
    pub feedback_interval_ms: u32,
    /// File name for display; may be empty.
    pub name: String,
    /// The sender is paused (an operator's order): no data comes until it
    /// resumes, and the session is alive all the same.
    pub paused: bool,
}

/// One symbol of one block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Data<'a> {
    pub block: u32,
    pub esi: u32,
    /// The sender's clock when it sent this, in microseconds, wrapping:
    /// receivers follow the trend of the one-way delay from it (a queue
    /// building up on the path), never its absolute value.
    pub sent_us: u32,
    #[serde(borrow)]
    pub payload: &'a [u8],
}

/// What a receiver still needs of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need {
    pub block: u32,
    /// Symbols still needed to decode.
    pub need: u32,
    /// Highest ESI of this block seen so far, `None` if none was seen.
    /// Lets the sender count the symbols still in flight.
    pub highest_esi: Option<u32>,
}

/// What a receiver saw of the path from the sender since its last report:
/// the rate controller's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathReport {
    /// Symbols the sender sent for blocks this receiver followed in the
    /// interval, counted by ESI (those lost included).
    pub span: u32,
    /// Of those, how many never arrived.
    pub lost: u32,
    /// DATA that arrived in the interval, per second, in kbit/s, counted
    /// as on the wire (each datagram with 42 bytes of Ethernet, IP and UDP
    /// headers), as the sender's rate is.
    pub recv_kbps: u32,
    /// Queueing delay: the least one-way delay in the interval above the
    /// least seen recently, in microseconds.
    pub delay_us: u32,
    /// How long the interval was, in microseconds: the sender compares
    /// what arrived with what it sent over the same span.
    pub interval_us: u32,
}

/// A receiver's message to the sender (unicast).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Feedback {
    Join,
    /// Sent every feedback interval while receiving, `needs` empty or not.
    Needs {
        /// Share of data symbols lost since the start, in parts per million:
        /// what the first pass provisions repair for.
        loss_ppm: u32,
        path: PathReport,
        needs: Vec<Need>,
    },
    Done,
}
