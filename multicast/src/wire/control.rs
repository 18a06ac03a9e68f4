//! The control plane's bodies: presence announcements and the election's
//! claims and offers.

use serde::{Deserialize, Serialize};

use super::Digest;

/// The inputs of a representative election, as an agent announces them.
/// Better first: preference, then (in the election) share held, then wired,
/// free disk, uptime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rank {
    /// Operator preference: higher wins; 0 = no preference.
    pub preference: u8,
    /// Wired (`Some(true)`), wireless (`Some(false)`), or not known.
    pub wired: Option<bool>,
    /// Free space where the cache lives, in MiB.
    pub free_disk_mib: u64,
    /// Seconds since the agent started.
    pub uptime_s: u64,
}

/// How much of one content an agent holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The first 8 bytes of the content id (its SHA-256).
    pub content: [u8; 8],
    pub blocks_done: u32,
    pub block_count: u32,
    /// HAVE: the blocks held decoded, as [start, end) ranges in order; empty
    /// with `blocks_done > 0` when they do not fit (then only an agent that
    /// holds every block is asked).
    pub have: Vec<[u32; 2]>,
}

impl Held {
    /// Whether the ranges say block `b` is held.
    pub fn has(&self, b: u32) -> bool {
        self.blocks_done == self.block_count || self.have.iter().any(|r| (r[0]..r[1]).contains(&b))
    }
}

/// An IPv4 address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrV4 {
    pub addr: [u8; 4],
    pub prefix: u8,
}

/// An agent's presence announcement, on the control group every interval,
/// or unicast as the answer to a probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Survives restarts (stored in the agent's cache directory).
    pub node: u64,
    /// Random per start: a new one means the node restarted.
    pub incarnation: u32,
    pub seq: u32,
    /// How often this agent announces; peers expire it after three.
    pub interval_ms: u32,
    pub version: String,
    pub addrs: Vec<AddrV4>,
    /// Port of the control API, 0 if it has none.
    pub api_port: u16,
    /// TCP port of peer repair, 0 if it serves none.
    pub repair_port: u16,
    pub rank: Rank,
    pub held: Vec<Held>,
    /// The probe this announcement answers, if any.
    pub reply_to: Option<u64>,
}

/// What an agent stands on in a representative election, frozen when the
/// election starts so that every agent compares the same numbers. Ordered
/// best last (derive order: field by field, as listed).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Standing {
    pub preference: u8,
    /// Share of the content already held, in permille.
    pub held_permille: u16,
    pub wired: bool,
    /// Free disk in GiB: finer differences are noise.
    pub free_disk_gib: u32,
    /// Uptime in hours, for the same reason.
    pub uptime_h: u32,
    /// The tie-break.
    pub node: u64,
}

/// "I volunteer to be the representative for this content."
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub content: Digest,
    pub standing: Standing,
}

/// "I am the representative for this content": where and when it will be
/// multicast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub content: Digest,
    pub standing: Standing,
    /// The data-plane session id the multicast will carry.
    pub session: u64,
    pub data_group: [u8; 4],
    pub data_port: u16,
    /// Milliseconds from this datagram to the start of the multicast (0:
    /// started).
    pub start_in_ms: u32,
}
