//! The replay ledger: every document id an agent has acted on, kept until
//! the document expires (after that the window refuses it anyway), on disk,
//! so a restart does not forget. Written with a sync before the agent acts,
//! so a crash can lose an order but never run one twice.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Ids remembered at most: 100 000 orders still inside their windows is far
/// beyond any real rollout schedule; past it the agent refuses new orders
/// rather than forget old ones.
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    /// id -> the unix second its document expires.
    seen: BTreeMap<String, u64>,
}

/// Document ids seen, with their expiry.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    seen: BTreeMap<String, u64>,
}

/// Why an id could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("already seen")]
    Seen,
    #[error(
        "the replay ledger holds {MAX_ENTRIES} unexpired ids; refusing new orders until some expire"
    )]
    Full,
    #[error("cannot write the replay ledger {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Ledger {
    /// Opens the ledger at `path`; a missing file is an empty ledger, an
    /// unreadable one an error (forgetting it would allow replays).
    pub fn open(path: PathBuf) -> io::Result<Ledger> {
        let seen = match std::fs::read(&path) {
            Ok(bytes) => {
                let s: Stored = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is damaged ({e}); it guards against replayed orders, so the agent will not start without it: restore it, or remove it knowing that orders still in their validity window could run again",
                            path.display()
                        ),
                    )
                })?;
                s.seen
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Ledger { path, seen })
    }

    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Records `id` (valid until `expires`) and syncs it to disk before it
    /// returns; ids whose documents expired before `now` are dropped.
    pub fn record(&mut self, id: &str, expires: u64, now: u64) -> Result<(), LedgerError> {
        if self.seen.contains_key(id) {
            return Err(LedgerError::Seen);
        }
        self.seen.retain(|_, e| *e > now);
        if self.seen.len() >= MAX_ENTRIES {
            return Err(LedgerError::Full);
        }
        self.seen.insert(id.to_string(), expires);
        let bytes = serde_json::to_vec(&Stored {
            seen: self.seen.clone(),
        })
        .map_err(|e| self.io(io::Error::other(e)))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        if let Err(e) = scanner::node::write_atomically(&self.path, &bytes) {
            self.seen.remove(id);
            return Err(self.io(e));
        }
        Ok(())
    }

    fn io(&self, source: io::Error) -> LedgerError {
        LedgerError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_remembered_across_reopening_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust").join("seen.json");
        let mut l = Ledger::open(path.clone()).unwrap();
        l.record("a", 100, 10).unwrap();
        assert!(matches!(l.record("a", 100, 10), Err(LedgerError::Seen)));
        let mut l = Ledger::open(path.clone()).unwrap();
        assert!(l.contains("a"));
        // Once "a" has expired, recording another id prunes it.
        l.record("b", 500, 200).unwrap();
        assert!(!l.contains("a") && l.contains("b"));
        assert_eq!(Ledger::open(path).unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_ledger_stops_the_agent_rather_than_forget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen.json");
        std::fs::write(&path, b"{\"seen\": [").unwrap();
        let e = Ledger::open(path).unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains("replayed"), "{e}");
    }
}
