//! Presence traffic per agent in a simulated fleet of 1000 agents:
//! `cargo bench -p somcast-scanner --bench presence`.
//!
//! Counts every byte each agent puts on the wire (payload plus Ethernet,
//! IPv4 and UDP headers) over ten announce intervals after start-up, and
//! over the start-up interval alone (greeting probes and their answers).
//! The target is under 200 B/s per agent.

#[path = "../tests/support/fleet.rs"]
mod fleet;

use fleet::Fleet;
use multicast::wire::Held;
use scanner::PresenceConfig;

/// What an agent in the middle of its work holds: one package complete,
/// three partly (four HAVE ranges each).
fn busy_holdings(i: usize) -> Vec<Held> {
    let mut held = vec![Held {
        content: [1; 8],
        blocks_done: 250,
        block_count: 250,
        have: vec![[0, 250]],
    }];
    for c in 2..5u8 {
        let shift = (i % 7) as u32;
        held.push(Held {
            content: [c; 8],
            blocks_done: 40,
            block_count: 250,
            have: (0..4)
                .map(|r| [r * 60 + shift, r * 60 + shift + 10])
                .collect(),
        });
    }
    held
}

fn main() {
    let agents = 1000;
    let interval = PresenceConfig::default().interval;
    for (loss, holding) in [(0.0, false), (0.0, true), (0.05, true), (0.20, true)] {
        let wall = std::time::Instant::now();
        let mut fleet = Fleet::new(agents, PresenceConfig::default(), loss, 7);
        if holding {
            for (i, a) in fleet.agents.iter_mut().enumerate() {
                let mut me = a.local().clone();
                me.held = busy_holdings(i);
                a.set_local(me);
            }
        }
        fleet.run_for(interval);
        let startup: u64 = fleet.wire_bytes().iter().sum();
        let intervals = 10;
        fleet.run_for(interval * intervals);
        let total: u64 = fleet.wire_bytes().iter().sum();
        let steady =
            (total - startup) as f64 / agents as f64 / (interval * intervals).as_secs_f64();
        let first = startup as f64 / agents as f64 / interval.as_secs_f64();
        println!(
            "presence, {agents} agents, interval {:?}, loss {:>4.0}%, {}: steady {steady:6.1} B/s per agent, \
             first interval {first:6.1} B/s per agent, converged: {}, false departures: {} \
             ({:.1} s to simulate)",
            interval,
            loss * 100.0,
            if holding {
                "4 contents held"
            } else {
                "no content"
            },
            fleet.unconverged().is_empty(),
            fleet.false_departures(),
            wall.elapsed().as_secs_f64()
        );
    }
}
