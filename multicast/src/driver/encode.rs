//! The sending side's encoder thread: read each block (from a file that
//! may still be arriving), hash it if its hash is not known, encode its
//! symbols, and keep a few encoders for the repair asked of them.

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc;

use sha2::{Digest as _, Sha256};

use super::SendError;
use crate::codec::{BlockEncoder, Layout, Plan, sha256};
use crate::fileio;
use crate::sender::{EncodeJob, EncodedBatch};
use crate::wire::Digest;

/// Memory the encoder's kept encoders may take: each holds a block's
/// source and intermediate symbols, about twice the block.
const ENCODER_CACHE_BYTES: u64 = 64 << 20;

/// Encoders the encoder keeps: one for every block in flight, as memory
/// allows (six at the default 4 MiB blocks), and never fewer than two.
pub(super) fn encoders_kept(in_flight: u32, block_size: u32) -> usize {
    let fit = ENCODER_CACHE_BYTES / (2 * u64::from(block_size)).max(1);
    (in_flight as usize).min(fit as usize).max(2)
}

/// The file an encoder reads, and what its blocks must hash to. Hashes it
/// was not given it learns from its first read of each block, and the
/// whole file's hash from the blocks in order.
pub(super) struct Source {
    file: File,
    path: PathBuf,
    layout: Layout,
    hashes: Vec<Option<Digest>>,
    /// The whole file's hash so far and the next block it needs, when the
    /// sender was not given it.
    whole: Option<(Sha256, u32)>,
    /// Found out, not yet passed on.
    learned: Vec<(u32, Digest)>,
    file_sha256: Option<Digest>,
}

impl Source {
    pub(super) fn new(
        file: File,
        path: PathBuf,
        layout: Layout,
        hashes: Vec<Option<Digest>>,
        hash_file: bool,
    ) -> Self {
        Self {
            file,
            path,
            layout,
            hashes,
            whole: hash_file.then(|| (Sha256::new(), 0)),
            learned: Vec::new(),
            file_sha256: None,
        }
    }

    /// Reads block `block`, zero-padded to the block size, and checks its
    /// hash (or learns it). The whole-file hash takes the blocks in order;
    /// the first pass reads them in order, so blocks it skipped are read
    /// here only if that ever changes.
    fn read(&mut self, block: u32) -> Result<Vec<u8>, SendError> {
        while let Some((_, next)) = self.whole
            && next < block
        {
            let skipped = self.read_checked(next)?;
            self.hash_in_order(next, &skipped);
        }
        let padded = self.read_checked(block)?;
        self.hash_in_order(block, &padded);
        Ok(padded)
    }

    fn read_checked(&mut self, block: u32) -> Result<Vec<u8>, SendError> {
        let layout = self.layout;
        let mut padded = vec![0u8; layout.block_size() as usize];
        let len = layout.block_len(block);
        fileio::read_exact_at(&self.file, &mut padded[..len], layout.offset(block)).map_err(
            |source| SendError::Read {
                path: self.path.clone(),
                source,
            },
        )?;
        let digest = sha256(&padded[..len]);
        match self.hashes[block as usize] {
            Some(known) if known != digest => {
                return Err(SendError::FileChanged {
                    path: self.path.clone(),
                    block,
                });
            }
            Some(_) => {}
            None => {
                self.hashes[block as usize] = Some(digest);
                self.learned.push((block, digest));
            }
        }
        Ok(padded)
    }

    fn hash_in_order(&mut self, block: u32, padded: &[u8]) {
        let Some((whole, next)) = self.whole.as_mut() else {
            return;
        };
        if block != *next {
            return;
        }
        whole.update(&padded[..self.layout.block_len(block)]);
        *next += 1;
        if *next == self.layout.block_count() {
            let (whole, _) = self.whole.take().expect("matched above");
            self.file_sha256 = Some(whole.finalize().into());
        }
    }

    /// A batch for `job`, with what was learned since the last one.
    fn batch(
        &mut self,
        job: &EncodeJob,
        source: Option<Vec<u8>>,
        repair: Vec<u8>,
        more: bool,
    ) -> EncodedBatch {
        EncodedBatch {
            block: job.block,
            source,
            repair_first_esi: job.repair_first_esi,
            repair,
            more,
            hashes: std::mem::take(&mut self.learned),
            file_sha256: self.file_sha256.take(),
        }
    }
}

/// Encodes blocks for the sender. Keeps the encoders of the `keep` blocks
/// used last: feedback asks for repair of blocks in flight, and each
/// encoder made again costs a read, a hash and a solve of its block.
pub(super) fn encode_worker(
    mut src: Source,
    keep: usize,
    jobs: mpsc::Receiver<EncodeJob>,
    out: mpsc::Sender<Result<EncodedBatch, SendError>>,
) {
    crate::background::yield_to_packet_loop();
    let plan = Plan::new(src.layout);
    let keep = keep.max(1);
    // Least recently used first.
    let mut cache: Vec<(u32, BlockEncoder)> = Vec::with_capacity(keep);
    for job in jobs {
        let result = (|| {
            let mut source = if job.with_source {
                Some(src.read(job.block)?)
            } else {
                None
            };
            let mut repair = Vec::new();
            if job.repair_count > 0 {
                match cache.iter().position(|(b, _)| *b == job.block) {
                    Some(i) => {
                        let hit = cache.remove(i);
                        cache.push(hit);
                    }
                    None => {
                        let padded = match source.take() {
                            Some(p) => {
                                // The source symbols go to the link now,
                                // while the repair symbols are encoded: at
                                // the start of a pass that is 30-50 ms the
                                // link would otherwise stand idle. (Should
                                // the sender be gone, the last batch's send
                                // below finds it out.)
                                let copy = p.clone();
                                let _ = out.send(Ok(src.batch(&job, Some(p), Vec::new(), true)));
                                copy
                            }
                            None => src.read(job.block)?,
                        };
                        if cache.len() == keep {
                            cache.remove(0);
                        }
                        cache.push((job.block, plan.encoder(&padded)));
                    }
                }
                let (_, encoder) = cache.last().expect("pushed above");
                repair = encoder.repair(job.repair_first_esi, job.repair_count);
            }
            Ok(src.batch(&job, source, repair, false))
        })();
        let stop = result.is_err();
        if out.send(result).is_err() || stop {
            return;
        }
    }
}
