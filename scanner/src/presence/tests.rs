//! The presence machine's unit tests.

use super::*;

fn node(id: u64) -> LocalNode {
    LocalNode {
        node: id,
        version: "test".into(),
        ..LocalNode::default()
    }
}

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 7479))
}

fn drain(p: &mut Presence) -> Vec<Transmit> {
    std::iter::from_fn(|| p.poll_transmit()).collect()
}

#[test]
fn first_announcement_and_group_probe_come_within_a_tenth_of_an_interval() {
    let t0 = Instant::now();
    let mut p = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
    assert!(p.poll_timeout().unwrap() <= t0 + Duration::from_millis(500));
    p.handle_timeout(p.poll_timeout().unwrap());
    let sent = drain(&mut p);
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|t| t.dest == Dest::Group));
    let kinds: Vec<_> = sent
        .iter()
        .map(|t| match wire::decode(&t.bytes).unwrap().frame {
            Frame::Presence(_) => "presence",
            Frame::Probe { .. } => "probe",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["presence", "probe"]);
}

#[test]
fn a_restart_replaces_the_entry_and_a_bye_removes_it() {
    let t0 = Instant::now();
    let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
    let mut b1 = Presence::new(PresenceConfig::default(), node(2), None, t0, 2);
    let mut b2 = Presence::new(PresenceConfig::default(), node(2), None, t0, 3);
    assert_ne!(b1.incarnation(), b2.incarnation());
    let hello1 = Frame::Presence(b1.announcement(None)).encode(0);
    let hello2 = Frame::Presence(b2.announcement(None)).encode(0);
    a.handle_datagram(t0, addr(2), &hello1);
    a.handle_datagram(t0, addr(3), &hello2);
    assert_eq!(a.peers().count(), 1);
    assert_eq!(a.peers().next().unwrap().addr, addr(3));
    let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
    assert!(matches!(
        events[1],
        PresenceEvent::Restarted { node: 2, .. }
    ));
    // A bye from the old incarnation does not remove the new one.
    b1.leave();
    a.handle_datagram(t0, addr(2), &drain(&mut b1)[0].bytes);
    assert_eq!(a.peers().count(), 1);
    b2.leave();
    a.handle_datagram(t0, addr(3), &drain(&mut b2)[0].bytes);
    assert_eq!(a.peers().count(), 0);
}

#[test]
fn other_subnets_are_kept_apart() {
    let t0 = Instant::now();
    let subnet = Subnet::of(Ipv4Addr::new(10, 0, 0, 1), 24);
    let mut a = Presence::new(PresenceConfig::default(), node(1), Some(subnet), t0, 1);
    let b = Presence::new(PresenceConfig::default(), node(2), None, t0, 2);
    let hello = Frame::Presence(b.announcement(None)).encode(0);
    a.handle_datagram(t0, SocketAddr::from(([10, 0, 1, 2], 7479)), &hello);
    assert_eq!(a.peers().count(), 0);
    assert_eq!(a.foreign_peers().count(), 1);
    a.handle_datagram(t0, addr(2), &hello);
    assert_eq!(a.peers().count(), 1);
}

#[test]
fn probes_are_answered_by_unicast_under_a_rate_limit() {
    let t0 = Instant::now();
    let cfg = PresenceConfig {
        answer_rate: 10,
        answer_burst: 5,
        ..PresenceConfig::default()
    };
    let mut a = Presence::new(cfg, node(1), None, t0, 1);
    let probe = Frame::Probe {
        nonce: 77,
        from_node: None,
        unicast_reply: true,
    }
    .encode(0);
    for _ in 0..20 {
        a.handle_datagram(t0, addr(9), &probe);
    }
    let sent = drain(&mut a);
    assert_eq!(sent.len(), 5);
    assert_eq!(a.stats().answers_limited, 15);
    let Frame::Presence(ans) = wire::decode(&sent[0].bytes).unwrap().frame else {
        panic!("answer is not a presence frame");
    };
    assert_eq!(ans.reply_to, Some(77));
    assert_eq!(sent[0].dest, Dest::To(addr(9)));
    // A second later the bucket has refilled by the rate.
    for _ in 0..20 {
        a.handle_datagram(t0 + Duration::from_secs(1), addr(9), &probe);
    }
    assert_eq!(drain(&mut a).len(), 5);
}

#[test]
fn a_group_probe_brings_the_next_announcement_forward_once() {
    let t0 = Instant::now();
    let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
    let first = a.poll_timeout().unwrap();
    a.handle_timeout(first);
    drain(&mut a);
    let greeting = Frame::Probe {
        nonce: 5,
        from_node: Some(2),
        unicast_reply: false,
    }
    .encode(0);
    // Just after an announcement: it already answered.
    a.handle_datagram(first + Duration::from_millis(10), addr(2), &greeting);
    assert!(a.poll_timeout().unwrap() >= first + Duration::from_millis(4500));
    let later = first + Duration::from_secs(2);
    a.handle_datagram(later, addr(2), &greeting);
    let soon = a.poll_timeout().unwrap();
    assert!(soon >= later && soon <= later + Duration::from_millis(250));
    assert!(
        drain(&mut a).is_empty(),
        "no unicast answer to a group probe"
    );
}

