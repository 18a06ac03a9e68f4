//! Polling a task channel (`--channel URL`, see [`crate::channel`]): every
//! `--poll` with 10% jitter, a conditional GET of the index (an unchanged
//! channel costs one 304), then each task and withdrawal not judged before,
//! fetched and put through the same admission as the API's (signature,
//! window, replay ledger, targets), then the latest pause or resume of each
//! task, in the order they were issued. What was judged is kept across restarts
//! so that nothing is fetched twice; the ledger makes sure nothing runs
//! twice. Errors back off (doubling, at most 16 polls or an hour) and a
//! server's Retry-After is honoured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use reqwest::header;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Agent;
use super::admit::{self, AdmitError};
use crate::cache::now_unix;
use crate::channel::{INDEX, Index, MAX_INDEX};
use crate::trust::{Bundle, ControlAction, ControlDoc, Envelope, Refusal, document};

/// Longest wait for one response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause between polls after errors or a Retry-After.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Ids remembered as judged; past it, those the index no longer lists go.
const MAX_JUDGED: usize = 20_000;

/// What `/v1/status` shows under `channel`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub url: Option<String>,
    pub polls: u64,
    pub not_modified: u64,
    pub errors: u64,
    pub last_poll: Option<u64>,
    pub last_error: Option<String>,
    pub tasks_started: u64,
    pub not_targeted: u64,
    pub refused: u64,
    pub withdrawn: u64,
    /// Pause and resume orders carried out.
    pub orders: u64,
}

/// What the poller keeps in `<cache>/channel-state.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Memory {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
    /// Task id -> what became of it ("started", "not a target", ...).
    judged: BTreeMap<String, String>,
    /// Task id -> the last pause or resume order judged of it.
    #[serde(default)]
    orders: BTreeMap<String, Judged>,
    /// The id of the channel's topology last judged.
    #[serde(default)]
    topology: Option<String>,
}

/// A pause or resume order judged: its id and when it was issued (in
/// seconds). An order issued before the last carried out is stale: a server
/// that serves an old file again cannot undo a newer order. One issued in
/// the same second is carried out; the replay ledger still takes each once.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Judged {
    id: String,
    issued: u64,
}

fn memory_path(agent: &Agent) -> PathBuf {
    agent.config.cache.join("channel-state.json")
}

fn load(path: &Path, url: &str) -> Memory {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Memory>(&b).ok())
        .filter(|m| m.url == url)
        .unwrap_or_else(|| Memory {
            url: url.into(),
            ..Memory::default()
        })
}

fn save(path: &Path, m: &Memory) {
    let r = serde_json::to_vec_pretty(m)
        .map_err(std::io::Error::other)
        .and_then(|b| scanner::node::write_atomically(path, &b));
    if let Err(e) = r {
        tracing::warn!("channel: cannot save {}: {e}", path.display());
    }
}

/// Why a poll failed, and how long the server asked us to wait.
struct PollError {
    why: String,
    retry_after: Option<Duration>,
}

impl From<anyhow::Error> for PollError {
    fn from(e: anyhow::Error) -> Self {
        PollError {
            why: crate::error_text(e.as_ref()),
            retry_after: None,
        }
    }
}

/// `poll` scaled by a random factor in [0.9, 1.1).
fn jittered(poll: Duration) -> Duration {
    super::jittered(poll, 0.1)
}

