//! Representative election over a simulated subnet with a virtual clock.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use multicast::sim::{Net, Wake, addr_of};
use multicast::wire::{self, Standing};
use somcast::election::{Election, ElectionConfig, ElectionEvent, Role};

use multicast::rng::SplitMix64 as Rng;

const CONTENT: [u8; 32] = [0xC0; 32];
/// The control group's port.
const CONTROL: u16 = 7479;

fn config() -> ElectionConfig {
    ElectionConfig {
        startup_delay: Duration::from_secs(3),
        ..ElectionConfig::default()
    }
}

/// The agents on the shared simulated subnet; one more node, the last,
/// is a forger outside them.
struct Subnet {
    agents: Vec<Election>,
    net: Net,
    /// Which side of a partition each agent is on; frames cross only
    /// within a side while `partitioned`.
    side: Vec<u8>,
    partitioned: bool,
    /// Longest stretch with two or more representatives past their start.
    worst_overlap: Duration,
    overlap_since: Option<Instant>,
    events: Vec<(usize, ElectionEvent)>,
}

impl Subnet {
    fn new(n: usize, loss: f64, seed: u64, spread: Duration) -> Self {
        let mut rng = Rng(seed);
        let mut net = Net::new(n + 1, loss, seed ^ 0xABCD);
        let t0 = net.t0;
        let mut agents = Vec::new();
        for i in 0..n {
            let standing = Standing {
                preference: 0,
                held_permille: 0,
                wired: rng.next_u64() % 4 != 0,
                free_disk_gib: (rng.next_u64() % 500) as u32,
                uptime_h: (rng.next_u64() % 100) as u32,
                node: rng.next_u64(),
            };
            let start = t0 + spread.mul_f64(rng.unit());
            let group = SocketAddrV4::new(Ipv4Addr::new(239, 192, 9, 9), 7400);
            let e = Election::new(
                config(),
                CONTENT,
                standing,
                i as u64,
                group,
                start,
                rng.next_u64(),
            );
            agents.push(e);
            net.wake_at(i, Some(start));
        }
        Subnet {
            agents,
            net,
            side: vec![0; n],
            partitioned: false,
            worst_overlap: Duration::ZERO,
            overlap_since: None,
            events: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        self.net.now
    }

    /// A frame from outside the agents, heard by every one of them at `at`.
    fn inject(&mut self, at: Instant, bytes: Vec<u8>) {
        let forger = self.agents.len();
        self.net
            .multicast_at(at, forger, CONTROL, bytes, 0..self.agents.len());
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.net.now + d;
        let forger = addr_of(self.agents.len());
        while let Some(wake) = self.net.next(until) {
            let at = self.net.now;
            let i = match wake {
                Wake::Timer(i) => {
                    if self.agents[i].poll_timeout().is_some_and(|t| t <= at) {
                        self.agents[i].handle_timeout(at);
                    }
                    i
                }
                Wake::Datagram(d) => {
                    let f = wire::decode(&d.bytes).unwrap().frame;
                    // Presence vouches for the agents, not for what the
                    // test injects (a forger's frames may be refused).
                    let forged = d.from.ip() == forger;
                    let r = self.agents[d.to].handle_frame_vouched(at, &f, !forged);
                    assert!(forged || r.is_ok(), "agents make valid offers: {r:?}");
                    d.to
                }
                Wake::Reply { to, .. } => to,
            };
            self.after(i);
            self.track_overlap();
        }
        self.track_overlap();
    }

    fn after(&mut self, i: usize) {
        while let Some(ev) = self.agents[i].poll_event() {
            self.events.push((i, ev));
        }
        while let Some(multicast::transmit::Transmit { bytes, .. }) = self.agents[i].poll_transmit()
        {
            let (side, partitioned) = (self.side[i], self.partitioned);
            let to = (0..self.agents.len())
                .filter(|&j| j != i && !(partitioned && self.side[j] != side))
                .collect::<Vec<_>>();
            self.net.multicast(i, CONTROL, bytes, to);
        }
        let at = self.agents[i].poll_timeout();
        self.net.wake_at(i, at);
    }

    fn sending(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| a.start().is_some_and(|s| s <= self.net.now))
            .count()
    }

