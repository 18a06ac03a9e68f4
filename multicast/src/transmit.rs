//! What every sans-IO machine hands its driver to send: one shape for the
//! receiver, presence and the election (the sender's hot path lends its
//! datagram instead, [`crate::sender::Sender::poll_transmit`], so a symbol
//! is not copied once more per datagram).

use std::net::SocketAddr;

/// Where a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The group the machine runs on (the control group, a data group).
    Group,
    /// One address, by unicast.
    To(SocketAddr),
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dest: Dest,
    pub bytes: Vec<u8>,
}

impl Transmit {
    /// The address to send to, given the machine's group.
    pub fn to(&self, group: SocketAddr) -> SocketAddr {
        match self.dest {
            Dest::Group => group,
            Dest::To(a) => a,
        }
    }
}
