//! Peer repair over TCP, the thin tokio side of the `repair` crate: a
//! server that answers NEED for blocks this agent holds verified, under a
//! concurrency limit and an upload rate cap, and a client that fetches one
//! block from one peer with timeouts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use multicast::auth::FleetKeys;
use multicast::codec::{Collector, Layout, Plan};
use multicast::handshake;
use multicast::wire::Digest;
use repair::fetch::Rejected;
use repair::frame::{self, Frame};
use repair::{BlockFetch, FetchStep, Serving, Want};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::Agent;
use crate::lab::hex;

/// Blocks served at once; more requests get `Busy` and ask another peer.
const MAX_UPLOADS: usize = 4;
/// A peer that does not complete a frame (or a handshake) within this long
/// is given up: one that trickles a byte at a time gains nothing.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// A block from one peer takes at most this long, however it trickles (4
/// MiB at 600 kbit/s); then the next peer, or the origin.
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
            if let Err(e) = connection(agent, stream, limits).await {
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

/// A repair connection: the stream, and with a fleet key the ciphers of
/// its two directions (every byte after the handshake is encrypted).
struct Conn {
    stream: TcpStream,
    ciphers: Option<(handshake::Cipher, handshake::Cipher)>,
    /// Longest frame this side takes: a request on the server.
    max_frame: usize,
}

impl Conn {
    /// The next frame, which must arrive whole within [`PEER_TIMEOUT`].
    async fn read_frame(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<Option<Frame>> {
        tokio::time::timeout(PEER_TIMEOUT, self.read_frame_inner(buf))
            .await
            .map_err(|_| anyhow::anyhow!("no whole frame within {PEER_TIMEOUT:?}"))?
    }

    async fn read_frame_inner(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<Option<Frame>> {
        loop {
            // The header is checked (and the frame refused) before more of
            // a frame declared too long is buffered.
            frame::check_header(buf, self.max_frame)?;
            if let Some((f, used)) = frame::decode(buf, self.max_frame)? {
                buf.drain(..used);
                return Ok(Some(f));
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            if let Some((_, rx)) = &mut self.ciphers {
                rx.apply(&mut chunk[..n]);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn write_frame(&mut self, f: &Frame) -> anyhow::Result<()> {
        let mut out = Vec::new();
        frame::encode(f, &mut out);
        if let Some((tx, _)) = &mut self.ciphers {
            tx.apply(&mut out);
        }
        tokio::time::timeout(PEER_TIMEOUT, self.stream.write_all(&out)).await??;
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

async fn connection(
    agent: Arc<Agent>,
    mut stream: TcpStream,
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
    let mut conn = Conn {
        stream,
        ciphers,
        max_frame: MAX_REQUEST,
    };
    let mut buf = Vec::new();
    while let Some(f) = conn.read_frame(&mut buf).await? {
        let Frame::Need {
            content,
            block,
            held,
            need,
            highest_esi,
        } = f
        else {
            continue; // a Stop for a block already finished, or noise
        };
        let Some((layout, hash, path)) = lookup(&agent, &content, block) else {
            conn.write_frame(&Frame::NotHeld { block }).await?;
            continue;
        };
        let Ok(_slot) = limits.slots.try_acquire() else {
            conn.write_frame(&Frame::Busy).await?;
            continue;
        };
        let want = Want {
            block,
            held,
            need,
            highest_esi,
        };
        // Read and check the block, and plan the answer, off the runtime.
        let serving = tokio::task::spawn_blocking(move || -> Option<Serving> {
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
        })
        .await?;
        let Some(mut serving) = serving else {
            conn.write_frame(&Frame::NotHeld { block }).await?;
            continue;
        };
        while let Some(mut f) = serving.next_frame() {
            if let Frame::Symbols { payload, .. } = &mut f {
                limits.throttle(payload.len()).await;
                if agent.config.lab_corrupt_repair
                    && let Some(byte) = payload.first_mut()
                {
                    *byte ^= 0x01;
                }
            }
            // A requester that has decoded closes the connection: the write
            // fails and this block is over.
            conn.write_frame(&f).await?;
            if let Frame::Symbols { payload, .. } = &f {
                super::metrics::Counters::add(
                    &agent.counters.repair_bytes_served,
                    payload.len() as u64,
                );
            }
        }
        super::metrics::Counters::add(&agent.counters.repair_blocks_served, 1);
    }
    Ok(())
}

/// Why a peer did not deliver a block.
#[derive(Debug)]
pub enum PeerError {
    /// It does not hold it: ask another, keep it.
    Declined,
    /// It is at its upload limit: ask again a little later.
    Busy,
    /// Timeout, connection error, malformed or corrupt symbols: drop it.
    Failed(String),
}

/// Fetches block `block` from the repair server at `addr`: the verified
/// bytes and the payload bytes received.
/// Within [`BLOCK_DEADLINE`], however the peer trickles.
pub async fn fetch_block(
    fleet: Option<&FleetKeys>,
    addr: SocketAddr,
    content: Digest,
    layout: Layout,
    block: u32,
    hash: Digest,
    held: Option<Box<Collector>>,
) -> Result<(Vec<u8>, u64), PeerError> {
    let fetch = async {
        let fail = |e: String| PeerError::Failed(e);
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                fail(format!(
                    "no connection to {addr} within {CONNECT_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| fail(format!("{addr}: {e}")))?;
        let ciphers = match fleet {
            Some(keys) => Some(
                prove_client(&mut stream, keys)
                    .await
                    .map_err(|e| fail(format!("{addr}: {}", crate::error_text(e.as_ref()))))?
                    .ciphers(true),
            ),
            None => None,
        };
        let mut conn = Conn {
            stream,
            ciphers,
            max_frame: frame::MAX_FRAME,
        };
        let mut fetch = BlockFetch::new(layout, block, hash, held);
        conn.write_frame(&fetch.request(content))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut buf = Vec::new();
        loop {
            let f = match conn.read_frame(&mut buf).await {
                Ok(Some(f)) => f,
                Ok(None) => return Err(fail(format!("{addr} closed before the block decoded"))),
                Err(e) => return Err(fail(format!("{addr}: {e}"))),
            };
            match fetch.handle(f) {
                FetchStep::More => {}
                FetchStep::Elsewhere => return Err(PeerError::Declined),
                FetchStep::Busy => return Err(PeerError::Busy),
                FetchStep::Misbehaved(why) => return Err(fail(format!("{addr}: {why}"))),
                FetchStep::Decode => match fetch.decode() {
                    Ok(data) => {
                        let _ = conn.write_frame(&Frame::Stop { block }).await;
                        return Ok((data, fetch.bytes));
                    }
                    Err(Rejected::NeedMore) => {}
                    Err(Rejected::Corrupt) => {
                        return Err(fail(format!(
                            "{addr} served block {block} that fails its SHA-256"
                        )));
                    }
                },
            }
        }
    };
    tokio::time::timeout(BLOCK_DEADLINE, fetch)
        .await
        .unwrap_or_else(|_| {
            Err(PeerError::Failed(format!(
                "{addr}: block {block} not complete within {BLOCK_DEADLINE:?}"
            )))
        })
}
