//! The asking side for many blocks from one peer over one connection,
//! sans-IO. Requests are pipelined: the requester keeps several NEEDs
//! outstanding, and the peer answers them one after another, each answer
//! closed by END (or a NOT_HELD or BUSY alone), so its link never idles
//! between blocks. The front of the queue is the block being answered;
//! anything that does not fit that order is the peer misbehaving.

use std::collections::VecDeque;

use multicast::wire::Digest;

use crate::fetch::{BlockFetch, FetchStep, Misbehavior, Rejected};
use crate::frame::Frame;

/// Times a peer may end a block's symbols before it decoded: then it is
/// asked again; past this it is dropped (its plan is broken or hostile).
const MAX_REASKS: u32 = 2;

/// What the caller does after [`Pipeline::handle`].
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Keep reading.
    More,
    /// The front block has enough symbols: call [`Pipeline::decode_front`].
    Decode,
    /// The peer does not hold this block: ask another for it.
    Declined(u32),
    /// The peer is at its upload limit for this block: ask later or another.
    Busy(u32),
    /// The peer ended this block's symbols before it decoded: send this
    /// request (already queued again at the back).
    Reask(Frame),
    /// The peer broke the protocol: drop it, with every block still asked.
    Misbehaved(Misbehavior),
}

/// What came of a decode of the front block.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The block, verified against its hash; send [`Frame::Stop`] for it.
    Block {
        block: u32,
        data: Vec<u8>,
        bytes: u64,
    },
    /// Not decodable yet: keep reading (the peer sends a little extra).
    NeedMore,
    /// The symbols decode to the wrong bytes: drop the peer.
    Corrupt(u32),
}

struct Asked {
    fetch: BlockFetch,
    /// Decoded and handed over; what still arrives of it until END is
    /// surplus the peer had sent before our STOP reached it.
    delivered: bool,
    reasks: u32,
}

/// The blocks asked of one peer, in the order asked.
pub struct Pipeline {
    content: Digest,
    asked: VecDeque<Asked>,
}

impl Pipeline {
    pub fn new(content: Digest) -> Self {
        Self {
            content,
            asked: VecDeque::new(),
        }
    }

    /// Blocks asked and not yet answered in full.
    pub fn len(&self) -> usize {
        self.asked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.asked.is_empty()
    }

    /// The block being answered, if any.
    pub fn front(&self) -> Option<u32> {
        self.asked.front().map(|a| a.fetch.block())
    }

    /// Queues a block: the request to send for it.
    pub fn ask(&mut self, fetch: BlockFetch) -> Frame {
        let request = fetch.request(self.content);
        self.asked.push_back(Asked {
            fetch,
            delivered: false,
            reasks: 0,
        });
        request
    }

    /// Blocks asked and not delivered: what the caller must place
    /// elsewhere when the connection fails.
    pub fn undelivered(&self) -> Vec<u32> {
        self.asked
            .iter()
            .filter(|a| !a.delivered)
            .map(|a| a.fetch.block())
            .collect()
    }

