//! Who fetches a content through one rendezvous point, sans-IO: the
//! subnets' representatives of a site, each by its repair address. When the
//! rendezvous dies they know each other, so one of them (the first by
//! address, see [`successor`]) fetches for the site and the others take the
//! package from it, instead of each going to the origin.

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
    /// [`MAX_MEMBERS`], sorted.
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
                    // The one heard least recently makes room.
                    let i = (0..list.len()).min_by_key(|&i| list[i].1).expect("full");
                    list.swap_remove(i);
                }
                list.push((member, now));
            }
        }
        let mut out: Vec<SocketAddrV4> = list.iter().map(|m| m.0).collect();
        out.sort();
        out
    }
}

/// Whom `me` fetches from once the listed rendezvous points are gone: the
/// members before it by address (each a candidate in turn, should one fail
/// too), at most `max`; none means `me` is first and fetches for the others.
/// One that is no member (it only listened) follows them all: the members
/// agree on the first among themselves.
pub fn successor(me: SocketAddrV4, members: &[SocketAddrV4], max: usize) -> Vec<SocketAddrV4> {
    let member = members.contains(&me);
    let mut before: Vec<SocketAddrV4> = members
        .iter()
        .copied()
        .filter(|m| !member || *m < me)
        .collect();
    before.sort();
    before.dedup();
    before.truncate(max);
    before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn members_are_listed_sorted_bounded_and_forgotten_when_silent() {
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
    fn the_first_member_by_address_fetches_and_the_rest_follow_it() {
        let all = [a("10.0.3.12:7481"), a("10.0.2.11:7481"), a("10.0.5.1:7481")];
        assert!(successor(a("10.0.2.11:7481"), &all, 4).is_empty());
        assert_eq!(
            successor(a("10.0.3.12:7481"), &all, 4),
            [a("10.0.2.11:7481")]
        );
        assert_eq!(
            successor(a("10.0.5.1:7481"), &all, 4),
            [a("10.0.2.11:7481"), a("10.0.3.12:7481")]
        );
        assert_eq!(successor(a("10.0.5.1:7481"), &all, 1).len(), 1);
        // A listener (not on the list) follows the first, then the next.
        assert_eq!(
            successor(a("10.0.1.1:7481"), &all, 2),
            [a("10.0.2.11:7481"), a("10.0.3.12:7481")]
        );
    }
}
