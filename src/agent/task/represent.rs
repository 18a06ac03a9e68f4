//! The representative: what the subnet already holds from peers, the
//! rest from upstream (rendezvous points, the origin), multicast pipelined
//! behind the fetch.

use super::peers::peer_repair;
use super::upstream::{fetch_upstream, origin_fetch};
use super::*;

/// The representative: fetch from the origin, multicast from `start`,
/// pipelined. Returns the election event that interrupted it (a better
/// representative), if any.
pub(super) async fn represent(
    r: &Run,
    partial: &Arc<Partial>,
    session: super::acquire::Session,
    rx: &mut mpsc::UnboundedReceiver<ElectionEvent>,
) -> anyhow::Result<Option<ElectionEvent>> {
    let super::acquire::Session {
        session,
        group,
        start,
    } = session;
    // What the subnet already holds comes from peers (a representative that
    // took over, or one elected after an earlier pass); only the rest
    // crosses the WAN.
    r.state(State::Repairing);
    peer_repair(r, partial, Vec::new()).await?;
    let available = Arc::new(AtomicU32::new(partial.done_prefix()));
    let stop = Arc::new(AtomicBool::new(false));
    // Paused by an order or held for a higher task: kept up to date while
    // the multicast runs, read by its loop.
    let hold = Arc::new(AtomicBool::new(r.paused()));
    r.state(State::Fetching);
    if !crate::flow::multicasts(r.agent.site_kind()) {
        // No multicast on Wi-Fi: the others take it from this agent, and
        // each other, over TCP as it arrives.
        origin_fetch(r, partial).await?;
        return Ok(None);
    }
    let on_block = available_from(r, partial, available.clone());
    let mut fetch: Fetch<'_> = Box::pin(fetch_upstream(r, partial, &on_block));
    let mut fetch_done = false;
    if let Some(ev) = until_start(r, &mut fetch, &mut fetch_done, start, rx).await? {
        return Ok(Some(ev));
    }
    r.state(State::Sending);
    let controls = SendControls {
        available: available.clone(),
        stop: stop.clone(),
        hold: hold.clone(),
    };
    let send = spawn_send(r, partial, session, group, controls);
    let mut upstream = Upstream {
        fetch,
        done: fetch_done,
    };
    let ended = while_sending(r, send, &mut upstream, &hold, &stop, rx).await;
    if r.cancelled() {
        bail!("cancelled");
    }
    if let Some(e) = ended.fetch_error {
        return Err(e).context("fetching the package");
    }
    if ended.interrupted.is_some() {
        return Ok(ended.interrupted);
    }
    if !upstream.done {
        upstream.fetch.await.context("fetching the package")?;
    }
    match ended.sent.context("send thread")? {
        Ok(report) => tracing::info!(
            "task {}: multicast done, {} receivers done, {} datagrams",
            r.id,
            report.stats.receivers_done,
            report.stats.datagrams
        ),
        // The multicast is a service to the others; this agent has the file.
        Err(e) => tracing::warn!("task {}: multicast ended early: {e}", r.id),
    }
    r.progress(partial);
    Ok(None)
}

/// What the fetch calls for each block it writes: the multicast may send
/// up to the first block not yet here, and the status counts it.
fn available_from(
    r: &Run,
    partial: &Arc<Partial>,
    available: Arc<AtomicU32>,
) -> impl Fn(u32) + Send + Sync + use<> {
    let (agent, id, p) = (r.agent.clone(), r.id.clone(), partial.clone());
    move |_b: u32| {
        available.store(p.done_prefix(), Ordering::Release);
        note_blocks(&agent, &id, &p);
    }
}

/// The fetch from upstream, running beside the wait and the multicast.
type Fetch<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// Until the multicast's start: fetches, and listens for a better
/// representative (`Some`: one took over).
async fn until_start(
    r: &Run,
    fetch: &mut Fetch<'_>,
    fetch_done: &mut bool,
    start: Instant,
    rx: &mut mpsc::UnboundedReceiver<ElectionEvent>,
) -> anyhow::Result<Option<ElectionEvent>> {
    loop {
        tokio::select! {
            res = fetch.as_mut(), if !*fetch_done => {
                *fetch_done = true;
                res.context("fetching the package")?;
                r.state(State::Waiting);
            }
            _ = tokio::time::sleep_until(start.into()) => return Ok(None),
            ev = rx.recv() => {
                let ev = ev.ok_or_else(|| anyhow!("the control loop stopped"))?;
                // A SteppedDown comes with the Follow that decides.
                if matches!(ev, ElectionEvent::Follow { .. }) {
                    return Ok(Some(ev));
                }
            }
            _ = r.until_cancelled() => bail!("cancelled"),
        }
    }
}

