//! Fetching what the subnet cannot supply: from the site's rendezvous
//! points, nearest first (see [`crate::topology`]), then from the origin.
//!
//! A rendezvous is asked over authenticated peer repair, several blocks in
//! flight, in order. It serves what it holds while it is still fetching:
//! a block it does not hold yet is asked again a moment later. One that
//! does not answer, fails, or delivers nothing for [`RENDEZVOUS_STALL`]
//! is left for the next; after the last, the origin (counted as origin
//! bytes).
//!
//! While it fetches from a rendezvous point, an agent joins it every few
//! seconds (JOIN, on a connection of its own) and learns the other
//! agents that fetch through it: the other subnets' representatives. When
//! every listed source is gone, the first of them to join fetches from
//! the origin for the site and the others from it, so the office still
//! downloads once.

use std::collections::VecDeque;
use std::net::IpAddr;

use super::*;
use crate::agent::repair::{PIPELINE_DEPTH, PeerError, PeerJob, PeerResult};

/// A rendezvous that delivers no block for this long is given up: it
/// fetches for the site itself, so a block of 4 MiB takes it 17 s even
/// over a 2 Mbit/s WAN link.
const RENDEZVOUS_STALL: Duration = Duration::from_secs(30);
/// How long to wait before asking again for a block the rendezvous does
/// not hold yet (it is fetching it).
const NOT_YET: Duration = Duration::from_millis(250);
/// How often an agent joins the members of its rendezvous point, while it
/// fetches from it.
const JOIN_EVERY: Duration = Duration::from_secs(2);
/// How often a receiver on the rendezvous point's own subnet asks for the
/// members: should the rendezvous die, one of them becomes the subnet's
/// representative and must know whom to follow.
const LISTEN_EVERY: Duration = Duration::from_secs(5);
/// The second join comes this soon after the first; the waits after it
/// double up to the interval ([`join_waits`]).
const EARLY_REJOIN: Duration = Duration::from_millis(500);
/// Members asked in turn, once the rendezvous points are gone, before the
/// origin.
const MAX_SUCCESSORS: usize = 3;

/// Why a source is left for the next.
#[derive(Debug, thiserror::Error)]
enum SourceLost {
    #[error(transparent)]
    Failed(#[from] crate::agent::repair::PeerFailure),
    #[error("delivered nothing for {RENDEZVOUS_STALL:?}")]
    Stalled,
}

/// Fetches every missing block: from the rendezvous points of this agent's
/// site, then the origin. `on_block` is called for each block written.
pub(super) async fn fetch_upstream(
    r: &Run,
    partial: &Arc<Partial>,
    on_block: &(dyn Fn(u32) + Sync),
) -> anyhow::Result<()> {
    let sources = r.agent.placement().map(|p| p.sources).unwrap_or_default();
    for addr in sources {
        if partial.is_complete() {
            return Ok(());
        }
        match from_rendezvous(r, partial, addr, on_block).await? {
            Ok(()) => return Ok(()),
            Err(why) => r.note(format!("rendezvous {addr}: {why}; trying the next source")),
        }
    }
    // Members are heard only from sources: none without them.
    let members = members_of(r).clone();
    if !members.is_empty() && succession(r, partial, members, on_block).await? {
        return Ok(());
    }
    if partial.is_complete() {
        return Ok(());
    }
    let flow = r.flow();
    fetch_blocks(
        &r.agent.http,
        partial,
        None,
        &r.origin,
        &flow,
        r.pacing(),
        on_block,
    )
    .await
    .context("fetching from the origin")?;
    r.progress(partial);
    Ok(())
}

/// Fetches what is missing from the origin's side (rendezvous, then the
/// origin), the status kept up to date.
pub(super) async fn origin_fetch(r: &Run, partial: &Arc<Partial>) -> anyhow::Result<()> {
    let (agent, id, p2) = (r.agent.clone(), r.id.clone(), partial.clone());
    let on_block = move |_b: u32| note_blocks(&agent, &id, &p2);
    fetch_upstream(r, partial, &on_block).await
}

/// The members this task has heard of from its rendezvous points.
fn members_of(r: &Run) -> std::sync::MutexGuard<'_, Vec<std::net::SocketAddrV4>> {
    r.members.lock().unwrap_or_else(|p| p.into_inner())
}

