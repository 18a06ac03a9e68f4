//! Signed documents: what orders an agent to act.
//!
//! A document is JSON text, signed as it is (no canonical form to agree
//! on): the [`Envelope`] carries the exact text and a minisign signature of
//! it. An administrator can check one with the standard tool:
//!
//! ```text
//! jq -j .task.document TASK.json > t; jq -r .task.signature TASK.json > t.minisig
//! minisign -Vm t -P "$(cat publisher.pub)"
//! ```
//!
//! Three kinds, told apart by their `type` field inside the signed text, so
//! a signature over one kind can never be passed off as another:
//! the manifest (`somcast-manifest`, see `manifest.rs`), the task
//! ([`TaskDoc`]) and the control order ([`ControlDoc`]: cancel, later pause
//! and resume).

use std::io::Cursor;

use minisign::SignatureBox;
use serde::{Deserialize, Serialize};

use super::Refusal;
use super::keys::{KeyId, Signer, TrustedKey};

/// `type` of a task document.
pub const TASK_TYPE: &str = "somcast-task";
/// `type` of a control document.
pub const CONTROL_TYPE: &str = "somcast-control";
/// Document format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Longest document text accepted: a manifest of a 256 GiB package (65 536
/// block hashes of 67 bytes) fits; anything longer is not ours.
pub const MAX_DOCUMENT: usize = 8 << 20;
/// Longest validity window: the replay ledger remembers every id until its
/// document expires, so the window bounds what it must hold.
pub const MAX_VALIDITY_S: u64 = 366 * 86_400;
/// Clock difference between console and agent tolerated at `not_before`
/// and `issued`: a document signed a second ago must not be "from the
/// future" on an agent whose clock is a little behind.
pub const CLOCK_SKEW_S: u64 = 300;

/// A document as it travels and is stored: the exact signed text and its
/// minisign signature (`None`: unsigned, for insecure lab agents only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub document: String,
    #[serde(default)]
    pub signature: Option<String>,
}

impl Envelope {
    /// Signs `document` (its exact text) with `signer`.
    pub fn sign(document: String, signer: &Signer, what: &str) -> anyhow::Result<Envelope> {
        let sig = minisign::sign(
            Some(&signer.public.key),
            &signer.secret,
            Cursor::new(document.as_bytes()),
            Some(what),
            Some(&format!("somcast signature from key {}", signer.public.id)),
        )
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(Envelope {
            document,
            signature: Some(sig.to_string()),
        })
    }

    pub fn unsigned(document: String) -> Envelope {
        Envelope {
            document,
            signature: None,
        }
    }

    /// Checks the signature against `trusted`: the key that made it, or the
    /// reason it does not count. Nothing of the document is parsed here.
    pub fn verify(&self, trusted: &[TrustedKey]) -> Result<KeyId, Refusal> {
        if self.document.len() > MAX_DOCUMENT {
            return Err(Refusal::Malformed(format!(
                "document of {} bytes (at most {MAX_DOCUMENT})",
                self.document.len()
            )));
        }
        let Some(text) = &self.signature else {
            return Err(Refusal::Unsigned);
        };
        let sig = SignatureBox::from_string(text)
            .map_err(|e| Refusal::BadSignature(format!("not a minisign signature: {e}")))?;
        // The text must be the signature's one encoding: base64 that decodes
        // to the same bytes in two spellings would let a changed document
        // file pass as the signed one.
        if !canonical(text, &sig) {
            return Err(Refusal::BadSignature(
                "the signature is not in minisign's canonical form".into(),
            ));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&sig.keynum()[..8]);
        let id = KeyId(id);
        let key = trusted
            .iter()
            .find(|k| k.id == id)
            .ok_or(Refusal::UntrustedKey(id))?;
        minisign::verify(
            &key.key,
            &sig,
            Cursor::new(self.document.as_bytes()),
            true,
            false,
            false,
        )
        .map_err(|e| Refusal::BadSignature(format!("{e} (key {id})")))?;
        Ok(id)
    }
}

/// Whether `text` is exactly what the parsed signature writes back, but for
/// the untrusted comment (free text by design) and the final newline.
fn canonical(text: &str, sig: &SignatureBox) -> bool {
    let again = sig.to_string();
    let tail = |s: &str| -> Vec<String> {
        s.trim_end_matches('\n')
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    text.lines()
        .next()
        .is_some_and(|l| l.starts_with("untrusted comment: "))
        && tail(text) == tail(&again)
}

/// What a task does once its package is verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Fetch into the cache; nothing else.
    Fetch,
    /// Fetch and pin in the cache until `pin_days` from now; never run.
    CacheOnly { pin_days: u32 },
    /// Fetch, then run `command` with the file's path as `$1`, stopped after
    /// `timeout_s`.
    Run { command: String, timeout_s: u64 },
}

