//! The whole-subnet simulation's session: the representative's origin
//! fetch and its `Sender`, and a receiver's `Receiver` with its decode
//! jobs run in place.

use super::*;
use multicast::ReceiveFailure;

impl Subnet {
    pub(super) fn fetch_time(&self, b: u32) -> Instant {
        let len = self.pkg.layout.block_len(b) as f64;
        self.net.now + Duration::from_secs_f64(len * 8.0 / self.o.origin_bps as f64)
    }

    /// The representative's timers: an origin block landing, the start,
    /// the sender's own.
    pub(super) fn represent_timer(&mut self, i: usize) {
        let now = self.net.now;
        loop {
            let Phase::Represent(r) = &mut self.agents[i].phase else {
                return;
            };
            if r.fetch_at.is_none_or(|t| t > now) {
                break;
            }
            let b = r.fetching.pop_front().expect("a fetch is due");
            let next = r.fetching.front().copied();
            self.agents[i].origin_bytes += self.pkg.layout.block_len(b) as u64;
            self.block_done(i, b);
            let at = next.map(|b| self.fetch_time(b));
            if let Phase::Represent(r) = &mut self.agents[i].phase {
                r.fetch_at = at;
            }
        }
        let Phase::Represent(r) = &mut self.agents[i].phase else {
            return;
        };
        if r.sender.is_none() && now >= r.start {
            let object = SenderObject {
                layout: self.pkg.layout,
                hashes: self.pkg.hashes.iter().map(|h| Some(*h)).collect(),
                file_sha256: Some(self.pkg.content),
                name: "package.bin".into(),
            };
            let cfg = SenderConfig {
                rate_bps: self.o.rate_bps,
                rate_min_bps: self.o.rate_bps.min(1_000_000),
                slow_receivers: multicast::rate::SlowReceivers::Leave,
                ..SenderConfig::default()
            };
            r.sender = Some(Sender::new(now, cfg, r.session, object, FEEDBACK));
            self.agents[i].sent_sessions += 1;
        }
        if let Phase::Represent(r) = &mut self.agents[i].phase
            && let Some(s) = r.sender.as_mut()
        {
            s.handle_timeout(now);
        }
    }

    pub(super) fn pump_sender(&mut self, i: usize) -> bool {
        let now = self.net.now;
        let done = self.agents[i].done.clone();
        let Phase::Represent(r) = &mut self.agents[i].phase else {
            return false;
        };
        let Some(s) = r.sender.as_mut() else {
            return false;
        };
        let mut more = false;
        while let Some(job) = s.poll_job() {
            r.owed.push_back(job);
        }
        // Blocks are encoded as the origin fetch delivers them.
        while r.owed.front().is_some_and(|j| done[j.block as usize]) {
            let job = r.owed.pop_front().expect("checked");
            s.handle_batch(multicast::sim::encode(&self.pkg.plan, &self.pkg.data, &job));
            more = true;
        }
        let mut out = Vec::new();
        while let Some(bytes) = s.poll_transmit(now) {
            out.push(bytes.to_vec());
        }
        while s.poll_event().is_some() {}
        let finished = s.is_finished();
        more |= !out.is_empty();
        let n = self.agents.len();
        for bytes in out {
            self.net.multicast(i, DATA, bytes, 0..n);
        }
        let sending = (0..n).filter(|&j| !self.net.is_silenced(j) && self.agents[j].is_sending());
        self.most_sending = self.most_sending.max(sending.count());
        if finished {
            self.finish(i);
            return true;
        }
        more
    }

    pub(super) fn pump_receiver(&mut self, i: usize) -> bool {
        let now = self.net.now;
        let mut more = false;
        let mut verified = Vec::new();
        let mut out = Vec::new();
        let mut over = None;
        {
            let a = &mut self.agents[i];
            let Phase::Receive(rx) = &mut a.phase else {
                return false;
            };
            loop {
                while let Some(job) = rx.poll_job() {
                    let result = match job.run() {
                        DecodeOutcome::Verified { block, .. } => {
                            verified.push(block);
                            BlockResult::Written { block }
                        }
                        DecodeOutcome::NeedMore { block, collector } => {
                            BlockResult::NeedMore { block, collector }
                        }
                        DecodeOutcome::Corrupt { block } => BlockResult::Corrupt { block },
                    };
                    rx.handle_decoded(result);
                }
                let Some(ev) = rx.poll_event() else { break };
                more = true;
                match ev {
                    ReceiverEvent::SessionFound { .. } => {
                        // The manifest's hashes over the sender's, and what
                        // is held already.
                        rx.preset(&self.pkg.hashes, &a.done);
                        rx.preload(std::mem::take(&mut a.leftovers));
                    }
                    // Every block matched its manifest hash, so the whole
                    // file matches the content id.
                    ReceiverEvent::AllBlocksWritten => rx.handle_file_verified(now, true),
                    ReceiverEvent::Complete => over = Some(SessionEnd::All),
                    ReceiverEvent::Failed(f) => {
                        over = Some(match f {
                            ReceiveFailure::NoSender(_) => SessionEnd::NoShow,
                            ReceiveFailure::LeftBehind { .. } => SessionEnd::LeftBehind,
                            _ => SessionEnd::Incomplete,
                        })
                    }
                }
            }
            while let Some(t) = rx.poll_transmit() {
                out.push(t);
            }
            if over.is_some_and(|end| end != SessionEnd::All) {
                a.leftovers.extend(rx.take_collectors());
            }
        }
        for b in verified {
            self.agents[i].multicast_blocks += 1;
            self.block_done(i, b);
        }
        for t in out {
            more = true;
            self.send(i, DATA, t);
        }
        if let Some(end) = over {
            let representative = self.agents[i].following.map_or(0, |f| f.0);
            self.after_session(i, representative, end);
        }
        more
    }
}
