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
    /// It answered the probe sent to the group: multicast from this host
    /// reaches it. An agent that answered only the unicast probe (a
    /// neighbour-cache hint) sits where the group does not pass.
    pub by_multicast: bool,
}

/// What a probe found.
#[derive(Clone, Debug, Default)]
pub struct ProbeReport {
    /// One entry per node, the fastest answer, ordered by address.
    pub answers: Vec<Answer>,
    /// Datagrams that were not a well-formed answer to this probe.
    pub ignored: u64,
}

/// Probes sent per scan, spread over the first half of the wait: one lost
/// probe must not hide an agent (at 20% loss, three leave 0.8% unseen).
const ROUNDS: u64 = 3;

/// Set in the nonce of the probes sent by unicast, so an answer tells which
/// probe it answers: the group's or a unicast one.
const UNICAST_TAG: u64 = 1 << 62;

/// One scan's probes and the best answer of each agent.
struct Scan {
    nonce: u64,
    /// When each round went out.
    sent_at: Vec<Instant>,
    best: HashMap<u64, Answer>,
    ignored: u64,
}

impl Scan {
    /// Sends the next round: to the group, and to each of `unicast`. Each
    /// round has its own nonce, so an answer's round trip is measured from
    /// the probe it answers.
    fn send_round(
        &mut self,
        socket: &UdpSocket,
        link: &mut multicast::auth::Link,
        group: SocketAddrV4,
        unicast: &[SocketAddr],
    ) -> std::io::Result<()> {
        let round = self.sent_at.len() as u64;
        let probe = Frame::Probe {
            nonce: self.nonce.wrapping_add(round),
            from_node: None,
            unicast_reply: true,
        }
        .encode(0);
        let probe = link.outgoing(&probe).to_vec();
        let direct = Frame::Probe {
            nonce: self.nonce.wrapping_add(round) ^ UNICAST_TAG,
            from_node: None,
            unicast_reply: true,
        }
        .encode(0);
        let direct = link.outgoing(&direct).to_vec();
        self.sent_at.push(Instant::now());
        socket.send_to(&probe, group)?;
        for to in unicast {
            // A neighbour that is gone is no reason to stop.
            let _ = socket.send_to(&direct, to);
        }
        Ok(())
    }

    /// The time the answered probe went out, and whether it went to the
    /// group.
    fn round_of(&self, reply: Option<u64>) -> Option<(Instant, bool)> {
        let reply = reply?;
        [(reply, true), (reply ^ UNICAST_TAG, false)]
            .into_iter()
            .find_map(|(r, group)| {
                let at = self
                    .sent_at
                    .get(usize::try_from(r.wrapping_sub(self.nonce)).ok()?)?;
                Some((*at, group))
            })
    }

    /// Takes one datagram (opened by the fleet key, if any): an answer to
    /// one of this scan's probes is kept if it is the agent's fastest.
    fn take(&mut self, plain: &[u8], from: SocketAddr, now: Instant) {
        let a = match wire::decode(plain).map(|d| d.frame) {
            Ok(Frame::Presence(a)) => a,
            _ => {
                self.ignored += 1;
                return;
            }
        };
        let Some((sent, group)) = self.round_of(a.reply_to) else {
            self.ignored += 1;
            return;
        };
        let rtt = now - sent;
        let by_multicast = group || self.best.get(&a.node).is_some_and(|b| b.by_multicast);
        let keep = self.best.get(&a.node).is_none_or(|b| rtt < b.rtt);
        if keep {
            self.best.insert(
                a.node,
                Answer {
                    from,
                    rtt,
                    announce: a,
                    by_multicast,
                },
            );
        } else if let Some(b) = self.best.get_mut(&a.node) {
            b.by_multicast = by_multicast;
        }
    }
}

/// Sends a probe from an ephemeral port of `iface` to `group` and to each of
/// `unicast`, repeated [`ROUNDS`] times, and collects answers for `wait`.
/// With `fleet`, probes are sealed and only sealed answers count.
pub fn probe(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    unicast: &[SocketAddr],
    wait: Duration,
    nonce: u64,
    fleet: Option<&multicast::auth::FleetKeys>,
) -> Result<ProbeReport, multicast::socket::SocketError> {
    let mut link = multicast::auth::Link::new(fleet, Default::default());
    // TTL 1: the probe asks this subnet only, as agents announce.
    let socket: UdpSocket = multicast::socket::open_sender(iface, 1)?;
    let start = Instant::now();
    let deadline = start + wait;
    let mut scan = Scan {
        nonce,
        sent_at: Vec::new(),
        best: HashMap::new(),
        ignored: 0,
    };
    let mut buf = vec![0u8; wire::MAX_DATAGRAM];
    loop {
        let round = scan.sent_at.len() as u64;
        let next_send = start + wait.mul_f64(round as f64 / (2 * ROUNDS) as f64);
        if round < ROUNDS && Instant::now() >= next_send {
            scan.send_round(&socket, &mut link, group, unicast)?;
            continue;
        }
        let until = if round < ROUNDS {
            next_send.min(deadline)
        } else {
            deadline
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            if Instant::now() >= deadline {
                break;
            }
            continue;
        }
        socket.set_read_timeout(Some(left))?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue;
            }
            // ICMP port unreachable from a unicast hint: not an agent.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        match link.incoming(&buf[..n]) {
            Some(plain) => scan.take(plain, from, now),
            None => scan.ignored += 1,
        }
    }
    let Scan { best, ignored, .. } = scan;
    let mut answers: Vec<Answer> = best.into_values().collect();
    answers.sort_by_key(|a| (a.from.ip(), a.from.port(), a.announce.node));
    Ok(ProbeReport { answers, ignored })
}
