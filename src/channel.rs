//! Task channels: signed tasks as static files that any HTTP server or CDN
//! serves (nginx, IIS, S3), polled by agents; no server of our own.
//!
//! ```text
//! DIR/channel.json          the index: {"type":"somcast-channel","format":1,
//!                            "tasks":[ids],"withdrawn":[ids]}
//! DIR/tasks/<id>.json       a task bundle, as `task sign` writes it
//! DIR/withdrawn/<id>.json   a signed control document withdrawing <id>
//! DIR/orders/<id>.json      the latest signed pause or resume of <id>,
//!                            named in the index's "orders" {id: order id}
//! DIR/topology.json         the signed topology (sites), named by its id
//!                            in the index's "topology"
//! ```
//!
//! The index is not signed: each task and withdrawal is, and an agent
//! checks every one as if it came from anyone. Whoever can change the files
//! can hide tasks, never forge one.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::trust::document::{self, valid_id};
use crate::trust::{Bundle, Envelope};

/// The index's file name under the channel.
pub const INDEX: &str = "channel.json";
/// `type` of the index.
pub const INDEX_TYPE: &str = "somcast-channel";
/// Longest index an agent reads, and most ids in each list.
pub const MAX_INDEX: usize = 1 << 20;
pub const MAX_IDS: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    #[serde(rename = "type")]
    pub doc_type: String,
    pub format: u32,
    pub tasks: Vec<String>,
    pub withdrawn: Vec<String>,
    /// Task id -> the id of its latest pause or resume order, in
    /// `orders/<task id>.json`. Left out while empty, so agents that predate
    /// it read an index without orders as before.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub orders: BTreeMap<String, String>,
    /// The id of the topology in `topology.json`, if the channel carries
    /// one (see `crate::topology`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            doc_type: INDEX_TYPE.into(),
            format: document::FORMAT,
            tasks: Vec::new(),
            withdrawn: Vec::new(),
            orders: BTreeMap::new(),
            topology: None,
        }
    }
}

impl Index {
    /// Parses and checks an index as an agent fetched it.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Index> {
        if bytes.len() > MAX_INDEX {
            bail!(
                "channel index of {} bytes (at most {MAX_INDEX})",
                bytes.len()
            );
        }
        let i: Index = serde_json::from_slice(bytes).context("not a channel index")?;
        if i.doc_type != INDEX_TYPE || i.format != document::FORMAT {
            bail!("not a somcast channel index of format {}", document::FORMAT);
        }
        if i.tasks.len() > MAX_IDS || i.withdrawn.len() > MAX_IDS || i.orders.len() > MAX_IDS {
            bail!("channel index lists more than {MAX_IDS} ids");
        }
        let ids = i.tasks.iter().chain(&i.withdrawn);
        let orders = i.orders.iter().flat_map(|(t, o)| [t, o]);
        if let Some(bad) = ids
            .chain(orders)
            .chain(&i.topology)
            .find(|id| !valid_id(id))
        {
            bail!(
                "channel index lists a bad id {:?}",
                bad.chars().take(40).collect::<String>()
            );
        }
        Ok(i)
    }
}

