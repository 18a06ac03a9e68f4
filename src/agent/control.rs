//! The thin tokio side of the control group: two sockets, one timer, the
//! presence machine and one election machine per running task, and the rank
//! inputs refreshed now and then. All decisions are the state machines'.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use multicast::wire::{self, Frame, Rank};
use scanner::PresenceEvent;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::Agent;

/// The control group socket (multicast in) and the agent's own unicast
/// socket (everything out, probes and answers in).
pub struct Sockets {
    group: UdpSocket,
    unicast: UdpSocket,
}

pub fn open(agent: &Agent) -> anyhow::Result<Sockets> {
    let group_addr = agent.config.control_group;
    let (group, report) = multicast::socket::open_receiver(group_addr, agent.iface_addr)
        .with_context(|| format!("joining the control group {group_addr}"))?;
    if report.capped() {
        tracing::debug!("control socket buffer capped at {} bytes", report.granted);
    }
    // TTL 1: presence is about this subnet only. The unicast socket takes
    // the control port on the interface's own address, where neighbour-cache
    // probes look for it; a second agent on one host (labs, tests) cannot,
    // and takes any port: its announcements say where it is.
    let unicast = match multicast::socket::open_unicast(agent.iface_addr, group_addr.port(), 1) {
        Ok(s) => s,
        Err(_) => multicast::socket::open_sender(agent.iface_addr, 1)?,
    };
    group.set_nonblocking(true)?;
    unicast.set_nonblocking(true)?;
    Ok(Sockets {
        group: UdpSocket::from_std(group)?,
        unicast: UdpSocket::from_std(unicast)?,
    })
}

/// How often rank inputs (free disk, uptime) and neighbour hints are
/// refreshed, in presence intervals.
const REFRESH_INTERVALS: u32 = 6;

pub async fn run(
    agent: Arc<Agent>,
    sockets: Sockets,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let group: SocketAddr = agent.config.control_group.into();
    let mut gbuf = vec![0u8; multicast::wire::MAX_DATAGRAM];
    let mut ubuf = vec![0u8; multicast::wire::MAX_DATAGRAM];
    let mut refresh = tokio::time::interval(agent.config.presence_interval * REFRESH_INTERVALS);
    // One seal for both sockets: a sender's counters form one stream.
    let mut link = multicast::auth::Link::new(agent.fleet.as_ref(), agent.auth.clone());
    loop {
        let wake = next_wake(&agent);
        tokio::select! {
            r = sockets.group.recv_from(&mut gbuf) => {
                if let Some((n, from)) = received(r)
                    && let Some(plain) = link.incoming(&gbuf[..n])
                {
                    handle(&agent, from, plain);
                }
            }
            r = sockets.unicast.recv_from(&mut ubuf) => {
                if let Some((n, from)) = received(r)
                    && let Some(plain) = link.incoming(&ubuf[..n])
                {
                    handle(&agent, from, plain);
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                // HAVE goes out with every announcement, as fresh as it is.
                let held = agent.held();
                let mut p = agent.presence();
                if p.local().held != held {
                    let mut me = p.local().clone();
                    me.held = held;
                    p.set_local(me);
                }
                p.handle_timeout(now);
                drop(p);
                for slot in agent.elections().values_mut() {
                    if slot.election.poll_timeout().is_some_and(|t| t <= now) {
                        slot.election.handle_timeout(now);
                    }
                }
            }
            _ = agent.control_wake.notified() => {}
            _ = refresh.tick() => refresh_local(&agent),
            _ = stop.changed() => {
                agent.presence().leave();
                flush(&agent, &sockets.unicast, group, &mut link).await;
                return Ok(());
            }
        }
        flush(&agent, &sockets.unicast, group, &mut link).await;
    }
}

fn next_wake(agent: &Agent) -> Instant {
    let presence = agent.presence().poll_timeout();
    let elections = agent.elections();
    let timers = elections.values().filter_map(|s| s.election.poll_timeout());
    // Presence always has a timer; a second is a safe bound regardless.
    presence
        .into_iter()
        .chain(timers)
        .min()
        .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(1))
}

