//! The answering side: a peer that holds block b decoded (and verified)
//! streams symbols for it until the requester stops it or the planned
//! count is sent.

use multicast::codec::{BlockEncoder, Layout, Plan, pad_block};
use multicast::wire::MAX_ESI;

use crate::frame::{Frame, SYMBOLS_PER_FRAME};

/// Repair ESIs start at or above this: a multicast sender mints upward from
/// K (at most 56 403 plus its repair), so symbols from peers never repeat
/// what the requester may already hold.
pub const PEER_ESI_BASE: u32 = 1 << 23;
/// Symbols sent beyond the stated need (which already has the decode
/// margin), so a rare failed decode does not cost a round trip.
pub const EXTRA: u32 = 1;

enum Source {
    /// The block's own symbols, for a requester that holds none.
    Systematic {
        padded: Vec<u8>,
        next: u32,
        end: u32,
    },
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
    /// block's source symbols are sent whatever the requester holds.
    pub fn new(
        layout: &Layout,
        plan: Option<&Plan>,
        want: Want,
        block_bytes: &[u8],
        salt: u32,
    ) -> Self {
        let Want {
            block,
            held,
            need,
            highest_esi: highest,
        } = want;
        let padded = pad_block(layout, block, block_bytes);
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
                Source::Repair {
                    encoder: Box::new(plan.encoder(&padded)),
                    next: start,
                    end: start + count,
                }
            }
            // Padding symbols past the data are zeros the requester fills in.
            _ => Source::Systematic {
                padded,
                next: 0,
                end: data,
            },
        };
        Self { block, t, source }
    }

    /// The next frame to send, or `None` when the plan is spent.
    pub fn next_frame(&mut self) -> Option<Frame> {
        let t = self.t;
        match &mut self.source {
            Source::Systematic { padded, next, end } => {
                if *next >= *end {
                    return None;
                }
                let n = SYMBOLS_PER_FRAME.min(*end - *next);
                let from = *next as usize * t;
                let payload = padded[from..from + n as usize * t].to_vec();
                let first_esi = *next;
                *next += n;
                Some(Frame::Symbols {
                    block: self.block,
                    first_esi,
                    payload,
                })
            }
            Source::Repair { encoder, next, end } => {
                if *next >= *end {
                    return None;
                }
                let n = SYMBOLS_PER_FRAME.min(*end - *next);
                let payload = encoder.repair(*next, n);
                let first_esi = *next;
                *next += n;
                Some(Frame::Symbols {
                    block: self.block,
                    first_esi,
                    payload,
                })
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
            let mut s = Serving::new(&layout, Some(&plan), want, &data, u32::MAX);
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
