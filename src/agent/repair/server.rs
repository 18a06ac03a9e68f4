//! The serving side of peer repair.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use multicast::codec::{Layout, Plan};
use multicast::wire::Digest;
use repair::frame::Frame;
use repair::{Serving, Want};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::stream::{FrameWriter, StreamError, prove_server, split};
use super::{super::Agent, MAX_REQUEST};
use crate::lab::hex;

/// Blocks served at once (each being sent, or read and planned ahead of
/// its turn on a pipelined connection); more requests get `Busy` and ask
/// another peer. Each holds a block in memory (4 MiB by default).
const MAX_UPLOADS: usize = 8;
/// Repair connections served at once, and from one address: enough for
/// every peer's three blocks in flight on a busy subnet, few enough that
/// connections cannot exhaust the agent's file descriptors or memory.
const MAX_CONNECTIONS: usize = 64;
const MAX_CONNECTIONS_PER_SOURCE: usize = 8;

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
    if agent.site_kind() == crate::topology::SiteKind::Vpn {
        return None; // a remote worker's uplink is not the office's
    }
    let id = hex(content);
    let tasks = agent.tasks();
    tasks.values().find_map(|t| {
        let held = t.holding.as_ref()?;
        if t.status.content_id != id || !held.blocks.has(block) {
            return None;
        }
        let m = t.spec.manifest.check().ok()?;
        Some((
            m.layout,
            *m.block_hashes.get(block as usize)?,
            held.path.clone(),
        ))
    })
}

/// The fleet-key handshake: the connection's ciphers, or why it is
/// refused (counted).
async fn admit(
    agent: &Agent,
    stream: &mut TcpStream,
    keys: &multicast::auth::FleetKeys,
) -> Result<(multicast::handshake::Cipher, multicast::handshake::Cipher), ServeError> {
    match prove_server(stream, keys).await {
        Ok(session) => Ok(session.ciphers(false)),
        Err(e) => {
            agent.auth.repair_refused.fetch_add(1, Ordering::Relaxed);
            Err(ServeError::Refused(e))
        }
    }
}

/// Why this agent ended a repair connection it was serving.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("repair connection refused: {0}")]
    Refused(StreamError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("more than {MAX_QUEUED_REQUESTS} requests queued")]
    TooManyRequests,
    /// The thread reading the block ended without an answer.
    #[error("reading a block to serve: {0}")]
    Read(#[from] tokio::task::JoinError),
}

/// What recent uploads got through, by requester.
fn paths(agent: &Agent) -> std::sync::MutexGuard<'_, repair::pace::PathMemory<IpAddr>> {
    agent
        .upload_paths
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The upload's pace: in background mode it yields to other traffic on
/// the path (where there is no RTT to pace on, through the OS's own
/// background transport, if any).
fn upload_pace(
    agent: &Agent,
    wr: &FrameWriter,
    to: IpAddr,
) -> Option<crate::agent::tcp::UploadPace> {
    let mode = crate::agent::task::unicast_mode(agent.config.rate_mode);
    let start = paths(agent).start_for(std::time::Instant::now(), to);
    let floor = agent.config.rate_min_bps;
    let pace = crate::agent::tcp::UploadPace::new(mode, floor, start, wr.wr.as_ref());
    if pace.is_none() && mode == repair::pace::Mode::Background {
        let took = crate::agent::tcp::os_background(wr.wr.as_ref());
        tracing::debug!("repair: upload without a pace; OS background transport: {took}");
    }
    pace
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
    let agent = agent.clone();
    let plan = tokio::task::spawn_blocking(move || -> Option<Serving> {
        let data = read_checked(&agent, &path, &layout, block, &hash)?;
        let plan = Serving::needs_plan(&want).then(|| Plan::new(layout));
        Some(Serving::new(
            &layout,
            plan.as_ref(),
            want,
            data,
            multicast::driver::random_id() as u32,
        ))
    });
    Some(Answer::Block {
        block,
        _upload: upload,
        plan,
    })
}

/// One version of a file: a file rewritten or replaced is another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileVersion {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

impl FileVersion {
    fn of(f: &std::fs::File) -> Option<FileVersion> {
        let m = f.metadata().ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Some(FileVersion {
            len: m.len(),
            modified: m.modified().ok(),
            inode,
        })
    }
}

/// Blocks hash-checked by file and version ([`repair::checked`]).
pub type CheckedFiles = repair::checked::CheckedBlocks<std::path::PathBuf, FileVersion>;

/// Block `block` of the file at `path`, when it matches `hash`: hashed
/// unless this version of the file had the block checked lately (the
/// file unchanged while it was read). A block that fails is not served.
fn read_checked(
    agent: &Agent,
    path: &std::path::Path,
    layout: &Layout,
    block: u32,
    hash: &Digest,
) -> Option<Vec<u8>> {
    let f = std::fs::File::open(path).ok()?;
    let before = FileVersion::of(&f)?;
    let mut data = vec![0u8; layout.block_len(block)];
    multicast::driver::read_exact_at(&f, &mut data, layout.offset(block)).ok()?;
    let unchanged = FileVersion::of(&f) == Some(before);
    let path = path.to_path_buf();
    let now = std::time::Instant::now();
    if unchanged && checked(agent).is_checked(&path, before, block, now) {
        return Some(data);
    }
    if multicast::codec::sha256(&data) != *hash {
        tracing::warn!("repair: block {block} on disk fails its hash; not serving it");
        return None;
    }
    if unchanged {
        checked(agent).note(&path, before, block, now);
    }
    Some(data)
}

