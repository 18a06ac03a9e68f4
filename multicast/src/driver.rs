//! Drivers: the sans-IO sessions wired to a UDP socket, a file and one
//! worker thread each (encoding on the sending side, decoding and writing on
//! the receiving side), so the thread that paces or receives never stalls
//! behind RaptorQ. They block; run them on a thread of their own (or
//! `spawn_blocking` under tokio).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::auth::{AuthState, FleetKeys, Link};
use crate::batch::{RecvBatch, SendBatch};
use crate::codec::{self, BlockEncoder, Layout, LayoutError, Plan, sha256};
use crate::fileio;
/// Positional file I/O on every OS (used by the agent's cache as well).
pub use crate::fileio::{read_exact_at, start_writeback, write_all_at};
use crate::receiver::{
    BlockResult, DecodeJob, DecodeOutcome, ReceiveFailure, Receiver, ReceiverConfig, ReceiverEvent,
    ReceiverStats,
};
use crate::sender::{
    EncodeJob, EncodedBatch, Sender, SenderConfig, SenderEvent, SenderObject, SenderStats,
};
use crate::socket::{self, BufferReport, SocketError};
use crate::wire::{Digest, MAX_DATAGRAM};

mod decode;
mod encode;
use decode::{Dropper, Work, WorkDone, check_file_hash, decode_worker};
use encode::{Source, encode_worker, encoders_kept};

/// Receive loop: poll (drain, then sleep this long) while datagrams arrive.
/// At 200 Mbit/s 2 ms is 35 datagrams, three batched reads, of a socket buffer
/// that holds a hundred milliseconds or more; each wakeup costs two context
/// switches, which on a host running many receivers (the namespace lab: 8
/// on 2 cores) add up.
const DRAIN_SLEEP: Duration = Duration::from_millis(2);
/// Receive loop: fall back to blocking reads after this long without one.
const QUIET_AFTER: Duration = Duration::from_millis(50);
/// Receive loop: most datagrams handled before timers and results get a turn.
const MAX_DRAIN: usize = 256;

/// How often progress callbacks run.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// The sending loop sleeps at least this long. The pacer holds 2 ms of
/// tokens, so the rate is the same, but at 190 Mbit/s each wake sends about
/// eight datagrams instead of one (lab: a fifth of the context switches,
/// 0.2 s less CPU for 64 MiB).
const SEND_MIN_SLEEP: Duration = Duration::from_micros(500);

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

/// A download to resume: a full-size file in which some blocks are already
/// present and verified. It is kept when the receive fails and is never
/// renamed: its owner checks the whole-file hash and moves it (the receive
/// checks every block against `block_hashes`, not the whole file).
pub struct ResumeInto<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub done: &'a [bool],
    pub block_hashes: &'a [Digest],
    pub file_sha256: Digest,
    pub file_size: u64,
    /// Called with each block as it is written and verified.
    pub on_block: &'a mut dyn FnMut(u32),
    /// Set to stop receiving; the receive then fails with `Stopped`.
    pub stop: Option<Arc<AtomicBool>>,
    /// Filled, when the receive ends without every block, with the symbols
    /// collected for the blocks still missing (for repair from peers, or
    /// the next session).
    pub leftovers: Option<&'a mut Vec<(u32, Box<crate::codec::Collector>)>>,
    /// Symbols collected in an earlier session of the same object.
    pub preload: Vec<(u32, Box<crate::codec::Collector>)>,
}

/// Options of [`send_file`].
#[derive(Clone, Debug)]
pub struct SendOptions {
    pub session: SenderConfig,
    /// Requested block size; rounded up to whole symbols.
    pub block_size: u32,
    pub symbol_size: u16,
    pub ttl: u32,
    /// Session id; random when `None`.
    pub session_id: Option<u64>,
    /// Block hashes and file hash known beforehand (from a manifest): the
    /// file is then not read up front, so it may still be arriving.
    pub known_hashes: Option<(Vec<Digest>, Digest)>,
    /// How many leading blocks of the file are present; `None` = all. The
    /// first pass waits for blocks beyond it (fetch and multicast pipelined).
    pub available: Option<Arc<AtomicU32>>,
    /// Set to stop sending (a cancelled task); the send then fails.
    pub stop: Option<Arc<AtomicBool>>,
    /// Set to pause the data, cleared to resume (see `Sender::set_paused`).
    pub pause: Option<Arc<AtomicBool>>,
    /// Seal every datagram with the fleet key, and take only sealed ones.
    pub fleet: Option<FleetKeys>,
    /// With `fleet`: encrypt what is sent, not only authenticate it.
    pub encrypt: bool,
    /// Where dropped datagrams are counted (shared by an agent's sockets).
    pub auth: Arc<AuthState>,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            session: SenderConfig::default(),
            block_size: crate::codec::DEFAULT_BLOCK_SIZE,
            symbol_size: crate::codec::DEFAULT_SYMBOL_SIZE,
            ttl: 1,
            session_id: None,
            known_hashes: None,
            available: None,
            stop: None,
            pause: None,
            fleet: None,
            encrypt: false,
            auth: Arc::default(),
        }
    }
}