/// A receiver on the subnet of its first rendezvous point keeps the
/// member list while it receives (see [`LISTEN_EVERY`]); `None` elsewhere.
pub(super) fn listen_for_members(r: &Run) -> Option<impl Drop + use<>> {
    let first = *r.agent.placement()?.sources.first()?;
    let IpAddr::V4(ip) = first.ip() else {
        return None;
    };
    if !r.agent.subnet.is_some_and(|s| s.contains(ip)) {
        return None;
    }
    Some(joining(r, first, false))
}

/// [`keep_joined`] `addr` for this task, as a member (`fetching`) or a
/// listener, until the handle is dropped.
fn joining(r: &Run, addr: SocketAddr, fetching: bool) -> Abort {
    let every = if fetching { JOIN_EVERY } else { LISTEN_EVERY };
    Abort(tokio::spawn(keep_joined(
        r.agent.fleet.clone(),
        addr,
        r.m.content,
        (me(r), fetching),
        r.members.clone(),
        every,
    )))
}

/// This agent's repair address, as members know it.
fn me(r: &Run) -> std::net::SocketAddrV4 {
    let port = r.agent.presence().local().repair_port;
    std::net::SocketAddrV4::new(r.agent.iface_addr, port)
}

/// The rendezvous points are gone: the members of this agent's site (those
/// it learned from them) stand in. The first to join fetches from the
/// origin for the others; each other fetches from the members before it,
/// in turn. Whether every block is here.
async fn succession(
    r: &Run,
    partial: &Arc<Partial>,
    mut members: Vec<std::net::SocketAddrV4>,
    on_block: &(dyn Fn(u32) + Sync),
) -> anyhow::Result<bool> {
    let me = me(r);
    // A rendezvous names whom it likes: only agents of this site count.
    members.retain(|m| r.agent.same_anchor(*m.ip()));
    let before = repair::members::successor(me, &members, MAX_SUCCESSORS);
    if before.is_empty() {
        r.note(format!(
            "first of {} site member(s) without a rendezvous: fetching for them from the origin",
            members.len().max(1)
        ));
        return Ok(false);
    }
    for m in before {
        r.note(format!("taking the rest from site member {m}"));
        match blocks_from(r, partial, m.into(), on_block).await? {
            Ok(()) => return Ok(true),
            Err(why) => r.note(format!("site member {m}: {why}")),
        }
    }
    Ok(false)
}

/// Joins the members at `addr` (`me` and whether it fetches) every
/// `every` (jittered by a quarter) until dropped, keeping the latest list
/// in `into`. A listener's first JOIN waits a random part of
/// [`EARLY_REJOIN`]: the receivers of a large subnet start a task together,
/// and a rendezvous serves 64 repair connections at once and closes the
/// rest at once. A JOIN that fails (a rendezvous at that limit,
/// down, or of an older version that does not know JOIN) is tried again,
/// the waits doubling up to [`JOIN_BACKOFF_MAX`].
async fn keep_joined(
    fleet: Option<multicast::auth::FleetKeys>,
    addr: SocketAddr,
    content: multicast::wire::Digest,
    (me, fetching): (std::net::SocketAddrV4, bool),
    into: Arc<Mutex<Vec<std::net::SocketAddrV4>>>,
    every: Duration,
) {
    if !fetching {
        tokio::time::sleep(crate::agent::jittered(EARLY_REJOIN / 2, 1.0)).await;
    }
    let mut waits = join_waits(every);
    let mut failed = Duration::ZERO;
    loop {
        let joined =
            crate::agent::repair::join_site(fleet.as_ref(), addr, content, me.port(), fetching);
        let wait = match joined.await {
            Ok(list) => {
                if !list.is_empty() {
                    *into.lock().unwrap_or_else(|p| p.into_inner()) = list;
                }
                failed = Duration::ZERO;
                waits.next().unwrap_or(every)
            }
            Err(why) => {
                tracing::debug!("rendezvous {addr}: no member list ({why})");
                failed = (failed * 2).max(every).min(JOIN_BACKOFF_MAX);
                failed
            }
        };
        tokio::time::sleep(crate::agent::jittered(wait, 0.25)).await;
    }
}