#[test]
fn malformed_and_foreign_datagrams_are_counted_not_fatal() {
    let t0 = Instant::now();
    let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
    a.handle_datagram(t0, addr(2), b"garbage");
    a.handle_datagram(t0, addr(2), &[]);
    let data = Frame::EndOfPass {
        pass: 1,
        closing: false,
    }
    .encode(5);
    a.handle_datagram(t0, addr(2), &data);
    let s = a.stats();
    assert_eq!((s.datagrams_in, s.malformed, s.not_presence), (3, 2, 1));
    assert_eq!(a.peers().count(), 0);
}

#[test]
fn a_silent_peer_is_probed_then_dropped_after_three_intervals() {
    let t0 = Instant::now();
    let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
    let b = Presence::new(PresenceConfig::default(), node(2), None, t0, 2);
    a.handle_datagram(
        t0,
        addr(2),
        &Frame::Presence(b.announcement(None)).encode(0),
    );
    let mut now = t0;
    let mut probes_to_b = 0;
    while a.peers().count() == 1 {
        now = a.poll_timeout().unwrap();
        a.handle_timeout(now);
        probes_to_b += drain(&mut a)
            .iter()
            .filter(|t| t.dest == Dest::To(addr(2)))
            .count();
        assert!(now < t0 + Duration::from_secs(60), "never expired");
    }
    let silent = now - t0;
    assert!(
        silent >= Duration::from_secs(15),
        "dropped after {silent:?}"
    );
    assert!(
        silent <= Duration::from_millis(16_500),
        "dropped after {silent:?}"
    );
    assert!(probes_to_b >= 15, "only {probes_to_b} probes");
}

#[test]
fn an_announcement_with_many_contents_stays_inside_one_datagram() {
    let t0 = Instant::now();
    let mut me = node(1);
    // Sixteen contents, each with the most ranges: far over the budget.
    me.held = (0..16u8)
        .map(|c| Held {
            content: [c; 8],
            blocks_done: 32,
            block_count: 100_000,
            have: (0..32).map(|r| [r * 3000, r * 3000 + 1]).collect(),
        })
        .collect();
    let p = Presence::new(PresenceConfig::default(), me, None, t0, 1);
    let a = p.announcement(None);
    let bytes = Frame::Presence(a.clone()).encode(0);
    assert!(bytes.len() <= MAX_ANNOUNCE, "{} bytes", bytes.len());
    // The newest contents keep their ranges; none is dropped while
    // clearing ranges suffices.
    assert_eq!(a.held.len(), 16);
    assert!(!a.held[0].have.is_empty());
    assert!(a.held[15].have.is_empty());
    assert!(wire::decode(&bytes).is_ok());
}

#[test]
fn answers_to_agents_are_short_and_keep_what_the_table_knows() {
    let t0 = Instant::now();
    let mut me = node(2);
    me.held = vec![Held {
        content: [9; 8],
        blocks_done: 1,
        block_count: 4,
        have: vec![[0, 1]],
    }];
    let mut b = Presence::new(PresenceConfig::default(), me, None, t0, 2);
    let mut a = Presence::new(PresenceConfig::default(), node(1), None, t0, 1);
    a.handle_datagram(
        t0,
        addr(2),
        &Frame::Presence(b.announcement(None)).encode(0),
    );
    let probe = |from_node| {
        Frame::Probe {
            nonce: 1,
            from_node,
            unicast_reply: true,
        }
        .encode(0)
    };
    // An agent's probe: the answer has no contents...
    b.handle_datagram(t0, addr(1), &probe(Some(1)));
    let answer = drain(&mut b).remove(0).bytes;
    let Frame::Presence(ans) = wire::decode(&answer).unwrap().frame else {
        panic!("not a presence answer")
    };
    assert!(ans.held.is_empty());
    // ...and does not erase what the last announcement said.
    a.handle_datagram(t0 + Duration::from_secs(1), addr(2), &answer);
    let peer = a.peers().next().unwrap();
    assert_eq!(peer.announce.held.len(), 1);
    assert_eq!(peer.last_heard, t0 + Duration::from_secs(1));
    // A scan's probe sees the contents.
    b.handle_datagram(t0, addr(9), &probe(None));
    let Frame::Presence(ans) = wire::decode(&drain(&mut b)[0].bytes).unwrap().frame else {
        panic!("not a presence answer")
    };
    assert_eq!(ans.held.len(), 1);
}

#[test]
fn subnet_membership() {
    let s = Subnet::of(Ipv4Addr::new(192, 168, 7, 200), 23);
    assert_eq!(s.to_string(), "192.168.6.0/23");
    assert!(s.contains(Ipv4Addr::new(192, 168, 7, 1)));
    assert!(!s.contains(Ipv4Addr::new(192, 168, 8, 1)));
    assert!(Subnet::of(Ipv4Addr::new(1, 2, 3, 4), 0).contains(Ipv4Addr::new(9, 9, 9, 9)));
}
