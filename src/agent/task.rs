//! Distribution tasks: one package to this agent, cached or installed.
//!
//! Flow: a cached object completes at once. Otherwise the download is
//! opened (resumed from its persisted state), an election runs for the
//! content id on the control group, and the agent either represents the
//! subnet (fetch from the origin, multicast from the start time, fetch and
//! multicast pipelined) or receives the representative's multicast; blocks
//! still missing after the pass come from the origin by Range request.
//! Every block is hash-checked before it is written, the whole file before
//! it enters the cache. Then the object is pinned (cache-only) or the
//! task's command runs with its path.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use multicast::driver::{RecvError, RecvOptions, ResumeInto, SendOptions};
use multicast::wire::Standing;
use multicast::{ReceiverConfig, SenderConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::Agent;
use crate::cache::{Partial, now_unix};
use crate::election::{Election, ElectionConfig, ElectionEvent};
use crate::fetch::{fetch_blocks, lock};
use crate::manifest::{Checked, Manifest};

/// Default startup delay between election and multicast, as Ivanti's.
pub const DEFAULT_DELAY_MS: u64 = 60_000;
/// Cache-only objects stay pinned this long unless the task says otherwise.
pub const DEFAULT_PIN_DAYS: u32 = 30;
/// Install commands are stopped after this long unless the task says so.
pub const DEFAULT_RUN_TIMEOUT_S: u64 = 30 * 60;
/// Bytes of an install command's output kept in the task status.
const OUTPUT_TAIL: usize = 4096;
/// UDP port of the data groups.
pub const DATA_PORT: u16 = 7400;

/// What `POST /v1/tasks` takes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Chosen by the console so one id names the task on every agent;
    /// generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    pub manifest: Manifest,
    #[serde(default)]
    pub cache_only: bool,
    /// Shell command run with the verified file's path as `$1` (and in
    /// SOMCAST_FILE); never with `cache_only`.
    #[serde(default)]
    pub run: Option<String>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub pin_days: Option<u32>,
    /// Multicast rate in bit/s on the wire.
    #[serde(default)]
    pub rate_bps: Option<u64>,
    #[serde(default)]
    pub run_timeout_s: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Electing,
    Fetching,
    Waiting,
    Sending,
    Receiving,
    Repairing,
    Installing,
    Done,
    Failed,
    Cancelled,
}

impl State {
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Done | State::Failed | State::Cancelled)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bytes {
    pub multicast: u64,
    pub peers: u64,
    pub origin: u64,
    /// Repair bytes by the node id of the peer that served them.
    #[serde(default)]
    pub by_peer: std::collections::BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstallResult {
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub output_tail: String,
}

/// What `GET /v1/tasks/{id}` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskStatus {
    pub id: String,
    pub node: String,
    pub content_id: String,
    pub name: String,
    pub size: u64,
    pub cache_only: bool,
    pub state: State,
    /// representative, receiver or cached.
    pub role: Option<String>,
    pub blocks_done: u32,
    pub block_count: u32,
    pub bytes: Bytes,
    pub created: u64,
    pub finished: Option<u64>,
    pub seconds: Option<f64>,
    pub error: Option<String>,
    pub install: Option<InstallResult>,
    /// Time spent fetching from peers (wall clock of the repair rounds).
    #[serde(default)]
    pub repair_seconds: f64,
    pub path: Option<String>,
    pub pinned_until: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    spec: TaskSpec,
    status: TaskStatus,
}

/// A task the agent knows.
pub struct TaskEntry {
    pub spec: TaskSpec,
    pub status: TaskStatus,
    /// Blocks held decoded and verified (HAVE), and the file they are in:
    /// what peer repair may serve.
    pub have: Vec<bool>,
    pub data: Option<PathBuf>,
    cancel: Arc<AtomicBool>,
    cancel_notify: Arc<Notify>,
    started: Instant,
    last_saved: Instant,
}