    fn track_overlap(&mut self) {
        if self.sending() >= 2 {
            let now = self.net.now;
            let since = *self.overlap_since.get_or_insert(now);
            self.worst_overlap = self.worst_overlap.max(now - since);
        } else {
            self.overlap_since = None;
        }
    }

    fn representatives(&self) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| self.agents[i].role() == Role::Representative)
            .collect()
    }

    /// One of the agents represents, and every other one follows it (its
    /// last Follow names that agent).
    fn assert_one_of_them_represents(&self) {
        let reps = self.representatives();
        assert_eq!(reps.len(), 1, "events: {:?}", self.events);
        let rep = self.agents[reps[0]].standing().node;
        for i in (0..self.agents.len()).filter(|&i| i != reps[0]) {
            assert_eq!(self.agents[i].role(), Role::Receiver, "agent {i}");
            let followed = self.events.iter().rev().find_map(|(j, e)| match e {
                ElectionEvent::Follow { representative, .. } if *j == i => Some(*representative),
                _ => None,
            });
            assert_eq!(followed, Some(rep), "agent {i} follows someone else");
        }
    }
}

#[test]
fn fifty_agents_at_20_percent_loss_elect_one_representative_in_1000_runs() {
    let announce = config().announce;
    let mut one = 0;
    let mut worst = Duration::ZERO;
    for seed in 0..1000u64 {
        // Half the runs start every agent at the same instant, half spread
        // over two seconds (a task reaching agents one by one).
        let spread = if seed % 2 == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(2)
        };
        let mut s = Subnet::new(50, 0.20, seed, spread);
        s.run_for(Duration::from_secs(12));
        let reps = s.representatives();
        let followers = (0..50)
            .filter(|&i| s.agents[i].role() == Role::Receiver)
            .count();
        if reps.len() == 1 && followers == 49 {
            one += 1;
        }
        worst = worst.max(s.worst_overlap);
    }
    eprintln!("one representative in {one} of 1000 runs; longest double sending {worst:?}");
    assert!(one >= 990, "one representative in only {one} of 1000 runs");
    assert!(
        worst <= announce,
        "two representatives sent at once for {worst:?}"
    );
}

#[test]
fn the_best_standing_wins_without_loss() {
    let mut s = Subnet::new(50, 0.0, 7, Duration::ZERO);
    s.run_for(Duration::from_secs(6));
    let reps = s.representatives();
    assert_eq!(reps.len(), 1);
    let best = (0..50).max_by_key(|&i| s.agents[i].standing()).unwrap();
    assert_eq!(reps[0], best, "the representative is not the best standing");
    let followers = (0..50)
        .filter(|&i| s.agents[i].role() == Role::Receiver)
        .count();
    assert_eq!(followers, 49);
    let elected = s
        .events
        .iter()
        .filter(|(_, e)| matches!(e, ElectionEvent::Elected { .. }))
        .count();
    assert_eq!(elected, 1, "nobody else ever thought it had won");
}

#[test]
fn a_healed_partition_resolves_to_the_better_representative_within_one_interval() {
    let mut s = Subnet::new(20, 0.0, 11, Duration::ZERO);
    for i in 10..20 {
        s.side[i] = 1;
    }
    s.partitioned = true;
    s.run_for(Duration::from_secs(8));
    let reps = s.representatives();
    assert_eq!(reps.len(), 2, "one per side while partitioned");
    s.partitioned = false;
    s.worst_overlap = Duration::ZERO;
    s.overlap_since = None;
    s.run_for(config().announce + Duration::from_millis(10));
    assert_eq!(s.representatives().len(), 1, "still two after one interval");
    let stepped = s
        .events
        .iter()
        .filter(|(_, e)| *e == ElectionEvent::SteppedDown)
        .count();
    assert_eq!(stepped, 1);
    s.run_for(Duration::from_secs(3));
    assert_eq!(s.representatives().len(), 1);
    let followers = (0..20)
        .filter(|&i| s.agents[i].role() == Role::Receiver)
        .count();
    assert_eq!(followers, 19);
}

