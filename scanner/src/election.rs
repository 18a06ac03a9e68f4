//! Electing one representative per content id per subnet, as a sans-IO
//! state machine.
//!
//! Protocol flow (one machine per agent per content id)
//!
//! 1. Discover: listen on the control group for a discovery window (plus
//!    up to half of it in random jitter, so agents started together do not
//!    all claim at once). An `Offer` for the content makes this agent a
//!    receiver of that representative. A `Claim` better than ours makes it
//!    defer.
//! 2. Claim: send a `Claim` with our standing four times over the contention
//!    window (one lost datagram must not make two winners). A better claim
//!    or offer heard meanwhile: defer. The window over with no better one
//!    heard: representative.
//! 3. Defer: wait for the better agent's `Offer`; none within the
//!    contention window plus two announce intervals (it died, or its claims
//!    reached us but nothing else): discover again. A claimant deferred to
//!    twice in vain is no candidate: its claims are ignored from then on
//!    (its offers are not), so one that claims and never offers stalls the
//!    election for two rounds, not forever.
//! 4. Representative: announce an `Offer` (session, data group, time left to
//!    the start) at once, twice more within half an interval, then every
//!    interval. Hearing a better representative's offer (a healed
//!    partition): step down and follow it. Since the start lies at least
//!    the startup delay ahead, two representatives resolve before either
//!    sends, unless the delay is shorter than an interval.
//! 5. Follow: a representative's offers keep coming; silence for three
//!    intervals means it is gone, and the election starts again (with a
//!    short discovery window: everyone is already waiting).
//!
//! Offers that no agent could make (a data group other than the one the
//! content id gives, a start beyond the startup delay) are dropped and
//! their reason returned, to be counted. A representative whose session
//! never showed up on the data group is abandoned by the agent
//! ([`Election::abandon`]): its claims and offers are ignored from then on
//! and the election starts again. Once two candidates have wasted the
//! election's time so (or were replaced by better ones before they sent),
//! claims and offers count only from nodes presence vouches for
//! ([`Election::handle_frame_vouched`]).
//!
//! Standings are frozen when the machine starts, so every agent compares
//! the same numbers. Call order: [`Election::handle_frame`] for each claim
//! or offer for this content, [`Election::handle_timeout`] at
//! [`Election::poll_timeout`], then drain [`Election::poll_transmit`] and
//! [`Election::poll_event`].

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use multicast::rng::SplitMix64;
use multicast::transmit::{Dest, Transmit};
use multicast::wire::{Claim, Digest, Frame, Offer, Standing};

/// Timing of an election.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// How long to listen for a representative before claiming.
    pub discovery: Duration,
    /// How long claims run before the best claimant takes the role.
    pub contention: Duration,
    /// How often a representative announces its offer.
    pub announce: Duration,
    /// From winning to the start of the multicast.
    pub startup_delay: Duration,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        Self {
            discovery: Duration::from_secs(2),
            contention: Duration::from_secs(1),
            announce: Duration::from_secs(1),
            startup_delay: Duration::from_secs(60),
        }
    }
}

/// Why an offer was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadOffer {
    #[error("an offer of a data group other than the content's")]
    Group,
    #[error("an offer to start later than the task's startup delay")]
    Start,
    #[error(
        "an offer from a node presence does not vouch for, after representatives that never sent"
    )]
    Unvouched,
}

/// Where this agent stands in the election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Discovering,
    Claiming,
    Deferring,
    Representative,
    Receiver,
}

/// What the election decided; the agent acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElectionEvent {
    /// This agent is the representative: fetch, then multicast `session` to
    /// `group` from `start`.
    Elected {
        session: u64,
        group: SocketAddrV4,
        start: Instant,
    },
    /// Another agent is (or became) the representative: receive `session`
    /// on `group`; it starts at `start`.
    Follow {
        representative: u64,
        session: u64,
        group: SocketAddrV4,
        start: Instant,
    },
    /// This agent was representative and a better one took over.
    SteppedDown,
    /// The representative fell silent; a new election runs.
    RepresentativeLost { representative: u64 },
}

