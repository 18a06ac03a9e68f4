//! RaptorQ block codec: the file cut into blocks of K symbols of T bytes.
//!
//! Every block, the last one included, has the same K: the last block is
//! zero-padded, so a single `SourceBlockEncodingPlan` serves the whole file
//! (raptorq caches plans per K; a distinct K per file would leak memory).
//! Source symbols (ESI < K) are the file bytes themselves; repair symbols
//! (ESI >= K) are minted on demand at any ESI, so any holder of a block can
//! produce fresh ones.
//!
//! raptorq trusts its input and panics on a wrong length or block number, so
//! [`Collector::insert`] checks every symbol before keeping it, and every
//! decoded block is checked against its SHA-256 before anyone uses it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use raptorq::{
    EncodingPacket, ObjectTransmissionInformation, PayloadId, SourceBlockDecoder,
    SourceBlockEncoder, SourceBlockEncodingPlan,
};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::wire::{Digest, MAX_ESI, MAX_NAME_LEN, SessionInfo};

/// RFC 6330's largest number of source symbols in one block.
pub const MAX_SOURCE_SYMBOLS: u32 = 56_403;
/// Smallest symbol that still leaves the header a small share of a datagram.
pub const MIN_SYMBOL_SIZE: u16 = 16;
/// Largest symbol that fits one UDP datagram with our header and trailer.
pub const MAX_SYMBOL_SIZE: u16 = 65_000;
/// A block above this slows raptorq sharply and costs receivers memory.
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Bounds the per-block tables a receiver allocates from one announcement
/// (about 40 bytes a block): 4 TiB at the default block size.
pub const MAX_BLOCKS: u32 = 1 << 20;
/// Extra symbols over K before a decode is tried: with K+2 raptorq fails
/// about once in a million, and a failure only means waiting for more.
pub const MIN_DECODE_MARGIN: u32 = 2;
/// The margin for large blocks. With K+2 symbols raptorq solves with the
/// HDPC rows, in GF(256); with at least K+H (H, the HDPC row count, is 10 to
/// 16 for every K) it first tries a GF(2)-only solve, which nearly always
/// succeeds with a few spare rows and decodes 1.3 to 1.65 times faster (a
/// 4 MiB block at 5% loss: 10.0 against 14.6 ms, `cargo bench -p
/// somcast-multicast --bench decode`). Decoding is what a receiver spends
/// most of its CPU on.
pub const FAST_DECODE_MARGIN: u32 = 20;
/// Blocks of at least this many symbols use [`FAST_DECODE_MARGIN`]: there
/// the 18 extra symbols cost at most 0.9% of the block (0.6% at the default
/// 4 MiB); smaller blocks decode fast anyway and would pay more.
const FAST_DECODE_MIN_K: u32 = 2000;
/// Default symbol size: 1400 B fits a 1500-byte MTU with IP, UDP and our header.
pub const DEFAULT_SYMBOL_SIZE: u16 = 1400;
/// Default block: 4 MiB, K about 3000, where raptorq runs near its best speed.
pub const DEFAULT_BLOCK_SIZE: u32 = 4 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("symbol size {0} is outside {MIN_SYMBOL_SIZE}..={MAX_SYMBOL_SIZE}")]
    SymbolSize(u16),
    #[error(
        "block size {0} is outside one symbol..={MAX_BLOCK_SIZE} or not a multiple of the symbol size"
    )]
    BlockSize(u32),
    #[error("{0} symbols per block is more than RaptorQ allows ({MAX_SOURCE_SYMBOLS})")]
    TooManySymbols(u32),
    #[error("file needs {0} blocks, more than {MAX_BLOCKS}; use a larger block size")]
    TooManyBlocks(u64),
    #[error("announced block count {announced} does not match the sizes ({expected})")]
    BlockCount { announced: u32, expected: u32 },
    #[error("announced name is longer than {MAX_NAME_LEN} bytes")]
    Name,
}

