//! The peer table: the agents heard, each once by node id, with how many
//! each source address holds (kept as peers come and go, so admission
//! costs no walk over the table).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use multicast::wire::Announce;

/// One agent this agent has heard.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Where its datagrams come from; probes go there.
    pub addr: SocketAddr,
    pub announce: Announce,
    pub first_seen: Instant,
    pub last_heard: Instant,
    pub(super) next_probe: Option<Instant>,
}

impl Peer {
    pub fn node(&self) -> u64 {
        self.announce.node
    }

    /// Heard more than once: not a one-off (perhaps forged) announcement.
    pub fn confirmed(&self) -> bool {
        self.last_heard > self.first_seen
    }

    pub(super) fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.announce.interval_ms))
    }

    /// Silent this long: probe it. Two intervals of up to 1.1 each (the
    /// jitter) can pass with only one announcement lost; beyond 2.25 two
    /// were.
    pub(super) fn suspect_after(&self) -> Duration {
        self.interval() * 2 + self.interval() / 4
    }

    /// Silent this long: gone (three missed intervals plus the jitter).
    pub(super) fn expire_after(&self) -> Duration {
        self.interval() * 3 + self.interval() / 4
    }
}

/// Peers by node id.
#[derive(Default)]
pub(super) struct PeerTable {
    peers: HashMap<u64, Peer>,
    /// Peers per source address.
    sources: HashMap<IpAddr, u32>,
}

impl PeerTable {
    pub(super) fn get(&self, node: &u64) -> Option<&Peer> {
        self.peers.get(node)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    pub(super) fn len(&self) -> usize {
        self.peers.len()
    }

    /// Peers whose datagrams come from `ip`.
    pub(super) fn held_by_source(&self, ip: IpAddr) -> u32 {
        self.sources.get(&ip).copied().unwrap_or(0)
    }

    /// Adds or replaces `node`'s entry.
    pub(super) fn insert(&mut self, node: u64, peer: Peer) {
        *self.sources.entry(peer.addr.ip()).or_default() += 1;
        if let Some(old) = self.peers.insert(node, peer) {
            self.forget_source(old.addr.ip());
        }
    }

    pub(super) fn remove(&mut self, node: &u64) -> Option<Peer> {
        let p = self.peers.remove(node)?;
        self.forget_source(p.addr.ip());
        Some(p)
    }

    /// Keeps the peers `keep` says to.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&u64, &Peer) -> bool) {
        let gone: Vec<u64> = self
            .peers
            .iter()
            .filter(|(n, p)| !keep(n, p))
            .map(|(n, _)| *n)
            .collect();
        for n in gone {
            self.remove(&n);
        }
    }

    /// `node` heard again, from `from` at `now`; `update` takes the rest.
    pub(super) fn refresh(
        &mut self,
        node: u64,
        from: SocketAddr,
        now: Instant,
        update: impl FnOnce(&mut Peer),
    ) {
        let Some(p) = self.peers.get_mut(&node) else {
            return;
        };
        let moved = (p.addr.ip() != from.ip()).then_some(p.addr.ip());
        p.addr = from;
        p.last_heard = now;
        p.next_probe = None;
        update(p);
        if let Some(old) = moved {
            *self.sources.entry(from.ip()).or_default() += 1;
            self.forget_source(old);
        }
    }

    /// Each peer, to set its probe timer (its address stays).
    pub(super) fn for_each_probe(&mut self, mut f: impl FnMut(&u64, &Peer, &mut Option<Instant>)) {
        for (n, p) in self.peers.iter_mut() {
            let mut next = p.next_probe;
            f(n, p, &mut next);
            p.next_probe = next;
        }
    }

    fn forget_source(&mut self, ip: IpAddr) {
        if let Some(c) = self.sources.get_mut(&ip) {
            *c -= 1;
            if *c == 0 {
                self.sources.remove(&ip);
            }
        }
    }

    /// The peer a full table gives up for a newcomer: of those heard only once
    /// (never confirmed by a second announcement), the least recently heard;
    /// else one overdue (silent past its own interval and a half); else none,
    /// and the newcomer waits. So a burst of forged one-off announcements
    /// cannot keep a live agent out, and live peers are never pushed out.
    pub(super) fn admission_victim(&self, now: Instant) -> Option<u64> {
        let unconfirmed = self
            .peers
            .iter()
            .filter(|(_, p)| !p.confirmed())
            .min_by_key(|(_, p)| p.last_heard);
        if let Some((&node, _)) = unconfirmed {
            return Some(node);
        }
        self.peers
            .iter()
            .filter(|(_, p)| {
                let interval = Duration::from_millis(u64::from(p.announce.interval_ms));
                now.saturating_duration_since(p.last_heard) > interval + interval / 2
            })
            .min_by_key(|(_, p)| p.last_heard)
            .map(|(&node, _)| node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: [u8; 4], now: Instant) -> Peer {
        Peer {
            addr: SocketAddr::from((ip, 7479)),
            announce: Announce {
                node: 0,
                incarnation: 0,
                seq: 0,
                interval_ms: 5000,
                version: String::new(),
                addrs: Vec::new(),
                api_port: 0,
                repair_port: 0,
                rank: Default::default(),
                held: Vec::new(),
                reply_to: None,
            },
            first_seen: now,
            last_heard: now,
            next_probe: None,
        }
    }

    #[test]
    fn source_counts_follow_inserts_moves_and_removals() {
        let now = Instant::now();
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        let ip = |x: [u8; 4]| IpAddr::from(x);
        let mut t = PeerTable::default();
        t.insert(1, peer(a, now));
        t.insert(2, peer(a, now));
        t.insert(3, peer(b, now));
        assert_eq!((t.held_by_source(ip(a)), t.held_by_source(ip(b))), (2, 1));
        // Replaced under the same id from the other address.
        t.insert(2, peer(b, now));
        assert_eq!((t.held_by_source(ip(a)), t.held_by_source(ip(b))), (1, 2));
        // Heard again from a new address.
        t.refresh(1, SocketAddr::from((b, 9)), now, |_| {});
        assert_eq!((t.held_by_source(ip(a)), t.held_by_source(ip(b))), (0, 3));
        t.remove(&3);
        t.retain(|n, _| *n != 2);
        assert_eq!((t.held_by_source(ip(b)), t.len()), (1, 1));
        t.remove(&1);
        assert!(t.sources.is_empty(), "no count left behind");
    }
}
