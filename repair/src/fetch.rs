//! The asking side for one block: build the request, check every symbol
//! before it reaches the collector, decode once enough are in, and accept
//! the block only when its SHA-256 matches.
//!
//! A requester that held nothing of the block gets its source symbols in
//! order, and those are the block's bytes: they are hashed as they arrive,
//! so the block is checked the moment its last symbol is in rather than
//! after it (the hash left on the transfer's critical path). Only symbols
//! the collector kept count, so the bytes hashed are the bytes decoded;
//! anything else (a gap, a symbol held already) hashes the decoded block
//! whole, as before.

use multicast::codec::{Collector, Layout, sha256};
use multicast::wire::{Digest, MAX_ESI};
use sha2::{Digest as _, Sha256};

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
    /// The hash of the block's bytes as far as its source symbols came in
    /// order, each kept by the collector, and how many did; `None` once
    /// one did not.
    in_order: Option<(Sha256, u32)>,
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
            in_order: Some((Sha256::new(), 0)),
        }
    }

    /// Follows the in-order hash with source symbol `esi` (`kept`: the
    /// collector took these bytes for it).
    fn hash_in_order(&mut self, esi: u32, payload: &[u8], kept: bool) {
        let data_symbols = self.layout.data_symbols(self.block);
        if esi >= data_symbols {
            return; // padding or a repair symbol: not the block's bytes
        }
        let Some((hash, next)) = &mut self.in_order else {
            return;
        };
        if !kept || esi != *next {
            self.in_order = None;
            return;
        }
        let t = payload.len();
        let upto = (self.layout.block_len(self.block) - esi as usize * t).min(t);
        hash.update(&payload[..upto]);
        *next += 1;
    }

    /// Whether the in-order hash covers the whole block, and then whether
    /// it matched.
    fn in_order_verdict(&mut self) -> Option<bool> {
        let data_symbols = self.layout.data_symbols(self.block);
        match self.in_order.take() {
            Some((hash, n)) if n == data_symbols => {
                let got: Digest = hash.finalize().into();
                Some(got == self.expected)
            }
            other => {
                self.in_order = other;
                None
            }
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
                let mut kept = [false; SYMBOLS_PER_FRAME as usize];
                for (i, sym) in payload.chunks_exact(t).enumerate() {
                    // A duplicate (a symbol already held) is harmless.
                    kept[i] = c.insert(first_esi + i as u32, sym).is_ok();
                }
                for (i, sym) in payload.chunks_exact(t).enumerate() {
                    self.hash_in_order(first_esi + i as u32, sym, kept[i]);
                }
                let c = self.collector.as_ref().expect("present above");
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
        // Every source symbol in order and kept: the collector holds them
        // all, and decodes them to the very bytes already hashed.
        let verdict = self.in_order_verdict();
        match c.decode(&self.layout) {
            Ok(padded) => {
                let len = self.layout.block_len(self.block);
                let matches = verdict.unwrap_or_else(|| sha256(&padded[..len]) == self.expected);
                if matches {
                    let mut data = padded;
                    data.truncate(len);
                    Ok(data)
                } else {
                    self.collector = Some(Box::new(Collector::for_block(&self.layout, self.block)));
                    self.in_order = Some((Sha256::new(), 0));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_file::{block_of, setup};

    const T: usize = crate::test_file::T as usize;

    /// Source symbol `esi` of block `b`, zero-padded to T.
    fn symbol(layout: &Layout, file: &[u8], b: u32, esi: u32) -> Vec<u8> {
        let block = block_of(layout, file, b);
        let mut s = vec![0u8; T];
        let from = (esi as usize * T).min(block.len());
        let upto = (from + T).min(block.len());
        s[..upto - from].copy_from_slice(&block[from..upto]);
        s
    }

    fn frame(b: u32, first_esi: u32, symbols: &[Vec<u8>]) -> Frame {
        Frame::Symbols {
            block: b,
            first_esi,
            payload: symbols.concat(),
        }
    }

    /// Feeds `frames` and decodes at the first `Decode`.
    fn run(f: &mut BlockFetch, frames: Vec<Frame>) -> Result<Vec<u8>, Rejected> {
        for fr in frames {
            match f.handle(fr) {
                FetchStep::More => {}
                FetchStep::Decode => return f.decode(),
                other => panic!("{other:?}"),
            }
        }
        Err(Rejected::NeedMore)
    }

    #[test]
    fn source_symbols_in_order_are_hashed_as_they_come_and_checked() {
        let (layout, file) = setup();
        // A full block, and the short last one (a symbol only partly data).
        for b in [0, layout.block_count() - 1] {
            let want = block_of(&layout, &file, b);
            let n = layout.data_symbols(b);
            let syms: Vec<Vec<u8>> = (0..n).map(|e| symbol(&layout, &file, b, e)).collect();
            let frames = vec![frame(b, 0, &syms[..1]), frame(b, 1, &syms[1..])];
            let mut f = BlockFetch::new(layout, b, sha256(&want), None);
            assert!(matches!(f.handle(frames[0].clone()), FetchStep::More));
            assert!(matches!(f.handle(frames[1].clone()), FetchStep::Decode));
            assert!(
                matches!(f.in_order, Some((_, hashed)) if hashed == n),
                "block {b}: every source symbol hashed on arrival"
            );
            assert_eq!(f.decode(), Ok(want.clone()), "block {b}");
            assert!(
                f.in_order.is_none(),
                "block {b} was checked by its in-order hash"
            );

            // The same order with one byte wrong is refused, and the block
            // then decodes from a peer's good symbols.
            let mut bad = syms.clone();
            bad[n as usize - 1][0] ^= 1;
            let mut f = BlockFetch::new(layout, b, sha256(&want), None);
            assert_eq!(run(&mut f, vec![frame(b, 0, &bad)]), Err(Rejected::Corrupt));
            assert_eq!(
                run(&mut f, frames),
                Ok(want),
                "block {b} after a corrupt answer"
            );
        }
    }

    #[test]
    fn a_symbol_held_already_is_what_is_checked_not_the_peers_copy() {
        let (layout, file) = setup();
        let b = 0;
        let want = block_of(&layout, &file, b);
        let n = layout.data_symbols(b);
        let good: Vec<Vec<u8>> = (0..n).map(|e| symbol(&layout, &file, b, e)).collect();

        // The multicast left a bad symbol 0; the peer sends every source
        // symbol right and in order. Its symbol 0 is not the one decoded,
        // so the block is not taken on the peer's bytes' hash.
        let mut held = Collector::for_block(&layout, b);
        let mut wrong = good[0].clone();
        wrong[3] ^= 0x80;
        held.insert(0, &wrong).unwrap();
        let mut f = BlockFetch::new(layout, b, sha256(&want), Some(Box::new(held)));
        assert_eq!(
            run(&mut f, vec![frame(b, 0, &good)]),
            Err(Rejected::Corrupt)
        );

        // A good symbol held already, the peer's copy bad: the block is
        // right, checked whole.
        let mut held = Collector::for_block(&layout, b);
        held.insert(0, &good[0]).unwrap();
        let mut peer = good.clone();
        peer[0] = wrong;
        let mut f = BlockFetch::new(layout, b, sha256(&want), Some(Box::new(held)));
        assert_eq!(run(&mut f, vec![frame(b, 0, &peer)]), Ok(want.clone()));

        // Out of order: checked whole.
        let mut f = BlockFetch::new(layout, b, sha256(&want), None);
        let frames = vec![frame(b, 5, &good[5..]), frame(b, 0, &good[..5])];
        assert_eq!(run(&mut f, frames), Ok(want));
    }
}
