//! Taking blocks from peers on the subnet: after the multicast, or
//! instead of it when it does not arrive (or on Wi-Fi).

use super::*;

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
pub(super) async fn from_peers_only(
    r: &Run,
    partial: &Arc<Partial>,
    leftovers: Leftovers,
) -> anyhow::Result<bool> {
    let mut leftovers = leftovers;
    let mut seen = None;
    let mut progress_at = Instant::now();
    loop {
        peer_repair(r, partial, std::mem::take(&mut leftovers)).await?;
        let (done, count) = (partial.done_count(), partial.layout().block_count());
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
pub(super) const PEER_STALL: Duration = Duration::from_secs(15);

/// Symbols a receiver collected for blocks it did not finish.
pub(super) type Leftovers = Vec<(u32, Box<multicast::codec::Collector>)>;

/// Peers on the subnet that announce block `b` of this task's content:
/// only peers confirmed by a second announcement (one forged announcement
/// does not make a source), by where they serve (node ids are theirs to
/// make up, so one that failed cannot come back under another).
fn holders_of(r: &Run, b: u32) -> Vec<(u64, SocketAddr)> {
    let prefix = &r.m.content[..8];
    r.agent
        .presence()
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
        .collect()
}

/// The peers serving a task's repair: one connection (a task) each, fed
/// blocks through its channel, all of them together under the task's rate.
struct PeerLinks {
    cap: crate::agent::tcp::SharedCap,
    workers: tokio::task::JoinSet<()>,
    links: HashMap<SocketAddr, (u64, mpsc::Sender<crate::agent::repair::PeerJob>)>,
    results_tx: mpsc::UnboundedSender<crate::agent::repair::PeerResult>,
}

impl PeerLinks {
    /// The channel to `addr`'s connection, opened on first use.
    fn to(
        &mut self,
        r: &Run,
        node: u64,
        addr: SocketAddr,
    ) -> &mpsc::Sender<crate::agent::repair::PeerJob> {
        use crate::agent::repair::PIPELINE_DEPTH;
        let (_, jobs) = self.links.entry(addr).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PIPELINE_DEPTH);
            self.workers.spawn(crate::agent::repair::fetch_from_peer(
                r.agent.fleet.clone(),
                addr,
                r.m.content,
                r.m.layout,
                self.cap.clone(),
                rx,
                self.results_tx.clone(),
            ));
            (node, tx)
        });
        jobs
    }

    fn node(&self, addr: &SocketAddr) -> u64 {
        self.links.get(addr).map(|p| p.0).unwrap_or_default()
    }
}

/// Fetches every missing block that a peer on the subnet holds, from
/// those peers (spread by load, several requests pipelined on one
/// connection per peer, [`repair::RepairPlan`] choosing); what no peer
/// could deliver is left for the origin.
pub(super) async fn peer_repair(
    r: &Run,
    partial: &Arc<Partial>,
    leftovers: Leftovers,
) -> anyhow::Result<()> {
    use crate::agent::repair::{PIPELINE_DEPTH, PeerError, PeerResult};
    let missing: Vec<u32> = partial.missing().collect();
    let mut plan = repair::RepairPlan::new(
        repair::PlanConfig {
            per_peer: PIPELINE_DEPTH as u32,
            ..repair::PlanConfig::default()
        },
        missing,
    );
    // Symbols from the multicast go along: the peer then sends only what
    // is missing (on a retry, after a failed peer, the block starts afresh).
    let mut leftovers: HashMap<u32, Box<multicast::codec::Collector>> =
        leftovers.into_iter().collect();
    let t0 = Instant::now();
    let (results_tx, mut results) = mpsc::unbounded_channel::<PeerResult>();
    let mut links = PeerLinks {
        cap: crate::agent::tcp::SharedCap::new(r.pacing().cap_bps),
        workers: tokio::task::JoinSet::new(),
        links: HashMap::new(),
        results_tx,
    };
    let mut why_failed: HashMap<SocketAddr, String> = HashMap::new();
    loop {
        if plan.in_flight() == 0 {
            when_idle(r, &mut plan).await?;
        }
        if !r.paused() {
            send_asks(r, &mut plan, &mut links, &mut leftovers);
        }
        while let Some(ev) = plan.poll_event() {
            note_plan_event(r, &links, &mut why_failed, ev);
        }
        if plan.is_finished() {
            break;
        }
        if plan.in_flight() == 0 {
            continue; // a pause before busy holders are asked again
        }
        // A cancel must not wait for a slow peer's block.
        let (addr, b, res) = tokio::select! {
            d = results.recv() => d.context("repair workers gone")?,
            _ = r.until_cancelled() => {
                links.workers.abort_all();
                bail!("cancelled");
            }
        };
        let answer = match res {
            Ok((data, bytes)) => {
                delivered(r, partial, links.node(&addr), b, data, bytes).await?;
                repair::Answer::Delivered { bytes }
            }
            Err(PeerError::Declined) => repair::Answer::NotHeld,
            Err(PeerError::Busy) => repair::Answer::Busy,
            Err(PeerError::Failed(why)) => {
                why_failed.entry(addr).or_insert_with(|| why.to_string());
                repair::Answer::Failed
            }
        };
        plan.handle_answer(addr, b, answer);
    }
    drop(links.links); // the workers' channels close; they end
    links.workers.abort_all();
    if plan.delivered() > 0 {
        let secs = t0.elapsed().as_secs_f64();
        update(&r.agent, &r.id, |s| s.repair_seconds += secs);
    }
    Ok(())
}