    /// Takes one frame from the peer.
    pub fn handle(&mut self, frame: Frame) -> Step {
        let Some(front) = self.asked.front_mut() else {
            return Step::Misbehaved(Misbehavior::NothingAsked(frame.name()));
        };
        let block = front.fetch.block();
        let other = |b: u32| b != block;
        match frame {
            Frame::Symbols { block: b, .. }
            | Frame::NotHeld { block: b }
            | Frame::End { block: b }
                if other(b) =>
            {
                Step::Misbehaved(Misbehavior::OutOfOrder { got: b, due: block })
            }
            Frame::Symbols { .. } if front.delivered => Step::More,
            f @ Frame::Symbols { .. } => match front.fetch.handle(f) {
                FetchStep::More => Step::More,
                FetchStep::Decode => Step::Decode,
                FetchStep::Misbehaved(why) => Step::Misbehaved(why),
                // Not what symbols yield; never a panic on a peer's frame.
                FetchStep::Elsewhere | FetchStep::Busy => {
                    Step::Misbehaved(Misbehavior::SymbolsForRefusal)
                }
            },
            Frame::NotHeld { .. } => {
                self.asked.pop_front();
                Step::Declined(block)
            }
            Frame::Busy => {
                self.asked.pop_front();
                Step::Busy(block)
            }
            Frame::End { .. } => {
                let asked = self.asked.pop_front().expect("front exists");
                if asked.delivered {
                    return Step::More;
                }
                if asked.reasks >= MAX_REASKS {
                    return Step::Misbehaved(Misbehavior::TooManyReasks {
                        block,
                        times: asked.reasks + 1,
                    });
                }
                let request = asked.fetch.request(self.content);
                self.asked.push_back(Asked {
                    reasks: asked.reasks + 1,
                    ..asked
                });
                Step::Reask(request)
            }
            f @ (Frame::Need { .. }
            | Frame::Stop { .. }
            | Frame::Join { .. }
            | Frame::Members { .. }) => Step::Misbehaved(Misbehavior::Unexpected(f.name())),
        }
    }

