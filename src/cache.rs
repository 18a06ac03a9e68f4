//! The content-addressed cache.
//!
//! ```text
//! <cache>/objects/<id>              complete, verified, read-only
//! <cache>/objects/<id>.meta.json    size, last use, pin expiry
//! <cache>/partial/<id>.data         a download in progress, full size
//! <cache>/partial/<id>.state.json   the manifest and which blocks are done
//! ```
//!
//! State files are rewritten atomically (temporary file, rename) after each
//! block, so a killed agent finds either the old or the new state, and
//! resumes without fetching a finished block again. They are not fsynced:
//! on resume every block the state calls done is hashed again (a block that
//! does not match, because the data never reached the disk before a power
//! cut, is fetched again, never trusted), and a full-size data file without
//! a readable state has every block hashed to find the ones it holds.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use multicast::Layout;
use serde::{Deserialize, Serialize};

use crate::blocks::Blocks;
use crate::manifest::Checked;

/// Limits the cache keeps to when it evicts.
#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    /// Most bytes of complete objects.
    pub max_bytes: u64,
    /// Least free bytes left on the cache's file system.
    pub min_free_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 << 30,
            min_free_bytes: 2 << 30,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub size: u64,
    pub name: String,
    /// Unix seconds.
    pub last_used: u64,
    /// Unix seconds; pinned (never evicted) until then.
    pub pinned_until: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct PartialState {
    content_id: String,
    /// One character per block: '1' done, '0' not.
    done: String,
}