/// Polls the channel until `stop`; returns at once without one.
pub async fn run(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let Some(base) = agent.config.channel.clone() else {
        return Ok(());
    };
    let poll = agent.config.poll;
    let path = memory_path(&agent);
    let mut memory = load(&path, base.as_str());
    lock(&agent).url = Some(base.to_string());
    let mut failures = 0u32;
    // Agents started together do not all ask at once.
    let mut wait = jittered(poll.min(Duration::from_secs(10))).mul_f64(0.5);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        // A stopping agent does not wait for a slow server; what this poll
        // judged is saved, the rest is judged again next time.
        let outcome = tokio::select! {
            o = poll_once(&agent, &base, &mut memory) => o,
            _ = stop.wait_for(|s| *s) => {
                save(&path, &memory);
                return Ok(());
            }
        };
        {
            let mut s = lock(&agent);
            s.polls += 1;
            s.last_poll = Some(now_unix());
            if let Err(e) = &outcome {
                s.errors += 1;
                s.last_error = Some(e.why.clone());
            }
        }
        wait = match outcome {
            Ok(changed) => {
                failures = 0;
                if changed {
                    save(&path, &memory);
                }
                jittered(poll)
            }
            Err(e) => {
                failures += 1;
                tracing::warn!("channel {base}: {}", e.why);
                let backoff = jittered(poll * (1 << failures.min(4))).min(MAX_BACKOFF);
                e.retry_after
                    .map_or(backoff, |r| backoff.max(r.min(MAX_BACKOFF)))
            }
        };
    }
}

fn lock(agent: &Agent) -> std::sync::MutexGuard<'_, Status> {
    agent
        .channel
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn join(base: &reqwest::Url, path: &str) -> String {
    format!("{}/{path}", base.as_str().trim_end_matches('/'))
}

/// GETs `url` (conditional when `memory` is given), its body at most `max`
/// bytes; `None` for 304.
async fn get(
    agent: &Agent,
    url: &str,
    max: usize,
    memory: Option<&Memory>,
) -> Result<Option<(Vec<u8>, header::HeaderMap)>, PollError> {
    let mut req = agent.http.get(url).timeout(REQUEST_TIMEOUT);
    if let Some(m) = memory {
        if let Some(e) = &m.etag {
            req = req.header(header::IF_NONE_MATCH, e);
        }
        if let Some(l) = &m.last_modified {
            req = req.header(header::IF_MODIFIED_SINCE, l);
        }
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| anyhow!("{url}: {}", crate::error_text(&e)))?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    if !status.is_success() {
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(PollError {
            why: format!("{url}: HTTP {status}"),
            retry_after,
        });
    }
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| anyhow!("{url}: {}", crate::error_text(&e)))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > max {
            return Err(anyhow!("{url}: longer than {max} bytes").into());
        }
    }
    Ok(Some((body, headers)))
}