/// The election of a running task, driven by the control loop.
pub struct ElectionSlot {
    pub election: Election,
    pub events: mpsc::UnboundedSender<ElectionEvent>,
}

/// Why a task cannot be accepted.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("bad manifest: {0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("a cache-only task never runs a command: drop `run` or `cache_only`")]
    RunWithCacheOnly,
    #[error("task id {0:?} must be 1-64 characters of a-z, A-Z, 0-9, - and _")]
    BadId(String),
    #[error("task {0} exists with another manifest or options")]
    Conflict(String),
    #[error("delay {0} ms is more than a day")]
    Delay(u64),
}

fn tasks_dir(agent: &Agent) -> PathBuf {
    agent.config.cache.join("tasks")
}

/// Checks a task, records it and starts it; an existing task with the same
/// id and spec is returned as it is (the console may retry).
pub fn submit(agent: &Arc<Agent>, mut spec: TaskSpec) -> Result<TaskStatus, SpecError> {
    let checked = spec.manifest.check()?;
    if spec.cache_only && spec.run.is_some() {
        return Err(SpecError::RunWithCacheOnly);
    }
    if let Some(d) = spec.delay_ms
        && d > 86_400_000
    {
        return Err(SpecError::Delay(d));
    }
    let id = spec
        .id
        .clone()
        .unwrap_or_else(|| format!("{:016x}", multicast::driver::random_id()));
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !id_ok {
        return Err(SpecError::BadId(id));
    }
    spec.id = Some(id.clone());
    {
        let tasks = agent.tasks();
        if let Some(t) = tasks.get(&id) {
            let same = serde_json::to_value(&t.spec).ok() == serde_json::to_value(&spec).ok();
            return if same {
                Ok(t.status.clone())
            } else {
                Err(SpecError::Conflict(id))
            };
        }
    }
    let status = TaskStatus {
        id: id.clone(),
        node: format!("{:016x}", agent.node),
        content_id: checked.id(),
        name: checked.name.clone(),
        size: checked.layout.file_size(),
        cache_only: spec.cache_only,
        state: State::Queued,
        role: None,
        blocks_done: 0,
        block_count: checked.layout.block_count(),
        bytes: Bytes::default(),
        created: now_unix(),
        finished: None,
        seconds: None,
        error: None,
        install: None,
        repair_seconds: 0.0,
        path: None,
        pinned_until: None,
    };
    insert(agent, spec, status.clone());
    save(agent, &id);
    tokio::spawn(run(agent.clone(), id));
    Ok(status)
}

fn insert(agent: &Agent, spec: TaskSpec, status: TaskStatus) {
    let id = status.id.clone();
    agent.tasks().insert(
        id,
        TaskEntry {
            spec,
            status,
            have: Vec::new(),
            data: None,
            cancel: Arc::new(AtomicBool::new(false)),
            cancel_notify: Arc::new(Notify::new()),
            started: Instant::now(),
            last_saved: Instant::now(),
        },
    );
}

/// Loads the tasks of a previous run; unfinished ones start again (their
/// downloads resume from the persisted partial state).
pub fn restore(agent: &Arc<Agent>) {
    let Ok(dir) = std::fs::read_dir(tasks_dir(agent)) else {
        return;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let stored: Stored = match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(s) => s,
            None => {
                tracing::warn!("ignoring unreadable task file {}", path.display());
                continue;
            }
        };
        let resume = !stored.status.state.is_terminal();
        let id = stored.status.id.clone();
        let mut status = stored.status;
        if resume {
            status.state = State::Queued;
            status.error = None;
        }
        let done_object = (status.state == State::Done)
            .then(|| agent.cache.object_path(&status.content_id))
            .filter(|p| p.is_file());
        let blocks = status.block_count as usize;
        insert(agent, stored.spec, status);
        if let Some(path) = done_object
            && let Some(t) = agent.tasks().get_mut(&id)
        {
            t.have = vec![true; blocks];
            t.data = Some(path);
        }
        if resume {
            tracing::info!("task {id}: resuming after a restart");
            tokio::spawn(run(agent.clone(), id));
        }
    }
}

