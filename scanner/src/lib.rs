//! somcast's scanner: the interfaces and subnets of this host. Presence and
//! the peer table are still to come (scanner issue).

pub mod iface;
pub mod inventory;

pub use iface::{IfaceError, V4Interface, default_ipv4, resolve};
