//! `somcast scan`: this host's interfaces, subnets, the interface multicast
//! would use, and the kernel limits that matter for it.

use anyhow::Context;
use scanner::inventory::{Interface, Inventory};
use serde_json::json;

use crate::cli::ScanArgs;

/// Receive buffer the data plane asks for; below it the kernel caps it.
const WANTED_RMEM: u64 = multicast::socket::WANTED_RCVBUF as u64;

pub fn run(args: &ScanArgs) -> anyhow::Result<bool> {
    let inv = Inventory::scan().context("scanning interfaces")?;
    let chosen: Option<&Interface> = match &args.iface {
        Some(spec) => {
            let addr = scanner::resolve(spec)?;
            inv.interfaces.iter().find(|i| {
                i.addresses
                    .iter()
                    .any(|a| a.addr == std::net::IpAddr::V4(addr))
            })
        }
        None => inv.multicast_default(),
    };
    let mut advice = Vec::new();
    if let Some(r) = inv.limits.rmem_max
        && r < WANTED_RMEM
    {
        advice.push(format!(
            "net.core.rmem_max is {r}: receivers get a smaller buffer than the {WANTED_RMEM} bytes they ask for and may drop datagrams at high rates; raise it with sysctl -w net.core.rmem_max={}",
            WANTED_RMEM * 2
        ));
    }
    match chosen {
        None => advice.push(
            "no interface with IPv4 is up besides loopback: pass --iface 127.0.0.1 for a test on this host".into(),
        ),
        Some(i) if i.wireless == Some(true) => advice.push(format!(
            "{} is wireless: multicast over Wi-Fi is slow and lossy, and client isolation may block it",
            i.name
        )),
        Some(i) if i.multicast == Some(false) => advice.push(format!(
            "{} has multicast switched off (ip link set {} multicast on)",
            i.name, i.name
        )),
        Some(_) => {}
    }
    if args.json {
        println!("{}", to_json(&inv, chosen, &advice));
    } else {
        print_text(&inv, chosen, &advice);
    }
    Ok(true)
}

fn iface_json(i: &Interface) -> serde_json::Value {
    json!({
        "name": i.name,
        "index": i.index,
        "up": i.up,
        "loopback": i.loopback,
        "multicast": i.multicast,
        "mtu": i.mtu,
        "wireless": i.wireless,
        "addresses": i.addresses.iter().map(|a| json!({
            "address": a.addr.to_string(),
            "prefix_len": a.prefix_len,
            "subnet": a.subnet(),
        })).collect::<Vec<_>>(),
    })
}

fn to_json(inv: &Inventory, chosen: Option<&Interface>, advice: &[String]) -> serde_json::Value {
    json!({
        "interfaces": inv.interfaces.iter().map(iface_json).collect::<Vec<_>>(),
        "default_route_interface": inv.default_route,
        "multicast_interface": chosen.map(|i| i.name.clone()),
        "kernel": { "rmem_max": inv.limits.rmem_max, "wmem_max": inv.limits.wmem_max },
        "advice": advice,
    })
}

fn print_text(inv: &Inventory, chosen: Option<&Interface>, advice: &[String]) {
    let yes_no = |v: Option<bool>, y: &str, n: &str| match v {
        Some(true) => y.to_owned(),
        Some(false) => n.to_owned(),
        None => "?".to_owned(),
    };
    println!("interface        state  mtu    link      multicast  addresses");
    for i in &inv.interfaces {
        let addrs: Vec<String> = i
            .addresses
            .iter()
            .map(|a| format!("{}/{} (subnet {})", a.addr, a.prefix_len, a.subnet()))
            .collect();
        println!(
            "{:<16} {:<6} {:<6} {:<9} {:<10} {}",
            i.name,
            if i.up { "up" } else { "down" },
            i.mtu.map_or("?".into(), |m| m.to_string()),
            if i.loopback {
                "loopback".to_owned()
            } else {
                yes_no(i.wireless, "wireless", "wired")
            },
            yes_no(i.multicast, "yes", "no"),
            addrs.join(", ")
        );
    }
    println!(
        "multicast interface: {}",
        chosen.map_or("none".into(), |i| i.name.clone())
    );
    let fmt = |v: Option<u64>| v.map_or("unknown".into(), |v| v.to_string());
    println!(
        "kernel: net.core.rmem_max {}, net.core.wmem_max {}",
        fmt(inv.limits.rmem_max),
        fmt(inv.limits.wmem_max)
    );
    for a in advice {
        println!("note: {a}");
    }
}
