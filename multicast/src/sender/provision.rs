//! How many symbols each block gets: the first pass sized for the
//! receivers' reported loss, and repair for what they still need.

use super::*;

impl Sender {
    pub(super) fn handle_need(&mut self, now: Instant, need: wire::Need, delivery: f64) {
        let k = self.layout.k();
        let Some(tx) = self.blocks.get(need.block as usize) else {
            return;
        };
        if need.need == 0 || need.need > k + self.layout.decode_margin() + 64 {
            return;
        }
        // Symbols the receiver has not seen yet but that are on their way:
        // those still queued, and, while the block is being sent, those sent
        // above the receiver's highest ESI (they may still be in a socket
        // buffer). Once the block has been quiet for a feedback interval,
        // anything sent and not seen is lost.
        let queued = tx.next_esi - tx.sent_upto;
        let sending = tx
            .last_sent
            .is_some_and(|at| now < at + self.cfg.feedback_interval);
        let coming = match need.highest_esi {
            Some(e) if sending => tx.next_esi.saturating_sub(e.saturating_add(1)).max(queued),
            _ => queued,
        };
        let expected = f64::from(coming) * delivery;
        let short = f64::from(need.need) - expected;
        if short <= 0.0 {
            return;
        }
        let count = (short / delivery).ceil() as u32;
        self.request_repair(need.block, count);
    }

    pub(super) fn request_repair(&mut self, block: u32, count: u32) {
        let tx = &mut self.blocks[block as usize];
        let first = tx.next_esi.max(self.layout.k());
        let count = count.min((MAX_ESI + 1).saturating_sub(first));
        if count == 0 {
            return;
        }
        tx.next_esi = first + count;
        self.queue_job(EncodeJob {
            block,
            with_source: false,
            repair_first_esi: first,
            repair_count: count,
        });
    }

    /// Repair symbols for a block of `data` data symbols in the first pass.
    pub(super) fn first_pass_repair(&self, data: u32) -> u32 {
        let data = u64::from(data);
        let floor = (data * u64::from(self.cfg.overhead_pct)).div_ceil(100);
        let p = self.planning_loss();
        if p == 0.0 {
            return floor as u32;
        }
        // Just enough that such a receiver expects the K+2 symbols it can
        // decode from: its loss with 2% headroom and three symbols in a
        // thousand. Blocks that fall a few symbols short are topped up by
        // feedback, which costs less than a larger margin on every block.
        // (Receivers that get K + the fast margin decode sooner and faster;
        // the others decode from what they have once the block settles.)
        let per_mille = (p / (1.0 - p) * 1020.0 + 3.0).ceil() as u64;
        floor.max((data * per_mille).div_ceil(1000)) as u32
    }

    /// The loss the first pass provides for: the upper quartile of what the
    /// receivers report (the largest when there are three or fewer). A
    /// receiver that really loses more needs as many symbols sent either
    /// way, and gets them from its NEEDS (one fresh symbol serves all),
    /// while provisioning for the largest figure let one receiver's
    /// transient burst inflate every later block for all (one lab run: a
    /// receiver reported 24% for a moment, and the sender put 1.35x the file
    /// on the wire instead of 1.11x).
    pub(super) fn planning_loss(&self) -> f64 {
        let mut losses: Vec<u32> = (self.peers.iter())
            .filter(|(id, p)| !p.done && !p.lost && !p.left && self.rate.follows(**id))
            .map(|(&id, p)| match self.rate.reference_loss(id) {
                // The loss the rate controller finds the path's own, not
                // what its own probing caused.
                Some(loss) if !self.rate.is_fixed() => (loss * 1e6) as u32,
                _ => p.loss_ppm,
            })
            .collect();
        losses.sort_unstable();
        let loss = match losses.len() {
            0 => 0,
            n => losses[(n * 3).div_ceil(4) - 1],
        };
        (f64::from(loss) / 1e6).min(0.5)
    }

    /// More repair for the last [`TAIL_BLOCKS`] blocks of the first pass:
    /// every receiver decodes them at the very end, when nothing else is
    /// left to overlap with. A receiver short of K+2 there waits a whole
    /// feedback round, and one below the fast margin decodes more slowly.
    /// So each receiver expects the fast margin plus two standard deviations
    /// of its loss (4 MiB blocks at 5%: 44 symbols, 0.1% of 64 MiB each).
    pub(super) fn tail_headroom(&self, data: u32) -> u32 {
        let p = self.planning_loss();
        let sd = (f64::from(data) * p * (1.0 - p)).sqrt();
        self.layout.decode_margin() + (2.0 * sd).ceil() as u32
    }
}
