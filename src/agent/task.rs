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
use acquire::acquire;
use install::finish;
pub use types::*;

mod acquire;
mod install;
mod peers;
mod receive;
mod represent;
mod types;
mod upstream;
use crate::blocks::Blocks;
use crate::cache::{Partial, now_unix};
use crate::election::{Election, ElectionConfig, ElectionEvent};
use crate::fetch::fetch_blocks;
use crate::manifest::{Checked, Manifest};

/// Default startup delay between election and multicast, as Ivanti's.
pub const DEFAULT_DELAY_MS: u64 = 60_000;
/// Cache-only objects stay pinned this long unless the task says otherwise.
pub const DEFAULT_PIN_DAYS: u32 = 30;
/// Install commands are stopped after this long unless the task says so.
pub const DEFAULT_RUN_TIMEOUT_S: u64 = 30 * 60;
/// Longest install command: a command line, not a script.
pub const MAX_COMMAND: usize = 8192;
/// UDP port of the data groups.
pub const DATA_PORT: u16 = 7400;

/// A task's content as held: the download's own map of its blocks (or
/// every block, once cached) and the file they are in.
pub struct Holding {
    pub blocks: Arc<Blocks>,
    pub path: PathBuf,
}

impl Holding {
    /// A cached object: every block, at `path`.
    pub fn whole(block_count: u32, path: PathBuf) -> Self {
        Holding {
            blocks: Arc::new(Blocks::all(block_count)),
            path,
        }
    }
}

/// A task the agent knows.
pub struct TaskEntry {
    pub spec: TaskSpec,
    pub status: TaskStatus,
    /// What peer repair may serve of the content, and presence announce.
    pub holding: Option<Holding>,
    cancel: Arc<AtomicBool>,
    /// Woken on a cancel, a pause and a resume.
    cancel_notify: Arc<Notify>,
    pause: Arc<AtomicBool>,
    started: Instant,
    last_saved: Instant,
}

/// The election of a running task, driven by the control loop.
pub struct ElectionSlot {
    pub election: Election,
    pub events: mpsc::UnboundedSender<ElectionEvent>,
}

fn tasks_dir(agent: &Agent) -> PathBuf {
    agent.config.cache.join("tasks")
}

/// Checks a task, records it and starts it; an existing task with the same
/// id and spec is returned as it is (the console may retry).
pub fn submit(agent: &Arc<Agent>, mut spec: TaskSpec) -> Result<TaskStatus, SpecError> {
    let checked = check_spec(&spec)?;
    if spec.encrypt && agent.fleet.is_none() {
        return Err(SpecError::EncryptWithoutKey);
    }
    let id = spec
        .id
        .clone()
        .unwrap_or_else(|| format!("{:016x}", multicast::driver::random_id()));
    if !crate::trust::document::valid_id(&id) {
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
        site: agent.placement().map(|p| p.site),
        blocks_done: 0,
        block_count: checked.layout.block_count(),
        bytes: Bytes::default(),
        created: now_unix(),
        finished: None,
        seconds: None,
        error: None,
        install: None,
        install_started: None,
        repair_seconds: 0.0,
        path: None,
        pinned_until: None,
        signed_by: spec.signed_by.clone(),
        history: Vec::new(),
        multicast: None,
        paused: false,
    };
    insert(agent, spec, status.clone());
    // Accepted means on disk: a task the agent could not record is not
    // taken (it would be gone after a restart).
    if let Err(e) = try_save(agent, &id) {
        agent.tasks().remove(&id);
        let path = tasks_dir(agent).join(format!("{id}.json"));
        return Err(SpecError::Storage(format!(
            "{}: {}",
            path.display(),
            crate::error_text(&e)
        )));
    }
    tokio::spawn(run(agent.clone(), id));
    Ok(status)
}

/// Checks what a task asks for, before anything is recorded.
pub fn check_spec(spec: &TaskSpec) -> Result<Checked, SpecError> {
    let checked = spec.manifest.check()?;
    if spec.cache_only && spec.run.is_some() {
        return Err(SpecError::RunWithCacheOnly);
    }
    if let Some(d) = spec.delay_ms
        && d > 86_400_000
    {
        return Err(SpecError::Delay(d));
    }
    if let Some(c) = &spec.run
        && (c.trim().is_empty() || c.len() > MAX_COMMAND)
    {
        return Err(SpecError::Command(c.len()));
    }
    Ok(checked)
}

