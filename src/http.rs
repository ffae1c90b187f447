//! The HTTP face of the daemon: ingest, health, metrics and the admin API.
//!
//! Ingest answers 2xx only after the queue (`queue::Backend`) has made the records durable.
//! Every error becomes an HTTP answer in one place, `ApiError::into_response`. The admin API
//! is never served over TCP without the token.

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

async fn ingest_with<F>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    skip_unchanged: bool,
    parse: F,
) -> Result<Response, ApiError>
where
    F: Fn(&[u8]) -> Result<Vec<Record>, BadInput> + Send + 'static,
{
    authorize(state, headers)?;
    if state.shutdown.stopping() {
        return Err(ApiError::Stopping);
    }
    // `_held` keeps the body's share of the memory budget until the records are queued.
    let (body, _held) = read_body(state, headers, body)
        .await
        .map_err(ApiError::Body)?;
    let n = if body.len() <= PARSE_INLINE_MAX {
        let records = parse(&body).map_err(ApiError::BadInput)?;
        let n = records.len();
        state
            .queue
            .enqueue_with(records, skip_unchanged)
            .await
            .map_err(ApiError::Queue)?;
        n
    } else {
        // Parsed and staged on the blocking pool: neither stalls the runtime's thread, which
        // serves every other request and the delivery workers.
        let queue = Arc::clone(&state.queue);
        let staged = tokio::task::spawn_blocking(move || {
            let records = parse(&body).map_err(ApiError::BadInput)?;
            let staged = queue
                .stage_blocking(&records, skip_unchanged)
                .map_err(ApiError::Queue)?;
            Ok::<_, ApiError>((records.len(), staged))
        })
        .await
        .expect("ingest parser panicked");
        let (n, staged) = staged?;
        state
            .queue
            .commit_staged(staged)
            .await
            .map_err(ApiError::Queue)?;
        n
    };
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": n}))).into_response())
}

/// `POST /v1/memberships?resend=true`: queue each value even if Braze was sent it lately
/// (what `reconcile --repair` sends).
#[derive(serde::Deserialize)]
struct MembershipOptions {
    #[serde(default)]
    resend: bool,
}

async fn post_memberships(
    State(state): State<Arc<AppState>>,
    Query(options): Query<MembershipOptions>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let prefer = state.prefer;
    ingest_with(&state, &headers, body, !options.resend, move |b| {
        Ok(ingest::parse_memberships(b, prefer)?
            .into_iter()
            .map(Record::Membership)
            .collect())
    })
    .await
}

async fn post_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let prefer = state.prefer;
    ingest_with(&state, &headers, body, true, move |b| {
        Ok(ingest::parse_events(b, prefer)?
            .into_iter()
            .map(Record::Event)
            .collect())
    })
    .await
}

async fn post_attributes(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let prefer = state.prefer;
    ingest_with(&state, &headers, body, true, move |b| {
        Ok(ingest::parse_attributes(b, prefer)?
            .into_iter()
            .map(Record::Attribute)
            .collect())
    })
    .await
}

