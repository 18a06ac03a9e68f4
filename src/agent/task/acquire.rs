//! Getting every block of a task's package: the election, then
//! representing (peers, origin, multicast pipelined behind the fetch) or
//! receiving (the multicast, then peers, then the origin).

use super::peers::{Leftovers, PEER_STALL, from_peers_only, peer_repair};
use super::receive::{Received, receive};
use super::represent::represent;
use super::upstream::origin_fetch;
use super::*;
use crate::flow;
use crate::topology::SiteKind;

/// The multicast session an election settled on: its id, data group and
/// start.
#[derive(Clone, Copy)]
pub(super) struct Session {
    pub session: u64,
    pub group: SocketAddrV4,
    pub start: Instant,
}

/// Gets every block: election, then representing or receiving, then the
/// origin for what is still missing.
pub(super) async fn acquire(r: &Run, partial: &Arc<Partial>) -> anyhow::Result<()> {
    if flow::start(r.agent.site_kind()) == flow::Start::OnItsOwn {
        r.note("vpn site: fetching on its own, from the nearest source".into());
        r.state(State::Fetching);
        return origin_fetch(r, partial).await;
    }
    r.state(State::Electing);
    let mut rx = stand(r, partial);
    let mut pending: Option<ElectionEvent> = None;
    // Symbols of unfinished blocks from a session that was interrupted
    // (its representative died): they count in the next one.
    let mut carried: Leftovers = Vec::new();
    loop {
        let ev = match pending.take() {
            Some(ev) => ev,
            None => tokio::select! {
                ev = rx.recv() => ev.ok_or_else(|| anyhow!("the control loop stopped"))?,
                _ = r.until_cancelled() => bail!("cancelled"),
            },
        };
        match ev {
            ElectionEvent::Elected {
                session,
                group,
                start,
            } => {
                update(&r.agent, &r.id, |s| s.role = Some("representative".into()));
                r.note(format!(
                    "representative: multicast to {group} in {:?}",
                    start.saturating_duration_since(Instant::now())
                ));
                let joined = Session {
                    session,
                    group,
                    start,
                };
                match represent(r, partial, joined, &mut rx).await? {
                    None => return Ok(()),
                    Some(next) => pending = Some(next),
                }
            }
            ElectionEvent::Follow {
                representative,
                session,
                group,
                start,
            } => {
                let joined = Session {
                    session,
                    group,
                    start,
                };
                let preload = std::mem::take(&mut carried);
                match follow(r, partial, representative, joined, &mut rx, preload).await? {
                    Followed::Done => return Ok(()),
                    Followed::Next(next, left) => {
                        pending = next;
                        carried = left;
                    }
                }
            }
            ElectionEvent::SteppedDown => r.state(State::Electing),
            ElectionEvent::RepresentativeLost { representative } => {
                r.note(format!(
                    "representative {representative:016x} fell silent: electing again"
                ));
                r.state(State::Electing);
                // Stand on what is held now: the agent with most of the
                // content should take over.
                let standing = r.agent.standing(held_permille(partial));
                if let Some(slot) = r.agent.elections().get_mut(&r.id) {
                    slot.election.set_standing(standing);
                }
            }
        }
    }
}

/// Share of the package held, in thousandths: what the agent stands on.
fn held_permille(partial: &Arc<Partial>) -> u16 {
    let blocks = partial.blocks();
    (u64::from(blocks.done()) * 1000 / u64::from(blocks.count().max(1))) as u16
}

/// Enters the task's election, standing on what is held: its events.
fn stand(r: &Run, partial: &Arc<Partial>) -> mpsc::UnboundedReceiver<ElectionEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let standing = r.agent.standing(held_permille(partial));
    let election = Election::new(
        ElectionConfig {
            startup_delay: Duration::from_millis(r.spec.delay_ms.unwrap_or(DEFAULT_DELAY_MS)),
            ..ElectionConfig::default()
        },
        r.m.content,
        standing,
        multicast::driver::random_id(),
        data_group(&r.m.content),
        Instant::now(),
        multicast::driver::random_id(),
    );
    r.agent.elections().insert(
        r.id.clone(),
        ElectionSlot {
            election,
            events: tx,
        },
    );
    r.agent.control_wake.notify_one();
    rx
}