/// Progress of a send, for progress bars.
#[derive(Clone, Debug)]
pub struct SendProgress<'a> {
    pub layout: Layout,
    pub blocks_sent: u32,
    pub stats: &'a SenderStats,
    pub event: Option<&'a SenderEvent>,
}

/// What a finished send did.
#[derive(Clone, Debug)]
pub struct SendReport {
    pub session: u64,
    pub layout: Layout,
    pub file_sha256: Digest,
    pub elapsed: Duration,
    /// From the first data symbol to the end.
    pub data_elapsed: Duration,
    pub stats: SenderStats,
}

pub use crate::fileio::hash_file;
pub use crate::rng::random_id;

/// Sends `path` to `group` through the interface with address `iface`.
pub fn send_file(
    path: &Path,
    group: SocketAddrV4,
    iface: Ipv4Addr,
    opts: &SendOptions,
    progress: &mut dyn FnMut(SendProgress),
) -> Result<SendReport, SendError> {
    let read_err = |source| SendError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let layout = Layout::for_file(size, opts.block_size, opts.symbol_size)?;
    // Without a manifest's hashes, the encoder hashes each block and the
    // whole file as it first reads them: data starts at once rather than
    // after a read of the whole file (64 MiB: 70-100 ms; 10 GiB: seconds).
    let (hashes, file_sha256) = match &opts.known_hashes {
        Some((h, f)) if h.len() == layout.block_count() as usize => {
            (h.iter().copied().map(Some).collect(), Some(*f))
        }
        Some(_) => return Err(SendError::HashCount),
        None if layout.block_count() == 0 => (Vec::new(), Some(sha256(&[]))),
        None => (vec![None; layout.block_count() as usize], None),
    };
    if !group.ip().is_multicast() {
        return Err(SocketError::NotMulticast(*group.ip()).into());
    }
    let socket = socket::open_sender(iface, opts.ttl)?;
    socket.set_nonblocking(true).map_err(SocketError::Io)?;
    let port = socket::local_port(&socket).map_err(SocketError::Io)?;
    let session_id = opts.session_id.unwrap_or_else(random_id);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let start = Instant::now();
    let mut config = opts.session.clone();
    if opts.fleet.is_some() {
        config.seal_overhead = crate::auth::OVERHEAD;
    }
    let mut sender = Sender::new(
        start,
        config,
        session_id,
        SenderObject {
            layout,
            hashes: hashes.clone(),
            file_sha256,
            name,
        },
        port,
    );

    let (job_tx, job_rx) = mpsc::channel::<EncodeJob>();
    let (batch_tx, batch_rx) = mpsc::channel::<Result<EncodedBatch, SendError>>();
    let worker_path = path.to_owned();
    let keep = encoders_kept(sender.blocks_in_flight(), layout.block_size());
    let worker = thread::Builder::new()
        .name("somcast-encode".into())
        .spawn(move || {
            encode_worker(
                Source::new(file, worker_path, layout, hashes, file_sha256.is_none()),
                keep,
                job_rx,
                batch_tx,
            )
        })
        .map_err(SendError::Send)?;

    let dest = SocketAddr::V4(group);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut last_rate = 0;
    let mut last_progress = start;
    let mut data_start = None;
    // As many datagrams a system call as blocks are interleaved (fewer
    // while the round robin holds fewer): one symbol of each, so a loss
    // that takes the lot (as a lab that drops whole segmented sends does)
    // costs each block at most one symbol.
    let mut send_batch = SendBatch::new(sender.interleave() as usize);
    let mut link = Link::new(opts.fleet.as_ref(), opts.auth.clone());
    link.set_encrypt(opts.encrypt);
    // After the encoder is spawned, which is to keep the default slice.
    let _slice = crate::background::PacingSlice::enter();
    // Set once `opts.stop` is seen: the closing frames go out, then the
    // send ends with `Stopped`.
    let mut stopping = false;
    let result = loop {
        let now = Instant::now();
        if !stopping
            && opts
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            stopping = true;
            sender.close();
        }
        if let Some(a) = &opts.available {
            sender.set_available(a.load(Ordering::Acquire));
        }
        if let Some(p) = &opts.pause {
            sender.set_paused(p.load(Ordering::Relaxed));
        }
        let mut failed = None;
        while let Ok(batch) = batch_rx.try_recv() {
            match batch {
                Ok(batch) => sender.handle_batch(batch),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(plain) = link.incoming(&buf[..n]) {
                        sender.handle_datagram(now, from, plain)
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // ICMP errors from earlier sends surface here; they are not ours to act on.
                Err(_) => break,
            }
        }
        sender.handle_timeout(now);
        while let Some(job) = sender.poll_job() {
            // The worker only stops when this side drops its sender.
            let _ = job_tx.send(job);
        }
        if let Err(e) = transmit_all(&mut sender, &socket, dest, &mut send_batch, &mut link) {
            break Err(e);
        }
        while let Some(event) = sender.poll_event() {
            if let SenderEvent::DataStarted { .. } = event {
                data_start = Some(Instant::now());
            }
            log_sender_event(&event);
            progress(SendProgress {
                layout,
                blocks_sent: sender.blocks_sent(),
                stats: sender.stats(),
                event: Some(&event),
            });
        }
        if sender.is_finished() {
            break if stopping {
                Err(SendError::Stopped)
            } else {
                Ok(())
            };
        }
        let now = Instant::now();
        if now >= last_progress + PROGRESS_EVERY {
            last_progress = now;
            let stats = sender.stats();
            if stats.rate_bps != last_rate {
                last_rate = stats.rate_bps;
                tracing::debug!(
                    rate_mbps = stats.rate_bps / 1_000_000,
                    reason = %stats.rate_reason.map(|r| r.to_string()).unwrap_or_default(),
                    "multicast rate"
                );
            }
            progress(SendProgress {
                layout,
                blocks_sent: sender.blocks_sent(),
                stats: sender.stats(),
                event: None,
            });
        }
        // Sleep until the pacer or a timer is due, but wake for the encoder.
        // The loop reads the socket only when it wakes, so while a JOIN may
        // start the data it wakes every millisecond, otherwise every 5 ms.
        let longest = if sender.awaiting_joins() {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(5)
        };
        let wake = sender
            .poll_timeout()
            .unwrap_or(now)
            .clamp(now + SEND_MIN_SLEEP, now + longest);
        if wake > now {
            match batch_rx.recv_timeout(wake - now) {
                Ok(Ok(batch)) => sender.handle_batch(batch),
                Ok(Err(e)) => break Err(e),
                Err(_) => {}
            }
        }
    };
    drop(job_tx);
    let _ = worker.join();
    result?;
    let end = Instant::now();
    // Known once the encoder has read every block, which the first pass
    // does; hashed here only should a session end before that.
    let file_sha256 = match sender.file_sha256() {
        Some(h) => h,
        None => {
            let file = File::open(path).map_err(read_err)?;
            hash_file(&file, &layout).map_err(read_err)?.1
        }
    };
    Ok(SendReport {
        session: session_id,
        layout,
        file_sha256,
        elapsed: end - start,
        data_elapsed: end - data_start.unwrap_or(start),
        stats: sender.stats().clone(),
    })
}

