//! The control API: HTTP + JSON behind a bearer token.
//!
//! - `GET /v1/status`: the agent, its interface and subnet, its peer table.
//! - `POST /v1/tasks`: start a task (a [`TaskSpec`] in JSON); 201 with its
//!   status, 400 with the reason for a bad one, 409 for an id in use.
//! - `GET /v1/tasks`, `GET /v1/tasks/{id}`: statuses.
//! - `POST /v1/tasks/{id}/cancel`, `/pause`, `/resume`: signed orders.
//! - `GET /metrics`: Prometheus text (see `metrics`); also on its own
//!   address without a token (`--metrics`).
//!
//! Orders (start, cancel) are signed documents checked by the agent's trust
//! gate; the bearer token guards the reads, and the writes too only in the
//! insecure lab mode, where unsigned orders are taken.
//!
//! Every other route answers 404 in JSON; a request without the token, 401.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::task::{self, SpecError, TaskSpec};
use super::{Agent, admit};
use crate::lab::hex;
use crate::trust::{Bundle, ControlAction, Envelope, Refusal};

/// A JSON error with its status: `{"error": "..."}`.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/tasks", get(list_tasks).post(start_task))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/tasks/{id}/pause", post(pause_task))
        .route("/v1/tasks/{id}/resume", post(resume_task))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(agent.clone(), require_token))
        .layer(axum::extract::DefaultBodyLimit::max(
            2 * crate::trust::document::MAX_DOCUMENT + 64 * 1024,
        ))
        .with_state(agent)
}

/// Serves the API on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    axum::serve(listener, router(agent))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

