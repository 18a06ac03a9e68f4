//! Sites: which office an agent is in, and where its packages come from.
//!
//! A signed topology document (`somcast-topology`, signed by a publisher
//! key like a task) lists sites: a name, the subnets (CIDRs) that make it
//! up, a parent site, a type, and rendezvous agents. An agent maps itself
//! to the site whose subnet holds its address (the longest prefix wins) and
//! from there knows:
//!
//! - its **sources**: the rendezvous points that stand between it and the
//!   origin, nearest first (its own site's, then its parent's, up the
//!   chain). A site's rendezvous points are a failover order: each fetches
//!   from those listed before it, then from above the site.
//! - its **type**: `wired` (multicast, as without a topology), `wifi`
//!   (never multicast: one agent fetches, the others take it from peers
//!   over TCP) or `vpn` (no multicast, no serving peers; each agent fetches
//!   on its own from the nearest source).
//!
//! No topology, or an address in no site: every subnet on its own.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::trust::document::{self, Envelope, FORMAT};
use crate::trust::{Gate, Refusal};

/// `type` of a topology document.
pub const TOPOLOGY_TYPE: &str = "somcast-topology";
/// Sites in one document: a large enterprise's offices with room to spare.
pub const MAX_SITES: usize = 20_000;
/// Subnets of one site.
pub const MAX_SUBNETS: usize = 1024;
/// Rendezvous points of one site: failover, not a pool.
pub const MAX_RENDEZVOUS: usize = 16;
/// Longest chain of parents: deeper is a mistake (or a loop).
pub const MAX_DEPTH: usize = 16;
/// The repair port of a rendezvous given without one: the agent's default
/// (its API port 7480, plus one).
pub const DEFAULT_REPAIR_PORT: u16 = 7481;

/// How a site's subnets share a package.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// Multicast on each subnet, peers repair, one download per site.
    #[default]
    Wired,
    /// Never multicast (Wi-Fi multicast is slow and unreliable): one agent
    /// fetches, the others take the package from peers over TCP.
    Wifi,
    /// Remote workers: never serve peers, each fetches on its own.
    Vpn,
}

impl SiteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteKind::Wired => "wired",
            SiteKind::Wifi => "wifi",
            SiteKind::Vpn => "vpn",
        }
    }
}

/// One site as the document lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    /// IPv4 CIDRs, e.g. `10.1.2.0/24`.
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: SiteKind,
    /// Agents that fetch for the site and serve its subnets, in order of
    /// preference: `address` or `address:repair-port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rendezvous: Vec<String>,
}

/// The signed document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyDoc {
    #[serde(rename = "type")]
    pub doc_type: String,
    pub format: u32,
    pub id: String,
    pub issued: u64,
    pub expires: u64,
    pub sites: Vec<Site>,
}

/// An IPv4 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    net: u32,
    len: u8,
}

impl Cidr {
    fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("subnet {s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("subnet {s:?}: {addr:?} is not an IPv4 address"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("subnet {s:?}: prefix length {len:?} is not 0-32"))?;
        let mask = Self::mask(len);
        if u32::from(addr) & !mask != 0 {
            return Err(format!(
                "subnet {s:?} has host bits set (did you mean {}/{len}?)",
                Ipv4Addr::from(u32::from(addr) & mask)
            ));
        }
        Ok(Cidr {
            net: u32::from(addr),
            len,
        })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len) }
    }

    fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & Self::mask(self.len) == self.net
    }
}

/// A checked topology: every name unique, every parent known, no loops,
/// every subnet and rendezvous address well formed.
#[derive(Clone, Debug)]
pub struct Topology {
    pub id: String,
    pub issued: u64,
    pub expires: u64,
    sites: Vec<Checked>,
    by_name: BTreeMap<String, usize>,
}

#[derive(Clone, Debug)]
struct Checked {
    site: Site,
    subnets: Vec<Cidr>,
    rendezvous: Vec<SocketAddr>,
    parent: Option<usize>,
}

