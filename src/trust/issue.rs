//! The publisher's side: documents written and signed by the console.

use anyhow::{Context, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::document::{self, Action, CONTROL_TYPE, ControlAction, ControlDoc, FORMAT, TASK_TYPE};
use super::{Bundle, Envelope, Signer, TaskDoc};
use crate::manifest::Manifest;

/// What a task orders, before it is written down.
#[derive(Clone, Debug)]
pub struct TaskOrder {
    /// `None`: a fresh random id.
    pub id: Option<String>,
    pub action: Action,
    pub delay_ms: u64,
    pub rate_bps: Option<u64>,
    /// Higher first on an agent with several tasks.
    pub priority: u8,
    pub not_before: Option<u64>,
    pub expires: u64,
    /// Where agents can fetch the manifest if it does not travel along.
    pub manifest_url: Option<String>,
    /// Encrypt the package on the LAN.
    pub encrypt: bool,
    /// Which agents it is for; `None`: all.
    pub targets: Option<super::targets::Targets>,
    /// Where agents report when the task ends.
    pub report_url: Option<String>,
}

/// The text of a document as written: pretty JSON, newline-terminated, so
/// that it reads well in a file and in `jq`.
fn text<T: Serialize>(doc: &T) -> anyhow::Result<String> {
    let mut s = serde_json::to_string_pretty(doc)?;
    s.push('\n');
    Ok(s)
}

fn seal(text: String, signer: Option<&Signer>, what: &str) -> anyhow::Result<Envelope> {
    match signer {
        Some(s) => Envelope::sign(text, s, what),
        None => Ok(Envelope::unsigned(text)),
    }
}

/// A manifest as it is written to its file and travels: signed when a
/// signer is given.
pub fn manifest(m: &Manifest, signer: Option<&Signer>) -> anyhow::Result<Envelope> {
    seal(
        text(m)?,
        signer,
        &format!("somcast manifest {} {}", m.content_id, m.name),
    )
}

/// Reads a manifest file's text: its signed envelope, or plain JSON.
pub fn read_manifest(bytes: &[u8], src: &str) -> anyhow::Result<(Envelope, Manifest)> {
    let env = match serde_json::from_slice::<Envelope>(bytes) {
        Ok(env) => env,
        Err(_) => Envelope::unsigned(
            String::from_utf8(bytes.to_vec()).with_context(|| format!("{src} is not text"))?,
        ),
    };
    let m: Manifest = serde_json::from_str(&env.document)
        .with_context(|| format!("{src} is not a somcast manifest"))?;
    m.check().with_context(|| src.to_string())?;
    Ok((env, m))
}

/// A task bundle for `manifest`: the task document (signed when a signer is
/// given) and the manifest it names by digest.
pub fn task(
    manifest: Envelope,
    order: &TaskOrder,
    signer: Option<&Signer>,
    now: u64,
) -> anyhow::Result<Bundle> {
    let id = order.id.clone().unwrap_or_else(document::new_id);
    if !document::valid_id(&id) {
        bail!("task id {id:?} must be 1-64 characters of A-Z, a-z, 0-9, - and _");
    }
    if order.expires <= now {
        bail!(
            "the task would expire before it is sent (expires {} <= now {now})",
            order.expires
        );
    }
    if order.not_before.is_some_and(|nb| nb >= order.expires) {
        bail!("--not-before is not before --expires: no agent could ever run the task");
    }
    let digest: [u8; 32] = Sha256::digest(manifest.document.as_bytes()).into();
    let doc = TaskDoc {
        doc_type: TASK_TYPE.into(),
        format: FORMAT,
        id: id.clone(),
        issued: now,
        not_before: order.not_before,
        expires: order.expires,
        manifest_sha256: crate::lab::hex(&digest),
        manifest_url: order.manifest_url.clone(),
        action: order.action.clone(),
        delay_ms: order.delay_ms,
        rate_bps: order.rate_bps,
        priority: order.priority,
        encrypt: order.encrypt,
        targets: order.targets.clone().filter(|t| !t.is_all()),
        report_url: order.report_url.clone(),
    };
    if let Some(u) = &doc.report_url
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        bail!("--report-url {u:?}: an http or https URL");
    }
    if let Some(t) = &doc.targets {
        t.check().map_err(|e| anyhow::anyhow!("targets: {e}"))?;
    }
    document::check_window(
        now.max(doc.not_before.unwrap_or(0)),
        now,
        doc.not_before,
        doc.expires,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Bundle {
        task: seal(text(&doc)?, signer, &format!("somcast task {id}"))?,
        manifest: Some(manifest),
    })
}

/// A control order (cancel) for task `task`, valid for an hour: long enough
/// to reach agents that are slow to answer, short enough to keep the
/// ledger small.
pub fn control(
    action: ControlAction,
    task: &str,
    signer: Option<&Signer>,
    now: u64,
) -> anyhow::Result<Envelope> {
    control_until(action, task, signer, now, now + 3600)
}

/// A control document valid until `expires` (a channel's withdrawal lasts
/// as long as the task it withdraws).
pub fn control_until(
    action: ControlAction,
    task: &str,
    signer: Option<&Signer>,
    now: u64,
    expires: u64,
) -> anyhow::Result<Envelope> {
    let doc = ControlDoc {
        doc_type: CONTROL_TYPE.into(),
        format: FORMAT,
        id: document::new_id(),
        action,
        task: task.into(),
        issued: now,
        expires,
    };
    seal(text(&doc)?, signer, &format!("somcast {action:?} {task}"))
}
