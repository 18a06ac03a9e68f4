//! What this host's network looks like: interfaces, their addresses and
//! subnets, which one carries multicast by default, and the kernel limits
//! that matter for it. Linux reads /sys and /proc; elsewhere what the
//! portable interface list gives, with the rest left unknown.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::iface::{IfaceError, default_route_iface};

/// One address of an interface with its subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Address {
    /// The network this address is in, as `10.0.0.0/24`.
    pub fn subnet(&self) -> String {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len.min(32)))
                    .unwrap_or(0);
                format!(
                    "{}/{}",
                    Ipv4Addr::from(u32::from(a) & mask),
                    self.prefix_len
                )
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len.min(128)))
                    .unwrap_or(0);
                format!(
                    "{}/{}",
                    Ipv6Addr::from(u128::from(a) & mask),
                    self.prefix_len
                )
            }
        }
    }
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: Option<u32>,
    pub up: bool,
    pub loopback: bool,
    /// `None` where the system does not say.
    pub multicast: Option<bool>,
    pub mtu: Option<u32>,
    /// Wired or wireless; `None` where the system does not say.
    pub wireless: Option<bool>,
    pub addresses: Vec<Address>,
}

/// Kernel limits on socket buffers, where readable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelLimits {
    pub rmem_max: Option<u64>,
    pub wmem_max: Option<u64>,
}

/// The host's network as the scanner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    pub interfaces: Vec<Interface>,
    /// The interface holding the IPv4 default route, if known.
    pub default_route: Option<String>,
    pub limits: KernelLimits,
}

impl Inventory {
    /// Reads the host's interfaces now.
    pub fn scan() -> Result<Self, IfaceError> {
        let list = if_addrs::get_if_addrs().map_err(IfaceError::List)?;
        let mut by_name: BTreeMap<String, Interface> = BTreeMap::new();
        for i in list {
            let entry = by_name.entry(i.name.clone()).or_insert_with(|| {
                let sys = sys_facts(&i.name);
                Interface {
                    name: i.name.clone(),
                    index: i.index,
                    up: sys.up.unwrap_or_else(|| i.is_oper_up() || i.is_loopback()),
                    loopback: i.is_loopback(),
                    multicast: sys.multicast,
                    mtu: sys.mtu,
                    wireless: sys.wireless,
                    addresses: Vec::new(),
                }
            });
            let (addr, prefix_len) = match &i.addr {
                if_addrs::IfAddr::V4(v4) => (IpAddr::V4(v4.ip), v4.prefixlen),
                if_addrs::IfAddr::V6(v6) => (IpAddr::V6(v6.ip), v6.prefixlen),
            };
            entry.addresses.push(Address { addr, prefix_len });
        }
        Ok(Self {
            interfaces: by_name.into_values().collect(),
            default_route: default_route_iface(),
            limits: kernel_limits(),
        })
    }

    /// The interface multicast goes out of when none is named: the one
    /// holding the default route, else the first up, multicast-capable,
    /// non-loopback interface with an IPv4 address.
    pub fn multicast_default(&self) -> Option<&Interface> {
        let has_v4 = |i: &&Interface| i.addresses.iter().any(|a| a.addr.is_ipv4());
        self.default_route
            .as_ref()
            .and_then(|name| self.interfaces.iter().find(|i| &i.name == name))
            .filter(has_v4)
            .or_else(|| {
                self.interfaces
                    .iter()
                    .filter(has_v4)
                    .find(|i| i.up && !i.loopback && i.multicast != Some(false))
            })
    }
}

#[derive(Default)]
struct SysFacts {
    up: Option<bool>,
    multicast: Option<bool>,
    mtu: Option<u32>,
    wireless: Option<bool>,
}

/// Linux: flags, MTU and wireless-ness from /sys/class/net.
#[cfg(target_os = "linux")]
fn sys_facts(name: &str) -> SysFacts {
    // Interface names never hold '/', but one from a hostile source could.
    if name.contains('/') || name.starts_with('.') {
        return SysFacts::default();
    }
    let dir = std::path::Path::new("/sys/class/net").join(name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let flags = read("flags").and_then(|s| parse_flags(&s));
    SysFacts {
        // IFF_UP and IFF_MULTICAST from <linux/if.h>.
        up: flags.map(|f| f & 0x1 != 0),
        multicast: flags.map(|f| f & 0x1000 != 0),
        mtu: read("mtu").and_then(|s| s.trim().parse().ok()),
        wireless: Some(dir.join("wireless").exists() || dir.join("phy80211").exists()),
    }
}

#[cfg(not(target_os = "linux"))]
fn sys_facts(_name: &str) -> SysFacts {
    SysFacts::default()
}

/// Parses /sys/class/net/*/flags: hexadecimal with a 0x prefix.
pub fn parse_flags(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

#[cfg(target_os = "linux")]
fn kernel_limits() -> KernelLimits {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    KernelLimits {
        rmem_max: read("/proc/sys/net/core/rmem_max"),
        wmem_max: read("/proc/sys/net/core/wmem_max"),
    }
}

#[cfg(not(target_os = "linux"))]
fn kernel_limits() -> KernelLimits {
    KernelLimits::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_masked() {
        let a = Address {
            addr: "10.99.0.7".parse().unwrap(),
            prefix_len: 24,
        };
        assert_eq!(a.subnet(), "10.99.0.0/24");
        let a = Address {
            addr: "192.168.1.130".parse().unwrap(),
            prefix_len: 25,
        };
        assert_eq!(a.subnet(), "192.168.1.128/25");
        let a = Address {
            addr: "fe80::1:2:3:4".parse().unwrap(),
            prefix_len: 64,
        };
        assert_eq!(a.subnet(), "fe80::/64");
        let a = Address {
            addr: "10.1.2.3".parse().unwrap(),
            prefix_len: 0,
        };
        assert_eq!(a.subnet(), "0.0.0.0/0");
    }

    #[test]
    fn sys_flags_parse() {
        assert_eq!(parse_flags("0x1003\n"), Some(0x1003));
        assert_eq!(parse_flags("junk"), None);
    }

    fn iface(name: &str, up: bool, loopback: bool, addr: &str) -> Interface {
        Interface {
            name: name.into(),
            index: None,
            up,
            loopback,
            multicast: Some(true),
            mtu: Some(1500),
            wireless: Some(false),
            addresses: vec![Address {
                addr: addr.parse().unwrap(),
                prefix_len: 24,
            }],
        }
    }

    #[test]
    fn default_route_wins_then_first_up_non_loopback() {
        let inv = Inventory {
            interfaces: vec![
                iface("lo", true, true, "127.0.0.1"),
                iface("eth0", false, false, "10.0.0.2"),
                iface("eth1", true, false, "10.0.1.2"),
            ],
            default_route: None,
            limits: KernelLimits::default(),
        };
        assert_eq!(inv.multicast_default().unwrap().name, "eth1");
        let inv = Inventory {
            default_route: Some("eth0".into()),
            ..inv
        };
        assert_eq!(inv.multicast_default().unwrap().name, "eth0");
    }

    #[test]
    fn this_host_has_a_loopback_interface() {
        let inv = Inventory::scan().unwrap();
        let lo = inv
            .interfaces
            .iter()
            .find(|i| i.loopback)
            .expect("a loopback interface");
        assert!(
            lo.addresses
                .iter()
                .any(|a| a.addr == IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }
}