/// The cache directory of one agent.
pub struct Cache {
    root: PathBuf,
    limits: CacheLimits,
    /// Objects that running tasks use: never evicted.
    in_use: Mutex<HashSet<String>>,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Cache {
    pub fn open(root: &Path, limits: CacheLimits) -> io::Result<Self> {
        fs::create_dir_all(root.join("objects"))?;
        fs::create_dir_all(root.join("partial"))?;
        Ok(Self {
            root: root.to_owned(),
            limits,
            in_use: Mutex::new(HashSet::new()),
        })
    }

    pub fn object_path(&self, id: &str) -> PathBuf {
        self.root.join("objects").join(id)
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.root.join("objects").join(format!("{id}.meta.json"))
    }

    /// The verified object, if the cache holds it; marks it used.
    pub fn get(&self, id: &str) -> Option<PathBuf> {
        let path = self.object_path(id);
        if !path.is_file() {
            return None;
        }
        let mut meta = self.meta(id).unwrap_or_default();
        meta.last_used = now_unix();
        let _ = self.write_meta(id, &meta);
        Some(path)
    }

    pub fn meta(&self, id: &str) -> Option<ObjectMeta> {
        let text = fs::read_to_string(self.meta_path(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write_meta(&self, id: &str, meta: &ObjectMeta) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
        scanner::node::write_atomically(&self.meta_path(id), &bytes)
    }

    /// Pins an object until `until` (unix seconds); a later pin wins.
    pub fn pin(&self, id: &str, until: u64) -> io::Result<()> {
        let mut meta = self.meta(id).unwrap_or_default();
        meta.pinned_until = Some(meta.pinned_until.unwrap_or(0).max(until));
        self.write_meta(id, &meta)
    }

    /// Keeps `id` from eviction until [`Cache::release`].
    pub fn hold(&self, id: &str) {
        self.in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned());
    }

    pub fn release(&self, id: &str) {
        self.in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    /// Opens the download of `m`, resuming a previous one when its state
    /// matches the manifest.
    pub fn partial(&self, m: &Checked) -> io::Result<Partial> {
        let id = m.id();
        let data = self.root.join("partial").join(format!("{id}.data"));
        let state = self.root.join("partial").join(format!("{id}.state.json"));
        let blocks = m.layout.block_count() as usize;
        let previous: Option<Vec<bool>> = fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<PartialState>(&t).ok())
            .filter(|s| s.content_id == m.raw.content_id && s.done.len() == blocks)
            .map(|s| s.done.chars().map(|c| c == '1').collect());
        // An earlier version made the file read-only before moving it into
        // the cache: a crash between the two left it so, and unwritable
        // for an agent that does not run as root.
        make_owner_writable(&data)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data)?;
        let size_ok = file.metadata()?.len() == m.layout.file_size();
        let previous_known = previous.is_some();
        let mut done = match previous {
            Some(d) if size_ok => d,
            // A full-size file whose state was lost: its blocks are checked.
            None if size_ok && blocks > 0 => vec![true; blocks],
            _ => vec![false; blocks],
        };
        if !size_ok {
            file.set_len(0)?;
            file.set_len(m.layout.file_size())?;
        }
        // Trust nothing the state says without its hash.
        let mut rechecked = 0;
        let mut buf = Vec::new();
        for (b, d) in done.iter_mut().enumerate() {
            if !*d {
                continue;
            }
            let len = m.layout.block_len(b as u32);
            buf.resize(len, 0);
            let ok = read_at(&file, &mut buf, m.layout.offset(b as u32)).is_ok()
                && multicast::codec::sha256(&buf) == m.block_hashes[b];
            if !ok {
                *d = false;
                rechecked += 1;
            }
        }
        if rechecked > 0 && previous_known {
            tracing::warn!(
                "{id}: {rechecked} block(s) marked done failed their hash; fetching them again"
            );
        }
        let p = Partial {
            manifest: m.clone(),
            data,
            state,
            file,
            blocks: Arc::new(Blocks::from_held(&done)),
            persisting: Mutex::new(()),
        };
        p.persist()?;
        Ok(p)
    }

    /// Moves a verified download into `objects/`; returns the object's
    /// path.
    pub fn commit(&self, v: Verified) -> io::Result<PathBuf> {
        let Verified {
            manifest: m,
            data,
            state,
        } = v;
        let id = m.id();
        let target = self.object_path(&id);
        let mut perms = fs::metadata(&data)?.permissions();
        // Rename, then make it read-only: a crash between the two leaves a
        // verified, writable object, never a read-only partial that a
        // resume could not write to.
        fs::rename(&data, &target)?;
        perms.set_readonly(true);
        fs::set_permissions(&target, perms)?;
        let _ = fs::remove_file(&state);
        let mut meta = self.meta(&id).unwrap_or_default();
        meta.size = m.layout.file_size();
        meta.name = m.name.clone();
        meta.last_used = now_unix();
        self.write_meta(&id, &meta)?;
        Ok(target)
    }

    /// Complete objects with their metadata.
    pub fn objects(&self) -> Vec<(String, ObjectMeta)> {
        let Ok(dir) = fs::read_dir(self.root.join("objects")) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                let size = e.metadata().ok()?.len();
                let mut meta = self.meta(&name).unwrap_or_default();
                meta.size = size;
                Some((name, meta))
            })
            .collect()
    }

    /// Evicts least recently used objects until the cache is within its
    /// size cap and the disk keeps its free floor; pinned and in-use
    /// objects stay. Returns the ids evicted.
    pub fn evict(&self) -> Vec<String> {
        self.evict_to(0)
    }

    /// Makes room for `need` more bytes above the free-disk floor, evicting
    /// what may be evicted; or says, with the figures, why it cannot.
    pub fn make_room(&self, need: u64) -> Result<(), String> {
        let enough = |free: u64| free >= need.saturating_add(self.limits.min_free_bytes);
        let free = fs4::available_space(&self.root).unwrap_or(u64::MAX);
        if enough(free) {
            return Ok(());
        }
        let evicted = self.evict_to(need);
        let free = fs4::available_space(&self.root).unwrap_or(u64::MAX);
        if enough(free) {
            return Ok(());
        }
        Err(format!(
            "not enough disk space in {}: the download needs {} and the cache keeps {} free (cache_min_free), but only {} is free after evicting {} object(s); free some space or lower cache_min_free",
            self.root.display(),
            crate::units::human_bytes(need),
            crate::units::human_bytes(self.limits.min_free_bytes),
            crate::units::human_bytes(free),
            evicted.len()
        ))
    }

    /// Removes a download's partial data and state (a failed task's: it
    /// would keep the disk full for nothing).
    pub fn discard_partial(&self, id: &str) {
        let dir = self.root.join("partial");
        let _ = fs::remove_file(dir.join(format!("{id}.data")));
        let _ = fs::remove_file(dir.join(format!("{id}.state.json")));
    }

    /// Evicts least recently used objects (never pinned or in use) until
    /// the cache is under its cap and `need` bytes fit above its floor.
    fn evict_to(&self, need: u64) -> Vec<String> {
        let now = now_unix();
        let in_use = self
            .in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut objects = self.objects();
        objects.sort_by_key(|(_, m)| m.last_used);
        let mut total: u64 = objects.iter().map(|(_, m)| m.size).sum();
        let mut free = fs4::available_space(&self.root).unwrap_or(u64::MAX);
        let mut evicted = Vec::new();
        for (id, meta) in objects {
            if total <= self.limits.max_bytes
                && free >= self.limits.min_free_bytes.saturating_add(need)
            {
                break;
            }
            let pinned = meta.pinned_until.is_some_and(|t| t > now);
            if pinned || in_use.contains(&id) {
                continue;
            }
            let path = self.object_path(&id);
            // Read-only objects need their permission back on Windows.
            if let Ok(m) = fs::metadata(&path) {
                let mut p = m.permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                p.set_readonly(false);
                let _ = fs::set_permissions(&path, p);
            }
            if fs::remove_file(&path).is_ok() {
                let _ = fs::remove_file(self.meta_path(&id));
                total -= meta.size;
                free = free.saturating_add(meta.size);
                tracing::info!("evicted {id} ({} bytes)", meta.size);
                evicted.push(id);
            }
        }
        evicted
    }
}

