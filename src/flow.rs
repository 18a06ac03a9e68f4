//! The task flow's decisions, sans-IO: what an agent does with a task's
//! package at each turn (the task starts, it is elected, it follows a
//! representative, that session ends), given where it stands. Pure
//! functions of their inputs: the agent's tokio glue
//! (`agent/task/acquire.rs`) acts on them, and the whole-subnet simulation
//! (`tests/support/subnet.rs`) runs the same ones, so the two cannot take
//! different turns.

use std::time::Duration;

use crate::topology::SiteKind;

/// How a task starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A VPN agent shares nothing with the hosts beside it: it fetches on
    /// its own, from the nearest source allowed.
    OnItsOwn,
    /// It stands in the subnet's election.
    Elect,
}

pub fn start(site: SiteKind) -> Start {
    match site {
        SiteKind::Vpn => Start::OnItsOwn,
        SiteKind::Wired | SiteKind::Wifi => Start::Elect,
    }
}

/// Whether a representative multicasts what it fetches: not on Wi-Fi,
/// where multicast goes at the lowest rate and is lost freely; the others
/// take it from peers over TCP.
pub fn multicasts(site: SiteKind) -> bool {
    site != SiteKind::Wifi
}

/// Whether a follower joins the representative's multicast (else it
/// takes the package from peers as the representative fetches it).
pub fn receives_multicast(site: SiteKind) -> bool {
    multicasts(site)
}

/// How a follower's session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Every block arrived.
    All,
    /// It ended (closed, idle, failed) with blocks missing.
    Incomplete,
    /// Its representative was lost or replaced while data arrived.
    Interrupted,
    /// Nothing of it arrived: no sender showed, or its data does not reach
    /// this agent.
    NoShow,
    /// The representative's rate control left this agent behind as far
    /// slower than the rest.
    LeftBehind,
}

/// A session whose representative fell silent is a no-show when nothing
/// of it arrived and it ran long enough past its start that its data
/// should have (its sender announces every 100 ms: 2 s is 20 chances).
pub fn lost_representative_ends(nothing_arrived: bool, since_start: Duration) -> SessionEnd {
    if nothing_arrived && since_start >= NO_SHOW_AFTER {
        SessionEnd::NoShow
    } else {
        SessionEnd::Interrupted
    }
}

/// See [`lost_representative_ends`].
pub const NO_SHOW_AFTER: Duration = Duration::from_secs(2);

/// What to do when peers stop making progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStall {
    /// Fetch the rest from the origin.
    Origin,
    /// Elect again without this representative.
    ElectWithout,
}

/// What the task does after a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Every block is here: verify and commit.
    Done,
    /// Peers for what is missing, then the origin for what none delivered.
    PeersThenOrigin,
    /// Peers only, as they get the package; `on_stall` when none makes
    /// progress.
    PeersOnly { on_stall: OnStall },
    /// Back to the election, with the symbols collected so far; `abandon`:
    /// without this representative.
    Elect { abandon: bool },
}

/// After a session that ended so: `site` is the agent's, and
/// `representative_holds` whether presence says the representative holds
/// blocks of the package.
pub fn after_session(end: SessionEnd, site: SiteKind, representative_holds: bool) -> Next {
    match end {
        SessionEnd::All => Next::Done,
        SessionEnd::Incomplete => Next::PeersThenOrigin,
        SessionEnd::Interrupted => Next::Elect { abandon: false },
        // The others finish the pass with the package.
        SessionEnd::LeftBehind => Next::PeersOnly {
            on_stall: OnStall::Origin,
        },
        // Offers and presence arrive, the data does not (a switch that
        // prunes the data group, Wi-Fi client isolation): the
        // representative fetches all the same, and every receiver takes it
        // from peers.
        SessionEnd::NoShow if site == SiteKind::Wifi || representative_holds => Next::PeersOnly {
            on_stall: OnStall::ElectWithout,
        },
        // Every receiver would otherwise go to the origin on its own.
        SessionEnd::NoShow => Next::Elect { abandon: true },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_end_of_a_session_has_one_next_step() {
        use SiteKind::*;
        let peers_else_elect = Next::PeersOnly {
            on_stall: OnStall::ElectWithout,
        };
        for (end, site, holds, next) in [
            (SessionEnd::All, Wired, false, Next::Done),
            (SessionEnd::Incomplete, Wired, true, Next::PeersThenOrigin),
            (
                SessionEnd::Interrupted,
                Wired,
                true,
                Next::Elect { abandon: false },
            ),
            (
                SessionEnd::LeftBehind,
                Wired,
                false,
                Next::PeersOnly {
                    on_stall: OnStall::Origin,
                },
            ),
            (SessionEnd::NoShow, Wired, true, peers_else_elect),
            (SessionEnd::NoShow, Wifi, false, peers_else_elect),
            (
                SessionEnd::NoShow,
                Wired,
                false,
                Next::Elect { abandon: true },
            ),
        ] {
            assert_eq!(
                after_session(end, site, holds),
                next,
                "{end:?} {site:?} {holds}"
            );
        }
    }

    #[test]
    fn a_silent_representative_is_a_no_show_only_when_nothing_came_in_time() {
        let end = lost_representative_ends;
        assert_eq!(end(true, Duration::from_secs(3)), SessionEnd::NoShow);
        assert_eq!(end(true, Duration::from_secs(1)), SessionEnd::Interrupted);
        assert_eq!(end(false, Duration::from_secs(9)), SessionEnd::Interrupted);
    }

    #[test]
    fn vpn_agents_go_alone_and_wifi_sites_do_not_multicast() {
        assert_eq!(start(SiteKind::Vpn), Start::OnItsOwn);
        assert_eq!(start(SiteKind::Wifi), Start::Elect);
        assert!(multicasts(SiteKind::Wired) && !multicasts(SiteKind::Wifi));
        assert!(!receives_multicast(SiteKind::Wifi));
    }
}
