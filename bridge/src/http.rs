//! The HTTP API: health and readiness (open, for load balancers), and behind the JWT
//! when auth is on: Prometheus metrics, stats, cleanup and batch writes for clients
//! without a socket.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Identity;
use crate::metrics as m;
use crate::pg::{reader, writer, PgError};
use crate::state::AppState;
use crate::ws::protocol::{ErrorCode, ErrorMessage, Mutation};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/sync/stats", get(stats))
        .route("/api/v1/sync/cleanup", post(cleanup))
        .route("/api/v1/sync/batch-changes", post(batch_changes))
}

/// An HTTP error: `{"code", "message"[, "sqlstate"]}` with a matching status.
pub struct ApiError(ErrorMessage);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0.code {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ResyncRequired => StatusCode::CONFLICT,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        m::error_sent(self.0.code.as_str());
        let mut body = json!({"code": self.0.code, "message": self.0.message});
        if let Some(state) = self.0.sqlstate {
            body["sqlstate"] = state.into();
        }
        (status, Json(body)).into_response()
    }
}

fn api_error(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError(ErrorMessage::new(None, code, message))
}

fn db_error(e: PgError) -> ApiError {
    ApiError(ErrorMessage::from_db(None, &e))
}

/// The caller's identity from `Authorization: Bearer <token>` (auth on), or the
/// default identity (auth off).
fn caller(state: &AppState, headers: &HeaderMap, client_id: &str) -> Result<Identity, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    state
        .auth
        .identify(token, client_id)
        .map_err(|e| api_error(ErrorCode::Unauthorized, e.to_string()))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<AppState>) -> Response {
    let listening = state.listening.load(Ordering::Relaxed);
    let reading = state.follower.reading.load(Ordering::Relaxed);
    let lag = state.follower.lag();
    let database = match state.pool.get().await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    let ready = listening
        && reading
        && database
        && lag <= state.config.ready_max_lag
        && !state.shutdown.is_cancelled();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": ready,
            "database": database,
            "listening": listening,
            "reading": reading,
            "lag": lag,
            "position": state.follower.position.load(Ordering::Relaxed),
            // Presence down is degraded, not unready: changes and writes still work.
            "presence": {
                "backend": state.rooms.backend(),
                "healthy": state.rooms.healthy(),
            },
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    caller(&state, &headers, "metrics")?;
    let (total, max) = state.connections.queue_depths();
    m::queue_depth(total, max);
    m::reader_lag(state.follower.lag());
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m::handle().render(),
    )
        .into_response())
}

async fn stats(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers, "stats")?;
    let hub = state.hub.stats();
    let (total, max) = state.connections.queue_depths();
    Ok(Json(json!({
        "node": state.config.node_name,
        "connections": state.connections.count(),
        "queue_depth": {"total": total, "max": max},
        "reader": {
            "position": state.follower.position.load(Ordering::Relaxed),
            "lag": state.follower.lag(),
            "reading": state.follower.reading.load(Ordering::Relaxed),
            "listening": state.listening.load(Ordering::Relaxed),
        },
        "hub": hub,
        "presence": state.rooms.stats(),
    })))
}

/// Runs `livesync.compact` with the configured retention. With auth on, the token's
/// role must be a member of `livesync_maintainer` (it runs as the bridge's role).
async fn cleanup(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let identity = caller(&state, &headers, "cleanup")?;
    if state.auth.enabled() {
        let client = state.pool.get().await.map_err(|e| db_error(e.into()))?;
        let may = client
            .query_one(
                "SELECT coalesce((SELECT pg_catalog.pg_has_role(r.oid, 'livesync_maintainer', 'USAGE') \
                                  FROM pg_catalog.pg_roles r WHERE r.rolname = $1), false)",
                &[&identity.role],
            )
            .await
            .map_err(|e| db_error(e.into()))?
            .get::<_, bool>(0);
        if !may {
            return Err(api_error(
                ErrorCode::Forbidden,
                "cleanup needs a token whose role is a member of livesync_maintainer",
            ));
        }
    }
    let removed = writer::compact(&state.pool, state.config.retention)
        .await
        .map_err(db_error)?;
    let client = state.pool.get().await.map_err(|e| db_error(e.into()))?;
    let position = reader::current_position(&client).await.map_err(db_error)?;
    let presence_swept = state
        .rooms
        .sweep_now()
        .await
        .map_err(|e| api_error(ErrorCode::Unavailable, e.to_string()))?;
    Ok(Json(json!({
        "removed_changes": removed,
        "presence_swept": presence_swept,
        "retention_seconds": state.config.retention.as_secs(),
        "position": position,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchChanges {
    client_id: String,
    mutations: Vec<Mutation>,
    #[serde(default)]
    all_or_nothing: bool,
}

/// `write_batch` over HTTP: `{"client_id", "mutations": [...], "all_or_nothing"}` →
/// `{"results": [...]}`.
async fn batch_changes(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    if body.len() > state.config.limits.max_frame_bytes {
        return Err(api_error(
            ErrorCode::TooLarge,
            format!(
                "body of {} bytes; the limit is {}",
                body.len(),
                state.config.limits.max_frame_bytes
            ),
        ));
    }
    let request: BatchChanges = serde_json::from_slice(&body)
        .map_err(|e| api_error(ErrorCode::BadRequest, format!("invalid batch: {e}")))?;
    if request.client_id.is_empty() || request.client_id.len() > 256 {
        return Err(api_error(
            ErrorCode::BadRequest,
            "client_id must be 1 to 256 bytes",
        ));
    }
    let identity = caller(&state, &headers, &request.client_id)?;
    let client_id = identity.scoped_client_id(&request.client_id);
    if client_id.len() > 256 {
        return Err(api_error(
            ErrorCode::BadRequest,
            "client_id and the token's sub together must stay within 256 bytes",
        ));
    }
    let results = writer::write_batch(
        &state.pool,
        &identity,
        &client_id,
        &request.mutations,
        request.all_or_nothing,
    )
    .await
    .map_err(db_error)?;
    for status in results.statuses() {
        m::write_outcome(status);
    }
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"results\":{}}}", results.json()),
    )
        .into_response())
}
