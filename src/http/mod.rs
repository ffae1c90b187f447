//! The HTTP face of the daemon: ingest, health, metrics and the admin API.
//!
//! Ingest answers 2xx only after the queue (`queue::Backend`) has made the records durable.
//! Every error becomes an HTTP answer in one place, `ApiError::into_response`. The admin API
//! is never served over TCP without the token.
//!
//! This file holds the shared state, the routers, the credential checks, the answers to
//! errors and the accept loop; `receive.rs` the ingest endpoints; `operate.rs` the admin API,
//! health, metrics and `/status`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::config::{PreferId, Secret};
use crate::delivery::gate::Health;
use crate::delivery::Delivery;
use crate::ingest::{self, BadInput};
use crate::members;
use crate::queue::{Backend, QueueError, Selection};
use crate::record::Record;
use crate::relay;
use crate::request_body::{self, BodyError};
use crate::snapshot::SnapshotError;

mod operate;
mod receive;

use operate::*;
use receive::*;

/// Bodies bigger than this are parsed on the blocking pool so that a 16 MB upload does not
/// stall the threads serving everyone else.
const PARSE_INLINE_MAX: usize = request_body::SMALL;

pub struct AppState {
    pub queue: Arc<dyn Backend>,
    pub delivery: Arc<Delivery>,
    pub snapshots: Arc<crate::snapshot::Snapshots>,
    /// The last hour of samples `/status` draws.
    pub history: Arc<crate::status::History>,
    /// Required on every ingest and admin call when set. Health and metrics stay open: they
    /// carry no customer data and probes rarely carry credentials.
    pub token: std::sync::RwLock<Option<Secret>>,
    /// Read by every handler: once stopping has begun, new requests get 503 so that clients
    /// retry against the next start.
    pub shutdown: crate::shutdown::Shutdown,
    /// Which id a `/v1` record carrying both is sent with (`identity.prefer`).
    pub prefer: PreferId,
    /// How long a snapshot upload may send nothing before it is abandoned and its split
    /// freed (`ingest.upload_idle_timeout_ms`).
    pub upload_idle_timeout: std::time::Duration,
    /// `ingest.upload_timeout_ms`: the longest a snapshot upload may take to arrive.
    pub upload_timeout: std::time::Duration,
    /// Size and pace every body is read under, and the memory large ones share.
    pub body_limits: request_body::Limits,
    pub body_budget: request_body::Budget,
    /// `/users/export/ids` is forwarded only when on (`ingest.export_passthrough`), and then
    /// at most `EXPORT_PER_MINUTE` times a minute.
    pub export_passthrough: bool,
    pub export_window: std::sync::Mutex<(u64, u64)>,
}

/// Lookups forwarded a minute, at most: Braze's own limit for `/users/export/ids` on newer
/// workspaces, so a client of the daemon cannot spend more of the key's budget than that
/// (<https://www.braze.com/docs/api/endpoints/export/user_data/post_users_identifier>).
const EXPORT_PER_MINUTE: u64 = 250;
/// Braze's limit of ids per lookup (same page as `EXPORT_PER_MINUTE`).
const EXPORT_MAX_IDS: usize = 50;

pub fn router(state: Arc<AppState>, guard: crate::http_guard::Guard) -> Router {
    // Everything but health and metrics needs the token, checked before the body is read:
    // a client without it cannot make the daemon buffer a body at all.
    let guarded = Router::new()
        .route("/v1/memberships", post(post_memberships))
        .route("/v1/events", post(post_events))
        .route("/v1/attributes", post(post_attributes))
        .route(
            "/v1/audiences/{audience_id}/splits/{split_id}/members",
            // Snapshots stream in: tens of millions of ids, read line by line, not buffered.
            put(put_snapshot),
        )
        .route("/users/track", post(users_track))
        .route("/users/export/ids", post(export_ids))
        .merge(
            admin_routes().route_layer(axum::middleware::from_fn_with_state(
                Arc::clone(&state),
                admin_needs_token,
            )),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ))
        // Outside the token check: a browser is refused whatever it carries.
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::new(guard),
            crate::http_guard::check,
        ));
    Router::new()
        .merge(guarded)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The admin API: statistics, and the pending and dead records (personal data), with the
/// power to retry and purge. Over TCP it needs the token (`router`); on the admin socket
/// (`admin_router`) the socket file's permissions are the credential.
fn admin_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/status", get(status_page))
        .route("/v1/admin/queue/stats", get(admin_stats))
        .route("/v1/admin/queue/peek", get(admin_peek))
        .route("/v1/admin/queue/dead", get(admin_dead))
        .route("/v1/admin/queue/retry-dead", post(admin_retry_dead))
        .route("/v1/admin/queue/purge-dead", post(admin_purge_dead))
}

/// The admin API alone, for the admin socket (`daemon::ADMIN_SOCKET`), which only the
/// daemon's user can open.
pub fn admin_router(state: Arc<AppState>) -> Router {
    admin_routes().with_state(state)
}

/// Over TCP the admin API is never open: without a token configured, any local process (a
/// web page, even, through a rebound DNS name) could read personal data and purge dead
/// letters. The `queue` commands use the admin socket instead.
async fn admin_needs_token(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if state.token.read().expect("token lock poisoned").is_some() {
        return next.run(request).await;
    }
    (
        StatusCode::FORBIDDEN,
        Json(
            json!({"error": "the admin API answers over TCP only when ingest.token is set; \
            on this machine the queue commands reach it through the admin socket in data_dir"}),
        ),
    )
        .into_response()
}

