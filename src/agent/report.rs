//! Reports: when a task that names a `report_url` ends (done, failed,
//! cancelled), the agent POSTs a JSON report of it there. Reports wait in
//! `<cache>/reports/` (at most `MAX_QUEUED`, the oldest dropped first), so a
//! restart or an unreachable collector loses none; each is retried with
//! back-off until the collector answers 2xx.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Agent;
use super::task::{InstallResult, TaskStatus};

/// Reports kept waiting at most.
const MAX_QUEUED: usize = 1000;
/// Longest wait for a collector's answer.
const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// Back-off after a failed round: from `FIRST_RETRY`, doubling, at most
/// `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(3600);

/// What an agent reports of a task that ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub task: String,
    pub node: String,
    pub hostname: String,
    pub subnet: Option<String>,
    /// The agent's site in the topology, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub version: String,
    pub role: Option<String>,
    pub state: String,
    pub size: u64,
    pub bytes_multicast: u64,
    pub bytes_peers: u64,
    pub bytes_origin: u64,
    /// From the site's rendezvous points.
    #[serde(default)]
    pub bytes_rendezvous: u64,
    pub seconds: Option<f64>,
    pub error: Option<String>,
    pub install: Option<InstallResult>,
    pub finished: Option<u64>,
}

/// A queued report and where it goes.
#[derive(Debug, Serialize, Deserialize)]
struct Queued {
    url: String,
    report: Report,
}

fn queue_dir(agent: &Agent) -> PathBuf {
    agent.config.cache.join("reports")
}

/// Queues the report of the task that just ended, if it asked for one,
/// and wakes the sender.
pub fn enqueue(agent: &Agent, status: &TaskStatus, url: &str) {
    let report = Report {
        task: status.id.clone(),
        node: status.node.clone(),
        hostname: agent.hostname.clone(),
        subnet: agent.subnet.map(|s| s.to_string()),
        site: status.site.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        role: status.role.clone(),
        state: serde_json::to_value(status.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        size: status.size,
        bytes_multicast: status.bytes.multicast,
        bytes_peers: status.bytes.peers,
        bytes_origin: status.bytes.origin,
        bytes_rendezvous: status.bytes.rendezvous,
        seconds: status.seconds,
        error: status.error.clone(),
        install: status.install.clone(),
        finished: status.finished,
    };
    let dir = queue_dir(agent);
    let q = Queued {
        url: url.into(),
        report,
    };
    let r = std::fs::create_dir_all(&dir).and_then(|_| {
        let bytes = serde_json::to_vec(&q).map_err(std::io::Error::other)?;
        scanner::node::write_atomically(&dir.join(format!("{}.json", status.id)), &bytes)
    });
    match r {
        Ok(()) => trim(&dir),
        Err(e) => tracing::warn!("task {}: cannot queue its report: {e}", status.id),
    }
    agent.reports_wake.notify_one();
}

/// Queued files, oldest first.
fn queued(dir: &std::path::Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

/// Drops the oldest reports past `MAX_QUEUED`.
fn trim(dir: &std::path::Path) {
    let q = queued(dir);
    for p in q.iter().take(q.len().saturating_sub(MAX_QUEUED)) {
        tracing::warn!("report queue full: dropping {}", p.display());
        let _ = std::fs::remove_file(p);
    }
}

/// Sends queued reports until `stop`: a round whenever one is queued, and
/// after a failed round again with back-off.
pub async fn run(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let dir = queue_dir(&agent);
    let mut retry = FIRST_RETRY;
    let mut pending_failures = false;
    loop {
        let wait = if pending_failures { retry } else { MAX_RETRY };
        tokio::select! {
            _ = agent.reports_wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        pending_failures = false;
        for path in queued(&dir) {
            let Some(q) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Queued>(&b).ok())
            else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let post = agent
                .http
                .post(&q.url)
                .timeout(POST_TIMEOUT)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&q.report).unwrap_or_default())
                .send();
            // A stopping agent does not wait for a slow collector: the
            // report stays queued.
            let sent = tokio::select! {
                r = post => r,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            match sent {
                Ok(r) if r.status().is_success() => {
                    let _ = std::fs::remove_file(&path);
                    tracing::info!("task {}: reported to {}", q.report.task, q.url);
                }
                Ok(r) => {
                    pending_failures = true;
                    tracing::warn!(
                        "task {}: report to {}: HTTP {}",
                        q.report.task,
                        q.url,
                        r.status()
                    );
                }
                Err(e) => {
                    pending_failures = true;
                    tracing::warn!(
                        "task {}: report to {}: {}",
                        q.report.task,
                        q.url,
                        crate::error_text(&e)
                    );
                }
            }
        }
        retry = if pending_failures {
            (retry * 2).min(MAX_RETRY)
        } else {
            FIRST_RETRY
        };
    }
}