/// Judges what the index lists that was not judged before: the topology,
/// withdrawals, tasks, then orders. The first error, if any (the rest is
/// still judged).
async fn judge(
    agent: &Arc<Agent>,
    base: &reqwest::Url,
    index: &Index,
    memory: &mut Memory,
) -> Option<PollError> {
    let mut first_error: Option<PollError> = None;
    // The topology first: a task taken in this poll fetches by it.
    if let Some(id) = &index.topology
        && memory.topology.as_ref() != Some(id)
    {
        match topology_of(agent, base).await {
            Ok(()) => memory.topology = Some(id.clone()),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for id in &index.withdrawn {
        if memory.judged.get(id).is_some_and(|v| v == "withdrawn") {
            continue;
        }
        match withdraw(agent, base, id).await {
            Ok(verdict) => {
                memory.judged.insert(id.clone(), verdict);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for id in &index.tasks {
        if memory.judged.contains_key(id) {
            continue;
        }
        match take(agent, base, id).await {
            Ok(verdict) => {
                memory.judged.insert(id.clone(), verdict);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // After the tasks: a task taken in this poll gets its pause at once.
    for (id, order) in &index.orders {
        if memory.orders.get(id).is_some_and(|j| &j.id == order) {
            continue;
        }
        match order_of(agent, base, id, order, memory.orders.get(id)).await {
            Ok(judged) => {
                memory.orders.insert(id.clone(), judged);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error
}

/// One poll: the index, then what it lists that was not judged before.
/// `Ok(true)` when something changed that is worth saving.
async fn poll_once(
    agent: &Arc<Agent>,
    base: &reqwest::Url,
    memory: &mut Memory,
) -> Result<bool, PollError> {
    let Some((body, headers)) = get(agent, &join(base, INDEX), MAX_INDEX, Some(memory)).await?
    else {
        lock(agent).not_modified += 1;
        return Ok(false);
    };
    let index = Index::parse(&body).map_err(|e| anyhow!("{}: {e:#}", join(base, INDEX)))?;
    let text = |h: header::HeaderName| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let first_error = judge(agent, base, &index, memory).await;
    memory.orders.retain(|id, _| index.orders.contains_key(id));
    if memory.judged.len() > MAX_JUDGED {
        memory
            .judged
            .retain(|id, _| index.tasks.contains(id) || index.withdrawn.contains(id));
    }
    if let Some(e) = first_error {
        // Not the new ETag: the next poll must see the index again.
        return Err(e);
    }
    memory.etag = text(header::ETAG);
    memory.last_modified = text(header::LAST_MODIFIED);
    Ok(true)
}

/// Fetches and admits task `id`: its verdict, or an error to retry later.
async fn take(agent: &Arc<Agent>, base: &reqwest::Url, id: &str) -> Result<String, PollError> {
    let url = join(base, &format!("tasks/{id}.json"));
    let max = 2 * document::MAX_DOCUMENT + 64 * 1024;
    let (body, _) = get(agent, &url, max, None)
        .await?
        .ok_or_else(|| anyhow!("{url}: 304 to an unconditional request"))?;
    let bundle: Bundle = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return Ok(refused(agent, id, &format!("not a task bundle: {e}"))),
    };
    // Whoever can write the server's files is no publisher: even a lab
    // agent that takes unsigned tasks through its API takes none from here.
    if bundle.task.signature.is_none() {
        return Ok(refused(
            agent,
            id,
            "unsigned: a channel carries only signed tasks",
        ));
    }
    let listed = document::parse::<crate::trust::TaskDoc>(&bundle.task, document::TASK_TYPE)
        .map(|d| d.id == id)
        .unwrap_or(true);
    if !listed {
        return Ok(refused(agent, id, "its document has another id"));
    }
    match admit::task(agent, bundle).await {
        Ok(_) => {
            lock(agent).tasks_started += 1;
            tracing::info!("channel: task {id} started");
            Ok("started".into())
        }
        Err(AdmitError::Refused(Refusal::NotTargeted(t))) => {
            lock(agent).not_targeted += 1;
            tracing::info!("channel: task {id} is not for this agent ({t})");
            Ok("not a target".into())
        }
        Err(AdmitError::Refused(Refusal::Replayed(_))) => Ok("run before".into()),
        Err(e @ AdmitError::Refused(Refusal::Unavailable(_)))
        | Err(e @ AdmitError::Spec(super::task::SpecError::Storage(_))) => {
            Err(anyhow!("task {id}: {e}").into())
        }
        Err(e) => Ok(refused(agent, id, &e.to_string())),
    }
}

/// Fetches, checks and puts in force the channel's topology, unless the
/// one in force was issued later; a bad one is refused (and counted) and
/// the one in force stays. An error is for retrying later.
async fn topology_of(agent: &Arc<Agent>, base: &reqwest::Url) -> Result<(), PollError> {
    let url = join(base, crate::channel::TOPOLOGY);
    let (body, _) = get(agent, &url, document::MAX_DOCUMENT + 64 * 1024, None)
        .await?
        .ok_or_else(|| anyhow!("{url}: 304 to an unconditional request"))?;
    let env = match serde_json::from_slice::<Envelope>(&body) {
        Ok(env) if env.signature.is_some() => env,
        Ok(_) => {
            refused(agent, "topology", "unsigned");
            return Ok(());
        }
        Err(e) => {
            refused(agent, "topology", &format!("not a signed document: {e}"));
            return Ok(());
        }
    };
    match crate::topology::Topology::open(&env, &agent.gate, crate::cache::now_unix()) {
        Ok(t) => {
            let id = t.id.clone();
            if agent.set_topology(t) {
                super::site::keep(agent, &env);
            } else {
                tracing::info!("channel: topology {id} is older than the one in force; ignored");
            }
        }
        Err(e) => {
            refused(agent, "topology", &e.to_string());
        }
    }
    Ok(())
}

fn refused(agent: &Agent, id: &str, why: &str) -> String {
    lock(agent).refused += 1;
    tracing::warn!("channel: task {id} refused: {why}");
    format!("refused: {why}")
}

/// Fetches and checks the withdrawal of `id`, cancelling the task if it
/// runs: its verdict, or an error to retry later.
async fn withdraw(agent: &Arc<Agent>, base: &reqwest::Url, id: &str) -> Result<String, PollError> {
    let url = join(base, &format!("withdrawn/{id}.json"));
    let (body, _) = get(agent, &url, document::MAX_DOCUMENT + 64 * 1024, None)
        .await?
        .ok_or_else(|| anyhow!("{url}: 304 to an unconditional request"))?;
    let env: Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return Ok(refused(agent, id, &format!("withdrawal: {e}"))),
    };
    if env.signature.is_none() {
        return Ok(refused(agent, id, "withdrawal: unsigned"));
    }
    match admit::cancel(agent, id, Some(&env)) {
        Ok(running) => {
            lock(agent).withdrawn += 1;
            if running.is_some() {
                tracing::info!("channel: task {id} withdrawn: cancelling it");
            }
            Ok("withdrawn".into())
        }
        Err(Refusal::Replayed(_)) => Ok("withdrawn".into()),
        Err(e) => Ok(refused(agent, id, &format!("withdrawal: {e}"))),
    }
}

/// Fetches, checks and carries out the pause or resume of task `id` that
/// the index names `listed`, unless it is older than `last`: what to
/// remember of it (under `listed`, so a bad file is judged once), or an
/// error to retry later.
async fn order_of(
    agent: &Arc<Agent>,
    base: &reqwest::Url,
    id: &str,
    listed: &str,
    last: Option<&Judged>,
) -> Result<Judged, PollError> {
    let url = join(base, &format!("orders/{id}.json"));
    let (body, _) = get(agent, &url, document::MAX_DOCUMENT + 64 * 1024, None)
        .await?
        .ok_or_else(|| anyhow!("{url}: 304 to an unconditional request"))?;
    let mut judged = Judged {
        id: listed.into(),
        issued: last.map_or(0, |l| l.issued),
    };
    let env: Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            refused(agent, id, &format!("order: {e}"));
            return Ok(judged);
        }
    };
    // Read for its action and date only; the gate checks all of it.
    let doc = match document::parse::<ControlDoc>(&env, document::CONTROL_TYPE) {
        Ok(_) if env.signature.is_none() => {
            refused(agent, id, "order: unsigned");
            return Ok(judged);
        }
        Ok(d) => d,
        Err(e) => {
            refused(agent, id, &format!("order: {e}"));
            return Ok(judged);
        }
    };
    if last.is_some_and(|l| doc.issued < l.issued) {
        tracing::info!(
            "channel: order {} for task {id} is older than the last",
            doc.id
        );
        return Ok(judged);
    }
    if doc.action == ControlAction::Cancel {
        // A channel cancels by withdrawal.
        refused(agent, id, "order: a cancel among the orders");
        return Ok(judged);
    }
    match admit::control(agent, id, doc.action, Some(&env)) {
        Ok(running) => {
            judged.issued = doc.issued;
            lock(agent).orders += 1;
            if running.is_some() {
                tracing::info!("channel: task {id}: {:?}", doc.action);
            }
        }
        Err(Refusal::Replayed(_)) => judged.issued = doc.issued,
        Err(e) => {
            refused(agent, id, &format!("order: {e}"));
        }
    }
    Ok(judged)
}

/// The channel's status, or `None` without one.
pub fn status(agent: &Agent) -> Option<serde_json::Value> {
    agent.config.channel.as_ref()?;
    serde_json::to_value(lock(agent).clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..1000 {
            let j = jittered(Duration::from_secs(100));
            assert!(
                j >= Duration::from_secs(90) && j < Duration::from_secs(110),
                "{j:?}"
            );
        }
    }

    #[test]
    fn memory_of_another_channel_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let mut m = load(&path, "http://a/c");
        m.judged.insert("t".into(), "started".into());
        m.etag = Some("\"1\"".into());
        save(&path, &m);
        assert_eq!(load(&path, "http://a/c").judged.len(), 1);
        let other = load(&path, "http://b/c");
        assert!(other.judged.is_empty() && other.etag.is_none());
    }
}