/// `POST /users/track`, Braze-compatible: the body Braze takes, answered the way Braze
/// answers, but 201 means "durably queued here" rather than "queued at Braze". Failures get
/// Braze-shaped bodies (`message`, `errors`) so a Braze client reports them as it would
/// Braze's own.
async fn users_track(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let braze_shaped = |status: StatusCode, message: String, errors: Vec<relay::ObjectError>| {
        (
            status,
            Json(json!({ "message": message, "errors": errors })),
        )
            .into_response()
    };
    if authorize(&state, &headers).is_err() {
        return braze_shaped(
            StatusCode::UNAUTHORIZED,
            "Invalid API key".into(),
            Vec::new(),
        );
    }
    if state.shutdown.stopping() {
        return ApiError::Stopping.into_response();
    }
    let (body, _held) = match read_body(&state, &headers, body).await {
        Ok(read) => read,
        Err(e) => {
            let mut r = braze_shaped(body_status(&e), e.to_string(), Vec::new());
            add_body_headers(&mut r, &e);
            return r;
        }
    };
    let parsed = if body.len() <= PARSE_INLINE_MAX {
        relay::parse(&body)
    } else {
        tokio::task::spawn_blocking(move || relay::parse(&body))
            .await
            .expect("relay parser panicked")
    };
    let relayed = match parsed {
        Ok(r) => r,
        Err(refused) => {
            return braze_shaped(StatusCode::BAD_REQUEST, refused.message, refused.errors)
        }
    };
    let answer = relayed.answer();
    if let Err(e) = state.queue.enqueue(relayed.records).await {
        let mut r = ApiError::Queue(e).into_response();
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            // Braze's clients read `message`; keep the Retry-After header as it is.
            let retry = r.headers().get(header::RETRY_AFTER).cloned();
            r = braze_shaped(
                StatusCode::SERVICE_UNAVAILABLE,
                "the relay cannot queue this request now; retry".into(),
                Vec::new(),
            );
            if let Some(v) = retry {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        return r;
    }
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn admin_stats(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let queue = state.queue.stats().map_err(ApiError::Queue)?;
    Ok(Json(json!({"queue": queue, "delivery": state.delivery.stats()})).into_response())
}

/// `POST /users/export/ids`, Braze-compatible: forwarded to Braze synchronously (a read needs
/// no queue), so a Braze client pointed at the daemon can still look users up. The client
/// authenticates with the ingest token as its "API key"; Braze sees the real key.
async fn export_ids(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    if !state.export_passthrough {
        let message = "the /users/export/ids passthrough is off; set [ingest] export_passthrough = true to forward lookups to Braze";
        return Ok((StatusCode::NOT_FOUND, Json(json!({ "message": message }))).into_response());
    }
    let (body, _held) = read_body(&state, &headers, body)
        .await
        .map_err(ApiError::Body)?;
    let refuse = |message: String| {
        (StatusCode::BAD_REQUEST, Json(json!({ "message": message }))).into_response()
    };
    let Ok(serde_json::Value::Object(lookup)) = serde_json::from_slice(&body) else {
        return Ok(refuse("the body must be a JSON object".into()));
    };
    let ids = |key: &str| {
        lookup
            .get(key)
            .and_then(|v| v.as_array())
            .map_or(0, Vec::len)
    };
    let asked = ids("external_ids") + ids("user_aliases");
    if asked > EXPORT_MAX_IDS {
        return Ok(refuse(format!(
            "{asked} external_ids and user_aliases: Braze takes at most {EXPORT_MAX_IDS} a lookup"
        )));
    }
    let minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60);
    {
        let mut window = state
            .export_window
            .lock()
            .expect("export window lock poisoned");
        if window.0 != minute {
            *window = (minute, 0);
        }
        if window.1 >= EXPORT_PER_MINUTE {
            let wait = 60
                - std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() % 60);
            return Ok((
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, wait.to_string())],
                Json(json!({ "message": format!("at most {EXPORT_PER_MINUTE} lookups a minute go through the daemon") })),
            )
                .into_response());
        }
        window.1 += 1;
    }
    let forwarded = state
        .delivery
        .client
        .forward_export_ids(body.to_vec())
        .await;
    // Who asked for how many profiles, never which: ids are personal data.
    tracing::info!(
        ids = asked,
        status = forwarded.as_ref().map_or(502, |(s, _)| *s),
        "forwarded a /users/export/ids lookup"
    );
    match forwarded {
        Ok((status, body)) => Ok((
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()),
        Err(why) => Ok((
            StatusCode::BAD_GATEWAY,
            Json(json!({ "message": format!("Braze could not be reached: {why}") })),
        )
            .into_response()),
    }
}

#[derive(serde::Deserialize)]
struct SnapshotOptions {
    /// An empty snapshot empties the split only when asked for explicitly.
    #[serde(default)]
    allow_empty: bool,
    /// Queue every member's value (and `false` for who left), not only the differences, and
    /// even values Braze was sent lately.
    #[serde(default)]
    full: bool,
}

