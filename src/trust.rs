//! Trust: who may order an agent to act.
//!
//! Protocol flow (an order reaching an agent, by push or later by channel):
//!
//! 1. The [`Gate`] checks the signature over the document's exact text
//!    against the publisher keys the agent trusts (minisign, Ed25519) before
//!    anything of the document is parsed.
//! 2. It parses the document strictly, as the kind expected (task or
//!    control), and checks its validity window against the agent's clock.
//! 3. A task's manifest must hash to the digest the task names; a manifest
//!    that carries a signature of its own must carry a trusted one.
//! 4. The document's id goes into the replay ledger, synced to disk, and
//!    only then does the agent act. An id seen before is refused, across
//!    restarts, for as long as its document is valid.
//!
//! Every refusal has a reason, is counted by reason for `/v1/status`, and
//! leaves nothing behind: nothing is fetched, cached or run.
//!
//! Without a trusted key an agent refuses every order, unless it runs in
//! the insecure lab mode (`--insecure-unsigned`), where unsigned documents
//! are taken and the API token guards the writes as well as the reads.

pub mod document;
pub mod issue;
pub mod keys;
pub mod ledger;
pub mod targets;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::manifest::Manifest;
pub use document::{Action, ControlAction, ControlDoc, Envelope, TaskDoc};
pub use keys::{KeyId, Signer, TrustedKey};
use ledger::{Ledger, LedgerError};

/// What `POST /v1/tasks` takes and `somcast task sign` writes: the signed
/// task and, so the agent need not fetch it, its manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub task: Envelope,
    #[serde(default)]
    pub manifest: Option<Envelope>,
}

/// Why an order was refused. [`Refusal::reason`] names the counter.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error(
        "this agent trusts no publisher key, so it acts on no order: start it with --trust KEY.pub (or, in a lab only, --insecure-unsigned)"
    )]
    NoTrustedKey,
    #[error(
        "unsigned: this agent acts only on documents signed by a publisher key it trusts (sign with --sign KEY)"
    )]
    Unsigned,
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("signed by key {0}, which this agent does not trust (give its .pub with --trust)")]
    UntrustedKey(KeyId),
    #[error("expired at unix time {expires} (the agent's clock says {now})")]
    Expired { expires: u64, now: u64 },
    #[error("not valid before unix time {start} (the agent's clock says {now})")]
    NotYetValid { start: u64, now: u64 },
    #[error("{0} was accepted before: an order is acted on once, a replay never")]
    Replayed(String),
    #[error("malformed document: {0}")]
    Malformed(String),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("this agent is not among the task's targets ({0})")]
    NotTargeted(String),
}

impl Refusal {
    /// The counter this refusal goes to.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoTrustedKey => "no_trusted_key",
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::UntrustedKey(_) => "untrusted_key",
            Refusal::Expired { .. } => "expired",
            Refusal::NotYetValid { .. } => "not_yet_valid",
            Refusal::Replayed(_) => "replayed",
            Refusal::Malformed(_) => "malformed",
            Refusal::Manifest(_) => "manifest",
            Refusal::Unavailable(_) => "unavailable",
            Refusal::NotTargeted(_) => "not_targeted",
        }
    }

    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::Malformed(_) | Refusal::Manifest(_) => 400,
            Refusal::Replayed(_) => 409,
            Refusal::Unavailable(_) => 503,
            _ => 403,
        }
    }
}

/// The agent's side of trust: the keys, the mode, the ledger, the counts.
pub struct Gate {
    keys: Vec<TrustedKey>,
    insecure: bool,
    ledger: Mutex<Ledger>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    accepted: AtomicU64,
}

impl Gate {
    /// Opens the gate of an agent whose state lives in `cache`.
    pub fn open(keys: Vec<TrustedKey>, insecure: bool, cache: &Path) -> std::io::Result<Gate> {
        Ok(Gate {
            keys,
            insecure,
            ledger: Mutex::new(Ledger::open(cache.join("trust").join("seen.json"))?),
            refused: Mutex::new(BTreeMap::new()),
            accepted: AtomicU64::new(0),
        })
    }

    /// Whether unsigned orders are taken (the lab mode).
    pub fn insecure(&self) -> bool {
        self.insecure
    }

    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// The signer of `env`, `None` for an unsigned document in the lab mode.
    pub fn authenticate(&self, env: &Envelope) -> Result<Option<KeyId>, Refusal> {
        if self.insecure && (env.signature.is_none() || self.keys.is_empty()) {
            return Ok(None);
        }
        if self.keys.is_empty() {
            return Err(Refusal::NoTrustedKey);
        }
        env.verify(&self.keys).map(Some)
    }