/// Asks a running task to stop.
pub fn cancel(agent: &Agent, id: &str) -> Option<TaskStatus> {
    let tasks = agent.tasks();
    let t = tasks.get(id)?;
    t.cancel.store(true, Ordering::SeqCst);
    t.cancel_notify.notify_waiters();
    Some(t.status.clone())
}

fn save(agent: &Agent, id: &str) {
    let stored = {
        let mut tasks = agent.tasks();
        let Some(t) = tasks.get_mut(id) else {
            return;
        };
        t.last_saved = Instant::now();
        serde_json::to_vec_pretty(&Stored {
            spec: t.spec.clone(),
            status: t.status.clone(),
        })
    };
    let dir = tasks_dir(agent);
    let result = stored.map_err(std::io::Error::other).and_then(|bytes| {
        std::fs::create_dir_all(&dir)?;
        scanner::node::write_atomically(&dir.join(format!("{id}.json")), &bytes)
    });
    if let Err(e) = result {
        tracing::warn!("task {id}: cannot save its state: {e}");
    }
}

fn update(agent: &Agent, id: &str, f: impl FnOnce(&mut TaskStatus)) {
    let persist = {
        let mut tasks = agent.tasks();
        let Some(t) = tasks.get_mut(id) else {
            return;
        };
        let before = t.status.state;
        f(&mut t.status);
        t.status.state != before || t.last_saved.elapsed() > Duration::from_secs(2)
    };
    if persist {
        save(agent, id);
    }
}

/// Records the blocks a download holds: the count in the status, the
/// bitmap and file for HAVE and peer repair.
fn note_blocks(agent: &Agent, id: &str, p: &Partial) {
    let done = p.done_count();
    {
        let mut tasks = agent.tasks();
        if let Some(t) = tasks.get_mut(id) {
            t.have.clone_from(&p.done);
            t.data = Some(p.data.clone());
        }
    }
    update(agent, id, |s| s.blocks_done = done);
}

fn set_state(agent: &Agent, id: &str, state: State) {
    update(agent, id, |s| s.state = state);
}

/// Everything a running task needs at hand.
struct Run {
    agent: Arc<Agent>,
    id: String,
    spec: TaskSpec,
    m: Checked,
    cancel: Arc<AtomicBool>,
    cancel_notify: Arc<Notify>,
    origin: Arc<AtomicU64>,
}

impl Run {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    async fn until_cancelled(&self) {
        loop {
            let notified = self.cancel_notify.notified();
            if self.cancelled() {
                return;
            }
            notified.await;
        }
    }

    fn state(&self, s: State) {
        set_state(&self.agent, &self.id, s);
    }

    fn progress(&self, partial: &Mutex<Partial>) {
        note_blocks(&self.agent, &self.id, &lock(partial));
        let origin = self.origin.load(Ordering::Relaxed);
        update(&self.agent, &self.id, |s| s.bytes.origin = origin);
    }
}