#[derive(Clone, Copy, Debug)]
enum State {
    Discover {
        until: Instant,
    },
    Claim {
        until: Instant,
        next: Instant,
    },
    Defer {
        until: Instant,
        /// The node whose better claim this agent defers to.
        to: u64,
    },
    Represent {
        start: Instant,
        next: Instant,
        sent: u32,
        last_offer: Instant,
    },
    Follow {
        rep: Standing,
        last_heard: Instant,
        next_query: Option<Instant>,
    },
}

/// The election for one content id, on one agent.
pub struct Election {
    cfg: ElectionConfig,
    content: Digest,
    me: Standing,
    session: u64,
    group: SocketAddrV4,
    state: State,
    rng: SplitMix64,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<ElectionEvent>,
    /// The session of the representative followed last, to tell a new
    /// offer from a repeated one.
    following: Option<(u64, u64)>,
    /// Claimants this agent deferred to that never offered, with how many
    /// times; past [`DEFERS_BEFORE_IGNORING`] their claims are ignored.
    no_shows: Vec<(u64, u32)>,
    /// Representatives whose offers were not followed by a session: their
    /// claims and offers are ignored for this election.
    abandoned: Vec<u64>,
    /// Followed representatives replaced by a better one before they sent
    /// (one is a healed partition; a stream of them is forged).
    replaced: u32,
}

/// A better claimant that has twice had its contention and two announce
/// intervals to offer, and did not, is not a candidate: it crashed, cannot
/// send offers, or claims to stall the election. Its offers still count.
const DEFERS_BEFORE_IGNORING: u32 = 2;
/// Candidates that wasted an election's time (no-shows and abandoned
/// representatives) before it takes claims and offers only from nodes
/// presence vouches for.
const WASTED_BEFORE_WARY: usize = 2;
/// Claimants remembered as no-shows at most (each stalls us for seconds, so
/// a few suffice; a flood of forged node ids is for the fleet key to stop).
const MAX_NO_SHOWS: usize = 64;

impl Election {
    /// `session` and `group` are what this agent would announce if it won.
    pub fn new(
        cfg: ElectionConfig,
        content: Digest,
        me: Standing,
        session: u64,
        group: SocketAddrV4,
        now: Instant,
        seed: u64,
    ) -> Self {
        let mut rng = SplitMix64(seed ^ me.node ^ 0x2545_F491_4F6C_DD1D);
        let until = now + cfg.discovery + cfg.discovery.mul_f64(rng.unit() / 2.0);
        Self {
            cfg,
            content,
            me,
            session,
            group,
            state: State::Discover { until },
            rng,
            out: VecDeque::new(),
            events: VecDeque::new(),
            following: None,
            no_shows: Vec::new(),
            abandoned: Vec::new(),
            replaced: 0,
        }
    }

    /// The representative `node` offered the content but sent nothing: it
    /// is no candidate any more, and if it was followed the election starts
    /// again (with a short window: everyone is waiting).
    pub fn abandon(&mut self, now: Instant, node: u64) {
        if !self.abandoned.contains(&node) && self.abandoned.len() < MAX_NO_SHOWS {
            self.abandoned.push(node);
        }
        if matches!(self.state, State::Follow { rep, .. } if rep.node == node) {
            self.following = None;
            self.rediscover(now, true);
        }
    }

    /// Replaces this agent's standing (it holds more of the content than
    /// when the election began); used when a lost representative starts a
    /// new election, before any claim of it goes out.
    pub fn set_standing(&mut self, me: Standing) {
        self.me = me;
    }

    pub fn standing(&self) -> Standing {
        self.me
    }

    pub fn role(&self) -> Role {
        match self.state {
            State::Discover { .. } => Role::Discovering,
            State::Claim { .. } => Role::Claiming,
            State::Defer { .. } => Role::Deferring,
            State::Represent { .. } => Role::Representative,
            State::Follow { .. } => Role::Receiver,
        }
    }

    /// The multicast start, when this agent is the representative.
    pub fn start(&self) -> Option<Instant> {
        match self.state {
            State::Represent { start, .. } => Some(start),
            _ => None,
        }
    }

    /// Takes a claim or offer heard on the control group (any content; other
    /// contents are ignored). An offer for this content that no agent of
    /// ours could have made is dropped: the reason comes back, to count.
    pub fn handle_frame(&mut self, now: Instant, frame: &Frame<'_>) -> Result<(), BadOffer> {
        self.handle_frame_vouched(now, frame, true)
    }