fn transmit_all(
    sender: &mut Sender,
    socket: &UdpSocket,
    dest: SocketAddr,
    batch: &mut SendBatch,
    link: &mut Link,
) -> Result<(), SendError> {
    while let Some(plain) = sender.poll_transmit(Instant::now()) {
        let bytes = link.outgoing(plain);
        if !batch.push(bytes) {
            flush(batch, socket, dest)?;
            batch.push(bytes);
        }
        // At most one symbol of each block in the round robin: fewer than
        // the window while it fills up and drains.
        if batch.is_full() || batch.len() >= sender.blocks_in_round() {
            flush(batch, socket, dest)?;
        }
    }
    flush(batch, socket, dest)
}

fn flush(batch: &mut SendBatch, socket: &UdpSocket, dest: SocketAddr) -> Result<(), SendError> {
    loop {
        match batch.flush(socket, dest) {
            Ok(()) => return Ok(()),
            // A full send buffer: wait for the kernel to drain it.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_micros(200))
            }
            Err(e) if socket::is_no_buffer_space(&e) => thread::sleep(Duration::from_micros(200)),
            Err(e) => return Err(SendError::Send(e)),
        }
    }
}

fn log_sender_event(event: &SenderEvent) {
    match event {
        SenderEvent::Joined { receiver, from } => {
            tracing::info!(receiver = format!("{receiver:016x}"), %from, "receiver joined")
        }
        SenderEvent::StartedShort { joined, wanted } => {
            tracing::warn!("only {joined} of {wanted} receivers joined in time; sending anyway")
        }
        SenderEvent::Paused => tracing::info!("multicast paused"),
        SenderEvent::Resumed => tracing::info!("multicast resumed"),
        SenderEvent::LeftBehind { receiver } => tracing::info!(
            receiver = format!("{receiver:016x}"),
            "receiver left behind to finish from peers: far slower than the rest"
        ),
        SenderEvent::ReceiverLost { receiver } => {
            tracing::warn!(
                receiver = format!("{receiver:016x}"),
                "receiver fell silent"
            )
        }
        other => tracing::debug!(?other, "sender event"),
    }
}