/// A task: which package (by the digest of its manifest), what to do with
/// it, when, and how fast.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDoc {
    #[serde(rename = "type")]
    pub doc_type: String,
    pub format: u32,
    /// Unique per task: an agent acts on one id once, ever.
    pub id: String,
    /// Unix seconds.
    pub issued: u64,
    #[serde(default)]
    pub not_before: Option<u64>,
    pub expires: u64,
    /// SHA-256 (hex) of the manifest's exact text.
    pub manifest_sha256: String,
    /// Where the manifest can be fetched when it does not travel along.
    #[serde(default)]
    pub manifest_url: Option<String>,
    pub action: Action,
    /// Startup delay between election and multicast.
    pub delay_ms: u64,
    /// Multicast rate, bit/s on the wire; `None`: the agent's.
    #[serde(default)]
    pub rate_bps: Option<u64>,
    /// Higher first: an agent holds the fetching and sending of its lower
    /// tasks while a higher one runs. Absent: 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: u8,
    /// Encrypt the package on the LAN (agents need a fleet key).
    #[serde(default)]
    pub encrypt: bool,
    /// Which agents the task is for; absent: every agent that gets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<super::targets::Targets>,
    /// Where each agent POSTs a JSON report when the task ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_url: Option<String>,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// What a control document orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    Cancel,
    /// Hold the task where it stands: no multicast, no fetching, no
    /// install, its partial download and pins kept.
    Pause,
    /// Carry a paused task on from where it stood.
    Resume,
}

/// An order about a running task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlDoc {
    #[serde(rename = "type")]
    pub doc_type: String,
    pub format: u32,
    /// Unique per order, for the replay ledger.
    pub id: String,
    pub action: ControlAction,
    pub task: String,
    pub issued: u64,
    pub expires: u64,
}

/// Parses a document's text strictly as `T` of kind `doc_type`.
pub fn parse<T: for<'de> Deserialize<'de>>(env: &Envelope, doc_type: &str) -> Result<T, Refusal> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        doc_type: String,
        format: u32,
    }
    let head: Head = serde_json::from_str(&env.document)
        .map_err(|e| Refusal::Malformed(format!("not a somcast document: {e}")))?;
    if head.doc_type != doc_type {
        return Err(Refusal::Malformed(format!(
            "a {:?} document where a {doc_type:?} was expected",
            head.doc_type.chars().take(40).collect::<String>()
        )));
    }
    if head.format != FORMAT {
        return Err(Refusal::Malformed(format!(
            "document format {} (this build reads {FORMAT})",
            head.format
        )));
    }
    serde_json::from_str(&env.document)
        .map_err(|e| Refusal::Malformed(format!("bad {doc_type} document: {e}")))
}

/// Checks a validity window at `now` (unix seconds).
pub fn check_window(
    now: u64,
    issued: u64,
    not_before: Option<u64>,
    expires: u64,
) -> Result<(), Refusal> {
    if expires <= now {
        return Err(Refusal::Expired { expires, now });
    }
    let start = not_before.unwrap_or(issued).max(issued);
    if start > now + CLOCK_SKEW_S {
        return Err(Refusal::NotYetValid { start, now });
    }
    if expires.saturating_sub(issued) > MAX_VALIDITY_S {
        return Err(Refusal::Malformed(format!(
            "valid for {} days (at most {})",
            expires.saturating_sub(issued) / 86_400,
            MAX_VALIDITY_S / 86_400
        )));
    }
    Ok(())
}

