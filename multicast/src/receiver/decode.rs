//! Decode jobs: a block's symbols, decoded and checked against its hash
//! off the receiving thread, and what the driver reports back.

use crate::codec::{Collector, Layout, sha256};
use crate::wire::Digest;

/// Decode and check one block. Runs anywhere; pure CPU.
#[derive(Debug)]
pub struct DecodeJob {
    pub block: u32,
    pub(super) layout: Layout,
    pub(super) expected: Digest,
    pub(super) collector: Box<Collector>,
}

/// The outcome of a [`DecodeJob`].
#[derive(Debug)]
pub enum DecodeOutcome {
    /// The block decoded and matched its hash: write `data[..len]` at `offset`.
    Verified {
        block: u32,
        offset: u64,
        len: usize,
        data: Vec<u8>,
    },
    /// The symbols did not determine the block yet.
    NeedMore {
        block: u32,
        collector: Box<Collector>,
    },
    /// It decoded, but not to the announced hash: a corrupt symbol got in.
    Corrupt { block: u32 },
}

impl DecodeJob {
    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn run(self) -> DecodeOutcome {
        let block = self.block;
        match self.collector.decode(&self.layout) {
            Err(collector) => DecodeOutcome::NeedMore { block, collector },
            Ok(data) => {
                let len = self.layout.block_len(block);
                if sha256(&data[..len]) == self.expected {
                    DecodeOutcome::Verified {
                        block,
                        offset: self.layout.offset(block),
                        len,
                        data,
                    }
                } else {
                    DecodeOutcome::Corrupt { block }
                }
            }
        }
    }
}

/// What the driver tells the receiver about a job it ran.
#[derive(Debug)]
pub enum BlockResult {
    Written {
        block: u32,
    },
    NeedMore {
        block: u32,
        collector: Box<Collector>,
    },
    Corrupt {
        block: u32,
    },
}
