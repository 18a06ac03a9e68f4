//! A receiver of the representative's multicast.

use super::peers::Leftovers;
use super::*;

/// A session that nothing of has arrived this long after its start does
/// not reach this agent: its sender announces every 100 ms.
const NO_DATA_AFTER_START: Duration = Duration::from_secs(5);

impl Received {
    /// How the session ended, as the task flow sees it.
    pub(super) fn end(&self) -> crate::flow::SessionEnd {
        use crate::flow::SessionEnd;
        match self {
            Received::All => SessionEnd::All,
            Received::Incomplete(..) => SessionEnd::Incomplete,
            Received::Interrupted(..) => SessionEnd::Interrupted,
            Received::NoShow(_) => SessionEnd::NoShow,
            Received::LeftBehind(_) => SessionEnd::LeftBehind,
        }
    }

    /// The election event that came meanwhile, the symbols collected of
    /// unfinished blocks, and why the session ended incomplete.
    pub(super) fn into_parts(self) -> (Option<ElectionEvent>, Leftovers, Option<String>) {
        match self {
            Received::All => (None, Vec::new(), None),
            Received::Incomplete(why, left) => (None, left, Some(why)),
            Received::Interrupted(ev, left) => (ev, left, None),
            Received::NoShow(left) | Received::LeftBehind(left) => (None, left, None),
        }
    }
}

pub(super) enum Received {
    All,
    /// Why, and the symbols collected for blocks still missing.
    Incomplete(String, Leftovers),
    /// The representative was lost or replaced: the event that says so.
    Interrupted(Option<ElectionEvent>, Leftovers),
    /// Nothing of the session was heard: the offer was not followed by a
    /// sender (forged, or a representative that cannot reach the group).
    NoShow(Leftovers),
    /// The representative's rate control left this agent behind as far
    /// slower than the rest: the others have the package soon.
    LeftBehind(Leftovers),
}

/// A receiver: joins the data group now, takes the session from `start`.
pub(super) async fn receive(
    r: &Run,
    partial: &Arc<Partial>,
    session: super::acquire::Session,
    rx: &mut mpsc::UnboundedReceiver<ElectionEvent>,
    preload: Leftovers,
) -> anyhow::Result<Received> {
    let super::acquire::Session {
        session,
        group,
        start,
    } = session;
    let (socket, rcvbuf) = multicast::socket::open_receiver(group, r.agent.iface_addr)
        .with_context(|| format!("joining the data group {group}"))?;
    r.state(if Instant::now() < start {
        State::Waiting
    } else {
        State::Receiving
    });
    let stop = Arc::new(AtomicBool::new(false));
    let wait = start.saturating_duration_since(Instant::now());
    // What was held before, to tell whether any data arrived at all.
    let symbols = |v: &Leftovers| v.iter().map(|(_, c)| u64::from(c.held())).sum::<u64>();
    let held_before = (partial.done_count(), symbols(&preload));
    let recv = spawn_receive(r, partial, (socket, rcvbuf), session, wait, &stop, preload);
    let (result, interrupted) = while_receiving(r, recv, rx, &stop).await;
    if let Ok(Ok((Ok(report), _))) = &result {
        let c = &r.agent.counters;
        crate::agent::metrics::Counters::add(&c.multicast_symbols, report.stats.data_symbols);
        crate::agent::metrics::Counters::add(&c.multicast_symbols_sent, report.stats.span);
    }
    if r.cancelled() {
        bail!("cancelled");
    }
    let complete = partial.is_complete();
    if complete {
        return Ok(Received::All);
    }
    let (res, leftovers) = result.context("receive thread")??;
    let nothing_arrived = (partial.done_count(), symbols(&leftovers)) == held_before;
    if let Some(ev) = interrupted {
        return Ok(after_interrupt(ev, nothing_arrived, start, leftovers));
    }
    let why = match res {
        Ok(_) => "the session ended".into(),
        Err(RecvError::Failed(multicast::ReceiveFailure::NoSender(_))) => {
            return Ok(Received::NoShow(leftovers));
        }
        Err(RecvError::Failed(multicast::ReceiveFailure::LeftBehind { .. })) => {
            return Ok(Received::LeftBehind(leftovers));
        }
        Err(e) => e.to_string(),
    };
    Ok(Received::Incomplete(why, leftovers))
}

