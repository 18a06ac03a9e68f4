//! Which missing block to ask of which peer, and what to do with each
//! answer: the repair planning of one task, sans-IO.
//!
//! The driver asks [`RepairPlan::poll_ask`] for requests, giving it the
//! peers that announce each block (from presence), sends each to its peer,
//! and hands every answer to [`RepairPlan::handle_answer`]. The plan keeps
//! the queue of blocks, the blocks a peer said it does not hold (not asked
//! of it again), the blocks whose holders were all busy (retried after a
//! pause, [`RepairPlan::poll_timeout`]), and the peers that failed (dropped
//! for the rest of the task; past [`PlanConfig::max_failed_peers`] no peer
//! is asked any more). It is finished when nothing is out and nothing more
//! can be asked: whatever is still missing then is the origin's.
//!
//! Call order: [`RepairPlan::handle_answer`] for each answer,
//! [`RepairPlan::handle_timeout`] at [`RepairPlan::poll_timeout`], then
//! [`RepairPlan::poll_ask`] until `None`, then [`RepairPlan::poll_event`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::choose::Chooser;

/// Limits of a repair plan.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    /// Blocks asked of all peers at once.
    pub max_in_flight: usize,
    /// Blocks asked of one peer at once (its connection's pipeline).
    pub per_peer: u32,
    /// Peers that may fail (time out, refuse, serve a bad block) before no
    /// peer is asked any more: a stream of peers that announce what they
    /// cannot serve costs a few deadlines, not the task.
    pub max_failed_peers: usize,
    /// Times a block may find every holder busy before it is left for the
    /// origin.
    pub busy_tries: u32,
    /// How long blocks whose holders were all busy wait, when nothing else
    /// is out, before they are asked again.
    pub busy_pause: Duration,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 16,
            per_peer: 3,
            max_failed_peers: 4,
            busy_tries: 50,
            busy_pause: Duration::from_millis(100),
        }
    }
}

/// A request to send: block `block` from `peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask<P> {
    pub block: u32,
    pub peer: P,
}

/// What came of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The block arrived and matched its hash; `bytes` were read for it.
    Delivered { bytes: u64 },
    /// The peer does not hold it (a stale announcement): ask another.
    NotHeld,
    /// The peer is at its upload limit: ask again a little later.
    Busy,
    /// Timeout, connection error, malformed or corrupt symbols.
    Failed,
}

/// What the driver should hear of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanEvent<P> {
    /// `peer` failed and is asked nothing more in this task.
    PeerDropped(P),
    /// Enough peers failed that none is asked any more.
    NoMorePeers,
}

/// Rounds with nothing out and nothing asked before the plan gives up on
/// the blocks that wait for a holder (whose channels closed, or that are
/// busy): the rest is the origin's.
const IDLE_ROUNDS: u32 = 3;

/// The repair of one task's missing blocks.
pub struct RepairPlan<P> {
    cfg: PlanConfig,
    queue: VecDeque<u32>,
    /// Blocks whose holders were at their limit: asked again once an
    /// answer frees one.
    waiting: Vec<u32>,
    /// Blocks whose holders said they were busy.
    busy: Vec<u32>,
    busy_tries: HashMap<u32, u32>,
    /// (block, peer) pairs the peer said it does not hold.
    declined: HashSet<(u32, P)>,
    chooser: Chooser<P>,
    in_flight: usize,
    idle_rounds: u32,
    retry_at: Option<Instant>,
    delivered: u64,
    events: VecDeque<PlanEvent<P>>,
}

impl<P: Copy + Eq + Hash + Ord> RepairPlan<P> {
    /// A plan for the `missing` blocks, asked in that order.
    pub fn new(cfg: PlanConfig, missing: impl IntoIterator<Item = u32>) -> Self {
        let chooser = Chooser::new(cfg.per_peer);
        Self {
            cfg,
            queue: missing.into_iter().collect(),
            waiting: Vec::new(),
            busy: Vec::new(),
            busy_tries: HashMap::new(),
            declined: HashSet::new(),
            chooser,
            in_flight: 0,
            idle_rounds: 0,
            retry_at: None,
            delivered: 0,
            events: VecDeque::new(),
        }
    }

