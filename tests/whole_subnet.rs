//! Whole agents (presence, election, session, repair) on one simulated
//! subnet with seeded loss and a virtual clock: one task, end to end.

#[path = "support/subnet.rs"]
mod subnet;

use std::time::{Duration, Instant};

use subnet::{Options, Subnet};

/// Virtual time a run may take before it counts as stuck.
const LIMIT: Duration = Duration::from_secs(120);

fn thousand(seed: u64) -> Options {
    Options {
        agents: 1000,
        loss: 0.10,
        seed,
        ..Options::default()
    }
}

/// Every live agent holds every block; none took more than its share.
fn assert_delivered(s: &Subnet) {
    let stuck: Vec<usize> = (0..s.agents.len())
        .filter(|&i| !s.net.is_silenced(i) && !s.agents[i].is_done())
        .collect();
    assert!(stuck.is_empty(), "agents not done: {stuck:?}");
    for (i, a) in s.agents.iter().enumerate() {
        if !s.net.is_silenced(i) {
            assert!(a.done.iter().all(|d| *d), "agent {i} lacks blocks");
        }
    }
}

fn summary(s: &Subnet, wall: Instant) -> String {
    let pkg = s.pkg.data.len() as f64;
    let last = s.agents.iter().filter_map(|a| a.completed_at).max();
    format!(
        "{} agents: origin {:.2}x, peers {:.2}x, representatives {:?} (elected {:?}), last done at {:?} virtual, {:.1} s wall",
        s.agents.len(),
        s.origin_bytes() as f64 / pkg,
        s.agents.iter().map(|a| a.peer_bytes).sum::<u64>() as f64 / pkg,
        s.representatives(),
        s.elected(),
        last.map(|t| t - s.net.t0),
        wall.elapsed().as_secs_f64()
    )
}

#[test]
fn a_thousand_agents_at_ten_percent_loss_elect_one_representative_and_download_once() {
    let wall = Instant::now();
    let mut s = Subnet::new(thousand(1));
    s.run(LIMIT);
    eprintln!("{}", summary(&s, wall));
    assert_delivered(&s);
    assert_eq!(s.representatives().len(), 1, "one representative");
    assert_eq!(s.elected().len(), 1, "nobody else ever thought it had won");
    assert_eq!(s.most_sending, 1, "never two sessions at once");
    let rep = s.representatives()[0];
    assert_eq!(s.agents[rep].sent_sessions, 1);
    assert_eq!(
        s.origin_bytes(),
        s.pkg.data.len() as u64,
        "the origin served the package exactly once"
    );
    // The multicast carried it: each receiver took at most a few blocks
    // from peers.
    let blocks = s.pkg.layout.block_count() as u64;
    let by_multicast: u64 = s.agents.iter().map(|a| u64::from(a.multicast_blocks)).sum();
    assert!(
        by_multicast >= 999 * blocks * 9 / 10,
        "multicast delivered only {by_multicast} blocks"
    );
}

#[test]
fn the_representative_silenced_mid_pass_is_replaced_and_everyone_finishes() {
    let wall = Instant::now();
    let mut s = Subnet::new(Options {
        // A slower pass, to be silenced in the middle of.
        rate_bps: 4_000_000,
        ..thousand(2)
    });
    let blocks = s.pkg.layout.block_count();
    // Until the receivers hold about a third of the package.
    let rep = loop {
        s.run_for(Duration::from_millis(50));
        assert!(s.net.elapsed() < LIMIT, "no multicast began");
        let sender = (0..s.agents.len()).find(|&i| s.agents[i].is_sending());
        let Some(rep) = sender else { continue };
        let held: u32 = s.agents.iter().map(|a| a.multicast_blocks).sum();
        if held >= 999 * blocks / 3 {
            break rep;
        }
    };
    let held_then: u32 = s.agents.iter().map(|a| a.multicast_blocks).sum();
    assert!(
        held_then < 999 * blocks * 2 / 3,
        "silenced mid-pass, not at its end"
    );
    s.net.silence(rep);
    s.run(LIMIT);
    eprintln!("{}", summary(&s, wall));
    assert_delivered(&s);
    let reps = s.representatives();
    assert_eq!(reps.len(), 2, "one successor: {reps:?}");
    assert_eq!(s.live_representatives().len(), 0, "elections over");
    assert_eq!(s.most_sending, 1, "never two sessions at once");
    // The successor took from peers what the first pass delivered; only
    // what the dead one never sent came from the origin again.
    let pkg = s.pkg.data.len() as u64;
    assert!(
        s.origin_bytes() <= pkg + pkg * 3 / 4,
        "origin {} for a package of {pkg}",
        s.origin_bytes()
    );
}

#[test]
fn five_percent_joining_late_catch_the_pass_and_the_origin_serves_once() {
    let wall = Instant::now();
    let mut s = Subnet::new(Options {
        late: 50,
        // While the pass runs (its start is ~6 s in, the startup delay
        // after the election).
        late_at: Duration::from_millis(6_500),
        rate_bps: 4_000_000,
        ..thousand(3)
    });
    s.run(LIMIT);
    eprintln!("{}", summary(&s, wall));
    assert_delivered(&s);
    assert_eq!(s.representatives().len(), 1);
    assert_eq!(s.origin_bytes(), s.pkg.data.len() as u64);
    // They came in after the first blocks had gone out, and the session
    // (its feedback, or peers) gave them the rest.
    let first_done = s.agents[..950]
        .iter()
        .filter_map(|a| a.completed_at)
        .min()
        .expect("some finished");
    assert!(s.agents[950].joins_at < first_done, "joined mid-pass");
    let late = &s.agents[950..];
    assert!(
        late.iter()
            .all(|a| a.multicast_blocks > 0 || a.peer_bytes > 0)
    );
}

#[test]
fn agents_the_multicast_does_not_reach_take_the_package_from_peers() {
    let wall = Instant::now();
    let mut s = Subnet::new(thousand(4));
    let deaf: Vec<usize> = (0..1000).step_by(50).collect();
    for &i in &deaf {
        s.deaf[i] = true;
    }
    s.run(LIMIT);
    eprintln!("{}", summary(&s, wall));
    assert_delivered(&s);
    assert_eq!(s.most_sending, 1, "never two sessions at once");
    // A deaf agent that heard the representative's holdings only once
    // (10% loss) cannot tell it holds the package, and elects one of its
    // own: that one takes the package from peers as well, so the origin
    // still serves it once.
    assert_eq!(
        s.origin_bytes(),
        s.pkg.data.len() as u64,
        "peers, not the origin"
    );
    let pkg = s.pkg.data.len() as u64;
    for &i in &deaf {
        assert!(
            s.agents[i].peer_bytes >= pkg,
            "agent {i} took it from peers"
        );
        assert_eq!(s.agents[i].multicast_blocks, 0);
    }
}

#[test]
fn a_run_is_a_function_of_its_seed() {
    let run = |seed| {
        let mut s = Subnet::new(Options {
            agents: 200,
            loss: 0.10,
            seed,
            ..Options::default()
        });
        s.run(LIMIT);
        assert_delivered(&s);
        s.fingerprint()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}
