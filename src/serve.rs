//! `somcast serve DIR --listen ADDR`: a lab origin. Serves the files of one
//! directory with Range support and counts what it sent (`GET /stats`), so
//! a test or benchmark can tell WAN bytes from package size.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// What the origin counted.
#[derive(Default)]
pub struct Stats {
    pub bytes_served: AtomicU64,
    pub requests: AtomicU64,
    pub range_requests: AtomicU64,
    /// Conditional requests answered 304 Not Modified.
    pub not_modified: AtomicU64,
}

struct Origin {
    dir: PathBuf,
    stats: Stats,
    /// Bits per second shared by every response (0 = unlimited): a lab's
    /// WAN link without tc.
    rate_bps: u64,
    /// When the shared link is free again.
    link_free: tokio::sync::Mutex<tokio::time::Instant>,
    /// Where POSTed task reports go, one file per task and node.
    reports: Option<PathBuf>,
}

/// Longest report taken.
const MAX_REPORT: usize = 64 * 1024;

pub fn router(dir: &Path, rate_bps: u64, reports: Option<&Path>) -> Router {
    let origin = Arc::new(Origin {
        dir: dir.to_owned(),
        stats: Stats::default(),
        rate_bps,
        link_free: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        reports: reports.map(Path::to_owned),
    });
    let mut r = Router::new()
        .route("/stats", get(stats_handler))
        .route("/{*path}", get(file_handler));
    if reports.is_some() {
        r = r
            .route(
                "/reports",
                axum::routing::post(report_post)
                    .layer(axum::extract::DefaultBodyLimit::max(MAX_REPORT)),
            )
            .route("/reports/{task}", get(report_list));
    }
    r.with_state(origin)
}