#[test]
fn a_silent_representative_is_replaced_after_three_intervals() {
    let mut s = Subnet::new(10, 0.0, 3, Duration::ZERO);
    s.run_for(Duration::from_secs(6));
    let reps = s.representatives();
    assert_eq!(reps.len(), 1);
    let dead = reps[0];
    // Cut it off: none of its frames arrive any more.
    s.side[dead] = 1;
    s.partitioned = true;
    s.run_for(Duration::from_secs(8));
    let alive: Vec<usize> = s
        .representatives()
        .into_iter()
        .filter(|&i| i != dead)
        .collect();
    assert_eq!(alive.len(), 1, "the others elected a new representative");
    assert!(
        s.events
            .iter()
            .any(|(_, e)| matches!(e, ElectionEvent::RepresentativeLost { .. }))
    );
}

/// One agent's election, alone: its start, its data group and the machine.
fn lone_agent() -> (Instant, SocketAddrV4, Election) {
    let t0 = Instant::now();
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 193, 0xC0, 0xC0), 7400);
    let me = Standing {
        node: 1,
        ..Standing::default()
    };
    (
        t0,
        group,
        Election::new(config(), CONTENT, me, 11, group, t0, 1),
    )
}

/// A forged offer for the content with a unicast data group, another
/// group, or a start beyond the startup delay is dropped with its reason;
/// the agent goes on to elect as if it had not been sent.
#[test]
fn impossible_offers_are_dropped_and_the_election_goes_on() {
    use somcast::election::BadOffer;
    let (t0, group, mut e) = lone_agent();
    let offer = |data_group: [u8; 4], start_in_ms: u32| {
        wire::Frame::Offer(wire::Offer {
            content: CONTENT,
            standing: Standing {
                node: 99,
                preference: 255,
                ..Standing::default()
            },
            session: 5,
            data_group,
            data_port: 7400,
            start_in_ms,
        })
    };
    assert_eq!(
        e.handle_frame(t0, &offer([10, 0, 0, 1], 0)),
        Err(BadOffer::Group)
    );
    assert_eq!(
        e.handle_frame(t0, &offer([239, 193, 1, 1], 0)),
        Err(BadOffer::Group)
    );
    assert_eq!(
        e.handle_frame(t0, &offer(group.ip().octets(), u32::MAX)),
        Err(BadOffer::Start)
    );
    assert_eq!(e.poll_event(), None);
    assert_eq!(e.role(), Role::Discovering);
    // A possible offer is followed.
    assert_eq!(
        e.handle_frame(t0, &offer(group.ip().octets(), 2000)),
        Ok(())
    );
    assert!(matches!(
        e.poll_event(),
        Some(ElectionEvent::Follow { session: 5, .. })
    ));
}

/// A claimant with the best possible standing that repeats its claim and
/// never offers does not keep the subnet electing: after it has twice had
/// its chance, its claims are ignored and the agents elect one of them.
#[test]
fn a_claimant_that_never_offers_stalls_the_election_only_briefly() {
    let mut s = Subnet::new(5, 0.0, 9, Duration::ZERO);
    let forged = wire::Frame::Claim(wire::Claim {
        content: CONTENT,
        standing: common::best_standing(u64::MAX),
    })
    .encode(0);
    let t0 = s.now();
    for k in 0..160u32 {
        s.inject(t0 + Duration::from_millis(250) * k, forged.clone());
    }
    s.run_for(Duration::from_secs(25));
    assert_eq!(s.representatives().len(), 1, "events: {:?}", s.events);
    let receivers = (0..5)
        .filter(|&i| s.agents[i].role() == Role::Receiver)
        .count();
    assert_eq!(receivers, 4);
}

