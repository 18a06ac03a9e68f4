//! The sending driver: a [`Sender`] on a UDP socket with an encode
//! thread reading the file, run as a loop of named steps: take the
//! controls (stop, pause, what the fetch has made available), the encoded
//! batches, the feedback; run the timers; hand out encode jobs; transmit
//! what the pacer allows; act on events; report progress; sleep until the
//! pacer or a timer is due, waking for the encoder.

use std::fs::File;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::encode::{Source, encode_worker, encoders_kept};
use super::{PROGRESS_EVERY, SendError, hash_file, random_id};
use crate::auth::{AuthState, FleetKeys, Link};
use crate::batch::SendBatch;
use crate::codec::{Layout, sha256};
use crate::sender::{
    EncodeJob, EncodedBatch, Sender, SenderConfig, SenderEvent, SenderObject, SenderStats,
};
use crate::socket::{self, SocketError};
use crate::wire::{Digest, MAX_DATAGRAM};

/// The sending loop sleeps at least this long. The pacer holds 2 ms of
/// tokens, so the rate is the same, but at 190 Mbit/s each wake sends about
/// eight datagrams instead of one (lab: a fifth of the context switches,
/// 0.2 s less CPU for 64 MiB).
const SEND_MIN_SLEEP: Duration = Duration::from_micros(500);

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

/// The file to send, opened, with its geometry and the hashes known of it.
struct Object {
    file: File,
    layout: Layout,
    hashes: Vec<Option<Digest>>,
    file_sha256: Option<Digest>,
}

impl Object {
    fn open(path: &Path, opts: &SendOptions) -> Result<Self, SendError> {
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
        Ok(Self {
            file,
            layout,
            hashes,
            file_sha256,
        })
    }
}

/// Sends `path` to `group` through the interface with address `iface`.
pub fn send_file(
    path: &Path,
    group: SocketAddrV4,
    iface: Ipv4Addr,
    opts: &SendOptions,
    progress: &mut dyn FnMut(SendProgress),
) -> Result<SendReport, SendError> {
    let start = Instant::now();
    let (mut s, worker) = Send::open(path, group, iface, opts)?;
    // After the encoder is spawned, which is to keep the default slice.
    let slice = crate::background::PacingSlice::enter();
    let result = s.run(progress);
    drop(slice);
    let Send {
        sender,
        session,
        jobs,
        data_start,
        layout,
        ..
    } = s;
    drop(jobs); // the encoder ends
    let _ = worker.join();
    result?;
    let end = Instant::now();
    // Known once the encoder has read every block, which the first pass
    // does; hashed here only should a session end before that.
    let file_sha256 = match sender.file_sha256() {
        Some(h) => h,
        None => {
            let read_err = |source| SendError::Read {
                path: path.to_owned(),
                source,
            };
            let file = File::open(path).map_err(read_err)?;
            hash_file(&file, &layout).map_err(read_err)?.1
        }
    };
    Ok(SendReport {
        session,
        layout,
        file_sha256,
        elapsed: end - start,
        data_elapsed: end - data_start.unwrap_or(start),
        stats: sender.stats().clone(),
    })
}

/// One send in progress: the machine, its socket, the encode thread's two
/// channels.
struct Send<'o> {
    sender: Sender,
    session: u64,
    socket: UdpSocket,
    dest: SocketAddr,
    link: Link,
    send_batch: SendBatch,
    /// Where feedback is read into.
    buf: Vec<u8>,
    jobs: mpsc::Sender<EncodeJob>,
    batches: mpsc::Receiver<Result<EncodedBatch, SendError>>,
    opts: &'o SendOptions,
    layout: Layout,
    /// Set once `opts.stop` is seen: the closing frames go out, then the
    /// send ends with `Stopped`.
    stopping: bool,
    last_rate: u64,
    last_progress: Instant,
    data_start: Option<Instant>,
}

impl<'o> Send<'o> {
    /// Opens the file and the socket and starts the encoder.
    fn open(
        path: &Path,
        group: SocketAddrV4,
        iface: Ipv4Addr,
        opts: &'o SendOptions,
    ) -> Result<(Self, thread::JoinHandle<()>), SendError> {
        let object = Object::open(path, opts)?;
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
        let layout = object.layout;
        let sender = Sender::new(
            start,
            config,
            session_id,
            SenderObject {
                layout,
                hashes: object.hashes.clone(),
                file_sha256: object.file_sha256,
                name,
            },
            port,
        );
        let (job_tx, job_rx) = mpsc::channel::<EncodeJob>();
        let (batch_tx, batch_rx) = mpsc::channel::<Result<EncodedBatch, SendError>>();
        let keep = encoders_kept(sender.blocks_in_flight(), layout.block_size());
        let source = Source::new(
            object.file,
            path.to_owned(),
            layout,
            object.hashes,
            object.file_sha256.is_none(),
        );
        let worker = thread::Builder::new()
            .name("somcast-encode".into())
            .spawn(move || encode_worker(source, keep, job_rx, batch_tx))
            .map_err(SendError::Send)?;
        let mut link = Link::new(opts.fleet.as_ref(), opts.auth.clone());
        link.set_encrypt(opts.encrypt);
        // As many datagrams a system call as blocks are interleaved (fewer
        // while the round robin holds fewer): one symbol of each, so a loss
        // that takes the lot (as a lab that drops whole segmented sends does)
        // costs each block at most one symbol.
        let send_batch = SendBatch::new(sender.interleave() as usize);
        let s = Send {
            sender,
            session: session_id,
            socket,
            dest: SocketAddr::V4(group),
            link,
            send_batch,
            buf: vec![0u8; MAX_DATAGRAM],
            jobs: job_tx,
            batches: batch_rx,
            opts,
            layout,
            stopping: false,
            last_rate: 0,
            last_progress: start,
            data_start: None,
        };
        Ok((s, worker))
    }
}