    /// [`Election::handle_frame`], saying whether presence vouches for the
    /// claim's or offer's node (a peer confirmed by more than one
    /// announcement, from the address the frame came from). Once two
    /// candidates have wasted this election's time (claimed and never
    /// offered, offered and never sent, or were replaced by a better one
    /// before they sent), only vouched-for nodes count: a stream of forged
    /// node ids cannot stall it for ever.
    pub fn handle_frame_vouched(
        &mut self,
        now: Instant,
        frame: &Frame<'_>,
        vouched: bool,
    ) -> Result<(), BadOffer> {
        let wasted = self.abandoned.len() + self.no_shows.len() + self.replaced as usize;
        let wary = wasted >= WASTED_BEFORE_WARY;
        match frame {
            Frame::Claim(Claim { standing, .. }) | Frame::Offer(Offer { standing, .. })
                if self.abandoned.contains(&standing.node) => {}
            Frame::Offer(o) if wary && !vouched && o.content == self.content => {
                return Err(BadOffer::Unvouched);
            }
            Frame::Claim(_) if wary && !vouched => {}
            Frame::Claim(c) if c.content == self.content && c.standing != self.me => {
                self.heard_claim(now, c.standing)
            }
            Frame::Offer(o) if o.content == self.content && o.standing != self.me => {
                self.check_offer(o)?;
                self.heard_offer(now, o)
            }
            _ => {}
        }
        Ok(())
    }

    /// Every agent derives the data group from the content id and starts
    /// within the task's startup delay: an offer of another group (a
    /// unicast address, a group nobody joins) or of a start beyond that
    /// delay would only park or fail the subnet.
    fn check_offer(&self, o: &Offer) -> Result<(), BadOffer> {
        if o.data_group != self.group.ip().octets() || o.data_port != self.group.port() {
            return Err(BadOffer::Group);
        }
        let slack = self.cfg.announce * 2;
        if Duration::from_millis(u64::from(o.start_in_ms)) > self.cfg.startup_delay + slack {
            return Err(BadOffer::Start);
        }
        Ok(())
    }

    fn heard_claim(&mut self, now: Instant, other: Standing) {
        if let State::Represent { last_offer, .. } = self.state {
            // Someone lost track of us (or just arrived): answer at once, so
            // it follows instead of becoming a second representative; one
            // answer serves every claim within an eighth of an interval.
            if now >= last_offer + self.cfg.announce / 8 {
                self.send_offer(now);
            }
            return;
        }
        if other < self.me {
            return; // we would beat it; our own claims will tell it
        }
        if self
            .no_shows
            .iter()
            .any(|&(n, c)| n == other.node && c >= DEFERS_BEFORE_IGNORING)
        {
            return;
        }
        match self.state {
            State::Discover { .. } | State::Claim { .. } => {
                self.state = State::Defer {
                    until: now + self.cfg.contention + self.cfg.announce * 2,
                    to: other.node,
                };
            }
            State::Defer { .. } | State::Represent { .. } | State::Follow { .. } => {}
        }
    }