/// A task or control id: 1-64 characters of `A-Za-z0-9-_`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A new random id: 128 bits from the OS, hex.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source is available");
    crate::lab::hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    use proptest::prelude::*;

    fn doc() -> String {
        serde_json::to_string(&TaskDoc {
            doc_type: TASK_TYPE.into(),
            format: FORMAT,
            id: "t1".into(),
            issued: 1000,
            not_before: None,
            expires: 2000,
            manifest_sha256: "ab".repeat(32),
            manifest_url: None,
            action: Action::Run {
                command: "true".into(),
                timeout_s: 60,
            },
            delay_ms: 0,
            rate_bps: None,
            priority: 0,
            encrypt: false,
            targets: None,
            report_url: None,
        })
        .unwrap()
    }

    #[test]
    fn a_signature_counts_only_from_a_trusted_key_over_the_same_text() {
        let signer = Signer::generate().unwrap();
        let other = Signer::generate().unwrap();
        let env = Envelope::sign(doc(), &signer, "t1").unwrap();
        let mine = [signer.public.clone()];
        assert_eq!(env.verify(&mine).unwrap(), signer.public.id);
        assert_eq!(
            env.verify(std::slice::from_ref(&other.public)),
            Err(Refusal::UntrustedKey(signer.public.id))
        );
        assert_eq!(
            Envelope::unsigned(doc()).verify(&mine),
            Err(Refusal::Unsigned)
        );
        let mut tampered = env.clone();
        tampered.document = tampered.document.replace("true", "id;x");
        assert!(matches!(
            tampered.verify(&mine),
            Err(Refusal::BadSignature(_))
        ));
        // Signed by another key that claims the trusted key's id.
        let forged = Envelope::sign(doc(), &other, "t1").unwrap();
        let lines: Vec<String> = forged
            .signature
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let mut raw = B64.decode(&lines[1]).unwrap();
        raw[2..10].copy_from_slice(&signer.public.id.0);
        let mut relabeled = lines.clone();
        relabeled[1] = B64.encode(&raw);
        let forged = Envelope {
            document: doc(),
            signature: Some(relabeled.join("\n") + "\n"),
        };
        assert!(matches!(
            forged.verify(&mine),
            Err(Refusal::BadSignature(_))
        ));
        let parsed = parse::<TaskDoc>(&env, TASK_TYPE).unwrap();
        assert_eq!(parsed.id, "t1");
        assert!(parse::<ControlDoc>(&env, CONTROL_TYPE).is_err());
    }

    #[test]
    fn windows_refuse_expired_and_future_documents() {
        assert!(check_window(1500, 1000, None, 2000).is_ok());
        assert!(matches!(
            check_window(2000, 1000, None, 2000),
            Err(Refusal::Expired { .. })
        ));
        assert!(matches!(
            check_window(1000, 1000, Some(1000 + CLOCK_SKEW_S + 1), 9000),
            Err(Refusal::NotYetValid { .. })
        ));
        assert!(check_window(1000, 1000, Some(1000 + CLOCK_SKEW_S), 9000).is_ok());
        assert!(matches!(
            check_window(1000, 1000, None, 1000 + MAX_VALIDITY_S + 1),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn hostile_signature_text_is_refused_not_a_panic() {
        let signer = Signer::generate().unwrap();
        let trusted = [signer.public.clone()];
        for s in [
            "",
            "\n\n\n",
            "untrusted comment: x\n",
            "untrusted comment: x\nRUQ=\ntrusted comment: y\nAA==\n",
            "untrusted comment: x\n!!!!\ntrusted comment: y\n!!!!\n",
            "trusted comment: \u{1F600}\n\u{1F600}\n\u{1F600}\n\u{1F600}",
        ] {
            let env = Envelope {
                document: doc(),
                signature: Some(s.into()),
            };
            assert!(
                matches!(env.verify(&trusted), Err(Refusal::BadSignature(_))),
                "{s:?}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// No single-byte change of the signed text, or of the signature's
        /// lines that are signed (all but the free untrusted comment), is
        /// accepted.
        #[test]
        fn no_single_byte_change_is_accepted(pos in any::<prop::sample::Index>(), byte in any::<u8>(), in_sig in any::<bool>()) {
            let signer = Signer::generate().unwrap();
            let trusted = [signer.public.clone()];
            let env = Envelope::sign(doc(), &signer, "t1").unwrap();
            let mut changed = env.clone();
            if in_sig {
                let sig = env.signature.clone().unwrap();
                let first = sig.find('\n').unwrap() + 1;
                let mut bytes = sig.into_bytes();
                let i = first + pos.index(bytes.len() - first);
                prop_assume!(bytes[i] != byte);
                bytes[i] = byte;
                changed.signature = Some(String::from_utf8_lossy(&bytes).into_owned());
            } else {
                let mut bytes = env.document.clone().into_bytes();
                let i = pos.index(bytes.len());
                prop_assume!(bytes[i] != byte);
                bytes[i] = byte;
                changed.document = String::from_utf8_lossy(&bytes).into_owned();
            }
            prop_assume!(changed != env);
            prop_assert!(changed.verify(&trusted).is_err());
        }
    }
}