/// Refuses a request without the token before its body is read. The Braze-compatible
/// endpoints answer in Braze's shape, so a Braze client reports it as it would Braze's.
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if authorize(&state, request.headers()).is_ok() {
        return next.run(request).await;
    }
    if request.uri().path() == "/status" {
        let mut r = ApiError::Unauthorized.into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"aiq-braze-sync\", charset=\"UTF-8\""),
        );
        return r;
    }
    if request.uri().path().starts_with("/users/") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"message": "Invalid API key", "errors": []})),
        )
            .into_response();
    }
    ApiError::Unauthorized.into_response()
}

impl From<BadInput> for ApiError {
    fn from(b: BadInput) -> ApiError {
        ApiError::BadInput(b)
    }
}

/// Every way a request can fail, and the answer each one gets.
pub enum ApiError {
    Unauthorized,
    BadInput(BadInput),
    Queue(QueueError),
    Snapshot(SnapshotError),
    Stopping,
    /// The body could not be read whole: too large, too slow, too many at once, or cut short.
    Body(BodyError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = |secs: &'static str, body: serde_json::Value| {
            let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
            r
        };
        match self {
            ApiError::Unauthorized => {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": "missing or wrong bearer token"})),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            ApiError::BadInput(b) => (
                StatusCode::BAD_REQUEST,
                Json(json!({
                    "error": b.to_string(),
                    "index": b.index,
                    "line": b.line,
                    "field": b.field,
                    "queued": 0,
                })),
            )
                .into_response(),
            ApiError::Body(e) => {
                let mut r = (
                    body_status(&e),
                    Json(json!({"error": e.to_string(), "queued": 0})),
                )
                    .into_response();
                add_body_headers(&mut r, &e);
                r
            }
            ApiError::Stopping => retry("5", json!({"error": "the daemon is stopping; retry"})),
            ApiError::Queue(e @ QueueError::Full(_)) => {
                retry("30", json!({"error": e.to_string()}))
            }
            ApiError::Queue(e @ QueueError::Busy) => retry("1", json!({"error": e.to_string()})),
            ApiError::Snapshot(SnapshotError::Conflict(why)) => {
                (StatusCode::CONFLICT, Json(json!({ "error": why }))).into_response()
            }
            ApiError::Snapshot(SnapshotError::Refused(why)) => (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": why, "queued": 0 })),
            )
                .into_response(),
            ApiError::Snapshot(SnapshotError::Queue(e)) => ApiError::Queue(e).into_response(),
            ApiError::Snapshot(e) => {
                tracing::error!(error = %e, "a snapshot upload failed; the previous snapshot stays");
                retry(
                    "5",
                    json!({"error": format!("the snapshot could not be stored: {e}")}),
                )
            }
            ApiError::Queue(e) => {
                tracing::error!(error = %e, "ingest could not queue a request; it was refused");
                retry(
                    "5",
                    json!({"error": format!("records could not be stored: {e}")}),
                )
            }
        }
    }
}

fn body_status(e: &BodyError) -> StatusCode {
    match e {
        BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        BodyError::TooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
        BodyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
        BodyError::Cut(_) => StatusCode::BAD_REQUEST,
    }
}

/// A body that was not read to its end leaves the connection unusable for another request:
/// say so, and hyper closes it. A busy answer says when to come back.
fn add_body_headers(r: &mut Response, e: &BodyError) {
    if matches!(e, BodyError::Busy) {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(axum::body::Bytes, request_body::Held), BodyError> {
    request_body::read(headers, body, &state.body_limits, &state.body_budget).await
}

/// The token a request presents: `Authorization: Bearer TOKEN`, or, for a browser,
/// `Authorization: Basic` with the token as the password (any user name).
fn presented_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.as_bytes().to_vec());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.strip_prefix("Basic ")?.trim())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = state.token.read().expect("token lock poisoned");
    let Some(token) = token.as_ref() else {
        return Ok(());
    };
    let given = presented_token(headers).unwrap_or_default();
    // Constant time in the contents; only the length can be learned, which is not the secret.
    if bool::from(given.as_slice().ct_eq(token.expose().as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Descriptors kept back from ingest connections besides one per connection to Braze: the
/// queue's files, a snapshot merge's runs, the commands' own.
const FILES_KEPT_BACK: usize = 128;

/// How many connections `serve` takes at once: `wanted` (`ingest.max_connections`), but
/// kept below the open-file limit so that the rest of the daemon has descriptors left: the
/// limit less `FILES_KEPT_BACK` and `braze_connections`, or half the limit if that is more.
pub fn connection_cap(wanted: usize, braze_connections: usize) -> usize {
    let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let room = files
        .saturating_sub(FILES_KEPT_BACK + braze_connections)
        .max(files / 2);
    wanted.min(room).max(1)
}

/// Serves `app` until `stop` resolves, then waits for the requests in progress to finish.
///
/// What `axum::serve` does, plus a timer for hyper so that `header_timeout` applies (a
/// connection that has not sent a whole request head in that time is closed), and a cap of
/// `max_connections` served at once: beyond it, connections wait in the kernel's backlog
/// until one ends. Bodies are bounded separately (`request_body`).
pub async fn serve<L: Listener>(
    listener: L,
    app: axum::Router,
    header_timeout: std::time::Duration,
    max_connections: usize,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut stop = std::pin::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the slots are never closed"),
            () = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept_stream() => match accepted {
                Ok(stream) => stream,
                // Out of file descriptors and the like: wait rather than spin, as axum does.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// What `serve` accepts connections from: the TCP listener of `ingest.listen`, or the
/// admin socket.
pub trait Listener: Send {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static;
    fn accept_stream(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> std::io::Result<tokio::net::TcpStream> {
        let (stream, _) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> std::io::Result<tokio::net::UnixStream> {
        Ok(self.accept().await?.0)
    }
}