/// The upstream fetch and whether it has ended.
struct Upstream<'a> {
    fetch: Fetch<'a>,
    done: bool,
}

/// How the multicast ended.
struct Ended {
    sent: Result<
        Result<multicast::driver::SendReport, multicast::driver::SendError>,
        tokio::task::JoinError,
    >,
    /// A better representative took over.
    interrupted: Option<ElectionEvent>,
    /// The fetch failed (and the multicast was stopped).
    fetch_error: Option<anyhow::Error>,
}

/// While the multicast runs: keeps its hold up to date, lets the fetch go
/// on, and stops it for a failed fetch, a better representative or a
/// cancel.
async fn while_sending(
    r: &Run,
    send: tokio::task::JoinHandle<
        Result<multicast::driver::SendReport, multicast::driver::SendError>,
    >,
    upstream: &mut Upstream<'_>,
    hold: &AtomicBool,
    stop: &AtomicBool,
    rx: &mut mpsc::UnboundedReceiver<ElectionEvent>,
) -> Ended {
    tokio::pin!(send);
    let mut interrupted = None;
    let mut fetch_error = None;
    let mut held = tokio::time::interval(Duration::from_millis(200));
    let sent = loop {
        tokio::select! {
            _ = held.tick() => {
                let now_held = r.paused();
                if now_held && !hold.swap(now_held, Ordering::Relaxed) {
                    r.note_hold();
                } else {
                    hold.store(now_held, Ordering::Relaxed);
                }
            }
            res = upstream.fetch.as_mut(), if !upstream.done => {
                upstream.done = true;
                if let Err(e) = res {
                    stop.store(true, Ordering::SeqCst);
                    fetch_error = Some(e);
                }
            }
            res = &mut send => break res,
            ev = rx.recv() => {
                if let Some(ev @ ElectionEvent::Follow { .. }) = ev {
                    stop.store(true, Ordering::SeqCst);
                    interrupted = Some(ev);
                }
            }
            _ = r.until_cancelled() => stop.store(true, Ordering::SeqCst),
        }
    };
    Ended {
        sent,
        interrupted,
        fetch_error,
    }
}

/// What the multicast's thread shares with the task: how far the fetch
/// has made the file available, a stop, and a hold (paused or held for a
/// higher task).
struct SendControls {
    available: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
}

/// The sender's settings: the agent's rate, or the task's.
fn send_options(
    r: &Run,
    layout: &multicast::codec::Layout,
    session: u64,
    c: SendControls,
) -> SendOptions {
    let config = &r.agent.config;
    let rate_bps = r.spec.rate_bps.unwrap_or(config.rate_bps);
    SendOptions {
        session: SenderConfig {
            rate_bps,
            rate_min_bps: config.rate_min_bps.min(rate_bps),
            rate_mode: config.rate_mode,
            // A receiver far slower than the rest finishes from peers
            // rather than holding the subnet back.
            slow_receivers: multicast::rate::SlowReceivers::Leave,
            ..SenderConfig::default()
        },
        block_size: layout.block_size(),
        symbol_size: layout.symbol_size(),
        session_id: Some(session),
        known_hashes: Some((r.m.block_hashes.clone(), r.m.content)),
        available: Some(c.available),
        stop: Some(c.stop),
        pause: Some(c.hold),
        fleet: r.agent.fleet.clone(),
        encrypt: r.spec.encrypt || r.agent.config.encrypt,
        auth: r.agent.auth.clone(),
        ..SendOptions::default()
    }
}

/// The multicast, on a thread of its own; its progress goes to the
/// task's status.
fn spawn_send(
    r: &Run,
    partial: &Arc<Partial>,
    session: u64,
    group: SocketAddrV4,
    controls: SendControls,
) -> tokio::task::JoinHandle<Result<multicast::driver::SendReport, multicast::driver::SendError>> {
    let opts = send_options(r, &partial.layout(), session, controls);
    let path = partial.data.clone();
    let iface = r.agent.iface_addr;
    let (agent, id) = (r.agent.clone(), r.id.clone());
    tokio::task::spawn_blocking(move || {
        // The status shows the rate and the receivers as they go.
        let mut data_start = None;
        multicast::send_file(&path, group, iface, &opts, &mut |p| {
            if p.stats.datagrams > 0 && p.stats.data_wire_bytes > 0 {
                data_start.get_or_insert_with(Instant::now);
            }
            let view = MulticastView {
                data_seconds: data_start.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                ..MulticastView::from(p.stats)
            };
            super::update(&agent, &id, |s| s.multicast = Some(view));
        })
    })
}
