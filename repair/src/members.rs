//! Who fetches a content through one rendezvous point, sans-IO: the
//! subnets' representatives of a site, each by its repair address. When the
//! rendezvous dies they know each other, so one of them (the first to
//! join, see [`successor`]) fetches for the site and the others take the
//! package from it, instead of each going to the origin.
//!
//! The list is kept in the order the members first joined, and that order
//! (not their addresses) says who fetches: a member's first JOIN answers
//! with everyone who joined before it, so each one knows all those ahead
//! of it however late it asks again, and the first knows it is first. By
//! address, two that joined a moment apart could each see only itself
//! first and both go to the origin.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use multicast::wire::Digest;

use crate::frame::MAX_MEMBERS;

/// A member not heard from this long is dropped: it asks every few seconds
/// while it fetches.
pub const MEMBER_TTL: Duration = Duration::from_secs(60);
/// Contents tracked at once; past it the one joined least recently goes.
pub const MAX_CONTENTS: usize = 64;

/// The members of each content, as a rendezvous point hears them.
#[derive(Debug, Default)]
pub struct Members {
    by_content: HashMap<Digest, Vec<(SocketAddrV4, Instant)>>,
}

impl Members {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `member` as fetching `content` at `now` (unless it only
    /// listens); every member of it (the newcomer too), at most
    /// [`MAX_MEMBERS`], in the order they first joined.
    pub fn join(
        &mut self,
        now: Instant,
        content: Digest,
        member: SocketAddrV4,
        fetching: bool,
    ) -> Vec<SocketAddrV4> {
        self.by_content.retain(|_, v| {
            v.retain(|(_, seen)| now.saturating_duration_since(*seen) < MEMBER_TTL);
            !v.is_empty()
        });
        if !self.by_content.contains_key(&content) && self.by_content.len() >= MAX_CONTENTS {
            let stalest = self
                .by_content
                .iter()
                .map(|(c, v)| (*c, v.iter().map(|m| m.1).max()))
                .min_by_key(|(_, newest)| *newest)
                .map(|(c, _)| c);
            if let Some(c) = stalest {
                self.by_content.remove(&c);
            }
        }
        if !fetching && !self.by_content.contains_key(&content) {
            return Vec::new();
        }
        let list = self.by_content.entry(content).or_default();
        // One entry per host: an agent has one repair port, and a host that
        // joins under many ports cannot crowd the others out.
        match list.iter_mut().find(|(a, _)| a.ip() == member.ip()) {
            Some(m) if fetching => *m = (member, now),
            Some(m) => m.1 = now,
            None if !fetching => {}
            None => {
                if list.len() >= MAX_MEMBERS {
                    // The one heard least recently makes room; the
                    // others keep their places.
                    let i = (0..list.len()).min_by_key(|&i| list[i].1).expect("full");
                    list.remove(i);
                }
                list.push((member, now));
            }
        }
        list.iter().map(|m| m.0).collect()
    }
}

/// Whom `me` fetches from once the listed rendezvous points are gone, from
/// `members` as the rendezvous listed them (in join order): the members
/// that joined before it, the first first (each a candidate in turn, should
/// one fail too), at most `max`; none means `me` is first and fetches for
/// the others. One that is no member (it only listened) follows them all
/// in that order.
pub fn successor(me: SocketAddrV4, members: &[SocketAddrV4], max: usize) -> Vec<SocketAddrV4> {
    let ahead = members
        .iter()
        .position(|m| *m == me)
        .unwrap_or(members.len());
    let mut before: Vec<SocketAddrV4> = Vec::with_capacity(max.min(ahead));
    for m in &members[..ahead] {
        if before.len() == max {
            break;
        }
        // A hostile list may name one twice.
        if !before.contains(m) {
            before.push(*m);
        }
    }
    before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn members_are_listed_bounded_and_forgotten_when_silent() {
        let t0 = Instant::now();
        let mut m = Members::new();
        let c = [1u8; 32];
        assert_eq!(
            m.join(t0, c, a("10.0.2.11:7481"), true),
            [a("10.0.2.11:7481")]
        );
        let got = m.join(t0, c, a("10.0.3.12:7481"), true);
        assert_eq!(got, [a("10.0.2.11:7481"), a("10.0.3.12:7481")]);
        // A listener learns the list and is not on it.
        let heard = m.join(t0, c, a("10.0.1.40:7481"), false);
        assert_eq!(heard, got);
        assert!(m.join(t0, [9; 32], a("10.0.1.40:7481"), false).is_empty());
        assert!(!m.by_content.contains_key(&[9; 32]));
        // Another content is its own list.
        assert_eq!(m.join(t0, [2; 32], a("10.0.9.9:1"), true).len(), 1);
        // One that stops asking is dropped after the TTL.
        let later = t0 + MEMBER_TTL - Duration::from_secs(1);
        m.join(later, c, a("10.0.3.12:7481"), true);
        let got = m.join(
            t0 + MEMBER_TTL + Duration::from_secs(1),
            c,
            a("10.0.3.12:7481"),
            true,
        );
        assert_eq!(got, [a("10.0.3.12:7481")]);
        // One host under many ports is one member, its latest port.
        for port in 1..100 {
            m.join(
                t0 + MEMBER_TTL,
                c,
                SocketAddrV4::new([10, 1, 0, 1].into(), port),
                true,
            );
        }
        let got = m.join(t0 + MEMBER_TTL, c, a("10.0.3.12:7481"), true);
        assert_eq!(got, [a("10.0.3.12:7481"), a("10.1.0.1:99")]);
        // At most MAX_MEMBERS per content and MAX_CONTENTS contents.
        for i in 0..(MAX_MEMBERS as u8 + 10) {
            let n = m.join(
                t0 + MEMBER_TTL,
                c,
                SocketAddrV4::new([10, 2, 0, i].into(), 1),
                true,
            );
            assert!(n.len() <= MAX_MEMBERS);
        }
        for i in 0..(MAX_CONTENTS as u8 + 5) {
            m.join(t0 + MEMBER_TTL, [i; 32], a("10.0.0.1:1"), true);
        }
        assert!(m.by_content.len() <= MAX_CONTENTS);
    }

    #[test]
    fn the_first_to_join_fetches_and_the_rest_follow_it_in_join_order() {
        let t0 = Instant::now();
        let mut m = Members::new();
        let c = [1u8; 32];
        let (late_low, early_high) = (a("10.0.2.12:7481"), a("10.0.3.12:7481"));
        // The higher address joins first and hears only itself; it never
        // asks again before the rendezvous dies.
        let early_list = m.join(t0, c, early_high, true);
        let late_list = m.join(t0 + Duration::from_millis(50), c, late_low, true);
        assert_eq!(late_list, [early_high, late_low]);
        // Exactly one of the two goes to the origin, and the other takes
        // the package from it.
        assert!(successor(early_high, &early_list, 3).is_empty());
        assert_eq!(successor(late_low, &late_list, 3), [early_high]);
        // Places hold: a rejoin (a new port too) keeps the first first.
        let third = a("10.0.1.5:7481");
        m.join(t0 + Duration::from_secs(1), c, third, true);
        m.join(t0 + Duration::from_secs(2), c, a("10.0.3.12:7999"), true);
        let all = m.join(t0 + Duration::from_secs(2), c, late_low, true);
        assert_eq!(all, [a("10.0.3.12:7999"), late_low, third]);
        assert_eq!(successor(third, &all, 4), all[..2]);
        assert_eq!(successor(third, &all, 1), all[..1]);
        // A listener (not on the list) follows the first, then the next.
        assert_eq!(successor(a("10.0.1.1:7481"), &all, 2), all[..2]);
        // A hostile list that names one twice yields it once.
        let dup = [early_high, early_high, late_low, third];
        assert_eq!(successor(third, &dup, 4), [early_high, late_low]);
    }

    #[test]
    fn a_full_list_drops_the_least_recently_heard_and_keeps_the_order() {
        let t0 = Instant::now();
        let mut m = Members::new();
        let c = [3u8; 32];
        let addr =
            |i: usize| SocketAddrV4::new([10, 4, (i / 200) as u8, (i % 200) as u8].into(), 1);
        for i in 0..MAX_MEMBERS {
            m.join(t0 + Duration::from_millis(i as u64), c, addr(i), true);
        }
        // The first is heard again; the second is now the stalest.
        m.join(t0 + Duration::from_secs(1), c, addr(0), true);
        let got = m.join(t0 + Duration::from_secs(1), c, addr(MAX_MEMBERS), true);
        assert_eq!(got.len(), MAX_MEMBERS);
        assert_eq!(got[0], addr(0));
        assert!(!got.contains(&addr(1)));
        assert_eq!(
            got[1..MAX_MEMBERS - 1],
            (2..MAX_MEMBERS).map(addr).collect::<Vec<_>>()[..]
        );
        assert_eq!(got[MAX_MEMBERS - 1], addr(MAX_MEMBERS));
    }
}
