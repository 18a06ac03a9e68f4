//! somcast's scanner: the interfaces and subnets of this host. Presence and
//! the peer table come with the scanner issue.

pub mod iface;

pub use iface::{IfaceError, V4Interface, default_ipv4, resolve};
