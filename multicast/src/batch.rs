//! Several datagrams per system call on the receiving side.
//!
//! A receiver reads about 16 000 datagrams a second at 200 Mbit/s. On Linux
//! `recvmmsg` takes all that are queued (up to [`BATCH`]) in one call; other
//! systems take them one `recv_from` at a time (up to [`BATCH`] from a
//! non-blocking socket), with the same interface.

use std::io;
use std::net::{SocketAddr, UdpSocket};

/// Datagrams read per call at most: 16 slots of 64 KiB (any UDP datagram
/// fits one) are 1 MiB of buffer.
pub const BATCH: usize = 16;
const SLOT: usize = 64 << 10;

/// Buffers for a batch and what the last read put in them.
pub struct RecvBatch {
    storage: Vec<u8>,
    /// Start in `storage`, length and sender of each datagram read.
    got: Vec<(usize, usize, SocketAddr)>,
    /// Whether the last read used every slot (so more may be queued).
    full: bool,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            storage: vec![0u8; BATCH * SLOT],
            got: Vec::with_capacity(BATCH),
            full: false,
        }
    }
}

impl RecvBatch {
    /// A batch for `socket`, which it also asks (on Linux) to hand over
    /// datagrams that arrived segmented from one send as one read, to be
    /// cut apart here: the kernel then queues one buffer for the lot
    /// instead of cutting it into datagrams first. Only readers that go
    /// through a `RecvBatch` may get such reads, so this is the place that
    /// asks for them.
    pub fn for_socket(socket: &UdpSocket) -> Self {
        #[cfg(target_os = "linux")]
        linux::accept_segmented(socket);
        #[cfg(not(target_os = "linux"))]
        let _ = socket;
        Self::default()
    }

    /// Reads what is queued, at least one datagram (waiting as the socket's
    /// blocking mode and read timeout say), at most [`BATCH`] reads;
    /// `nonblocking` must say which mode the socket is in. Returns how many
    /// datagrams were read; a datagram from an address family other than
    /// IPv4 or IPv6 is dropped and not counted.
    pub fn recv(&mut self, socket: &UdpSocket, nonblocking: bool) -> io::Result<usize> {
        self.got.clear();
        #[cfg(target_os = "linux")]
        let reads = {
            let _ = nonblocking; // recvmmsg's MSG_WAITFORONE does the same.
            linux::recv(socket, &mut self.storage, &mut self.got)?
        };
        #[cfg(not(target_os = "linux"))]
        let reads = one_by_one(socket, nonblocking, &mut self.storage, &mut self.got)?;
        self.full = reads == BATCH;
        Ok(self.got.len())
    }

    /// Whether the last read took as many reads as it could, so that more
    /// may be queued (else it emptied the queue).
    pub fn was_full(&self) -> bool {
        self.full
    }

    /// Datagram `i` of the last read and its sender.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr) {
        let (start, len, from) = self.got[i];
        (&self.storage[start..start + len], from)
    }
}

/// The portable way: one `recv_from` per datagram; on a non-blocking socket
/// as many as are queued, up to [`BATCH`]. Returns how many reads it made.
#[cfg_attr(target_os = "linux", allow(dead_code))]
fn one_by_one(
    socket: &UdpSocket,
    nonblocking: bool,
    storage: &mut [u8],
    got: &mut Vec<(usize, usize, SocketAddr)>,
) -> io::Result<usize> {
    for (slot, buf) in storage.chunks_exact_mut(SLOT).enumerate() {
        match socket.recv_from(buf) {
            Ok((len, from)) => got.push((slot * SLOT, len, from)),
            // Later reads only take what is already queued; an error there
            // comes back on the next call.
            Err(_) if slot > 0 => break,
            Err(e) => return Err(e),
        }
        if !nonblocking {
            break;
        }
    }
    Ok(got.len())
}

/// Datagrams of one size that go out together: on Linux in one `sendmsg`
/// that the kernel cuts into separate datagrams (UDP segmentation offload),
/// so the path to the wire is walked once for the lot; elsewhere, or when
/// the kernel refuses, one `send_to` each.
///
/// What the receivers see is the same either way: the same datagrams, in
/// the same order.
pub struct SendBatch {
    buf: Vec<u8>,
    /// Datagrams in `buf`, and the size of each.
    count: usize,
    each: usize,
    max: usize,
    /// Whether to hand the kernel the lot (until it refuses once).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    segmentation: bool,
}

