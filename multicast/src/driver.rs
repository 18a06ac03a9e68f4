//! Drivers: the sans-IO sessions wired to a UDP socket, a file and one
//! worker thread each (encoding on the sending side, decoding and writing on
//! the receiving side), so the thread that paces or receives never stalls
//! behind RaptorQ. They block; run them on a thread of their own (or
//! `spawn_blocking` under tokio).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::codec::LayoutError;
/// Positional file I/O on every OS (used by the agent's cache as well).
pub use crate::fileio::{read_exact_at, start_writeback, write_all_at};
use crate::receiver::ReceiveFailure;
use crate::socket::SocketError;

mod decode;
mod encode;
mod receive;
mod send;
pub use receive::{
    RecvOptions, RecvProgress, RecvReport, ResumeInto, partial_path, receive_file, receive_on,
    receive_resume,
};
pub use send::{SendOptions, SendProgress, SendReport, send_file};

/// How often progress callbacks run.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(100);
#[derive(Debug, Error)]
pub enum SendError {
    #[error("cannot read {path}: {source} (check the path and that it is readable)")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} changed while it was being sent (block {block} no longer matches its hash); send it again once it is stable"
    )]
    FileChanged { path: PathBuf, block: u32 },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("sending to the group failed: {0}")]
    Send(#[source] io::Error),
    #[error("the known block hashes do not match the file's block count")]
    HashCount,
    #[error("stopped")]
    Stopped,
}

#[derive(Debug, Error)]
pub enum RecvError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(
        "cannot write {path}: {source} (check that its directory exists, is writable and has room)"
    )]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("receiving failed: {0}")]
    Recv(#[source] io::Error),
    #[error(transparent)]
    Failed(#[from] ReceiveFailure),
    #[error(
        "the session on this group carries another object (SHA-256 or size differ from the manifest)"
    )]
    WrongSession,
    #[error("stopped")]
    Stopped,
}

pub use crate::fileio::hash_file;
pub use crate::rng::random_id;

#[cfg(test)]
mod tests;