/// Options of [`receive_file`].
#[derive(Clone, Debug)]
pub struct RecvOptions {
    pub session: ReceiverConfig,
    /// Share of datagrams dropped on arrival, for lab loss tests.
    pub drop_rate: f64,
    /// Seed of the drop decisions.
    pub drop_seed: u64,
    /// Set to stop receiving (Ctrl-C); the receive then fails with
    /// `Stopped` and removes its partial file.
    pub stop: Option<Arc<AtomicBool>>,
    /// Take only datagrams sealed with the fleet key; seal the feedback.
    pub fleet: Option<FleetKeys>,
    /// Where dropped datagrams are counted (shared by an agent's sockets).
    pub auth: Arc<AuthState>,
}

impl Default for RecvOptions {
    fn default() -> Self {
        Self {
            session: ReceiverConfig::default(),
            drop_rate: 0.0,
            drop_seed: 1,
            stop: None,
            fleet: None,
            auth: Arc::default(),
        }
    }
}

/// Progress of a receive, for progress bars.
#[derive(Clone, Debug)]
pub struct RecvProgress<'a> {
    pub layout: Option<Layout>,
    pub stats: &'a ReceiverStats,
}

/// What a finished receive did.
#[derive(Clone, Debug)]
pub struct RecvReport {
    pub session: u64,
    pub layout: Layout,
    pub file_sha256: Digest,
    pub elapsed: Duration,
    /// From the session's first datagram to the file verified.
    pub transfer_elapsed: Duration,
    pub stats: ReceiverStats,
    /// Datagrams dropped on purpose by `drop_rate`.
    pub injected_drops: u64,
    pub rcvbuf: BufferReport,
}

/// Receives one session from `group` into `out`. The data goes to
/// `out.somcast-partial` and is renamed only once the whole file matches
/// its announced SHA-256.
pub fn receive_file(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    out: &Path,
    opts: &RecvOptions,
    progress: &mut dyn FnMut(RecvProgress),
) -> Result<RecvReport, RecvError> {
    let (socket, rcvbuf) = socket::open_receiver(group, iface)?;
    if rcvbuf.capped() {
        tracing::warn!(
            "the kernel granted a {} KiB receive buffer of the {} KiB asked for; raise net.core.rmem_max (sysctl -w net.core.rmem_max={}) to avoid losses at high rates",
            rcvbuf.granted / 1024,
            rcvbuf.wanted / 1024,
            rcvbuf.wanted * 2
        );
    }
    receive_on(socket, rcvbuf, out, opts, progress)
}

/// [`receive_file`] on an already joined socket.
pub fn receive_on(
    socket: UdpSocket,
    rcvbuf: BufferReport,
    out: &Path,
    opts: &RecvOptions,
    progress: &mut dyn FnMut(RecvProgress),
) -> Result<RecvReport, RecvError> {
    receive_core(socket, rcvbuf, out, None, opts, progress)
}

/// Receives into a download in progress (see [`ResumeInto`]) on a joined
/// socket.
pub fn receive_resume(
    socket: UdpSocket,
    rcvbuf: BufferReport,
    into: ResumeInto,
    opts: &RecvOptions,
    progress: &mut dyn FnMut(RecvProgress),
) -> Result<RecvReport, RecvError> {
    let out = into.path.to_owned();
    receive_core(socket, rcvbuf, &out, Some(into), opts, progress)
}