fn insert(agent: &Agent, spec: TaskSpec, status: TaskStatus) {
    let id = status.id.clone();
    // A task paused before a restart stays paused.
    let paused = status.paused && !status.state.is_terminal();
    agent.tasks().insert(
        id,
        TaskEntry {
            spec,
            status,
            holding: None,
            cancel: Arc::new(AtomicBool::new(false)),
            cancel_notify: Arc::new(Notify::new()),
            pause: Arc::new(AtomicBool::new(paused)),
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
        let mut status = stored.status;
        // Stopped while its install command ran: the command may have done
        // its work or half of it, and may still be running; it is never
        // started a second time.
        if !status.state.is_terminal()
            && let (Some(at), None) = (status.install_started, &status.install)
        {
            status.state = State::Failed;
            status.finished = Some(now_unix());
            status.error = Some(format!(
                "the agent stopped while the install command ran (started at unix time {at}); it is not run again: check the host for its outcome"
            ));
            tracing::warn!(
                "task {}: {}",
                status.id,
                status.error.as_deref().unwrap_or("")
            );
        }
        let resume = !status.state.is_terminal();
        let id = status.id.clone();
        if resume {
            status.state = State::Queued;
            status.error = None;
        }
        let done_object = (status.state == State::Done)
            .then(|| agent.cache.object_path(&status.content_id))
            .filter(|p| p.is_file());
        let blocks = status.block_count;
        insert(agent, stored.spec, status);
        if let Some(path) = done_object
            && let Some(t) = agent.tasks().get_mut(&id)
        {
            t.holding = Some(Holding::whole(blocks, path));
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

/// How often a held task looks whether the higher one has ended.
const HELD_POLL: Duration = Duration::from_millis(200);

/// A running task of this agent with a higher priority than task `id`,
/// not paused, if there is one: `id` holds its fetching and sending until
/// none is left.
fn outranked_by(agent: &Agent, id: &str) -> Option<String> {
    let tasks = agent.tasks();
    let mine = tasks.get(id)?.spec.priority;
    tasks
        .iter()
        .filter(|(other, t)| {
            other.as_str() != id
                && t.spec.priority > mine
                && !t.status.state.is_terminal()
                && !t.pause.load(Ordering::SeqCst)
        })
        .map(|(other, _)| other.clone())
        .min()
}

/// Pauses (`true`) or resumes a task; its status, or `None` when the agent
/// has no such task. A task that ended stays as it is.
pub fn pause(agent: &Agent, id: &str, paused: bool) -> Option<TaskStatus> {
    let status = {
        let tasks = agent.tasks();
        let t = tasks.get(id)?;
        if t.status.state.is_terminal() {
            return Some(t.status.clone());
        }
        t.pause.store(paused, Ordering::SeqCst);
        t.cancel_notify.notify_waiters();
        t.status.clone()
    };
    if status.paused != paused {
        tracing::info!("task {id}: {}", if paused { "paused" } else { "resumed" });
        update(agent, id, |s| s.paused = paused);
        save(agent, id);
    }
    agent.tasks().get(id).map(|t| t.status.clone())
}

/// Writes the task's record (spec and status) to disk, synced; a failure
/// is logged (the next save tries again).
fn save(agent: &Agent, id: &str) {
    if let Err(e) = try_save(agent, id) {
        tracing::warn!("task {id}: cannot save its state: {e}");
    }
}

/// Writes the task's record, synced, or says why it could not.
fn try_save(agent: &Agent, id: &str) -> std::io::Result<()> {
    let stored = {
        let mut tasks = agent.tasks();
        let Some(t) = tasks.get_mut(id) else {
            return Ok(());
        };
        t.last_saved = Instant::now();
        serde_json::to_vec_pretty(&Stored {
            spec: t.spec.clone(),
            status: t.status.clone(),
        })
    };
    let dir = tasks_dir(agent);
    stored.map_err(std::io::Error::other).and_then(|bytes| {
        std::fs::create_dir_all(&dir)?;
        scanner::node::write_atomically(&dir.join(format!("{id}.json")), &bytes)
    })
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
        if let Some(t) = tasks.get_mut(id)
            && t.holding.is_none()
        {
            // The download's own map: every block it marks done from now
            // on is served and announced, with no copy to keep in step.
            t.holding = Some(Holding {
                blocks: p.blocks().clone(),
                path: p.data.clone(),
            });
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
    pause: Arc<AtomicBool>,
    origin: Arc<AtomicU64>,
    /// The site members heard of from its rendezvous points (see
    /// `upstream`).
    members: Arc<Mutex<Vec<std::net::SocketAddrV4>>>,
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

    /// Paused by an order, or held for a higher-priority task of this
    /// agent that is still running.
    fn paused(&self) -> bool {
        self.pause.load(Ordering::SeqCst) || outranked_by(&self.agent, &self.id).is_some()
    }

    /// Says in the history why the task holds: a pause, or a higher task.
    fn note_hold(&self) {
        match outranked_by(&self.agent, &self.id) {
            Some(by) => self.note(format!("held while task {by} of a higher priority runs")),
            None => self.note("paused".into()),
        }
    }

    /// Whether an origin fetch may go on: stopped by a cancel, held by a
    /// pause or a higher task.
    fn flow(&self) -> impl Fn() -> crate::fetch::Flow + Send + Sync + 'static {
        let (cancel, pause) = (self.cancel.clone(), self.pause.clone());
        let (agent, id) = (self.agent.clone(), self.id.clone());
        move || {
            if cancel.load(Ordering::SeqCst) {
                crate::fetch::Flow::Stop
            } else if pause.load(Ordering::SeqCst) || outranked_by(&agent, &id).is_some() {
                crate::fetch::Flow::Hold
            } else {
                crate::fetch::Flow::Go
            }
        }
    }

    /// How its unicast downloads share the path: the agent's mode, capped
    /// by the task's rate or else the agent's (when one was given).
    fn pacing(&self) -> crate::fetch::Pacing {
        let config = &self.agent.config;
        // The task's rate, else the agent's if one was given.
        let cap = self
            .spec
            .rate_bps
            .or(config.rate_set.then_some(config.rate_bps));
        crate::fetch::Pacing {
            mode: unicast_mode(config.rate_mode),
            cap_bps: cap,
            floor_bps: config.rate_min_bps.min(cap.unwrap_or(u64::MAX)),
        }
    }

    /// Returns at once unless the task is paused or held; then when it is
    /// resumed and no higher task holds it (or cancelled: the caller
    /// checks).
    async fn until_resumed(&self) {
        let mut noted = None;
        loop {
            let notified = self.cancel_notify.notified();
            if !self.paused() || self.cancelled() {
                return;
            }
            let by = outranked_by(&self.agent, &self.id);
            if by.is_some() && by != noted {
                self.note_hold();
                noted = by;
            }
            // A higher task ending wakes nobody: look again now and then.
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(HELD_POLL) => {}
            }
        }
    }

    fn state(&self, s: State) {
        set_state(&self.agent, &self.id, s);
    }

    /// Logs `what` and keeps it in the task's history, for its status.
    fn note(&self, what: String) {
        tracing::info!("task {}: {what}", self.id);
        update(&self.agent, &self.id, |s| {
            if s.history.len() == MAX_HISTORY {
                s.history.remove(0);
            }
            s.history.push(Step {
                at: now_unix(),
                what,
            });
        });
    }

    fn progress(&self, partial: &Partial) {
        note_blocks(&self.agent, &self.id, partial);
        let origin = self.origin.load(Ordering::Relaxed);
        update(&self.agent, &self.id, |s| s.bytes.origin = origin);
    }
}

async fn run(agent: Arc<Agent>, id: String) {
    let Some((spec, cancel, cancel_notify, pause)) = agent.tasks().get(&id).map(|t| {
        (
            t.spec.clone(),
            t.cancel.clone(),
            t.cancel_notify.clone(),
            t.pause.clone(),
        )
    }) else {
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
        pause,
        origin: Arc::new(AtomicU64::new(0)),
        members: Arc::default(),
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
                s.error = Some(crate::error_text(e.as_ref()));
            }
        }
    });
    save(&agent, &id);
    let ended = agent
        .tasks()
        .get(&id)
        .and_then(|t| Some((t.status.clone(), t.spec.report_url.clone()?)));
    if let Some((status, url)) = ended {
        super::report::enqueue(&agent, &status, &url);
    }
    match &result {
        Ok(()) => tracing::info!("task {id}: done"),
        Err(e) => tracing::warn!("task {id}: {}", crate::error_text(e.as_ref())),
    }
    let evicted = agent.cache.evict();
    if !evicted.is_empty() {
        tracing::info!("cache: evicted {} object(s)", evicted.len());
    }
    prune(&agent, now_unix());
}