/// The longest wait after JOINs that failed.
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The waits between one agent's JOINs: [`EARLY_REJOIN`], doubling up to
/// `every`. Soon at first, so that the members who joined just after it
/// (the subnets elect at about the same moment) are known to it before
/// the rendezvous can fail them all: a listener that knows none goes to
/// the origin.
fn join_waits(every: Duration) -> impl Iterator<Item = Duration> {
    std::iter::successors(Some(every.min(EARLY_REJOIN)), move |w| {
        Some((*w * 2).min(every))
    })
}

/// Every missing block from the rendezvous at `addr`, joining its members
/// meanwhile (their list goes to the task's). The outer result is the
/// task's (cancelled, a block that cannot be written); the inner one says
/// why this rendezvous is left for the next source.
async fn from_rendezvous(
    r: &Run,
    partial: &Arc<Partial>,
    addr: SocketAddr,
    on_block: &(dyn Fn(u32) + Sync),
) -> anyhow::Result<Result<(), SourceLost>> {
    let vpn = r.agent.site_kind() == crate::topology::SiteKind::Vpn;
    // A VPN agent serves nobody: it does not stand in for anyone either.
    let _joined = (!vpn).then(|| joining(r, addr, true));
    blocks_from(r, partial, addr, on_block).await
}

/// Ends a spawned task however its owner returns.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Nothing asked of the rendezvous point: waits out a pause, then a
/// little for it to fetch more, unless it has made no progress for
/// [`RENDEZVOUS_STALL`].
async fn wait_for_more(
    r: &Run,
    progress_at: &mut Instant,
) -> anyhow::Result<Result<(), SourceLost>> {
    if r.paused() {
        r.until_resumed().await;
        *progress_at = Instant::now();
    }
    if progress_at.elapsed() >= RENDEZVOUS_STALL {
        return Ok(Err(SourceLost::Stalled));
    }
    tokio::select! {
        _ = tokio::time::sleep(NOT_YET) => Ok(Ok(())),
        _ = r.until_cancelled() => bail!("cancelled"),
    }
}

/// Writes a block the rendezvous point delivered (verified by its hash),
/// off the runtime, and counts its bytes.
async fn from_rendezvous_write(
    r: &Run,
    partial: &Arc<Partial>,
    b: u32,
    data: Vec<u8>,
    bytes: u64,
) -> anyhow::Result<()> {
    let p = partial.clone();
    tokio::task::spawn_blocking(move || p.write_block_buffer(b, data))
        .await?
        .context("writing a block from the rendezvous")?;
    update(&r.agent, &r.id, |s| s.bytes.rendezvous += bytes);
    Ok(())
}

