//! The presence protocol over a simulated subnet of hundreds of agents.

#[path = "support/fleet.rs"]
mod fleet;

use std::time::Duration;

use fleet::Fleet;
use scanner::PresenceConfig;

const INTERVAL: Duration = Duration::from_secs(5);

fn config() -> PresenceConfig {
    PresenceConfig {
        interval: INTERVAL,
        ..PresenceConfig::default()
    }
}

#[test]
fn three_hundred_agents_converge_within_three_intervals() {
    let mut fleet = Fleet::new(300, config(), 0.0, 1);
    fleet.run_for(INTERVAL * 3);
    let left = fleet.unconverged();
    assert!(
        left.is_empty(),
        "{} agents without the full peer set",
        left.len()
    );
    // The greeting probe makes it much faster than three intervals.
    let mut fleet = Fleet::new(300, config(), 0.0, 2);
    fleet.run_for(INTERVAL / 5);
    assert!(fleet.unconverged().is_empty());
}

#[test]
fn a_silenced_agent_leaves_every_table_after_three_intervals() {
    let mut fleet = Fleet::new(300, config(), 0.0, 3);
    fleet.run_for(INTERVAL * 2);
    assert!(fleet.unconverged().is_empty());
    let gone = fleet.agents[17].node();
    fleet.silence(17);
    // Not before three intervals have passed (its last announcement may be
    // up to 1.1 intervals old when it falls silent)...
    fleet.run_for(INTERVAL * 2);
    let still = (0..300).filter(|&i| i != 17 && fleet.table(i).contains(&gone));
    assert_eq!(still.count(), 299, "dropped before three missed intervals");
    // ...and from every table within three intervals and the margin.
    fleet.run_for(INTERVAL * 2 + INTERVAL / 2);
    let still: Vec<_> = (0..300)
        .filter(|&i| i != 17 && fleet.table(i).contains(&gone))
        .collect();
    assert!(still.is_empty(), "{} tables still hold it", still.len());
    assert!(fleet.unconverged().is_empty());
    assert_eq!(fleet.false_departures(), 0);
}

#[test]
fn twenty_percent_loss_does_not_make_peers_flap() {
    // A pair stays unknown only while every announcement either way is
    // lost: about 90 000 pairs x 0.2^k after k intervals, so eight suffice.
    let mut fleet = Fleet::new(300, config(), 0.20, 4);
    fleet.run_for(INTERVAL * 8);
    let left = fleet.unconverged();
    assert!(
        left.is_empty(),
        "{} agents not converged after 8 intervals",
        left.len()
    );
    fleet.run_for(INTERVAL * 22);
    assert_eq!(fleet.false_departures(), 0, "live peers dropped");
    assert!(fleet.unconverged().is_empty());
    // Probing on suspicion is what holds the tables; it must not cost much.
    let probes: u64 = fleet.agents.iter().map(|a| a.stats().probes_sent).sum();
    let per_agent_per_interval = probes as f64 / 300.0 / 30.0;
    assert!(
        per_agent_per_interval < 40.0,
        "{per_agent_per_interval:.1} probes"
    );
}

#[test]
fn a_silenced_agent_still_leaves_at_twenty_percent_loss() {
    let mut fleet = Fleet::new(100, config(), 0.20, 5);
    fleet.run_for(INTERVAL * 8);
    let gone = fleet.agents[3].node();
    fleet.silence(3);
    fleet.run_for(INTERVAL * 4 + INTERVAL / 2);
    assert!((0..100).all(|i| i == 3 || !fleet.table(i).contains(&gone)));
    assert_eq!(fleet.false_departures(), 0);
}
