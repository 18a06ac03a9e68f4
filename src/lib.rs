//! somcast: self-organizing subnet multicast for software packages.
//!
//! This crate wires the member crates into the `somcast` command: the data
//! plane (`multicast`), interfaces and peers (`scanner`) and unicast repair
//! (`repair`).

pub mod agent;
pub mod blocks;
pub mod cache;
pub mod channel;
pub mod cli;
pub mod console;
pub mod demo;
pub mod demo_flow;
/// The representative election lives with the subnet's other control-plane
/// machines, in the scanner crate.
pub use scanner::election;
pub mod fetch;
pub mod flow;
pub mod lab;
pub mod manifest;
pub mod report;
pub mod scan;
pub mod serve;
pub mod service;
pub mod topology;
pub mod trust;
pub mod units;

/// An error and its causes on one line, each said once. Several errors
/// quote their cause in their own message (with advice after it), and
/// anyhow's `{:#}` would then print that cause twice.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_text;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read pkg.msi: {source} (check the path)")]
    struct Quoting {
        source: io::Error,
    }

    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let inner = io::Error::new(io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Quoting { source: inner }).context("sending pkg.msi");
        assert_eq!(
            error_text(e.as_ref()),
            "sending pkg.msi: cannot read pkg.msi: no such file (check the path)"
        );
        // A cause that is not quoted is still said.
        let e = anyhow::Error::new(io::Error::other("disk full")).context("writing the cache");
        assert_eq!(error_text(e.as_ref()), "writing the cache: disk full");
    }
}