/// Finished tasks kept at most, however recent: the API lists them all,
/// and presence summarizes the contents of the newest.
pub const MAX_FINISHED: usize = 1000;

/// Forgets finished tasks older than the retention, and the oldest beyond
/// [`MAX_FINISHED`]: their records on disk go too. (Their ids stay in the
/// replay ledger until their documents expire: pruning never lets an order
/// run again.)
pub fn prune(agent: &Agent, now: u64) {
    let retention = agent.config.task_retention.as_secs();
    let gone: Vec<String> = {
        let mut tasks = agent.tasks();
        let mut finished: Vec<(u64, String)> = tasks
            .values()
            .filter(|t| t.status.state.is_terminal())
            .map(|t| {
                (
                    t.status.finished.unwrap_or(t.status.created),
                    t.status.id.clone(),
                )
            })
            .collect();
        finished.sort();
        let over = finished.len().saturating_sub(MAX_FINISHED);
        let gone: Vec<String> = finished
            .into_iter()
            .enumerate()
            .filter(|(i, (at, _))| *i < over || now.saturating_sub(*at) > retention)
            .map(|(_, (_, id))| id)
            .collect();
        for id in &gone {
            tasks.remove(id);
        }
        gone
    };
    for id in &gone {
        let _ = std::fs::remove_file(tasks_dir(agent).join(format!("{id}.json")));
    }
    if !gone.is_empty() {
        tracing::info!("pruned {} finished task(s)", gone.len());
    }
}

