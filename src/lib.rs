//! somcast: self-organizing subnet multicast for software packages.
//!
//! This crate wires the member crates into the `somcast` command: the data
//! plane (`multicast`), interfaces and peers (`scanner`) and unicast repair
//! (`repair`).

pub mod agent;
pub mod cache;
pub mod cli;
pub mod console;
pub mod demo;
pub mod demo_flow;
pub mod election;
pub mod fetch;
pub mod lab;
pub mod manifest;
pub mod scan;
pub mod serve;
pub mod units;