/// A followed representative that never sent its session is abandoned:
/// the agent elects again and ignores that node's offers from then on.
#[test]
fn an_abandoned_representative_is_not_followed_again() {
    let (t0, group, mut e) = lone_agent();
    let offer = wire::Frame::Offer(wire::Offer {
        content: CONTENT,
        standing: Standing {
            node: 99,
            preference: 255,
            ..Standing::default()
        },
        session: 5,
        data_group: group.ip().octets(),
        data_port: 7400,
        start_in_ms: 1000,
    });
    e.handle_frame(t0, &offer).unwrap();
    assert_eq!(e.role(), Role::Receiver);
    assert!(matches!(e.poll_event(), Some(ElectionEvent::Follow { .. })));
    e.abandon(t0, 99);
    assert_eq!(e.role(), Role::Discovering);
    e.handle_frame(t0, &offer).unwrap();
    assert_eq!(e.role(), Role::Discovering, "its offer is ignored now");
    assert_eq!(e.poll_event(), None);
}

/// Claimants with the best standing under a fresh node id every 250 ms,
/// none of them known to presence: once two have wasted the election's
/// time, claims count only from vouched-for nodes and the agents elect one
/// of their own.
#[test]
fn a_stream_of_claimants_with_fresh_ids_stalls_the_election_only_briefly() {
    let mut s = Subnet::new(5, 0.0, 10, Duration::ZERO);
    let t0 = s.now();
    for k in 0..160u32 {
        let forged = wire::Frame::Claim(wire::Claim {
            content: CONTENT,
            standing: common::best_standing(u64::MAX - u64::from(k)),
        })
        .encode(0);
        s.inject(t0 + Duration::from_millis(250) * k, forged);
    }
    s.run_for(Duration::from_secs(25));
    s.assert_one_of_them_represents();
}

/// After two representatives that offered and never sent, an offer from a
/// node presence does not vouch for is refused; a vouched-for one is
/// followed.
#[test]
fn after_two_silent_representatives_only_vouched_offers_count() {
    use somcast::election::BadOffer;
    let (t0, group, mut e) = lone_agent();
    let offer = |node: u64| {
        wire::Frame::Offer(wire::Offer {
            content: CONTENT,
            standing: Standing {
                node,
                preference: 255,
                ..Standing::default()
            },
            session: node,
            data_group: group.ip().octets(),
            data_port: 7400,
            start_in_ms: 1000,
        })
    };
    for node in [91, 92] {
        e.handle_frame_vouched(t0, &offer(node), false).unwrap();
        assert!(matches!(e.poll_event(), Some(ElectionEvent::Follow { .. })));
        e.abandon(t0, node);
    }
    assert_eq!(
        e.handle_frame_vouched(t0, &offer(93), false),
        Err(BadOffer::Unvouched)
    );
    assert_eq!(e.role(), Role::Discovering);
    e.handle_frame_vouched(t0, &offer(94), true).unwrap();
    assert!(matches!(
        e.poll_event(),
        Some(ElectionEvent::Follow { session: 94, .. })
    ));
}

/// Offers with the best standing under a fresh, ever better node id every
/// 250 ms, none known to presence and none followed by a session: each
/// replaces the one followed before it sent, so after two the agents take
/// offers only from vouched-for nodes, and elect one of their own.
#[test]
fn a_stream_of_offers_with_fresh_ids_stalls_the_election_only_briefly() {
    let mut s = Subnet::new(5, 0.0, 11, Duration::ZERO);
    let t0 = s.now();
    for k in 0..160u32 {
        let forged = wire::Frame::Offer(wire::Offer {
            content: CONTENT,
            standing: common::best_standing(u64::MAX - 1000 + u64::from(k)),
            session: u64::from(k),
            data_group: [239, 192, 9, 9],
            data_port: 7400,
            start_in_ms: 500,
        })
        .encode(0);
        s.inject(t0 + Duration::from_millis(250) * k, forged);
    }
    s.run_for(Duration::from_secs(25));
    s.assert_one_of_them_represents();
}