    /// Decodes the front block and checks its hash (after [`Step::Decode`]).
    pub fn decode_front(&mut self) -> Decoded {
        let Some(front) = self.asked.front_mut() else {
            return Decoded::NeedMore;
        };
        let block = front.fetch.block();
        match front.fetch.decode() {
            Ok(data) => {
                front.delivered = true;
                Decoded::Block {
                    block,
                    data,
                    bytes: front.fetch.bytes,
                }
            }
            Err(Rejected::NeedMore) => Decoded::NeedMore,
            Err(Rejected::Corrupt) => Decoded::Corrupt(block),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::{Serving, Want};
    use multicast::codec::{Layout, Plan, sha256};

    use crate::test_file::{T, block_of, setup};

    fn fetch(layout: &Layout, file: &[u8], b: u32) -> BlockFetch {
        BlockFetch::new(*layout, b, sha256(&block_of(layout, file, b)), None)
    }

    /// What a peer answers to a request, END included.
    fn answer(layout: &Layout, file: &[u8], request: &Frame) -> Vec<Frame> {
        let Frame::Need {
            block,
            held,
            need,
            highest_esi,
            ..
        } = *request
        else {
            panic!("not a request")
        };
        let want = Want {
            block,
            held,
            need,
            highest_esi,
        };
        let plan = Serving::needs_plan(&want).then(|| Plan::new(*layout));
        let data = block_of(layout, file, block);
        let mut s = Serving::new(layout, plan.as_ref(), want, data, 5);
        let mut out = Vec::new();
        while let Some(f) = s.next_frame() {
            out.push(f);
        }
        out.push(Frame::End { block });
        out
    }

    #[test]
    fn pipelined_answers_deliver_every_block_in_order() {
        let (layout, file) = setup();
        let mut p = Pipeline::new([1; 32]);
        let requests: Vec<Frame> = (0..layout.block_count())
            .map(|b| p.ask(fetch(&layout, &file, b)))
            .collect();
        let mut got = Vec::new();
        for r in &requests {
            for f in answer(&layout, &file, r) {
                match p.handle(f) {
                    Step::More => {}
                    Step::Decode => match p.decode_front() {
                        Decoded::Block { block, data, .. } => got.push((block, data)),
                        other => panic!("{other:?}"),
                    },
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(p.is_empty());
        assert_eq!(got.len() as u32, layout.block_count());
        for (b, data) in got {
            assert_eq!(data, block_of(&layout, &file, b));
        }
    }

    #[test]
    fn refusals_and_out_of_order_answers_are_told_apart() {
        let (layout, file) = setup();
        let mut p = Pipeline::new([1; 32]);
        p.ask(fetch(&layout, &file, 0));
        p.ask(fetch(&layout, &file, 1));
        p.ask(fetch(&layout, &file, 2));
        assert_eq!(p.handle(Frame::NotHeld { block: 0 }), Step::Declined(0));
        assert_eq!(p.handle(Frame::Busy), Step::Busy(1));
        assert_eq!(p.front(), Some(2));
        // An answer for a block not due is the peer breaking the order.
        let wrong = p.handle(Frame::End { block: 1 });
        assert!(matches!(wrong, Step::Misbehaved(_)), "{wrong:?}");
        assert_eq!(p.undelivered(), vec![2]);
        let mut idle = Pipeline::new([1; 32]);
        assert!(matches!(idle.handle(Frame::Busy), Step::Misbehaved(_)));
    }

    #[test]
    fn a_block_ended_short_is_asked_again_then_the_peer_is_dropped() {
        let (layout, file) = setup();
        let mut p = Pipeline::new([1; 32]);
        p.ask(fetch(&layout, &file, 3));
        p.ask(fetch(&layout, &file, 4));
        // Two symbols of ten, then END: asked again, at the back.
        let request = Frame::Need {
            content: [1; 32],
            block: 3,
            held: 0,
            need: 12,
            highest_esi: None,
        };
        let frames = answer(&layout, &file, &request);
        let Frame::Symbols { block, payload, .. } = &frames[0] else {
            panic!()
        };
        let two = Frame::Symbols {
            block: *block,
            first_esi: 0,
            payload: payload[..2 * usize::from(T)].to_vec(),
        };
        assert_eq!(p.handle(two), Step::More);
        let Step::Reask(Frame::Need { block: 3, held, .. }) = p.handle(Frame::End { block: 3 })
        else {
            panic!("not asked again")
        };
        assert_eq!(held, 2, "the new request counts what is held");
        assert_eq!(p.front(), Some(4));
        assert_eq!(p.handle(Frame::NotHeld { block: 4 }), Step::Declined(4));
        for _ in 0..MAX_REASKS - 1 {
            assert!(matches!(p.handle(Frame::End { block: 3 }), Step::Reask(_)));
        }
        let dropped = p.handle(Frame::End { block: 3 });
        assert!(matches!(dropped, Step::Misbehaved(_)), "{dropped:?}");
    }

    #[test]
    fn surplus_after_a_decoded_block_is_ignored_until_its_end() {
        let (layout, file) = setup();
        let mut p = Pipeline::new([1; 32]);
        let r = p.ask(fetch(&layout, &file, 0));
        let frames = answer(&layout, &file, &r);
        let (end, symbols) = frames.split_last().unwrap();
        for f in symbols.iter().cloned() {
            if p.handle(f) == Step::Decode {
                assert!(matches!(p.decode_front(), Decoded::Block { block: 0, .. }));
            }
        }
        // The same symbols again (sent before our STOP arrived): ignored.
        for f in symbols.iter().cloned() {
            assert_eq!(p.handle(f), Step::More);
        }
        assert_eq!(p.undelivered(), Vec::<u32>::new());
        assert_eq!(p.handle(end.clone()), Step::More);
        assert!(p.is_empty());
    }

    #[test]
    fn corrupt_symbols_are_reported() {
        let (layout, file) = setup();
        let mut p = Pipeline::new([1; 32]);
        let r = p.ask(fetch(&layout, &file, 1));
        let mut saw_corrupt = false;
        for f in answer(&layout, &file, &r) {
            let f = match f {
                Frame::Symbols {
                    block,
                    first_esi,
                    mut payload,
                } => {
                    payload[0] ^= 1;
                    Frame::Symbols {
                        block,
                        first_esi,
                        payload,
                    }
                }
                f => f,
            };
            if p.handle(f) == Step::Decode {
                saw_corrupt = p.decode_front() == Decoded::Corrupt(1);
                break;
            }
        }
        assert!(saw_corrupt);
    }
}