/// Where one agent stands in the topology.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub site: String,
    pub kind: SiteKind,
    /// This agent is one of its site's rendezvous points.
    pub rendezvous: bool,
    /// Rendezvous points to fetch from before the origin, nearest first.
    pub sources: Vec<SocketAddr>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.chars().all(|c| !c.is_control())
}

fn rendezvous_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_REPAIR_PORT))
        .map_err(|_| format!("rendezvous {s:?} is not an address or address:port"))
}

impl Topology {
    /// Checks a parsed document (not its signature or window: see
    /// [`Topology::open`]).
    pub fn check(doc: TopologyDoc) -> Result<Topology, String> {
        if !document::valid_id(&doc.id) {
            return Err(format!("topology id {:?} is not valid", doc.id));
        }
        if doc.sites.len() > MAX_SITES {
            return Err(format!("{} sites (at most {MAX_SITES})", doc.sites.len()));
        }
        let mut by_name = BTreeMap::new();
        for (i, s) in doc.sites.iter().enumerate() {
            if !valid_name(&s.name) {
                return Err(format!(
                    "site name {:?} is not 1-64 printable characters",
                    s.name
                ));
            }
            if by_name.insert(s.name.clone(), i).is_some() {
                return Err(format!("site {:?} is listed twice", s.name));
            }
        }
        let mut sites = Vec::with_capacity(doc.sites.len());
        for s in doc.sites {
            let at = |e: String| format!("site {:?}: {e}", s.name);
            if s.subnets.len() > MAX_SUBNETS || s.rendezvous.len() > MAX_RENDEZVOUS {
                return Err(at(format!(
                    "at most {MAX_SUBNETS} subnets and {MAX_RENDEZVOUS} rendezvous points"
                )));
            }
            let subnets = s
                .subnets
                .iter()
                .map(|c| Cidr::parse(c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            let rendezvous = s
                .rendezvous
                .iter()
                .map(|r| rendezvous_addr(r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            let parent = match &s.parent {
                None => None,
                Some(p) => Some(
                    *by_name
                        .get(p)
                        .ok_or_else(|| at(format!("parent {p:?} is not a site")))?,
                ),
            };
            sites.push(Checked {
                site: s,
                subnets,
                rendezvous,
                parent,
            });
        }
        let t = Topology {
            id: doc.id,
            issued: doc.issued,
            expires: doc.expires,
            sites,
            by_name,
        };
        for i in 0..t.sites.len() {
            if t.chain(i).count() > MAX_DEPTH {
                return Err(format!(
                    "site {:?}: its chain of parents loops or is deeper than {MAX_DEPTH}",
                    t.sites[i].site.name
                ));
            }
        }
        Ok(t)
    }

    /// Checks a document's signature (through the agent's gate), kind,
    /// window (at `now`) and contents.
    pub fn open(env: &Envelope, gate: &Gate, now: u64) -> Result<Topology, Refusal> {
        gate.authenticate(env)?;
        let doc: TopologyDoc = document::parse(env, TOPOLOGY_TYPE)?;
        document::check_window(now, doc.issued, None, doc.expires)?;
        Topology::check(doc).map_err(Refusal::Malformed)
    }

    /// Site `i`, then its parent, and so on (at most `MAX_DEPTH + 1`).
    fn chain(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(i), |&j| self.sites[j].parent).take(MAX_DEPTH + 1)
    }

    /// The site of `addr`: the one with the longest subnet that holds it.
    fn site_of(&self, addr: Ipv4Addr) -> Option<usize> {
        self.sites
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.subnets.iter().map(move |c| (i, c)))
            .filter(|(_, c)| c.contains(addr))
            .max_by_key(|(_, c)| c.len)
            .map(|(i, _)| i)
    }

    /// Where the agent at `addr`, serving repair on `repair_port`, stands;
    /// `None` when no site holds its address.
    pub fn place(&self, addr: Ipv4Addr, repair_port: u16) -> Option<Placement> {
        let i = self.site_of(addr)?;
        let me = SocketAddr::new(IpAddr::V4(addr), repair_port);
        // By address and port: agents that share an address (a lab on
        // loopback) are told apart by their repair port.
        let is_me = |a: &SocketAddr| *a == me;
        let mine = &self.sites[i];
        let rank = mine.rendezvous.iter().position(is_me);
        // The site's rendezvous points are a failover order: each fetches
        // from those listed before it, then from above the site, so that
        // one download crosses the WAN while the first stands, and the next
        // carries on from where it got if the first dies. Everyone else
        // asks them all in order.
        let own = &mine.rendezvous[..rank.unwrap_or(mine.rendezvous.len())];
        let above = mine.parent.into_iter().flat_map(|f| self.chain(f));
        let mut seen = HashSet::new();
        let sources = own
            .iter()
            .copied()
            .chain(above.flat_map(|j| self.sites[j].rendezvous.iter().copied()))
            .filter(|a| !is_me(a) && seen.insert(*a))
            .collect();
        let rendezvous = rank.is_some();
        Some(Placement {
            site: mine.site.name.clone(),
            kind: mine.site.kind,
            rendezvous,
            sources,
        })
    }

    /// The site that fetches for `addr`: the nearest, from its own site up
    /// the chain, with rendezvous points. Agents with the same anchor share
    /// its rendezvous points, and stand in for them together.
    pub fn anchor(&self, addr: Ipv4Addr) -> Option<&str> {
        let i = self.site_of(addr)?;
        self.chain(i)
            .find(|&j| !self.sites[j].rendezvous.is_empty())
            .map(|j| self.sites[j].site.name.as_str())
    }

    pub fn sites(&self) -> impl Iterator<Item = &Site> {
        self.sites.iter().map(|c| &c.site)
    }

    pub fn site(&self, name: &str) -> Option<&Site> {
        self.by_name.get(name).map(|&i| &self.sites[i].site)
    }
}

/// The body an administrator writes: the sites alone. `somcast topology
/// sign` adds the rest and signs it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SitesFile {
    pub sites: Vec<Site>,
}

/// A topology document for `sites`, valid from `now` for `valid_s`.
pub fn document(sites: Vec<Site>, now: u64, valid_s: u64) -> Result<TopologyDoc, String> {
    let doc = TopologyDoc {
        doc_type: TOPOLOGY_TYPE.into(),
        format: FORMAT,
        id: document::new_id(),
        issued: now,
        expires: now + valid_s,
        sites,
    };
    Topology::check(doc.clone())?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, subnets: &[&str], parent: Option<&str>, rvp: &[&str]) -> Site {
        Site {
            name: name.into(),
            subnets: subnets.iter().map(|s| s.to_string()).collect(),
            parent: parent.map(String::from),
            kind: SiteKind::Wired,
            rendezvous: rvp.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn doc(sites: Vec<Site>) -> TopologyDoc {
        TopologyDoc {
            doc_type: TOPOLOGY_TYPE.into(),
            format: FORMAT,
            id: "topo1".into(),
            issued: 1000,
            expires: 2000,
            sites,
        }
    }

    fn two_offices() -> Topology {
        let mut wifi = site("a-wifi", &["10.1.3.0/24"], Some("a"), &[]);
        wifi.kind = SiteKind::Wifi;
        Topology::check(doc(vec![
            site("hq", &["10.0.0.0/8"], None, &["10.9.0.5:9000"]),
            site(
                "a",
                &["10.1.1.0/24", "10.1.2.0/24"],
                Some("hq"),
                &["10.1.1.11", "10.1.2.11"],
            ),
            wifi,
            site("b", &["10.2.1.0/24"], None, &["10.2.1.11"]),
        ]))
        .unwrap()
    }

    #[test]
    fn an_agent_maps_to_the_longest_subnet_and_fetches_nearest_first() {
        let t = two_offices();
        let p = t.place("10.1.2.40".parse().unwrap(), 7481).unwrap();
        assert_eq!(p.site, "a");
        assert!(!p.rendezvous);
        let addrs: Vec<String> = p.sources.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["10.1.1.11:7481", "10.1.2.11:7481", "10.9.0.5:9000"]);
        // A's first rendezvous fetches from above its site; the second from
        // the first, then from above (failover without a second download).
        let p = t.place("10.1.1.11".parse().unwrap(), 7481).unwrap();
        assert!(p.rendezvous);
        assert_eq!(p.sources, ["10.9.0.5:9000".parse::<SocketAddr>().unwrap()]);
        let p = t.place("10.1.2.11".parse().unwrap(), 7481).unwrap();
        assert!(p.rendezvous);
        let addrs: Vec<String> = p.sources.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["10.1.1.11:7481", "10.9.0.5:9000"]);
        // The wifi subnet is its own site, its parent's rendezvous its source.
        let p = t.place("10.1.3.7".parse().unwrap(), 7481).unwrap();
        assert_eq!((p.site.as_str(), p.kind), ("a-wifi", SiteKind::Wifi));
        assert_eq!(p.sources.len(), 3);
        // B has no parent: its rendezvous goes to the origin.
        let p = t.place("10.2.1.11".parse().unwrap(), 7481).unwrap();
        assert!(p.rendezvous && p.sources.is_empty());
        // The Wi-Fi subnet stands in with office A; B on its own.
        assert_eq!(t.anchor("10.1.3.7".parse().unwrap()), Some("a"));
        assert_eq!(t.anchor("10.1.1.9".parse().unwrap()), Some("a"));
        assert_eq!(t.anchor("10.2.1.9".parse().unwrap()), Some("b"));
        // The catch-all covers 10/8; an address outside is in no site.
        assert_eq!(
            t.place("10.7.7.7".parse().unwrap(), 7481).unwrap().site,
            "hq"
        );
        assert!(t.place("192.168.1.1".parse().unwrap(), 7481).is_none());
    }

