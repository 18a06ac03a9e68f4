//! Getting every block of a task's package: the election, then
//! representing (peers, origin, multicast pipelined behind the fetch) or
//! receiving (the multicast, then peers, then the origin).

use super::upstream::{fetch_upstream, origin_fetch};
use super::*;
use crate::topology::SiteKind;

/// Gets every block: election, then representing or receiving, then the
/// origin for what is still missing.
pub(super) async fn acquire(r: &Run, partial: &Arc<Mutex<Partial>>) -> anyhow::Result<()> {
    let kind = r.agent.placement().map(|p| p.kind).unwrap_or_default();
    if kind == SiteKind::Vpn {
        // A remote worker shares nothing with the hosts beside it.
        r.note("vpn site: fetching on its own, from the nearest source".into());
        r.state(State::Fetching);
        return origin_fetch(r, partial).await;
    }
    r.state(State::Electing);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let held_permille = {
        let p = lock(partial);
        (u64::from(p.done_count()) * 1000 / u64::from(p.layout().block_count().max(1))) as u16
    };
    let standing = r.agent.standing(held_permille);
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
                match represent(r, partial, session, group, start, &mut rx).await? {
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
                update(&r.agent, &r.id, |s| s.role = Some("receiver".into()));
                let preload = std::mem::take(&mut carried);
                let received = if kind == SiteKind::Wifi {
                    // Multicast over Wi-Fi goes at the lowest rate and is
                    // lost freely: the representative only fetches.
                    r.note(format!(
                        "wifi site: taking the package from peers over TCP as representative {representative:016x} fetches it"
                    ));
                    Received::NoShow(preload)
                } else {
                    r.note(format!("receiver of {representative:016x} on {group}"));
                    let _listening = super::upstream::listen_for_members(r);
                    receive(r, partial, session, group, start, &mut rx, preload).await?
                };
                match received {
                    Received::All => return Ok(()),
                    Received::Incomplete(why, leftovers) => {
                        r.note(format!(
                            "multicast left blocks missing ({why}): repairing from peers"
                        ));
                        r.state(State::Repairing);
                        peer_repair(r, partial, leftovers).await?;
                        let missing = {
                            let p = lock(partial);
                            p.layout().block_count() - p.done_count()
                        };
                        if missing > 0 {
                            r.note(format!(
                                "{missing} block(s) no peer delivered: fetching them from the origin"
                            ));
                            origin_fetch(r, partial).await?;
                        }
                        return Ok(());
                    }
                    Received::Interrupted(next, left) => {
                        pending = next;
                        carried = left;
                    }
                    Received::LeftBehind(left) => {
                        // The others finish the pass with the package (the
                        // representative holds it already): taken from
                        // them as they announce it, or from the origin if
                        // none makes progress.
                        r.note(format!(
                            "left behind by representative {representative:016x} as far slower than the rest: taking the rest from peers"
                        ));
                        r.state(State::Repairing);
                        if !from_peers_only(r, partial, left).await? {
                            r.note(format!(
                                "no peer made progress for {PEER_STALL:?}: fetching the rest from the origin"
                            ));
                            origin_fetch(r, partial).await?;
                        }
                        return Ok(());
                    }
                    Received::NoShow(left)
                        if kind == SiteKind::Wifi || holds_some(r, representative) =>
                    {
                        // Offers and presence arrive, the data does not (a
                        // switch that prunes the data group, Wi-Fi client
                        // isolation): the representative fetches all the
                        // same, and every receiver takes it from peers.
                        if kind != SiteKind::Wifi {
                            r.note(format!(
                            "multicast from representative {representative:016x} does not arrive here, though it holds blocks: taking the package from peers over unicast"
                        ));
                        }
                        r.state(State::Repairing);
                        if from_peers_only(r, partial, left).await? {
                            return Ok(());
                        }
                        r.note(format!(
                            "no peer made progress for {PEER_STALL:?}: electing again without {representative:016x}"
                        ));
                        r.state(State::Electing);
                        if let Some(slot) = r.agent.elections().get_mut(&r.id) {
                            slot.election.abandon(Instant::now(), representative);
                        }
                        r.agent.control_wake.notify_one();
                    }
                    Received::NoShow(left) => {
                        // Every receiver would otherwise go to the origin on
                        // its own: elect again without it instead.
                        r.note(format!(
                            "representative {representative:016x} offered the content but sent nothing: electing again without it"
                        ));
                        r.state(State::Electing);
                        carried = left;
                        if let Some(slot) = r.agent.elections().get_mut(&r.id) {
                            slot.election.abandon(Instant::now(), representative);
                        }
                        r.agent.control_wake.notify_one();
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
                let held_permille = {
                    let p = lock(partial);
                    (u64::from(p.done_count()) * 1000 / u64::from(p.layout().block_count().max(1)))
                        as u16
                };
                let standing = r.agent.standing(held_permille);
                if let Some(slot) = r.agent.elections().get_mut(&r.id) {
                    slot.election.set_standing(standing);
                }
            }
        }
    }
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

/// Blocks of this task's content that confirmed peers announce, summed:
/// it grows while anyone on the subnet makes progress.
fn blocks_on_peers(r: &Run) -> u64 {
    let prefix = &r.m.content[..8];
    r.agent
        .presence()
        .peers()
        .filter(|p| p.confirmed())
        .flat_map(|p| p.announce.held.iter())
        .filter(|h| h.content == prefix)
        .map(|h| u64::from(h.blocks_done))
        .sum()
}

/// Multicast does not reach this agent: takes every block from peers as
/// they get it (the representative from the origin, the others from it and
/// each other). `Ok(true)` once every block is here; `Ok(false)` when
/// nobody on the subnet made progress for [`PEER_STALL`] (the
/// representative died, or was a forger): then the election goes on
/// without it.
async fn from_peers_only(
    r: &Run,
    partial: &Arc<Mutex<Partial>>,
    leftovers: Leftovers,
) -> anyhow::Result<bool> {
    let mut leftovers = leftovers;
    let mut seen = None;
    let mut progress_at = Instant::now();
    loop {
        peer_repair(r, partial, std::mem::take(&mut leftovers)).await?;
        let (done, count) = {
            let p = lock(partial);
            (p.done_count(), p.layout().block_count())
        };
        if done == count {
            return Ok(true);
        }
        let now = (done, blocks_on_peers(r));
        if r.paused() {
            // A pause is not a stall: the wait starts again on resume.
            r.until_resumed().await;
            seen = None;
        }
        if seen != Some(now) {
            seen = Some(now);
            progress_at = Instant::now();
        } else if progress_at.elapsed() >= PEER_STALL {
            return Ok(false);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = r.until_cancelled() => bail!("cancelled"),
        }
    }
}

/// How long a task that takes its package from peers only waits for any
/// peer's progress before it elects again.
const PEER_STALL: Duration = Duration::from_secs(15);

/// Peers that may fail a task's repair (time out, refuse, serve a bad
/// block) before it asks no more of them and leaves the rest to the
/// origin: a stream of peers that announce what they cannot serve costs a
/// few deadlines, not the task.
const MAX_FAILED_PEERS: usize = 4;

/// Symbols a receiver collected for blocks it did not finish.
type Leftovers = Vec<(u32, Box<multicast::codec::Collector>)>;

/// Fetches every missing block that a peer on the subnet holds, from
/// those peers (spread by load, several requests pipelined on one
/// connection per peer); what no peer could deliver is left for the origin.
async fn peer_repair(
    r: &Run,
    partial: &Arc<Mutex<Partial>>,
    leftovers: Leftovers,
) -> anyhow::Result<()> {
    use crate::agent::repair::{PIPELINE_DEPTH, PeerError, PeerJob, PeerResult};
    /// Blocks asked of all peers at once.
    const MAX_IN_FLIGHT: usize = 16;
    let prefix: [u8; 8] = r.m.content[..8].try_into().expect("a digest has 32 bytes");
    let holders_of = |b: u32| -> Vec<(u64, SocketAddr)> {
        let p = r.agent.presence();
        // Only peers confirmed by a second announcement: one forged
        // announcement does not make a source.
        let mut v: Vec<(u64, SocketAddr)> = p
            .peers()
            .filter(|peer| peer.announce.repair_port != 0 && peer.confirmed())
            .filter(|peer| {
                peer.announce
                    .held
                    .iter()
                    .any(|h| h.content == prefix && h.has(b))
            })
            .map(|peer| {
                (
                    peer.node(),
                    SocketAddr::new(peer.addr.ip(), peer.announce.repair_port),
                )
            })
            .collect();
        v.sort();
        v
    };
    let mut queue: std::collections::VecDeque<u32> = {
        let p = lock(partial);
        (0..p.layout().block_count())
            .filter(|&b| !p.done[b as usize])
            .collect()
    };
    // Each peer gets as many blocks as its connection pipelines; the
    // server reads and plans the next while it sends one. Peers are told
    // apart by where they serve: node ids are theirs to make up, so one
    // that failed cannot come back under another.
    let mut chooser: repair::Chooser<SocketAddr> = repair::Chooser::new(PIPELINE_DEPTH as u32);
    let mut leftovers: HashMap<u32, Box<multicast::codec::Collector>> =
        leftovers.into_iter().collect();
    let t0 = Instant::now();
    let mut fetched = false;
    // One connection (a task) per peer, fed blocks through its channel,
    // all of them together under the task's rate.
    let cap = crate::agent::tcp::SharedCap::new(r.pacing().cap_bps);
    let mut workers = tokio::task::JoinSet::new();
    let mut peers: HashMap<SocketAddr, (u64, tokio::sync::mpsc::Sender<PeerJob>)> = HashMap::new();
    let (results_tx, mut results) = tokio::sync::mpsc::unbounded_channel::<PeerResult>();
    let mut in_flight = 0usize;
    let mut waiting: Vec<u32> = Vec::new();
    // A peer that said it does not hold a block (stale HAVE) is not asked
    // for that block again.
    let mut declined: std::collections::HashSet<(u32, SocketAddr)> = Default::default();
    // Blocks whose holders were all busy, retried after a pause; a block
    // refused this often is left for the origin.
    const BUSY_TRIES: u32 = 50;
    let mut busy: Vec<u32> = Vec::new();
    let mut busy_tries: HashMap<u32, u32> = HashMap::new();
    let mut idle_rounds = 0;
    loop {
        if in_flight == 0 && r.paused() {
            // Paused: what is out has come back; ask for nothing more
            // until resumed.
            r.until_resumed().await;
            if r.cancelled() {
                bail!("cancelled");
            }
        }
        if in_flight == 0 && queue.is_empty() && !busy.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            queue.extend(busy.drain(..));
        }
        while in_flight < MAX_IN_FLIGHT && !r.paused() {
            let Some(b) = queue.pop_front() else { break };
            let mut holders = holders_of(b);
            holders.retain(|h| !declined.contains(&(b, h.1)));
            let mut addrs: Vec<SocketAddr> = holders.iter().map(|h| h.1).collect();
            addrs.sort();
            addrs.dedup();
            if chooser.failures() >= MAX_FAILED_PEERS {
                addrs.clear(); // the rest is the origin's
            }
            match chooser.pick(&addrs) {
                Some(addr) => {
                    let node = holders
                        .iter()
                        .find(|h| h.1 == addr)
                        .expect("picked among them")
                        .0;
                    let (_, jobs) = peers.entry(addr).or_insert_with(|| {
                        let (tx, rx) = tokio::sync::mpsc::channel(PIPELINE_DEPTH);
                        let (fleet, content, layout) =
                            (r.agent.fleet.clone(), r.m.content, r.m.layout);
                        workers.spawn(crate::agent::repair::fetch_from_peer(
                            fleet,
                            addr,
                            content,
                            layout,
                            cap.clone(),
                            rx,
                            results_tx.clone(),
                        ));
                        (node, tx)
                    });
                    // Symbols from the multicast go along: the peer then
                    // sends only what is missing (on a retry, after a failed
                    // peer, the block starts afresh).
                    let job = PeerJob {
                        block: b,
                        hash: r.m.block_hashes[b as usize],
                        held: leftovers.remove(&b),
                    };
                    // The chooser keeps a peer within the channel's room.
                    if jobs.try_send(job).is_err() {
                        chooser.declined(addr);
                        queue.push_back(b);
                        break;
                    }
                    in_flight += 1;
                }
                // Holders at their limit: try again when one finishes.
                None if chooser.any_usable(&addrs) => waiting.push(b),
                None => {} // nobody (left) to ask: the origin's
            }
        }
        if in_flight == 0 {
            // Nothing out: done, unless blocks still wait for a turn (a
            // peer's channel closed as it failed; holders busy). A few
            // rounds that send nothing end it: the rest is the origin's.
            queue.extend(waiting.drain(..));
            idle_rounds += 1;
            if (busy.is_empty() && queue.is_empty()) || idle_rounds > 3 {
                break;
            }
            continue;
        }
        idle_rounds = 0;
        // A cancel must not wait for a slow peer's block.
        let (addr, b, res) = tokio::select! {
            d = results.recv() => d.context("repair workers gone")?,
            _ = r.until_cancelled() => {
                workers.abort_all();
                bail!("cancelled");
            }
        };
        in_flight -= 1;
        queue.extend(waiting.drain(..));
        queue.extend(busy.drain(..));
        let node = peers.get(&addr).map(|p| p.0).unwrap_or_default();
        match res {
            Ok((data, bytes)) => {
                tracing::trace!("task {}: block {b} from peer {addr}", r.id);
                fetched = true;
                chooser.succeeded(addr, bytes);
                // Off the runtime: a 4 MiB write must not stall the
                // connections' readers.
                let p = partial.clone();
                tokio::task::spawn_blocking(move || lock(&p).write_block(b, &data))
                    .await?
                    .context("writing a repaired block")?;
                note_blocks(&r.agent, &r.id, &lock(partial));
                update(&r.agent, &r.id, |s| {
                    s.bytes.peers += bytes;
                    *s.bytes.by_peer.entry(format!("{node:016x}")).or_default() += bytes;
                });
            }
            Err(PeerError::Declined) => {
                chooser.declined(addr);
                declined.insert((b, addr));
                queue.push_back(b);
            }
            Err(PeerError::Busy) => {
                chooser.declined(addr);
                let tries = busy_tries.entry(b).or_default();
                *tries += 1;
                if *tries < BUSY_TRIES {
                    busy.push(b);
                }
            }
            Err(PeerError::Failed(why)) => {
                // Every block asked of a failed peer fails with it: one note.
                let first = !chooser.is_dropped(&addr);
                if first {
                    r.note(format!("peer {node:016x} dropped for this task: {why}"));
                }
                chooser.failed(addr);
                if first && chooser.failures() == MAX_FAILED_PEERS {
                    r.note(format!(
                        "{MAX_FAILED_PEERS} peers failed: no more peers for this task"
                    ));
                }
                queue.push_back(b);
            }
        }
    }
    drop(peers); // the workers' channels close; they end
    workers.abort_all();
    if fetched {
        let secs = t0.elapsed().as_secs_f64();
        update(&r.agent, &r.id, |s| s.repair_seconds += secs);
    }
    Ok(())
}