async fn drive(r: &Run) -> anyhow::Result<()> {
    let cid = r.m.id();
    // Another task for this content goes first; then this one finds the
    // object in the cache (one download per content on an agent).
    let content_lock = r.agent.content_lock(&cid);
    let _turn = tokio::select! {
        turn = content_lock.lock_owned() => turn,
        _ = r.until_cancelled() => bail!("cancelled"),
    };
    let result = drive_in_turn(r).await;
    if result.is_err() {
        // Nobody resumes it (the next task for this content waits for this
        // turn to end): a failed or cancelled task's partial would only
        // keep its disk space.
        r.agent.cache.discard_partial(&cid);
    }
    result
}

async fn drive_in_turn(r: &Run) -> anyhow::Result<()> {
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
    // Room for the blocks still to come, above the free-disk floor, before
    // anything is fetched.
    let need = {
        let layout = partial.layout();
        let missing = u64::from(layout.block_count() - partial.done_count());
        (missing * u64::from(layout.block_size())).min(layout.file_size())
    };
    let agent = r.agent.clone();
    tokio::task::spawn_blocking(move || agent.cache.make_room(need))
        .await?
        .map_err(|why| anyhow!(why))?;
    let partial = Arc::new(partial);
    r.progress(&partial);
    if !partial.is_complete() {
        acquire(r, &partial).await?;
    }
    if let Some(t) = r.agent.tasks().get_mut(&r.id) {
        t.holding = None; // moving into the cache
    }
    let cache_agent = r.agent.clone();
    let blocks = partial.layout().block_count();
    let verified = tokio::task::spawn_blocking(move || partial.verify())
        .await?
        .context("checking the whole file")?;
    let path = tokio::task::spawn_blocking(move || {
        let path = cache_agent.cache.commit(verified)?;
        crate::agent::repair::note_verified(&cache_agent, &path, blocks);
        Ok::<_, std::io::Error>(path)
    })
    .await?
    .context("moving the verified file into the cache")?;
    finish(r, &path).await
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
        // A rendezvous point fetches for its site: on its own subnet it
        // multicasts what it fetches, so it is the one to represent it.
        let rendezvous = self.placement().is_some_and(|p| p.rendezvous);
        Standing {
            preference: if rendezvous { u8::MAX } else { rank.preference },
            held_permille,
            wired: rank.wired.unwrap_or(false),
            free_disk_gib: (rank.free_disk_mib / 1024).min(u64::from(u32::MAX)) as u32,
            uptime_h: (self.started.elapsed().as_secs() / 3600) as u32,
            node: self.node,
        }
    }
}

/// The agent's rate mode, for its unicast transfers.
pub fn unicast_mode(mode: multicast::rate::Mode) -> repair::pace::Mode {
    match mode {
        multicast::rate::Mode::Background => repair::pace::Mode::Background,
        multicast::rate::Mode::Foreground => repair::pace::Mode::Foreground,
    }
}