async fn run(agent: Arc<Agent>, id: String) {
    let Some((spec, cancel, cancel_notify)) = agent
        .tasks()
        .get(&id)
        .map(|t| (t.spec.clone(), t.cancel.clone(), t.cancel_notify.clone()))
    else {
        return;
    };
    let m = match spec.manifest.check() {
        Ok(m) => m,
        Err(e) => {
            update(&agent, &id, |s| {
                s.state = State::Failed;
                s.error = Some(format!("bad manifest: {e}"));
            });
            return;
        }
    };
    let cid = m.id();
    let r = Run {
        agent: agent.clone(),
        id: id.clone(),
        spec,
        m,
        cancel,
        cancel_notify,
        origin: Arc::new(AtomicU64::new(0)),
    };
    tracing::info!(
        "task {id}: {} ({} bytes, content {cid})",
        r.m.name,
        r.m.layout.file_size()
    );
    agent.cache.hold(&cid);
    let result = drive(&r).await;
    agent.elections().remove(&id);
    agent.cache.release(&cid);
    let elapsed = agent.tasks().get(&id).map(|t| t.started.elapsed());
    update(&agent, &id, |s| {
        s.finished = Some(now_unix());
        s.seconds = elapsed.map(|e| e.as_secs_f64());
        s.bytes.origin = r.origin.load(Ordering::Relaxed);
        match &result {
            Ok(()) => s.state = State::Done,
            Err(_) if r.cancelled() => {
                s.state = State::Cancelled;
                s.error = Some("cancelled".into());
            }
            Err(e) => {
                s.state = State::Failed;
                s.error = Some(format!("{e:#}"));
            }
        }
    });
    save(&agent, &id);
    match &result {
        Ok(()) => tracing::info!("task {id}: done"),
        Err(e) => tracing::warn!("task {id}: {e:#}"),
    }
    let evicted = agent.cache.evict();
    if !evicted.is_empty() {
        tracing::info!("cache: evicted {} object(s)", evicted.len());
    }
}

async fn drive(r: &Run) -> anyhow::Result<()> {
    let cid = r.m.id();
    if let Some(path) = r.agent.cache.get(&cid) {
        update(&r.agent, &r.id, |s| {
            s.role = Some("cached".into());
            s.blocks_done = s.block_count;
        });
        return finish(r, &path).await;
    }
    let agent = r.agent.clone();
    let m = r.m.clone();
    let partial = tokio::task::spawn_blocking(move || agent.cache.partial(&m))
        .await
        .context("opening the download")?
        .context("opening the download")?;
    let partial = Arc::new(Mutex::new(partial));
    r.progress(&partial);
    if !lock(&partial).is_complete() {
        acquire(r, &partial).await?;
    }
    if let Some(t) = r.agent.tasks().get_mut(&r.id) {
        t.data = None; // moving into the cache
    }
    let cache_agent = r.agent.clone();
    let p = Arc::try_unwrap(partial)
        .map_err(|_| anyhow!("the download is still in use"))?
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = tokio::task::spawn_blocking(move || cache_agent.cache.commit(p))
        .await?
        .context("moving the verified file into the cache")?;
    finish(r, &path).await
}

