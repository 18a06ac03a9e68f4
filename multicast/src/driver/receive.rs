//! The receiving driver: a [`Receiver`] on a joined socket, a partial
//! file and a decode thread, run as a loop of named steps (quinn's
//! `ConnectionDriver` is the model): read the socket, take decode results,
//! run the timers, act on events, hand out decode jobs, send feedback,
//! report progress. The socket read waits until the receiver's next timer
//! (or a decode result, or a stop, is due a look).

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::decode::{Dropper, Work, WorkDone, check_file_hash, decode_worker};
use super::{PROGRESS_EVERY, RecvError};
use crate::auth::{AuthState, FleetKeys, Link};
use crate::batch::RecvBatch;
use crate::codec::Layout;
use crate::receiver::{BlockResult, Receiver, ReceiverConfig, ReceiverEvent, ReceiverStats};
use crate::socket::{self, BufferReport};
use crate::wire::Digest;

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

/// Receive loop: while decode jobs are out, a blocking read waits at most
/// this long (their results come on a channel, which cannot wake it).
const DECODE_POLL: Duration = Duration::from_millis(5);
/// Receive loop: the longest a blocking read waits, so a stop is seen.
const STOP_POLL: Duration = Duration::from_millis(100);

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

/// One receive in progress: the machine, its socket and file, and the
/// decode thread's two channels.
struct Receive<'r, 'o> {
    receiver: Receiver,
    socket: UdpSocket,
    batch: RecvBatch,
    link: Link,
    drops: Dropper,
    opts: &'o RecvOptions,
    resume: Option<ResumeInto<'r>>,
    /// Where the data goes until it is verified.
    partial: PathBuf,
    file: Option<File>,
    jobs: mpsc::Sender<Work>,
    done: mpsc::Receiver<WorkDone>,
    /// Decode jobs handed out whose results have not come back.
    jobs_out: usize,
    start: Instant,
    session_start: Option<Instant>,
    verified_at: Option<Instant>,
    /// The whole file's hash, computed, until the expected one is known.
    file_digest: Option<Digest>,
    nonblocking: bool,
    read_timeout: Option<Duration>,
    last_datagram: Option<Instant>,
    last_progress: Instant,
}

/// What a step says of the receive.
type Step = Result<(), RecvError>;

