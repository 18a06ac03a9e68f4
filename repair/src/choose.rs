//! Which peer to ask for a block: among those that hold it, the one with
//! the fewest requests in flight (under a per-peer limit), then the one
//! that has served least; peers that failed or served a bad block are
//! dropped for the rest of the task.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

pub struct Chooser<P> {
    per_peer: u32,
    in_flight: HashMap<P, u32>,
    served: HashMap<P, u64>,
    dropped: HashSet<P>,
}

impl<P: Copy + Eq + Hash + Ord> Chooser<P> {
    /// `per_peer`: most requests one peer gets at once.
    pub fn new(per_peer: u32) -> Self {
        Self {
            per_peer: per_peer.max(1),
            in_flight: HashMap::new(),
            served: HashMap::new(),
            dropped: HashSet::new(),
        }
    }

    /// Picks a holder and counts the request as in flight; `None` when
    /// every holder is dropped or at its limit.
    pub fn pick(&mut self, holders: &[P]) -> Option<P> {
        let best = holders
            .iter()
            .filter(|p| !self.dropped.contains(p))
            .filter(|p| self.in_flight.get(p).copied().unwrap_or(0) < self.per_peer)
            .min_by_key(|p| {
                (
                    self.in_flight.get(p).copied().unwrap_or(0),
                    self.served.get(p).copied().unwrap_or(0),
                    **p,
                )
            })
            .copied()?;
        *self.in_flight.entry(best).or_default() += 1;
        Some(best)
    }

    /// Whether any holder is still usable (maybe later, when one frees up).
    pub fn any_usable(&self, holders: &[P]) -> bool {
        holders.iter().any(|p| !self.dropped.contains(p))
    }

    pub fn succeeded(&mut self, peer: P, bytes: u64) {
        self.release(peer);
        *self.served.entry(peer).or_default() += bytes;
    }

    /// The peer failed (timeout, refused, bad data): not asked again.
    pub fn failed(&mut self, peer: P) {
        self.release(peer);
        self.dropped.insert(peer);
    }

    /// The peer did not hold it or was busy: free the slot, keep the peer.
    pub fn declined(&mut self, peer: P) {
        self.release(peer);
    }

    /// Peers dropped so far.
    pub fn failures(&self) -> usize {
        self.dropped.len()
    }

    pub fn is_dropped(&self, peer: &P) -> bool {
        self.dropped.contains(peer)
    }

    fn release(&mut self, peer: P) {
        if let Some(n) = self.in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Chooser;

    #[test]
    fn load_is_spread_and_limited_and_failed_peers_are_dropped() {
        let mut c = Chooser::new(2);
        let holders = [1u32, 2, 3];
        let picks: Vec<u32> = (0..6).filter_map(|_| c.pick(&holders)).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        assert_eq!(c.pick(&holders), None, "every peer at its limit");
        c.succeeded(1, 100);
        c.failed(2);
        c.declined(3);
        // Peer 3 has a free slot and served nothing: it goes first.
        assert_eq!(c.pick(&holders), Some(3));
        assert_eq!(c.pick(&holders), Some(1));
        c.declined(3);
        c.declined(1);
        assert!(c.is_dropped(&2));
        assert!(c.any_usable(&[2, 3]));
        assert!(!c.any_usable(&[2]));
    }
}
