//! The node id: random once, then kept in the cache directory so that an
//! agent is the same peer after a restart.

use std::io;
use std::path::{Path, PathBuf};

/// File in the cache directory that holds the node id (16 hex digits).
pub const NODE_ID_FILE: &str = "node-id";

/// Reads the node id stored in `dir`, or creates and stores a new one.
/// A file that does not hold an id (truncated, edited) is replaced, with
/// the reason returned so that the caller can log it.
pub fn load_or_create(
    dir: &Path,
    fresh: impl FnOnce() -> u64,
) -> io::Result<(u64, Option<String>)> {
    let path = dir.join(NODE_ID_FILE);
    let mut replaced = None;
    match std::fs::read_to_string(&path) {
        Ok(text) => match parse(&text) {
            Some(id) => return Ok((id, None)),
            None => {
                replaced = Some(format!(
                    "{} does not hold a node id ({:?}); a new one replaces it",
                    path.display(),
                    text.chars().take(40).collect::<String>()
                ))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    // Zero is kept out: it reads as "no node" in logs and tests.
    let id = fresh().max(1);
    write_atomically(&path, format!("{id:016x}\n").as_bytes())?;
    Ok((id, replaced))
}

fn parse(text: &str) -> Option<u64> {
    let t = text.trim();
    if t.len() != 16 {
        return None;
    }
    u64::from_str_radix(t, 16).ok().filter(|&id| id != 0)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames
/// it over `path`: readers see the old or the new content, never half.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes, true)
}

/// Like [`write_atomically`]; without `sync` the content may be lost in a
/// power cut (never half-written after a crash of the process), for state
/// that can be rebuilt and is written often.
pub fn replace_file(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    use std::io::Write;
    // A name of its own per write: two writers of one file at once each
    // rename a whole file (the last one wins), never one another's half.
    let tmp: PathBuf = {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(
            ".{}.{:x}.tmp",
            std::process::id(),
            multicast::driver::random_id()
        ));
        path.with_file_name(name)
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("somcast-node-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_node_id_survives_a_restart() {
        let dir = temp_dir("survives");
        let (a, note) = load_or_create(&dir, || 0xABCD).unwrap();
        assert_eq!((a, note), (0xABCD, None));
        let (b, _) = load_or_create(&dir, || 0x1234).unwrap();
        assert_eq!(b, 0xABCD);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_spoiled_id_file_is_replaced_with_a_reason() {
        let dir = temp_dir("spoiled");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(NODE_ID_FILE), "not hex").unwrap();
        let (id, note) = load_or_create(&dir, || 77).unwrap();
        assert_eq!(id, 77);
        assert!(note.unwrap().contains("does not hold a node id"));
        assert_eq!(load_or_create(&dir, || 5).unwrap().0, 77);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