fn checked(agent: &Agent) -> std::sync::MutexGuard<'_, CheckedFiles> {
    agent
        .checked_blocks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The file at `path` was verified whole (every one of its `blocks`)
/// just now: repair serves them without hashing each again.
pub fn note_verified(agent: &Agent, path: &std::path::Path, blocks: u32) {
    let Some(version) = std::fs::File::open(path)
        .ok()
        .and_then(|f| FileVersion::of(&f))
    else {
        return;
    };
    let now = std::time::Instant::now();
    checked(agent).note_all(&path.to_path_buf(), version, blocks, now);
}

/// Requests a requester may queue on one connection before it is
/// answered; more is a requester that does not wait for answers.
const MAX_QUEUED_REQUESTS: usize = 16;

async fn connection(
    agent: Arc<Agent>,
    mut stream: TcpStream,
    from: SocketAddr,
    limits: Arc<Limits>,
) -> Result<(), ServeError> {
    let ciphers = match &agent.fleet {
        Some(keys) => Some(admit(&agent, &mut stream, keys).await?),
        None => None,
    };
    // Answers go out as written: Nagle would hold an END (or a frame's
    // tail) back until the requester's delayed ACK.
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = split(stream, ciphers, MAX_REQUEST);
    let mut pace = upload_pace(&agent, &wr, from.ip());
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
        let mut link = Link {
            rd: &mut rd,
            wr: &mut wr,
            pace: pace.as_mut(),
            queued: &mut queued,
        };
        link.serve(&agent, &limits, block, &mut serving, &mut next)
            .await?;
        wr.write_frame(&Frame::End { block }).await?;
        crate::agent::metrics::Counters::add(&agent.counters.repair_blocks_served, 1);
        if let Some(p) = &pace {
            tracing::debug!("repair: block {block} served at {:?} bit/s", p.rate_bps());
            if let Some(got) = p.delivered_bps() {
                let now = std::time::Instant::now();
                paths(&agent).note(now, from.ip(), got);
            }
        }
    }
}

/// One repair connection while it serves a block.
struct Link<'a> {
    rd: &'a mut super::stream::FrameReader,
    wr: &'a mut super::stream::FrameWriter,
    pace: Option<&'a mut crate::agent::tcp::UploadPace>,
    /// Requests read while an answer was being sent, oldest first.
    queued: &'a mut std::collections::VecDeque<Frame>,
}

impl<'l> Link<'l> {
    /// Sends `block`'s frames, under the server's limits and the upload's
    /// pace, until they run out or the requester STOPs it; between frames,
    /// takes the requests sent meanwhile and starts the next answer.
    async fn serve<'a>(
        &mut self,
        agent: &'a Arc<Agent>,
        limits: &'a Limits,
        block: u32,
        serving: &mut Serving,
        next: &mut Option<Answer<'a>>,
    ) -> Result<(), ServeError> {
        // One buffer for every frame of the block: each is encoded into it
        // straight from the block's bytes.
        let mut out = Vec::new();
        loop {
            out.clear();
            let Some(len) = serving.encode_next(&mut out) else {
                break;
            };
            limits.throttle(len).await;
            if let Some(p) = self.pace.as_deref_mut() {
                p.before(len).await;
            }
            if agent.config.lab_corrupt_repair && len > 0 {
                let first = out.len() - len;
                out[first] ^= 0x01;
            }
            write_paced(self.wr, &mut out, self.pace.as_deref_mut()).await?;
            crate::agent::metrics::Counters::add(&agent.counters.repair_bytes_served, len as u64);
            let stopped = self.take_requests(block)?;
            if next.is_none()
                && let Some(f) = self.queued.pop_front()
            {
                *next = start_answer(agent, limits, f);
            }
            if stopped {
                break;
            }
        }
        Ok(())
    }

    /// What the requester sent meanwhile: a STOP for `block` (true) ends
    /// it; requests queue. At most a few per gap: a requester streaming
    /// frames cannot keep this task from its answer.
    fn take_requests(&mut self, block: u32) -> Result<bool, ServeError> {
        let mut stopped = false;
        for _ in 0..MAX_QUEUED_REQUESTS {
            let Some(f) = self.rd.try_frame()? else { break };
            match f {
                Frame::Stop { block: b } if b == block => stopped = true,
                Frame::Need { .. } if self.queued.len() < MAX_QUEUED_REQUESTS => {
                    self.queued.push_back(f)
                }
                Frame::Need { .. } => return Err(ServeError::TooManyRequests),
                _ => {}
            }
        }
        Ok(stopped)
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

/// Writes the encoded frames in `out`; a paced upload samples its path
/// meanwhile.
async fn write_paced(
    wr: &mut FrameWriter,
    out: &mut [u8],
    pace: Option<&mut crate::agent::tcp::UploadPace>,
) -> Result<(), StreamError> {
    let Some(pace) = pace else {
        return wr.write_encoded(out).await;
    };
    pace.sample();
    let write = wr.write_encoded(out);
    tokio::pin!(write);
    let mut tick = tokio::time::interval(crate::agent::tcp::SAMPLE_EVERY);
    loop {
        tokio::select! {
            r = &mut write => return r,
            _ = tick.tick() => pace.sample(),
        }
    }
}