/// With nothing out: a pause is waited out (what was out has come back;
/// nothing more is asked until resumed), then the plan's own pause before
/// busy holders are asked again.
async fn when_idle(r: &Run, plan: &mut repair::RepairPlan<SocketAddr>) -> anyhow::Result<()> {
    if r.paused() {
        r.until_resumed().await;
        if r.cancelled() {
            bail!("cancelled");
        }
    }
    if let Some(at) = plan.poll_timeout() {
        tokio::time::sleep_until(at.into()).await;
        plan.handle_timeout(Instant::now());
    }
    Ok(())
}

/// Writes a block a peer delivered (verified by its hash) and counts it.
async fn delivered(
    r: &Run,
    partial: &Arc<Partial>,
    node: u64,
    b: u32,
    data: Vec<u8>,
    bytes: u64,
) -> anyhow::Result<()> {
    tracing::trace!("task {}: block {b} from peer {node:016x}", r.id);
    // Off the runtime: a 4 MiB write must not stall the connections'
    // readers.
    let p = partial.clone();
    tokio::task::spawn_blocking(move || p.write_block_buffer(b, data))
        .await?
        .context("writing a repaired block")?;
    note_blocks(&r.agent, &r.id, partial);
    update(&r.agent, &r.id, |s| {
        s.bytes.peers += bytes;
        *s.bytes.by_peer.entry(format!("{node:016x}")).or_default() += bytes;
    });
    Ok(())
}

/// Sends the plan's requests to their peers' connections, until the plan
/// has none or a connection has no room.
fn send_asks(
    r: &Run,
    plan: &mut repair::RepairPlan<SocketAddr>,
    links: &mut PeerLinks,
    leftovers: &mut HashMap<u32, Box<multicast::codec::Collector>>,
) {
    let holders = |b: u32| holders_of(r, b);
    while let Some(ask) = plan.poll_ask(Instant::now(), |b| {
        holders(b).into_iter().map(|h| h.1).collect()
    }) {
        let node = holders(ask.block)
            .into_iter()
            .find(|h| h.1 == ask.peer)
            .map_or(0, |h| h.0);
        let job = crate::agent::repair::PeerJob {
            block: ask.block,
            hash: r.m.block_hashes[ask.block as usize],
            held: leftovers.remove(&ask.block),
        };
        // The plan keeps a peer within the channel's room; a full or
        // closed one takes the block back.
        if links.to(r, node, ask.peer).try_send(job).is_err() {
            plan.unsent(ask);
            break;
        }
    }
}

/// Notes in the task's history what the plan says of its peers.
fn note_plan_event(
    r: &Run,
    links: &PeerLinks,
    why_failed: &mut HashMap<SocketAddr, String>,
    ev: repair::PlanEvent<SocketAddr>,
) {
    match ev {
        repair::PlanEvent::PeerDropped(addr) => {
            let node = links.node(&addr);
            let why = why_failed.remove(&addr).unwrap_or_default();
            r.note(format!(
                "peer {node:016x} ({addr}) dropped for this task: {why}"
            ));
        }
        repair::PlanEvent::NoMorePeers => r.note(format!(
            "{} peers failed: no more peers for this task",
            repair::PlanConfig::default().max_failed_peers
        )),
    }
}
