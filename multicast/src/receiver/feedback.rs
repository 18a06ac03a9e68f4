//! What a receiver tells its sender: NEEDS every interval (with the path
//! since the last), and leaving when left behind.

use std::time::Instant;

use super::*;

impl Receiver {
    /// Left behind, the pass over and its blocks decoded: what is missing
    /// comes from elsewhere.
    pub(super) fn leave_if_missing(&mut self) {
        let active = self.active.as_ref().expect("called with an active session");
        if active.phase == Phase::Receiving && active.missing > 0 {
            let failure = ReceiveFailure::LeftBehind {
                missing: active.missing,
                blocks: active.layout.block_count(),
            };
            self.fail(failure);
        }
    }

    /// Reports NEEDS, with the path since the last report, every interval
    /// (the sender's rate controller counts on it even when nothing is
    /// needed), except once left behind.
    pub(super) fn send_needs(&mut self, now: Instant) {
        self.settle_quiet_blocks();
        let active = self.active.as_ref().expect("called with an active session");
        let k = active.layout.k();
        let mut needs = Vec::new();
        for (&block, c) in &active.collectors {
            if needs.len() == MAX_NEEDS_PER_FRAME {
                break;
            }
            let want = k + MIN_DECODE_MARGIN + active.extra.get(&block).copied().unwrap_or(0);
            // A block that holds enough waits to settle (or for its hash);
            // asking for more would only buy a faster decode.
            let need = want.saturating_sub(c.held());
            if need > 0 {
                needs.push(Need {
                    block,
                    need,
                    highest_esi: c.highest_esi(),
                });
            }
        }
        // Blocks the sender has gone past that we hold nothing of, as many
        // as we have room to buffer.
        let horizon = if active.pass_over {
            active.layout.block_count()
        } else {
            active.highest_block_seen.unwrap_or(0)
        };
        let room = active
            .max_collectors
            .saturating_sub(active.collectors.len() + active.decoding);
        let missing = active.state[..horizon as usize]
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == BlockState::Missing)
            .take(room.min(MAX_NEEDS_PER_FRAME - needs.len()));
        let mut passed = Vec::new();
        for (block, _) in missing {
            passed.push(block as u32);
            needs.push(Need {
                block: block as u32,
                need: k + MIN_DECODE_MARGIN,
                highest_esi: None,
            });
        }
        let active = self.active.as_mut().expect("called with an active session");
        // What arrives for these now is the repair asked for: nothing more
        // is coming, so they decode as soon as they can.
        active.settled.extend(passed);
        let path = active
            .path
            .report(now, self.stats.span, self.stats.data_symbols);
        if active.left {
            return;
        }
        let loss_ppm = (self.stats.reported_loss() * 1e6) as u32;
        self.send_feedback(Feedback::Needs {
            loss_ppm,
            path,
            needs,
        });
    }

    /// Marks collecting blocks that received nothing since the last tick as
    /// settled, and dispatches those that already hold enough for that.
    pub(super) fn settle_quiet_blocks(&mut self) {
        let active = self.active.as_mut().expect("called with an active session");
        let mut ready = Vec::new();
        for (&block, c) in &active.collectors {
            let held = c.held();
            if active.held_at_tick.insert(block, held) == Some(held) && active.settled.insert(block)
            {
                ready.push(block);
            }
        }
        for block in ready {
            self.maybe_dispatch(block);
        }
    }

    pub(super) fn send_feedback(&mut self, feedback: Feedback) {
        let active = self.active.as_ref().expect("called with an active session");
        let frame = Frame::Feedback {
            receiver: self.cfg.receiver_id,
            feedback,
        };
        self.stats.feedback_sent += 1;
        self.transmits
            .push_back((active.sender, frame.encode(active.session)));
    }
}
