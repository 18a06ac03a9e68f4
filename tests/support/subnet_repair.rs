//! The whole-subnet simulation's repair: an agent's `RepairPlan` over the
//! peers presence says hold each block, the exchange with a peer in real
//! repair frames, and what follows the repair (the origin, or the
//! representative's fetch).

use super::*;

impl Subnet {
    pub(super) fn start_repair(&mut self, i: usize, then: AfterRepair) {
        let a = &mut self.agents[i];
        let missing: Vec<u32> = (0..a.done.len() as u32)
            .filter(|&b| !a.done[b as usize])
            .collect();
        let plan = Box::new(RepairPlan::new(PlanConfig::default(), missing));
        a.phase = Phase::Repair { plan, then };
    }

    /// The peers agent `i`'s presence says hold block `b` (confirmed by a
    /// second announcement, as the agent asks).
    pub(super) fn holders(&self, i: usize, b: u32) -> Vec<usize> {
        let prefix = &self.pkg.content[..8];
        self.agents[i]
            .presence
            .peers()
            .filter(|p| p.announce.repair_port != 0 && p.confirmed())
            .filter(|p| {
                p.announce
                    .held
                    .iter()
                    .any(|h| h.content == prefix && h.has(b))
            })
            .filter_map(|p| index_of(p.addr.ip()))
            .collect()
    }

    pub(super) fn pump_repair(&mut self, i: usize) -> bool {
        let now = self.net.now;
        let mut asks = Vec::new();
        {
            let holders: Vec<Vec<usize>> = (0..self.pkg.layout.block_count())
                .map(|b| self.holders(i, b))
                .collect();
            let Phase::Repair { plan, .. } = &mut self.agents[i].phase else {
                return false;
            };
            while let Some(ask) = plan.poll_ask(now, |b| holders[b as usize].clone()) {
                asks.push(ask);
            }
        }
        for ask in &asks {
            self.tokens += 1;
            let token = self.tokens;
            let len = self.pkg.layout.block_len(ask.block) as f64;
            let at = if self.net.is_silenced(ask.peer) {
                now + self.o.repair_deadline
            } else {
                now + Duration::from_millis(1)
                    + Duration::from_secs_f64(len * 8.0 / self.o.repair_bps as f64)
            };
            self.agents[i].asked.push((token, ask.peer, ask.block));
            self.net.reply(at, i, token);
        }
        let Phase::Repair { plan, .. } = &self.agents[i].phase else {
            return false;
        };
        if plan.is_finished() {
            self.after_repair(i);
            return true;
        }
        !asks.is_empty()
    }

    /// The repair exchange `token` of agent `i` ends: the peer's answer,
    /// with the real frames both ways.
    pub(super) fn on_reply(&mut self, i: usize, token: u64) {
        let a = &mut self.agents[i];
        let Some(k) = a.asked.iter().position(|(t, ..)| *t == token) else {
            return;
        };
        let (_, peer, block) = a.asked.swap_remove(k);
        let answer = if self.net.is_silenced(peer) {
            Answer::Failed
        } else if !self.agents[peer].done[block as usize] {
            Answer::NotHeld
        } else {
            self.exchange(i, peer, block)
        };
        let a = &mut self.agents[i];
        if let Answer::Delivered { bytes } = answer {
            a.peer_bytes += bytes;
        }
        if let Phase::Repair { plan, .. } = &mut a.phase {
            plan.handle_answer(peer, block, answer);
        }
    }

    /// Agent `i` asks `peer` (which holds it) for `block`: the NEED frame,
    /// the peer's symbols, the decode and hash check.
    pub(super) fn exchange(&mut self, i: usize, peer: usize, block: u32) -> Answer {
        let layout = self.pkg.layout;
        let a = &mut self.agents[i];
        let held = a
            .leftovers
            .iter()
            .position(|(b, _)| *b == block)
            .map(|k| a.leftovers.swap_remove(k).1);
        let mut fetch =
            repair::BlockFetch::new(layout, block, self.pkg.hashes[block as usize], held);
        let roundtrip = |f: &repair::Frame| {
            let mut buf = Vec::new();
            repair::frame::encode(f, &mut buf);
            repair::frame::decode(&buf, 1 << 20)
                .expect("a frame the code made decodes")
                .expect("whole")
                .0
        };
        let repair::Frame::Need {
            block: b,
            held,
            need,
            highest_esi,
            ..
        } = roundtrip(&fetch.request(self.pkg.content))
        else {
            panic!("a request is a NEED");
        };
        let want = Want {
            block: b,
            held,
            need,
            highest_esi,
        };
        let plan = Serving::needs_plan(&want).then_some(&self.pkg.plan);
        let mut serving =
            Serving::new(&layout, plan, want, self.pkg.block(b).to_vec(), peer as u32);
        while let Some(f) = serving.next_frame() {
            match fetch.handle(roundtrip(&f)) {
                repair::FetchStep::More => {}
                repair::FetchStep::Decode => match fetch.decode() {
                    Ok(bytes) => {
                        assert_eq!(bytes, self.pkg.block(block), "a verified block");
                        self.block_done(i, block);
                        return Answer::Delivered { bytes: fetch.bytes };
                    }
                    Err(repair::fetch::Rejected::NeedMore) => serving.extend(2),
                    Err(repair::fetch::Rejected::Corrupt) => return Answer::Failed,
                },
                repair::FetchStep::Elsewhere => return Answer::NotHeld,
                repair::FetchStep::Busy => return Answer::Busy,
                repair::FetchStep::Misbehaved(_) => return Answer::Failed,
            }
        }
        Answer::Failed
    }

    pub(super) fn after_repair(&mut self, i: usize) {
        let Phase::Repair { then, .. } = std::mem::replace(&mut self.agents[i].phase, Phase::Idle)
        else {
            return;
        };
        match then {
            AfterRepair::Origin => {
                for b in 0..self.pkg.layout.block_count() {
                    if !self.agents[i].done[b as usize] {
                        self.agents[i].origin_bytes += self.pkg.layout.block_len(b) as u64;
                        self.block_done(i, b);
                    }
                }
                self.finish(i);
            }
            AfterRepair::Represent { session, start } => {
                let a = &self.agents[i];
                let fetching: VecDeque<u32> = (0..a.done.len() as u32)
                    .filter(|&b| !a.done[b as usize])
                    .collect();
                let mut r = Represent {
                    session,
                    start,
                    fetching,
                    fetch_at: None,
                    sender: None,
                    owed: VecDeque::new(),
                };
                r.fetch_at = r.fetching.front().map(|&b| self.fetch_time(b));
                self.agents[i].phase = Phase::Represent(Box::new(r));
            }
        }
    }
}
