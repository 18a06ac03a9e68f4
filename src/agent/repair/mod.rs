//! Peer repair over TCP, the thin tokio side of the `repair` crate:
//!
//! - [`server`]: answers NEED for blocks this agent holds verified, under a
//!   concurrency limit and an upload rate cap (in background mode each
//!   upload also yields to other traffic, [`super::tcp::UploadPace`]), and
//!   JOIN for the members of a content at a rendezvous point;
//! - [`client`]: fetches blocks from one peer with timeouts, and joins a
//!   rendezvous point's members;
//! - [`stream`]: both sides' frame reading and writing, through the
//!   fleet-key handshake and its ciphers.

use std::time::Duration;

mod client;
mod server;
mod stream;

pub use client::{
    PIPELINE_DEPTH, PeerError, PeerFailure, PeerJob, PeerResult, fetch_from_peer, join_site,
};
pub use server::{CheckedFiles, note_verified, serve};

/// A peer that does not complete a frame (or a handshake) within this long
/// is given up: one that trickles a byte at a time gains nothing.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// A block from one peer takes at most this long from its turn, however
/// it trickles (4 MiB at 600 kbit/s); then the next peer, or the origin.
const BLOCK_DEADLINE: Duration = Duration::from_secs(60);
/// Requests are a few dozen bytes: a longer frame declared to the server
/// is hostile, and is refused before any of it is buffered.
const MAX_REQUEST: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
