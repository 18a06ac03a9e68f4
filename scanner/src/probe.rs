//! `somcast scan --probe`: one probe to the control group (and by unicast
//! to the neighbour-cache hints), then every agent that answers within the
//! wait, with its round-trip time.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use multicast::wire::{self, Announce, Frame};

/// One agent that answered.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Where the answer came from.
    pub from: SocketAddr,
    pub rtt: Duration,
    pub announce: Announce,
}

/// What a probe found.
#[derive(Clone, Debug, Default)]
pub struct ProbeReport {
    /// One entry per node, the fastest answer, ordered by address.
    pub answers: Vec<Answer>,
    /// Datagrams that were not a well-formed answer to this probe.
    pub ignored: u64,
}

/// Sends a probe from an ephemeral port of `iface` to `group` and to each of
/// `unicast`, and collects answers for `wait`.
pub fn probe(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    unicast: &[SocketAddr],
    wait: Duration,
    nonce: u64,
) -> Result<ProbeReport, multicast::socket::SocketError> {
    // TTL 1: the probe asks this subnet only, as agents announce.
    let socket: UdpSocket = multicast::socket::open_sender(iface, 1)?;
    let probe = Frame::Probe {
        nonce,
        from_node: None,
        unicast_reply: true,
    }
    .encode(0);
    let sent = Instant::now();
    socket.send_to(&probe, group)?;
    for to in unicast {
        // A neighbour that is gone is no reason to stop.
        let _ = socket.send_to(&probe, to);
    }
    let mut best: HashMap<u64, Answer> = HashMap::new();
    let mut ignored = 0;
    let mut buf = vec![0u8; wire::MAX_DATAGRAM];
    let deadline = sent + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left))?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break;
            }
            // ICMP port unreachable from a unicast hint: not an agent.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e.into()),
        };
        let rtt = sent.elapsed();
        match wire::decode(&buf[..n]).map(|d| d.frame) {
            Ok(Frame::Presence(a)) if a.reply_to == Some(nonce) => {
                best.entry(a.node).or_insert(Answer {
                    from,
                    rtt,
                    announce: a,
                });
            }
            _ => ignored += 1,
        }
    }
    let mut answers: Vec<Answer> = best.into_values().collect();
    answers.sort_by_key(|a| (a.from.ip(), a.from.port(), a.announce.node));
    Ok(ProbeReport { answers, ignored })
}
