//! somcast's scanner: the interfaces and subnets of this host, the presence
//! protocol that finds the other agents on the subnet, and the peer table.

pub mod iface;
pub mod inventory;
pub mod neighbours;
pub mod node;
pub mod presence;
pub mod probe;

pub use iface::{IfaceError, V4Interface, default_ipv4, resolve};
pub use presence::{
    Dest, LocalNode, Peer, Presence, PresenceConfig, PresenceEvent, Subnet, Transmit,
};