/// One datagram from the control group or the unicast socket: presence
/// frames to presence, claims and offers to every running election.
fn handle(agent: &Agent, from: SocketAddr, bytes: &[u8]) {
    let now = Instant::now();
    match wire::decode(bytes) {
        Ok(d) if candidate(&d.frame).is_some() => {
            let node = candidate(&d.frame).unwrap_or_default();
            let vouched = agent.presence().vouches_for(node, from.ip());
            for slot in agent.elections().values_mut() {
                if let Err(why) = slot.election.handle_frame_vouched(now, &d.frame, vouched) {
                    agent
                        .offers_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!("dropped from {from}: {why}");
                }
            }
        }
        Ok(d) => agent.presence().handle_frame(now, from, d.frame),
        // Presence counts what does not decode.
        Err(_) => agent.presence().handle_datagram(now, from, bytes),
    }
}

/// The node a claim or offer speaks for.
fn candidate(frame: &Frame<'_>) -> Option<u64> {
    match frame {
        Frame::Claim(c) => Some(c.standing.node),
        Frame::Offer(o) => Some(o.standing.node),
        _ => None,
    }
}

fn received(r: std::io::Result<(usize, SocketAddr)>) -> Option<(usize, SocketAddr)> {
    match r {
        Ok(x) => Some(x),
        Err(e) => {
            // ICMP errors from earlier unicast sends surface here on some
            // systems; nothing to do but go on.
            tracing::debug!("control socket: {e}");
            None
        }
    }
}

async fn flush(
    agent: &Agent,
    socket: &UdpSocket,
    group: SocketAddr,
    link: &mut multicast::auth::Link,
) {
    let (mut out, events) = {
        let mut p = agent.presence();
        let out: Vec<_> = std::iter::from_fn(|| p.poll_transmit()).collect();
        let events: Vec<_> = std::iter::from_fn(|| p.poll_event()).collect();
        (out, events)
    };
    for slot in agent.elections().values_mut() {
        out.extend(std::iter::from_fn(|| slot.election.poll_transmit()));
        while let Some(ev) = slot.election.poll_event() {
            // The task may have ended; its slot goes with it.
            let _ = slot.events.send(ev);
        }
    }
    for t in out {
        let to = t.to(group);
        if let Err(e) = socket.send_to(link.outgoing(&t.bytes), to).await {
            tracing::debug!("presence send to {to}: {e}");
        }
    }
    for ev in events {
        match ev {
            PresenceEvent::Joined { node, addr } => {
                tracing::info!("peer {node:016x} joined from {addr}")
            }
            PresenceEvent::Restarted { node, addr } => {
                tracing::info!("peer {node:016x} restarted, now at {addr}")
            }
            PresenceEvent::Left { node, because } => {
                tracing::info!("peer {node:016x} left ({because:?})")
            }
            PresenceEvent::Foreign { node, addr } => {
                tracing::info!("agent {node:016x} heard from another subnet ({addr}); kept apart")
            }
        }
    }
}

/// Rank inputs and neighbour hints, read again now and then.
fn refresh_local(agent: &Agent) {
    let free = fs4::available_space(&agent.config.cache).unwrap_or(0);
    let wired = agent
        .iface_name
        .as_deref()
        .and_then(|n| {
            let inv = scanner::inventory::Inventory::scan().ok()?;
            inv.interfaces.into_iter().find(|i| i.name == n)?.wireless
        })
        .map(|wireless| !wireless);
    let port = agent.config.control_group.port();
    let hints: Vec<SocketAddr> = scanner::neighbours::neighbours(agent.iface_name.as_deref())
        .into_iter()
        .filter(|ip| *ip != agent.iface_addr)
        .map(|ip| SocketAddrV4::new(ip, port).into())
        .collect();
    let mut p = agent.presence();
    let mut me = p.local().clone();
    me.held = agent.held();
    me.rank = Rank {
        preference: agent.config.preference,
        wired,
        free_disk_mib: free / (1024 * 1024),
        uptime_s: agent.started.elapsed().as_secs(),
    };
    p.set_local(me);
    p.add_candidates(hints);
}