fn receive_core(
    socket: UdpSocket,
    rcvbuf: BufferReport,
    out: &Path,
    mut resume: Option<ResumeInto>,
    opts: &RecvOptions,
    progress: &mut dyn FnMut(RecvProgress),
) -> Result<RecvReport, RecvError> {
    let start = Instant::now();
    let mut receiver = Receiver::new(start, opts.session.clone());
    let partial = match &resume {
        Some(r) => r.path.to_owned(),
        None => partial_path(out),
    };
    let write_err = |source| RecvError::Write {
        path: partial.clone(),
        source,
    };
    let mut drops = Dropper::new(opts.drop_rate, opts.drop_seed);
    let mut file: Option<File> = None;
    let (job_tx, job_rx) = mpsc::channel::<Work>();
    let (done_tx, done_rx) = mpsc::channel::<WorkDone>();
    // A resumed download's owner checks the whole file when it moves it.
    let hash_whole_file = resume.is_none();
    let worker = thread::Builder::new()
        .name("somcast-decode".into())
        .spawn(move || decode_worker(job_rx, done_tx, hash_whole_file))
        .map_err(RecvError::Recv)?;
    let mut batch = RecvBatch::for_socket(&socket);
    let mut link = Link::new(opts.fleet.as_ref(), opts.auth.clone());
    let mut last_progress = start;
    let mut session_start = None;
    let mut verified_at = None;
    // The whole file's hash, computed, until the expected one is known.
    let mut file_digest: Option<Digest> = None;
    let mut nonblocking = false;
    let mut last_datagram: Option<Instant> = None;
    // Blocking reads wake at least this often for timers and decode results.
    socket
        .set_read_timeout(Some(Duration::from_millis(5)))
        .map_err(RecvError::Recv)?;
    let result: Result<(), RecvError> = 'run: loop {
        if (resume.as_ref().and_then(|r| r.stop.as_ref()))
            .into_iter()
            .chain(&opts.stop)
            .any(|s| s.load(Ordering::Relaxed))
        {
            break 'run Err(RecvError::Stopped);
        }
        // While traffic flows, drain whatever the socket holds and then
        // sleep DRAIN_SLEEP: a wakeup every 2 ms instead of one per
        // datagram. When the group is quiet, block in recv instead.
        let busy = last_datagram.is_some_and(|t: Instant| t.elapsed() < QUIET_AFTER);
        if busy != nonblocking {
            socket.set_nonblocking(busy).map_err(RecvError::Recv)?;
            nonblocking = busy;
        }
        let mut got = 0usize;
        // Whether the socket was emptied (else MAX_DRAIN stopped the drain).
        let mut emptied = true;
        loop {
            match batch.recv(&socket, nonblocking) {
                Ok(n) => {
                    let now = Instant::now();
                    for i in 0..n {
                        let (bytes, from) = batch.get(i);
                        if !drops.drop()
                            && let Some(plain) = link.incoming(bytes)
                        {
                            receiver.handle_datagram(now, from, plain);
                        }
                    }
                    got += n;
                    // A short batch emptied the queue: no need to ask again.
                    if !nonblocking || !batch.was_full() {
                        break;
                    }
                    if got >= MAX_DRAIN {
                        emptied = false;
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                // ICMP port unreachable from a sender that already left.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                Err(e) => break 'run Err(RecvError::Recv(e)),
            }
        }
        if got > 0 {
            last_datagram = Some(Instant::now());
        }
        if nonblocking && emptied {
            thread::sleep(DRAIN_SLEEP);
        }
        while let Ok(done) = done_rx.try_recv() {
            match done {
                WorkDone::Block(Ok(result)) => {
                    if let (BlockResult::Written { block }, Some(r)) = (&result, resume.as_mut()) {
                        (r.on_block)(*block);
                    }
                    receiver.handle_decoded(result);
                }
                WorkDone::Block(Err(e)) => break 'run Err(write_err(e)),
                // Only sent in answer to Finish, which waits for it.
                WorkDone::FileHash(_) => {}
            }
        }
        let now = Instant::now();
        receiver.handle_timeout(now);
        check_file_hash(&mut receiver, &mut file_digest, &mut verified_at);
        while let Some(event) = receiver.poll_event() {
            match event {
                ReceiverEvent::SessionFound { session, info } => {
                    session_start = Some(now);
                    tracing::info!(
                        session = format!("{session:016x}"),
                        name = info.name,
                        size = info.file_size,
                        "session found"
                    );
                    if let Some(r) = resume.as_mut() {
                        if info.file_sha256.is_some_and(|h| h != r.file_sha256)
                            || info.file_size != r.file_size
                        {
                            break 'run Err(RecvError::WrongSession);
                        }
                        receiver.preset(r.block_hashes, r.done);
                        receiver.preload(std::mem::take(&mut r.preload));
                        match r.file.try_clone() {
                            Ok(f) => file = Some(f),
                            Err(e) => break 'run Err(write_err(e)),
                        }
                        continue;
                    }
                    let f = create_partial(&partial, info.file_size).map_err(write_err);
                    match f {
                        Ok(f) => file = Some(f),
                        Err(e) => break 'run Err(e),
                    }
                }
                ReceiverEvent::AllBlocksWritten if resume.is_some() => {
                    // Every block matched its manifest hash; the owner of a
                    // resumed download checks the whole file once, when it
                    // moves it (reading it here too would read it twice).
                    verified_at = Some(Instant::now());
                    receiver.handle_file_verified(Instant::now(), true);
                }
                ReceiverEvent::AllBlocksWritten => {
                    let layout = receiver.layout().expect("a session is active");
                    let f = file.as_ref().expect("created at SessionFound");
                    let clone = match f.try_clone() {
                        Ok(c) => c,
                        Err(e) => break 'run Err(write_err(e)),
                    };
                    let _ = job_tx.send(Work::Finish(clone, layout));
                    // Every block result is in, so the next message is the hash.
                    let got = loop {
                        match done_rx.recv() {
                            Ok(WorkDone::FileHash(h)) => break h,
                            Ok(WorkDone::Block(_)) => continue,
                            Err(_) => break Err(io::Error::other("decode thread ended")),
                        }
                    };
                    match got {
                        Ok(digest) => file_digest = Some(digest),
                        Err(e) => break 'run Err(write_err(e)),
                    }
                    check_file_hash(&mut receiver, &mut file_digest, &mut verified_at);
                }
                ReceiverEvent::Complete => break 'run Ok(()),
                ReceiverEvent::Failed(failure) => break 'run Err(failure.into()),
            }
        }
        while let Some(job) = receiver.poll_job() {
            let f = file.as_ref().expect("jobs only exist within a session");
            match f.try_clone() {
                Ok(f) => {
                    let _ = job_tx.send(Work::Decode(job, f));
                }
                Err(e) => break 'run Err(write_err(e)),
            }
        }
        while let Some(t) = receiver.poll_transmit() {
            // Feedback (always unicast to the sender) is best effort: the
            // next report repeats it.
            if let crate::transmit::Dest::To(to) = t.dest {
                let _ = socket.send_to(link.outgoing(&t.bytes), to);
            }
        }
        if now >= last_progress + PROGRESS_EVERY {
            last_progress = now;
            progress(RecvProgress {
                layout: receiver.layout(),
                stats: receiver.stats(),
            });
        }
    };
    drop(job_tx);
    let _ = worker.join();
    if let Err(e) = result {
        drop(file);
        match resume {
            None => {
                let _ = fs::remove_file(&partial);
            }
            Some(ResumeInto {
                leftovers: Some(out),
                ..
            }) => *out = receiver.take_collectors(),
            Some(_) => {}
        }
        return Err(e);
    }
    let file = file.expect("a completed session has a file");
    file.sync_all().map_err(write_err)?;
    drop(file);
    if resume.is_none() {
        fs::rename(&partial, out).map_err(|source| RecvError::Write {
            path: out.to_owned(),
            source,
        })?;
    }
    progress(RecvProgress {
        layout: receiver.layout(),
        stats: receiver.stats(),
    });
    let (session, info) = receiver.session().expect("completed");
    let end = Instant::now();
    Ok(RecvReport {
        session,
        layout: receiver.layout().expect("completed"),
        file_sha256: info
            .file_sha256
            .or(resume.map(|r| r.file_sha256))
            .expect("a verified file's hash is known"),
        elapsed: end - start,
        transfer_elapsed: verified_at.unwrap_or(end) - session_start.unwrap_or(start),
        stats: receiver.stats().clone(),
        injected_drops: drops.dropped,
        rcvbuf,
    })
}

/// Where a receive keeps its data until the file is verified.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".somcast-partial");
    out.with_file_name(name)
}

fn create_partial(path: &Path, size: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod tests;
