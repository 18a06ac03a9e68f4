//! The manifest: what a package is (content id, size, geometry, one
//! SHA-256 per block) and where it comes from. JSON, written by
//! `somcast manifest create`, checked by every agent before it acts.

use std::path::Path;

use multicast::Layout;
use multicast::codec::{DEFAULT_BLOCK_SIZE, DEFAULT_SYMBOL_SIZE};
use multicast::wire::Digest;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lab::hex;

/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Origin URLs one manifest may list.
pub const MAX_URLS: usize = 16;

/// A manifest as it is stored and sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// SHA-256 of the whole file, hex.
    pub content_id: String,
    /// File name, for display and for the install command's file name.
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub symbol_size: u16,
    /// SHA-256 of every block, hex, in order.
    pub block_hashes: Vec<String>,
    /// Where the file can be fetched (HTTP or HTTPS, Range support wanted).
    pub urls: Vec<String>,
}

/// Why a manifest was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest format {0} is not supported (this build reads format {FORMAT})")]
    Format(u32),
    #[error("{what} is not a SHA-256 in hex (64 hex digits): {value:?}")]
    Hash { what: String, value: String },
    #[error("sizes do not fit: {0}")]
    Layout(String),
    #[error("block_size {given} is not what the geometry gives ({expected})")]
    BlockSize { given: u32, expected: u32 },
    #[error("{given} block hashes for {expected} blocks")]
    BlockCount { given: usize, expected: u32 },
    #[error("no origin URL")]
    NoUrl,
    #[error("too many origin URLs ({0}, at most {MAX_URLS})")]
    TooManyUrls(usize),
    #[error("origin URL {0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("name {0:?} must be 1-255 characters without / or \\ or control characters")]
    BadName(String),
}

/// A manifest whose every field has been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub content: Digest,
    pub name: String,
    pub layout: Layout,
    pub block_hashes: Vec<Digest>,
    pub urls: Vec<reqwest::Url>,
    pub raw: Manifest,
}

impl Checked {
    /// The content id in hex, as file names and the API show it.
    pub fn id(&self) -> String {
        hex(&self.content)
    }
}

impl Manifest {
    /// Hashes `path` and describes it, with the given origin URLs.
    pub fn create(path: &Path, urls: Vec<String>) -> anyhow::Result<Manifest> {
        use anyhow::Context;
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let size = file.metadata()?.len();
        let layout = Layout::for_file(size, DEFAULT_BLOCK_SIZE, DEFAULT_SYMBOL_SIZE)?;
        let (blocks, whole) = multicast::driver::hash_file(&file, &layout)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "package".into());
        let m = Manifest {
            format: FORMAT,
            content_id: hex(&whole),
            name,
            size,
            block_size: layout.block_size(),
            symbol_size: layout.symbol_size(),
            block_hashes: blocks.iter().map(|b| hex(b)).collect(),
            urls,
        };
        m.check()?;
        Ok(m)
    }

    /// Checks every field; the result is what agents work with.
    pub fn check(&self) -> Result<Checked, ManifestError> {
        if self.format != FORMAT {
            return Err(ManifestError::Format(self.format));
        }
        let content = parse_digest("content_id", &self.content_id)?;
        let bad_name = self.name.is_empty()
            || self.name.len() > 255
            || self
                .name
                .chars()
                .any(|c| c == '/' || c == '\\' || c.is_control())
            || self.name == "."
            || self.name == "..";
        if bad_name {
            return Err(ManifestError::BadName(self.name.clone()));
        }
        let layout = Layout::for_file(self.size, self.block_size, self.symbol_size)
            .map_err(|e| ManifestError::Layout(e.to_string()))?;
        if layout.block_size() != self.block_size {
            return Err(ManifestError::BlockSize {
                given: self.block_size,
                expected: layout.block_size(),
            });
        }
        if self.block_hashes.len() != layout.block_count() as usize {
            return Err(ManifestError::BlockCount {
                given: self.block_hashes.len(),
                expected: layout.block_count(),
            });
        }
        let block_hashes = self
            .block_hashes
            .iter()
            .enumerate()
            .map(|(i, h)| parse_digest(&format!("block_hashes[{i}]"), h))
            .collect::<Result<Vec<_>, _>>()?;
        if self.urls.is_empty() {
            return Err(ManifestError::NoUrl);
        }
        if self.urls.len() > MAX_URLS {
            return Err(ManifestError::TooManyUrls(self.urls.len()));
        }
        let urls = self
            .urls
            .iter()
            .map(|u| {
                reqwest::Url::parse(u)
                    .ok()
                    .filter(|p| matches!(p.scheme(), "http" | "https") && p.host().is_some())
                    .ok_or_else(|| ManifestError::BadUrl(u.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Checked {
            content,
            name: self.name.clone(),
            layout,
            block_hashes,
            urls,
            raw: self.clone(),
        })
    }
}

fn parse_digest(what: &str, value: &str) -> Result<Digest, ManifestError> {
    let err = || ManifestError::Hash {
        what: what.into(),
        value: value.chars().take(80).collect(),
    };
    if value.len() != 64 {
        return Err(err());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(value.get(2 * i..2 * i + 2).ok_or_else(err)?, 16)
            .map_err(|_| err())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let dir = std::env::temp_dir().join(format!(
            "somcast-manifest-{}-{:x}",
            std::process::id(),
            multicast::driver::random_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pkg.msi");
        std::fs::write(&f, vec![7u8; 5 * 1024 * 1024 + 3]).unwrap();
        let m = Manifest::create(&f, vec!["http://origin/pkg.msi".into()]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        m
    }

    #[test]
    fn a_created_manifest_checks_and_round_trips() {
        let m = sample();
        assert_eq!(m.block_hashes.len(), 2);
        let c = m.check().unwrap();
        assert_eq!(c.layout.file_size(), 5 * 1024 * 1024 + 3);
        let json = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn every_inconsistency_is_refused_with_its_reason() {
        type Spoil = fn(&mut Manifest);
        let cases: Vec<(Spoil, &str)> = vec![
            (|m| m.format = 2, "format 2"),
            (|m| m.content_id = "abc".into(), "content_id"),
            (|m| m.block_hashes[1] = "zz".repeat(32), "block_hashes[1]"),
            (|m| m.size += 8 * 1024 * 1024, "block hashes for"),
            (
                |m| m.block_hashes.pop().map(drop).unwrap_or(()),
                "block hashes for",
            ),
            (|m| m.block_size = 1000, "block_size"),
            (|m| m.symbol_size = 3, "sizes do not fit"),
            (|m| m.urls.clear(), "no origin URL"),
            (|m| m.urls[0] = "ftp://x/y".into(), "not an http"),
            (|m| m.urls[0] = "http://".into(), "not an http"),
            (|m| m.name = "../etc/passwd".into(), "name"),
            (|m| m.name = String::new(), "name"),
        ];
        for (spoil, reason) in cases {
            let mut m = sample();
            spoil(&mut m);
            let err = m.check().unwrap_err().to_string();
            assert!(err.contains(reason), "{err:?} lacks {reason:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["extra"] = serde_json::json!(1);
        let err = serde_json::from_value::<Manifest>(v).unwrap_err();
        assert!(err.to_string().contains("unknown field"));
    }
}
