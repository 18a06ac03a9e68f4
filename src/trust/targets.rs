//! Which agents a task is for, inside the signed task document: subnets
//! (CIDR), tags from the agents' config, hostname globs, node ids. No
//! targets, or all lists empty: every agent that gets the task. Otherwise an
//! agent is a target when it matches any one entry of any list.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Entries a list may hold, and the longest entry.
const MAX_ENTRIES: usize = 4096;
const MAX_ENTRY: usize = 255;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// IPv4 CIDRs (`10.20.0.0/16`): agents whose address is inside one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    /// Agents that have one of these tags (`tags` in their config).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Hostname globs (`kiosk-*`, `pos-??`), case-insensitive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Node ids, 16 hex digits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

/// What an agent is, for matching.
#[derive(Clone, Debug)]
pub struct Identity {
    pub addr: Ipv4Addr,
    pub tags: Vec<String>,
    pub hostname: String,
    pub node: u64,
}

impl Targets {
    /// Whether the lists say "every agent".
    pub fn is_all(&self) -> bool {
        self.subnets.is_empty()
            && self.tags.is_empty()
            && self.hosts.is_empty()
            && self.nodes.is_empty()
    }

    /// Every entry well formed, the lists within their bounds.
    pub fn check(&self) -> Result<(), String> {
        for (what, list) in [
            ("subnets", &self.subnets),
            ("tags", &self.tags),
            ("hosts", &self.hosts),
            ("nodes", &self.nodes),
        ] {
            if list.len() > MAX_ENTRIES {
                return Err(format!("{} {what} (at most {MAX_ENTRIES})", list.len()));
            }
            if let Some(e) = list.iter().find(|e| e.is_empty() || e.len() > MAX_ENTRY) {
                return Err(format!(
                    "an empty or over-long entry in {what}: {:?}",
                    short(e)
                ));
            }
        }
        for s in &self.subnets {
            cidr(s).ok_or_else(|| format!("not an IPv4 CIDR: {:?}", short(s)))?;
        }
        for n in &self.nodes {
            if n.len() != 16 || u64::from_str_radix(n, 16).is_err() {
                return Err(format!("not a node id (16 hex digits): {:?}", short(n)));
            }
        }
        Ok(())
    }

    /// Whether `me` is a target.
    pub fn matches(&self, me: &Identity) -> bool {
        if self.is_all() {
            return true;
        }
        let addr = u32::from(me.addr);
        self.subnets
            .iter()
            .filter_map(|s| cidr(s))
            .any(|(net, mask)| addr & mask == net & mask)
            || self.tags.iter().any(|t| me.tags.iter().any(|m| m == t))
            || self
                .hosts
                .iter()
                .any(|g| glob(&g.to_ascii_lowercase(), &me.hostname.to_ascii_lowercase()))
            || self
                .nodes
                .iter()
                .any(|n| u64::from_str_radix(n, 16) == Ok(me.node))
    }

    /// One line for logs and the console: `tags kiosk; subnets 10.0.0.0/8`.
    pub fn describe(&self) -> String {
        if self.is_all() {
            return "all agents".into();
        }
        [
            ("subnets", &self.subnets),
            ("tags", &self.tags),
            ("hosts", &self.hosts),
            ("nodes", &self.nodes),
        ]
        .iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(w, l)| format!("{w} {}", l.join(",")))
        .collect::<Vec<_>>()
        .join("; ")
    }
}

fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

/// `a.b.c.d/n` as (network, mask).
fn cidr(s: &str) -> Option<(u32, u32)> {
    let (addr, len) = s.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((u32::from(addr), mask))
}

/// `*` any run, `?` any one character; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Identity {
        Identity {
            addr: Ipv4Addr::new(10, 20, 3, 4),
            tags: vec!["kiosk".into(), "floor-2".into()],
            hostname: "POS-0417".into(),
            node: 0xabc,
        }
    }

    #[test]
    fn any_entry_of_any_list_makes_a_target() {
        let t = |f: fn(&mut Targets)| {
            let mut t = Targets::default();
            f(&mut t);
            t.check().unwrap();
            t.matches(&me())
        };
        assert!(t(|_| {}), "no targets: everyone");
        assert!(t(|t| t.subnets = vec!["10.20.0.0/16".into()]));
        assert!(!t(|t| t.subnets = vec!["10.21.0.0/16".into()]));
        assert!(t(|t| t.subnets = vec!["0.0.0.0/0".into()]));
        assert!(t(|t| t.tags = vec!["printer".into(), "kiosk".into()]));
        assert!(!t(|t| t.tags = vec!["Kiosk".into()]), "tags are exact");
        assert!(
            t(|t| t.hosts = vec!["pos-*".into()]),
            "hosts case-insensitive"
        );
        assert!(t(|t| t.hosts = vec!["pos-04??".into()]));
        assert!(!t(|t| t.hosts = vec!["pos-04?".into()]));
        assert!(t(|t| t.nodes = vec!["0000000000000abc".into()]));
        assert!(!t(|t| {
            t.nodes = vec!["0000000000000abd".into()];
            t.tags = vec!["printer".into()];
        }));
    }

    #[test]
    fn malformed_entries_are_refused() {
        let bad = |f: fn(&mut Targets)| {
            let mut t = Targets::default();
            f(&mut t);
            t.check().is_err()
        };
        assert!(bad(|t| t.subnets = vec!["10.0.0.0/33".into()]));
        assert!(bad(|t| t.subnets = vec!["10.0.0/8".into()]));
        assert!(bad(|t| t.nodes = vec!["abc".into()]));
        assert!(bad(|t| t.tags = vec![String::new()]));
        assert!(bad(|t| t.hosts = vec!["x".repeat(256)]));
        assert!(bad(|t| t.tags = vec!["t".into(); MAX_ENTRIES + 1]));
    }

    #[test]
    fn globs_match_runs_and_single_characters() {
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("*-2", "floor-2"));
        assert!(!glob("?", ""));
        assert!(glob("a**", "a"));
    }
}
