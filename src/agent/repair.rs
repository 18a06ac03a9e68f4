//! Peer repair over TCP, the thin tokio side of the `repair` crate: a
//! server that answers NEED for blocks this agent holds verified, under a
//! concurrency limit and an upload rate cap (in background mode each upload
//! also yields to other traffic, [`super::tcp::UploadPace`]), and a client
//! that fetches blocks from one peer with timeouts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use multicast::auth::FleetKeys;
use multicast::codec::{Collector, Layout, Plan};
use multicast::handshake;
use multicast::wire::Digest;
use repair::frame::{self, Frame};
use repair::pipeline::{Decoded, Step};
use repair::{BlockFetch, Misbehavior, Serving, Want};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::Agent;
use crate::lab::hex;

/// Blocks served at once (each being sent, or read and planned ahead of
/// its turn on a pipelined connection); more requests get `Busy` and ask
/// another peer. Each holds a block in memory (4 MiB by default).
const MAX_UPLOADS: usize = 8;
/// A peer that does not complete a frame (or a handshake) within this long
/// is given up: one that trickles a byte at a time gains nothing.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// A block from one peer takes at most this long from its turn, however
/// it trickles (4 MiB at 600 kbit/s); then the next peer, or the origin.
const BLOCK_DEADLINE: Duration = Duration::from_secs(60);
/// Repair connections served at once, and from one address: enough for
/// every peer's three blocks in flight on a busy subnet, few enough that
/// connections cannot exhaust the agent's file descriptors or memory.
const MAX_CONNECTIONS: usize = 64;
const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// Requests are a few dozen bytes: a longer frame declared to the server
/// is hostile, and is refused before any of it is buffered.
const MAX_REQUEST: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

struct Limits {
    slots: Semaphore,
    /// Open connections by source address.
    connections: std::sync::Mutex<HashMap<IpAddr, usize>>,
    /// Upload cap of the repair server, bit/s (0 = none).
    rate_bps: u64,
    link_free: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Limits {
    async fn throttle(&self, bytes: usize) {
        if self.rate_bps == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 * 8.0 / self.rate_bps as f64);
        let until = {
            let mut free = self.link_free.lock().await;
            let start = (*free).max(tokio::time::Instant::now());
            *free = start + cost;
            *free
        };
        tokio::time::sleep_until(until).await;
    }
}

/// Serves repair requests until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let limits = Arc::new(Limits {
        slots: Semaphore::new(MAX_UPLOADS),
        connections: Default::default(),
        rate_bps: agent.config.repair_rate_bps,
        link_free: tokio::sync::Mutex::new(tokio::time::Instant::now()),
    });
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let (stream, from) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors (EMFILE) and the like: accepting
                // again at once would spin.
                tracing::warn!("repair: accept failed: {e}; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = ConnectionSlot::take(&limits, from.ip()) else {
            agent.auth.repair_refused.fetch_add(1, Ordering::Relaxed);
            continue; // dropped: closed at once
        };
        let (agent, limits) = (agent.clone(), limits.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(agent, stream, from, limits).await {
                tracing::debug!("repair connection from {from}: {e}");
            }
        });
    }
}

/// What this agent can serve of a block: the file it is in, its place and
/// its hash.
fn lookup(
    agent: &Agent,
    content: &Digest,
    block: u32,
) -> Option<(Layout, Digest, std::path::PathBuf)> {
    if agent
        .placement()
        .is_some_and(|p| p.kind == crate::topology::SiteKind::Vpn)
    {
        return None; // a remote worker's uplink is not the office's
    }
    let id = hex(content);
    let tasks = agent.tasks();
    tasks.values().find_map(|t| {
        if t.status.content_id != id || !t.have.get(block as usize).copied().unwrap_or(false) {
            return None;
        }
        let m = t.spec.manifest.check().ok()?;
        Some((
            m.layout,
            *m.block_hashes.get(block as usize)?,
            t.data.clone()?,
        ))
    })
}

/// One of the server's connection slots, given back when dropped.
struct ConnectionSlot {
    limits: Arc<Limits>,
    from: IpAddr,
}

impl ConnectionSlot {
    fn take(limits: &Arc<Limits>, from: IpAddr) -> Option<ConnectionSlot> {
        let mut c = limits.connections.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = c.values().sum();
        let mine = c.get(&from).copied().unwrap_or(0);
        if total >= MAX_CONNECTIONS || mine >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *c.entry(from).or_default() += 1;
        Some(ConnectionSlot {
            limits: limits.clone(),
            from,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self
            .limits
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.from);
            }
        }
    }
}

