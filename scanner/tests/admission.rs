//! The peer table under a flood of forged announcements: a live agent
//! always gets in, one source cannot take more than its share.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use multicast::wire::{Announce, Frame};
use scanner::{LocalNode, Presence, PresenceConfig};

fn forged(node: u64, interval_ms: u32) -> Vec<u8> {
    Frame::Presence(Announce {
        node,
        incarnation: 1,
        seq: 1,
        interval_ms,
        version: "x".into(),
        addrs: Vec::new(),
        api_port: 0,
        repair_port: 0,
        rank: Default::default(),
        held: Vec::new(),
        reply_to: None,
    })
    .encode(0)
}

fn from(i: u32) -> SocketAddr {
    SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 7479))
}

fn table(max: usize) -> Presence {
    let cfg = PresenceConfig {
        max_peers: max,
        ..PresenceConfig::default()
    };
    let me = LocalNode {
        node: 1,
        ..LocalNode::default()
    };
    Presence::new(cfg, me, None, Instant::now(), 7)
}

#[test]
fn forged_one_off_announcements_cannot_keep_a_live_agent_out() {
    let t0 = Instant::now();
    let mut p = table(64);
    // 100 forged nodes from 100 addresses, each announced once, claiming a
    // ten-minute interval: the table is full of them.
    for i in 0..100u32 {
        p.handle_datagram(t0, from(i + 10), &forged(1000 + u64::from(i), 600_000));
    }
    assert_eq!(p.peers().count(), 64);
    // A live agent announces itself twice, a second apart: it is in, and
    // stays in.
    let live = forged(7, 1000);
    p.handle_datagram(t0 + Duration::from_secs(1), from(5), &live);
    assert!(p.peers().any(|peer| peer.announce.node == 7));
    let again = Frame::Presence(Announce {
        seq: 2,
        ..match multicast::wire::decode(&live).unwrap().frame {
            Frame::Presence(a) => a,
            _ => unreachable!(),
        }
    })
    .encode(0);
    p.handle_datagram(t0 + Duration::from_secs(2), from(5), &again);
    // More forged one-offs: they push out each other, not the live agent.
    for i in 100..300u32 {
        p.handle_datagram(
            t0 + Duration::from_secs(3),
            from(i + 10),
            &forged(1000 + u64::from(i), 600_000),
        );
    }
    assert!(p.peers().any(|peer| peer.announce.node == 7));
    assert!(p.stats().evicted >= 200);
}

#[test]
fn one_source_holds_at_most_its_share() {
    let t0 = Instant::now();
    let mut p = table(4096);
    for i in 0..500u64 {
        p.handle_datagram(t0, from(9), &forged(2000 + i, 5000));
    }
    assert_eq!(
        p.peers().count(),
        PresenceConfig::default().max_peers_per_source
    );
    assert_eq!(p.stats().source_limited, 500 - 32);
    // Another host still gets in.
    p.handle_datagram(t0, from(10), &forged(3, 5000));
    assert!(p.peers().any(|peer| peer.announce.node == 3));
}
