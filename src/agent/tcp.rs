//! What the OS's TCP stack tells and takes for a paced upload: the
//! connection's round-trip time, and a pacing rate it keeps itself (so a
//! paced sender does not send in bursts that queue on a slow link).
//!
//! Linux has both (`TCP_INFO`, `SO_MAX_PACING_RATE`). Elsewhere neither is
//! read here: the RTT is `None`, and the caller does not adapt; on
//! Windows it asks for the OS's LEDBAT++ instead ([`os_background`]), and
//! elsewhere a background upload runs at its cap, as in foreground.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use repair::pace::{Bucket, Mode, Pace};
use tokio::net::TcpStream;

/// How often a paced upload reads its connection's RTT.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// The pace of one background upload: the RTT its TCP stack measures feeds
/// [`Pace`], whose rate the stack keeps (Linux) or the writer waits out.
pub struct UploadPace {
    socket: Handle,
    pace: Pace,
    bucket: Bucket,
    /// The kernel paces (else the writer waits, a frame at a time).
    kernel: bool,
    applied: Option<u64>,
    /// What was acknowledged when, at the start of the current window; and
    /// the most acknowledged per second in recent windows.
    acked: Option<(Instant, u64)>,
    delivered: VecDeque<f64>,
}

/// A window of acknowledged bytes, and how many windows the most
/// delivered is taken over (a block's planning leaves the upload idle for
/// a moment: that is not the path's rate).
const DELIVERY_WINDOW: Duration = Duration::from_millis(100);
const DELIVERY_WINDOWS: usize = 10;

impl UploadPace {
    /// The pace of an upload on `stream` in `mode`, at least `floor_bps`;
    /// `None` when it is not paced: foreground, or no RTT to go by on this
    /// OS (a guess would only slow it).
    /// Its slow start begins at `start_bps` ([`repair::pace::PathMemory`]).
    pub fn new(
        mode: Mode,
        floor_bps: u64,
        start_bps: u64,
        stream: &TcpStream,
    ) -> Option<UploadPace> {
        let socket = handle(stream);
        if mode != Mode::Background {
            return None;
        }
        let path = path_of(socket)?;
        let start = start_bps.max(path.first_flight_bps);
        let pace = Pace::starting_at(mode, None, floor_bps, start);
        let start = pace.rate_bps();
        tracing::debug!(
            "upload: rtt {:?}, first flight {} bit/s: slow start from {start:?} bit/s",
            path.rtt,
            path.first_flight_bps
        );
        Some(UploadPace {
            socket,
            pace,
            bucket: Bucket::new(),
            kernel: pacing_of(socket, start.unwrap_or(u64::MAX)),
            applied: start,
            acked: None,
            delivered: VecDeque::new(),
        })
    }

    /// The most the path delivered in a recent window, bit/s.
    pub fn delivered_bps(&self) -> Option<u64> {
        let most = self.delivered.iter().copied().fold(0.0, f64::max);
        (most > 0.0).then_some((most * 8.0) as u64)
    }

    /// Reads the RTT and moves the rate: every [`SAMPLE_EVERY`] while the
    /// upload runs, also while a write waits (at a low rate one frame takes
    /// a while to leave).
    pub fn sample(&mut self) {
        let Some(path) = path_of(self.socket) else {
            return;
        };
        let now = Instant::now();
        self.pace.on_delivery_rate(path.delivery_bps);
        self.pace.on_delay(now, path.rtt);
        self.note_acked(now, path.acked);
        tracing::trace!(
            "upload: rtt {:?}, delivery {} bit/s, queue {:?}, rate {:?}",
            path.rtt,
            path.delivery_bps,
            self.pace.queue(),
            self.pace.rate_bps()
        );
        let rate = self.pace.rate_bps();
        let moved = match (rate, self.applied) {
            (Some(r), Some(a)) => r.abs_diff(a) * 33 > a,
            (r, a) => r != a,
        };
        if self.kernel && moved {
            pacing_of(self.socket, rate.unwrap_or(u64::MAX));
            self.applied = rate;
        }
    }