impl<'r> Receive<'r, '_> {
    fn write_err(&self, source: io::Error) -> RecvError {
        RecvError::Write {
            path: self.partial.clone(),
            source,
        }
    }

    fn stopped(&self) -> bool {
        (self.resume.as_ref().and_then(|r| r.stop.as_ref()))
            .into_iter()
            .chain(&self.opts.stop)
            .any(|s| s.load(Ordering::Relaxed))
    }

    /// Runs the steps until the session completes or fails.
    fn run(&mut self, progress: &mut dyn FnMut(RecvProgress)) -> Result<(), RecvError> {
        loop {
            if self.stopped() {
                return Err(RecvError::Stopped);
            }
            self.read_socket()?;
            self.take_decoded()?;
            let now = Instant::now();
            self.receiver.handle_timeout(now);
            check_file_hash(
                &mut self.receiver,
                &mut self.file_digest,
                &mut self.verified_at,
            );
            if self.handle_events(now)? {
                return Ok(());
            }
            self.hand_out_jobs()?;
            self.send_feedback();
            if now >= self.last_progress + PROGRESS_EVERY {
                self.last_progress = now;
                progress(RecvProgress {
                    layout: self.receiver.layout(),
                    stats: self.receiver.stats(),
                });
            }
        }
    }

    /// Reads what the socket holds. While traffic flows, drains it and then
    /// sleeps [`DRAIN_SLEEP`]: a wakeup every 2 ms instead of one per
    /// datagram. When the group is quiet, blocks in the read until a
    /// datagram, the receiver's next timer, or a look at the decode results
    /// and the stop flag is due.
    fn read_socket(&mut self) -> Step {
        let busy = self
            .last_datagram
            .is_some_and(|t: Instant| t.elapsed() < QUIET_AFTER);
        if busy != self.nonblocking {
            self.socket.set_nonblocking(busy).map_err(RecvError::Recv)?;
            self.nonblocking = busy;
        }
        if !busy {
            let wait = self.read_wait(Instant::now());
            if self.read_timeout != Some(wait) {
                self.socket
                    .set_read_timeout(Some(wait))
                    .map_err(RecvError::Recv)?;
                self.read_timeout = Some(wait);
            }
        }
        let mut got = 0usize;
        // Whether the socket was emptied (else MAX_DRAIN stopped the drain).
        let mut emptied = true;
        loop {
            match self.batch.recv(&self.socket, self.nonblocking) {
                Ok(n) => {
                    let now = Instant::now();
                    for i in 0..n {
                        let (bytes, from) = self.batch.get(i);
                        if !self.drops.drop()
                            && let Some(plain) = self.link.incoming(bytes)
                        {
                            self.receiver.handle_datagram(now, from, plain);
                        }
                    }
                    got += n;
                    // A short batch emptied the queue: no need to ask again.
                    if !self.nonblocking || !self.batch.was_full() {
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
                Err(e) => return Err(RecvError::Recv(e)),
            }
        }
        if got > 0 {
            self.last_datagram = Some(Instant::now());
        }
        if self.nonblocking && emptied {
            thread::sleep(DRAIN_SLEEP);
        }
        Ok(())
    }

    /// How long a blocking read may wait: until the receiver's next timer
    /// or the next progress report, and no longer than [`DECODE_POLL`]
    /// while decode jobs are out, [`STOP_POLL`] otherwise.
    fn read_wait(&self, now: Instant) -> Duration {
        let cap = if self.jobs_out > 0 {
            DECODE_POLL
        } else {
            STOP_POLL
        };
        let due = self
            .receiver
            .poll_timeout()
            .map_or(cap, |t| t.saturating_duration_since(now))
            .min((self.last_progress + PROGRESS_EVERY).saturating_duration_since(now));
        // Zero would mean "no timeout" to the OS.
        due.clamp(Duration::from_millis(1), cap)
    }

    /// Takes the decode thread's results.
    fn take_decoded(&mut self) -> Step {
        while let Ok(done) = self.done.try_recv() {
            match done {
                WorkDone::Block(Ok(result)) => {
                    self.jobs_out = self.jobs_out.saturating_sub(1);
                    if let (BlockResult::Written { block }, Some(r)) =
                        (&result, self.resume.as_mut())
                    {
                        (r.on_block)(*block);
                    }
                    self.receiver.handle_decoded(result);
                }
                WorkDone::Block(Err(e)) => return Err(self.write_err(e)),
                // Only sent in answer to Finish, which waits for it.
                WorkDone::FileHash(_) => {}
            }
        }
        Ok(())
    }

    /// Acts on the receiver's events; true once the session is complete.
    fn handle_events(&mut self, now: Instant) -> Result<bool, RecvError> {
        while let Some(event) = self.receiver.poll_event() {
            match event {
                ReceiverEvent::SessionFound { session, info } => {
                    self.session_start = Some(now);
                    tracing::info!(
                        session = format!("{session:016x}"),
                        name = info.name,
                        size = info.file_size,
                        "session found"
                    );
                    self.open_file(&info)?;
                }
                ReceiverEvent::AllBlocksWritten if self.resume.is_some() => {
                    // Every block matched its manifest hash; the owner of a
                    // resumed download checks the whole file once, when it
                    // moves it (reading it here too would read it twice).
                    self.verified_at = Some(Instant::now());
                    self.receiver.handle_file_verified(Instant::now(), true);
                }
                ReceiverEvent::AllBlocksWritten => self.hash_file()?,
                ReceiverEvent::Complete => return Ok(true),
                ReceiverEvent::Failed(failure) => return Err(failure.into()),
            }
        }
        Ok(false)
    }

    /// The session's file: the resumed download (if the session carries
    /// its object), or a new partial file.
    fn open_file(&mut self, info: &crate::wire::SessionInfo) -> Step {
        if let Some(r) = self.resume.as_mut() {
            if info.file_sha256.is_some_and(|h| h != r.file_sha256) || info.file_size != r.file_size
            {
                return Err(RecvError::WrongSession);
            }
            self.receiver.preset(r.block_hashes, r.done);
            self.receiver.preload(std::mem::take(&mut r.preload));
            let f = r.file.try_clone();
            self.file = Some(f.map_err(|e| self.write_err(e))?);
            return Ok(());
        }
        let f = create_partial(&self.partial, info.file_size);
        self.file = Some(f.map_err(|e| self.write_err(e))?);
        Ok(())
    }

    /// Every block is written: the decode thread hashes the whole file.
    fn hash_file(&mut self) -> Step {
        let layout = self.receiver.layout().expect("a session is active");
        let f = self.file.as_ref().expect("created at SessionFound");
        let clone = f.try_clone().map_err(|e| self.write_err(e))?;
        let _ = self.jobs.send(Work::Finish(clone, layout));
        // Every block result is in, so the next message is the hash.
        let got = loop {
            match self.done.recv() {
                Ok(WorkDone::FileHash(h)) => break h,
                Ok(WorkDone::Block(_)) => continue,
                Err(_) => break Err(io::Error::other("decode thread ended")),
            }
        };
        self.file_digest = Some(got.map_err(|e| self.write_err(e))?);
        check_file_hash(
            &mut self.receiver,
            &mut self.file_digest,
            &mut self.verified_at,
        );
        Ok(())
    }

    /// Hands the receiver's decode jobs to the decode thread.
    fn hand_out_jobs(&mut self) -> Step {
        while let Some(job) = self.receiver.poll_job() {
            let f = self
                .file
                .as_ref()
                .expect("jobs only exist within a session");
            let f = f.try_clone().map_err(|e| self.write_err(e))?;
            let _ = self.jobs.send(Work::Decode(job, f));
            self.jobs_out += 1;
        }
        Ok(())
    }

    /// Sends the receiver's feedback (always unicast to the sender), best
    /// effort: the next report repeats it.
    fn send_feedback(&mut self) {
        while let Some(t) = self.receiver.poll_transmit() {
            if let crate::transmit::Dest::To(to) = t.dest {
                let _ = self.socket.send_to(self.link.outgoing(&t.bytes), to);
            }
        }
    }
}

fn receive_core(
    socket: UdpSocket,
    rcvbuf: BufferReport,
    out: &Path,
    resume: Option<ResumeInto>,
    opts: &RecvOptions,
    progress: &mut dyn FnMut(RecvProgress),
) -> Result<RecvReport, RecvError> {
    let start = Instant::now();
    let partial = match &resume {
        Some(r) => r.path.to_owned(),
        None => partial_path(out),
    };
    let (job_tx, job_rx) = mpsc::channel::<Work>();
    let (done_tx, done_rx) = mpsc::channel::<WorkDone>();
    // A resumed download's owner checks the whole file when it moves it.
    let hash_whole_file = resume.is_none();
    let worker = thread::Builder::new()
        .name("somcast-decode".into())
        .spawn(move || decode_worker(job_rx, done_tx, hash_whole_file))
        .map_err(RecvError::Recv)?;
    let mut r = Receive {
        receiver: Receiver::new(start, opts.session.clone()),
        batch: RecvBatch::for_socket(&socket),
        socket,
        link: Link::new(opts.fleet.as_ref(), opts.auth.clone()),
        drops: Dropper::new(opts.drop_rate, opts.drop_seed),
        opts,
        resume,
        partial,
        file: None,
        jobs: job_tx,
        done: done_rx,
        jobs_out: 0,
        start,
        session_start: None,
        verified_at: None,
        file_digest: None,
        nonblocking: false,
        read_timeout: None,
        last_datagram: None,
        last_progress: start,
    };
    let result = r.run(progress);
    // The decode thread ends when its channel closes.
    let (tx, _) = mpsc::channel();
    drop(std::mem::replace(&mut r.jobs, tx));
    let _ = worker.join();
    r.finish(result, out, rcvbuf, progress)
}

impl Receive<'_, '_> {
    /// After the loop: a failed receive removes its partial file (or hands
    /// a resumed one's leftovers back); a complete one syncs and moves it.
    fn finish(
        mut self,
        result: Result<(), RecvError>,
        out: &Path,
        rcvbuf: BufferReport,
        progress: &mut dyn FnMut(RecvProgress),
    ) -> Result<RecvReport, RecvError> {
        if let Err(e) = result {
            drop(self.file.take());
            match self.resume.as_mut() {
                None => {
                    let _ = fs::remove_file(&self.partial);
                }
                Some(ResumeInto {
                    leftovers: Some(out),
                    ..
                }) => **out = self.receiver.take_collectors(),
                Some(_) => {}
            }
            return Err(e);
        }
        let file = self.file.take().expect("a completed session has a file");
        file.sync_all().map_err(|e| self.write_err(e))?;
        drop(file);
        if self.resume.is_none() {
            fs::rename(&self.partial, out).map_err(|source| RecvError::Write {
                path: out.to_owned(),
                source,
            })?;
        }
        progress(RecvProgress {
            layout: self.receiver.layout(),
            stats: self.receiver.stats(),
        });
        let (session, info) = self.receiver.session().expect("completed");
        let end = Instant::now();
        Ok(RecvReport {
            session,
            layout: self.receiver.layout().expect("completed"),
            file_sha256: info
                .file_sha256
                .or(self.resume.map(|r| r.file_sha256))
                .expect("a verified file's hash is known"),
            elapsed: end - self.start,
            transfer_elapsed: self.verified_at.unwrap_or(end)
                - self.session_start.unwrap_or(self.start),
            stats: self.receiver.stats().clone(),
            injected_drops: self.drops.dropped,
            rcvbuf,
        })
    }
}

/// Where a receive keeps its data until the file is verified.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".somcast-partial");
    out.with_file_name(name)
}

pub(super) fn create_partial(path: &Path, size: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    Ok(file)
}
