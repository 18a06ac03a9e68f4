//! The blocks a serving peer has hash-checked in the files it serves.
//!
//! A peer checks a block against the manifest's hash before it serves it,
//! so that a block gone bad on its disk is declined rather than sent. Every
//! block it holds passed that hash once already (when it was written, and
//! again when the whole file was verified), so checking it on every serve
//! buys little: a rendezvous point serving a package to many subnets would
//! hash each block once per requester, on the CPU that also drives the
//! uploads. This table remembers which blocks were checked in which
//! version of a file (its length, modification time and inode: a file
//! rewritten or replaced is another version), for [`RECHECK_AFTER`] at
//! most. The requester checks every block it receives whatever the peer
//! did, so a block that goes bad within that time is caught there, and
//! repaired from another source.
//!
//! Bounded: [`MAX_FILES`] files, each a bit per block up to
//! [`multicast::codec::MAX_BLOCKS`].

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long a file's checks stand; its blocks are hashed again after.
pub const RECHECK_AFTER: Duration = Duration::from_secs(600);

/// Files remembered at once; the oldest is forgotten for a new one.
pub const MAX_FILES: usize = 16;

/// Checked blocks by file `K` in version `V`.
#[derive(Debug)]
pub struct CheckedBlocks<K, V> {
    files: HashMap<K, Entry<V>>,
}

#[derive(Debug)]
struct Entry<V> {
    version: V,
    since: Instant,
    /// A bit per block.
    bits: Vec<u64>,
}

impl<K, V> Default for CheckedBlocks<K, V> {
    fn default() -> Self {
        CheckedBlocks {
            files: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Eq + Copy> CheckedBlocks<K, V> {
    /// Whether `block` of `file`, as it is in `version`, was checked within
    /// [`RECHECK_AFTER`] of `now`.
    pub fn is_checked(&self, file: &K, version: V, block: u32, now: Instant) -> bool {
        self.files.get(file).is_some_and(|e| {
            e.current(version, now)
                && e.bits
                    .get(block as usize / 64)
                    .is_some_and(|w| w & (1 << (block % 64)) != 0)
        })
    }

    /// Records that `block` of `file` in `version` matched its hash.
    pub fn note(&mut self, file: &K, version: V, block: u32, now: Instant) {
        if block >= multicast::codec::MAX_BLOCKS {
            return;
        }
        let e = self.entry(file, version, now);
        let word = block as usize / 64;
        if e.bits.len() <= word {
            e.bits.resize(word + 1, 0);
        }
        e.bits[word] |= 1 << (block % 64);
    }

    /// Records that blocks `0..count` of `file` in `version` matched their
    /// hashes (the whole file was verified).
    pub fn note_all(&mut self, file: &K, version: V, count: u32, now: Instant) {
        let count = count.min(multicast::codec::MAX_BLOCKS) as usize;
        let e = self.entry(file, version, now);
        e.bits = vec![u64::MAX; count / 64];
        if !count.is_multiple_of(64) {
            e.bits.push((1 << (count % 64)) - 1);
        }
    }

    /// Files remembered.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// `file`'s entry for `version`: a fresh one when it has none, or one
    /// for another version or too old; room is made by forgetting the
    /// oldest file.
    fn entry(&mut self, file: &K, version: V, now: Instant) -> &mut Entry<V> {
        let fresh = self
            .files
            .get(file)
            .is_none_or(|e| !e.current(version, now));
        if fresh {
            self.files.remove(file);
            if self.files.len() >= MAX_FILES
                && let Some(oldest) = self
                    .files
                    .iter()
                    .min_by_key(|(_, e)| e.since)
                    .map(|(k, _)| k.clone())
            {
                self.files.remove(&oldest);
            }
            self.files.insert(
                file.clone(),
                Entry {
                    version,
                    since: now,
                    bits: Vec::new(),
                },
            );
        }
        self.files.get_mut(file).expect("inserted above")
    }
}

impl<V: Eq> Entry<V> {
    fn current(&self, version: V, now: Instant) -> bool {
        self.version == version && now.saturating_duration_since(self.since) < RECHECK_AFTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checked_block_stands_for_its_file_version_and_a_while() {
        let t0 = Instant::now();
        let mut c: CheckedBlocks<&str, u32> = CheckedBlocks::default();
        assert!(!c.is_checked(&"a", 1, 5, t0));
        c.note(&"a", 1, 5, t0);
        assert!(c.is_checked(&"a", 1, 5, t0));
        assert!(!c.is_checked(&"a", 1, 4, t0), "only the block checked");
        assert!(!c.is_checked(&"a", 1, 69, t0), "beyond the bits noted");
        assert!(!c.is_checked(&"b", 1, 5, t0), "only the file checked");
        assert!(
            !c.is_checked(&"a", 2, 5, t0),
            "a rewritten file is checked anew"
        );
        let later = t0 + RECHECK_AFTER;
        assert!(c.is_checked(&"a", 1, 5, later - Duration::from_secs(1)));
        assert!(
            !c.is_checked(&"a", 1, 5, later),
            "checked again after a while"
        );
    }

    #[test]
    fn another_version_or_an_old_entry_starts_afresh() {
        let t0 = Instant::now();
        let mut c: CheckedBlocks<&str, u32> = CheckedBlocks::default();
        c.note(&"a", 1, 5, t0);
        c.note(&"a", 2, 6, t0);
        assert!(
            !c.is_checked(&"a", 2, 5, t0),
            "the old version's blocks are gone"
        );
        assert!(c.is_checked(&"a", 2, 6, t0));
        let later = t0 + RECHECK_AFTER;
        c.note(&"a", 2, 7, later);
        assert!(
            !c.is_checked(&"a", 2, 6, later),
            "an old entry's blocks are gone"
        );
        assert!(c.is_checked(&"a", 2, 7, later));
    }

    #[test]
    fn a_verified_file_has_every_block_and_no_more() {
        let t0 = Instant::now();
        let mut c: CheckedBlocks<&str, u32> = CheckedBlocks::default();
        for count in [0u32, 1, 63, 64, 65, 130] {
            c.note_all(&"f", count, count, t0);
            for b in 0..count {
                assert!(c.is_checked(&"f", count, b, t0), "block {b} of {count}");
            }
            assert!(
                !c.is_checked(&"f", count, count, t0),
                "block {count} of {count}"
            );
        }
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_oldest_file() {
        let t0 = Instant::now();
        let mut c: CheckedBlocks<u32, u32> = CheckedBlocks::default();
        for f in 0..(MAX_FILES as u32 + 3) {
            c.note(&f, 0, 0, t0 + Duration::from_millis(u64::from(f)));
            assert!(c.len() <= MAX_FILES);
        }
        assert_eq!(c.len(), MAX_FILES);
        assert!(!c.is_checked(&0, 0, 0, t0 + Duration::from_secs(1)));
        assert!(c.is_checked(&(MAX_FILES as u32 + 2), 0, 0, t0 + Duration::from_secs(1)));
        c.note(&0, 0, multicast::codec::MAX_BLOCKS, t0);
        assert!(
            !c.is_checked(&0, 0, multicast::codec::MAX_BLOCKS, t0),
            "a block no file has is not kept"
        );
    }
}