/// The reading side of a repair connection, with the fleet key's cipher of
/// that direction (every byte after the handshake is encrypted).
struct FrameReader {
    rd: tokio::net::tcp::OwnedReadHalf,
    rx: Option<handshake::Cipher>,
    /// Longest frame body this side takes: a request on the server.
    max_frame: usize,
    /// Acknowledge at once (a requester: the peer's upload pace reads the
    /// RTT).
    quickack: bool,
    buf: Vec<u8>,
}

/// The writing side, with its cipher.
struct FrameWriter {
    wr: tokio::net::tcp::OwnedWriteHalf,
    tx: Option<handshake::Cipher>,
}

/// Splits a connection (after the handshake, if any) into its two sides.
fn split(
    stream: TcpStream,
    ciphers: Option<(handshake::Cipher, handshake::Cipher)>,
    max_frame: usize,
) -> (FrameReader, FrameWriter) {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = ciphers.unzip();
    let reader = FrameReader {
        rd,
        rx,
        max_frame,
        // A server's requests need no quick ACKs; a requester's answers do.
        quickack: max_frame > MAX_REQUEST,
        buf: Vec::new(),
    };
    (reader, FrameWriter { wr, tx })
}

impl FrameReader {
    /// The next frame, which must arrive whole within [`PEER_TIMEOUT`].
    async fn read_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        tokio::time::timeout(PEER_TIMEOUT, self.next_frame())
            .await
            .map_err(|_| anyhow::anyhow!("no whole frame within {PEER_TIMEOUT:?}"))?
    }

    /// The next frame, however long it takes.
    async fn next_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some(f) = self.buffered()? {
                return Ok(Some(f));
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.rd.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            if self.quickack {
                super::tcp::quickack(self.rd.as_ref());
            }
            self.take(&mut chunk[..n]);
        }
    }

    /// A whole frame if one has arrived, without waiting.
    fn try_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some(f) = self.buffered()? {
                return Ok(Some(f));
            }
            let mut chunk = [0u8; 4096];
            let n = match self.rd.try_read(&mut chunk) {
                Ok(0) => return Ok(None), // closed: the next read says so
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            self.take(&mut chunk[..n]);
        }
    }

    /// The first whole frame in the buffer. The header is checked (and the
    /// frame refused) before more of a frame declared too long is read.
    fn buffered(&mut self) -> anyhow::Result<Option<Frame>> {
        frame::check_header(&self.buf, self.max_frame)?;
        let Some((f, used)) = frame::decode(&self.buf, self.max_frame)? else {
            return Ok(None);
        };
        self.buf.drain(..used);
        Ok(Some(f))
    }

    fn take(&mut self, bytes: &mut [u8]) {
        if let Some(rx) = &mut self.rx {
            rx.apply(bytes);
        }
        self.buf.extend_from_slice(bytes);
    }
}

impl FrameWriter {
    async fn write_frame(&mut self, f: &Frame) -> anyhow::Result<()> {
        let mut out = Vec::new();
        frame::encode(f, &mut out);
        if let Some(tx) = &mut self.tx {
            tx.apply(&mut out);
        }
        tokio::time::timeout(PEER_TIMEOUT, self.wr.write_all(&out)).await??;
        Ok(())
    }
}

/// The fleet-key handshake, server side: the client proves it holds the
/// key (and learns that this agent does) before any frame is read.
async fn prove_server(
    stream: &mut TcpStream,
    keys: &FleetKeys,
) -> anyhow::Result<handshake::Session> {
    tokio::time::timeout(PEER_TIMEOUT, async {
        let mut hello = [0u8; handshake::HELLO_LEN];
        stream.read_exact(&mut hello).await?;
        let (server, answer) = handshake::Server::answer(keys, &hello)?;
        stream.write_all(&answer).await?;
        let mut proof = [0u8; handshake::PROOF_LEN];
        stream.read_exact(&mut proof).await?;
        anyhow::Ok(server.finish(&proof)?)
    })
    .await
    .map_err(|_| anyhow::anyhow!("no fleet-key handshake within {PEER_TIMEOUT:?}"))?
}

/// The fleet-key handshake, client side.
async fn prove_client(
    stream: &mut TcpStream,
    keys: &FleetKeys,
) -> anyhow::Result<handshake::Session> {
    tokio::time::timeout(PEER_TIMEOUT, async {
        let (client, hello) = handshake::Client::start(keys);
        stream.write_all(&hello).await?;
        let mut answer = [0u8; handshake::ANSWER_LEN];
        stream.read_exact(&mut answer).await?;
        let (proof, session) = client.finish(&answer)?;
        stream.write_all(&proof).await?;
        anyhow::Ok(session)
    })
    .await
    .map_err(|_| anyhow::anyhow!("no fleet-key handshake within {PEER_TIMEOUT:?}"))?
}

