//! Fetching blocks from the origin over HTTP(S): Range requests so a
//! resumed or partial fetch takes only what is missing, each block checked
//! against its SHA-256 as it completes, retries with backoff, timeouts, and
//! every byte counted as origin (WAN) traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use repair::pace::{Bucket, Mode, Pace};
use thiserror::Error;

use crate::cache::Partial;

/// Attempts per range and URL before the next URL is tried.
const ATTEMPTS: u32 = 4;
/// First retry delay; doubled on each further attempt.
const BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("every origin URL failed; last error: {0}")]
    Exhausted(OriginFailure),
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

/// How an origin fetch shares the path: in background mode it yields to
/// other traffic ([`repair::pace`]), asking for the file a slice at a time
/// (about [`SLICE`] of it at the current rate) and taking each response's
/// time to first byte as the delay sample; a cap holds it to the task's or
/// agent's rate in either mode.
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    pub mode: Mode,
    pub cap_bps: Option<u64>,
    pub floor_bps: u64,
}

/// What a paced fetch asks for at once, in time at its current rate: short
/// enough for a delay sample several times a second, long enough that the
/// round trip between slices costs little.
pub const SLICE: Duration = Duration::from_millis(200);
/// The least a slice asks for.
const MIN_SLICE: u64 = 32 * 1024;

/// A fetch's pace and the bucket that holds its reads to it.
struct Paced {
    pace: Pace,
    bucket: Bucket,
}

impl Paced {
    /// Bytes to ask for from `from` in one request, up to `end`.
    fn slice_end(&self, from: u64, end: u64) -> u64 {
        match self.pace.rate_bps() {
            Some(r) if self.pace.adapts() => {
                let bytes = (r as f64 / 8.0 * SLICE.as_secs_f64()) as u64;
                (from + bytes.max(MIN_SLICE)).min(end)
            }
            _ => end,
        }
    }

    /// Waits until `bytes` more are due at the pace's rate.
    async fn take(&mut self, bytes: usize) {
        let now = std::time::Instant::now();
        if let Some(until) = self.bucket.charge(now, bytes, self.pace.rate_bps()) {
            tokio::time::sleep_until(until.into()).await;
        }
    }
}

/// Fetches the given blocks (or every missing one) into `partial`, as
/// contiguous ranges. `on_block` hears of each block written; `origin`
/// counts every body byte received; `flow` may hold or stop it; `pacing`
/// says how it shares the path.
pub async fn fetch_blocks(
    client: &reqwest::Client,
    partial: &Arc<Partial>,
    only: Option<&[u32]>,
    origin: &AtomicU64,
    flow: &(dyn Fn() -> Flow + Sync),
    pacing: Pacing,
    on_block: &(dyn Fn(u32) + Sync),
) -> Result<(), FetchError> {
    let wanted: Vec<u32> = partial
        .missing()
        .filter(|b| only.is_none_or(|o| o.contains(b)))
        .collect();
    let (urls, layout) = (partial.manifest.urls.clone(), partial.layout());
    let hashes = partial.manifest.block_hashes.clone();
    let mut paced = Paced {
        pace: Pace::new(pacing.mode, pacing.cap_bps, pacing.floor_bps),
        bucket: Bucket::new(),
    };
    let io = Io {
        client,
        partial,
        layout,
        hashes,
        origin,
        flow,
        on_block,
    };
    for (first, last) in runs(&wanted) {
        let mut last_error = OriginFailure::NoUrl;
        let mut next = first;
        'urls: for url in &urls {
            for attempt in 0..ATTEMPTS {
                if !go_on(flow).await {
                    return Err(FetchError::Cancelled);
                }
                if attempt > 0 {
                    tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
                }
                match fetch_run(&io, url, next, last, &mut paced).await {
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
        if (first..=last).any(|b| !partial.blocks().has(b)) {
            return Err(FetchError::Exhausted(last_error));
        }
    }
    Ok(())
}

/// What a fetch reads into and reports to.
struct Io<'a> {
    client: &'a reqwest::Client,
    partial: &'a Arc<Partial>,
    layout: multicast::codec::Layout,
    hashes: Vec<multicast::wire::Digest>,
    origin: &'a AtomicU64,
    flow: &'a (dyn Fn() -> Flow + Sync),
    on_block: &'a (dyn Fn(u32) + Sync),
}

/// Why one request to the origin did not deliver what it asked.
#[derive(Debug, Error)]
pub enum OriginFailure {
    #[error("the manifest names no origin URL")]
    NoUrl,
    /// Connecting, or reading the body (reqwest's words).
    #[error("{0}")]
    Http(String),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("the response ended early")]
    EndedEarly,
    #[error("block {0} from the origin failed its SHA-256 check")]
    Corrupt(u32),
    #[error("cancelled")]
    Cancelled,
}