/// `PUT /v1/audiences/{audience_id}/splits/{split_id}/members`: the whole membership of a
/// split; queues only who entered and who left (see `crate::snapshot`).
async fn put_snapshot(
    State(state): State<Arc<AppState>>,
    Path((audience, split)): Path<(String, String)>,
    Query(options): Query<SnapshotOptions>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    if state.shutdown.stopping() {
        return Err(ApiError::Stopping);
    }
    for (field, value) in [("audience_id", &audience), ("split_id", &split)] {
        crate::ingest::check_id_part(value).map_err(|why| {
            ApiError::BadInput(BadInput {
                index: None,
                line: None,
                field: Some(field.into()),
                message: why,
            })
        })?;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = if content_type.starts_with("text/csv") {
        Some(members::Format::Csv)
    } else if content_type.contains("ndjson") || content_type.contains("jsonl") {
        Some(members::Format::Ndjson)
    } else {
        None
    };
    let mut upload = state
        .snapshots
        .begin(&audience, &split)
        .map_err(ApiError::Snapshot)?;
    if options.full {
        upload = upload.full();
    }
    // Parsing, sorting runs to disk, merging and diffing are all CPU and disk work: they run
    // on a blocking thread fed through a short channel, so that events keep being answered
    // on the runtime's thread while a snapshot of millions arrives.
    let (pieces, mut received) = tokio::sync::mpsc::channel::<Option<axum::body::Bytes>>(4);
    let (prefer, allow_empty) = (state.prefer, options.allow_empty);
    let runtime = tokio::runtime::Handle::current();
    let work = tokio::task::spawn_blocking(move || {
        let mut reader = members::MemberReader::new(format, prefer);
        let mut add = |user| upload.add(&user).map_err(ApiError::Snapshot);
        loop {
            match received.blocking_recv() {
                Some(Some(piece)) => reader.feed(&piece, &mut add)?,
                Some(None) => break,
                // The request was abandoned; dropping the upload leaves the previous snapshot.
                None => return Err(ApiError::Stopping),
            }
        }
        reader.finish(&mut add)?;
        runtime
            .block_on(upload.finish(allow_empty))
            .map_err(ApiError::Snapshot)
    });
    let mut stream = body.into_data_stream();
    // A client that stops sending, or trickles, would hold the split's upload lock (every
    // other snapshot of it gets 409) for as long as its connection lives: the upload keeps
    // the body pace, sends something at least every `upload_idle_timeout`, and arrives
    // whole within `upload_timeout`.
    let mut pace = request_body::Pace::new(&state.body_limits);
    let whole_by = tokio::time::Instant::now() + state.upload_timeout;
    let abandoned = |e: BodyError| {
        ApiError::Body(match e {
            BodyError::TooSlow { received, why } => BodyError::TooSlow {
                received,
                why: format!("{why}; the upload was abandoned and the previous snapshot stays"),
            },
            BodyError::Cut(why) => BodyError::Cut(format!("{why}; the previous snapshot stays")),
            other => other,
        })
    };
    loop {
        let idle_by = tokio::time::Instant::now() + state.upload_idle_timeout;
        let by = idle_by.min(whole_by);
        let next = tokio::time::timeout_at(by, pace.next(&mut stream)).await;
        let Ok(next) = next else {
            let why = if by == whole_by {
                format!(
                    "the upload did not arrive whole within {} ms (ingest.upload_timeout_ms)",
                    state.upload_timeout.as_millis()
                )
            } else {
                format!(
                    "the upload sent nothing for {} ms (ingest.upload_idle_timeout_ms)",
                    state.upload_idle_timeout.as_millis()
                )
            };
            return Err(abandoned(BodyError::TooSlow {
                received: pace.received(),
                why,
            }));
        };
        let piece = next.map_err(abandoned)?;
        let end = piece.is_none();
        // A closed channel means the worker stopped at a bad line: its answer says which.
        if pieces.send(piece).await.is_err() || end {
            break;
        }
    }
    let report = work.await.expect("snapshot upload panicked")?;
    Ok(Json(report).into_response())
}

/// `?limit=N` on the listing endpoints.
#[derive(serde::Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// Listings are capped so that one call cannot pull a whole backlog into memory.
const MAX_LIST: usize = 10_000;

async fn admin_peek(
    State(state): State<Arc<AppState>>,
    Query(q): Query<Limit>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(20).min(MAX_LIST);
    let records = state.queue.peek(limit).map_err(ApiError::Queue)?;
    let records = crate::delivery::with_objects(records, &state.delivery.policy);
    Ok(Json(json!({ "records": records })).into_response())
}

async fn admin_dead(
    State(state): State<Arc<AppState>>,
    Query(q): Query<Limit>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(20).min(MAX_LIST);
    let records = state.queue.dead(limit).map_err(ApiError::Queue)?;
    let records = crate::delivery::with_objects(records, &state.delivery.policy);
    Ok(Json(json!({ "records": records })).into_response())
}

async fn admin_retry_dead(
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

async fn admin_purge_dead(
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
async fn healthz() -> Response {
    Json(json!({"alive": true})).into_response()
}

/// Why the daemon should not get traffic now, if it should not: a cause (for the metric)
/// and the reason `/readyz` gives.
fn not_ready(state: &AppState) -> Option<(&'static str, String)> {
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

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
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
async fn status_page(State(state): State<Arc<AppState>>) -> Response {
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
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let queue = state.queue.stats().ok();
    let text = crate::metrics::render(
        queue.as_ref(),
        &state.delivery.stats(),
        &state.delivery.counters.latency,
        not_ready(&state).map(|(cause, _)| cause),
    );
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
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