impl SendBatch {
    /// Up to `max` datagrams a call (1 turns batching off).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            count: 0,
            each: 0,
            max: max.max(1),
            segmentation: cfg!(target_os = "linux") && max > 1,
        }
    }

    /// Adds a datagram unless the batch is full or holds datagrams of
    /// another size; then it must be flushed first.
    pub fn push(&mut self, datagram: &[u8]) -> bool {
        if self.count == 0 {
            self.each = datagram.len();
        } else if datagram.len() != self.each || self.is_full() {
            return false;
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
        true
    }

    pub fn is_full(&self) -> bool {
        self.count >= self.max
    }

    /// Datagrams held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Sends what the batch holds. On an error (such as a full send
    /// buffer: `WouldBlock` or ENOBUFS) the datagrams not sent stay in the
    /// batch for the next try.
    pub fn flush(&mut self, socket: &UdpSocket, dest: SocketAddr) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if self.segmentation && self.count > 1 && self.each > 0 {
            match linux::send_segmented(socket, dest, &self.buf, self.each) {
                Ok(()) => {
                    self.buf.clear();
                    self.count = 0;
                    return Ok(());
                }
                Err(e) if linux::segmentation_refused(&e) => {
                    tracing::debug!("UDP segmentation offload refused ({e}); sending one by one");
                    self.segmentation = false;
                }
                Err(e) => return Err(e),
            }
        }
        // One by one; what went out is taken off the front, so a retry
        // after an error sends only the rest.
        let mut sent = 0;
        let result = loop {
            if sent == self.count {
                break Ok(());
            }
            let at = sent * self.each;
            if let Err(e) = socket.send_to(&self.buf[at..at + self.each], dest) {
                break Err(e);
            }
            sent += 1;
        };
        self.buf.drain(..sent * self.each);
        self.count -= sent;
        result
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
    use std::os::fd::AsRawFd;

    use super::{BATCH, SLOT};

    /// Asks for segmented sends to arrive whole (UDP_GRO); a kernel that
    /// cannot (before 5.0) cuts them up as before.
    pub fn accept_segmented(socket: &UdpSocket) {
        let on: libc::c_int = 1;
        // SAFETY: a plain setsockopt with a pointer to a live c_int.
        let _ = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }

    /// Room for the UDP_GRO control message (a cmsghdr and an int), as u64s
    /// so that it is aligned for cmsghdr.
    const CONTROL: usize = 4;

    /// Returns how many reads (`mmsghdr`s) were filled.
    pub fn recv(
        socket: &UdpSocket,
        storage: &mut [u8],
        got: &mut Vec<(usize, usize, SocketAddr)>,
    ) -> io::Result<usize> {
        debug_assert_eq!(storage.len(), BATCH * SLOT);
        // SAFETY: all-zero is a valid value of these plain C structs.
        let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let mut controls = [[0u64; CONTROL]; BATCH];
        for (i, chunk) in storage.chunks_exact_mut(SLOT).enumerate() {
            iovs[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_control = controls[i].as_mut_ptr().cast();
            msgs[i].msg_hdr.msg_controllen = size_of::<[u64; CONTROL]>() as _;
        }
        // SAFETY: every mmsghdr points at a live iovec over its own SLOT
        // bytes of `storage`, at its own sockaddr_storage and at its own
        // control buffer, all of which outlive the call; the kernel writes
        // at most iov_len, msg_namelen and msg_controllen bytes.
        // MSG_WAITFORONE: wait (per the socket's mode and SO_RCVTIMEO) for
        // the first datagram only.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (i, msg) in msgs.iter().enumerate().take(n as usize) {
            // A read larger than the slot would be truncated; none is (the
            // slot is 64 KiB), but never trust a length.
            let len = (msg.msg_len as usize).min(SLOT);
            let Some(from) = to_socket_addr(&addrs[i]) else {
                continue;
            };
            // Datagrams that arrived whole from one segmented send: each
            // `segment` bytes long but the last.
            let segment = segment_size(&msg.msg_hdr).filter(|&s| s > 0 && s < len);
            let step = segment.unwrap_or(len.max(1));
            let mut at = 0;
            loop {
                let this = step.min(len - at);
                got.push((i * SLOT + at, this, from));
                at += this;
                if at >= len {
                    break;
                }
            }
        }
        Ok(n as usize)
    }

    /// The segment size in a UDP_GRO control message of `hdr`, if any.
    fn segment_size(hdr: &libc::msghdr) -> Option<usize> {
        // SAFETY: the kernel filled msg_control and set msg_controllen; the
        // CMSG macros stay within them, and the data of a UDP_GRO message is
        // an int (read unaligned all the same).
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                    let size =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                    return usize::try_from(size).ok();
                }
                cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
            }
        }
        None
    }

    /// One `sendmsg` of `buf` to `dest`, which the kernel cuts into
    /// datagrams of `each` bytes (UDP_SEGMENT).
    pub fn send_segmented(
        socket: &UdpSocket,
        dest: SocketAddr,
        buf: &[u8],
        each: usize,
    ) -> io::Result<()> {
        let SocketAddr::V4(v4) = dest else {
            return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT));
        };
        let Ok(segment) = u16::try_from(each) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let mut addr: libc::sockaddr_in = unsafe { zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = v4.port().to_be();
        addr.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // Room for one cmsghdr carrying a u16, aligned as cmsghdr wants.
        let mut control = [0u64; 4];
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        debug_assert!(space <= size_of_val(&control));
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `control`, which is larger than
        // `space` and aligned for cmsghdr, so the first header and its data
        // lie inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        }
        // SAFETY: every pointer in `msg` points at a live local that
        // outlives the call; the kernel only reads through them.
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Errors that mean this kernel or interface cannot segment UDP (as
    /// opposed to a full buffer, which passes).
    pub fn segmentation_refused(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(
                libc::EIO
                    | libc::EINVAL
                    | libc::ENOPROTOOPT
                    | libc::EOPNOTSUPP
                    | libc::EAFNOSUPPORT
            )
        )
    }

    fn to_socket_addr(a: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match libc::c_int::from(a.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in,
                // which is smaller than sockaddr_storage and less aligned.
                let v4 =
                    unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                let ip = u32::from_be(v4.sin_addr.s_addr);
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip.into(),
                    u16::from_be(v4.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let v6 =
                    unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    v6.sin6_addr.s6_addr.into(),
                    u16::from_be(v6.sin6_port),
                    u32::from_be(v6.sin6_flowinfo),
                    v6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_batch_returns_every_queued_datagram_with_its_sender_in_order() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let sizes = [1usize, 1400, 0, 65_000, 7];
        for (i, &n) in sizes.iter().enumerate() {
            tx.send_to(&vec![i as u8; n], to).unwrap();
        }
        let mut batch = RecvBatch::default();
        let mut seen = Vec::new();
        while seen.len() < sizes.len() {
            let n = batch.recv(&rx, false).unwrap();
            assert!(n >= 1);
            for i in 0..n {
                let (bytes, from) = batch.get(i);
                assert_eq!(from, tx.local_addr().unwrap());
                seen.push(bytes.to_vec());
            }
        }
        for (i, (bytes, &n)) in seen.iter().zip(&sizes).enumerate() {
            assert_eq!(bytes.len(), n, "datagram {i}");
            assert!(bytes.iter().all(|&b| b == i as u8));
        }
    }

    #[test]
    fn the_portable_reader_takes_everything_queued_from_a_nonblocking_socket() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..5u8 {
            tx.send_to(&[i; 100], rx.local_addr().unwrap()).unwrap();
        }
        // Loopback delivers synchronously, but give it a moment anyway.
        std::thread::sleep(Duration::from_millis(20));
        rx.set_nonblocking(true).unwrap();
        let mut storage = vec![0u8; BATCH * SLOT];
        let mut got = Vec::new();
        one_by_one(&rx, true, &mut storage, &mut got).unwrap();
        assert_eq!(got.len(), 5);
        for (i, &(start, len, _)) in got.iter().enumerate() {
            assert_eq!((start, len), (i * SLOT, 100));
            assert_eq!(storage[start], i as u8);
        }
        // Blocking mode: one datagram per call.
        tx.send_to(&[9; 10], rx.local_addr().unwrap()).unwrap();
        tx.send_to(&[9; 10], rx.local_addr().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        rx.set_nonblocking(false).unwrap();
        got.clear();
        one_by_one(&rx, false, &mut storage, &mut got).unwrap();
        assert_eq!(got.len(), 1);
    }

    /// Datagrams `count` of `size` bytes, each filled with its index.
    fn numbered(count: usize, size: usize) -> Vec<Vec<u8>> {
        (0..count).map(|i| vec![i as u8; size]).collect()
    }

    /// Reads until `want` datagrams came (or the read times out).
    fn read_all(rx: &UdpSocket, batch: &mut RecvBatch, want: usize) -> Vec<Vec<u8>> {
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut seen = Vec::new();
        while seen.len() < want {
            let n = batch.recv(rx, false).unwrap();
            seen.extend((0..n).map(|i| batch.get(i).0.to_vec()));
        }
        seen
    }

    /// Sends `datagrams` through a `SendBatch` of `max` as the driver does,
    /// and gives the batch back.
    fn send_batched(
        tx: &UdpSocket,
        to: SocketAddr,
        max: usize,
        datagrams: &[Vec<u8>],
    ) -> SendBatch {
        let mut out = SendBatch::new(max);
        for d in datagrams {
            if !out.push(d) {
                out.flush(tx, to).unwrap();
                assert!(out.push(d));
            }
            if out.is_full() {
                out.flush(tx, to).unwrap();
            }
        }
        out.flush(tx, to).unwrap();
        out
    }

    #[test]
    fn batched_sends_arrive_as_the_same_datagrams_in_order() {
        // Runs of one size, other sizes between them, a run longer than a
        // batch: each must arrive as its own datagram, whether the reader
        // takes segmented sends whole (RecvBatch::for_socket) or not.
        let mut datagrams = numbered(11, 1400);
        datagrams.insert(3, vec![200; 60]);
        datagrams.insert(5, Vec::new());
        datagrams.insert(6, Vec::new());
        datagrams.push(vec![201; 1]);
        datagrams.extend(numbered(5, 900));
        for max in [1, 4, 16] {
            for whole in [false, true] {
                let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
                let mut batch = if whole {
                    RecvBatch::for_socket(&rx)
                } else {
                    RecvBatch::default()
                };
                let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
                send_batched(&tx, rx.local_addr().unwrap(), max, &datagrams);
                let seen = read_all(&rx, &mut batch, datagrams.len());
                assert_eq!(seen, datagrams, "max {max}, whole {whole}");
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn when_the_kernel_refuses_to_segment_the_batch_goes_one_by_one() {
        // Segmented sends are built for IPv4 only, so an IPv6 destination
        // is refused the way a kernel or interface without UDP_SEGMENT
        // refuses: the datagrams must still all arrive, and later batches
        // go one by one without asking again.
        let Ok(rx) = UdpSocket::bind("[::1]:0") else {
            panic!("this test needs IPv6 loopback (::1)");
        };
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        let to = rx.local_addr().unwrap();
        let datagrams = numbered(9, 700);
        let out = send_batched(&tx, to, 4, &datagrams);
        assert!(!out.segmentation, "refused once, not asked again");
        let seen = read_all(&rx, &mut RecvBatch::default(), datagrams.len());
        assert_eq!(seen, datagrams);
    }

    #[test]
    fn a_batch_refuses_another_size_and_more_than_its_max() {
        let mut out = SendBatch::new(3);
        assert!(!out.is_full());
        assert!(out.push(&[1; 10]));
        assert!(!out.push(&[2; 11]));
        assert!(out.push(&[3; 10]));
        assert!(out.push(&[4; 10]));
        assert!(out.is_full());
        assert!(!out.push(&[5; 10]));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_segmented_read_is_cut_at_the_segment_size_with_a_short_last_one() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = RecvBatch::for_socket(&rx);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf: Vec<u8> = numbered(3, 1000).concat();
        buf.extend_from_slice(&[3; 400]);
        linux::send_segmented(&tx, rx.local_addr().unwrap(), &buf, 1000).unwrap();
        let seen = read_all(&rx, &mut batch, 4);
        // One read took all four: they share the first slot.
        assert!(batch.got.iter().all(|&(start, _, _)| start < SLOT));
        let mut want = numbered(3, 1000);
        want.push(vec![3; 400]);
        assert_eq!(seen, want);
    }

    #[test]
    fn an_empty_nonblocking_socket_says_would_block() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let err = RecvBatch::default().recv(&rx, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
