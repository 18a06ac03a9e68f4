//! Presence traffic per agent in a simulated fleet of 1000 agents:
//! `cargo bench -p somcast-scanner --bench presence`.
//!
//! Counts every byte each agent puts on the wire (payload plus Ethernet,
//! IPv4 and UDP headers) over ten announce intervals after start-up, and
//! over the start-up interval alone (greeting probes and their answers).
//! The target is under 200 B/s per agent.

#[path = "../tests/support/fleet.rs"]
mod fleet;

use std::time::Duration;

use fleet::Fleet;
use scanner::PresenceConfig;

fn main() {
    let agents = 1000;
    let interval = PresenceConfig::default().interval;
    for loss in [0.0, 0.05, 0.20] {
        let wall = std::time::Instant::now();
        let mut fleet = Fleet::new(agents, PresenceConfig::default(), loss, 7);
        fleet.run_for(interval);
        let startup: u64 = fleet.wire_bytes.iter().sum();
        let intervals = 10;
        fleet.run_for(interval * intervals);
        let total: u64 = fleet.wire_bytes.iter().sum();
        let steady =
            (total - startup) as f64 / agents as f64 / (interval * intervals).as_secs_f64();
        let first = startup as f64 / agents as f64 / interval.as_secs_f64();
        println!(
            "presence, {agents} agents, interval {:?}, loss {:>4.0}%: steady {steady:6.1} B/s per agent, \
             first interval {first:6.1} B/s per agent, converged: {}, false departures: {} \
             ({:.1} s to simulate)",
            interval,
            loss * 100.0,
            fleet.unconverged().is_empty(),
            fleet.false_departures(),
            wall.elapsed().as_secs_f64()
        );
        let _ = Duration::ZERO;
    }
}