/// While the receive thread runs: stops it for a lost or changed
/// representative (the event that did, if any) or a cancel.
async fn while_receiving(
    r: &Run,
    recv: tokio::task::JoinHandle<ReceiveResult>,
    rx: &mut mpsc::UnboundedReceiver<ElectionEvent>,
    stop: &AtomicBool,
) -> (
    Result<ReceiveResult, tokio::task::JoinError>,
    Option<ElectionEvent>,
) {
    tokio::pin!(recv);
    let mut interrupted = None;
    loop {
        tokio::select! {
            res = &mut recv => return (res, interrupted),
            ev = rx.recv() => match ev {
                Some(ev @ (ElectionEvent::RepresentativeLost { .. } | ElectionEvent::Follow { .. })) => {
                    stop.store(true, Ordering::SeqCst);
                    interrupted = Some(ev);
                }
                Some(_) => {}
                None => stop.store(true, Ordering::SeqCst),
            },
            _ = r.until_cancelled() => stop.store(true, Ordering::SeqCst),
        }
    }
}

/// A session interrupted by `ev`. A representative that finished its pass
/// (and so stopped offering) without one symbol of it arriving here, long
/// enough after its start ([`crate::flow::lost_representative_ends`]): its
/// multicast does not reach this agent.
fn after_interrupt(
    ev: ElectionEvent,
    nothing_arrived: bool,
    start: Instant,
    leftovers: Leftovers,
) -> Received {
    if matches!(ev, ElectionEvent::RepresentativeLost { .. })
        && crate::flow::lost_representative_ends(
            nothing_arrived,
            Instant::now().saturating_duration_since(start),
        ) == crate::flow::SessionEnd::NoShow
    {
        return Received::NoShow(leftovers);
    }
    let next = match ev {
        ElectionEvent::Follow { .. } => Some(ev),
        _ => None,
    };
    Received::Interrupted(next, leftovers)
}

/// What the receive thread hands back: the receive's outcome, and the
/// symbols of blocks it did not finish.
type ReceiveResult = Result<
    (
        Result<multicast::driver::RecvReport, RecvError>,
        Vec<(u32, Box<multicast::codec::Collector>)>,
    ),
    RecvError,
>;

/// The multicast receive, on a thread of its own, into the task's
/// partial download; each verified block is recorded as it lands.
fn spawn_receive(
    r: &Run,
    partial: &Arc<Partial>,
    (socket, rcvbuf): (std::net::UdpSocket, multicast::socket::BufferReport),
    session: u64,
    wait: Duration,
    stop: &Arc<AtomicBool>,
    preload: Leftovers,
) -> tokio::task::JoinHandle<ReceiveResult> {
    let p = partial.clone();
    let agent = r.agent.clone();
    let id = r.id.clone();
    let m = r.m.clone();
    let stop = stop.clone();
    let node = r.agent.node;
    let drop_rate = r.agent.config.lab_drop_rate;
    tokio::task::spawn_blocking(move || {
        let (file, path, done) = (p.file.try_clone(), p.data.clone(), p.blocks().to_held());
        let file = match file {
            Ok(f) => f,
            Err(e) => return Ok((Err(RecvError::Recv(e)), Vec::new())),
        };
        let mut on_block = |b: u32| {
            if let Err(e) = p.mark_done(b) {
                tracing::warn!("task {id}: cannot record block {b}: {e}");
            }
            note_blocks(&agent, &id, &p);
            let len = m.layout.block_len(b) as u64;
            update(&agent, &id, |s| {
                s.state = State::Receiving;
                s.bytes.multicast += len;
            });
        };
        let opts = RecvOptions {
            session: ReceiverConfig {
                receiver_id: node,
                session: Some(session),
                idle_timeout: wait + NO_DATA_AFTER_START,
                ..ReceiverConfig::default()
            },
            drop_rate,
            drop_seed: node,
            stop: None,
            fleet: agent.fleet.clone(),
            auth: agent.auth.clone(),
        };
        let mut leftovers = Vec::new();
        let res = multicast::driver::receive_resume(
            socket,
            rcvbuf,
            ResumeInto {
                file: &file,
                path: &path,
                done: &done,
                block_hashes: &m.block_hashes,
                file_sha256: m.content,
                file_size: m.layout.file_size(),
                on_block: &mut on_block,
                stop: Some(stop),
                leftovers: Some(&mut leftovers),
                preload,
            },
            &opts,
            &mut |_| {},
        );
        Ok::<_, RecvError>((res, leftovers))
    })
}
