//! somcast's scanner, the subnet's control plane: the interfaces and
//! subnets of this host, the presence protocol that finds the other agents
//! on the subnet, the peer table, and the election of a representative
//! per content (sans-IO machines; their frames are in `multicast::wire`,
//! the one datagram format both planes share).

pub mod election;
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