/// `POST /reports`: an agent's report of a task, kept as
/// `<reports>/<task>/<node>.json` (a later one replaces it).
async fn report_post(State(o): State<Arc<Origin>>, body: axum::body::Bytes) -> Response {
    let Some(root) = &o.reports else {
        return error(StatusCode::NOT_FOUND, "no reports here".into());
    };
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not JSON: {e}")),
    };
    let (Some(task), Some(node)) = (v["task"].as_str(), v["node"].as_str()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "a report names its task and node".into(),
        );
    };
    let node_ok = node.len() == 16 && node.bytes().all(|b| b.is_ascii_hexdigit());
    if !crate::trust::document::valid_id(task) || !node_ok {
        return error(StatusCode::BAD_REQUEST, "bad task id or node id".into());
    }
    let dir = root.join(task);
    let path = dir.join(format!("{node}.json"));
    let written = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        scanner::node::write_atomically(&path, &body)
    })
    .await;
    match written {
        Ok(Ok(())) => StatusCode::CREATED.into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /reports/{task}`: every report of the task, as a JSON array.
async fn report_list(State(o): State<Arc<Origin>>, UrlPath(task): UrlPath<String>) -> Response {
    let Some(root) = &o.reports else {
        return error(StatusCode::NOT_FOUND, "no reports here".into());
    };
    if !crate::trust::document::valid_id(&task) {
        return error(StatusCode::BAD_REQUEST, "bad task id".into());
    }
    let dir = root.join(&task);
    let all = tokio::task::spawn_blocking(move || crate::report::read_dir(&dir)).await;
    match all {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Runs the origin until the process ends.
pub fn main(
    dir: &Path,
    listen: SocketAddr,
    rate_bps: u64,
    reports: Option<&Path>,
) -> anyhow::Result<bool> {
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    if let Some(r) = reports {
        std::fs::create_dir_all(r).with_context(|| format!("creating {}", r.display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "somcast serve: {} on http://{addr}/ (GET /stats for bytes served)",
            dir.display()
        );
        if let Some(r) = reports {
            eprintln!(
                "somcast serve: task reports to POST /reports, kept in {}",
                r.display()
            );
        }
        axum::serve(listener, router(dir, rate_bps, reports)).await?;
        anyhow::Ok(())
    })?;
    Ok(true)
}

impl Origin {
    /// Waits for `bytes` worth of time on the shared link.
    async fn throttle(&self, bytes: usize) {
        if self.rate_bps == 0 {
            return;
        }
        let cost = std::time::Duration::from_secs_f64(bytes as f64 * 8.0 / self.rate_bps as f64);
        let until = {
            let mut free = self.link_free.lock().await;
            let start = (*free).max(tokio::time::Instant::now());
            *free = start + cost;
            *free
        };
        tokio::time::sleep_until(until).await;
    }
}

async fn stats_handler(State(o): State<Arc<Origin>>) -> Json<serde_json::Value> {
    Json(json!({
        "bytes_served": o.stats.bytes_served.load(Ordering::Relaxed),
        "requests": o.stats.requests.load(Ordering::Relaxed),
        "range_requests": o.stats.range_requests.load(Ordering::Relaxed),
        "not_modified": o.stats.not_modified.load(Ordering::Relaxed),
    }))
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

async fn file_handler(
    State(o): State<Arc<Origin>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    o.stats.requests.fetch_add(1, Ordering::Relaxed);
    let (mut file, size, etag) = match open_under(&o.dir, &path).await {
        Ok(opened) => opened,
        Err(r) => return *r,
    };
    // A conditional GET of an unchanged file (a polled channel): 304, no body.
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if unchanged {
        o.stats.not_modified.fetch_add(1, Ordering::Relaxed);
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        if let Ok(v) = HeaderValue::from_str(&etag) {
            r.headers_mut().insert(header::ETAG, v);
        }
        return r;
    }
    let (status, start, len) = match range_of(&headers, size) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if status == StatusCode::PARTIAL_CONTENT {
        o.stats.range_requests.fetch_add(1, Ordering::Relaxed);
    }
    if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "seek failed".into());
    }
    let origin = o.clone();
    let chunk_size = if o.rate_bps > 0 {
        64 * 1024
    } else {
        256 * 1024
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), chunk_size).then(
        move |chunk| {
            let origin = origin.clone();
            async move {
                if let Ok(c) = &chunk {
                    origin.throttle(c.len()).await;
                    origin
                        .stats
                        .bytes_served
                        .fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                chunk
            }
        },
    );
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", start, start + len - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    r
}

/// What of a `size`-byte file a request asks for: the whole (200) or one
/// range (206) as (status, start, length), or the 416 response.
fn range_of(headers: &HeaderMap, size: u64) -> Result<(StatusCode, u64, u64), Box<Response>> {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| parse_range(r, size));
    match range {
        None => Ok((StatusCode::OK, 0, size)),
        Some(Some((a, b))) => Ok((StatusCode::PARTIAL_CONTENT, a, b - a + 1)),
        Some(None) => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range not satisfiable for {size} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            Err(Box::new(r))
        }
    }
}

/// Opens `path` under `dir`: its size and entity tag, or the error
/// response. Only regular files under the root: a symlink may point
/// within it, never out of it, and a FIFO or device is never opened (a
/// FIFO's open waits for a writer forever).
async fn open_under(
    dir: &Path,
    path: &str,
) -> Result<(tokio::fs::File, u64, String), Box<Response>> {
    let rel = Path::new(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("bad path {path:?}"),
        )));
    }
    let not_found = || {
        Box::new(error(
            StatusCode::NOT_FOUND,
            format!("no such file: {path}"),
        ))
    };
    let (Ok(root), Ok(full)) = (
        tokio::fs::canonicalize(dir).await,
        tokio::fs::canonicalize(dir.join(rel)).await,
    ) else {
        return Err(not_found());
    };
    let regular = tokio::fs::metadata(&full).await.is_ok_and(|m| m.is_file());
    if !full.starts_with(&root) || !regular {
        return Err(not_found());
    }
    let file = tokio::fs::File::open(&full)
        .await
        .map_err(|_| not_found())?;
    match file.metadata().await {
        Ok(m) if m.is_file() => Ok((file, m.len(), etag(&m))),
        _ => Err(not_found()),
    }
}

/// A strong entity tag from the file's size and modification time: a
/// replaced or rewritten file gets another.
fn etag(m: &std::fs::Metadata) -> String {
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("\"{:x}-{:x}\"", m.len(), mtime)
}

/// One range of `bytes=a-b`, `bytes=a-` or `bytes=-n` (the unit in any
/// case), clamped to the size as RFC 9110 14.1.2 says, even when a number
/// is too large for 64 bits; `None` when it cannot be satisfied (or is
/// malformed, or a multi-range).
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let (unit, spec) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') || size == 0 {
        return None;
    }
    // Digits only; more than u64 holds means "past any end".
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(s.parse().unwrap_or(u64::MAX))
    };
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => (size.saturating_sub(number(n)?), size - 1),
        (a, "") => (number(a)?, size - 1),
        (a, b) => (number(a)?, number(b)?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse_and_clamp() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some((0, 99)));
        assert_eq!(parse_range("bytes=900-", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=-100", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some((990, 999)));
        assert_eq!(parse_range("bytes=1000-", 1000), None);
        assert_eq!(parse_range("bytes=5-1", 1000), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
        // The unit in any case; an end too large for 64 bits is clamped.
        assert_eq!(parse_range("BYTES=0-9", 1000), Some((0, 9)));
        assert_eq!(
            parse_range("bytes=10-99999999999999999999999", 1000),
            Some((10, 999))
        );
        assert_eq!(
            parse_range("bytes=-99999999999999999999999", 1000),
            Some((0, 999))
        );
        assert_eq!(parse_range("bytes=+1-5", 1000), None);
    }
}
