//! Admission: a signed order becomes a task, or is refused with its reason.
//! The checks are the [`Gate`](crate::trust::Gate)'s; this module fetches
//! what they need (a manifest named by URL) and hands the result to the
//! task machinery only once the order's id is in the replay ledger.

use std::sync::Arc;
use std::time::Duration;

use super::Agent;
use super::task::{self, SpecError, TaskSpec, TaskStatus};
use crate::cache::now_unix;
use crate::trust::{Action, Bundle, ControlAction, Envelope, Refusal, TaskDoc, document};

/// Longest wait for a manifest named by URL.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a task was not started.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Spec(#[from] SpecError),
}

impl AdmitError {
    pub fn http_status(&self) -> u16 {
        match self {
            AdmitError::Refused(r) => r.http_status(),
            AdmitError::Spec(SpecError::Conflict(_)) => 409,
            AdmitError::Spec(SpecError::Storage(_)) => 503,
            AdmitError::Spec(_) => 400,
        }
    }
}

/// Checks a task bundle and starts its task.
pub async fn task(agent: &Arc<Agent>, bundle: Bundle) -> Result<TaskStatus, AdmitError> {
    let result = admit(agent, bundle).await;
    match &result {
        Ok(_) => agent.gate.tally::<()>(&Ok(())),
        Err(AdmitError::Refused(r)) => agent.gate.tally::<()>(&Err(r.clone())),
        Err(AdmitError::Spec(e)) => agent
            .gate
            .tally::<()>(&Err(Refusal::Malformed(e.to_string()))),
    }
    result
}

async fn admit(agent: &Arc<Agent>, bundle: Bundle) -> Result<TaskStatus, AdmitError> {
    let now = now_unix();
    let (doc, signer) = agent.gate.check_task(&bundle.task, now)?;
    if let Some(t) = &doc.targets
        && !t.matches(&agent.identity())
    {
        return Err(Refusal::NotTargeted(t.describe()).into());
    }
    let manifest_env = match bundle.manifest {
        Some(m) => m,
        None => fetch_manifest(agent, &doc).await?,
    };
    let manifest = agent.gate.check_manifest(&doc, &manifest_env)?;
    let spec = spec_of(&doc, manifest, signer.map(|k| k.to_string()));
    task::check_spec(&spec)?;
    if spec.encrypt && agent.fleet.is_none() {
        return Err(SpecError::EncryptWithoutKey.into());
    }
    agent.gate.record(&doc.id, doc.expires, now)?;
    Ok(task::submit(agent, spec)?)
}

/// The task the agent runs for a checked document.
fn spec_of(
    doc: &TaskDoc,
    manifest: crate::manifest::Manifest,
    signed_by: Option<String>,
) -> TaskSpec {
    let (cache_only, pin_days, run, run_timeout_s) = match &doc.action {
        Action::Fetch => (false, None, None, None),
        Action::CacheOnly { pin_days } => (true, Some(*pin_days), None, None),
        Action::Run { command, timeout_s } => {
            (false, None, Some(command.clone()), Some(*timeout_s))
        }
    };
    TaskSpec {
        id: Some(doc.id.clone()),
        manifest,
        cache_only,
        run,
        delay_ms: Some(doc.delay_ms),
        pin_days,
        rate_bps: doc.rate_bps,
        priority: doc.priority,
        run_timeout_s,
        signed_by,
        encrypt: doc.encrypt,
        report_url: doc.report_url.clone(),
    }
}

async fn fetch_manifest(agent: &Agent, doc: &TaskDoc) -> Result<Envelope, Refusal> {
    let Some(url) = &doc.manifest_url else {
        return Err(Refusal::Manifest(
            "neither sent along nor named by a manifest_url".into(),
        ));
    };
    let fail = |e: String| Refusal::Manifest(format!("fetching {url}: {e}"));
    let mut resp = agent
        .http
        .get(url)
        .timeout(MANIFEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| fail(crate::error_text(&e)))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
        body.extend_from_slice(&chunk);
        if body.len() > document::MAX_DOCUMENT {
            return Err(fail(format!(
                "longer than {} bytes",
                document::MAX_DOCUMENT
            )));
        }
    }
    // A manifest file is either the plain JSON or its signed envelope.
    if let Ok(env) = serde_json::from_slice::<Envelope>(&body) {
        return Ok(env);
    }
    String::from_utf8(body)
        .map(Envelope::unsigned)
        .map_err(|_| fail("not UTF-8 text".into()))
}

/// Checks a cancel order and passes it on; the task's status, or `None`
/// when the agent has no such task.
pub fn cancel(
    agent: &Agent,
    id: &str,
    order: Option<&Envelope>,
) -> Result<Option<TaskStatus>, Refusal> {
    control(agent, id, ControlAction::Cancel, order)
}

/// Checks an order about a running task (signed, for this task, not seen
/// before, of the action the caller carries out) and carries it out; the
/// task's status, or `None` when the agent has no such task.
pub fn control(
    agent: &Agent,
    id: &str,
    action: ControlAction,
    order: Option<&Envelope>,
) -> Result<Option<TaskStatus>, Refusal> {
    match order {
        Some(env) => {
            agent.gate.admit_control(env, id, action, now_unix())?;
        }
        None if agent.gate.insecure() => {}
        None => {
            let r = Refusal::Unsigned;
            agent.gate.tally::<()>(&Err(r.clone()));
            return Err(r);
        }
    }
    Ok(match action {
        ControlAction::Cancel => task::cancel(agent, id),
        ControlAction::Pause => task::pause(agent, id, true),
        ControlAction::Resume => task::pause(agent, id, false),
    })
}