/// Removes a directory tree that may hold read-only files (cache objects):
/// Windows refuses to delete those until their read-only bit is cleared.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    fn clear(dir: &Path) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                clear(&path)?;
            } else if kind.is_file() {
                make_owner_writable(&path)?;
            } // a link goes as it is, its target untouched
        }
        Ok(())
    }
    clear(dir)?;
    fs::remove_dir_all(dir)
}

/// Gives a file's owner write permission back, if the file exists.
fn make_owner_writable(path: &Path) -> io::Result<()> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(());
    };
    let mut perms = meta.permissions();
    if !perms.readonly() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        perms.set_mode(perms.mode() | 0o200);
    }
    #[cfg(not(unix))]
    #[allow(clippy::permissions_set_readonly_false)] // no world bits there
    perms.set_readonly(false);
    fs::set_permissions(path, perms)
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    multicast::driver::read_exact_at(file, buf, offset)
}

/// A download in progress: its file, and the one map of which of its
/// blocks are written and verified (shared read-only with whoever serves or
/// announces them, set only here).
///
/// Its writers share it (`Arc<Partial>`) without a lock: a block is written
/// only once its hash has been checked, and never again once it is done, so
/// two writers of one block write the same bytes, and a writer that outlives
/// [`Partial::verify`] cannot change what was verified.
pub struct Partial {
    pub manifest: Checked,
    pub data: PathBuf,
    state: PathBuf,
    pub file: File,
    blocks: Arc<Blocks>,
    /// Orders the writes of the state file.
    persisting: Mutex<()>,
}

/// A download whose every block is written and whose whole file matches
/// the content id: the only thing [`Cache::commit`] takes.
pub struct Verified {
    manifest: Checked,
    data: PathBuf,
    state: PathBuf,
}

impl Partial {
    pub fn layout(&self) -> Layout {
        self.manifest.layout
    }

    /// Its blocks, for reading (what peers may be served, what presence
    /// announces).
    pub fn blocks(&self) -> &Arc<Blocks> {
        &self.blocks
    }

    pub fn done_count(&self) -> u32 {
        self.blocks.done()
    }

    pub fn is_complete(&self) -> bool {
        self.blocks.is_complete()
    }