/// How a file is cut into blocks and symbols. Valid by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    file_size: u64,
    block_size: u32,
    symbol_size: u16,
    block_count: u32,
}

impl Layout {
    /// A layout for a file, rounding the requested block size to whole symbols.
    pub fn for_file(
        file_size: u64,
        requested_block: u32,
        symbol_size: u16,
    ) -> Result<Self, LayoutError> {
        check_symbol_size(symbol_size)?;
        let t = u32::from(symbol_size);
        let k = requested_block.div_ceil(t).max(1);
        Self::new(file_size, k.saturating_mul(t), symbol_size)
    }

    /// A layout from exact sizes, refusing anything raptorq could not take.
    pub fn new(file_size: u64, block_size: u32, symbol_size: u16) -> Result<Self, LayoutError> {
        check_symbol_size(symbol_size)?;
        let t = u32::from(symbol_size);
        if block_size < t || block_size > MAX_BLOCK_SIZE || !block_size.is_multiple_of(t) {
            return Err(LayoutError::BlockSize(block_size));
        }
        if block_size / t > MAX_SOURCE_SYMBOLS {
            return Err(LayoutError::TooManySymbols(block_size / t));
        }
        let blocks = file_size.div_ceil(u64::from(block_size));
        if blocks > u64::from(MAX_BLOCKS) {
            return Err(LayoutError::TooManyBlocks(blocks));
        }
        Ok(Self {
            file_size,
            block_size,
            symbol_size,
            block_count: blocks as u32,
        })
    }

    /// Validates an announcement before any of its numbers are trusted.
    pub fn from_session(info: &SessionInfo) -> Result<Self, LayoutError> {
        if info.name.len() > MAX_NAME_LEN {
            return Err(LayoutError::Name);
        }
        let layout = Self::new(info.file_size, info.block_size, info.symbol_size)?;
        if layout.block_count != info.block_count {
            return Err(LayoutError::BlockCount {
                announced: info.block_count,
                expected: layout.block_count,
            });
        }
        Ok(layout)
    }

