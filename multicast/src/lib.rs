//! somcast's data plane: one file to every receiver on a subnet over IP
//! multicast with RaptorQ fountain coding (RFC 6330).
//!
//! - [`wire`]: the datagram format, strictly decoded.
//! - [`auth`]: the fleet key's seal on every datagram (MAC, replay window).
//! - [`codec`]: blocks, symbols, encoding plan, checked decoding.
//! - [`sender`] and [`receiver`]: the protocol as sans-IO state machines.
//! - [`pacer`]: the token bucket that keeps the sender at its rate.
//! - [`rate`]: the rate controller that finds the rate the subnet takes.
//! - [`transmit`]: what the sans-IO machines hand their drivers to send.
//! - [`sim`]: a simulated subnet with a virtual clock and seeded loss, on
//!   which every layer's machines are tested.
//! - [`socket`]: socket2 setup for groups; [`driver`]: blocking loops that
//!   run the sessions over real sockets and files.

pub mod auth;
mod background;
pub mod batch;
pub mod codec;
pub mod driver;
mod fileio;
pub mod handshake;
pub mod pacer;
pub mod rate;
pub mod receiver;
pub mod rng;
pub mod sender;
pub mod sim;
pub mod socket;
pub mod transmit;
pub mod wire;

pub use codec::{Layout, LayoutError};
pub use driver::{RecvOptions, SendOptions, receive_file, send_file};
pub use receiver::{ReceiveFailure, Receiver, ReceiverConfig, ReceiverEvent};
pub use sender::{Sender, SenderConfig, SenderEvent};