/// The blocks of [`from_rendezvous`], over one pipelined connection.
async fn blocks_from(
    r: &Run,
    partial: &Arc<Partial>,
    addr: SocketAddr,
    on_block: &(dyn Fn(u32) + Sync),
) -> anyhow::Result<Result<(), SourceLost>> {
    let mut queue: VecDeque<u32> = partial.missing().collect();
    let (jobs, jobs_rx) = tokio::sync::mpsc::channel(PIPELINE_DEPTH);
    let (results_tx, mut results) = tokio::sync::mpsc::unbounded_channel::<PeerResult>();
    let _worker = Abort(tokio::spawn(crate::agent::repair::fetch_from_peer(
        r.agent.fleet.clone(),
        addr,
        r.m.content,
        r.m.layout,
        crate::agent::tcp::SharedCap::new(r.pacing().cap_bps),
        jobs_rx,
        results_tx,
    )));
    let mut not_yet: Vec<u32> = Vec::new();
    let mut in_flight = 0usize;
    let mut progress_at = Instant::now();
    let t0 = Instant::now();
    let mut noted = false;
    loop {
        // Blocks it does not hold yet wait for the next round, so that a
        // rendezvous still fetching is not asked for every block each time.
        while in_flight < PIPELINE_DEPTH && not_yet.is_empty() && !r.paused() {
            let Some(b) = queue.pop_front() else { break };
            let job = PeerJob {
                block: b,
                hash: r.m.block_hashes[b as usize],
                held: None,
            };
            if jobs.try_send(job).is_err() {
                queue.push_front(b);
                break;
            }
            in_flight += 1;
        }
        if in_flight == 0 {
            if queue.is_empty() && not_yet.is_empty() {
                let secs = t0.elapsed().as_secs_f64();
                update(&r.agent, &r.id, |s| s.repair_seconds += secs);
                return Ok(Ok(()));
            }
            if let Err(lost) = wait_for_more(r, &mut progress_at).await? {
                return Ok(Err(lost));
            }
            not_yet.sort_unstable();
            for b in not_yet.drain(..).rev() {
                queue.push_front(b);
            }
            continue;
        }
        let (_, b, res) = tokio::select! {
            d = results.recv() => d.context("the rendezvous worker is gone")?,
            _ = r.until_cancelled() => bail!("cancelled"),
        };
        in_flight -= 1;
        match res {
            Ok((data, bytes)) => {
                if !noted {
                    noted = true;
                    r.note(format!("fetching from {addr}"));
                    r.state(State::Fetching);
                }
                from_rendezvous_write(r, partial, b, data, bytes).await?;
                on_block(b);
                progress_at = Instant::now();
            }
            Err(PeerError::Declined | PeerError::Busy) => not_yet.push(b),
            Err(PeerError::Failed(why)) => return Ok(Err(why.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_come_soon_at_first_then_at_the_interval() {
        let ms = |w: Vec<Duration>| w.iter().map(|d| d.as_millis()).collect::<Vec<_>>();
        let listen: Vec<Duration> = join_waits(LISTEN_EVERY).take(7).collect();
        assert_eq!(ms(listen), [500, 1000, 2000, 4000, 5000, 5000, 5000]);
        let member: Vec<Duration> = join_waits(JOIN_EVERY).take(4).collect();
        assert_eq!(ms(member), [500, 1000, 2000, 2000]);
        // An interval under the early wait is never stretched.
        let short = Duration::from_millis(100);
        assert!(join_waits(short).take(3).all(|w| w == short));
    }

    /// A rendezvous at its connection limit closes a JOIN at once: the
    /// joiner comes back, and has the list once it is answered.
    #[tokio::test]
    async fn a_join_the_rendezvous_closed_is_made_again() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let member = std::net::SocketAddrV4::new([10, 0, 0, 7].into(), 4000);
        tokio::spawn(async move {
            for _ in 0..2 {
                drop(listener.accept().await.unwrap());
            }
            let (mut s, _) = listener.accept().await.unwrap();
            let mut out = Vec::new();
            let members = vec![(member.ip().octets(), member.port())];
            repair::frame::encode(&repair::frame::Frame::Members { members }, &mut out);
            s.write_all(&out).await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let into = Arc::new(Mutex::new(Vec::new()));
        let me = std::net::SocketAddrV4::new([10, 0, 0, 9].into(), 4001);
        let every = Duration::from_millis(20);
        let joiner = tokio::spawn(keep_joined(
            None,
            addr,
            [1; 32],
            (me, true),
            into.clone(),
            every,
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while into.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        joiner.abort();
        assert_eq!(
            *into.lock().unwrap(),
            [member],
            "no list after two refusals"
        );
    }
}