    pub fn file_size(&self) -> u64 {
        self.file_size
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn symbol_size(&self) -> u16 {
        self.symbol_size
    }
    pub fn block_count(&self) -> u32 {
        self.block_count
    }
    /// K: source symbols in every block.
    pub fn k(&self) -> u32 {
        self.block_size / u32::from(self.symbol_size)
    }
    /// Offset of block `b` in the file.
    pub fn offset(&self, block: u32) -> u64 {
        u64::from(block) * u64::from(self.block_size)
    }
    /// File bytes in block `b` (the last block may be short).
    pub fn block_len(&self, block: u32) -> usize {
        let rest = self.file_size.saturating_sub(self.offset(block));
        rest.min(u64::from(self.block_size)) as usize
    }

    /// Symbols beyond K a receiver collects before decoding a block.
    pub fn decode_margin(&self) -> u32 {
        if self.k() >= FAST_DECODE_MIN_K {
            FAST_DECODE_MARGIN
        } else {
            MIN_DECODE_MARGIN
        }
    }

    /// Source symbols of block `b` that hold file bytes; the rest of its K
    /// are zero padding, which receivers fill in themselves.
    pub fn data_symbols(&self, block: u32) -> u32 {
        (self.block_len(block) as u64).div_ceil(u64::from(self.symbol_size)) as u32
    }

    fn oti(&self) -> ObjectTransmissionInformation {
        // One source block, no sub-blocks, alignment 1: every T is valid.
        ObjectTransmissionInformation::new(u64::from(self.block_size), self.symbol_size, 1, 1, 1)
    }
}

fn check_symbol_size(t: u16) -> Result<(), LayoutError> {
    if !(MIN_SYMBOL_SIZE..=MAX_SYMBOL_SIZE).contains(&t) {
        return Err(LayoutError::SymbolSize(t));
    }
    Ok(())
}

/// SHA-256 of a byte slice.
pub fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// The encoding plan for one K, shared by every block of a layout.
#[derive(Clone)]
pub struct Plan {
    layout: Layout,
    plan: Arc<SourceBlockEncodingPlan>,
}

impl Plan {
    /// Generating a plan costs about as much as encoding one block; do it once.
    pub fn new(layout: Layout) -> Self {
        // K <= MAX_SOURCE_SYMBOLS < u16::MAX, checked by Layout.
        let k = layout.k() as u16;
        Self {
            layout,
            plan: Arc::new(SourceBlockEncodingPlan::generate(k)),
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Builds the encoder of one block from its padded bytes (K*T long).
    pub fn encoder(&self, padded: &[u8]) -> BlockEncoder {
        assert_eq!(
            padded.len(),
            self.layout.block_size as usize,
            "block must be padded"
        );
        BlockEncoder {
            k: self.layout.k(),
            t: usize::from(self.layout.symbol_size),
            inner: SourceBlockEncoder::with_encoding_plan(
                0,
                &self.layout.oti(),
                padded,
                &self.plan,
            ),
        }
    }
}

/// Mints repair symbols of one block.
pub struct BlockEncoder {
    k: u32,
    t: usize,
    inner: SourceBlockEncoder,
}

impl BlockEncoder {
    /// `count` repair symbols from `first_esi` (>= K) on, concatenated.
    pub fn repair(&self, first_esi: u32, count: u32) -> Vec<u8> {
        assert!(first_esi >= self.k, "repair ESIs start at K");
        assert!(
            first_esi.saturating_add(count) <= MAX_ESI + 1,
            "ESI past 24 bits"
        );
        let mut out = Vec::with_capacity(count as usize * self.t);
        for packet in self.inner.repair_packets(first_esi - self.k, count) {
            out.extend_from_slice(packet.data());
        }
        out
    }
}

/// Reads a block into a zero-padded buffer of exactly `block_size` bytes.
pub fn pad_block(layout: &Layout, block: u32, file_bytes: &[u8]) -> Vec<u8> {
    debug_assert_eq!(file_bytes.len(), layout.block_len(block));
    let mut padded = vec![0u8; layout.block_size as usize];
    padded[..file_bytes.len()].copy_from_slice(file_bytes);
    padded
}

/// Why a symbol was not kept.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum SymbolError {
    #[error("payload of {got} bytes, symbol size is {want}")]
    Length { got: usize, want: usize },
    #[error("ESI beyond 24 bits")]
    Esi,
    #[error("symbol already held")]
    Duplicate,
}

/// Block-sized buffers given back by finished collectors and decodes, for the
/// next ones. A fresh 4 MiB buffer costs a page fault (and the kernel zeroing
/// a page) for every 4 KiB as symbols land in it: about 2% of all CPU in
/// the 8-receiver lab (perf), on the receiving thread. Process-wide like an
/// allocator's cache, and as small: at most [`SPARE_BUFFERS`].
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// A block collected and one decoded turn over at a time, mostly.
const SPARE_BUFFERS: usize = 2;
/// The largest capacity asked of [`take_buffer`]: smaller buffers (raptorq's
/// decode outputs) are not worth keeping.
static WANTED: AtomicUsize = AtomicUsize::new(64 << 10);

/// An empty buffer with room for `capacity` bytes, reused when one is spare.
fn take_buffer(capacity: usize) -> Vec<u8> {
    WANTED.fetch_max(capacity, Ordering::Relaxed);
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    match spare.iter().position(|b| b.capacity() >= capacity) {
        Some(i) => spare.swap_remove(i),
        None => Vec::with_capacity(capacity),
    }
}

/// Gives a block-sized buffer back for reuse (or frees it when enough are
/// spare).
pub fn recycle(mut buf: Vec<u8>) {
    if buf.capacity() < WANTED.load(Ordering::Relaxed) {
        return;
    }
    buf.clear();
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    if spare.len() < SPARE_BUFFERS {
        spare.push(buf);
    }
}

/// The symbols received so far for one block, checked on the way in.
///
/// Payloads are stored back to back, so a block costs about K*T bytes
/// however its symbols arrived.
#[derive(Clone, Debug)]
pub struct Collector {
    k: u32,
    t: usize,
    esis: Vec<u32>,
    payloads: Vec<u8>,
    have_source: Vec<bool>,
    source_count: u32,
    repair_seen: HashSet<u32>,
    highest_esi: Option<u32>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.payloads));
    }
}