    /// Steps 1 and 2 for a task, and whether its id is new; records nothing.
    pub fn check_task(
        &self,
        env: &Envelope,
        now: u64,
    ) -> Result<(TaskDoc, Option<KeyId>), Refusal> {
        let signer = self.authenticate(env)?;
        let doc: TaskDoc = document::parse(env, document::TASK_TYPE)?;
        if !document::valid_id(&doc.id) {
            return Err(Refusal::Malformed(format!(
                "task id {:?} must be 1-64 characters of A-Z, a-z, 0-9, - and _",
                doc.id.chars().take(80).collect::<String>()
            )));
        }
        document::check_window(now, doc.issued, doc.not_before, doc.expires)?;
        if let Some(t) = &doc.targets {
            t.check()
                .map_err(|e| Refusal::Malformed(format!("targets: {e}")))?;
        }
        if self.seen(&doc.id) {
            return Err(Refusal::Replayed(format!("task {}", doc.id)));
        }
        Ok((doc, signer))
    }

    /// Step 3: the manifest the task names, checked.
    pub fn check_manifest(&self, doc: &TaskDoc, env: &Envelope) -> Result<Manifest, Refusal> {
        if env.document.len() > document::MAX_DOCUMENT {
            return Err(Refusal::Manifest(format!(
                "{} bytes (at most {})",
                env.document.len(),
                document::MAX_DOCUMENT
            )));
        }
        let digest: [u8; 32] = Sha256::digest(env.document.as_bytes()).into();
        let digest = crate::lab::hex(&digest);
        if !digest.eq_ignore_ascii_case(&doc.manifest_sha256) {
            return Err(Refusal::Manifest(format!(
                "its SHA-256 is {digest}, the task names {}: not the manifest the task was signed for",
                doc.manifest_sha256.chars().take(64).collect::<String>()
            )));
        }
        if env.signature.is_some() && !self.keys.is_empty() {
            env.verify(&self.keys)
                .map_err(|r| Refusal::Manifest(format!("its own signature: {r}")))?;
        }
        let m: Manifest = serde_json::from_str(&env.document)
            .map_err(|e| Refusal::Manifest(format!("not a manifest: {e}")))?;
        m.check().map_err(|e| Refusal::Manifest(e.to_string()))?;
        Ok(m)
    }

    /// A control order for task `task`, checked and recorded.
    pub fn admit_control(
        &self,
        env: &Envelope,
        task: &str,
        action: ControlAction,
        now: u64,
    ) -> Result<ControlDoc, Refusal> {
        let result = (|| {
            self.authenticate(env)?;
            let doc: ControlDoc = document::parse(env, document::CONTROL_TYPE)?;
            if doc.action != action {
                // A signed pause sent where a cancel is carried out (or the
                // other way round) is not taken for the other.
                return Err(Refusal::Malformed(format!(
                    "a {:?} order sent as a {action:?}",
                    doc.action
                )));
            }
            if doc.task != task {
                return Err(Refusal::Malformed(format!(
                    "an order for task {:?} sent for task {task:?}",
                    doc.task.chars().take(64).collect::<String>()
                )));
            }
            if !document::valid_id(&doc.id) {
                return Err(Refusal::Malformed("bad order id".into()));
            }
            document::check_window(now, doc.issued, None, doc.expires)?;
            self.record(&format!("control:{}", doc.id), doc.expires, now)?;
            Ok(doc)
        })();
        self.tally(&result);
        result
    }

    fn seen(&self, id: &str) -> bool {
        self.ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Step 4: remembers `id` on disk; refuses an id seen before.
    pub fn record(&self, id: &str, expires: u64, now: u64) -> Result<(), Refusal> {
        let mut l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        l.record(id, expires, now).map_err(|e| match e {
            LedgerError::Seen => Refusal::Replayed(id.to_string()),
            e => Refusal::Unavailable(e.to_string()),
        })
    }

    /// Counts an outcome: accepted, or refused by reason.
    pub fn tally<T>(&self, result: &Result<T, Refusal>) {
        match result {
            Ok(_) => {
                self.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(r) => {
                tracing::warn!("order refused: {r}");
                *self
                    .refused
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(r.reason())
                    .or_default() += 1;
            }
        }
    }

    /// What `/v1/status` shows under `trust`.
    pub fn status(&self) -> Value {
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        json!({
            "mode": if self.insecure { "insecure-unsigned" } else { "signed" },
            "trusted_keys": self.keys.iter().map(|k| k.id.to_string()).collect::<Vec<_>>(),
            "accepted": self.accepted.load(Ordering::Relaxed),
            "refused": refused,
            "ledger_entries": self.ledger.lock().unwrap_or_else(|p| p.into_inner()).len(),
        })
    }
}