/// Serves only GET /metrics, without a token, on `listener` until `stop`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(agent);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    // The scrape lists the cache directory: off the runtime's workers.
    match tokio::task::spawn_blocking(move || super::metrics::render(&agent)).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(super::metrics::CONTENT_TYPE),
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn require_token(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    // A signed order carries its own authority; the token is for reads.
    if req.method() == axum::http::Method::POST && !agent.gate.insecure() {
        return next.run(req).await;
    }
    // The scheme is case-insensitive (RFC 9110 11.1).
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    match given {
        Some(t) if same(t.trim().as_bytes(), agent.token.as_bytes()) => next.run(req).await,
        _ => {
            let mut r = ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <token>` (the agent's --token, or <cache>/api-token)".into(),
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

/// Compares in time that does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(req: Request) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

async fn start_task(State(agent): State<Arc<Agent>>, body: Bytes) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            let r = Refusal::Malformed(format!("not JSON: {e}"));
            agent.gate.tally::<()>(&Err(r.clone()));
            return refusal(r);
        }
    };
    if value.get("task").is_some() {
        let bundle: Bundle = match serde_json::from_value(value) {
            Ok(b) => b,
            Err(e) => {
                let r = Refusal::Malformed(format!("bad task bundle: {e}"));
                agent.gate.tally::<()>(&Err(r.clone()));
                return refusal(r);
            }
        };
        return match admit::task(&agent, bundle).await {
            Ok(status) => (StatusCode::CREATED, Json(status)).into_response(),
            Err(e) => ApiError(code(e.http_status()), e.to_string()).into_response(),
        };
    }
    // The bare spec of earlier versions: unsigned, so for lab agents only.
    if !agent.gate.insecure() {
        let r = if agent.gate.keys().is_empty() {
            Refusal::NoTrustedKey
        } else {
            Refusal::Unsigned
        };
        agent.gate.tally::<()>(&Err(r.clone()));
        return refusal(r);
    }
    let spec: TaskSpec = match serde_json::from_value(value) {
        Ok(s) => s,
        Err(e) => {
            return ApiError(StatusCode::BAD_REQUEST, format!("bad task: {e}")).into_response();
        }
    };
    match task::submit(&agent, spec) {
        Ok(status) => (StatusCode::CREATED, Json(status)).into_response(),
        Err(e @ SpecError::Conflict(_)) => {
            ApiError(StatusCode::CONFLICT, e.to_string()).into_response()
        }
        Err(e @ SpecError::Storage(_)) => {
            ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
        }
        Err(e) => ApiError(StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

fn code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST)
}

fn refusal(r: Refusal) -> Response {
    ApiError(code(r.http_status()), r.to_string()).into_response()
}

async fn list_tasks(State(agent): State<Arc<Agent>>) -> Json<Value> {
    Json(json!({ "tasks": task::list(&agent) }))
}

async fn get_task(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> Response {
    let status = agent.tasks().get(&id).map(|t| t.status.clone());
    match status {
        Some(s) => Json(s).into_response(),
        None => ApiError(StatusCode::NOT_FOUND, format!("no task {id}")).into_response(),
    }
}

async fn cancel_task(state: State<Arc<Agent>>, id: Path<String>, body: Bytes) -> Response {
    control_task(state, id, body, ControlAction::Cancel)
}

async fn pause_task(state: State<Arc<Agent>>, id: Path<String>, body: Bytes) -> Response {
    control_task(state, id, body, ControlAction::Pause)
}

async fn resume_task(state: State<Arc<Agent>>, id: Path<String>, body: Bytes) -> Response {
    control_task(state, id, body, ControlAction::Resume)
}

/// An order about a task (its body the signed document; empty only in the
/// insecure lab mode): the task's status, 404 without such a task, 409 for
/// one that ended.
fn control_task(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    body: Bytes,
    action: ControlAction,
) -> Response {
    let order: Option<Envelope> = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(env) => Some(env),
            Err(e) => {
                let r = Refusal::Malformed(format!("bad {action:?} order: {e}"));
                agent.gate.tally::<()>(&Err(r.clone()));
                return refusal(r);
            }
        }
    };
    match admit::control(&agent, &id, action, order.as_ref()) {
        Err(r) => refusal(r),
        Ok(Some(s)) if s.state.is_terminal() => ApiError(
            StatusCode::CONFLICT,
            format!("task {id} already ended ({:?})", s.state),
        )
        .into_response(),
        Ok(Some(s)) => Json(s).into_response(),
        Ok(None) => ApiError(StatusCode::NOT_FOUND, format!("no task {id}")).into_response(),
    }
}

async fn status(State(agent): State<Arc<Agent>>) -> Json<Value> {
    let p = agent.presence();
    let now = std::time::Instant::now();
    let peer = |peer: &scanner::Peer| {
        let a = &peer.announce;
        json!({
            "node": format!("{:016x}", a.node),
            "addr": peer.addr.to_string(),
            "version": a.version,
            "api_port": a.api_port,
            "last_heard_ms": now.saturating_duration_since(peer.last_heard).as_millis() as u64,
            "rank": {
                "preference": a.rank.preference,
                "wired": a.rank.wired,
                "free_disk_mib": a.rank.free_disk_mib,
                "uptime_s": a.rank.uptime_s,
            },
            "held": a.held.iter().map(|h| json!({
                "content": hex(&h.content),
                "blocks_done": h.blocks_done,
                "block_count": h.block_count,
            })).collect::<Vec<_>>(),
        })
    };
    let mut peers: Vec<Value> = p.peers().map(peer).collect();
    peers.sort_by(|a, b| a["addr"].as_str().cmp(&b["addr"].as_str()));
    let foreign: Vec<Value> = p.foreign_peers().map(peer).collect();
    let s = p.stats();
    Json(json!({
        "node": format!("{:016x}", agent.node),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": agent.started.elapsed().as_secs(),
        "iface": { "name": agent.iface_name, "addr": agent.iface_addr.to_string() },
        "subnet": agent.subnet.map(|s| s.to_string()),
        "site": agent.placement(),
        "topology": agent.topology_id().map(|(id, issued)| json!({"id": id, "issued": issued})),
        "control_group": agent.config.control_group.to_string(),
        "repair_port": p.local().repair_port,
        "rank": {
            "preference": p.local().rank.preference,
            "wired": p.local().rank.wired,
            "free_disk_mib": p.local().rank.free_disk_mib,
            "uptime_s": p.local().rank.uptime_s,
        },
        "trust": agent.gate.status(),
        "channel": super::channel::status(&agent),
        "tags": agent.config.tags,
        "hostname": agent.hostname,
        "election": {
            "offers_refused": agent.offers_refused.load(std::sync::atomic::Ordering::Relaxed),
        },
        "lan": {
            "authenticated": agent.fleet.is_some(),
            "fleet_keys": agent.fleet.as_ref().map(|k| k.ids().iter().map(|i| format!("{i:04x}")).collect::<Vec<_>>()),
            "datagrams": agent.auth.snapshot().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        },
        "peers": peers,
        "foreign_peers": foreign,
        "presence": {
            "datagrams_in": s.datagrams_in,
            "malformed": s.malformed,
            "not_presence": s.not_presence,
            "announcements_sent": s.announcements_sent,
            "probes_sent": s.probes_sent,
            "answers_sent": s.answers_sent,
            "answers_limited": s.answers_limited,
            "bytes_sent": s.bytes_sent,
            "table_full": s.table_full,
            "source_limited": s.source_limited,
            "evicted": s.evicted,
        },
    }))
}