impl Collector {
    pub fn new(layout: &Layout) -> Self {
        Self {
            k: layout.k(),
            t: usize::from(layout.symbol_size),
            esis: Vec::new(),
            payloads: Vec::new(),
            have_source: vec![false; layout.k() as usize],
            source_count: 0,
            repair_seen: HashSet::new(),
            highest_esi: None,
        }
    }

    /// A collector for block `b`, holding the zero padding symbols that no
    /// sender transmits.
    pub fn for_block(layout: &Layout, block: u32) -> Self {
        let mut c = Self::new(layout);
        let zero = vec![0u8; c.t];
        for esi in layout.data_symbols(block)..c.k {
            // A fresh collector holds nothing, so these cannot be refused.
            let _ = c.insert(esi, &zero);
        }
        c.highest_esi = None;
        c
    }

    /// Keeps a symbol after checking its length and ESI and that it is new.
    pub fn insert(&mut self, esi: u32, payload: &[u8]) -> Result<(), SymbolError> {
        if payload.len() != self.t {
            return Err(SymbolError::Length {
                got: payload.len(),
                want: self.t,
            });
        }
        if esi > MAX_ESI {
            return Err(SymbolError::Esi);
        }
        if esi < self.k {
            let slot = &mut self.have_source[esi as usize];
            if *slot {
                return Err(SymbolError::Duplicate);
            }
            *slot = true;
            self.source_count += 1;
        } else if !self.repair_seen.insert(esi) {
            return Err(SymbolError::Duplicate);
        }
        if self.payloads.capacity() == 0 {
            self.payloads = take_buffer((self.k + FAST_DECODE_MARGIN) as usize * self.t);
        }
        self.esis.push(esi);
        self.payloads.extend_from_slice(payload);
        self.highest_esi = self.highest_esi.max(Some(esi));
        Ok(())
    }

    pub fn held(&self) -> u32 {
        self.esis.len() as u32
    }
    pub fn highest_esi(&self) -> Option<u32> {
        self.highest_esi
    }
    pub fn has_all_source(&self) -> bool {
        self.source_count == self.k
    }

