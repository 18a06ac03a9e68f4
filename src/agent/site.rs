//! The agent's place in the signed topology (see [`crate::topology`]):
//! loaded from `--topology` at start, replaced by a newer one from the
//! channel, dropped when it expires.

use std::path::Path;

use anyhow::Context;

use super::Agent;
use crate::cache::now_unix;
use crate::topology::{Placement, Topology};
use crate::trust::Envelope;

/// The topology in force and where this agent stands in it.
#[derive(Debug, Default)]
pub struct SiteState {
    topology: Option<Topology>,
    placement: Option<Placement>,
}

/// Where a topology taken from the channel is kept for the next start.
fn kept_path(agent: &Agent) -> std::path::PathBuf {
    agent.config.cache.join("topology.json")
}

/// Reads and checks a topology file.
fn read(path: &Path, gate: &crate::trust::Gate) -> anyhow::Result<Topology> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let env: Envelope = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a signed document", path.display()))?;
    Topology::open(&env, gate, now_unix())
        .map_err(|e| anyhow::anyhow!("topology {}: {e}", path.display()))
}

/// At start: the config's topology (a bad one stops the agent: it is the
/// administrator's to fix), then the one kept from the channel if it was
/// issued later (a bad or expired one is only logged).
pub fn load(agent: &Agent) -> anyhow::Result<()> {
    if let Some(path) = &agent.config.topology {
        agent.set_topology(read(path, &agent.gate)?);
    }
    let kept = kept_path(agent);
    if kept.exists() {
        match read(&kept, &agent.gate) {
            Ok(t) => {
                agent.set_topology(t);
            }
            Err(e) => tracing::warn!("{e:#}; not used"),
        }
    }
    Ok(())
}

/// Keeps a topology taken from the channel for the next start.
pub fn keep(agent: &Agent, env: &Envelope) {
    let r = serde_json::to_vec_pretty(env)
        .map_err(std::io::Error::other)
        .and_then(|b| scanner::node::write_atomically(&kept_path(agent), &b));
    if let Err(e) = r {
        tracing::warn!("cannot keep the topology: {e}");
    }
}

impl Agent {
    fn site_state(&self) -> std::sync::MutexGuard<'_, SiteState> {
        self.site
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where this agent stands: `None` without a topology in force (expired
    /// counts as none), or when no site holds its address.
    pub fn placement(&self) -> Option<Placement> {
        let s = self.site_state();
        let t = s.topology.as_ref()?;
        if t.expires <= now_unix() {
            return None;
        }
        s.placement.clone()
    }

    /// Whether `other` fetches through the same rendezvous points as this
    /// agent (see [`Topology::anchor`]).
    pub fn same_anchor(&self, other: std::net::Ipv4Addr) -> bool {
        let s = self.site_state();
        let Some(t) = &s.topology else { return false };
        let mine = t.anchor(self.iface_addr);
        mine.is_some() && t.anchor(other) == mine
    }

    /// The type of this agent's site (`Wired` outside any): read on every
    /// repair request, so without copying the placement.
    pub fn site_kind(&self) -> crate::topology::SiteKind {
        let s = self.site_state();
        match (&s.topology, &s.placement) {
            (Some(t), Some(p)) if t.expires > now_unix() => p.kind,
            _ => crate::topology::SiteKind::Wired,
        }
    }

    /// The id of the topology in force, and when it was issued.
    pub fn topology_id(&self) -> Option<(String, u64)> {
        let s = self.site_state();
        s.topology.as_ref().map(|t| (t.id.clone(), t.issued))
    }

    /// Puts `t` in force unless the one in force was issued later (a
    /// server that serves an old file again cannot undo a newer topology).
    /// Whether it was taken.
    pub fn set_topology(&self, t: Topology) -> bool {
        let mut s = self.site_state();
        if s.topology.as_ref().is_some_and(|old| old.issued > t.issued) {
            return false;
        }
        let repair_port = self.presence().local().repair_port;
        let placement = t.place(self.iface_addr, repair_port);
        match &placement {
            Some(p) => tracing::info!(
                "topology {}: site {:?} ({}{}), {} rendezvous point(s) before the origin",
                t.id,
                p.site,
                p.kind.as_str(),
                if p.rendezvous {
                    ", this agent is a rendezvous point"
                } else {
                    ""
                },
                p.sources.len()
            ),
            None => tracing::info!(
                "topology {}: no site holds {}; this subnet stands on its own",
                t.id,
                self.iface_addr
            ),
        }
        s.placement = placement;
        s.topology = Some(t);
        true
    }
}
