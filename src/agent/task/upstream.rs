//! Fetching what the subnet cannot supply: from the site's rendezvous
//! points, nearest first (see [`crate::topology`]), then from the origin.
//!
//! A rendezvous is asked over authenticated peer repair, several blocks in
//! flight, in order. It serves what it holds while it is still fetching:
//! a block it does not hold yet is asked again a moment later. One that
//! does not answer, fails, or delivers nothing for [`RENDEZVOUS_STALL`]
//! is left for the next; after the last, the origin (counted as origin
//! bytes).

use std::collections::VecDeque;

use super::*;
use crate::agent::repair::{PIPELINE_DEPTH, PeerError, PeerJob, PeerResult};

/// A rendezvous that delivers no block for this long is given up: it
/// fetches for the site itself, so a block of 4 MiB takes it 17 s even
/// over a 2 Mbit/s WAN link.
const RENDEZVOUS_STALL: Duration = Duration::from_secs(30);
/// How long to wait before asking again for a block the rendezvous does
/// not hold yet (it is fetching it).
const NOT_YET: Duration = Duration::from_millis(250);

/// Fetches every missing block: from the rendezvous points of this agent's
/// site, then the origin. `on_block` is called for each block written.
pub(super) async fn fetch_upstream(
    r: &Run,
    partial: &Arc<Mutex<Partial>>,
    on_block: &(dyn Fn(u32) + Sync),
) -> anyhow::Result<()> {
    let sources = r.agent.placement().map(|p| p.sources).unwrap_or_default();
    for addr in sources {
        if lock(partial).is_complete() {
            return Ok(());
        }
        match from_rendezvous(r, partial, addr, on_block).await? {
            Ok(()) => return Ok(()),
            Err(why) => r.note(format!("rendezvous {addr}: {why}; trying the next source")),
        }
    }
    if lock(partial).is_complete() {
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
pub(super) async fn origin_fetch(r: &Run, partial: &Arc<Mutex<Partial>>) -> anyhow::Result<()> {
    let (agent, id, p2) = (r.agent.clone(), r.id.clone(), partial.clone());
    let on_block = move |_b: u32| note_blocks(&agent, &id, &lock(&p2));
    fetch_upstream(r, partial, &on_block).await
}

/// Every missing block from the rendezvous at `addr`. The outer result is
/// the task's (cancelled, a block that cannot be written); the inner one
/// says why this rendezvous is left for the next source.
async fn from_rendezvous(
    r: &Run,
    partial: &Arc<Mutex<Partial>>,
    addr: SocketAddr,
    on_block: &(dyn Fn(u32) + Sync),
) -> anyhow::Result<Result<(), String>> {
    let mut queue: VecDeque<u32> = {
        let p = lock(partial);
        (0..p.layout().block_count())
            .filter(|&b| !p.done[b as usize])
            .collect()
    };
    let (jobs, jobs_rx) = tokio::sync::mpsc::channel(PIPELINE_DEPTH);
    let (results_tx, mut results) = tokio::sync::mpsc::unbounded_channel::<PeerResult>();
    let worker = tokio::spawn(crate::agent::repair::fetch_from_peer(
        r.agent.fleet.clone(),
        addr,
        r.m.content,
        r.m.layout,
        crate::agent::tcp::SharedCap::new(r.pacing().cap_bps),
        jobs_rx,
        results_tx,
    ));
    // Ends the worker however this returns.
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _worker = Abort(worker);
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
            if r.paused() {
                r.until_resumed().await;
                progress_at = Instant::now();
            }
            if progress_at.elapsed() >= RENDEZVOUS_STALL {
                return Ok(Err(format!("delivered nothing for {RENDEZVOUS_STALL:?}")));
            }
            tokio::select! {
                _ = tokio::time::sleep(NOT_YET) => {}
                _ = r.until_cancelled() => bail!("cancelled"),
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
                    r.note(format!("fetching from rendezvous {addr}"));
                    r.state(State::Fetching);
                }
                let p = partial.clone();
                tokio::task::spawn_blocking(move || lock(&p).write_block(b, &data))
                    .await?
                    .context("writing a block from the rendezvous")?;
                on_block(b);
                progress_at = Instant::now();
                update(&r.agent, &r.id, |s| s.bytes.rendezvous += bytes);
            }
            Err(PeerError::Declined | PeerError::Busy) => not_yet.push(b),
            Err(PeerError::Failed(why)) => return Ok(Err(why)),
        }
    }
}
