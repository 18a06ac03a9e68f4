//! The answering side: a peer that holds block b decoded (and verified)
//! streams symbols for it until the requester stops it or the planned
//! count is sent.

use multicast::codec::{BlockEncoder, Layout, Plan, pad_block};
use multicast::wire::MAX_ESI;

use std::borrow::Cow;

use crate::frame::{self, Frame, SYMBOLS_PER_FRAME};

/// Repair ESIs start at or above this: a multicast sender mints upward from
/// K (at most 56 403 plus its repair), so symbols from peers never repeat
/// what the requester may already hold.
pub const PEER_ESI_BASE: u32 = 1 << 23;
/// Symbols sent beyond the stated need (which already has the decode
/// margin), so a rare failed decode does not cost a round trip.
pub const EXTRA: u32 = 1;

enum Source {
    /// The block's own symbols, for a requester that holds none: the
    /// block's bytes, the last symbol padded with zeros.
    Systematic { data: Vec<u8>, next: u32, end: u32 },
    /// Fresh repair symbols.
    Repair {
        encoder: Box<BlockEncoder>,
        next: u32,
        end: u32,
    },
}

/// What the requester said of the block it lacks.
#[derive(Clone, Copy, Debug)]
pub struct Want {
    pub block: u32,
    /// Symbols it holds.
    pub held: u32,
    /// Symbols it still needs.
    pub need: u32,
    /// Highest ESI it has seen.
    pub highest_esi: Option<u32>,
}

/// One block being served.
pub struct Serving {
    block: u32,
    t: usize,
    source: Source,
}

impl Serving {
    /// Whether answering `want` takes an encoding plan (repair symbols); a
    /// requester that holds nothing gets the block's own symbols.
    pub fn needs_plan(want: &Want) -> bool {
        want.held > 0
    }

    /// Plans the answer to `want` from the verified `block_bytes`. `salt`
    /// spreads different peers' repair ESIs apart. Without a plan the
    /// block's source symbols are sent whatever the requester holds, from
    /// `block_bytes` itself (no copy).
    pub fn new(
        layout: &Layout,
        plan: Option<&Plan>,
        want: Want,
        block_bytes: Vec<u8>,
        salt: u32,
    ) -> Self {
        let Want {
            block,
            held,
            need,
            highest_esi: highest,
        } = want;
        let t = usize::from(layout.symbol_size());
        let data = layout.data_symbols(block);
        let count = need.clamp(1, layout.k()) + EXTRA;
        let floor = highest.map_or(PEER_ESI_BASE, |e| e.saturating_add(1).max(PEER_ESI_BASE));
        // Room for `count` fresh ESIs above everything the requester saw; a
        // requester claiming ESIs near the top gets the source symbols.
        let room = MAX_ESI.saturating_sub(floor).saturating_sub(count);
        let source = match plan {
            Some(plan) if held > 0 && room > 0 => {
                let start = floor + salt % room;
                let padded = pad_block(layout, block, &block_bytes);
                Source::Repair {
                    encoder: Box::new(plan.encoder(&padded)),
                    next: start,
                    end: start + count,
                }
            }
            // Padding symbols past the data are zeros the requester fills
            // in; only the last data symbol's tail is sent as zeros.
            _ => {
                let mut data_bytes = block_bytes;
                data_bytes.resize(data as usize * t, 0);
                Source::Systematic {
                    data: data_bytes,
                    next: 0,
                    end: data,
                }
            }
        };
        Self { block, t, source }
    }

    /// The next frame to send, or `None` when the plan is spent.
    pub fn next_frame(&mut self) -> Option<Frame> {
        let block = self.block;
        let (first_esi, payload) = self.next_symbols()?;
        Some(Frame::Symbols {
            block,
            first_esi,
            payload: payload.into_owned(),
        })
    }