impl Send<'_> {
    /// Runs the steps until the session is over.
    fn run(&mut self, progress: &mut dyn FnMut(SendProgress)) -> Result<(), SendError> {
        loop {
            let now = Instant::now();
            self.take_controls();
            self.take_batches()?;
            self.read_feedback(now);
            self.sender.handle_timeout(now);
            while let Some(job) = self.sender.poll_job() {
                // The worker only stops when this side drops its sender.
                let _ = self.jobs.send(job);
            }
            transmit_all(
                &mut self.sender,
                &self.socket,
                self.dest,
                &mut self.send_batch,
                &mut self.link,
            )?;
            self.handle_events(progress);
            if self.sender.is_finished() {
                return if self.stopping {
                    Err(SendError::Stopped)
                } else {
                    Ok(())
                };
            }
            self.report_progress(progress);
            self.sleep()?;
        }
    }

    /// The caller's controls: stop, pause, and how far the file is
    /// available (a fetch the send is pipelined behind).
    fn take_controls(&mut self) {
        let stop = self.opts.stop.as_ref();
        if !self.stopping && stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            self.stopping = true;
            self.sender.close();
        }
        if let Some(a) = &self.opts.available {
            self.sender.set_available(a.load(Ordering::Acquire));
        }
        if let Some(p) = &self.opts.pause {
            self.sender.set_paused(p.load(Ordering::Relaxed));
        }
    }

    /// The encoder's batches that are ready.
    fn take_batches(&mut self) -> Result<(), SendError> {
        let mut failed = None;
        while let Ok(batch) = self.batches.try_recv() {
            match batch {
                Ok(batch) => self.sender.handle_batch(batch),
                Err(e) => failed = Some(e),
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Receivers' feedback that is waiting on the socket.
    fn read_feedback(&mut self, now: Instant) {
        loop {
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    if let Some(plain) = self.link.incoming(&self.buf[..n]) {
                        self.sender.handle_datagram(now, from, plain)
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // ICMP errors from earlier sends surface here; they are not
                // ours to act on.
                Err(_) => break,
            }
        }
    }

    fn handle_events(&mut self, progress: &mut dyn FnMut(SendProgress)) {
        while let Some(event) = self.sender.poll_event() {
            if let SenderEvent::DataStarted { .. } = event {
                self.data_start = Some(Instant::now());
            }
            log_sender_event(&event);
            progress(SendProgress {
                layout: self.layout,
                blocks_sent: self.sender.blocks_sent(),
                stats: self.sender.stats(),
                event: Some(&event),
            });
        }
    }

    fn report_progress(&mut self, progress: &mut dyn FnMut(SendProgress)) {
        let now = Instant::now();
        if now < self.last_progress + PROGRESS_EVERY {
            return;
        }
        self.last_progress = now;
        let stats = self.sender.stats();
        if stats.rate_bps != self.last_rate {
            self.last_rate = stats.rate_bps;
            tracing::debug!(
                rate_mbps = stats.rate_bps / 1_000_000,
                reason = %stats.rate_reason.map(|r| r.to_string()).unwrap_or_default(),
                "multicast rate"
            );
        }
        progress(SendProgress {
            layout: self.layout,
            blocks_sent: self.sender.blocks_sent(),
            stats: self.sender.stats(),
            event: None,
        });
    }

    /// Sleeps until the pacer or a timer is due, but wakes for the
    /// encoder. The loop reads the socket only when it wakes, so while a
    /// JOIN may start the data it wakes every millisecond, otherwise every
    /// 5 ms.
    fn sleep(&mut self) -> Result<(), SendError> {
        let now = Instant::now();
        let longest = if self.sender.awaiting_joins() {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(5)
        };
        let wake = self
            .sender
            .poll_timeout()
            .unwrap_or(now)
            .clamp(now + SEND_MIN_SLEEP, now + longest);
        if wake > now {
            match self.batches.recv_timeout(wake - now) {
                Ok(Ok(batch)) => self.sender.handle_batch(batch),
                Ok(Err(e)) => return Err(e),
                Err(_) => {}
            }
        }
        Ok(())
    }
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