/// A request taken off the connection, on its way to an answer.
enum Answer<'a> {
    /// At once: NOT_HELD or BUSY.
    Now(Frame),
    /// The block is being read, checked and planned off the runtime.
    Block {
        block: u32,
        _upload: tokio::sync::SemaphorePermit<'a>,
        plan: tokio::task::JoinHandle<Option<Serving>>,
    },
}

/// Starts the answer to a request: the block's reading and planning runs
/// while the connection still sends the answer before it.
fn start_answer<'a>(agent: &Arc<Agent>, limits: &'a Limits, f: Frame) -> Option<Answer<'a>> {
    let Frame::Need {
        content,
        block,
        held,
        need,
        highest_esi,
    } = f
    else {
        return None; // a Stop for a block already finished, or noise
    };
    let Some((layout, hash, path)) = lookup(agent, &content, block) else {
        return Some(Answer::Now(Frame::NotHeld { block }));
    };
    let Ok(upload) = limits.slots.try_acquire() else {
        return Some(Answer::Now(Frame::Busy));
    };
    let want = Want {
        block,
        held,
        need,
        highest_esi,
    };
    let plan = tokio::task::spawn_blocking(move || -> Option<Serving> {
        let f = std::fs::File::open(&path).ok()?;
        let mut data = vec![0u8; layout.block_len(block)];
        multicast::driver::read_exact_at(&f, &mut data, layout.offset(block)).ok()?;
        if multicast::codec::sha256(&data) != hash {
            tracing::warn!("repair: block {block} on disk fails its hash; not serving it");
            return None;
        }
        let plan = Serving::needs_plan(&want).then(|| Plan::new(layout));
        Some(Serving::new(
            &layout,
            plan.as_ref(),
            want,
            &data,
            multicast::driver::random_id() as u32,
        ))
    });
    Some(Answer::Block {
        block,
        _upload: upload,
        plan,
    })
}

/// Requests a requester may queue on one connection before it is
/// answered; more is a requester that does not wait for answers.
const MAX_QUEUED_REQUESTS: usize = 16;

