//! Which blocks of a download are written and verified: one map per
//! download, set only by the download that owns it ([`crate::cache::Partial`])
//! and read without a lock by whoever serves or announces its blocks (the
//! repair server, presence, the task's status).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A download's blocks: set once verified and written, never cleared.
#[derive(Debug)]
pub struct Blocks {
    bits: Vec<AtomicU64>,
    count: u32,
    done: AtomicU32,
}

impl Blocks {
    /// `count` blocks, none held.
    pub fn none(count: u32) -> Self {
        Self {
            bits: (0..count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            count,
            done: AtomicU32::new(0),
        }
    }

    /// `count` blocks, every one held (a cached object).
    pub fn all(count: u32) -> Self {
        let b = Self::none(count);
        for i in 0..count {
            b.set(i);
        }
        b
    }

    /// The blocks `held` says are held.
    pub fn from_held(held: &[bool]) -> Self {
        let b = Self::none(held.len() as u32);
        for (i, _) in held.iter().enumerate().filter(|(_, h)| **h) {
            b.set(i as u32);
        }
        b
    }

    /// Marks block `b` held; whether it was not before. Crate-private: only
    /// the download that wrote and verified the block sets it.
    pub(crate) fn set(&self, b: u32) -> bool {
        if b >= self.count {
            return false;
        }
        let word = &self.bits[b as usize / 64];
        let bit = 1u64 << (b % 64);
        let newly = word.fetch_or(bit, Ordering::AcqRel) & bit == 0;
        if newly {
            self.done.fetch_add(1, Ordering::AcqRel);
        }
        newly
    }

    pub fn has(&self, b: u32) -> bool {
        b < self.count && self.bits[b as usize / 64].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    /// How many blocks there are.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// How many are held.
    pub fn done(&self) -> u32 {
        self.done.load(Ordering::Acquire)
    }

    pub fn is_complete(&self) -> bool {
        self.done() == self.count
    }

    /// The blocks not held, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.count).filter(|&b| !self.has(b))
    }

    /// Leading blocks that are all held (what a pipelined sender may read).
    pub fn prefix(&self) -> u32 {
        (0..self.count)
            .find(|&b| !self.has(b))
            .unwrap_or(self.count)
    }

    /// One flag per block, as held now.
    pub fn to_held(&self) -> Vec<bool> {
        (0..self.count).map(|b| self.has(b)).collect()
    }

    /// The held blocks as ranges `[start, end)`, in order.
    pub fn ranges(&self) -> Vec<[u32; 2]> {
        let mut out: Vec<[u32; 2]> = Vec::new();
        for b in (0..self.count).filter(|&b| self.has(b)) {
            match out.last_mut() {
                Some(r) if r[1] == b => r[1] = b + 1,
                _ => out.push([b, b + 1]),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_set_once_and_read_as_ranges() {
        let b = Blocks::none(130);
        assert_eq!((b.count(), b.done(), b.prefix()), (130, 0, 0));
        for i in [0, 1, 2, 63, 64, 65, 129] {
            assert!(b.set(i));
        }
        assert!(!b.set(64), "a second set is not new");
        assert!(!b.set(130), "past the end: nothing");
        assert_eq!(b.done(), 7);
        assert_eq!(b.prefix(), 3);
        assert_eq!(b.ranges(), [[0, 3], [63, 66], [129, 130]]);
        assert_eq!(b.missing().count(), 123);
        assert!(!b.is_complete());
        let again = Blocks::from_held(&b.to_held());
        assert_eq!(again.ranges(), b.ranges());
        let all = Blocks::all(130);
        assert!(all.is_complete());
        assert_eq!(all.ranges(), [[0, 130]]);
        assert_eq!(Blocks::all(0).prefix(), 0);
        assert!(Blocks::none(0).is_complete());
    }
}