    #[test]
    fn bad_topologies_are_refused_with_the_reason() {
        let cases: Vec<(Vec<Site>, &str)> = vec![
            (
                vec![site("a", &["10.1.1.0/24"], Some("x"), &[])],
                "not a site",
            ),
            (
                vec![site("a", &[], None, &[]), site("a", &[], None, &[])],
                "twice",
            ),
            (vec![site("a", &["10.1.1.1/24"], None, &[])], "host bits"),
            (
                vec![site("a", &["10.1.1.0/33"], None, &[])],
                "prefix length",
            ),
            (vec![site("a", &["fe80::/64"], None, &[])], "IPv4"),
            (vec![site("a", &["10.1.1.0"], None, &[])], "CIDR"),
            (vec![site("a", &[], None, &["host.example"])], "rendezvous"),
            (vec![site("", &[], None, &[])], "printable"),
            (
                vec![
                    site("a", &[], Some("b"), &[]),
                    site("b", &[], Some("a"), &[]),
                ],
                "loops",
            ),
        ];
        for (sites, want) in cases {
            let e = Topology::check(doc(sites)).unwrap_err();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
        let mut d = doc(vec![]);
        d.id = "../x".into();
        assert!(Topology::check(d).is_err());
    }

    #[test]
    fn a_signed_topology_opens_only_with_a_trusted_key_and_in_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let signer = crate::trust::Signer::generate().unwrap();
        let gate = Gate::open(vec![signer.public.clone()], false, dir.path()).unwrap();
        let text =
            serde_json::to_string(&doc(vec![site("a", &["10.1.1.0/24"], None, &[])])).unwrap();
        let env = Envelope::sign(text.clone(), &signer, "topology").unwrap();
        assert_eq!(Topology::open(&env, &gate, 1500).unwrap().id, "topo1");
        assert!(matches!(
            Topology::open(&env, &gate, 2500),
            Err(Refusal::Expired { .. })
        ));
        assert_eq!(
            Topology::open(&Envelope::unsigned(text), &gate, 1500).unwrap_err(),
            Refusal::Unsigned
        );
        // A task's signature does not make a topology.
        let other = Envelope::sign(
            text_of_kind(crate::trust::document::TASK_TYPE),
            &signer,
            "t",
        )
        .unwrap();
        assert!(matches!(
            Topology::open(&other, &gate, 1500),
            Err(Refusal::Malformed(_))
        ));
    }

    fn text_of_kind(kind: &str) -> String {
        format!(
            r#"{{"type":"{kind}","format":1,"id":"x","issued":1000,"expires":2000,"sites":[]}}"#
        )
    }
}
