//! Unicast repair between peers. A receiver that still lacks block b asks
//! a peer that holds it decoded: "block b, I hold k of K, highest ESI e".
//! The peer answers with symbols: the block's source symbols when the
//! requester holds none (that is the block itself), otherwise fresh repair
//! symbols at ESIs far above anything a multicast sender mints, so no
//! bookkeeping of who holds which symbol is needed. The requester stops the
//! stream as soon as the block decodes and checks its SHA-256; a peer whose
//! symbols do not decode to the right block is dropped.
//!
//! - [`frame`]: framed postcard bodies (magic, version, kind, length) with a
//!   size cap; docs/PROTOCOL.md §4.
//! - [`serve`]: the answering side, sans-IO.
//! - [`fetch`]: the asking side for one block, sans-IO.
//! - [`pipeline`]: the asking side for many blocks from one peer over one
//!   connection, requests pipelined, sans-IO.
//! - [`plan`]: which missing block to ask of which peer, and what each
//!   answer changes (busy, not held, failed peers), sans-IO.
//! - [`choose`]: which peer to ask, spread by load, with a per-peer limit.
//! - [`checked`]: which blocks of which file version a serving peer has
//!   hash-checked already, bounded and for a while.
//! - [`members`]: who fetches a content through a rendezvous point, and
//!   who fetches for the others once it is gone.
//! - [`pace`]: the rate of a unicast transfer (a repair upload, an origin
//!   fetch) that yields to other traffic on measured delay, sans-IO.

pub mod checked;
pub mod choose;
pub mod fetch;
pub mod frame;
pub mod members;
pub mod pace;
pub mod pipeline;
pub mod plan;
pub mod serve;
#[cfg(test)]
mod test_file;

pub use choose::Chooser;
pub use fetch::{BlockFetch, FetchStep, Misbehavior};
pub use frame::{Frame, FrameError};
pub use pipeline::Pipeline;
pub use plan::{Answer, Ask, PlanConfig, PlanEvent, RepairPlan};
pub use serve::{Serving, Want};