    /// The next request, given the peers that announce each block; `None`
    /// when nothing more can go out now (all slots taken, every block
    /// waiting for an answer or a pause, or the plan finished).
    pub fn poll_ask(&mut self, now: Instant, holders: impl Fn(u32) -> Vec<P>) -> Option<Ask<P>> {
        loop {
            if self.in_flight < self.cfg.max_in_flight
                && let Some(ask) = self.next_ask(&holders)
            {
                self.idle_rounds = 0;
                return Some(ask);
            }
            if self.in_flight > 0 || self.idle_rounds > IDLE_ROUNDS {
                return None;
            }
            if self.queue.is_empty() && !self.busy.is_empty() {
                // Only busy holders are left: ask again after a pause.
                self.retry_at.get_or_insert(now + self.cfg.busy_pause);
                return None;
            }
            // Nothing out: blocks whose holders were at their limit get
            // another round; a few rounds that send nothing end the plan.
            self.queue.extend(self.waiting.drain(..));
            self.idle_rounds += 1;
            if self.queue.is_empty() {
                self.idle_rounds = IDLE_ROUNDS + 1;
                return None;
            }
        }
    }

    /// The next queued block some usable holder can take now.
    fn next_ask(&mut self, holders: &impl Fn(u32) -> Vec<P>) -> Option<Ask<P>> {
        while let Some(block) = self.queue.pop_front() {
            let mut peers = holders(block);
            peers.retain(|p| !self.declined.contains(&(block, *p)));
            peers.sort();
            peers.dedup();
            if self.chooser.failures() >= self.cfg.max_failed_peers {
                peers.clear(); // the rest is the origin's
            }
            match self.chooser.pick(&peers) {
                Some(peer) => {
                    self.in_flight += 1;
                    return Some(Ask { block, peer });
                }
                // Holders at their limit: again when one answers.
                None if self.chooser.any_usable(&peers) => self.waiting.push(block),
                None => {} // nobody (left) to ask: the origin's
            }
        }
        None
    }

    /// The request could not be sent (the peer's connection is full or
    /// gone): it goes back to the queue; the driver stops asking this
    /// round.
    pub fn unsent(&mut self, ask: Ask<P>) {
        self.chooser.declined(ask.peer);
        self.in_flight = self.in_flight.saturating_sub(1);
        self.queue.push_back(ask.block);
    }