async fn connection(
    agent: Arc<Agent>,
    mut stream: TcpStream,
    from: SocketAddr,
    limits: Arc<Limits>,
) -> anyhow::Result<()> {
    let ciphers = match &agent.fleet {
        Some(keys) => match prove_server(&mut stream, keys).await {
            Ok(session) => Some(session.ciphers(false)),
            Err(e) => {
                agent.auth.repair_refused.fetch_add(1, Ordering::Relaxed);
                return Err(e.context("repair connection refused"));
            }
        },
        None => None,
    };
    // Answers go out as written: Nagle would hold an END (or a frame's
    // tail) back until the requester's delayed ACK.
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = split(stream, ciphers, MAX_REQUEST);
    // In background mode the upload yields to other traffic on the path.
    let mode = super::task::unicast_mode(agent.config.rate_mode);
    let mut pace = super::tcp::UploadPace::new(mode, agent.config.rate_min_bps, wr.wr.as_ref());
    if pace.is_none() && mode == repair::pace::Mode::Background {
        // No RTT to pace on here: the OS's own background transport, if any.
        let took = super::tcp::os_background(wr.wr.as_ref());
        tracing::debug!("repair: upload without a pace; OS background transport: {took}");
    }
    // Requests read while an answer was being sent, oldest first; the
    // next one's block is read and planned ahead.
    let mut queued: std::collections::VecDeque<Frame> = Default::default();
    let mut next: Option<Answer> = None;
    loop {
        let answer = match next.take() {
            Some(a) => a,
            None => {
                let f = match queued.pop_front() {
                    Some(f) => f,
                    None => match rd.read_frame().await? {
                        Some(f) => f,
                        None => return Ok(()),
                    },
                };
                if let Frame::Join {
                    content,
                    repair_port,
                    fetching,
                } = f
                {
                    let answer = join(&agent, from, content, repair_port, fetching);
                    wr.write_frame(&answer).await?;
                    continue;
                }
                match start_answer(&agent, &limits, f) {
                    Some(a) => a,
                    None => continue,
                }
            }
        };
        let (block, plan) = match answer {
            Answer::Now(f) => {
                wr.write_frame(&f).await?;
                continue;
            }
            Answer::Block {
                block,
                _upload,
                plan,
            } => (block, (plan.await?, _upload)),
        };
        let (Some(mut serving), _upload) = plan else {
            wr.write_frame(&Frame::NotHeld { block }).await?;
            continue;
        };
        while let Some(mut f) = serving.next_frame() {
            if let Frame::Symbols { payload, .. } = &mut f {
                limits.throttle(payload.len()).await;
                if let Some(p) = &mut pace {
                    p.before(payload.len()).await;
                }
                if agent.config.lab_corrupt_repair
                    && let Some(byte) = payload.first_mut()
                {
                    *byte ^= 0x01;
                }
            }
            write_paced(&mut wr, &f, pace.as_mut()).await?;
            if let Frame::Symbols { payload, .. } = &f {
                super::metrics::Counters::add(
                    &agent.counters.repair_bytes_served,
                    payload.len() as u64,
                );
            }
            // What the requester sent meanwhile: a STOP for this block
            // ends it; requests queue, and the next is prepared now.
            // At most a few per gap: a requester streaming frames cannot
            // keep this task from its answer.
            let mut stopped = false;
            for _ in 0..MAX_QUEUED_REQUESTS {
                let Some(f) = rd.try_frame()? else { break };
                match f {
                    Frame::Stop { block: b } if b == block => stopped = true,
                    Frame::Need { .. } if queued.len() < MAX_QUEUED_REQUESTS => queued.push_back(f),
                    Frame::Need { .. } => {
                        anyhow::bail!("more than {MAX_QUEUED_REQUESTS} requests queued")
                    }
                    _ => {}
                }
            }
            if next.is_none()
                && let Some(f) = queued.pop_front()
            {
                next = start_answer(&agent, &limits, f);
            }
            if stopped {
                break;
            }
        }
        wr.write_frame(&Frame::End { block }).await?;
        super::metrics::Counters::add(&agent.counters.repair_blocks_served, 1);
        if let Some(p) = &pace {
            tracing::debug!("repair: block {block} served at {:?} bit/s", p.rate_bps());
        }
    }
}

/// A JOIN from `from`: the member is the connection's source address with
/// the repair port it names (never an address it claims), and the answer
/// every member of the content.
fn join(
    agent: &Agent,
    from: SocketAddr,
    content: Digest,
    repair_port: u16,
    fetching: bool,
) -> Frame {
    let SocketAddr::V4(from) = from else {
        return Frame::Members { members: vec![] };
    };
    let member = std::net::SocketAddrV4::new(*from.ip(), repair_port);
    let members = agent
        .members
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .join(std::time::Instant::now(), content, member, fetching);
    Frame::Members {
        members: members
            .iter()
            .map(|m| (m.ip().octets(), m.port()))
            .collect(),
    }
}

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
                .map_err(|e| PeerFailure::Handshake(crate::error_text(e.as_ref())))?
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

/// Writes `f`; a paced upload samples its path meanwhile.
async fn write_paced(
    wr: &mut FrameWriter,
    f: &Frame,
    pace: Option<&mut super::tcp::UploadPace>,
) -> anyhow::Result<()> {
    let Some(pace) = pace else {
        return wr.write_frame(f).await;
    };
    pace.sample();
    let write = wr.write_frame(f);
    tokio::pin!(write);
    let mut tick = tokio::time::interval(super::tcp::SAMPLE_EVERY);
    loop {
        tokio::select! {
            r = &mut write => return r,
            _ = tick.tick() => pace.sample(),
        }
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
    Io(String),
    #[error("fleet-key handshake: {0}")]
    Handshake(String),
    #[error("no whole frame within {PEER_TIMEOUT:?}")]
    FrameTimeout,
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
        PeerFailure::Io(e.to_string())
    }

    /// A frame stream's error: a malformed frame, or the connection's.
    fn stream(e: anyhow::Error) -> Self {
        PeerFailure::Io(crate::error_text(e.as_ref()))
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
    cap: super::tcp::SharedCap,
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
        for b in pipeline.undelivered() {
            let _ = results.send((addr, b, Err(PeerError::Failed(why.clone()))));
        }
        jobs.close();
        while let Some(job) = jobs.recv().await {
            let _ = results.send((addr, job.block, Err(PeerError::Failed(why.clone()))));
        }
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
    frames: tokio::sync::mpsc::Receiver<anyhow::Result<Option<Frame>>>,
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
        cap: &super::tcp::SharedCap,
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
