//! The asking side of peer repair: blocks from one peer, pipelined, and a
//! rendezvous point's members.

use std::net::SocketAddr;
use std::sync::Arc;

use multicast::auth::FleetKeys;
use multicast::codec::{Collector, Layout};
use multicast::handshake;
use multicast::wire::Digest;
use repair::frame::{self, Frame};
use repair::pipeline::{Decoded, Step};
use repair::{BlockFetch, Misbehavior};
use tokio::net::TcpStream;

use super::stream::{FrameWriter, StreamError, prove_client, split};
use super::{BLOCK_DEADLINE, CONNECT_TIMEOUT, PEER_TIMEOUT};

/// A repair connection to `addr`, through the fleet-key handshake when
/// there is a key: the stream (no Nagle) and its ciphers.
async fn connect(
    fleet: Option<&FleetKeys>,
    addr: SocketAddr,
) -> Result<(TcpStream, Option<(handshake::Cipher, handshake::Cipher)>), PeerFailure> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| PeerFailure::ConnectTimeout)?
        .map_err(PeerFailure::io)?;
    let _ = stream.set_nodelay(true);
    let ciphers = match fleet {
        Some(keys) => Some(
            prove_client(&mut stream, keys)
                .await
                .map_err(PeerFailure::stream)?
                .ciphers(true),
        ),
        None => None,
    };
    Ok((stream, ciphers))
}

/// Joins `content`'s members at the rendezvous point `addr` (this agent
/// serving repair on `repair_port`): the members it lists, or why not.
/// One short connection: a rendezvous of an older version that does not
/// know JOIN closes it, and the transfer on its own connection goes on.
pub async fn join_site(
    fleet: Option<&FleetKeys>,
    addr: SocketAddr,
    content: Digest,
    repair_port: u16,
    fetching: bool,
) -> Result<Vec<std::net::SocketAddrV4>, PeerFailure> {
    let (stream, ciphers) = connect(fleet, addr).await?;
    let longest = repair::frame::MAX_MEMBERS * 8 + 16;
    let (mut rd, mut wr) = split(stream, ciphers, longest);
    let ask = Frame::Join {
        content,
        repair_port,
        fetching,
    };
    wr.write_frame(&ask).await.map_err(PeerFailure::stream)?;
    match rd.read_frame().await.map_err(PeerFailure::stream)? {
        Some(Frame::Members { members }) => Ok(members
            .into_iter()
            .map(|(ip, port)| std::net::SocketAddrV4::new(ip.into(), port))
            .collect()),
        Some(f) => Err(Misbehavior::Unexpected(f.name()).into()),
        None => Err(PeerFailure::Closed),
    }
}

/// Why a peer did not deliver a block.
#[derive(Debug)]
pub enum PeerError {
    /// It does not hold it: ask another, keep it.
    Declined,
    /// It is at its upload limit: ask again a little later.
    Busy,
    /// Timeout, connection error, malformed or corrupt symbols: drop it.
    Failed(PeerFailure),
}

/// Why a peer is dropped (every block asked of it fails with it).
#[derive(Clone, Debug, thiserror::Error)]
pub enum PeerFailure {
    #[error("no connection within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    /// Connecting, reading or writing (the OS's words).
    #[error("{0}")]
    Io(Arc<std::io::Error>),
    #[error("fleet-key handshake: {0}")]
    Handshake(multicast::handshake::HandshakeError),
    #[error("no fleet-key handshake within {PEER_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("no whole frame within {PEER_TIMEOUT:?}")]
    FrameTimeout,
    #[error("a write not taken within {PEER_TIMEOUT:?}")]
    WriteTimeout,
    /// A frame that breaks the protocol.
    #[error(transparent)]
    Frame(repair::frame::FrameError),
    #[error("block {0} not complete within {BLOCK_DEADLINE:?}")]
    BlockDeadline(u32),
    #[error("closed the connection")]
    Closed,
    #[error(transparent)]
    Misbehaved(#[from] Misbehavior),
    #[error("served block {0} that fails its SHA-256")]
    Corrupt(u32),
}

impl PeerFailure {
    fn io(e: std::io::Error) -> Self {
        PeerFailure::Io(Arc::new(e))
    }

