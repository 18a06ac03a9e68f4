//! `somcast scan`: this host's interfaces, subnets, the interface multicast
//! would use, and the kernel limits that matter for it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::Context;
use scanner::inventory::{Interface, Inventory};
use scanner::neighbours::neighbours;
use scanner::probe::{Answer, ProbeReport};
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
    let probe = if args.probe {
        Some(run_probe(args, chosen, &mut advice)?)
    } else {
        None
    };
    if args.json {
        let mut v = to_json(&inv, chosen, &advice);
        if let Some((via, report)) = &probe {
            v["probe"] = probe_json(args, *via, report);
        }
        println!("{v}");
    } else {
        print_text(&inv, chosen, &advice);
        if let Some((via, report)) = &probe {
            print_probe(args, *via, report);
        }
    }
    // A probe nobody answered is a failed check, for scripts.
    Ok(probe.is_none_or(|(_, r)| !r.answers.is_empty()))
}

fn run_probe(
    args: &ScanArgs,
    chosen: Option<&Interface>,
    advice: &mut Vec<String>,
) -> anyhow::Result<(Ipv4Addr, ProbeReport)> {
    let via = crate::lab::pick_iface(args.iface.as_deref())?;
    let port = args.control_group.port();
    let hints: Vec<SocketAddr> = neighbours(chosen.map(|i| i.name.as_str()))
        .into_iter()
        .filter(|ip| *ip != via)
        .map(|ip| SocketAddrV4::new(ip, port).into())
        .collect();
    let nonce = multicast::driver::random_id();
    let fleet = crate::trust::keys::read_fleet_keys(args.fleet_key.as_slice())?;
    let report = scanner::probe::probe(
        args.control_group,
        via,
        &hints,
        args.wait,
        nonce,
        fleet.as_ref(),
    )
    .with_context(|| format!("probing {} via {via}", args.control_group))?;
    if report.answers.is_empty() {
        advice.push(format!(
            "no agent answered on {} via {via} within {:?}: check that agents run there \
             (somcast agent) with the same control group, that no firewall drops UDP port {port} \
             (in and out, on this host and theirs), that the switch's IGMP snooping has a querier \
             or is off, that Wi-Fi client isolation is off, and that you give the fleet's key \
             (--fleet-key) if its agents use one",
            args.control_group, args.wait
        ));
    }
    let unicast_only: Vec<String> = report
        .answers
        .iter()
        .filter(|a| !a.by_multicast)
        .map(|a| a.from.ip().to_string())
        .collect();
    if !unicast_only.is_empty() {
        advice.push(format!(
            "{} agent(s) ({}) answered a unicast probe but not the probe to {}: multicast from \
             this host does not reach them. Likely causes: IGMP snooping without a querier on the \
             switch (it prunes groups nobody is seen to join), Wi-Fi client isolation, or a \
             firewall that drops the group. Agents there cannot take part in the subnet's election \
             or sessions until the group passes",
            unicast_only.len(),
            unicast_only.join(", "),
            args.control_group
        ));
    }
    Ok((via, report))
}

fn answer_json(a: &Answer) -> serde_json::Value {
    let an = &a.announce;
    json!({
        "node": format!("{:016x}", an.node),
        "address": a.from.ip().to_string(),
        "port": a.from.port(),
        "rtt_ms": a.rtt.as_secs_f64() * 1000.0,
        "version": an.version,
        "api_port": an.api_port,
        "addresses": an.addrs.iter()
            .map(|x| format!("{}/{}", Ipv4Addr::from(x.addr), x.prefix))
            .collect::<Vec<_>>(),
        "rank": {
            "preference": an.rank.preference,
            "wired": an.rank.wired,
            "free_disk_mib": an.rank.free_disk_mib,
            "uptime_s": an.rank.uptime_s,
        },
        "contents_held": an.held.len(),
        "reached_by": if a.by_multicast { "multicast" } else { "unicast only" },
    })
}

fn probe_json(args: &ScanArgs, via: Ipv4Addr, r: &ProbeReport) -> serde_json::Value {
    json!({
        "control_group": args.control_group.to_string(),
        "via": via.to_string(),
        "wait_ms": args.wait.as_millis() as u64,
        "agents": r.answers.iter().map(answer_json).collect::<Vec<_>>(),
        "ignored_datagrams": r.ignored,
    })
}

fn print_probe(args: &ScanArgs, via: Ipv4Addr, r: &ProbeReport) {
    println!(
        "probe of {} via {via}: {} agent(s) answered within {:?}",
        args.control_group,
        r.answers.len(),
        args.wait
    );
    if r.answers.is_empty() {
        return; // the advice above says what to check
    }
    println!("node              address                rtt       version  api    reached by");
    for a in &r.answers {
        println!(
            "{:016x}  {:<21}  {:>6.2} ms  {:<7}  {:<5}  {}",
            a.announce.node,
            a.from.to_string(),
            a.rtt.as_secs_f64() * 1000.0,
            a.announce.version,
            a.announce.api_port,
            if a.by_multicast {
                "multicast"
            } else {
                "unicast only"
            }
        );
    }
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
