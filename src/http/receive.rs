//! The ingest endpoints: `/v1` records, Braze-compatible `/users/track` and
//! `/users/export/ids`, and snapshot uploads. Each reads its body within bounds, parses it all
//! or nothing, and answers only once what it accepted is durable; none of them ever answers
//! 2xx for a record that is not on disk.

use super::*;

pub(super) async fn ingest_with<F>(
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
pub(super) struct MembershipOptions {
    #[serde(default)]
    resend: bool,
}

pub(super) async fn post_memberships(
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

pub(super) async fn post_events(
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

pub(super) async fn post_attributes(
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
pub(super) async fn users_track(
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

/// `POST /users/export/ids`, Braze-compatible: forwarded to Braze synchronously (a read needs
/// no queue), so a Braze client pointed at the daemon can still look users up. The client
/// authenticates with the ingest token as its "API key"; Braze sees the real key.
pub(super) async fn export_ids(
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
pub(super) struct SnapshotOptions {
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
pub(super) async fn put_snapshot(
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
