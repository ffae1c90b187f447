//! The endpoints for operators and their tools: the admin API (stats, pending and dead
//! records, retry, purge), `/healthz`, `/readyz`, `/metrics` and `/status`. They read the
//! queue and delivery; only retry and purge change anything, and only dead letters.

use super::*;

pub(super) async fn admin_stats(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let queue = state.queue.stats().map_err(ApiError::Queue)?;
    Ok(Json(json!({"queue": queue, "delivery": state.delivery.stats()})).into_response())
}

/// `?limit=N` on the listing endpoints.
#[derive(serde::Deserialize)]
pub(super) struct Limit {
    limit: Option<usize>,
}

/// Listings are capped so that one call cannot pull a whole backlog into memory.
pub(super) const MAX_LIST: usize = 10_000;

pub(super) async fn admin_peek(
    State(state): State<Arc<AppState>>,
    Query(q): Query<Limit>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(20).min(MAX_LIST);
    let records = state.queue.peek(limit).map_err(ApiError::Queue)?;
    let records = crate::delivery::with_objects(records, &state.delivery.policy);
    Ok(Json(json!({ "records": records })).into_response())
}

pub(super) async fn admin_dead(
    State(state): State<Arc<AppState>>,
    Query(q): Query<Limit>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(20).min(MAX_LIST);
    let records = state.queue.dead(limit).map_err(ApiError::Queue)?;
    let records = crate::delivery::with_objects(records, &state.delivery.policy);
    Ok(Json(json!({ "records": records })).into_response())
}

pub(super) async fn admin_retry_dead(
    State(state): State<Arc<AppState>>,
    Json(selection): Json<Selection>,
) -> Result<Response, ApiError> {
    let report = state
        .queue
        .retry_dead(&selection)
        .await
        .map_err(ApiError::Queue)?;
    Ok(Json(json!({ "report": report })).into_response())
}

pub(super) async fn admin_purge_dead(
    State(state): State<Arc<AppState>>,
    Json(selection): Json<Selection>,
) -> Result<Response, ApiError> {
    let report = state
        .queue
        .purge_dead(&selection)
        .await
        .map_err(ApiError::Queue)?;
    Ok(Json(json!({ "report": report })).into_response())
}

/// Alive: the process answers. Says nothing about Braze; that is `/readyz`.
pub(super) async fn healthz() -> Response {
    Json(json!({"alive": true})).into_response()
}

/// Why the daemon should not get traffic now, if it should not: a cause (for the metric)
/// and the reason `/readyz` gives.
pub(super) fn not_ready(state: &AppState) -> Option<(&'static str, String)> {
    if state.shutdown.stopping() {
        return Some(("stopping", "stopping".into()));
    }
    if let Some((since, why)) = state.queue.storage_failure() {
        return Some((
            "storage",
            format!(
                "storage failing for {} s (ingest refused, nothing acknowledged lost): {why}",
                since.elapsed().as_secs()
            ),
        ));
    }
    match state.delivery.gate.health() {
        Health::Paused { reason, .. } => Some((
            "paused",
            format!("delivery paused: Braze refuses the key or endpoint: {reason}"),
        )),
        _ => None,
    }
}

pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match not_ready(&state) {
        Some((_, reason)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": reason})),
        )
            .into_response(),
        None => {
            Json(json!({"ready": true, "delivery": state.delivery.gate.health()})).into_response()
        }
    }
}

/// The operator's page (`status.rs`). It shows personal data (dead letters with their
/// objects), so it is an admin route: the admin socket, or the token over TCP, which a
/// browser can send as the password of HTTP Basic authentication.
pub(super) async fn status_page(State(state): State<Arc<AppState>>) -> Response {
    let queue = state.queue.stats().ok();
    let delivery = state.delivery.stats();
    let dead = state
        .queue
        .latest_dead(crate::status::DEAD_SHOWN)
        .map(|d| crate::delivery::with_objects(d, &state.delivery.policy))
        .unwrap_or_default();
    let reason = not_ready(&state).map(|(_, reason)| reason);
    let page = crate::status::render(&crate::status::View {
        queue: queue.as_ref(),
        delivery: &delivery,
        not_ready: reason.as_deref(),
        history: state.history.samples(),
        dead: &dead,
    });
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing the page needs comes from elsewhere, and nothing else may frame it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

/// Prometheus text format, written out from the queue's and delivery's own counters.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let queue = state.queue.stats().ok();
    let text = crate::metrics::render(
        queue.as_ref(),
        &state.delivery.stats(),
        &state.delivery.counters.latency,
        not_ready(&state).map(|(cause, _)| cause),
    );
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}