    /// Takes the answer to a request.
    pub fn handle_answer(&mut self, peer: P, block: u32, answer: Answer) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.queue.extend(self.waiting.drain(..));
        self.queue.extend(self.busy.drain(..));
        self.retry_at = None;
        self.idle_rounds = 0;
        match answer {
            Answer::Delivered { bytes } => {
                self.chooser.succeeded(peer, bytes);
                self.delivered += 1;
            }
            Answer::NotHeld => {
                self.chooser.declined(peer);
                self.declined.insert((block, peer));
                self.queue.push_back(block);
            }
            Answer::Busy => {
                self.chooser.declined(peer);
                let tries = self.busy_tries.entry(block).or_default();
                *tries += 1;
                if *tries < self.cfg.busy_tries {
                    self.busy.push(block);
                }
            }
            Answer::Failed => {
                // Every block asked of a failed peer fails with it: one event.
                if !self.chooser.is_dropped(&peer) {
                    self.chooser.failed(peer);
                    self.events.push_back(PlanEvent::PeerDropped(peer));
                    if self.chooser.failures() == self.cfg.max_failed_peers {
                        self.events.push_back(PlanEvent::NoMorePeers);
                    }
                } else {
                    self.chooser.failed(peer);
                }
                self.queue.push_back(block);
            }
        }
    }

    /// When blocks whose holders were busy are asked again.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.retry_at
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.queue.extend(self.busy.drain(..));
        }
    }

    pub fn poll_event(&mut self) -> Option<PlanEvent<P>> {
        self.events.pop_front()
    }

    /// Requests out, unanswered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Blocks delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Nothing is out and nothing more will be asked: what is still
    /// missing is the origin's.
    pub fn is_finished(&self) -> bool {
        self.in_flight == 0 && self.retry_at.is_none() && self.idle_rounds > IDLE_ROUNDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(missing: std::ops::Range<u32>) -> RepairPlan<u8> {
        RepairPlan::new(PlanConfig::default(), missing)
    }

    fn drain(
        p: &mut RepairPlan<u8>,
        now: Instant,
        holders: impl Fn(u32) -> Vec<u8>,
    ) -> Vec<Ask<u8>> {
        std::iter::from_fn(|| p.poll_ask(now, &holders)).collect()
    }

    #[test]
    fn spreads_blocks_over_holders_within_their_limits() {
        let now = Instant::now();
        let mut p = plan(0..10);
        let asks = drain(&mut p, now, |_| vec![1, 2]);
        // Two peers, three each.
        assert_eq!(asks.len(), 6);
        assert_eq!(asks.iter().filter(|a| a.peer == 1).count(), 3);
        assert!(!p.is_finished());
        for a in &asks {
            p.handle_answer(a.peer, a.block, Answer::Delivered { bytes: 10 });
        }
        let rest = drain(&mut p, now, |_| vec![1, 2]);
        assert_eq!(rest.len(), 4);
        for a in &rest {
            p.handle_answer(a.peer, a.block, Answer::Delivered { bytes: 10 });
        }
        assert_eq!(drain(&mut p, now, |_| vec![1, 2]), []);
        assert!(p.is_finished());
        assert_eq!(p.delivered(), 10);
    }

    #[test]
    fn a_block_not_held_goes_to_another_holder_and_never_back() {
        let now = Instant::now();
        let mut p = plan(0..1);
        let a = p.poll_ask(now, |_| vec![1, 2]).unwrap();
        p.handle_answer(a.peer, 0, Answer::NotHeld);
        let b = p.poll_ask(now, |_| vec![1, 2]).unwrap();
        assert_ne!(a.peer, b.peer);
        p.handle_answer(b.peer, 0, Answer::NotHeld);
        // Neither holds it: it is left for the origin.
        assert_eq!(p.poll_ask(now, |_| vec![1, 2]), None);
        assert!(p.is_finished());
    }

    #[test]
    fn busy_holders_are_asked_again_after_a_pause_then_given_up() {
        let now = Instant::now();
        let cfg = PlanConfig {
            busy_tries: 3,
            ..PlanConfig::default()
        };
        let mut p = RepairPlan::new(cfg, [7u32]);
        let mut t = now;
        for _ in 0..3 {
            let a = p.poll_ask(t, |_| vec![1]).expect("asked");
            p.handle_answer(a.peer, 7, Answer::Busy);
            if p.poll_ask(t, |_| vec![1]).is_some() {
                panic!("asked again without a pause");
            }
            match p.poll_timeout() {
                Some(at) => {
                    assert!(at > t, "a pause");
                    t = at;
                    p.handle_timeout(t);
                }
                None => break,
            }
        }
        assert_eq!(p.poll_ask(t, |_| vec![1]), None);
        assert!(p.is_finished(), "three busy answers leave it to the origin");
    }

    #[test]
    fn failed_peers_are_dropped_once_and_enough_of_them_stop_the_plan() {
        let now = Instant::now();
        let mut p = plan(0..20);
        for peer in 1..=4u8 {
            let a = p.poll_ask(now, |_| vec![peer]).unwrap();
            let b = p.poll_ask(now, |_| vec![peer]).unwrap();
            // Both asks out to the same peer fail; one event.
            p.handle_answer(peer, a.block, Answer::Failed);
            p.handle_answer(peer, b.block, Answer::Failed);
        }
        let events: Vec<_> = std::iter::from_fn(|| p.poll_event()).collect();
        assert_eq!(
            events,
            [
                PlanEvent::PeerDropped(1),
                PlanEvent::PeerDropped(2),
                PlanEvent::PeerDropped(3),
                PlanEvent::PeerDropped(4),
                PlanEvent::NoMorePeers
            ]
        );
        // Peer 9 never failed, but four others did: nobody is asked.
        assert_eq!(drain(&mut p, now, |_| vec![9]), []);
        assert!(p.is_finished());
    }

    #[test]
    fn blocks_nobody_holds_finish_the_plan_at_once() {
        let now = Instant::now();
        let mut p = plan(0..5);
        assert_eq!(p.poll_ask(now, |_| vec![]), None);
        assert!(p.is_finished());
        assert_eq!(p.in_flight(), 0);
    }
}