/// Whether `node`, heard twice by presence, announces blocks of this
/// task's content: a representative that fetches, whatever its multicast.
fn holds_some(r: &Run, node: u64) -> bool {
    let prefix = &r.m.content[..8];
    r.agent.presence().peers().any(|p| {
        p.node() == node
            && p.confirmed()
            && p.announce
                .held
                .iter()
                .any(|h| h.content == prefix && h.blocks_done > 0)
    })
}

/// What following a representative came to.
enum Followed {
    /// Every block is here.
    Done,
    /// The election goes on: the event that came meanwhile, if any, and
    /// the symbols of unfinished blocks for the next session.
    Next(Option<ElectionEvent>, Leftovers),
}

/// A receiver of `representative`'s session: the multicast (none on
/// Wi-Fi), then what [`flow::after_session`] says: peers and the origin
/// for what it missed, or back to the election.
async fn follow(
    r: &Run,
    partial: &Arc<Partial>,
    representative: u64,
    joined: Session,
    rx: &mut mpsc::UnboundedReceiver<ElectionEvent>,
    preload: Leftovers,
) -> anyhow::Result<Followed> {
    let kind = r.agent.site_kind();
    update(&r.agent, &r.id, |s| s.role = Some("receiver".into()));
    let received = if flow::receives_multicast(kind) {
        r.note(format!(
            "receiver of {representative:016x} on {}",
            joined.group
        ));
        let _listening = super::upstream::listen_for_members(r);
        receive(r, partial, joined, rx, preload).await?
    } else {
        r.note(format!(
            "wifi site: taking the package from peers over TCP as representative {representative:016x} fetches it"
        ));
        Received::NoShow(preload)
    };
    let end = received.end();
    let holds = end == flow::SessionEnd::NoShow && holds_some(r, representative);
    let next = flow::after_session(end, kind, holds);
    let (event, left, why) = received.into_parts();
    match next {
        flow::Next::Done => Ok(Followed::Done),
        flow::Next::PeersThenOrigin => {
            r.note(format!(
                "multicast left blocks missing ({}): repairing from peers",
                why.unwrap_or_default()
            ));
            repair_then_origin(r, partial, left).await?;
            Ok(Followed::Done)
        }
        flow::Next::Elect { abandon: false } => Ok(Followed::Next(event, left)),
        flow::Next::Elect { abandon: true } => {
            r.note(format!(
                "representative {representative:016x} offered the content but sent nothing: electing again without it"
            ));
            abandon(r, representative);
            Ok(Followed::Next(None, left))
        }
        flow::Next::PeersOnly { on_stall } => {
            if end == flow::SessionEnd::LeftBehind {
                r.note(format!(
                    "left behind by representative {representative:016x} as far slower than the rest: taking the rest from peers"
                ));
            } else if kind != SiteKind::Wifi {
                r.note(format!(
                    "multicast from representative {representative:016x} does not arrive here, though it holds blocks: taking the package from peers over unicast"
                ));
            }
            r.state(State::Repairing);
            if from_peers_only(r, partial, left).await? {
                return Ok(Followed::Done);
            }
            match on_stall {
                flow::OnStall::Origin => {
                    r.note(format!(
                        "no peer made progress for {PEER_STALL:?}: fetching the rest from the origin"
                    ));
                    origin_fetch(r, partial).await?;
                    Ok(Followed::Done)
                }
                flow::OnStall::ElectWithout => {
                    r.note(format!(
                        "no peer made progress for {PEER_STALL:?}: electing again without {representative:016x}"
                    ));
                    abandon(r, representative);
                    Ok(Followed::Next(None, Vec::new()))
                }
            }
        }
    }
}

/// After a multicast that left blocks missing: peers, then the origin
/// for what none delivered.
async fn repair_then_origin(
    r: &Run,
    partial: &Arc<Partial>,
    leftovers: Leftovers,
) -> anyhow::Result<()> {
    r.state(State::Repairing);
    peer_repair(r, partial, leftovers).await?;
    let missing = partial.layout().block_count() - partial.done_count();
    if missing > 0 {
        r.note(format!(
            "{missing} block(s) no peer delivered: fetching them from the origin"
        ));
        origin_fetch(r, partial).await?;
    }
    Ok(())
}

/// Elects again without `representative`.
fn abandon(r: &Run, representative: u64) {
    r.state(State::Electing);
    if let Some(slot) = r.agent.elections().get_mut(&r.id) {
        slot.election.abandon(Instant::now(), representative);
    }
    r.agent.control_wake.notify_one();
}