    fn heard_offer(&mut self, now: Instant, o: &Offer) {
        let start = now + Duration::from_millis(u64::from(o.start_in_ms));
        let group = SocketAddrV4::new(Ipv4Addr::from(o.data_group), o.data_port);
        match self.state {
            State::Represent { .. } if o.standing < self.me => {
                // A worse representative (a healed partition): answer at
                // once so it steps down within this interval.
                self.send_offer(now);
                return;
            }
            State::Represent { .. } => {
                self.events.push_back(ElectionEvent::SteppedDown);
            }
            State::Follow { rep, .. } if o.standing < rep => {
                return; // a worse representative that has not yet heard of ours
            }
            State::Follow { rep, .. } if rep.node != o.standing.node => {
                self.replaced = self.replaced.saturating_add(1);
            }
            _ => {}
        }
        self.state = State::Follow {
            rep: o.standing,
            last_heard: now,
            next_query: None,
        };
        let key = (o.standing.node, o.session);
        if self.following != Some(key) {
            self.following = Some(key);
            self.events.push_back(ElectionEvent::Follow {
                representative: o.standing.node,
                session: o.session,
                group,
                start,
            });
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Discover { until } if now >= until => {
                self.state = State::Claim {
                    until: now + self.cfg.contention,
                    next: now,
                };
                self.handle_timeout(now);
            }
            State::Claim { until, .. } if now >= until => {
                let start = now + self.cfg.startup_delay;
                self.state = State::Represent {
                    start,
                    next: now,
                    sent: 0,
                    last_offer: now,
                };
                self.events.push_back(ElectionEvent::Elected {
                    session: self.session,
                    group: self.group,
                    start,
                });
                self.handle_timeout(now);
            }
            State::Claim { until, next } if now >= next => {
                self.queue(&Frame::Claim(Claim {
                    content: self.content,
                    standing: self.me,
                }));
                self.state = State::Claim {
                    until,
                    next: now + self.cfg.contention / 4,
                };
            }
            State::Defer { until, to } if now >= until => {
                self.no_show(to);
                self.rediscover(now, false)
            }
            State::Represent { next, .. } if now >= next => self.send_offer(now),
            State::Follow {
                rep, last_heard, ..
            } if now >= last_heard + self.silence() => {
                self.events.push_back(ElectionEvent::RepresentativeLost {
                    representative: rep.node,
                });
                self.following = None;
                self.rediscover(now, true);
            }
            State::Follow {
                rep,
                last_heard,
                next_query,
            } if now >= next_query.unwrap_or(last_heard + self.suspect()) => {
                // Two offers missed: ask (a claim makes the representative
                // answer with an offer) before declaring it gone, so that
                // loss alone does not start an election.
                self.queue(&Frame::Claim(Claim {
                    content: self.content,
                    standing: self.me,
                }));
                self.state = State::Follow {
                    rep,
                    last_heard,
                    next_query: Some(now + self.cfg.announce / 4),
                };
            }
            _ => {}
        }
    }

    /// Two announce intervals and a margin: time to ask.
    fn suspect(&self) -> Duration {
        self.cfg.announce * 2 + self.cfg.announce / 4
    }

    /// Three announce intervals, and half of one for the third offer to
    /// arrive: silence beyond it means the representative is gone.
    fn silence(&self) -> Duration {
        self.cfg.announce * 3 + self.cfg.announce / 2
    }

    /// Counts a claimant that was deferred to and did not offer.
    fn no_show(&mut self, node: u64) {
        if let Some((_, c)) = self.no_shows.iter_mut().find(|(n, _)| *n == node) {
            *c += 1;
        } else if self.no_shows.len() < MAX_NO_SHOWS {
            self.no_shows.push((node, 1));
        }
    }

    fn rediscover(&mut self, now: Instant, short: bool) {
        let base = if short {
            self.cfg.announce
        } else {
            self.cfg.discovery
        };
        let until = now + base + base.mul_f64(self.rng.unit() / 2.0);
        self.state = State::Discover { until };
    }

    fn send_offer(&mut self, now: Instant) {
        let State::Represent { start, sent, .. } = self.state else {
            return;
        };
        let start_in = start.saturating_duration_since(now).as_millis();
        self.queue(&Frame::Offer(Offer {
            content: self.content,
            standing: self.me,
            session: self.session,
            data_group: self.group.ip().octets(),
            data_port: self.group.port(),
            start_in_ms: start_in.min(u128::from(u32::MAX)) as u32,
        }));
        // Three offers in the first half interval: a new representative is
        // heard at once even at high loss.
        let gap = if sent < 2 {
            self.cfg.announce / 4
        } else {
            self.cfg.announce
        };
        self.state = State::Represent {
            start,
            next: now + gap,
            sent: sent + 1,
            last_offer: now,
        };
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(match self.state {
            State::Discover { until } => until,
            State::Claim { until, next } => until.min(next),
            State::Defer { until, .. } => until,
            State::Represent { next, .. } => next,
            State::Follow {
                last_heard,
                next_query,
                ..
            } => {
                (last_heard + self.silence()).min(next_query.unwrap_or(last_heard + self.suspect()))
            }
        })
    }

    /// Claims and offers, always to the control group.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        Some(Transmit {
            dest: Dest::Group,
            bytes: self.out.pop_front()?,
        })
    }

    pub fn poll_event(&mut self) -> Option<ElectionEvent> {
        self.events.pop_front()
    }

    fn queue(&mut self, frame: &Frame<'_>) {
        self.out.push_back(frame.encode(0));
    }
}
