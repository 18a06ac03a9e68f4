//! UDP socket setup for the group, with socket2. The only module that knows
//! about socket options.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use thiserror::Error;

/// Receive buffer asked for: a second of traffic at 32 Mbit/s, so decoding
/// pauses and scheduler hiccups do not overflow it.
pub const WANTED_RCVBUF: usize = 4 << 20;
/// Send buffer: room for a pacing burst and control frames.
pub const WANTED_SNDBUF: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("{0} is not an IPv4 multicast address (use 224.0.0.0/4, e.g. 239.192.0.1)")]
    NotMulticast(Ipv4Addr),
    #[error("cannot bind UDP port {port}: {source} (is another program using it?)")]
    Bind {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot join group {group} on interface {iface}: {source} (does the interface exist, is it up, and does it allow multicast?)"
    )]
    Join {
        group: Ipv4Addr,
        iface: Ipv4Addr,
        #[source]
        source: io::Error,
    },
    #[error("cannot send multicast on interface {iface}: {source}")]
    MulticastIf {
        iface: Ipv4Addr,
        #[source]
        source: io::Error,
    },
    #[error("socket setup failed: {0}")]
    Io(#[from] io::Error),
}

/// What the kernel granted, for the warning about `net.core.rmem_max`.
#[derive(Clone, Copy, Debug)]
pub struct BufferReport {
    pub wanted: usize,
    pub granted: usize,
}

impl BufferReport {
    /// Linux reports twice what it reserves for payload; compare with that
    /// in mind.
    pub fn capped(&self) -> bool {
        let effective = if cfg!(target_os = "linux") {
            self.granted / 2
        } else {
            self.granted
        };
        effective < self.wanted
    }
}

/// A socket joined to `group` on the interface with address `iface`.
pub fn open_receiver(
    group: SocketAddrV4,
    iface: Ipv4Addr,
) -> Result<(UdpSocket, BufferReport), SocketError> {
    if !group.ip().is_multicast() {
        return Err(SocketError::NotMulticast(*group.ip()));
    }
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    // Several receivers on one host (labs, tests) share the port.
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    socket.set_reuse_port(true)?;
    let _ = socket.set_recv_buffer_size(WANTED_RCVBUF);
    let report = BufferReport {
        wanted: WANTED_RCVBUF,
        granted: socket.recv_buffer_size()?,
    };
    // Binding the group address filters out other groups on the same port
    // on Unix; Windows only binds local addresses.
    let bind_ip = if cfg!(windows) {
        Ipv4Addr::UNSPECIFIED
    } else {
        *group.ip()
    };
    let bind = SocketAddrV4::new(bind_ip, group.port());
    socket
        .bind(&SockAddr::from(bind))
        .map_err(|source| SocketError::Bind {
            port: group.port(),
            source,
        })?;
    socket
        .join_multicast_v4(group.ip(), &iface)
        .map_err(|source| SocketError::Join {
            group: *group.ip(),
            iface,
            source,
        })?;
    // Feedback leaves from this socket too: keep it on the same interface.
    socket
        .set_multicast_if_v4(&iface)
        .map_err(|source| SocketError::MulticastIf { iface, source })?;
    Ok((socket.into(), report))
}

/// A socket that sends to groups through the interface with address
/// `iface`, bound to an ephemeral port of that interface that takes
/// feedback. Loopback stays on so receivers on the same host hear it.
pub fn open_sender(iface: Ipv4Addr, ttl: u32) -> Result<UdpSocket, SocketError> {
    open_unicast(iface, 0, ttl)
}

/// Like [`open_sender`], bound to `port` of `iface` (0: any free port).
pub fn open_unicast(iface: Ipv4Addr, port: u16, ttl: u32) -> Result<UdpSocket, SocketError> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_send_buffer_size(WANTED_SNDBUF);
    let _ = socket.set_recv_buffer_size(WANTED_RCVBUF / 4);
    socket
        .set_multicast_if_v4(&iface)
        .map_err(|source| SocketError::MulticastIf { iface, source })?;
    socket.set_multicast_loop_v4(true)?;
    socket.set_multicast_ttl_v4(ttl)?;
    let bind = SocketAddrV4::new(iface, port);
    socket
        .bind(&SockAddr::from(bind))
        .map_err(|source| SocketError::Bind { port, source })?;
    Ok(socket.into())
}

/// The local port a socket is bound to.
pub fn local_port(socket: &UdpSocket) -> io::Result<u16> {
    socket.local_addr().map(|a| a.port())
}

/// ENOBUFS: the interface queue is full for a moment (Linux and the BSDs
/// report it on UDP sends under a burst); waiting is the remedy.
pub fn is_no_buffer_space(e: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    const ENOBUFS: i32 = 105;
    #[cfg(any(target_os = "macos", target_os = "freebsd", target_os = "openbsd"))]
    const ENOBUFS: i32 = 55;
    #[cfg(any(
        target_os = "linux",
        target_os = "macos",
        target_os = "freebsd",
        target_os = "openbsd"
    ))]
    {
        e.raw_os_error() == Some(ENOBUFS)
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "macos",
        target_os = "freebsd",
        target_os = "openbsd"
    )))]
    {
        let _ = e;
        false
    }
}