/// Gets every block: election, then representing or receiving, then the
/// origin for what is still missing.
async fn acquire(r: &Run, partial: &Arc<Mutex<Partial>>) -> anyhow::Result<()> {
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
                tracing::info!(
                    "task {}: representative; multicast to {group} in {:?}",
                    r.id,
                    start.saturating_duration_since(Instant::now())
                );
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
                tracing::info!(
                    "task {}: receiver of {representative:016x} on {group}",
                    r.id
                );
                match receive(r, partial, session, group, start, &mut rx).await? {
                    Received::All => return Ok(()),
                    Received::Incomplete(why, leftovers) => {
                        tracing::info!(
                            "task {}: multicast left blocks missing ({why}); repairing from peers",
                            r.id
                        );
                        r.state(State::Repairing);
                        peer_repair(r, partial, leftovers).await?;
                        if !lock(partial).is_complete() {
                            tracing::info!(
                                "task {}: fetching what no peer holds from the origin",
                                r.id
                            );
                            origin_fetch(r, partial).await?;
                        }
                        return Ok(());
                    }
                    Received::Interrupted(next) => pending = next,
                }
            }
            ElectionEvent::SteppedDown => r.state(State::Electing),
            ElectionEvent::RepresentativeLost { representative } => {
                tracing::info!(
                    "task {}: representative {representative:016x} fell silent; electing again",
                    r.id
                );
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

/// Fetches every missing block that a peer on the subnet holds, from
/// those peers (spread by load, a few at a time); what no peer could
/// deliver is left for the origin.
/// Symbols a receiver collected for blocks it did not finish.
type Leftovers = Vec<(u32, Box<multicast::codec::Collector>)>;

async fn peer_repair(
    r: &Run,
    partial: &Arc<Mutex<Partial>>,
    leftovers: Leftovers,
) -> anyhow::Result<()> {
    /// Blocks fetched from peers at once.
    const PARALLEL: usize = 4;
    let prefix: [u8; 8] = r.m.content[..8].try_into().expect("a digest has 32 bytes");
    let holders_of = |b: u32| -> Vec<(u64, SocketAddr)> {
        let p = r.agent.presence();
        let mut v: Vec<(u64, SocketAddr)> = p
            .peers()
            .filter(|peer| peer.announce.repair_port != 0)
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
    // Three blocks in flight per peer keep its link busy while it reads and
    // hashes the next; the server takes four at once.
    let mut chooser: repair::Chooser<u64> = repair::Chooser::new(3);
    let mut leftovers: HashMap<u32, Box<multicast::codec::Collector>> =
        leftovers.into_iter().collect();
    let t0 = Instant::now();
    let mut fetched = false;
    let mut running = tokio::task::JoinSet::new();
    let mut waiting: Vec<u32> = Vec::new();
    // A peer that said it does not hold a block (stale HAVE) or was busy is
    // not asked for that block again.
    let mut declined: std::collections::HashSet<(u32, u64)> = Default::default();
    loop {
        while running.len() < PARALLEL {
            let Some(b) = queue.pop_front() else { break };
            let mut holders = holders_of(b);
            holders.retain(|h| !declined.contains(&(b, h.0)));
            let nodes: Vec<u64> = holders.iter().map(|h| h.0).collect();
            match chooser.pick(&nodes) {
                Some(node) => {
                    let addr = holders
                        .iter()
                        .find(|h| h.0 == node)
                        .expect("picked among them")
                        .1;
                    let (content, layout, hash) =
                        (r.m.content, r.m.layout, r.m.block_hashes[b as usize]);
                    // Symbols from the multicast go along: the peer then
                    // sends only what is missing (on a retry, after a failed
                    // peer, the block starts afresh).
                    let held = leftovers.remove(&b);
                    running.spawn(async move {
                        let res =
                            super::repair::fetch_block(addr, content, layout, b, hash, held).await;
                        (b, node, res)
                    });
                }
                // Holders at their limit: try again when one finishes.
                None if chooser.any_usable(&nodes) => waiting.push(b),
                None => {} // nobody (left) to ask: the origin's
            }
        }
        if r.cancelled() {
            running.abort_all();
            bail!("cancelled");
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let (b, node, res) = done.context("repair task")?;
        queue.extend(waiting.drain(..));
        match res {
            Ok((data, bytes)) => {
                fetched = true;
                chooser.succeeded(node, bytes);
                {
                    let mut p = lock(partial);
                    p.write_block(b, &data)
                        .context("writing a repaired block")?;
                    note_blocks(&r.agent, &r.id, &p);
                }
                update(&r.agent, &r.id, |s| {
                    s.bytes.peers += bytes;
                    *s.bytes.by_peer.entry(format!("{node:016x}")).or_default() += bytes;
                });
            }
            Err(super::repair::PeerError::Declined) => {
                chooser.declined(node);
                declined.insert((b, node));
                queue.push_back(b);
            }
            Err(super::repair::PeerError::Failed(why)) => {
                tracing::warn!("task {}: peer {node:016x} dropped: {why}", r.id);
                chooser.failed(node);
                queue.push_back(b);
            }
        }
    }
    if fetched {
        let secs = t0.elapsed().as_secs_f64();
        update(&r.agent, &r.id, |s| s.repair_seconds += secs);
    }
    Ok(())
}

async fn origin_fetch(r: &Run, partial: &Arc<Mutex<Partial>>) -> anyhow::Result<()> {
    let cancel = r.cancel.clone();
    let agent = r.agent.clone();
    let id = r.id.clone();
    let p2 = partial.clone();
    let on_block = move |_b: u32| note_blocks(&agent, &id, &lock(&p2));
    fetch_blocks(
        &r.agent.http,
        partial,
        None,
        &r.origin,
        &|| cancel.load(Ordering::SeqCst),
        &on_block,
    )
    .await?;
    r.progress(partial);
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
    r.state(State::Fetching);
    let fetch = {
        let (agent, id, p, origin, avail, cancel) = (
            r.agent.clone(),
            r.id.clone(),
            partial.clone(),
            r.origin.clone(),
            available.clone(),
            r.cancel.clone(),
        );
        async move {
            let p2 = p.clone();
            let agent2 = agent.clone();
            let on_block = move |_b: u32| {
                let g = lock(&p2);
                avail.store(g.done_prefix(), Ordering::Release);
                note_blocks(&agent2, &id, &g);
            };
            fetch_blocks(
                &agent.http,
                &p,
                None,
                &origin,
                &|| cancel.load(Ordering::SeqCst),
                &on_block,
            )
            .await
        }
    };
    tokio::pin!(fetch);
    let mut fetch_done = false;
    // Until the start: fetch, and listen for a better representative.
    loop {
        tokio::select! {
            res = &mut fetch, if !fetch_done => {
                fetch_done = true;
                res.context("fetching from the origin")?;
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
            session: SenderConfig {
                rate_bps: r.spec.rate_bps.unwrap_or(r.agent.config.rate_bps),
                ..SenderConfig::default()
            },
            block_size: p.layout().block_size(),
            symbol_size: p.layout().symbol_size(),
            session_id: Some(session),
            known_hashes: Some((r.m.block_hashes.clone(), r.m.content)),
            available: Some(available.clone()),
            stop: Some(stop.clone()),
            ..SendOptions::default()
        };
        let path = p.data.clone();
        let iface = r.agent.iface_addr;
        tokio::task::spawn_blocking(move || {
            multicast::send_file(&path, group, iface, &opts, &mut |_| {})
        })
    };
    tokio::pin!(send);
    let mut interrupted = None;
    let mut fetch_error = None;
    let sent = loop {
        tokio::select! {
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
        return Err(e).context("fetching from the origin");
    }
    if interrupted.is_some() {
        return Ok(interrupted);
    }
    if !fetch_done {
        fetch.await.context("fetching from the origin")?;
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

enum Received {
    All,
    /// Why, and the symbols collected for blocks still missing.
    Incomplete(String, Leftovers),
    /// The representative was lost or replaced: the event that says so.
    Interrupted(Option<ElectionEvent>),
}

/// A receiver: joins the data group now, takes the session from `start`.
async fn receive(
    r: &Run,
    partial: &Arc<Mutex<Partial>>,
    session: u64,
    group: SocketAddrV4,
    start: Instant,
    rx: &mut mpsc::UnboundedReceiver<ElectionEvent>,
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
                    idle_timeout: wait + Duration::from_secs(20),
                    ..ReceiverConfig::default()
                },
                drop_rate,
                drop_seed: node,
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
    if r.cancelled() {
        bail!("cancelled");
    }
    let complete = lock(partial).is_complete();
    if complete {
        return Ok(Received::All);
    }
    if let Some(ev) = interrupted {
        return Ok(Received::Interrupted(match ev {
            ElectionEvent::Follow { .. } => Some(ev),
            _ => None,
        }));
    }
    let (res, leftovers) = result.context("receive thread")??;
    let why = match res {
        Ok(_) => "the session ended".into(),
        Err(e) => e.to_string(),
    };
    Ok(Received::Incomplete(why, leftovers))
}

/// The object is in the cache: pin it, or run the command.
async fn finish(r: &Run, path: &Path) -> anyhow::Result<()> {
    let path_s = path.display().to_string();
    if let Some(t) = r.agent.tasks().get_mut(&r.id) {
        t.have = vec![true; r.m.layout.block_count() as usize];
        t.data = Some(path.to_owned());
    }
    update(&r.agent, &r.id, |s| {
        s.path = Some(path_s.clone());
        s.blocks_done = s.block_count;
    });
    if r.spec.cache_only {
        let days = u64::from(r.spec.pin_days.unwrap_or(DEFAULT_PIN_DAYS));
        let until = now_unix() + days * 86_400;
        r.agent.cache.pin(&r.m.id(), until)?;
        update(&r.agent, &r.id, |s| s.pinned_until = Some(until));
        return Ok(());
    }
    let Some(cmd) = r.spec.run.clone() else {
        return Ok(());
    };
    r.state(State::Installing);
    let timeout = Duration::from_secs(r.spec.run_timeout_s.unwrap_or(DEFAULT_RUN_TIMEOUT_S));
    let result = run_command(&cmd, path, timeout, r).await?;
    let code = result.exit_code;
    let timed_out = result.timed_out;
    update(&r.agent, &r.id, |s| s.install = Some(result));
    if timed_out {
        bail!("the install command did not finish within {timeout:?} and was stopped");
    }
    match code {
        Some(0) => Ok(()),
        Some(c) => bail!("the install command exited with status {c}"),
        None => bail!("the install command was killed by a signal"),
    }
}

async fn run_command(
    cmd: &str,
    path: &Path,
    timeout: Duration,
    r: &Run,
) -> anyhow::Result<InstallResult> {
    #[cfg(unix)]
    let mut c = {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c").arg(cmd).arg("somcast-install").arg(path);
        c
    };
    #[cfg(not(unix))]
    let mut c = {
        let mut c = tokio::process::Command::new("cmd");
        c.arg("/C").arg(cmd).arg(path);
        c
    };
    c.env("SOMCAST_FILE", path)
        .env("SOMCAST_TASK", &r.id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = c.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let out = tokio::select! {
        out = child.wait_with_output() => Some(out?),
        _ = tokio::time::sleep(timeout) => None,
        _ = r.until_cancelled() => bail!("cancelled"),
    };
    Ok(match out {
        Some(o) => {
            let mut text = o.stdout;
            text.extend_from_slice(&o.stderr);
            let tail = &text[text.len().saturating_sub(OUTPUT_TAIL)..];
            InstallResult {
                exit_code: o.status.code(),
                timed_out: false,
                output_tail: String::from_utf8_lossy(tail).into_owned(),
            }
        }
        None => InstallResult {
            exit_code: None,
            timed_out: true,
            output_tail: String::new(),
        },
    })
}

/// The data group of a content: 239.193.x.y from its id, so different
/// packages on one subnet do not share a group (and receivers' NICs can
/// filter what they did not join).
pub fn data_group(content: &[u8; 32]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(239, 193, content[0], content[1].max(1)),
        DATA_PORT,
    )
}

/// The statuses of every task, newest first.
pub fn list(agent: &Agent) -> Vec<TaskStatus> {
    let mut v: Vec<TaskStatus> = agent.tasks().values().map(|t| t.status.clone()).collect();
    v.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
    v
}

pub type Tasks = HashMap<String, TaskEntry>;

impl Agent {
    /// This agent's standing in an election, frozen at its start.
    pub fn standing(&self, held_permille: u16) -> Standing {
        let rank = self.presence().local().rank;
        Standing {
            preference: rank.preference,
            held_permille,
            wired: rank.wired.unwrap_or(false),
            free_disk_gib: (rank.free_disk_mib / 1024).min(u64::from(u32::MAX)) as u32,
            uptime_h: (self.started.elapsed().as_secs() / 3600) as u32,
            node: self.node,
        }
    }
}