    /// A frame stream's error: a malformed frame, or the connection's.
    fn stream(e: StreamError) -> Self {
        match e {
            StreamError::FrameTimeout => PeerFailure::FrameTimeout,
            StreamError::WriteTimeout => PeerFailure::WriteTimeout,
            StreamError::HandshakeTimeout => PeerFailure::HandshakeTimeout,
            StreamError::Handshake(e) => PeerFailure::Handshake(e),
            StreamError::Frame(e) => PeerFailure::Frame(e),
            StreamError::Io(e) => PeerFailure::io(e),
        }
    }
}

/// One block for [`fetch_from_peer`]: its hash, and the symbols already
/// held of it (from the multicast), if any.
pub struct PeerJob {
    pub block: u32,
    pub hash: Digest,
    pub held: Option<Box<Collector>>,
}

/// What came of one [`PeerJob`] at a peer: the verified bytes and the
/// payload bytes received, or why not.
pub type PeerResult = (SocketAddr, u32, Result<(Vec<u8>, u64), PeerError>);

/// Requests kept outstanding on one connection: enough that the peer
/// always has the next block read and planned when it ends one.
pub const PIPELINE_DEPTH: usize = 3;

/// Fetches the blocks sent on `jobs` from the repair server at `addr`,
/// over one connection with up to [`PIPELINE_DEPTH`] requests outstanding,
/// reading no faster than `cap` (shared with the task's other peers).
/// Every job gets exactly one result on `results`; after a failure every
/// later job fails too, so the caller should stop sending. Each block
/// completes within [`BLOCK_DEADLINE`] of reaching the front of the
/// queue, however the peer trickles.
pub async fn fetch_from_peer(
    fleet: Option<FleetKeys>,
    addr: SocketAddr,
    content: Digest,
    layout: Layout,
    cap: crate::agent::tcp::SharedCap,
    mut jobs: tokio::sync::mpsc::Receiver<PeerJob>,
    results: tokio::sync::mpsc::UnboundedSender<PeerResult>,
) {
    let mut link: Option<PeerLink> = None;
    let mut pipeline = repair::Pipeline::new(content);
    let mut front_since = tokio::time::Instant::now();
    let mut front = None;
    let outcome: Result<(), PeerFailure> = async {
        loop {
            // New jobs, without waiting while something is outstanding.
            while pipeline.len() < PIPELINE_DEPTH {
                let job = if pipeline.is_empty() {
                    let idle_from = tokio::time::Instant::now();
                    let job = match jobs.recv().await {
                        Some(j) => j,
                        None => return Ok(()),
                    };
                    // The server closes a connection idle for PEER_TIMEOUT:
                    // after a long wait for work, start on a fresh one
                    // rather than fail the peer on a closed one.
                    if idle_from.elapsed() >= PEER_TIMEOUT / 2 {
                        link = None;
                    }
                    job
                } else {
                    match jobs.try_recv() {
                        Ok(j) => j,
                        Err(_) => break,
                    }
                };
                let fetch = BlockFetch::new(layout, job.block, job.hash, job.held);
                let request = pipeline.ask(fetch);
                if link.is_none() {
                    link = Some(PeerLink::open(fleet.as_ref(), addr, &layout, &cap).await?);
                }
                let l = link.as_mut().expect("connected above");
                l.send(&request).await?;
            }
            let l = link.as_mut().expect("a job was asked");
            if pipeline.front() != front {
                front = pipeline.front();
                front_since = tokio::time::Instant::now();
            }
            let f = l.recv(front_since + BLOCK_DEADLINE, front).await?;
            match pipeline.handle(f) {
                Step::More => {}
                Step::Declined(b) => {
                    let _ = results.send((addr, b, Err(PeerError::Declined)));
                }
                Step::Busy(b) => {
                    let _ = results.send((addr, b, Err(PeerError::Busy)));
                }
                Step::Reask(request) => l.send(&request).await?,
                Step::Misbehaved(why) => return Err(why.into()),
                Step::Decode => match off_the_runtime(|| pipeline.decode_front()) {
                    Decoded::Block { block, data, bytes } => {
                        let _ = results.send((addr, block, Ok((data, bytes))));
                        l.send(&Frame::Stop { block }).await?;
                    }
                    Decoded::NeedMore => {}
                    Decoded::Corrupt(b) => return Err(PeerFailure::Corrupt(b)),
                },
            }
        }
    }
    .await;
    if let Err(why) = outcome {
        let asked = pipeline.undelivered();
        fail_all(addr, why, asked, &mut jobs, &results).await;
    }
}

/// The peer failed: every block asked of it, and every job still to come,
/// fails with `why`.
async fn fail_all(
    addr: SocketAddr,
    why: PeerFailure,
    asked: Vec<u32>,
    jobs: &mut tokio::sync::mpsc::Receiver<PeerJob>,
    results: &tokio::sync::mpsc::UnboundedSender<PeerResult>,
) {
    for b in asked {
        let _ = results.send((addr, b, Err(PeerError::Failed(why.clone()))));
    }
    jobs.close();
    while let Some(job) = jobs.recv().await {
        let _ = results.send((addr, job.block, Err(PeerError::Failed(why.clone()))));
    }
}

/// Frames read ahead of the requester's processing: enough to keep the
/// socket drained while a block is decoded and hashed, few enough to bound
/// memory (each at most 64 symbols).
const READ_AHEAD: usize = 16;

/// A requester's connection to one peer. A task of its own reads frames,
/// so the socket keeps draining (and the peer's link busy) while a block
/// is decoded and hashed.
struct PeerLink {
    wr: FrameWriter,
    frames: tokio::sync::mpsc::Receiver<Result<Option<Frame>, StreamError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl PeerLink {
    async fn open(
        fleet: Option<&FleetKeys>,
        addr: SocketAddr,
        layout: &Layout,
        cap: &crate::agent::tcp::SharedCap,
    ) -> Result<PeerLink, PeerFailure> {
        let (stream, ciphers) = connect(fleet, addr).await?;
        // No answer frame is longer than a full SYMBOLS frame of this
        // layout's symbols.
        let longest =
            repair::frame::SYMBOLS_PER_FRAME as usize * usize::from(layout.symbol_size()) + 64;
        let (mut rd, wr) = split(stream, ciphers, longest.min(frame::MAX_FRAME));
        let (tx, frames) = tokio::sync::mpsc::channel(READ_AHEAD);
        let cap = cap.clone();
        let reader = tokio::spawn(async move {
            loop {
                let f = rd.next_frame().await;
                if let Ok(Some(Frame::Symbols { payload, .. })) = &f {
                    // Held back here, the socket fills and TCP slows the peer.
                    cap.take(payload.len()).await;
                }
                let last = !matches!(f, Ok(Some(_)));
                if tx.send(f).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(PeerLink { wr, frames, reader })
    }

    async fn send(&mut self, f: &Frame) -> Result<(), PeerFailure> {
        self.wr.write_frame(f).await.map_err(PeerFailure::stream)
    }

    /// The next frame: within [`PEER_TIMEOUT`], and before `deadline` (the
    /// front block's).
    async fn recv(
        &mut self,
        deadline: tokio::time::Instant,
        front: Option<u32>,
    ) -> Result<Frame, PeerFailure> {
        let frame_due = tokio::time::Instant::now() + PEER_TIMEOUT;
        match tokio::time::timeout_at(deadline.min(frame_due), self.frames.recv()).await {
            Err(_) if deadline < frame_due => {
                Err(PeerFailure::BlockDeadline(front.unwrap_or_default()))
            }
            Err(_) => Err(PeerFailure::FrameTimeout),
            Ok(Some(Ok(Some(f)))) => Ok(f),
            Ok(Some(Ok(None)) | None) => Err(PeerFailure::Closed),
            Ok(Some(Err(e))) => Err(PeerFailure::stream(e)),
        }
    }
}

/// Runs CPU-bound work (a block's assembly and SHA-256, some milliseconds)
/// without holding up the runtime's other tasks: the connection's reader
/// keeps draining the socket meanwhile.
fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use repair::frame::FrameError;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that answers whatever it is sent with `answer`.
    async fn peer_answering(answer: &'static [u8]) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut ask = [0u8; 16];
            let _ = s.read(&mut ask).await;
            s.write_all(answer).await.unwrap();
            // Held open: the requester must judge the bytes, not the close.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_peer_breaking_the_frame_rules_fails_with_what_it_broke() {
        let cases: [(&[u8], FrameError); 3] = [
            (b"HTTP/1.1 400 Bad", FrameError::BadMagic),
            (b"SR\x09\x01\0\0\0\0", FrameError::BadVersion(9)),
            (
                b"SR\x01\x01\xff\xff\xff\x7f",
                FrameError::TooLong {
                    len: 0x7fff_ffff,
                    max: repair::frame::MAX_MEMBERS * 8 + 16,
                },
            ),
        ];
        for (answer, expected) in cases {
            let addr = peer_answering(answer).await;
            match join_site(None, addr, [7; 32], 4000, false).await {
                Err(PeerFailure::Frame(e)) => assert_eq!(e, expected),
                other => panic!("{answer:?}: {other:?}"),
            }
        }
    }
}
