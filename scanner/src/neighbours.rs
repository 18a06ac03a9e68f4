//! Discovery hints: the hosts this one has talked to recently (the
//! neighbour / ARP cache) are candidate peers, probed by unicast so agents
//! are found even where multicast does not reach.

use std::net::Ipv4Addr;

/// `/proc/net/arp` flag: the entry is complete (the address resolved).
const ATF_COM: u32 = 0x2;

/// IPv4 neighbours with a resolved hardware address, on `device` only when
/// given. Empty where the system offers no neighbour table we can read.
pub fn neighbours(device: Option<&str>) -> Vec<Ipv4Addr> {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string("/proc/net/arp")
            .map(|t| parse_arp(&t, device))
            .unwrap_or_default()
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Windows (GetIpNetTable2) and macOS (sysctl NET_RT_FLAGS) have
        // neighbour tables too; until they are read, multicast presence and
        // probes are the only discovery there.
        let _ = device;
        Vec::new()
    }
}

/// Parses the text of `/proc/net/arp`.
pub fn parse_arp(text: &str, device: Option<&str>) -> Vec<Ipv4Addr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 {
                return None;
            }
            let ip: Ipv4Addr = f[0].parse().ok()?;
            let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).ok()?;
            let complete = flags & ATF_COM != 0;
            let on_device = device.is_none_or(|d| d == f[5]);
            (complete && on_device).then_some(ip)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_entries_on_the_device_are_candidates() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.77.0.2        0x1         0x2         5a:1b:00:00:00:02     *        eth0\n\
                    10.77.0.3        0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                    192.168.1.1      0x1         0x2         5a:1b:00:00:00:09     *        wlan0\n\
                    garbage line\n";
        assert_eq!(parse_arp(text, Some("eth0")), [Ipv4Addr::new(10, 77, 0, 2)]);
        assert_eq!(parse_arp(text, None).len(), 2);
    }
}