    /// The blocks not yet written and verified, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        self.blocks.missing()
    }

    /// Leading blocks that are all done (what a pipelined sender may read).
    pub fn done_prefix(&self) -> u32 {
        self.blocks.prefix()
    }

    /// Records a block as written and verified, durably.
    pub fn mark_done(&self, block: u32) -> io::Result<()> {
        if !self.blocks.set(block) {
            return Ok(());
        }
        self.persist_done(block)
    }

    /// Checks the finished download: every block done, and the whole file
    /// (synced to disk) matching the content id. A file that does not is
    /// removed, state and all.
    pub fn verify(&self) -> io::Result<Verified> {
        if !self.is_complete() {
            return Err(io::Error::other("download is not complete"));
        }
        self.file.sync_all()?;
        let m = &self.manifest;
        let (_, whole) = multicast::driver::hash_file(&self.file, &m.layout)?;
        if whole != m.content {
            // Every block matched its hash, so this needs a bad manifest
            // (block hashes that do not make up the content id).
            let _ = fs::remove_file(&self.state);
            let _ = fs::remove_file(&self.data);
            return Err(io::Error::other(
                "the whole file does not match the content id although every block matched: the manifest is inconsistent",
            ));
        }
        Ok(Verified {
            manifest: self.manifest.clone(),
            data: self.data.clone(),
            state: self.state.clone(),
        })
    }

    /// Writes the state file whole: a new file renamed over the old.
    fn persist(&self) -> io::Result<()> {
        let _order = self.persisting.lock().unwrap_or_else(|e| e.into_inner());
        self.persist_whole()
    }

    fn persist_whole(&self) -> io::Result<()> {
        let bytes = self.state_bytes(|b| self.blocks.has(b));
        scanner::node::replace_file(&self.state, &bytes, false)
    }

    /// The state file's text, block `b` done where `done(b)`.
    fn state_bytes(&self, done: impl Fn(u32) -> bool) -> Vec<u8> {
        let done = (0..self.blocks.count()).map(|b| if done(b) { '1' } else { '0' });
        let state = PartialState {
            content_id: self.manifest.raw.content_id.clone(),
            done: done.collect(),
        };
        serde_json::to_vec(&state).expect("a string and ASCII digits serialize")
    }

    /// Records block `block` done in the state file: its one character
    /// written in place where the file has the length [`Partial::persist`]
    /// gave it, else the file written whole. Renaming a new file over the
    /// old took 1.9-2.9 ms a block (medians of three 256 MiB repairs; ext4
    /// flushes the new file), in place 0.03-0.04 ms. The state is a hint: a
    /// resume hashes every block it says is done, and a torn file parses
    /// as nothing, so every block is hashed.
    fn persist_done(&self, block: u32) -> io::Result<()> {
        let _order = self.persisting.lock().unwrap_or_else(|e| e.into_inner());
        let len = self.state_bytes(|_| false).len();
        // The characters end the text, before `"}`.
        let at = (len - 2 - self.blocks.count() as usize) as u64 + u64::from(block);
        let f = fs::OpenOptions::new().write(true).open(&self.state);
        match f.and_then(|f| Ok((f.metadata()?.len() == len as u64).then_some(f))) {
            Ok(Some(f)) => multicast::driver::write_all_at(&f, b"1", at),
            _ => self.persist_whole(),
        }
    }

    /// [`Partial::write_block`] of a decoded block's own buffer, which then
    /// goes back for reuse (`multicast::codec::recycle`): the next block's
    /// symbols land in memory already touched, not 4 MiB to fault in again.
    pub fn write_block_buffer(&self, block: u32, data: Vec<u8>) -> io::Result<()> {
        let written = self.write_block(block, &data);
        multicast::codec::recycle(data);
        written
    }

    /// Writes block `b` (already hash-checked by the caller) and records it;
    /// a block already done is left as it is.
    pub fn write_block(&self, block: u32, data: &[u8]) -> io::Result<()> {
        let layout = self.layout();
        if data.len() != layout.block_len(block) {
            return Err(io::Error::other("block of the wrong length"));
        }
        if self.blocks.has(block) {
            return Ok(());
        }
        multicast::driver::write_all_at(&self.file, data, layout.offset(block))?;
        // So that `commit`'s sync finds one block to write, not the package.
        multicast::driver::start_writeback(&self.file, layout.offset(block), data.len());
        self.mark_done(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "somcast-cache-{}-{:x}",
            std::process::id(),
            multicast::driver::random_id()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn put(cache: &Cache, id: &str, size: usize, last_used: u64) {
        fs::write(cache.object_path(id), vec![1u8; size]).unwrap();
        let meta = ObjectMeta {
            size: size as u64,
            name: id.into(),
            last_used,
            pinned_until: None,
        };
        cache.write_meta(id, &meta).unwrap();
    }

    /// Writes block `b` of the package `bytes` into `p`.
    fn write_from(p: &Partial, bytes: &[u8], b: u32) {
        let (l, at) = (p.layout(), p.layout().offset(b) as usize);
        p.write_block(b, &bytes[at..at + l.block_len(b)]).unwrap();
    }

    fn manifest_for(dir: &Path, bytes: &[u8]) -> Checked {
        let f = dir.join("pkg.bin");
        fs::write(&f, bytes).unwrap();
        crate::manifest::Manifest::create(&f, vec!["http://o/pkg.bin".into()])
            .unwrap()
            .check()
            .unwrap()
    }

    #[test]
    fn a_partial_left_read_only_is_written_again_and_a_commit_ends_read_only() {
        let dir = temp();
        let cache = Cache::open(&dir, CacheLimits::default()).unwrap();
        let bytes = vec![5u8; 300_000];
        let m = manifest_for(&dir, &bytes);
        let data = dir.join("partial").join(format!("{}.data", m.id()));
        fs::create_dir_all(data.parent().unwrap()).unwrap();
        fs::write(&data, vec![0u8; bytes.len()]).unwrap();
        let mut perms = fs::metadata(&data).unwrap().permissions();
        perms.set_readonly(true);
        fs::set_permissions(&data, perms).unwrap();
        let p = cache.partial(&m).unwrap();
        // Checked on the bits, not by writing: root writes read-only files.
        assert!(!fs::metadata(&data).unwrap().permissions().readonly());
        p.write_block(0, &bytes).unwrap();
        let object = cache.commit(p.verify().unwrap()).unwrap();
        assert!(fs::metadata(&object).unwrap().permissions().readonly());
        assert_eq!(fs::read(&object).unwrap(), bytes);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&object).unwrap().permissions().mode();
            assert_eq!(mode & 0o222, 0, "no write bit left: {mode:o}");
        }
        remove_tree(&dir).unwrap();
    }

    #[test]
    fn a_download_verifies_only_whole_and_its_blocks_are_one_shared_map() {
        let dir = temp();
        let cache = Cache::open(&dir, CacheLimits::default()).unwrap();
        // Three blocks of the default size, the last one short.
        let bytes: Vec<u8> = (0..2 * multicast::codec::DEFAULT_BLOCK_SIZE + 1000)
            .map(|i| (i % 251) as u8)
            .collect();
        let m = manifest_for(&dir, &bytes);
        assert_eq!(m.layout.block_count(), 3);
        let mut p = cache.partial(&m).unwrap();
        // What a repair server or presence holds: the map itself, not a copy.
        let view = p.blocks().clone();
        assert_eq!((view.count(), view.done()), (m.layout.block_count(), 0));
        let first = m.layout.block_len(0);
        p.write_block(0, &bytes[..first]).unwrap();
        assert!(view.has(0));
        let err = p.verify().err().expect("an incomplete download");
        assert!(err.to_string().contains("not complete"), "{err}");
        p = cache.partial(&m).unwrap();
        assert!(p.blocks().has(0), "resumed with block 0 done");
        for b in 1..3 {
            write_from(&p, &bytes, b);
        }
        let object = cache.commit(p.verify().unwrap()).unwrap();
        assert_eq!(fs::read(&object).unwrap(), bytes);
        remove_tree(&dir).unwrap();
    }

    #[test]
    fn writers_share_a_download_and_one_that_outlives_verify_changes_nothing() {
        let dir = temp();
        let cache = Cache::open(&dir, CacheLimits::default()).unwrap();
        let bytes: Vec<u8> = (0..3 * multicast::codec::DEFAULT_BLOCK_SIZE + 17)
            .map(|i| (i % 241) as u8)
            .collect();
        let m = manifest_for(&dir, &bytes);
        assert!(m.layout.block_count() >= 3, "several blocks");
        let p = Arc::new(cache.partial(&m).unwrap());
        // Four writers, each block written by two of them at once.
        std::thread::scope(|s| {
            for w in 0..4u32 {
                let (p, m, bytes) = (&p, &m, &bytes);
                s.spawn(move || {
                    for b in (0..m.layout.block_count()).filter(|b| b % 2 == w % 2) {
                        write_from(p, bytes, b);
                    }
                });
            }
        });
        let late = p.clone();
        let object = cache.commit(p.verify().unwrap()).unwrap();
        // A writer still holding the download: a done block is not written
        // again, and no state file comes back for a download that is gone.
        late.write_block(1, &vec![0xEE; m.layout.block_len(1)])
            .unwrap();
        late.mark_done(2).unwrap();
        assert!(fs::read(&object).unwrap() == bytes, "the object changed");
        assert!(!late.state.exists(), "the state file came back");
        remove_tree(&dir).unwrap();
    }

    #[test]
    fn a_tree_with_read_only_objects_is_removed_and_links_are_not_followed() {
        let dir = temp();
        let outside = temp();
        fs::write(outside.join("keep"), b"x").unwrap();
        let objects = dir.join("a").join("objects");
        fs::create_dir_all(&objects).unwrap();
        let obj = objects.join("obj");
        fs::write(&obj, b"object").unwrap();
        let mut perms = fs::metadata(&obj).unwrap().permissions();
        perms.set_readonly(true);
        fs::set_permissions(&obj, perms.clone()).unwrap();
        fs::set_permissions(outside.join("keep"), perms).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outside.join("keep"), dir.join("link")).unwrap();
        remove_tree(&dir).unwrap();
        assert!(!dir.exists());
        // The link's target kept its read-only bit.
        assert!(
            fs::metadata(outside.join("keep"))
                .unwrap()
                .permissions()
                .readonly()
        );
        remove_tree(&outside).unwrap();
    }

    #[test]
    fn a_resume_trusts_only_blocks_that_hash_right_even_without_state() {
        let dir = temp();
        let cache = Cache::open(&dir.join("c"), CacheLimits::default()).unwrap();
        let bytes: Vec<u8> = (0..9 * 1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        let m = manifest_for(&dir, &bytes);
        let p = cache.partial(&m).unwrap();
        assert_eq!(p.done_count(), 0);
        let l = m.layout;
        for b in [0u32, 2] {
            write_from(&p, &bytes, b);
        }
        drop(p);
        // A spoiled block 2 on disk: the state says done, the hash says no.
        let data = dir
            .join("c")
            .join("partial")
            .join(format!("{}.data", m.id()));
        let f = fs::OpenOptions::new().write(true).open(&data).unwrap();
        multicast::driver::write_all_at(&f, b"X", l.offset(2) + 10).unwrap();
        let p = cache.partial(&m).unwrap();
        assert_eq!(p.blocks().to_held(), [true, false, false]);
        drop(p);
        // The state file lost (a power cut): the blocks on disk are found.
        fs::remove_file(
            dir.join("c")
                .join("partial")
                .join(format!("{}.state.json", m.id())),
        )
        .unwrap();
        let p = cache.partial(&m).unwrap();
        assert_eq!(p.blocks().to_held(), [true, false, false]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_block_done_is_one_character_of_the_state_file_and_a_strange_file_is_rewritten() {
        let dir = temp();
        let cache = Cache::open(&dir.join("c"), CacheLimits::default()).unwrap();
        let bytes: Vec<u8> = (0..9 * 1024 * 1024).map(|i| (i * 3 % 251) as u8).collect();
        let m = manifest_for(&dir, &bytes);
        let write = |p: &Partial, b: u32| write_from(p, &bytes, b);
        let p = cache.partial(&m).unwrap();
        let whole = |d: [bool; 3]| String::from_utf8(p.state_bytes(|b| d[b as usize])).unwrap();
        let text = || fs::read_to_string(&p.state).unwrap();
        assert_eq!(text(), whole([false; 3]));
        write(&p, 2);
        assert_eq!(text(), whole([false, false, true]), "changed in place");
        // Another writer's file, or one a crash cut short, or none: whole.
        fs::write(&p.state, b"{\"content_id\":").unwrap();
        write(&p, 0);
        assert_eq!(text(), whole([true, false, true]));
        fs::remove_file(&p.state).unwrap();
        write(&p, 1);
        assert_eq!(text(), whole([true; 3]));
        // What a resume reads back: every block, each hashed.
        drop(p);
        assert_eq!(cache.partial(&m).unwrap().blocks().to_held(), [true; 3]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn eviction_takes_the_least_recently_used_and_spares_pinned_and_in_use() {
        let dir = temp();
        let cache = Cache::open(
            &dir,
            CacheLimits {
                max_bytes: 3000,
                min_free_bytes: 0,
            },
        )
        .unwrap();
        let id = |c: char| c.to_string().repeat(64);
        put(&cache, &id('a'), 1000, 10); // oldest, but pinned
        put(&cache, &id('b'), 1000, 20); // in use
        put(&cache, &id('c'), 1000, 30); // the one to go
        put(&cache, &id('d'), 1000, 40);
        cache.pin(&id('a'), now_unix() + 3600).unwrap();
        cache.hold(&id('b'));
        let gone = cache.evict();
        assert_eq!(gone, [id('c')]);
        assert!(cache.object_path(&id('a')).exists());
        assert!(cache.object_path(&id('b')).exists());
        assert!(cache.object_path(&id('d')).exists());
        // An expired pin no longer protects it: over the cap again, the
        // oldest goes.
        cache.release(&id('b'));
        let mut meta = cache.meta(&id('a')).unwrap();
        meta.pinned_until = Some(1);
        cache.write_meta(&id('a'), &meta).unwrap();
        put(&cache, &id('e'), 1000, 50);
        let gone = cache.evict();
        assert_eq!(gone, [id('a')]);
        assert!(cache.object_path(&id('b')).exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