impl OriginFailure {
    fn http(e: &reqwest::Error) -> Self {
        OriginFailure::Http(crate::error_text(e))
    }
}

enum RangeError {
    /// Blocks before `next` are in; the rest failed with `error`.
    Partly {
        next: u32,
        error: OriginFailure,
    },
    Write(std::io::Error),
}

/// The block being put together from the origin's bytes.
struct Assembly {
    block: u32,
    buf: Vec<u8>,
}

/// Fetches blocks `first..=last` from `url`: one request, or one a slice
/// at a time when paced.
async fn fetch_run(
    io: &Io<'_>,
    url: &reqwest::Url,
    first: u32,
    last: u32,
    paced: &mut Paced,
) -> Result<(), RangeError> {
    let layout = io.layout;
    let end = layout.offset(last) + layout.block_len(last) as u64; // exclusive
    let mut asm = Assembly {
        block: first,
        buf: Vec::with_capacity(layout.block_len(first)),
    };
    while asm.block <= last {
        let from = layout.offset(asm.block) + asm.buf.len() as u64;
        let to = paced.slice_end(from, end);
        fetch_range(io, url, &mut asm, from, to, last, paced).await?;
    }
    Ok(())
}

/// Fetches bytes `from..to` (or, from a server without ranges, the whole
/// file) into `asm`, writing each block of `..=last` as it completes.
async fn fetch_range(
    io: &Io<'_>,
    url: &reqwest::Url,
    asm: &mut Assembly,
    from: u64,
    to: u64,
    last: u32,
    paced: &mut Paced,
) -> Result<(), RangeError> {
    let layout = io.layout;
    let partly = |next: u32, error: OriginFailure| RangeError::Partly { next, error };
    let asked = std::time::Instant::now();
    let resp = io
        .client
        .get(url.clone())
        .header(reqwest::header::RANGE, format!("bytes={}-{}", from, to - 1))
        .send()
        .await
        .map_err(|e| partly(asm.block, OriginFailure::http(&e)))?;
    // The time to the response's head: the path's delay, and the queue
    // that others keep on it (ours has drained: one slice at a time).
    let delay = asked.elapsed();
    paced.pace.on_delay(std::time::Instant::now(), delay);
    tracing::debug!(
        "origin: bytes {from}..{to}: first byte after {delay:?}, queue {:?}, rate {:?} bit/s",
        paced.pace.queue(),
        paced.pace.rate_bps()
    );
    let status = resp.status();
    // A server without Range support sends the whole file: skip to `from`
    // and read on to the run's end.
    let (mut skip, to) = match status.as_u16() {
        206 => (0, to),
        200 => (from, layout.offset(last) + layout.block_len(last) as u64),
        _ => return Err(partly(asm.block, OriginFailure::Status(status.as_u16()))),
    };
    let mut remaining = to - from;
    let (asked_for, reading) = (remaining, std::time::Instant::now());
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        if !go_on(io.flow).await {
            return Err(partly(asm.block, OriginFailure::Cancelled));
        }
        let chunk = chunk.map_err(|e| partly(asm.block, OriginFailure::http(&e)))?;
        io.origin.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        paced.take(chunk.len()).await;
        let mut data = &chunk[..];
        if skip > 0 {
            let n = (skip as usize).min(data.len());
            skip -= n as u64;
            data = &data[n..];
        }
        let n = (data.len() as u64).min(remaining) as usize;
        remaining -= n as u64;
        take_bytes(io, asm, &data[..n], last)?;
        if remaining == 0 {
            paced.pace.on_delivered(asked_for, reading.elapsed());
            // Anything after the range (a 200 answer) is not needed.
            return Ok(());
        }
    }
    Err(partly(asm.block, OriginFailure::EndedEarly))
}

/// Adds `data` to the block being assembled, checking and writing each
/// block it completes.
fn take_bytes(
    io: &Io<'_>,
    asm: &mut Assembly,
    mut data: &[u8],
    last: u32,
) -> Result<(), RangeError> {
    let (layout, hashes) = (&io.layout, &io.hashes);
    while !data.is_empty() && asm.block <= last {
        let block = asm.block;
        let want = layout.block_len(block) - asm.buf.len();
        let n = want.min(data.len());
        asm.buf.extend_from_slice(&data[..n]);
        data = &data[n..];
        if asm.buf.len() == layout.block_len(block) {
            if multicast::codec::sha256(&asm.buf) != hashes[block as usize] {
                asm.buf.clear();
                return Err(RangeError::Partly {
                    next: block,
                    error: OriginFailure::Corrupt(block),
                });
            }
            io.partial
                .write_block(block, &asm.buf)
                .map_err(RangeError::Write)?;
            (io.on_block)(block);
            asm.block += 1;
            asm.buf.clear();
        }
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