fn read_index(dir: &Path) -> anyhow::Result<Index> {
    let path = dir.join(INDEX);
    match std::fs::read(&path) {
        Ok(bytes) => Index::parse(&bytes).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// server never serves half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a path in a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    // Served files are read by the web server's user too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Puts task `id` (its bundle) on the channel in `dir`. The same bundle
/// again changes nothing; another one under a published id is refused.
pub fn publish(dir: &Path, id: &str, bundle: &Bundle) -> anyhow::Result<()> {
    if !valid_id(id) {
        bail!("task id {id:?} cannot name a channel file");
    }
    let mut index = read_index(dir)?;
    if index.withdrawn.iter().any(|w| w == id) {
        bail!("task {id} was withdrawn from this channel; publish it under a new id");
    }
    let path = dir.join("tasks").join(format!("{id}.json"));
    let bytes = serde_json::to_vec_pretty(bundle)?;
    if let Ok(old) = std::fs::read(&path) {
        let same = serde_json::from_slice::<Bundle>(&old)
            .is_ok_and(|b| b.task == bundle.task && b.manifest == bundle.manifest);
        if !same {
            bail!("task {id} is on the channel with another document; a task id is used once");
        }
    } else {
        write_atomically(&path, &bytes)?;
    }
    if !index.tasks.iter().any(|t| t == id) {
        if index.tasks.len() >= MAX_IDS {
            bail!("the channel lists {MAX_IDS} tasks: withdraw or remove old ones first");
        }
        index.tasks.push(id.into());
        write_atomically(&dir.join(INDEX), &serde_json::to_vec_pretty(&index)?)?;
    }
    Ok(())
}

/// Withdraws task `id` with the signed control document `order`.
pub fn withdraw(dir: &Path, id: &str, order: &Envelope) -> anyhow::Result<()> {
    if !valid_id(id) {
        bail!("task id {id:?} cannot name a channel file");
    }
    let mut index = read_index(dir)?;
    if !index.tasks.iter().any(|t| t == id) {
        bail!("task {id} is not on the channel in {}", dir.display());
    }
    write_atomically(
        &dir.join("withdrawn").join(format!("{id}.json")),
        &serde_json::to_vec_pretty(order)?,
    )?;
    index.tasks.retain(|t| t != id);
    index.orders.remove(id);
    if !index.withdrawn.iter().any(|w| w == id) {
        index.withdrawn.push(id.into());
    }
    write_atomically(&dir.join(INDEX), &serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// Puts `order` (a signed pause or resume of task `id`, whose own id is
/// `order_id`) on the channel in `dir` in place of any earlier one: agents
/// carry out the latest, each once.
pub fn order(dir: &Path, id: &str, order_id: &str, order: &Envelope) -> anyhow::Result<()> {
    if !valid_id(id) || !valid_id(order_id) {
        bail!("task id {id:?} cannot name a channel file");
    }
    let mut index = read_index(dir)?;
    if !index.tasks.iter().any(|t| t == id) {
        bail!("task {id} is not on the channel in {}", dir.display());
    }
    // The order first, then the index that names it: an agent that reads
    // the new index finds the new order.
    write_atomically(
        &dir.join("orders").join(format!("{id}.json")),
        &serde_json::to_vec_pretty(order)?,
    )?;
    index.orders.insert(id.into(), order_id.into());
    write_atomically(&dir.join(INDEX), &serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// The topology's file name under the channel.
pub const TOPOLOGY: &str = "topology.json";

/// Puts the signed topology `env` (whose id is `id`) on the channel in
/// `dir`, in place of any earlier one.
pub fn topology(dir: &Path, id: &str, env: &Envelope) -> anyhow::Result<()> {
    if !valid_id(id) {
        bail!("topology id {id:?} is not valid");
    }
    let mut index = read_index(dir)?;
    // The document first, then the index that names it.
    write_atomically(&dir.join(TOPOLOGY), &serde_json::to_vec_pretty(env)?)?;
    index.topology = Some(id.into());
    write_atomically(&dir.join(INDEX), &serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// The `expires` of the task `id` published in `dir`, if it can be read.
pub fn task_expires(dir: &Path, id: &str) -> Option<u64> {
    let bytes = std::fs::read(dir.join("tasks").join(format!("{id}.json"))).ok()?;
    let b: Bundle = serde_json::from_slice(&bytes).ok()?;
    let doc: crate::trust::TaskDoc = document::parse(&b.task, document::TASK_TYPE).ok()?;
    Some(doc.expires)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(text: &str) -> Bundle {
        Bundle {
            task: Envelope::unsigned(text.into()),
            manifest: None,
        }
    }

    #[test]
    fn publish_and_withdraw_keep_the_index_and_refuse_reuse() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), "t1", &bundle("a")).unwrap();
        publish(dir.path(), "t1", &bundle("a")).unwrap();
        assert!(publish(dir.path(), "t1", &bundle("b")).is_err());
        publish(dir.path(), "t2", &bundle("c")).unwrap();
        let i = read_index(dir.path()).unwrap();
        assert_eq!(i.tasks, ["t1", "t2"]);
        withdraw(dir.path(), "t1", &Envelope::unsigned("w".into())).unwrap();
        let i = read_index(dir.path()).unwrap();
        assert_eq!(
            (i.tasks, i.withdrawn),
            (vec!["t2".to_string()], vec!["t1".to_string()])
        );
        assert!(publish(dir.path(), "t1", &bundle("a")).is_err());
        assert!(withdraw(dir.path(), "nope", &Envelope::unsigned("w".into())).is_err());
        assert!(publish(dir.path(), "../x", &bundle("a")).is_err());
        order(dir.path(), "t2", "o1", &Envelope::unsigned("p".into())).unwrap();
        order(dir.path(), "t2", "o2", &Envelope::unsigned("r".into())).unwrap();
        assert!(order(dir.path(), "t1", "o3", &Envelope::unsigned("p".into())).is_err());
        let i = read_index(dir.path()).unwrap();
        assert_eq!(i.orders.get("t2").map(String::as_str), Some("o2"));
        withdraw(dir.path(), "t2", &Envelope::unsigned("w".into())).unwrap();
        assert!(read_index(dir.path()).unwrap().orders.is_empty());
    }

    #[test]
    fn an_index_from_the_network_is_checked() {
        let ok = br#"{"type":"somcast-channel","format":1,"tasks":["a"],"withdrawn":[]}"#;
        assert!(Index::parse(ok).is_ok());
        let with_orders =
            br#"{"type":"somcast-channel","format":1,"tasks":["a"],"withdrawn":[],"orders":{"a":"o1"}}"#;
        assert_eq!(Index::parse(with_orders).unwrap().orders["a"], "o1");
        for bad in [
            &br#"{"type":"somcast-task","format":1,"tasks":[],"withdrawn":[]}"#[..],
            br#"{"type":"somcast-channel","format":2,"tasks":[],"withdrawn":[]}"#,
            br#"{"type":"somcast-channel","format":1,"tasks":["../../etc"],"withdrawn":[]}"#,
            br#"{"type":"somcast-channel","format":1,"tasks":[],"withdrawn":[],"x":1}"#,
            br#"{"type":"somcast-channel","format":1,"tasks":[],"withdrawn":[],"orders":{"a":"../b"}}"#,
            b"[1,2",
        ] {
            assert!(
                Index::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(Index::parse(&vec![b' '; MAX_INDEX + 1]).is_err());
    }
}
