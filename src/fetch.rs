//! Fetching blocks from the origin over HTTP(S): Range requests so a
//! resumed or partial fetch takes only what is missing, each block checked
//! against its SHA-256 as it completes, retries with backoff, timeouts, and
//! every byte counted as origin (WAN) traffic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use thiserror::Error;

use crate::cache::Partial;

/// Attempts per range and URL before the next URL is tried.
const ATTEMPTS: u32 = 4;
/// First retry delay; doubled on each further attempt.
const BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("every origin URL failed; last error: {0}")]
    Exhausted(String),
    #[error("writing the download: {0}")]
    Write(#[from] std::io::Error),
    #[error("cancelled")]
    Cancelled,
}

/// One HTTP client per agent (connection reuse), TLS by rustls.
pub fn client() -> reqwest::Client {
    // rustls needs a process-wide crypto provider; ring is the one built
    // in. Installing it twice is harmless (the second call reports it).
    #[cfg(not(windows))]
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .user_agent(concat!("somcast/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with these settings always builds")
}

/// Whether a fetch may go on: asked before each attempt and each chunk of
/// a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Go,
    /// Paused: read nothing more until it says `Go` (the response waits,
    /// held back by TCP, or is asked again if the server gives up on it).
    Hold,
    Stop,
}

/// Waits while `flow` says `Hold`; whether to go on (`false`: stop).
async fn go_on(flow: &(dyn Fn() -> Flow + Sync)) -> bool {
    loop {
        match flow() {
            Flow::Go => return true,
            Flow::Stop => return false,
            Flow::Hold => tokio::time::sleep(HOLD_POLL).await,
        }
    }
}

/// How often a held fetch looks whether it may go on.
const HOLD_POLL: Duration = Duration::from_millis(100);

/// Fetches the given blocks (or every missing one) into `partial`, as
/// contiguous ranges. `on_block` hears of each block written; `origin`
/// counts every body byte received; `flow` may hold or stop it.
pub async fn fetch_blocks(
    client: &reqwest::Client,
    partial: &Arc<Mutex<Partial>>,
    only: Option<&[u32]>,
    origin: &AtomicU64,
    flow: &(dyn Fn() -> Flow + Sync),
    on_block: &(dyn Fn(u32) + Sync),
) -> Result<(), FetchError> {
    let (urls, wanted) = {
        let p = lock(partial);
        let wanted: Vec<u32> = (0..p.layout().block_count())
            .filter(|&b| !p.done[b as usize])
            .filter(|b| only.is_none_or(|o| o.contains(b)))
            .collect();
        (p.manifest.urls.clone(), wanted)
    };
    for (first, last) in runs(&wanted) {
        let mut last_error = String::new();
        let mut next = first;
        'urls: for url in &urls {
            for attempt in 0..ATTEMPTS {
                if !go_on(flow).await {
                    return Err(FetchError::Cancelled);
                }
                if attempt > 0 {
                    tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
                }
                match fetch_range(client, url, partial, next, last, origin, flow, on_block).await {
                    Ok(()) => break 'urls,
                    Err(RangeError::Partly { next: n, error }) => {
                        tracing::warn!("fetch {url} blocks {n}..={last}: {error}; retrying");
                        last_error = error;
                        next = n;
                    }
                    Err(RangeError::Write(e)) => return Err(FetchError::Write(e)),
                }
            }
        }
        let p = lock(partial);
        if (first..=last).any(|b| !p.done[b as usize]) {
            return Err(FetchError::Exhausted(last_error));
        }
    }
    Ok(())
}

enum RangeError {
    /// Blocks before `next` are in; the rest failed with `error`.
    Partly {
        next: u32,
        error: String,
    },
    Write(std::io::Error),
}

#[allow(clippy::too_many_arguments)]
async fn fetch_range(
    client: &reqwest::Client,
    url: &reqwest::Url,
    partial: &Arc<Mutex<Partial>>,
    first: u32,
    last: u32,
    origin: &AtomicU64,
    flow: &(dyn Fn() -> Flow + Sync),
    on_block: &(dyn Fn(u32) + Sync),
) -> Result<(), RangeError> {
    let (layout, hashes) = {
        let p = lock(partial);
        (p.layout(), p.manifest.block_hashes.clone())
    };
    let start = layout.offset(first);
    let end = layout.offset(last) + layout.block_len(last) as u64; // exclusive
    let partly = |next: u32, error: String| RangeError::Partly { next, error };
    let resp = client
        .get(url.clone())
        .header(
            reqwest::header::RANGE,
            format!("bytes={}-{}", start, end - 1),
        )
        .send()
        .await
        .map_err(|e| partly(first, e.to_string()))?;
    let status = resp.status();
    // A server without Range support sends the whole file: skip to `start`.
    let mut skip = match status.as_u16() {
        206 => 0,
        200 => start,
        _ => return Err(partly(first, format!("HTTP {status}"))),
    };
    let mut stream = resp.bytes_stream();
    let mut block = first;
    let mut buf: Vec<u8> = Vec::with_capacity(layout.block_len(block));
    while let Some(chunk) = stream.next().await {
        if !go_on(flow).await {
            return Err(partly(block, "cancelled".into()));
        }
        let chunk = chunk.map_err(|e| partly(block, e.to_string()))?;
        origin.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let mut data = &chunk[..];
        if skip > 0 {
            let n = (skip as usize).min(data.len());
            skip -= n as u64;
            data = &data[n..];
        }
        while !data.is_empty() && block <= last {
            let want = layout.block_len(block) - buf.len();
            let n = want.min(data.len());
            buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if buf.len() == layout.block_len(block) {
                if multicast::codec::sha256(&buf) != hashes[block as usize] {
                    return Err(partly(
                        block,
                        format!("block {block} from the origin failed its SHA-256 check"),
                    ));
                }
                lock(partial)
                    .write_block(block, &buf)
                    .map_err(RangeError::Write)?;
                on_block(block);
                block += 1;
                buf.clear();
            }
        }
        if block > last {
            // Anything after the range (a 200 answer) is not needed.
            return Ok(());
        }
    }
    if block <= last {
        return Err(partly(block, "the response ended early".into()));
    }
    Ok(())
}

/// Contiguous runs of block numbers: [1,2,3,7,8] -> (1,3), (7,8).
fn runs(blocks: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == b => *last = b,
            _ => out.push((b, b)),
        }
    }
    out
}

pub fn lock(p: &Mutex<Partial>) -> std::sync::MutexGuard<'_, Partial> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_group_contiguous_blocks() {
        assert_eq!(
            super::runs(&[1, 2, 3, 7, 8, 10]),
            [(1, 3), (7, 8), (10, 10)]
        );
        assert!(super::runs(&[]).is_empty());
    }
}
