//! The asking side for one block: build the request, check every symbol
//! before it reaches the collector, decode once enough are in, and accept
//! the block only when its SHA-256 matches.

use multicast::codec::{Collector, Layout, sha256};
use multicast::wire::{Digest, MAX_ESI};

use crate::frame::{Frame, SYMBOLS_PER_FRAME};

/// How a serving peer broke the protocol: the requester drops it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Misbehavior {
    #[error("symbols of block {got}, asked for {asked}")]
    WrongBlock { got: u32, asked: u32 },
    #[error("a payload of {len} bytes for T = {t}")]
    BadPayload { len: usize, t: usize },
    #[error("ESIs beyond 24 bits")]
    EsiOverflow,
    #[error("{0} where a block is due")]
    Unexpected(&'static str),
    #[error("{0} with nothing asked")]
    NothingAsked(&'static str),
    #[error("an answer for block {got} while block {due} is due")]
    OutOfOrder { got: u32, due: u32 },
    #[error("symbols taken for a refusal")]
    SymbolsForRefusal,
    #[error("ended block {block} {times} times before it decoded")]
    TooManyReasks { block: u32, times: u32 },
}

/// What the caller does next.
#[derive(Debug)]
pub enum FetchStep {
    /// Keep reading frames.
    More,
    /// Enough symbols: call [`BlockFetch::decode`] (on a worker if it is slow).
    Decode,
    /// The peer does not hold the block: ask another.
    Elsewhere,
    /// The peer is at its upload limit: ask again later, or another.
    Busy,
    /// The peer sent something malformed for this block: drop the peer.
    Misbehaved(Misbehavior),
}

/// Why a fetched block was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The symbols do not decode yet: keep reading (the peer sends extra).
    NeedMore,
    /// They decoded to the wrong bytes: the peer sent bad symbols.
    Corrupt,
}

/// Fetching one block from one peer.
pub struct BlockFetch {
    layout: Layout,
    block: u32,
    expected: Digest,
    collector: Option<Box<Collector>>,
    /// Payload bytes received, for the status's bytes-by-source.
    pub bytes: u64,
    extra_wanted: u32,
}

impl BlockFetch {
    /// `collector`: symbols already held (from the multicast), if any.
    pub fn new(
        layout: Layout,
        block: u32,
        expected: Digest,
        collector: Option<Box<Collector>>,
    ) -> Self {
        let collector = collector.unwrap_or_else(|| Box::new(Collector::for_block(&layout, block)));
        Self {
            layout,
            block,
            expected,
            collector: Some(collector),
            bytes: 0,
            extra_wanted: 0,
        }
    }

    pub fn block(&self) -> u32 {
        self.block
    }

    /// Symbols held that came from a sender (not the zero padding).
    fn held_from_senders(&self) -> u32 {
        let c = self.collector.as_ref().expect("present until decoded");
        let padding = self.layout.k() - self.layout.data_symbols(self.block);
        c.held().saturating_sub(padding)
    }

    fn wanted(&self) -> u32 {
        self.layout.k() + self.layout.decode_margin() + self.extra_wanted
    }

    /// The request for this block.
    pub fn request(&self, content: Digest) -> Frame {
        let c = self.collector.as_ref().expect("present until decoded");
        Frame::Need {
            content,
            block: self.block,
            held: self.held_from_senders(),
            need: self.wanted().saturating_sub(c.held()),
            highest_esi: c.highest_esi(),
        }
    }

    /// Takes one frame from the peer.
    pub fn handle(&mut self, frame: Frame) -> FetchStep {
        match frame {
            Frame::Symbols {
                block,
                first_esi,
                payload,
            } => {
                if block != self.block {
                    return FetchStep::Misbehaved(Misbehavior::WrongBlock {
                        got: block,
                        asked: self.block,
                    });
                }
                let t = usize::from(self.layout.symbol_size());
                let n = payload.len() / t;
                if payload.len() % t != 0 || n == 0 || n as u32 > SYMBOLS_PER_FRAME {
                    return FetchStep::Misbehaved(Misbehavior::BadPayload {
                        len: payload.len(),
                        t,
                    });
                }
                if first_esi
                    .checked_add(n as u32 - 1)
                    .is_none_or(|last| last > MAX_ESI)
                {
                    return FetchStep::Misbehaved(Misbehavior::EsiOverflow);
                }
                self.bytes += payload.len() as u64;
                let Some(c) = self.collector.as_mut() else {
                    // Decoded already: what still arrives is not needed.
                    return FetchStep::More;
                };
                for (i, sym) in payload.chunks_exact(t).enumerate() {
                    // A duplicate (a symbol already held) is harmless.
                    let _ = c.insert(first_esi + i as u32, sym);
                }
                let ready = c.has_all_source() || c.held() >= self.wanted();
                if ready {
                    FetchStep::Decode
                } else {
                    FetchStep::More
                }
            }
            Frame::NotHeld { .. } => FetchStep::Elsewhere,
            // The end of the peer's answer: the pipeline decides what next.
            Frame::End { .. } => FetchStep::More,
            Frame::Busy => FetchStep::Busy,
            f @ (Frame::Need { .. }
            | Frame::Stop { .. }
            | Frame::Join { .. }
            | Frame::Members { .. }) => FetchStep::Misbehaved(Misbehavior::Unexpected(f.name())),
        }
    }

    /// Decodes and checks the block: its bytes (without padding) when they
    /// match the expected SHA-256.
    pub fn decode(&mut self) -> Result<Vec<u8>, Rejected> {
        let Some(c) = self.collector.take() else {
            // Called again after the block was accepted: nothing to decode.
            return Err(Rejected::NeedMore);
        };
        match c.decode(&self.layout) {
            Ok(padded) => {
                let len = self.layout.block_len(self.block);
                if sha256(&padded[..len]) == self.expected {
                    let mut data = padded;
                    data.truncate(len);
                    Ok(data)
                } else {
                    self.collector = Some(Box::new(Collector::for_block(&self.layout, self.block)));
                    Err(Rejected::Corrupt)
                }
            }
            Err(back) => {
                self.collector = Some(back);
                self.extra_wanted += 2;
                Err(Rejected::NeedMore)
            }
        }
    }
}
