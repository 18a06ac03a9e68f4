//! Which interface to use: `--iface NAME|ADDR`, or the one holding the
//! default route.

use std::net::Ipv4Addr;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum IfaceError {
    #[error("cannot list network interfaces: {0}")]
    List(#[source] std::io::Error),
    #[error(
        "no interface named or addressed {spec:?}; interfaces with IPv4 here: {known} (run `somcast scan` to see them all)"
    )]
    NotFound { spec: String, known: String },
    #[error("interface {0} has no IPv4 address; multicast needs one")]
    NoIpv4(String),
    #[error("no interface with an IPv4 address is up; pass --iface 127.0.0.1 to test on loopback")]
    NoneUp,
}

/// One IPv4 address of one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V4Interface {
    pub name: String,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub up: bool,
    pub loopback: bool,
}

/// Every IPv4 address of every interface.
pub fn ipv4_interfaces() -> Result<Vec<V4Interface>, IfaceError> {
    let all = if_addrs::get_if_addrs().map_err(IfaceError::List)?;
    Ok(all
        .into_iter()
        .filter_map(|i| match &i.addr {
            if_addrs::IfAddr::V4(v4) => Some(V4Interface {
                up: i.is_oper_up() || v4.ip.is_loopback(),
                loopback: v4.ip.is_loopback(),
                name: i.name.clone(),
                addr: v4.ip,
                prefix_len: v4.prefixlen,
            }),
            _ => None,
        })
        .collect())
}

/// Resolves `--iface`: an IPv4 address of this host, or an interface name.
pub fn resolve(spec: &str) -> Result<Ipv4Addr, IfaceError> {
    let all = ipv4_interfaces()?;
    resolve_in(spec, &all)
}

fn resolve_in(spec: &str, all: &[V4Interface]) -> Result<Ipv4Addr, IfaceError> {
    if let Ok(addr) = spec.parse::<Ipv4Addr>() {
        // An address is taken as given when it is ours; 0.0.0.0 lets the
        // kernel choose.
        if addr.is_unspecified() || all.iter().any(|i| i.addr == addr) {
            return Ok(addr);
        }
    }
    if let Some(i) = all.iter().find(|i| i.name == spec) {
        return Ok(i.addr);
    }
    if let Ok(names) = if_addrs::get_if_addrs()
        && names.iter().any(|i| i.name == spec)
    {
        return Err(IfaceError::NoIpv4(spec.to_owned()));
    }
    let known = all
        .iter()
        .map(|i| format!("{} ({})", i.name, i.addr))
        .collect::<Vec<_>>()
        .join(", ");
    Err(IfaceError::NotFound {
        spec: spec.to_owned(),
        known,
    })
}

/// The interface for multicast when none is given: the one holding the
/// default route, else the first up, non-loopback IPv4 interface.
pub fn default_ipv4() -> Result<V4Interface, IfaceError> {
    let all = ipv4_interfaces()?;
    if let Some(name) = default_route_iface()
        && let Some(i) = all.iter().find(|i| i.name == name)
    {
        return Ok(i.clone());
    }
    all.into_iter()
        .find(|i| i.up && !i.loopback)
        .ok_or(IfaceError::NoneUp)
}

/// The interface of the IPv4 default route, from /proc/net/route.
#[cfg(target_os = "linux")]
pub fn default_route_iface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_route_table(&table)
}

/// Elsewhere the routing table takes system calls we do without: callers
/// fall back to the first up interface.
#[cfg(not(target_os = "linux"))]
pub fn default_route_iface() -> Option<String> {
    None
}

/// Picks the default route (destination 0, mask 0) of the lowest metric.
pub fn parse_route_table(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
                return None;
            }
            let metric: u32 = f[6].parse().ok()?;
            Some((metric, f[0].to_owned()))
        })
        .min()
        .map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<V4Interface> {
        vec![
            V4Interface {
                name: "lo".into(),
                addr: Ipv4Addr::LOCALHOST,
                prefix_len: 8,
                up: true,
                loopback: true,
            },
            V4Interface {
                name: "eth0".into(),
                addr: Ipv4Addr::new(10, 99, 0, 2),
                prefix_len: 24,
                up: true,
                loopback: false,
            },
        ]
    }

    #[test]
    fn resolves_names_and_own_addresses() {
        let all = sample();
        assert_eq!(
            resolve_in("eth0", &all).unwrap(),
            Ipv4Addr::new(10, 99, 0, 2)
        );
        assert_eq!(resolve_in("127.0.0.1", &all).unwrap(), Ipv4Addr::LOCALHOST);
    }

    #[test]
    fn unknown_interface_lists_the_known_ones() {
        let err = resolve_in("wlan7", &sample()).unwrap_err().to_string();
        assert!(
            err.contains("wlan7") && err.contains("eth0 (10.99.0.2)"),
            "{err}"
        );
        let err = resolve_in("192.0.2.1", &sample()).unwrap_err();
        assert!(matches!(err, IfaceError::NotFound { .. }));
    }

    #[test]
    fn default_route_with_lowest_metric_wins() {
        let table = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth1\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\n\
                     eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\n\
                     eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(parse_route_table(table).as_deref(), Some("eth0"));
        assert_eq!(parse_route_table("Iface\n"), None);
    }
}