/// The representative: fetch from the origin, multicast from `start`,
/// pipelined. Returns the election event that interrupted it (a better
/// representative), if any.
async fn represent(
    r: &Run,
    partial: &Arc<Mutex<Partial>>,
    session: u64,
    group: SocketAddrV4,
    start: Instant,
    rx: &mut mpsc::UnboundedReceiver<ElectionEvent>,
) -> anyhow::Result<Option<ElectionEvent>> {
    // What the subnet already holds comes from peers (a representative that
    // took over, or one elected after an earlier pass); only the rest
    // crosses the WAN.
    r.state(State::Repairing);
    peer_repair(r, partial, Vec::new()).await?;
    let available = Arc::new(AtomicU32::new(lock(partial).done_prefix()));
    let stop = Arc::new(AtomicBool::new(false));
    // Paused by an order or held for a higher task: kept up to date while
    // the multicast runs, read by its loop.
    let hold = Arc::new(AtomicBool::new(r.paused()));
    r.state(State::Fetching);
    if r.agent.placement().map(|p| p.kind) == Some(SiteKind::Wifi) {
        // No multicast on Wi-Fi: the others take it from this agent, and
        // each other, over TCP as it arrives.
        origin_fetch(r, partial).await?;
        return Ok(None);
    }
    let on_block = {
        let (agent, id, p, avail) = (
            r.agent.clone(),
            r.id.clone(),
            partial.clone(),
            available.clone(),
        );
        move |_b: u32| {
            let g = lock(&p);
            avail.store(g.done_prefix(), Ordering::Release);
            note_blocks(&agent, &id, &g);
        }
    };
    let fetch = fetch_upstream(r, partial, &on_block);
    tokio::pin!(fetch);
    let mut fetch_done = false;
    // Until the start: fetch, and listen for a better representative.
    loop {
        tokio::select! {
            res = &mut fetch, if !fetch_done => {
                fetch_done = true;
                res.context("fetching the package")?;
                r.state(State::Waiting);
            }
            _ = tokio::time::sleep_until(start.into()) => break,
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
    r.state(State::Sending);
    let send = {
        let p = lock(partial);
        let opts = SendOptions {
            session: {
                let config = &r.agent.config;
                let rate_bps = r.spec.rate_bps.unwrap_or(config.rate_bps);
                SenderConfig {
                    rate_bps,
                    rate_min_bps: config.rate_min_bps.min(rate_bps),
                    rate_mode: config.rate_mode,
                    // A receiver far slower than the rest finishes from
                    // peers rather than holding the subnet back.
                    slow_receivers: multicast::rate::SlowReceivers::Leave,
                    ..SenderConfig::default()
                }
            },
            block_size: p.layout().block_size(),
            symbol_size: p.layout().symbol_size(),
            session_id: Some(session),
            known_hashes: Some((r.m.block_hashes.clone(), r.m.content)),
            available: Some(available.clone()),
            stop: Some(stop.clone()),
            pause: Some(hold.clone()),
            fleet: r.agent.fleet.clone(),
            encrypt: r.spec.encrypt || r.agent.config.encrypt,
            auth: r.agent.auth.clone(),
            ..SendOptions::default()
        };
        let path = p.data.clone();
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
    };
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
            res = &mut fetch, if !fetch_done => {
                fetch_done = true;
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
    if r.cancelled() {
        bail!("cancelled");
    }
    if let Some(e) = fetch_error {
        return Err(e).context("fetching the package");
    }
    if interrupted.is_some() {
        return Ok(interrupted);
    }
    if !fetch_done {
        fetch.await.context("fetching the package")?;
    }
    match sent.context("send thread")? {
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

/// A session that nothing of has arrived this long after its start does
/// not reach this agent: its sender announces every 100 ms.
const NO_DATA_AFTER_START: Duration = Duration::from_secs(5);

enum Received {
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
async fn receive(
    r: &Run,
    partial: &Arc<Mutex<Partial>>,
    session: u64,
    group: SocketAddrV4,
    start: Instant,
    rx: &mut mpsc::UnboundedReceiver<ElectionEvent>,
    preload: Leftovers,
) -> anyhow::Result<Received> {
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
    let held_before = (lock(partial).done_count(), symbols(&preload));
    let recv = {
        let p = partial.clone();
        let agent = r.agent.clone();
        let id = r.id.clone();
        let m = r.m.clone();
        let stop = stop.clone();
        let node = r.agent.node;
        let drop_rate = r.agent.config.lab_drop_rate;
        tokio::task::spawn_blocking(move || {
            let (file, path, done) = {
                let g = lock(&p);
                (g.file.try_clone(), g.data.clone(), g.done.clone())
            };
            let file = match file {
                Ok(f) => f,
                Err(e) => return Ok((Err(RecvError::Recv(e)), Vec::new())),
            };
            let mut on_block = |b: u32| {
                let mut g = lock(&p);
                if let Err(e) = g.mark_done(b) {
                    tracing::warn!("task {id}: cannot record block {b}: {e}");
                }
                note_blocks(&agent, &id, &g);
                drop(g);
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
    };
    tokio::pin!(recv);
    let mut interrupted = None;
    let result = loop {
        tokio::select! {
            res = &mut recv => break res,
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
    };
    if let Ok(Ok((Ok(report), _))) = &result {
        let c = &r.agent.counters;
        crate::agent::metrics::Counters::add(&c.multicast_symbols, report.stats.data_symbols);
        crate::agent::metrics::Counters::add(&c.multicast_symbols_sent, report.stats.span);
    }
    if r.cancelled() {
        bail!("cancelled");
    }
    let complete = lock(partial).is_complete();
    if complete {
        return Ok(Received::All);
    }
    let (res, leftovers) = result.context("receive thread")??;
    let nothing_arrived = (lock(partial).done_count(), symbols(&leftovers)) == held_before;
    if let Some(ev) = interrupted {
        // A representative that finished its pass (and so stopped offering)
        // without one symbol of it arriving here, 2 s and more after its
        // start (20 announcements): its multicast does not reach this
        // agent.
        if matches!(ev, ElectionEvent::RepresentativeLost { .. })
            && nothing_arrived
            && Instant::now() >= start + Duration::from_secs(2)
        {
            return Ok(Received::NoShow(leftovers));
        }
        let next = match ev {
            ElectionEvent::Follow { .. } => Some(ev),
            _ => None,
        };
        return Ok(Received::Interrupted(next, leftovers));
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