    /// Keeps the rate within reach of what the path delivered lately, so
    /// that it cannot run away while the queue stays short (a fast LAN).
    fn note_acked(&mut self, now: Instant, acked: u64) {
        let Some((since, from)) = self.acked else {
            self.acked = Some((now, acked));
            return;
        };
        let over = now.saturating_duration_since(since);
        if over < DELIVERY_WINDOW {
            return;
        }
        self.delivered
            .push_back(acked.saturating_sub(from) as f64 / over.as_secs_f64());
        if self.delivered.len() > DELIVERY_WINDOWS {
            self.delivered.pop_front();
        }
        self.acked = Some((now, acked));
        let most = self.delivered.iter().copied().fold(0.0, f64::max);
        self.pace.on_delivered(most as u64, Duration::from_secs(1));
    }

    /// Called before `bytes` are written: without the kernel's pacing,
    /// holds the writer back if it is ahead of the rate.
    pub async fn before(&mut self, bytes: usize) {
        if self.kernel {
            return;
        }
        if let Some(until) = self
            .bucket
            .charge(Instant::now(), bytes, self.pace.rate_bps())
        {
            tokio::time::sleep_until(until.into()).await;
        }
    }

    /// The rate it holds now, bit/s.
    pub fn rate_bps(&self) -> Option<u64> {
        self.pace.rate_bps()
    }
}

/// A rate several transfers share (a task's downloads from all its
/// peers): each waits its turn in one bucket.
#[derive(Clone, Debug)]
pub struct SharedCap {
    bps: Option<u64>,
    bucket: std::sync::Arc<std::sync::Mutex<Bucket>>,
}

impl SharedCap {
    /// A cap of `bps` (`None`: none).
    pub fn new(bps: Option<u64>) -> Self {
        SharedCap {
            bps: bps.filter(|&b| b > 0),
            bucket: Default::default(),
        }
    }

