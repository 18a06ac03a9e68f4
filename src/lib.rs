//! somcast
