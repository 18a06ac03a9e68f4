//! Which symbol goes out next: blocks opened into the window, interleaved,
//! each closed after its first pass.

use super::*;

impl Sender {
    /// Starts encoding blocks of the first pass while the window has room,
    /// already while announcing, so data starts with a block ready.
    pub(super) fn open_blocks(&mut self) {
        if !matches!(self.phase, Phase::Announcing { .. } | Phase::Sending) {
            return;
        }
        // Two blocks beyond the window are prepared ahead, so the encoder
        // runs while the window sends and the link never waits for it.
        let depth = self.blocks_in_flight();
        while self.first_pass_open < depth && self.next_new_block < self.available {
            let block = self.next_new_block;
            self.next_new_block += 1;
            self.first_pass_open += 1;
            let k = self.layout.k();
            let data = self.layout.data_symbols(block);
            let mut repair = self.first_pass_repair(data);
            if block + TAIL_BLOCKS >= self.layout.block_count() {
                repair += self.tail_headroom(data);
            }
            let tx = &mut self.blocks[block as usize];
            tx.first_pass = true;
            tx.next_esi = k + repair;
            tx.first_total = self.layout.data_symbols(block) + repair;
            self.queue_job(EncodeJob {
                block,
                with_source: true,
                repair_first_esi: k,
                repair_count: repair,
            });
        }
        if self.phase != Phase::Sending {
            return;
        }
        // Move prepared blocks into the round robin while it has room, one
        // at a time: each after the one before has sent 1/window of its
        // first pass. Blocks then finish one after another rather than a
        // window at once, so receivers decode at an even pace during the
        // pass (not a window's worth of decodes in a burst that starves the
        // sender of CPU) and only the last block is left at its end.
        let in_window = self
            .active
            .iter()
            .filter(|&&b| self.blocks[b as usize].first_pass)
            .count() as u32;
        let youngest_spread = self
            .youngest
            .is_none_or(|b| self.blocks[b as usize].spread(self.interleave()));
        if in_window < self.interleave()
            && youngest_spread
            && let Some(block) = self.staged.pop_front()
        {
            let tx = &mut self.blocks[block as usize];
            if !tx.active {
                tx.active = true;
                self.active.push_back(block);
            }
            self.youngest = Some(block);
        }
    }

    /// The next datagram to send to the group, if the pacer allows one now.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<&[u8]> {
        if self.phase == Phase::Finished || !self.pacer.ready(now) {
            return None;
        }
        if let Some(bytes) = self.control.pop_front() {
            self.buf = bytes;
        } else if let Phase::Closing { left } = self.phase {
            if left == 0 {
                self.phase = Phase::Finished;
                self.events.push_back(SenderEvent::Finished);
                return None;
            }
            self.phase = Phase::Closing { left: left - 1 };
            self.buf = Frame::EndOfPass {
                pass: 1,
                closing: true,
            }
            .encode(self.session);
        } else if self.info.paused || !self.next_symbol(now) {
            self.pacer.idle(now);
            return None;
        }
        let len = self.buf.len() + self.cfg.seal_overhead;
        self.pacer.spend(len);
        self.stats.datagrams += 1;
        self.stats.bytes += len as u64;
        self.stats.wire_bytes += (len + WIRE_OVERHEAD) as u64;
        Some(&self.buf)
    }

    /// Puts the next data symbol (round robin over active blocks) in `buf`.
    pub(super) fn next_symbol(&mut self, now: Instant) -> bool {
        let t = usize::from(self.layout.symbol_size());
        let k = self.layout.k();
        let window = self.interleave();
        while let Some(block) = self.active.pop_front() {
            if !self.may_send_now(block) {
                self.active.push_back(block);
                continue;
            }
            let tx = &mut self.blocks[block as usize];
            let Some(chunk) = tx.queue.front_mut() else {
                tx.active = false;
                if !tx.owed {
                    self.close_first_pass(block);
                }
                continue;
            };
            let esi = chunk.first_esi + chunk.next;
            let at = chunk.next as usize * t;
            let sent_us = now.saturating_duration_since(self.epoch).as_micros() as u32;
            let data = wire::Data {
                block,
                esi,
                sent_us,
                payload: &chunk.bytes[at..at + t],
            };
            wire::encode_data(self.session, &data, &mut self.buf);
            self.stats.data_wire_bytes +=
                (self.buf.len() + self.cfg.seal_overhead + WIRE_OVERHEAD) as u64;
            chunk.next += 1;
            if chunk.next == chunk.count {
                tx.queue.pop_front();
            }
            tx.sent_upto = tx.sent_upto.max(esi + 1);
            tx.last_sent = Some(now);
            // The next block may join when the youngest becomes spread.
            let was_spread = tx.spread(window);
            if tx.first_pass {
                tx.first_sent += 1;
            }
            let admit_next = self.youngest == Some(block) && !was_spread && tx.spread(window);
            if esi < k {
                self.stats.source_symbols += 1;
            } else {
                self.stats.repair_symbols += 1;
                if !tx.first_pass {
                    self.stats.feedback_repair_symbols += 1;
                }
            }
            if tx.queue.is_empty() {
                tx.active = false;
                if !tx.owed {
                    self.close_first_pass(block);
                }
            } else {
                self.active.push_back(block);
                if admit_next {
                    self.open_blocks();
                }
            }
            return true;
        }
        false
    }

    /// Whether `block`, just taken from the round robin, has its turn: once
    /// the last block has joined, only the [`DRAIN_INTERLEAVE`] oldest
    /// first-pass blocks do; repair for finished blocks always does. The
    /// oldest block in the round robin always has its turn, so the caller's
    /// loop ends.
    pub(super) fn may_send_now(&self, block: u32) -> bool {
        let draining = self
            .youngest
            .is_some_and(|b| b + 1 == self.layout.block_count());
        if !draining || !self.blocks[block as usize].first_pass {
            return true;
        }
        let older = self
            .active
            .iter()
            .filter(|&&b| b < block && self.blocks[b as usize].first_pass)
            .count();
        older < DRAIN_INTERLEAVE
    }

    pub(super) fn close_first_pass(&mut self, block: u32) {
        let tx = &mut self.blocks[block as usize];
        if tx.first_pass {
            tx.first_pass = false;
            self.first_pass_open -= 1;
            self.open_blocks();
        }
    }

    /// Blocks sent interleaved: as many as fit in `interleave_bytes`, so a
    /// burst of loss spreads over them, within what receivers buffer.
    pub fn interleave(&self) -> u32 {
        let blocks = self.cfg.interleave_bytes / u64::from(self.layout.block_size());
        blocks.clamp(1, 16) as u32
    }

    /// Blocks of the first pass that are sending or prepared at once: the
    /// window and two more. Feedback during the pass asks for more repair
    /// of any of them, so the encoder keeps that many encoders at hand.
    pub fn blocks_in_flight(&self) -> u32 {
        self.interleave() + 2
    }
}