    /// Waits until `bytes` more are due.
    pub async fn take(&self, bytes: usize) {
        if self.bps.is_none() {
            return;
        }
        let until = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .charge(Instant::now(), bytes, self.bps);
        if let Some(until) = until {
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

/// The socket, as the OS calls read it. Only a number: valid while the
/// connection it came from is open, which its pace does not outlive.
#[cfg(target_os = "linux")]
type Handle = std::os::fd::RawFd;
/// Elsewhere nothing is read or set through it.
#[cfg(not(target_os = "linux"))]
#[derive(Clone, Copy)]
struct Handle;

#[cfg(target_os = "linux")]
fn handle(stream: &TcpStream) -> Handle {
    use std::os::fd::AsRawFd;
    stream.as_raw_fd()
}

#[cfg(not(target_os = "linux"))]
fn handle(_stream: &TcpStream) -> Handle {
    Handle
}

/// What the TCP stack knows of a connection's path.
struct PathInfo {
    /// The smoothed RTT.
    rtt: Duration,
    /// Bytes the peer has acknowledged.
    acked: u64,
    /// The stack's latest delivery-rate sample, bit/s (0: none).
    delivery_bps: u64,
    /// What the congestion window carries in one RTT, bit/s: at the
    /// connection's start, its first flight.
    first_flight_bps: u64,
}

/// The path as the stack knows it, once it has an RTT.
#[cfg(target_os = "linux")]
fn path_of(fd: Handle) -> Option<PathInfo> {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable tcp_info of `len` bytes; the fd is a
    // connection's, open while its pace lives (a closed one fails, EBADF).
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Before the first ACK of data the estimate is the handshake's, or 0.
    // A kernel older than a field leaves it 0 (`info` starts zeroed).
    (r == 0 && info.tcpi_rtt > 0).then(|| {
        let rtt = Duration::from_micros(u64::from(info.tcpi_rtt));
        PathInfo {
            rtt,
            acked: info.tcpi_bytes_acked,
            delivery_bps: info.tcpi_delivery_rate.saturating_mul(8),
            first_flight_bps: repair::pace::first_flight_bps(
                info.tcpi_snd_cwnd,
                info.tcpi_snd_mss,
                rtt,
            ),
        }
    })
}

#[cfg(not(target_os = "linux"))]
fn path_of(_socket: Handle) -> Option<PathInfo> {
    None
}

#[cfg(target_os = "linux")]
fn pacing_of(fd: Handle, bps: u64) -> bool {
    /// asm-generic's value (x86, arm, riscv and most others).
    const SO_MAX_PACING_RATE: libc::c_int = 47;
    if cfg!(any(
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc64",
        target_arch = "powerpc",
        target_arch = "powerpc64"
    )) {
        return false;
    }
    // Bytes per second, as a 32-bit value (what every kernel takes).
    let rate: u32 = (bps / 8).clamp(1, u64::from(u32::MAX - 1)) as u32;
    // SAFETY: a u32 option value of its own size, on a connection's fd.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MAX_PACING_RATE,
            (&rate as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn pacing_of(_socket: Handle, _bps: u64) -> bool {
    false
}

/// Asks the OS's own low-priority congestion control for what `stream`
/// sends, where it has one: Windows' LEDBAT++ (Windows 10 1809 and Server
/// 2019 on; `SIO_PRIORITY_HINT`). Whether it took it.
#[cfg(windows)]
pub fn os_background(stream: &TcpStream) -> bool {
    use std::os::windows::io::AsRawSocket;
    use windows_sys::Win32::Networking::WinSock::{
        SIO_PRIORITY_HINT, SOCKET, SocketPriorityHintVeryLow, WSAIoctl,
    };
    let hint = SocketPriorityHintVeryLow;
    let mut returned = 0u32;
    // SAFETY: the in-buffer is the hint, of its own size; no out-buffer,
    // no overlapped I/O; the socket is the stream's, open while borrowed.
    let r = unsafe {
        WSAIoctl(
            stream.as_raw_socket() as SOCKET,
            SIO_PRIORITY_HINT,
            (&hint as *const i32).cast(),
            std::mem::size_of_val(&hint) as u32,
            std::ptr::null_mut(),
            0,
            &mut returned,
            std::ptr::null_mut(),
            None,
        )
    };
    r == 0
}

#[cfg(not(windows))]
pub fn os_background(_stream: &TcpStream) -> bool {
    false
}

/// Asks the stack to acknowledge what arrives at once rather than delay
/// the ACK: a receiver that does gives a paced uploader on the other end
/// true round-trip times at low rates. Linux forgets it after a while, so
/// it is asked after every read.
#[cfg(target_os = "linux")]
pub fn quickack(stream: &TcpStream) {
    let one: libc::c_int = 1;
    // SAFETY: an int option value of its own size, on the stream's fd.
    unsafe {
        libc::setsockopt(
            handle(stream),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
pub fn quickack(_stream: &TcpStream) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_pacing(stream: &TcpStream, bps: u64) -> bool {
        pacing_of(handle(stream), bps)
    }

    #[tokio::test]
    async fn a_loopback_connection_tells_its_path_and_takes_a_pacing_rate() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut client, (mut server, _)) = (client.unwrap(), server.unwrap());
        if !cfg!(target_os = "linux") {
            assert!(path_of(handle(&server)).is_none());
            return;
        }
        // The accepting side knows the RTT from the handshake: an upload's
        // pace starts from its first flight.
        let start = path_of(handle(&server)).expect("an RTT after the handshake");
        assert!(start.rtt < Duration::from_secs(1));
        assert!(start.first_flight_bps > 0);
        assert!(set_pacing(&server, 10_000_000_000));
        let data = vec![7u8; 1 << 20];
        let (sent, got) = tokio::join!(server.write_all(&data), async {
            let mut got = vec![0u8; data.len()];
            client.read_exact(&mut got).await.map(|_| got)
        });
        sent.unwrap();
        assert_eq!(got.unwrap(), data);
        let after = path_of(handle(&server)).unwrap();
        assert!(after.acked > 0, "nothing acknowledged");
        assert!(after.delivery_bps > 0, "no delivery-rate sample");
    }
}