    /// Decodes the padded block (K*T bytes), or gives the collector back
    /// when the symbols held do not yet determine it.
    pub fn decode(mut self: Box<Self>, layout: &Layout) -> Result<Vec<u8>, Box<Self>> {
        let t = self.t;
        let k = self.k as usize;
        if self.has_all_source() && self.esis.iter().take(k).copied().eq(0..self.k) {
            // Every source symbol, and the first K in ESI order (one peer
            // sending a whole block): the payloads are the block already.
            let mut block = std::mem::take(&mut self.payloads);
            block.truncate(k * t);
            return Ok(block);
        }
        if self.has_all_source() {
            // Systematic code: the source symbols are the block itself.
            // A collector's capacity, so the buffer can serve one later.
            let mut block = take_buffer((self.k + FAST_DECODE_MARGIN) as usize * t);
            block.resize(layout.block_size as usize, 0);
            for (i, &esi) in self.esis.iter().enumerate() {
                if esi < self.k {
                    let at = esi as usize * t;
                    block[at..at + t].copy_from_slice(&self.payloads[i * t..(i + 1) * t]);
                }
            }
            return Ok(block);
        }
        if self.held() < self.k {
            return Err(self);
        }
        let mut decoder = SourceBlockDecoder::new(0, &layout.oti(), u64::from(layout.block_size));
        // Every ESI was checked to be < 2^24 and every payload to be T long
        // in `insert`, which is all PayloadId and the decoder assert on.
        let packets = self.esis.iter().enumerate().map(|(i, &esi)| {
            EncodingPacket::new(
                PayloadId::new(0, esi),
                self.payloads[i * t..(i + 1) * t].to_vec(),
            )
        });
        match decoder.decode(packets) {
            Some(block) => Ok(block),
            None => Err(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: u64) -> Layout {
        Layout::for_file(size, 64 * 1024, 1000).unwrap()
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A 200 kB file's layout (T = 1000) and its first block, padded,
    /// from `seed`.
    fn first_block(seed: u64) -> (Layout, Vec<u8>) {
        let l = layout(200_000);
        let padded = pad_block(&l, 0, &pseudo_random(l.block_len(0), seed));
        (l, padded)
    }

    #[test]
    fn block_size_rounds_up_to_whole_symbols() {
        let l = Layout::for_file(10, 4 << 20, 1400).unwrap();
        assert_eq!(l.k(), 2996);
        assert_eq!(l.block_size(), 2996 * 1400);
        assert_eq!(l.block_count(), 1);
    }

    #[test]
    fn last_block_is_short_and_empty_file_has_no_blocks() {
        let l = layout(66_000 * 2 + 1);
        assert_eq!(l.block_size(), 66_000);
        assert_eq!(l.block_count(), 3);
        assert_eq!(l.block_len(2), 1);
        assert_eq!(layout(0).block_count(), 0);
    }

    #[test]
    fn absurd_announcements_are_refused() {
        assert!(Layout::new(1, 1000, 8).is_err());
        assert!(Layout::new(1, 1001, 1000).is_err());
        assert!(Layout::new(1, 0, 1000).is_err());
        assert!(Layout::new(u64::MAX, 1000, 1000).is_err());
        assert!(Layout::new(1, 60_000 * 1000, 1000).is_err());
        let info = SessionInfo {
            file_size: 10,
            block_size: 1000,
            symbol_size: 1000,
            block_count: 2,
            file_sha256: Some([0; 32]),
            feedback_port: 1,
            feedback_interval_ms: 10,
            name: String::new(),
            paused: false,
        };
        assert!(matches!(
            Layout::from_session(&info),
            Err(LayoutError::BlockCount { .. })
        ));
    }

    #[test]
    fn decodes_from_repair_symbols_only_and_matches_the_source() {
        let (l, padded) = first_block(1);
        let enc = Plan::new(l).encoder(&padded);
        let k = l.k();
        let repair = enc.repair(k, k + MIN_DECODE_MARGIN);
        let mut c = Collector::new(&l);
        for i in 0..k + MIN_DECODE_MARGIN {
            let at = i as usize * 1000;
            c.insert(k + i, &repair[at..at + 1000]).unwrap();
        }
        let block = Box::new(c).decode(&l).unwrap();
        assert_eq!(block, padded);
    }

    #[test]
    fn source_symbols_in_any_order_decode_to_the_block() {
        let (l, padded) = first_block(3);
        let k = l.k();
        let sym = |esi: u32| &padded[esi as usize * 1000..(esi as usize + 1) * 1000];
        // In ESI order (one peer sending a whole block): its own buffer.
        let mut c = Collector::new(&l);
        (0..k).for_each(|e| c.insert(e, sym(e)).unwrap());
        assert_eq!(Box::new(c).decode(&l).unwrap(), padded);
        // Reversed, and with a repair symbol first: placed by ESI.
        let enc = Plan::new(l).encoder(&padded);
        let mut c = Collector::new(&l);
        c.insert(k, &enc.repair(k, 1)).unwrap();
        (0..k).rev().for_each(|e| c.insert(e, sym(e)).unwrap());
        assert_eq!(Box::new(c).decode(&l).unwrap(), padded);
        // One gap, filled last.
        let mut c = Collector::new(&l);
        (0..k)
            .filter(|&e| e != 1)
            .for_each(|e| c.insert(e, sym(e)).unwrap());
        c.insert(1, sym(1)).unwrap();
        assert_eq!(Box::new(c).decode(&l).unwrap(), padded);
    }

    /// Failover and peer repair rest on this: a symbol depends only on the
    /// block and its ESI, not on which sender (or peer) minted it, so
    /// symbols from one session count in the next.
    #[test]
    fn symbols_from_different_senders_are_interchangeable() {
        let (l, padded) = first_block(9);
        let k = l.k();
        let (a, b) = (Plan::new(l).encoder(&padded), Plan::new(l).encoder(&padded));
        assert_eq!(a.repair(k + 5, 20), b.repair(k + 5, 20));
        assert_eq!(a.repair(1 << 23, 3), b.repair(1 << 23, 3));
        // Half the symbols from one sender, the rest from the other (and
        // from far above, as a peer sends): the block decodes.
        let mut c = Collector::new(&l);
        let first = a.repair(k, k / 2);
        for i in 0..k / 2 {
            let at = i as usize * 1000;
            c.insert(k + i, &first[at..at + 1000]).unwrap();
        }
        let rest = k - k / 2 + MIN_DECODE_MARGIN;
        let second = b.repair(1 << 23, rest);
        for i in 0..rest {
            let at = i as usize * 1000;
            c.insert((1 << 23) + i, &second[at..at + 1000]).unwrap();
        }
        assert_eq!(Box::new(c).decode(&l).unwrap(), padded);
    }

    #[test]
    fn decodes_with_a_third_of_the_source_lost() {
        let l = layout(200_000);
        let plan = Plan::new(l);
        let data = pseudo_random(l.block_len(1), 2);
        let padded = pad_block(&l, 1, &data);
        let k = l.k();
        let mut c = Collector::new(&l);
        for esi in (0..k).filter(|e| e % 3 != 0) {
            let at = esi as usize * 1000;
            c.insert(esi, &padded[at..at + 1000]).unwrap();
        }
        let lost = k - c.held();
        let repair = plan
            .encoder(&padded)
            .repair(k + 100, lost + MIN_DECODE_MARGIN);
        for (i, sym) in repair.chunks(1000).enumerate() {
            c.insert(k + 100 + i as u32, sym).unwrap();
        }
        assert_eq!(Box::new(c).decode(&l).unwrap(), padded);
    }

    #[test]
    fn too_few_symbols_give_the_collector_back() {
        let l = layout(200_000);
        let mut c = Collector::new(&l);
        c.insert(0, &[0; 1000]).unwrap();
        let c = Box::new(c).decode(&l).unwrap_err();
        assert_eq!(c.held(), 1);
    }

    #[test]
    fn bad_symbols_are_refused_before_the_decoder() {
        let l = layout(200_000);
        let mut c = Collector::new(&l);
        assert_eq!(
            c.insert(0, &[0; 999]),
            Err(SymbolError::Length {
                got: 999,
                want: 1000
            })
        );
        assert_eq!(c.insert(MAX_ESI + 1, &[0; 1000]), Err(SymbolError::Esi));
        c.insert(5, &[0; 1000]).unwrap();
        assert_eq!(c.insert(5, &[0; 1000]), Err(SymbolError::Duplicate));
        c.insert(l.k() + 5, &[0; 1000]).unwrap();
        assert_eq!(c.insert(l.k() + 5, &[0; 1000]), Err(SymbolError::Duplicate));
        assert_eq!(c.held(), 2);
    }

    #[test]
    fn a_corrupted_symbol_decodes_to_a_block_that_fails_its_hash() {
        let (l, padded) = first_block(3);
        let plan = Plan::new(l);
        let k = l.k();
        let repair = plan.encoder(&padded).repair(k, k + MIN_DECODE_MARGIN);
        let mut c = Collector::new(&l);
        for (i, sym) in repair.chunks(1000).enumerate() {
            let mut sym = sym.to_vec();
            if i == 7 {
                sym[10] ^= 0xFF;
            }
            c.insert(k + i as u32, &sym).unwrap();
        }
        let block = Box::new(c).decode(&l).unwrap();
        assert_ne!(sha256(&block), sha256(&padded));
    }
}