    /// Appends the next frame, encoded, to `out` (a block's own symbols
    /// straight from the block): its payload's length, or `None` when the
    /// plan is spent.
    pub fn encode_next(&mut self, out: &mut Vec<u8>) -> Option<usize> {
        let block = self.block;
        let (first_esi, payload) = self.next_symbols()?;
        frame::encode_symbols(out, block, first_esi, &payload);
        Some(payload.len())
    }

    /// The next run of symbols: the first one's ESI and their bytes.
    fn next_symbols(&mut self) -> Option<(u32, Cow<'_, [u8]>)> {
        let t = self.t;
        match &mut self.source {
            Source::Systematic { data, next, end } => {
                if *next >= *end {
                    return None;
                }
                let n = SYMBOLS_PER_FRAME.min(*end - *next);
                let first_esi = *next;
                *next += n;
                let from = first_esi as usize * t;
                Some((first_esi, Cow::Borrowed(&data[from..from + n as usize * t])))
            }
            Source::Repair { encoder, next, end } => {
                if *next >= *end {
                    return None;
                }
                let n = SYMBOLS_PER_FRAME.min(*end - *next);
                let first_esi = *next;
                *next += n;
                Some((first_esi, Cow::Owned(encoder.repair(first_esi, n))))
            }
        }
    }

    /// Asks for more after a decode that needed more (rare): `n` further
    /// repair symbols.
    pub fn extend(&mut self, n: u32) {
        match &mut self.source {
            Source::Systematic { .. } => {}
            Source::Repair { end, .. } => *end = end.saturating_add(n).min(MAX_ESI + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block's frames encoded straight from the block are byte for byte
    /// the frames `next_frame` gives, encoded: source symbols (the last one
    /// padded) and repair symbols alike.
    #[test]
    fn frames_encoded_from_the_block_are_the_frames() {
        let layout = Layout::for_file(9_300, 4000, 1000).unwrap();
        let plan = Plan::new(layout);
        let data: Vec<u8> = (0..layout.block_len(2)).map(|i| (i * 7) as u8).collect();
        assert_eq!(
            data.len(),
            1300,
            "the last block, its second symbol partial"
        );
        for held in [0, 2] {
            let want = Want {
                block: 2,
                held,
                need: 5,
                highest_esi: None,
            };
            let mut a = Serving::new(&layout, Some(&plan), want, data.clone(), 9);
            let mut b = Serving::new(&layout, Some(&plan), want, data.clone(), 9);
            let mut frames = 0;
            while let Some(f) = a.next_frame() {
                let (mut want_bytes, mut got) = (Vec::new(), Vec::new());
                frame::encode(&f, &mut want_bytes);
                let len = b.encode_next(&mut got).expect("as many frames");
                assert_eq!(got, want_bytes);
                let Frame::Symbols { payload, .. } = f else {
                    unreachable!()
                };
                assert_eq!(len, payload.len());
                frames += 1;
            }
            assert!(frames > 0);
            assert_eq!(b.encode_next(&mut Vec::new()), None);
        }
    }

    #[test]
    fn a_hostile_highest_esi_cannot_overflow_the_plan() {
        let layout = Layout::for_file(10_000, 5000, 1000).unwrap();
        let plan = Plan::new(layout);
        let data = vec![5u8; 5000];
        for highest in [Some(MAX_ESI), Some(MAX_ESI - 3), Some(u32::MAX)] {
            let want = Want {
                block: 0,
                held: 3,
                need: 1_000_000,
                highest_esi: highest,
            };
            let mut s = Serving::new(&layout, Some(&plan), want, data.clone(), u32::MAX);
            let mut n = 0;
            while let Some(Frame::Symbols {
                first_esi, payload, ..
            }) = s.next_frame()
            {
                assert!(first_esi + (payload.len() / 1000) as u32 - 1 <= MAX_ESI);
                n += 1;
                assert!(n < 100, "an endless plan");
            }
            assert!(n > 0);
        }
    }
}
