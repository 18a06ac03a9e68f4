//! The receiving side's decode thread: decode, check and write each
//! block, hash the whole file; and the lab's loss injection.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::mpsc;
use std::time::Instant;

use sha2::{Digest as _, Sha256};

use crate::codec::{self, Layout};
use crate::fileio;
use crate::receiver::{BlockResult, DecodeJob, DecodeOutcome, Receiver};
use crate::wire::Digest;

/// Work for the decode thread.
pub(super) enum Work {
    Decode(DecodeJob, File),
    /// Every block is written: finish the whole-file hash.
    Finish(File, Layout),
}

/// Compares the file's hash, once computed, with the one the sender
/// announced, as soon as both are known: a sender that hashes the file as
/// it sends it announces the hash only once it has read all of it.
pub(super) fn check_file_hash(
    receiver: &mut Receiver,
    digest: &mut Option<Digest>,
    verified_at: &mut Option<Instant>,
) {
    if let Some(got) = *digest
        && let Some(expected) = receiver.file_sha256()
    {
        *digest = None;
        let now = Instant::now();
        if got == expected {
            *verified_at = Some(now);
        }
        receiver.handle_file_verified(now, got == expected);
    }
}

/// What the decode thread sends back.
pub(super) enum WorkDone {
    Block(io::Result<BlockResult>),
    FileHash(io::Result<Digest>),
}

/// Hashes the whole file as blocks complete in order, from the decoded data
/// already in memory. A block that completes ahead of its turn is kept (up
/// to [`HASH_AHEAD_BYTES`]) until the blocks before it are hashed; beyond
/// that it is read back from the file when its turn comes. Saves re-reading
/// the whole file at the end, and most of the re-reading of blocks that
/// complete out of order (with four blocks interleaved, most do).
#[derive(Default)]
pub(super) struct FileHasher {
    hasher: Sha256,
    next: u32,
    written: Vec<bool>,
    ahead: BTreeMap<u32, Vec<u8>>,
    ahead_bytes: usize,
}

/// Decoded blocks kept for the whole-file hash: two default blocks (of the
/// four a pass interleaves), which keeps a 2 GiB receive under 128 MiB
/// resident (`scripts/bench-memory.sh`).
pub(super) const HASH_AHEAD_BYTES: usize = 8 << 20;

impl FileHasher {
    /// Block `block` (its first `len` bytes of `data` are the file's) is
    /// written.
    fn written(
        &mut self,
        layout: &Layout,
        file: &File,
        block: u32,
        mut data: Vec<u8>,
        len: usize,
    ) -> io::Result<()> {
        if self.written.is_empty() {
            self.written = vec![false; layout.block_count() as usize];
        }
        self.written[block as usize] = true;
        if block == self.next {
            self.hasher.update(&data[..len]);
            self.next += 1;
            codec::recycle(data);
        } else if self.ahead_bytes + len <= HASH_AHEAD_BYTES {
            data.truncate(len);
            self.ahead_bytes += len;
            self.ahead.insert(block, data);
        } else {
            codec::recycle(data);
        }
        self.catch_up(layout, file, false)
    }

    /// Hashes written blocks from `next` on, from memory or read back; with
    /// `all`, every remaining block.
    fn catch_up(&mut self, layout: &Layout, file: &File, all: bool) -> io::Result<()> {
        let mut buf = Vec::new();
        while self.next < layout.block_count()
            && (all || self.written.get(self.next as usize) == Some(&true))
        {
            if let Some(data) = self.ahead.remove(&self.next) {
                self.ahead_bytes -= data.len();
                self.hasher.update(&data);
                codec::recycle(data);
            } else {
                let len = layout.block_len(self.next);
                buf.resize(len, 0);
                fileio::read_exact_at(file, &mut buf, layout.offset(self.next))?;
                self.hasher.update(&buf);
            }
            self.next += 1;
        }
        Ok(())
    }
}

pub(super) fn decode_worker(
    jobs: mpsc::Receiver<Work>,
    out: mpsc::Sender<WorkDone>,
    hash_whole_file: bool,
) {
    crate::background::yield_to_packet_loop();
    let mut hasher = FileHasher::default();
    for work in jobs {
        let done = match work {
            Work::Decode(job, file) => {
                let layout = job.layout();
                WorkDone::Block(match job.run() {
                    DecodeOutcome::Verified {
                        block,
                        offset,
                        len,
                        data,
                    } => fileio::write_all_at(&file, &data[..len], offset)
                        .and_then(|()| {
                            fileio::start_writeback(&file, offset, len);
                            if hash_whole_file {
                                hasher.written(&layout, &file, block, data, len)
                            } else {
                                codec::recycle(data);
                                Ok(())
                            }
                        })
                        .map(|()| BlockResult::Written { block }),
                    DecodeOutcome::NeedMore { block, collector } => {
                        Ok(BlockResult::NeedMore { block, collector })
                    }
                    DecodeOutcome::Corrupt { block } => Ok(BlockResult::Corrupt { block }),
                })
            }
            Work::Finish(file, layout) => {
                let mut h = std::mem::take(&mut hasher);
                WorkDone::FileHash(
                    h.catch_up(&layout, &file, true)
                        .map(|()| h.hasher.finalize().into()),
                )
            }
        };
        if out.send(done).is_err() {
            return;
        }
    }
}

/// Seeded loss injection (SplitMix64): reproducible lab runs without root.
pub(super) struct Dropper {
    threshold: u64,
    state: crate::rng::SplitMix64,
    pub(super) dropped: u64,
}

impl Dropper {
    pub(super) fn new(rate: f64, seed: u64) -> Self {
        Self {
            threshold: (rate.clamp(0.0, 1.0) * u64::MAX as f64) as u64,
            state: crate::rng::SplitMix64(seed),
            dropped: 0,
        }
    }

    pub(super) fn drop(&mut self) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let drop = self.state.next_u64() < self.threshold;
        self.dropped += u64::from(drop);
        drop
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::sha256;

    #[test]
    fn the_whole_file_hash_is_right_whatever_order_blocks_complete_in() {
        // Three blocks of 5/8 the cap complete last to first: block 2 waits
        // in memory, block 1 would pass the cap and is read back.
        let block_size = (HASH_AHEAD_BYTES * 5 / 8) as u32;
        let size = 3 * block_size;
        let layout = Layout::for_file(u64::from(size), block_size, 1024).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i ^ (i >> 11)) as u8).collect();
        let path = std::env::temp_dir().join(format!("somcast-hasher-{}", std::process::id()));
        let file = super::super::receive::create_partial(&path, layout.file_size()).unwrap();
        let mut hasher = FileHasher::default();
        for block in [2u32, 1, 0] {
            let (at, len) = (layout.offset(block) as usize, layout.block_len(block));
            let bytes = data[at..at + len].to_vec();
            fileio::write_all_at(&file, &bytes, at as u64).unwrap();
            hasher.written(&layout, &file, block, bytes, len).unwrap();
            if block == 1 {
                assert_eq!(hasher.ahead.len(), 1, "only block 2 is kept in memory");
            }
        }
        assert_eq!(hasher.next, 3);
        assert!(hasher.ahead.is_empty());
        let digest: Digest = hasher.hasher.finalize().into();
        assert_eq!(digest, sha256(&data));
        let _ = std::fs::remove_file(&path);
    }
}
