//! Helpers shared by the end-to-end tests.

#![allow(dead_code)] // each test file takes what it needs

use std::fs;
use std::path::PathBuf;

pub const BIN: &str = env!("CARGO_BIN_EXE_somcast");

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "somcast-test-{tag}-{}-{:x}",
            std::process::id(),
            multicast::driver::random_id()
        ));
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn json(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}", String::from_utf8_lossy(out));
    })
}
