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
pub(super) const PEER_STALL: Duration = Duration::from_secs(15);

/// Peers that may fail a task's repair (time out, refuse, serve a bad
/// block) before it asks no more of them and leaves the rest to the
/// origin: a stream of peers that announce what they cannot serve costs a
/// few deadlines, not the task.
const MAX_FAILED_PEERS: usize = 4;

/// Symbols a receiver collected for blocks it did not finish.
pub(super) type Leftovers = Vec<(u32, Box<multicast::codec::Collector>)>;

/// Fetches every missing block that a peer on the subnet holds, from
/// those peers (spread by load, several requests pipelined on one
/// connection per peer); what no peer could deliver is left for the origin.
pub(super) async fn peer_repair(
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
                    r.note(format!(
                        "peer {node:016x} ({addr}) dropped for this task: {why}"
                    ));
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
